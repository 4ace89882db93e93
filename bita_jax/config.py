"""Configuration: frozen dataclasses, YAML instances and dotted CLI overrides.

Architecture comes from a checkpoint's `config.json` (`ModelConfig.from_hf_config`) and is never
restated in YAML; YAML files in `configs/` only hold run-time knobs.
"""

from __future__ import annotations

import dataclasses
import json
import os
import types
import typing
from typing import Any

import yaml

from bita_jax.errors import ConfigError

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM",)
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")
DTYPES = ("float32", "bfloat16")
# The attention's cache part (models/cache_attention.py).
ATTENTION_KERNELS = ("auto", "einsum", "pallas")
# Decoding precision policies (see `decoding_dtypes`): "exact" keeps activations, attention, logits
# and the KV cache in float32 whatever the weights' dtype; "fast" computes in the weights' dtype.
PRECISIONS = ("exact", "fast")


def decoding_dtypes(dtype: str, precision: str) -> dict[str, str]:
    """ModelConfig dtype fields for decoding with weights in `dtype` under a precision policy.

    "exact" computes in float32 with bfloat16 weights: in an all-bfloat16 forward the rounding of
    a row depends on how many rows share the step (XLA fuses the elementwise ops around the dots
    differently), so BiTA's multi-row tree step and AR's one-row step flip argmax near-ties and
    their outputs part (docs/bf16.md). The weights, whose reads dominate decoding, stay bfloat16.
    """
    if dtype not in DTYPES:
        raise ConfigError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    if precision not in PRECISIONS:
        raise ConfigError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    return {"dtype": dtype, "activation_dtype": "float32" if precision == "exact" else dtype}


