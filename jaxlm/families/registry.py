"""The family registry: the one place that maps a family name to its spec."""

from __future__ import annotations

from jaxlm.families.decoder import DecoderSpec
from jaxlm.families.encoder import EncoderSpec
from jaxlm.families.encoder_decoder import EncoderDecoderSpec
from jaxlm.families.spec import FamilySpec

FAMILIES: dict[str, FamilySpec] = {spec.name: spec for spec in
                                   (DecoderSpec(), EncoderSpec(), EncoderDecoderSpec())}


def get(name: str) -> FamilySpec:
    if name not in FAMILIES:
        raise KeyError(f"unknown model family '{name}'; known: {', '.join(FAMILIES)}")
    return FAMILIES[name]


def of(model_cfg) -> FamilySpec:
    """The spec of a ModelConfig's family."""
    return get(model_cfg.family)


def build_model(model_cfg):
    """The Flax module of a ModelConfig's family."""
    return of(model_cfg).build_model(model_cfg)


def hf_converter(model_type: str, family: str | None = None) -> tuple[FamilySpec, str] | None:
    """(family spec, jaxlm.convert module name) of an HF model_type, or None; with `family`,
    only if the model_type belongs to that family."""
    for spec in FAMILIES.values():
        if model_type in spec.hf_model_types and family in (None, spec.name):
            return spec, spec.hf_model_types[model_type]
    return None


def hf_model_types() -> list[str]:
    return [t for spec in FAMILIES.values() for t in spec.hf_model_types]
