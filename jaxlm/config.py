"""Configuration: one dataclass schema, YAML files, dotted `key=value` overrides.

Resolution order (later wins): schema defaults < `model.preset` < YAML file < overrides.
Every field carries a help string in its metadata; `describe()` lists them.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib.resources
import math
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A user-facing configuration problem; the CLI prints it and exits with code 2."""


def _f(default: Any, help: str, **kw: Any) -> Any:
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"help": help}, **kw)
    return field(default=default, metadata={"help": help}, **kw)


@dataclass(frozen=True)
class ModelConfig:
    preset: str = _f("gpt2", "architecture preset (see jaxlm.models.presets.PRESETS)")
    family: str = _f("decoder", "decoder | encoder | encoder_decoder (set by the preset)")
    num_layers: int = _f(12, "number of Transformer blocks (per stack for encoder-decoder)")
    num_decoder_layers: int = _f(0, "decoder blocks of an encoder-decoder; 0 = num_layers")
    d_model: int = _f(768, "residual stream width")
    num_heads: int = _f(12, "attention heads")
    num_kv_heads: int = _f(0, "key/value heads for grouped-query attention; 0 = num_heads")
    head_dim: int = _f(0, "width of one head; 0 = d_model // num_heads")
    d_ff: int = _f(3072, "hidden width of the MLP")
    vocab_size: int = _f(50257, "embedding rows; must cover the tokenizer's ids")
    max_seq_len: int = _f(1024, "longest sequence the position encoding supports")
    attention: str = _f("auto", "attention kernel: reference | xla | cudnn (NVIDIA) | splash "
                        "| flash (TPU Pallas) | chunked (O(n) memory) | triangular (causal "
                        "slices, skips masked keys) | auto (best for backend)")
    context_attention: str = _f("ring", "attention across mesh.context shards: ring (key/value "
                                "blocks passed from shard to shard, merged by an online "
                                "softmax: O(length / context) memory) | allgather (each shard "
                                "gathers all keys and values, then model.attention runs on its "
                                "queries; triangular runs xla there)")
    dtype: str = _f("float32", "compute dtype: float32 | bfloat16")
    param_dtype: str = _f("float32", "parameter and optimizer-state dtype")
    norm: str = _f("layernorm", "layernorm | rmsnorm | rmsnorm_plus1 (scaled by 1 + w, w "
                   "starting at 0: Gemma)")
    norm_position: str = _f("pre", "pre (GPT-2/Llama) | post (BERT, original Transformer)")
    norm_eps: float = _f(1e-5, "epsilon of the normalisation layers")
    activation: str = _f("gelu_tanh", "MLP activation: gelu_tanh | gelu | relu | silu")
    gated_mlp: bool = _f(False, "gated MLP (SwiGLU when activation=silu)")
    position: str = _f("learned", "position encoding: learned | rope | sinusoidal | none")
    rope_theta: float = _f(10000.0, "RoPE base frequency")
    rope_scaling: str = _f("none", "RoPE frequency scaling as HF defines it: none | linear "
                           "(positions / rope_factor) | dynamic (NTK base growth past "
                           "max_seq_len) | llama3 (Llama 3.1 wavelength bands)")
    rope_factor: float = _f(1.0, "rope_scaling's factor (Llama 3.1: 8, Llama 3.2: 32)")
    rope_low_freq_factor: float = _f(1.0, "llama3 scaling: wavelengths above "
                                     "rope_original_max_len / this are divided by rope_factor")
    rope_high_freq_factor: float = _f(4.0, "llama3 scaling: wavelengths below "
                                      "rope_original_max_len / this are kept")
    rope_original_max_len: int = _f(0, "llama3 scaling: the pre-training context (Llama 3: "
                                    "8192); 0 = max_seq_len")
    qkv_bias: bool = _f(False, "biases on the query/key/value projections even when use_bias "
                        "is false (Qwen2)")
    qk_norm: bool = _f(False, "normalise each query and key head (a `norm`-kind norm over "
                       "head_dim) before RoPE (Qwen3, Gemma 3)")
    sandwich_norm: bool = _f(False, "pre-norm blocks also normalise each sublayer's output "
                             "before the residual add (Gemma 2/3)")
    attention_softcap: float = _f(0.0, "attention logits become cap·tanh(logits / cap) "
                                  "(Gemma 2: 50); 0 = off")
    use_bias: bool = _f(True, "biases in attention and MLP projections")
    tie_embeddings: bool = _f(True, "output projection shares the token embedding")
    dropout: float = _f(0.0, "dropout rate on residual branches and embeddings")
    scan_layers: bool = _f(True, "stack the blocks with nn.scan (compile time flat in depth)")
    remat: str = _f("none", "rematerialisation policy: none | full | dots_saveable | offload "
                    "(matmul outputs to pinned host memory)")
    grad_barrier: bool = _f(False, "write each block's residual-stream gradient once (an "
                            "identity matmul in the backward pass), so XLA's CPU fusion does not "
                            "recompute the norms' backward in every consumer: faster for small "
                            "models on CPU in `jaxlm bench` (the tiny shape), not for W")
    init_from: str = _f("", "start a new run from these weights with a fresh optimizer: an HF "
                        "model directory, a jaxlm run directory or an export; its model.* "
                        "fields and tokenizer come with it (a model field set otherwise is "
                        "refused)")
    init_std: float = _f(0.02, "standard deviation of the normal weight initialiser")
    attention_scale: float = _f(0.0, "attention logit scale; 0 = 1/sqrt(head_dim) (T5 uses 1)")
    # decoder family
    local_window: int = _f(0, "banded attention width in local layers (GPT-3); 0 = all dense")
    local_every: int = _f(2, "with local_window: every N-th layer is local (GPT-3: 2; "
                          "Mistral: 1, every layer, which decodes with a cache of "
                          "local_window positions)")
    local_pattern: str = _f("", "with local_window: which layers are local, one letter per "
                            "layer, L local or G global, repeated over the stack (Gemma 2: LG, "
                            "Gemma 3: LLLLLG); empty = every local_every-th layer")
    rope_local_theta: float = _f(0.0, "RoPE base of the local layers, which then skip "
                                 "rope_scaling (Gemma 3: 10000); 0 = as the global layers")
    final_logit_softcap: float = _f(0.0, "output logits become cap·tanh(logits / cap) "
                                    "(Gemma 2: 30); 0 = off")
    num_experts: int = _f(0, "mixture of experts: expert MLPs per layer, each token routed "
                          "to experts_per_token of them (Mixtral: 8); 0 = one dense MLP")
    experts_per_token: int = _f(2, "with num_experts: the top-k experts a token goes to")
    router_aux_loss: float = _f(0.01, "with num_experts: weight of the load-balancing loss "
                                "(Switch/Mixtral; HF's router_aux_loss_coef) in the objective")
    router_z_loss: float = _f(0.0, "with num_experts: weight of the router z-loss, the mean "
                              "squared log-sum-exp of the router logits (ST-MoE: 0.001)")
    # encoder family
    type_vocab_size: int = _f(0, "token-type (segment A/B) embeddings; 0 = none (BERT: 2)")
    pad_token_id: int = _f(0, "padding id; RoBERTa-style positions skip tokens with this id")
    position_offset: int = _f(0, "rows of the position table before position 0; > 0 = "
                              "RoBERTa positions (pad_token_id + 1 + count of non-pad tokens)")
    # encoder-decoder family
    embed_scale: bool = _f(False, "token embeddings times sqrt(d_model), in the compute dtype "
                           "(Transformer, Marian, Gemma)")
    embed_norm: bool = _f(False, "LayerNorm on the embeddings of each stack (BART)")
    final_norm: bool = _f(True, "a norm closes each stack (T5, torch.nn.Transformer; not BART)")
    sinusoidal_layout: str = _f("interleaved", "sinusoidal positions: interleaved (paper) | "
                                "split (Marian: sin in the first half, cos in the second)")
    relative_buckets: int = _f(0, "T5 relative position bias buckets; 0 = no relative bias")
    relative_max_distance: int = _f(128, "T5: distance from which all positions share a bucket")
    scale_decoder_output: bool = _f(False, "decoder output times d_model**-0.5 before the "
                                    "vocabulary projection (T5 v1.0)")
    final_logits_bias: bool = _f(False, "a learned bias on the output logits (BART, Marian)")
    decoder_start_id: int = _f(-1, "token that starts every decoder input; -1 = the tokenizer's "
                               "BOS (else PAD, else 0); HF conversions set the model's own "
                               "(T5: pad, BART: eos)")