def precision_of(config: "ModelConfig") -> str:
    """The precision policy a decoding config computes under (the inverse of `decoding_dtypes`):
    "exact" when it computes in float32, which float32 weights do under either policy (the same
    computation), else "fast"."""
    return "exact" if config.compute_dtype == "float32" else "fast"


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """LLaMA-family architecture, read from a Hugging Face `config.json`.

    `rope_scaling` is a sorted tuple of (key, value) pairs so the config stays hashable and can be
    closed over or passed as a static jit argument.
    """

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: tuple[tuple[str, Any], ...] | None
    max_position_embeddings: int
    tie_word_embeddings: bool
    bos_token_id: int | None
    eos_token_ids: tuple[int, ...]
    pad_token_id: int | None
    dtype: str = "float32"  # the weights'
    # Activations (residual stream, norms, attention, logits) and the KV cache; None: `dtype`.
    activation_dtype: str | None = None
    remat: bool = False
    # Layers as one `nn.scan` over stacked [L, ...] params (fast compiles; training) or unrolled
    # with each layer's params its own arrays (decoding: no per-layer weight copy, see llama.py).
    scan_layers: bool = True
    # The attention's cache part: "auto" (a fused Pallas kernel where compiled for TPU, einsums
    # elsewhere), "einsum", or "pallas" (everywhere; off TPU interpreted, for tests).
    attention_kernel: str = "auto"

    def __post_init__(self):
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(
                f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})"
            )
        if self.dtype not in DTYPES:
            raise ConfigError(f"dtype must be one of {DTYPES}, got {self.dtype!r}")
        if self.attention_kernel not in ATTENTION_KERNELS:
            raise ConfigError(
                f"attention_kernel must be one of {ATTENTION_KERNELS}, got {self.attention_kernel!r}"
            )
        if self.activation_dtype not in (None, *DTYPES):
            raise ConfigError(f"activation_dtype must be one of {DTYPES}, got {self.activation_dtype!r}")
        if self.rope_type not in SUPPORTED_ROPE_TYPES:
            raise ConfigError(
                f"unsupported rope scaling type {self.rope_type!r} (supported: {SUPPORTED_ROPE_TYPES})"
            )

    @property
    def compute_dtype(self) -> str:
        """The dtype of activations and the KV cache (weights are read into it)."""
        return self.activation_dtype or self.dtype

    @property
    def rope_type(self) -> str:
        return dict(self.rope_scaling or ()).get("rope_type", "default")

    @property
    def pad_id(self) -> int:
        """Token used to fill finished rows and padding: pad if the checkpoint has one, else EOS."""
        return self.pad_token_id if self.pad_token_id is not None else self.eos_token_ids[0]

    @classmethod
    def from_hf_config(cls, hf: dict[str, Any], where: str = "config.json", **overrides) -> "ModelConfig":
        """Builds the config from a parsed HF `config.json`, refusing unsupported models and keys
        that are missing or of the wrong type (`where` names the file in errors)."""
        archs = hf.get("architectures") or [
            "LlamaForCausalLM" if hf.get("model_type") == "llama" else hf.get("model_type")
        ]
        if not isinstance(archs, list) or not set(map(str, archs)) & set(SUPPORTED_ARCHITECTURES):
            raise ConfigError(
                f"unsupported architecture {archs}: bita_jax supports {list(SUPPORTED_ARCHITECTURES)}"
            )
        for flag in ("attention_bias", "mlp_bias"):
            if hf.get(flag):
                raise ConfigError(f"unsupported LLaMA variant: {flag}=true")
        if hf.get("hidden_act", "silu") != "silu":
            raise ConfigError(f"unsupported hidden_act {hf['hidden_act']!r} (LLaMA uses silu)")
        # transformers >= 5 writes `rope_parameters` (theta inside); older files use
        # `rope_theta` plus `rope_scaling` whose type key was once called "type".
        rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
        if not isinstance(rope, dict):
            raise ConfigError(f"{where}: rope_parameters/rope_scaling must be an object, got {rope!r}")
        rope = dict(rope)
        rope_theta = rope.pop("rope_theta", hf.get("rope_theta", 10000.0))
        rope_type = rope.pop("rope_type", rope.pop("type", "default"))
        rope_scaling = tuple(sorted({**rope, "rope_type": rope_type}.items()))
        eos = hf.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else ((eos,) if eos is not None else ())
        if not eos_ids:
            raise ConfigError(f"{where} has no eos_token_id")
        if not all(_is_int(t, 0) for t in eos_ids):
            raise ConfigError(f"{where}: eos_token_id must be a token id or a list of them, got {eos!r}")
        count = lambda key, default=None: _hf_int(hf, key, where, default, minimum=1)  # noqa: E731
        token = lambda key: _hf_int(hf, key, where, None, minimum=0, optional=True)  # noqa: E731
        num_heads = count("num_attention_heads")
        values = dict(
            vocab_size=count("vocab_size"),
            hidden_size=count("hidden_size"),
            intermediate_size=count("intermediate_size"),
            num_layers=count("num_hidden_layers"),
            num_heads=num_heads,
            num_kv_heads=count("num_key_value_heads", num_heads),
            head_dim=count("head_dim", count("hidden_size") // num_heads),
            rms_norm_eps=_positive_float(hf.get("rms_norm_eps", 1e-6), "rms_norm_eps", where),
            rope_theta=_positive_float(rope_theta, "rope_theta", where),
            rope_scaling=rope_scaling,
            max_position_embeddings=count("max_position_embeddings", 2048),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            bos_token_id=token("bos_token_id"),
            eos_token_ids=eos_ids,
            pad_token_id=token("pad_token_id"),
        )
        return cls(**{**values, **overrides})

    @classmethod
    def from_pretrained(cls, model_dir: str, **overrides) -> "ModelConfig":
        path = os.path.join(model_dir, "config.json")
        if not os.path.isdir(model_dir):
            raise ConfigError(f"model directory not found: {model_dir}")
        if not os.path.isfile(path):
            raise ConfigError(f"no config.json in model directory {model_dir}")
        hf = read_json(path)
        if not isinstance(hf, dict):
            raise ConfigError(f"{path}: expected a JSON object, got {type(hf).__name__}")
        return cls.from_hf_config(hf, where=path, **overrides)


def read_json(path: str) -> Any:
    """A json file's contents; a file that is not UTF-8 JSON raises ConfigError naming it."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path} is not valid JSON ({e.msg}, line {e.lineno})") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path} is not UTF-8 text") from None


def _is_int(value: Any, minimum: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= minimum


def _hf_int(
    hf: dict[str, Any], key: str, where: str, default: int | None, minimum: int, optional: bool = False
) -> int | None:
    """An integer `config.json` entry >= minimum; missing (or null) takes the default."""
    value = hf.get(key)
    if value is None:
        if default is None and not optional:
            raise ConfigError(f"{where} has no {key!r}")
        return default
    if not _is_int(value, minimum):
        raise ConfigError(f"{where}: {key} must be an integer >= {minimum}, got {value!r}")
    return value


def _positive_float(value: Any, key: str, where: str) -> float:
    """A `config.json` entry that must be a positive number."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ConfigError(f"{where}: {key} must be a positive number, got {value!r}")
    return float(value)


ADAPTER_INITS = ("random", "activations", "mean")


@dataclasses.dataclass(frozen=True)
class BiTAConfig:
    """The BiTA plug-in: P prompt tokens (per-layer prefix K/V) and M mask tokens."""

    num_prompt_tokens: int = 16
    num_mask_tokens: int = 3
    prefix_dropout: float = 0.1
    init_std: float = 0.02
    # "random": N(0, init_std). "activations": the prefix from the frozen model's own keys/values on
    # real text and the masks from real token embeddings (bita.adapter.init_from_text). "mean": as
    # random, plus the mean input embedding on each mask (bita.adapter.init_at_mean_embedding).
    init: str = "random"
    # r > 0: rank-r updates of every linear map (q, k, v, o, gate, up, down), applied on mask rows
    # only (bita.adapter.mask_lora). Capacity beyond the paper that leaves the output unchanged:
    # normal rows never see them, and no normal row attends to a mask row.
    lora_rank: int = 0

    def __post_init__(self):
        if self.num_prompt_tokens < 1 or self.num_mask_tokens < 1:
            raise ConfigError("num_prompt_tokens and num_mask_tokens must be >= 1")
        if self.lora_rank < 0:
            raise ConfigError(f"bita.lora_rank must be >= 0, got {self.lora_rank}")
        if self.init not in ADAPTER_INITS:
            raise ConfigError(f"bita.init must be one of {ADAPTER_INITS}, got {self.init!r}")
        if not 0.0 <= self.prefix_dropout < 1.0:
            raise ConfigError(f"prefix_dropout must be in [0, 1), got {self.prefix_dropout}")


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Device mesh shape over axes (data, fsdp, tensor); -1 in one axis takes the remaining devices."""

    data: int = -1
    fsdp: int = 1
    tensor: int = 1

    @classmethod
    def parse(cls, text: str) -> "MeshConfig":
        """Parses `data=A,fsdp=B,tensor=C` (any subset)."""
        fields = {}
        for item in filter(None, text.split(",")):
            key, sep, value = item.partition("=")
            if not sep or key.strip() not in ("data", "fsdp", "tensor"):
                raise ConfigError(f"bad --mesh entry {item!r}: expected data=A,fsdp=B,tensor=C")
            try:
                fields[key.strip()] = int(value)
            except ValueError:
                raise ConfigError(f"bad --mesh entry {item!r}: size must be an integer") from None
        return cls(**fields)


# ---------------------------------------------------------------------------------------------
# Generic dataclass <-> dict/YAML plumbing with dotted overrides.


def _convert(value: Any, annotation: Any, where: str) -> Any:
    """Converts a YAML/CLI value to the field's annotated type (nested dataclasses included)."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        (annotation,) = [a for a in args if a is not type(None)][:1] or (Any,)
        return _convert(value, annotation, where)
    if dataclasses.is_dataclass(annotation):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping")
        return from_dict(annotation, value, where)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list")
        inner = args[0] if args else Any
        return tuple(_convert(v, inner, where) for v in value)
    if annotation is bool and isinstance(value, str):
        if value.lower() not in ("true", "false", "1", "0"):
            raise ConfigError(f"{where}: expected true/false, got {value!r}")
        return value.lower() in ("true", "1")
    if annotation in (int, float, str) and value is not None:
        try:
            return annotation(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: expected {annotation.__name__}, got {value!r}") from None
    return value


def from_dict(cls, data: dict[str, Any], where: str = "config"):
    """Builds dataclass `cls` from a nested dict, rejecting unknown keys with their dotted name."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"unknown config key {where}.{unknown[0]} (valid: {', '.join(sorted(names))})")
    return cls(**{k: _convert(v, hints[k], f"{where}.{k}") for k, v in data.items()})


def to_dict(obj) -> dict[str, Any]:
    """Dataclass -> plain nested dict (tuples become lists) for YAML/JSON."""

    def plain(v):
        if isinstance(v, (tuple, list)):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v

    return plain(dataclasses.asdict(obj))


def set_dotted(data: dict[str, Any], key: str, value: Any) -> None:
    """Sets `a.b.c` = value in a nested dict, creating sections on the way."""
    *parents, leaf = key.split(".")
    node = data
    for p in parents:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ConfigError(f"bad override {key}: {p} is not a section")
    node[leaf] = value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Applies `a.b=c` text overrides (values parsed as YAML scalars) to a nested dict copy."""
    data = json.loads(json.dumps(data))
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"bad override {item!r}: expected key=value")
        set_dotted(data, key, yaml.safe_load(raw))
    return data


def load_yaml(path: str) -> dict[str, Any]:
    if not os.path.isfile(path):
        raise ConfigError(f"config file not found: {path}")
    with open(path) as f:
        try:
            data = yaml.safe_load(f) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"cannot parse {path}: {str(e).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping")
    return data


