"""The config-facing facts of each family: which `model.*` fields only some families read,
and which `data.format`s each trains on. A leaf module: config validation reads it without
importing the specs (which import the models, which import the config)."""

from __future__ import annotations

FAMILY_NAMES = ("decoder", "encoder", "encoder_decoder")

# ModelConfig fields read only by the listed families' modules. Fields not listed here apply
# to every family.
OWN_FIELDS: dict[str, frozenset[str]] = {
    "decoder": frozenset({"local_window", "local_every", "local_pattern", "rope_local_theta",
                          "final_logit_softcap", "embed_scale", "num_experts",
                          "experts_per_token", "router_aux_loss", "router_z_loss"}),
    "encoder": frozenset({"type_vocab_size", "pad_token_id"}),
    "encoder_decoder": frozenset({
        "num_decoder_layers", "embed_scale", "embed_norm", "final_norm", "relative_buckets",
        "relative_max_distance", "scale_decoder_output", "final_logits_bias",
        "decoder_start_id", "pad_token_id"}),
}

# data.format values each family trains on; the first is used for plain-text corpora, the
# pair format (if any) for (source, target) corpora.
DATA_FORMATS: dict[str, tuple[str, ...]] = {
    "decoder": ("text", "prompt_answer", "preference", "chat"),
    "encoder": ("text",),
    "encoder_decoder": ("text", "pairs"),
}


# Families whose objective can take the final hidden states and output projection in chunks
# of positions (train.loss_chunk) instead of whole logits.
CHUNKED_LOSS: frozenset[str] = frozenset({"decoder"})


# Families whose sequences mesh.context may split (context parallelism): decoder-only models.
CONTEXT_PARALLEL: frozenset[str] = frozenset({"decoder"})


def splits_sequences(name: str) -> bool:
    """Whether family `name` trains with mesh.context > 1."""
    return name in CONTEXT_PARALLEL


def chunks_loss(name: str) -> bool:
    """Whether the objective of family `name` takes train.loss_chunk."""
    return name in CHUNKED_LOSS


def is_family(name: str) -> bool:
    return name in OWN_FIELDS


def family_specific_fields() -> frozenset[str]:
    return frozenset().union(*OWN_FIELDS.values())


def ignored_fields(family: str, fields: set[str]) -> list[str]:
    """The fields among `fields` that `family`'s modules never read."""
    return sorted(f for f in fields & family_specific_fields() if f not in OWN_FIELDS[family])


def pair_format(family: str) -> str | None:
    """The data.format a (source, target) corpus becomes for `family`, if it takes pairs."""
    return next(iter(DATA_FORMATS[family][1:]), None)