@dataclass
class DataConfig:
    name: str = _f("shakespeare", "prepared corpus name (jaxlm prepare NAME); ignored if files set")
    format: str = _f("", "text (documents) | pairs (source/target JSON lines, encoder-decoder)"
                     " | prompt_answer (source/target JSON lines as prompt -> answer rows, "
                     "decoder) | preference (prompt/chosen/rejected JSON lines, train.objective="
                     "dpo) | chat (JSON lines of messages, decoder: the loss on assistant "
                     "turns); empty = the prepared corpus's kind, text for data.files")
    files: list[str] = _f([], "text/jsonl training files, globs or folders (local or gs://...);"
                          " overrides name")
    valid_files: list[str] = _f([], "held-out files; empty = last valid_fraction of files")
    hf_path: str = _f("", "an HF dataset: a hub name, a folder of parquet/arrow/json/text files"
                      " or a save_to_disk folder; overrides files and name")
    hf_name: str = _f("", "the HF dataset's configuration name (hub datasets with several)")
    split: str = _f("train", "the HF dataset's training split (validation: its 'validation' "
                    "split if it has one, else the last valid_fraction held out)")
    streaming: bool = _f(False, "stream the HF dataset (split by process, never tokenized "
                         "ahead) instead of tokenizing it into a token store")
    store_dir: str = _f("", "folder of token stores (local or gs://...); empty = "
                        "$JAXLM_CACHE/stores (default ~/.cache/jaxlm/stores)")
    workers: int = _f(0, "processes tokenizing a new token store (0 = one per core)")
    valid_fraction: float = _f(0.05, "share of local text held out when valid_files is empty")
    text_field: str = _f("text", "field holding the text in jsonl files")
    tokenizer: str = _f("byte", "byte | bpe (trained on the corpus) | path to a tokenizer dir")
    bpe_vocab_size: int = _f(8192, "vocabulary size when tokenizer=bpe")
    pack: bool = _f(False, "decoder models: pack whole documents into rows with segment ids "
                    "and restarted positions, so attention never crosses documents")
    utf8_errors: str = _f("replace", "bytes that are not UTF-8 in .txt data: replace (and "
                          "warn with a count) | error")
    source_field: str = _f("source", "jsonl field of the source text (encoder-decoder pairs)")
    target_field: str = _f("target", "jsonl field of the target text (encoder-decoder pairs)")