# ---------------------------------------------------------------------------------------------
# Training (BiTA adapter): `train.py` builds a TrainConfig from YAML + flags + `--set` overrides.


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Where training examples come from and how they become multi-group sequences.

    `path` is a jsonl file as written by decode.py, a local `datasets` file or directory, or a hub
    dataset name. `max_length` caps source + target (the reference's cutoff_len); the mask groups
    add up to `max_groups * M` tokens on top. `seq_buckets` are the padded lengths (one compile
    each); empty picks powers of two up to the longest possible sequence.
    """

    path: str = ""
    split: str = "train"
    prompt_field: str = "prompt"
    completion_field: str = "completion"
    chat: bool = False
    max_length: int = 2048
    max_groups: int = 64
    seq_buckets: tuple[int, ...] = ()

    def __post_init__(self):
        if self.max_groups < 1 or self.max_length < 2:
            raise ConfigError("data.max_groups must be >= 1 and data.max_length >= 2")
        if list(self.seq_buckets) != sorted(set(self.seq_buckets)) or any(b < 1 for b in self.seq_buckets):
            raise ConfigError(f"data.seq_buckets must be increasing positive lengths, got {self.seq_buckets}")


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    """AdamW on the adapter with a cosine schedule (optional linear warmup) and norm clipping."""

    learning_rate: float = 3e-2
    warmup_steps: int = 0
    weight_decay: float = 0.0
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    clip_norm: float = 1.0
    grad_accum: int = 1

    def __post_init__(self):
        if self.grad_accum < 1 or self.warmup_steps < 0 or self.learning_rate <= 0:
            raise ConfigError("optimizer: grad_accum >= 1, warmup_steps >= 0 and learning_rate > 0 required")


@dataclasses.dataclass(frozen=True)
class LossConfig:
    """The mask rows' objective: per row, decay**k * (ce_weight * CE + kl_weight * KL) for mask k.

    CE is the hard label's cross-entropy (the base model's greedy token); KL is KL(teacher || mask)
    to the frozen model's next-token distribution at the label's position, over the whole vocabulary
    (kl_top_k = 0) or over the teacher's top-k tokens, both renormalised there. decay < 1 weights
    the early masks, which a tree accepts far more often.
    """

    ce_weight: float = 1.0
    kl_weight: float = 0.0
    kl_top_k: int = 0
    offset_decay: float = 1.0

    def __post_init__(self):
        if self.ce_weight < 0 or self.kl_weight < 0 or self.ce_weight + self.kl_weight == 0:
            raise ConfigError("loss: ce_weight and kl_weight must be >= 0 and not both 0")
        if self.kl_top_k < 0 or not 0 < self.offset_decay <= 1:
            raise ConfigError("loss: kl_top_k >= 0 and 0 < offset_decay <= 1 required")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """One BiTA training run. Architecture comes from `model`'s config.json, never from here.

    `batch_size` is the global number of sequences per optimizer step, split into
    `optimizer.grad_accum` micro-batches. `steps` = 0 trains for `epochs` passes over the data.
    `dtype` "auto" is bfloat16 on TPU/GPU and float32 on CPU (base params and compute; the
    adapter and optimizer state are always float32).
    """

    model: str = ""
    output: str = ""
    steps: int = 0
    epochs: float = 1.0
    batch_size: int = 8
    dtype: str = "auto"
    remat: bool = False
    seed: int = 0
    log_every: int = 10
    save_every: int = 500
    eval_every: int = 0  # held-out evaluation every N steps when the caller gives one (0: at the end only)
    keep_checkpoints: int = 2
    init_adapter: str = ""  # a trained adapter directory to start from instead of `bita.init`
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    bita: BiTAConfig = dataclasses.field(default_factory=BiTAConfig)
    loss: LossConfig = dataclasses.field(default_factory=LossConfig)
    optimizer: OptimizerConfig = dataclasses.field(default_factory=OptimizerConfig)
    mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)
    sharding_rules: dict[str, Any] | None = None

    def __post_init__(self):
        if self.dtype not in ("auto", *DTYPES):
            raise ConfigError(f"train.dtype must be auto or one of {DTYPES}, got {self.dtype!r}")
        if self.steps < 0 or self.epochs <= 0 or self.log_every < 1 or self.save_every < 1 or self.eval_every < 0:
            raise ConfigError(
                "train: steps >= 0, epochs > 0, log_every >= 1, save_every >= 1 and eval_every >= 0 required"
            )
        if self.batch_size < 1 or self.batch_size % self.optimizer.grad_accum:
            raise ConfigError(
                f"batch_size ({self.batch_size}) must be a positive multiple of "
                f"optimizer.grad_accum ({self.optimizer.grad_accum})"
            )