@dataclass
class TrainConfig:
    steps: int = _f(1000, "optimizer steps in total (the most, with train.time_budget)")
    time_budget: float = _f(0.0, "seconds the whole run may take (0 = off): after compiling, "
                            "the step count is planned from measured step, evaluation and "
                            "checkpoint times, and the schedule decays over it; a resumed run "
                            "keeps its plan")
    batch_size: int = _f(32, "global batch size in sequences")
    seq_len: int = _f(256, "tokens per training sequence")
    eval_every: int = _f(250, "validate every N steps (0 = only at the end)")
    eval_batches: int = _f(8, "validation batches per evaluation")
    log_every: int = _f(10, "write a metrics row every N steps")
    prefetch: int = _f(2, "batches built and put on the devices ahead of the step, on a "
                       "background thread (0 = build each when needed)")
    label_smoothing: float = _f(0.0, "label smoothing of the cross entropy")
    z_loss: float = _f(0.0, "weight of the log(Z)^2 penalty that keeps logits small")
    loss_chunk: int = _f(0, "decoder models: positions per chunk of the cross entropy, which "
                         "then never holds the whole [batch, seq, vocab] float32 logits (a "
                         "divisor of train.seq_len; 0 = whole logits)")
    mlm_rate: float = _f(0.15, "share of tokens masked by the masked-LM objective")
    max_bad_steps: int = _f(5, "non-finite steps in a row before on_bad_steps acts")
    on_bad_steps: str = _f("rollback", "rollback (to the last checkpoint, skipping the "
                           "batches since) | stop")
    max_rollbacks: int = _f(3, "rollbacks allowed in one run before it stops with an error")
    spike_zscore: float = _f(6.0, "log a loss_spike event when the loss exceeds the running "
                             "mean by this many standard deviations (0 = off)")
    objective: str = _f("lm", "lm (next-token cross entropy on the data's loss mask) | dpo "
                        "(direct preference optimisation on prompt/chosen/rejected JSON "
                        "lines, data.format=preference; settings in dpo.*)")


@dataclass
class OptimConfig:
    lr: float = _f(3e-4, "peak learning rate")
    warmup_steps: int = _f(100, "linear warmup steps")
    schedule: str = _f("cosine", "after warmup: cosine (decay over the whole run) or wsd "
                       "(warmup-stable-decay: lr held until the last optim.decay_fraction of "
                       "the steps, then a linear decay; train.time_budget re-plans such a run "
                       "while its lr is held)")
    decay_fraction: float = _f(0.2, "optim.schedule=wsd: the share of the steps that decay")
    min_lr_ratio: float = _f(0.1, "final learning rate as a fraction of lr")
    weight_decay: float = _f(0.1, "AdamW decoupled weight decay (not on biases, norms, embeddings)")
    b1: float = _f(0.9, "Adam beta1")
    b2: float = _f(0.95, "Adam beta2")
    eps: float = _f(1e-8, "Adam epsilon")
    clip_norm: float = _f(1.0, "clip gradients to this global norm (0 = off)")
    grad_accum_steps: int = _f(1, "micro-batches accumulated per optimizer step")


@dataclass
class MeshConfig:
    data: int = _f(-1, "data-parallel axis size (-1 = the devices left over)")
    fsdp: int = _f(1, "fully-sharded data-parallel axis size (-1 = the devices left over)")
    tensor: int = _f(1, "tensor-parallel axis size (-1 = the devices left over)")
    expert: int = _f(1, "expert-parallel axis size: splits the MoE experts, and the batch "
                     "of every other layer as data parallelism does (-1 = the devices left over)")
    rules: list[str] = _f([], "logical-axis rules over the default table, e.g. "
                          "embed=tensor or mlp=fsdp+tensor or vocab= (not sharded)")
    dcn_data: int = _f(-1, "multislice: how many ways of mesh.data cross the slow network "
                       "between TPU slices (between hosts elsewhere); -1 = the slices left over "
                       "by dcn_fsdp (1 on one slice)")
    dcn_fsdp: int = _f(1, "multislice: how many ways of mesh.fsdp cross slices (its gathers "
                       "then cross the slow network too)")
    context: int = _f(1, "context-parallel axis size: splits every sequence (the length axis "
                      "of activations and batches) over this many devices, attention crossing "
                      "the shards as model.context_attention says (decoder models)")
    context_zigzag: bool = _f(True, "with mesh.context > 1: reorder each sequence in 2 × context "
                              "chunks, shard i holding chunks i and 2·context−1−i, so that every "
                              "shard does the same share of the causal attention")


@dataclass
class CheckpointConfig:
    every: int = _f(250, "save every N steps (and always at the end)")
    keep: int = _f(3, "keep the newest N checkpoints")
    keep_period: int = _f(0, "also keep every checkpoint whose step is a multiple of N (0 = off)")
    async_save: bool = _f(True, "write checkpoints in the background")


@dataclass
class RunConfig:
    dir: str = _f("", "run directory; empty = runs/<config name>")
    quiet: bool = _f(False, "no progress bar")
    wandb: bool = _f(False, "also log to Weights & Biases (needs `pip install wandb`)")
    wandb_project: str = _f("jaxlm", "W&B project name when run.wandb is on")
    compile_cache: bool = _f(True, "keep compiled steps in JAX's persistent compilation cache "
                             "under $JAXLM_CACHE/xla, so a resume or rerun skips compiling "
                             "(JAXLM_COMPILATION_CACHE=off also turns it off)")
    cpu_threaded_matmul: bool = _f(True, "on CPU, split each matmul across the cores; false "
                                   "runs each on one thread, faster for small models (XLA's "
                                   "xla_cpu_multi_thread_eigen; XLA_FLAGS, if it sets it, wins)")
    cpu_devices: int = _f(1, "on CPU, split the host into this many JAX devices: the mesh's data "
                          "axis then runs each device's share of the batch on its own core "
                          "(JAX_NUM_CPU_DEVICES or an XLA_FLAGS device count, if set, wins; "
                          "no effect on GPU/TPU or once JAX has started)")


@dataclass
class ProfileConfig:
    start_step: int = _f(5, "the profiler trace starts after this step (past compilation and "
                         "warm-up)")
    steps: int = _f(0, "steps in the jax.profiler trace written to <run.dir>/profile "
                    "(0 = no trace)")


@dataclass
class DPOConfig:
    beta: float = _f(0.1, "train.objective=dpo: strength of the pull towards the reference "
                     "model (the reward is beta * log(policy / reference) of a response)")
    label_smoothing: float = _f(0.0, "train.objective=dpo: the chance that a preference label "
                                "is flipped (conservative DPO); 0 = the sigmoid DPO loss")
    sft_weight: float = _f(0.0, "train.objective=dpo: adds this times the chosen responses' "
                           "mean per-token NLL to the DPO loss (RPO; TRL's rpo_alpha), which "
                           "keeps their likelihood from falling; 0 = DPO alone")


# lora.targets names -> the projections they adapt (self- and cross-attention alike).
LORA_TARGETS = ("query", "key", "value", "out", "mlp_in", "mlp_out")
LORA_TRAIN_ALSO = ("embed",)  # lora.train_also names (jaxlm.lora.TRAIN_ALSO)


@dataclass
class LoraConfig:
    rank: int = _f(0, "LoRA: rank r of the low-rank adapters added to lora.targets; only they "
                   "train, the base weights stay frozen (0 = off: every parameter trains)")
    alpha: float = _f(16.0, "LoRA: an adapter adds (alpha / rank) * x A B to its projection")
    dropout: float = _f(0.0, "LoRA: dropout on the adapters' input while training")
    targets: list[str] = _f(["query", "value"], "LoRA: projections that get adapters: query, "
                            "key, value, out (attention), mlp_in (wi, or wi_gate and wi_up), "
                            "mlp_out (wo)")
    train_also: list[str] = _f([], "LoRA: parameters trained whole beside the adapters (PEFT's "
                               "modules_to_save): embed = the token, position and output "
                               "embeddings (a base that never saw a byte or token the new "
                               "data uses); [] = the adapters alone")


@dataclass
class Config:
    seed: int = _f(0, "seed of initialisation, data order and dropout")
    model: ModelConfig = field(default_factory=ModelConfig, metadata={"help": "model shape"})
    data: DataConfig = field(default_factory=DataConfig, metadata={"help": "training data"})
    train: TrainConfig = field(default_factory=TrainConfig, metadata={"help": "training loop"})
    optim: OptimConfig = field(default_factory=OptimConfig, metadata={"help": "optimizer"})
    mesh: MeshConfig = field(default_factory=MeshConfig, metadata={"help": "device mesh"})
    checkpoint: CheckpointConfig = field(
        default_factory=CheckpointConfig, metadata={"help": "checkpointing"}
    )
    run: RunConfig = field(default_factory=RunConfig, metadata={"help": "run directory"})
    profile: ProfileConfig = field(default_factory=ProfileConfig,
                                   metadata={"help": "profiler trace"})
    dpo: DPOConfig = field(default_factory=DPOConfig,
                           metadata={"help": "direct preference optimisation"})
    lora: LoraConfig = field(default_factory=LoraConfig,
                             metadata={"help": "low-rank adapters (LoRA)"})
    name: str = _f("", "config name (set from the YAML file)")


# ---------------------------------------------------------------- dict <-> dataclass

def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def _is_section(tp: Any) -> bool:
    return dataclasses.is_dataclass(tp)


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Checks `value` against the annotated type `tp`; ints are accepted for floats."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _coerce(value, args[0], key)
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if isinstance(value, str):  # `data.files=a.txt` means a one-element list
            value = [v for v in value.split(",") if v]
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return [_coerce(v, item_tp, key) for v in value]
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "1e-3" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
    raise ConfigError(f"{key}: expected {getattr(tp, '__name__', tp)}, got {value!r}")


def _all_keys(cls: type = Config, prefix: str = "") -> list[str]:
    keys = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if _is_section(tp):
            keys += _all_keys(tp, f"{prefix}{f.name}.")
        else:
            keys.append(prefix + f.name)
    return keys


def _unknown_key(key: str) -> ConfigError:
    near = difflib.get_close_matches(key, _all_keys(), n=1, cutoff=0.5)
    hint = f"; did you mean '{near[0]}'?" if near else "; see `jaxlm train --help-config`"
    return ConfigError(f"unknown config key '{key}'{hint}")


def from_dict(raw: dict[str, Any], cls: type = Config, prefix: str = "") -> Any:
    """Builds a (nested) dataclass from a plain dict, rejecting unknown keys and bad types."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in raw.items():
        if key not in names:
            raise _unknown_key(prefix + str(key))
        tp = hints[key]
        if _is_section(tp):
            kwargs[key] = from_dict(value or {}, tp, f"{prefix}{key}.")
        else:
            kwargs[key] = _coerce(value, tp, prefix + key)
    return cls(**kwargs)


def _set_dotted(tree: dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    node = tree
    for p in parts[:-1]:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise _unknown_key(key)
    node[parts[-1]] = value


def _merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in top.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def parse_overrides(args: list[str]) -> dict[str, Any]:
    """`["train.steps=10", "model.dtype=bfloat16"]` -> nested dict with YAML-typed values."""
    tree: dict[str, Any] = {}
    valid = set(_all_keys())
    for arg in args:
        if "=" not in arg:
            raise ConfigError(f"expected key=value, got '{arg}'")
        key, text = arg.split("=", 1)
        key = key.strip()
        if key not in valid:
            raise _unknown_key(key)
        try:
            value = yaml.safe_load(text) if text.strip() else ""
        except yaml.YAMLError:
            value = text
        if value is None:
            value = ""
        _set_dotted(tree, key, value)
    return tree


# ---------------------------------------------------------------- files and presets

def _configs_root():
    try:
        return importlib.resources.files("jaxlm.configs")
    except ModuleNotFoundError:  # running from a source tree that is not installed
        return Path(__file__).resolve().parent.parent / "configs"


def config_names() -> list[str]:
    root = _configs_root()
    return sorted(p.name[:-5] for p in root.iterdir() if p.name.endswith(".yaml"))


def _read_yaml(name_or_path: str) -> tuple[str, dict[str, Any]]:
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") or path.exists():
        if not path.is_file():
            raise ConfigError(f"config file '{name_or_path}' not found")
        text, name = path.read_text(), path.stem
    else:
        res = _configs_root() / f"{name_or_path}.yaml"
        if not res.is_file():
            names = config_names()
            near = difflib.get_close_matches(name_or_path, names, n=1)
            hint = f"did you mean '{near[0]}'? " if near else ""
            raise ConfigError(
                f"no config named '{name_or_path}'; {hint}available: {', '.join(names)}"
            )
        text, name = res.read_text(), name_or_path
    try:
        raw = yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"config '{name_or_path}' is not valid YAML{where}: {problem}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"config '{name_or_path}' must be a mapping of keys")
    return name, raw


DEFAULT_CONFIG = "tiny"


def preset_fields(name: str) -> dict[str, Any]:
    """The `model.*` fields a preset sets, before the YAML file and overrides."""
    from jaxlm.models.presets import PRESETS

    if name not in PRESETS:
        near = difflib.get_close_matches(name, PRESETS, n=1)
        hint = f"did you mean '{near[0]}'? " if near else ""
        raise ConfigError(
            f"model.preset='{name}' is unknown; {hint}available: {', '.join(PRESETS)}"
        )
    return dict(PRESETS[name], preset=name)


def load(name_or_path: str | None = None, overrides: list[str] | None = None, *,
         read_checkpoint: Callable[[str], dict[str, Any]] | None = None) -> Config:
    """Resolves a config: schema defaults < preset < YAML file < overrides, then validates.

    With `model.init_from` and `read_checkpoint` (path -> the config layer a checkpoint
    fixes: its model.* fields, its tokenizer), that layer takes the place of the preset and
    of the default config; a model field the user sets to another value is refused."""
    name, file_raw = _read_yaml(name_or_path or DEFAULT_CONFIG)
    over_raw = parse_overrides(overrides or [])
    user = _merge(file_raw, over_raw)
    init_from = (user.get("model") or {}).get("init_from")
    if init_from and read_checkpoint is not None:
        if name_or_path is None:  # the default config is a from-scratch recipe: not this
            user, name = over_raw, f"{Path(str(init_from)).name}-ft"
        base = read_checkpoint(str(init_from))
        _refuse_contradictions(base.get("model", {}), user.get("model") or {}, init_from)
    else:
        preset = (user.get("model") or {}).get("preset", ModelConfig.preset)
        base = {"model": preset_fields(str(preset))}
    raw = _merge(base, user)
    raw.setdefault("name", name)
    cfg = from_dict(raw)
    _refuse_ignored_fields(cfg, set((user.get("model") or {}).keys()))
    cfg = resolve_data_format(cfg)
    validate(cfg)
    return cfg


def from_yaml_text(text: str) -> Config:
    """Reads a resolved config.yaml (as written to a run directory)."""
    cfg = resolve_data_format(from_dict(yaml.safe_load(text) or {}))
    validate(cfg)
    return cfg


def _refuse_contradictions(fixed: dict[str, Any], user_model: dict[str, Any],
                           source: Any) -> None:
    """The first model field the user set that the checkpoint fixes to another value."""
    ckpt = from_dict(fixed, ModelConfig, "model.")
    mine = from_dict({**fixed, **user_model}, ModelConfig, "model.")
    for f in dataclasses.fields(ModelConfig):
        theirs, ours = getattr(ckpt, f.name), getattr(mine, f.name)
        if f.name in user_model and f.name in fixed and ours != theirs:
            raise ConfigError(f"model.{f.name}={ours!r} contradicts model.init_from={source}, "
                              f"whose model.{f.name} is {theirs!r}; drop the setting (the "
                              "architecture comes from the checkpoint)")


def _refuse_ignored_fields(cfg: Config, user_fields: set[str]) -> None:
    """A `model.*` field the user set that the model's family never reads is an error: it
    would otherwise be silently ignored."""
    from jaxlm.families import schema

    family = cfg.model.family
    if not schema.is_family(family):
        return  # validate() names the bad family
    ignored = schema.ignored_fields(family, user_fields)
    if ignored:
        raise ConfigError(f"model.{ignored[0]} does not apply to the {family} family "
                          f"(model.preset={cfg.model.preset}); remove it or choose a preset "
                          "of a family that reads it")


def resolve_data_format(cfg: Config) -> Config:
    """data.format when left empty: the prepared corpus's kind (pairs for a source/target
    corpus, as the family reads pairs), text for data.files. Never guessed from contents."""
    from jaxlm.families import schema

    if cfg.data.format or not schema.is_family(cfg.model.family):
        return cfg
    if cfg.train.objective == "dpo":  # preference pairs are the only data DPO reads
        return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, format="preference"))
    from jaxlm.data.chat_tasks import NAME as CHAT_TASKS
    from jaxlm.data.prepare import CORPORA

    if cfg.data.name == CHAT_TASKS and not cfg.data.files:  # synthetic conversations
        return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, format="chat"))
    corpus = CORPORA.get(cfg.data.name)
    fmt = "text"
    if not cfg.data.files and corpus is not None and corpus.suffix == ".jsonl":
        fmt = schema.pair_format(cfg.model.family)
        if fmt is None:
            raise ConfigError(f"data.name={cfg.data.name} is a (source, target) corpus, and the "
                              f"{cfg.model.family} family trains on text; choose a text corpus "
                              "or data.files")
    return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, format=fmt))


def dump(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


# ---------------------------------------------------------------- validation

_CHOICES = {
    "model.family": ("decoder", "encoder", "encoder_decoder"),
    "optim.schedule": ("cosine", "wsd"),
    "model.attention": ("reference", "xla", "cudnn", "splash", "flash", "chunked", "triangular",
                        "auto"),
    "model.context_attention": ("ring", "allgather"),
    "model.dtype": ("float32", "bfloat16", "float16"),
    "model.param_dtype": ("float32", "bfloat16"),
    "model.norm": ("layernorm", "rmsnorm", "rmsnorm_plus1"),
    "model.rope_scaling": ("none", "linear", "dynamic", "llama3"),
    "model.norm_position": ("pre", "post"),
    "model.activation": ("gelu_tanh", "gelu", "relu", "silu"),
    "model.position": ("learned", "rope", "sinusoidal", "none"),
    "model.sinusoidal_layout": ("interleaved", "split"),
    "model.remat": ("none", "full", "dots_saveable", "offload"),
    "data.format": ("", "text", "pairs", "prompt_answer", "preference", "chat"),
    "train.objective": ("lm", "dpo"),
}


# Attention kernels that cannot soft-cap attention logits (model.attention_softcap).
NO_SOFTCAP_KERNELS = ("cudnn", "flash")


def _get(cfg: Config, key: str) -> Any:
    obj: Any = cfg
    for p in key.split("."):
        obj = getattr(obj, p)
    return obj


def validate(cfg: Config) -> None:
    """Cross-field checks; raises ConfigError naming the key and the fix."""
    for key, choices in _CHOICES.items():
        if _get(cfg, key) not in choices:
            raise ConfigError(f"{key}={_get(cfg, key)!r}: choose one of {', '.join(choices)}")
    m, t = cfg.model, cfg.train
    positive = ["model.num_layers", "model.d_model", "model.num_heads", "model.d_ff",
                "model.vocab_size", "model.max_seq_len", "train.steps", "train.batch_size",
                "train.seq_len", "train.log_every", "train.eval_batches",
                "optim.grad_accum_steps", "checkpoint.every", "checkpoint.keep", "run.cpu_devices"]
    for key in positive:
        if _get(cfg, key) <= 0:
            raise ConfigError(f"{key} must be positive, got {_get(cfg, key)}")
    if m.head_dim == 0 and m.d_model % m.num_heads:
        raise ConfigError(
            f"model.d_model={m.d_model} is not divisible by model.num_heads={m.num_heads}; "
            "change one of them or set model.head_dim"
        )
    kv = m.num_kv_heads or m.num_heads
    if m.num_heads % kv:
        raise ConfigError(
            f"model.num_heads={m.num_heads} is not a multiple of model.num_kv_heads={kv}"
        )
    if m.position == "learned" and t.seq_len > m.max_seq_len:
        raise ConfigError(
            f"train.seq_len={t.seq_len} exceeds model.max_seq_len={m.max_seq_len}; "
            "lower train.seq_len or raise model.max_seq_len"
        )
    if m.local_every < 1:
        raise ConfigError(f"model.local_every must be >= 1, got {m.local_every}")
    _check_layer_variants(m)
    _check_experts(m)
    if not 0 <= m.dropout < 1:
        raise ConfigError(f"model.dropout must be in [0, 1), got {m.dropout}")
    if not 0 < cfg.optim.lr < math.inf:
        raise ConfigError(f"optim.lr must be positive and finite, got {cfg.optim.lr}")
    if not 0 < cfg.optim.eps < math.inf:  # Adam divides by sqrt(nu) + eps
        raise ConfigError(f"optim.eps must be positive and finite, got {cfg.optim.eps}")
    if not 0 < cfg.optim.decay_fraction <= 1:
        raise ConfigError(f"optim.decay_fraction must be in (0, 1], got "
                          f"{cfg.optim.decay_fraction}")
    if not 0 < cfg.data.valid_fraction < 1:
        raise ConfigError(f"data.valid_fraction must be in (0, 1), got {cfg.data.valid_fraction}")
    for key in ("mesh.data", "mesh.fsdp", "mesh.tensor", "mesh.expert"):
        if _get(cfg, key) == 0 or _get(cfg, key) < -1:
            raise ConfigError(f"{key} must be a positive size or -1, got {_get(cfg, key)}")
    if cfg.mesh.dcn_data == 0 or cfg.mesh.dcn_data < -1 or cfg.mesh.dcn_fsdp < 1:
        raise ConfigError(f"mesh.dcn_data must be a positive count or -1 and mesh.dcn_fsdp a "
                          f"positive count, got {cfg.mesh.dcn_data} and {cfg.mesh.dcn_fsdp}")
    for key in ("profile.start_step", "profile.steps", "train.prefetch"):
        if _get(cfg, key) < 0:
            raise ConfigError(f"{key} must be >= 0, got {_get(cfg, key)}")
    if t.eval_every < 0:
        raise ConfigError(f"train.eval_every must be >= 0, got {t.eval_every}")
    if not t.time_budget >= 0 or t.time_budget == float("inf"):
        raise ConfigError(f"train.time_budget must be a number of seconds >= 0 (0 = off), "
                          f"got {t.time_budget}")
    _check_family_data(cfg)
    _check_objective(cfg)
    _check_lora(cfg)
    _check_loss_chunk(cfg)
    _check_context(cfg)
    _check_data_sources(cfg.data)


def _check_data_sources(d: DataConfig) -> None:
    """HF datasets, streaming and token-store settings that cannot work together."""
    if d.workers < 0:
        raise ConfigError(f"data.workers must be >= 0 (0 = one per core), got {d.workers}")
    if d.hf_path and not d.split:
        raise ConfigError("data.split is empty; name the HF dataset's training split")
    if not d.streaming:
        return
    if not d.hf_path:
        raise ConfigError("data.streaming=true streams an HF dataset: set data.hf_path")
    if d.tokenizer == "bpe":
        raise ConfigError("data.tokenizer=bpe trains on the whole corpus, which a stream "
                          "never holds; with data.streaming use byte or a tokenizer folder")
    if d.pack:
        raise ConfigError("data.pack packs the documents of a token store; it does not apply "
                          "with data.streaming=true")


def _check_rope(m: ModelConfig) -> None:
    if m.rope_scaling == "none":
        return
    if m.position != "rope":
        raise ConfigError(f"model.rope_scaling={m.rope_scaling} scales RoPE, but "
                          f"model.position={m.position}; set model.position=rope or "
                          "model.rope_scaling=none")
    if m.rope_factor < 1:
        raise ConfigError(f"model.rope_factor must be >= 1 with model.rope_scaling="
                          f"{m.rope_scaling}, got {m.rope_factor}")
    if m.rope_scaling == "llama3" and not 0 < m.rope_low_freq_factor < m.rope_high_freq_factor:
        raise ConfigError("model.rope_scaling=llama3 needs 0 < model.rope_low_freq_factor < "
                          f"model.rope_high_freq_factor, got {m.rope_low_freq_factor} and "
                          f"{m.rope_high_freq_factor}")
    if m.rope_original_max_len < 0:
        raise ConfigError(f"model.rope_original_max_len must be >= 0, got "
                          f"{m.rope_original_max_len}")


def _check_layer_variants(m: ModelConfig) -> None:
    """RoPE scaling, soft-caps, the local/global layer pattern and sandwich norms."""
    _check_rope(m)
    for key in ("attention_softcap", "final_logit_softcap", "rope_local_theta"):
        if getattr(m, key) < 0:
            raise ConfigError(f"model.{key} must be >= 0 (0 = off), got {getattr(m, key)}")
    if m.local_pattern and (set(m.local_pattern) - {"L", "G"} or not m.local_window):
        raise ConfigError(f"model.local_pattern={m.local_pattern!r} needs letters L (local) "
                          "and G (global) only, and a model.local_window > 0")
    if m.attention_softcap and m.attention in NO_SOFTCAP_KERNELS:
        raise ConfigError(f"model.attention={m.attention} cannot soft-cap attention logits "
                          "(model.attention_softcap); use model.attention=auto, chunked, xla "
                          "or splash")
    if m.sandwich_norm and m.norm_position != "pre":
        raise ConfigError("model.sandwich_norm adds norms to pre-norm blocks; it needs "
                          "model.norm_position=pre")


def _check_experts(m: ModelConfig) -> None:
    """The mixture-of-experts fields: top-k within the experts, non-negative loss weights."""
    if m.num_experts < 0:
        raise ConfigError(f"model.num_experts must be >= 0 (0 = dense MLP), got {m.num_experts}")
    for key in ("router_aux_loss", "router_z_loss"):
        if getattr(m, key) < 0:
            raise ConfigError(f"model.{key} must be >= 0, got {getattr(m, key)}")
    if not m.num_experts:
        return
    if not 1 <= m.experts_per_token <= m.num_experts:
        raise ConfigError(f"model.experts_per_token={m.experts_per_token} must be between 1 and "
                          f"model.num_experts={m.num_experts}")
    if m.use_bias:
        raise ConfigError("expert MLPs have no biases (as in Mixtral): set model.use_bias=false "
                          "with model.num_experts")


def _check_objective(cfg: Config) -> None:
    """train.objective=dpo and data.format=preference go together, on unpacked JSON lines."""
    dpo, d = cfg.train.objective == "dpo", cfg.data
    if dpo != (d.format == "preference"):
        raise ConfigError(f"train.objective={cfg.train.objective} with data.format={d.format}: "
                          "preference data (prompt/chosen/rejected JSON lines) is what "
                          "train.objective=dpo trains on, and only that; set both or neither")
    if not cfg.dpo.beta > 0:
        raise ConfigError(f"dpo.beta must be positive, got {cfg.dpo.beta}")
    if not 0 <= cfg.dpo.label_smoothing < 0.5:
        raise ConfigError(f"dpo.label_smoothing must be in [0, 0.5), got "
                          f"{cfg.dpo.label_smoothing}")
    if not 0 <= cfg.dpo.sft_weight < float("inf"):
        raise ConfigError(f"dpo.sft_weight must be a finite number >= 0, got "
                          f"{cfg.dpo.sft_weight}")
    if not dpo:
        return
    for key, why in (("data.pack", "pairs are padded rows, never packed"),
                     ("data.streaming", "it reads data.files"),
                     ("data.hf_path", "it reads data.files"),
                     ("train.loss_chunk", "it takes whole logits")):
        if _get(cfg, key):
            raise ConfigError(f"{key} does not apply with train.objective=dpo ({why}); "
                              "remove it")
    from jaxlm.data.chat_preferences import NAME as CHAT_PREFERENCES

    if not d.files and d.name != CHAT_PREFERENCES:
        raise ConfigError("train.objective=dpo trains on preference JSON lines: set "
                          "data.files (and data.valid_files for held-out pairs), or "
                          f"data.name={CHAT_PREFERENCES} (synthetic pairs)")


def _check_lora(cfg: Config) -> None:
    """LoRA's rank, scale, dropout, targets and train_also; the MoE experts take no
    adapters."""
    lo = cfg.lora
    if lo.rank < 0:
        raise ConfigError(f"lora.rank must be >= 0 (0 = off), got {lo.rank}")
    if not lo.alpha > 0:
        raise ConfigError(f"lora.alpha must be positive, got {lo.alpha}")
    if not 0 <= lo.dropout < 1:
        raise ConfigError(f"lora.dropout must be in [0, 1), got {lo.dropout}")
    bad = [t for t in lo.targets if t not in LORA_TARGETS]
    if bad or len(set(lo.targets)) != len(lo.targets) or (lo.rank and not lo.targets):
        raise ConfigError(f"lora.targets={lo.targets}: choose distinct names among "
                          f"{', '.join(LORA_TARGETS)}")
    bad = [t for t in lo.train_also if t not in LORA_TRAIN_ALSO]
    if bad or len(set(lo.train_also)) != len(lo.train_also):
        raise ConfigError(f"lora.train_also={lo.train_also}: choose distinct names among "
                          f"{', '.join(LORA_TRAIN_ALSO)}")
    if lo.rank and lo.train_also and cfg.train.objective == "dpo":
        raise ConfigError("lora.train_also with train.objective=dpo: DPO's reference is the "
                          "base without adapters, which trained embeddings would move; "
                          "leave lora.train_also empty")
    mlp = [t for t in lo.targets if t.startswith("mlp_")]
    if lo.rank and cfg.model.num_experts and mlp:
        raise ConfigError(f"lora.targets {', '.join(mlp)}: the expert MLPs of a mixture of "
                          "experts (model.num_experts) take no adapters; target the attention "
                          "projections (query, key, value, out)")


def _check_loss_chunk(cfg: Config) -> None:
    from jaxlm.families import schema

    chunk, T = cfg.train.loss_chunk, cfg.train.seq_len
    if chunk < 0 or (chunk and T % chunk):
        raise ConfigError(f"train.loss_chunk={chunk} must be 0 or a divisor of "
                          f"train.seq_len={T}")
    if chunk and not schema.chunks_loss(cfg.model.family):
        raise ConfigError(f"train.loss_chunk applies to decoder-only models, not the "
                          f"{cfg.model.family} family; remove it")


def _check_context(cfg: Config) -> None:
    """mesh.context: a positive size, for a family that splits sequences, dividing them."""
    from jaxlm.families import schema

    n, T = cfg.mesh.context, cfg.train.seq_len
    if n < 1:
        raise ConfigError(f"mesh.context must be a positive size (1 = off), got {n}")
    if n == 1:
        return
    if not schema.splits_sequences(cfg.model.family):
        raise ConfigError(f"mesh.context={n} splits the sequences of decoder-only models; "
                          f"the {cfg.model.family} family trains with mesh.context=1")
    chunks = 2 * n if cfg.mesh.context_zigzag else n
    if T % chunks:
        why = f"2 per shard of mesh.context={n}" if cfg.mesh.context_zigzag else "one per shard"
        raise ConfigError(f"train.seq_len={T} does not split into {chunks} equal chunks ({why})"
                          f"; choose a multiple of {chunks}")


def _check_family_data(cfg: Config) -> None:
    from jaxlm.families import schema

    formats = schema.DATA_FORMATS[cfg.model.family]
    if cfg.data.format and cfg.data.format not in formats:
        raise ConfigError(f"data.format={cfg.data.format} does not fit the {cfg.model.family} "
                          f"family, which trains on {' or '.join(formats)}")


# Keys a resumed run may change; anything else would make the checkpoint another model or run.
RESUMABLE_PREFIXES = ("train.steps", "train.eval_every", "train.eval_batches", "train.log_every",
                      "checkpoint.", "run.", "mesh.", "data.files", "data.valid_files",
                      "data.store_dir", "data.workers", "profile.", "train.prefetch",
                      "model.context_attention")


def describe(cls: type = Config, prefix: str = "") -> list[tuple[str, str, Any, str]]:
    """(key, type, default, help) for every leaf key of the schema."""
    rows = []
    hints = typing.get_type_hints(cls)
    defaults = cls()
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if _is_section(tp):
            rows += describe(tp, f"{prefix}{f.name}.")
        else:
            tname = getattr(tp, "__name__", str(tp)) if typing.get_origin(tp) is None else str(tp)
            rows.append((prefix + f.name, tname, getattr(defaults, f.name), f.metadata["help"]))
    return rows
