"""Hugging Face checkpoint I/O: config.json, safetensors weights (single or sharded), tokenizer.

One name-mapping table (`PARAM_MAP`) converts between HF torch names/layouts and the bita_jax param
tree. Weights are read block by block from memory-mapped files (each device's block of each
tensor, so a process reads only what its devices hold) and cast straight to the target dtype, so
the host never holds a float32 copy of the whole model.
"""

from __future__ import annotations

import json
import math
import os
import struct
from typing import Any, Callable, Iterator

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from safetensors.numpy import save_file

from bita_jax.config import ModelConfig, read_json
from bita_jax.errors import ConfigError
from bita_jax.io import tokenizer as tokenizer_files
from bita_jax.io.tokenizer import Tokenizer
from bita_jax.models.llama import abstract_params

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"

# safetensors dtype tags <-> numpy dtypes (bfloat16 through ml_dtypes).
SAFETENSORS_DTYPES = {
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
}

# (our param path, HF tensor name, number of leading "input" dims of our array or None).
# HF linear weights are torch [out, in]; ours are [in..., out...] (e.g. q_proj [D, N, H],
# o_proj [N, H, D]), so an entry with n input dims is transposed and reshaped. None: copied as is.
# "{i}" entries are per layer and stacked on a leading L axis.
PARAM_MAP: tuple[tuple[tuple[str, ...], str, int | None], ...] = (
    (("embed_tokens",), "model.embed_tokens.weight", None),
    (("layers", "input_layernorm", "scale"), "model.layers.{i}.input_layernorm.weight", None),
    (
        ("layers", "post_attention_layernorm", "scale"),
        "model.layers.{i}.post_attention_layernorm.weight",
        None,
    ),
    (("layers", "self_attn", "q_proj"), "model.layers.{i}.self_attn.q_proj.weight", 1),
    (("layers", "self_attn", "k_proj"), "model.layers.{i}.self_attn.k_proj.weight", 1),
    (("layers", "self_attn", "v_proj"), "model.layers.{i}.self_attn.v_proj.weight", 1),
    (("layers", "self_attn", "o_proj"), "model.layers.{i}.self_attn.o_proj.weight", 2),
    (("layers", "mlp", "gate_proj"), "model.layers.{i}.mlp.gate_proj.weight", 1),
    (("layers", "mlp", "up_proj"), "model.layers.{i}.mlp.up_proj.weight", 1),
    (("layers", "mlp", "down_proj"), "model.layers.{i}.mlp.down_proj.weight", 1),
    (("norm", "scale"), "model.norm.weight", None),
    (("lm_head",), "lm_head.weight", 1),
)


def load_config(model_dir: str, **overrides) -> ModelConfig:
    """Reads `config.json` of a LlamaForCausalLM checkpoint; unsupported models raise ConfigError."""
    return ModelConfig.from_pretrained(model_dir, **overrides)


# ---------------------------------------------------------------------------------------------
# safetensors reading (memory-mapped; numpy's safetensors loader cannot produce bfloat16).


class _SafetensorsFile:
    """Lazy, memory-mapped view of one .safetensors file, its header checked against its size."""

    def __init__(self, path: str):
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            prefix = f.read(8)
            if len(prefix) < 8:
                raise ConfigError(f"{path} is not a safetensors file ({size} bytes, empty or truncated)")
            (header_len,) = struct.unpack("<Q", prefix)
            if header_len > size - 8:
                raise ConfigError(f"{path} is not a safetensors file (header longer than the file)")
            try:
                self.header = json.loads(f.read(header_len))
            except (json.JSONDecodeError, UnicodeDecodeError):
                raise ConfigError(f"{path} is not a safetensors file (garbled header)") from None
        if not isinstance(self.header, dict):
            raise ConfigError(f"{path} is not a safetensors file (garbled header)")
        self.header.pop("__metadata__", None)
        self.path = path
        _check_extents(path, self.header, size - 8 - header_len)
        self.data = np.memmap(path, dtype=np.uint8, mode="r", offset=8 + header_len)

    def get(self, name: str) -> np.ndarray:
        info = self.header[name]
        dtype = SAFETENSORS_DTYPES.get(info["dtype"])
        if dtype is None:
            raise ConfigError(f"{self.path}: tensor {name} has unsupported dtype {info['dtype']}")
        start, end = info["data_offsets"]
        if end - start != math.prod(info["shape"]) * dtype.itemsize:
            raise ConfigError(f"{self.path}: tensor {name} has {end - start} bytes, not its shape's")
        return self.data[start:end].view(dtype).reshape(info["shape"])


def _check_extents(path: str, header: dict, data_bytes: int) -> None:
    """Refuses a header whose entries are malformed or point past the end of the file (truncated)."""
    for name, info in header.items():
        try:
            start, end = info["data_offsets"]
            valid = all(isinstance(d, int) and d >= 0 for d in info["shape"]) and 0 <= start <= end
        except (TypeError, KeyError, ValueError):
            valid = False
        if not valid:
            raise ConfigError(f"{path} is not a safetensors file (bad header entry for {name})")
        if end > data_bytes:
            raise ConfigError(
                f"{path} is truncated: tensor {name} ends at byte {end}, the file has {data_bytes} data bytes"
            )


def checkpoint_files(model_dir: str) -> dict[str, str]:
    """{tensor name: file path} from the index of a sharded checkpoint or the single file."""
    index = os.path.join(model_dir, INDEX_FILE)
    if os.path.isfile(index):
        weight_map = read_json(index)
        weight_map = weight_map.get("weight_map") if isinstance(weight_map, dict) else None
        if not isinstance(weight_map, dict) or not all(isinstance(f, str) for f in weight_map.values()):
            raise ConfigError(f"{index} has no 'weight_map' object of tensor name -> file")
        return {name: os.path.join(model_dir, file) for name, file in weight_map.items()}
    single = os.path.join(model_dir, SINGLE_FILE)
    if not os.path.isfile(single):
        raise ConfigError(f"no {SINGLE_FILE} or {INDEX_FILE} in {model_dir}")
    return {name: single for name in _SafetensorsFile(single).header}


class _TensorReader:
    """Reads HF tensors by name across the checkpoint's files, opening each file once."""

    def __init__(self, model_dir: str):
        self.model_dir = model_dir
        self.locations = checkpoint_files(model_dir)
        self.files: dict[str, _SafetensorsFile] = {}

    def get(self, name: str) -> np.ndarray:
        path = self.locations.get(name)
        if path is None:
            raise ConfigError(f"checkpoint {self.model_dir} has no tensor {name}")
        if path not in self.files:
            if not os.path.isfile(path):
                raise ConfigError(f"checkpoint shard not found: {path}")
            self.files[path] = _SafetensorsFile(path)
        return self.files[path].get(name)


def _read_block(
    hf: np.ndarray, in_dims: int | None, shape: tuple[int, ...], index: tuple[slice, ...], dtype: np.dtype
) -> np.ndarray:
    """The block [index] of our array of `shape`, from one memory-mapped HF tensor, in `dtype`.

    The HF tensor is viewed in our axis order without reading it (a reshape and a transpose of the
    mapping), so only the block's bytes are read from the file.
    """
    expected = shape if in_dims is None else (math.prod(shape[in_dims:]), math.prod(shape[:in_dims]))
    if tuple(hf.shape) != expected:
        raise ConfigError(
            f"checkpoint tensor of shape {tuple(hf.shape)} does not match config (expected {expected})"
        )
    if in_dims is not None:  # torch [out, in] -> [out..., in...] -> ours [in..., out...]
        outs = len(shape) - in_dims
        hf = hf.reshape(*shape[in_dims:], *shape[:in_dims])
        hf = hf.transpose(*range(outs, len(shape)), *range(outs))
    return np.ascontiguousarray(hf[index].astype(dtype))


def _to_hf(ours: np.ndarray, in_dims: int | None) -> np.ndarray:
    """One of our arrays -> HF torch layout ([out, in] for linear weights)."""
    if in_dims is None:
        return ours
    fan_in = math.prod(ours.shape[:in_dims])
    return np.ascontiguousarray(ours.reshape(fan_in, -1).T)


def _get_path(tree: dict, path: tuple[str, ...]) -> Any:
    for key in path:
        tree = tree[key]
    return tree


def _set_path(tree: dict, path: tuple[str, ...], value: Any) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


def _entries(config: ModelConfig) -> Iterator[tuple[tuple[str, ...], str, int | None]]:
    """The mapping table entries that exist for this config (no lm_head when tied).

    With unrolled layers (`scan_layers=False`) each per-layer entry becomes L entries, one per
    `layers_{i}` subtree; with scanned layers it stays one entry for the stacked [L, ...] array.
    """
    for path, hf_name, in_dims in PARAM_MAP:
        if path == ("lm_head",) and config.tie_word_embeddings:
            continue
        if "{i}" in hf_name and not config.scan_layers:
            for i in range(config.num_layers):
                yield (f"layers_{i}", *path[1:]), hf_name.format(i=i), in_dims
        else:
            yield path, hf_name, in_dims


def _block_reader(
    reader: _TensorReader, hf_name: str, in_dims: int | None, shape: tuple[int, ...], dtype: np.dtype
) -> Callable[[tuple[slice, ...]], np.ndarray]:
    """`index -> block` of one param for `jax.make_array_from_callback`; per-layer names ("{i}")
    fill a stacked [L, ...] array. Devices holding the same block share one read."""
    blocks: dict[tuple, np.ndarray] = {}

    def block(index: tuple[slice, ...]) -> np.ndarray:
        key = tuple(s.indices(n) for s, n in zip(index, shape, strict=True))
        if key not in blocks:
            if "{i}" in hf_name:
                layers = range(shape[0])[index[0]]
                read = lambda i: _read_block(  # noqa: E731  layer i's block [...]
                    reader.get(hf_name.format(i=i)), in_dims, shape[1:], index[1:], dtype
                )
                blocks[key] = np.stack([read(i) for i in layers])  # [layers in index[0], ...]
            else:
                blocks[key] = _read_block(reader.get(hf_name), in_dims, shape, index, dtype)
        return blocks[key]

    return block


def load_params(model_dir: str, config: ModelConfig, shardings: Any = None) -> dict:
    """Loads HF safetensors weights (single or sharded, bf16/f16/f32) into the bita_jax param tree.

    Args:
      model_dir: checkpoint directory with `model.safetensors` or `model.safetensors.index.json`.
      config: the model config (its `dtype` is the dtype of the returned arrays).
      shardings: optional tree of `NamedSharding`s shaped like the params; each array is built
        from the blocks its devices hold, so on a pod each process reads only its devices' slices
        of the files. Default: the default device, uncommitted.

    Returns:
      The param tree (see `bita_jax.llama`): per-layer tensors stacked on a leading L axis, or
      under `layers_{i}` when `config.scan_layers` is False.
    """
    shapes = nn.unbox(abstract_params(config))
    dtype = np.dtype(ml_dtypes.bfloat16) if config.dtype == "bfloat16" else np.dtype(config.dtype)
    reader = _TensorReader(model_dir)
    params: dict = {}
    for path, hf_name, in_dims in _entries(config):
        shape = tuple(_get_path(shapes, path).shape)
        block = _block_reader(reader, hf_name, in_dims, shape, dtype)
        if shardings is None:
            # Uncommitted, as host inputs are: committed params would commit every step output,
            # and jit's dispatch cache tells a step's first inputs (uncommitted placeholder drafts
            # and pending tokens) from its later ones (its own outputs), so each step would be
            # cached twice.
            value = jax.device_put(block(tuple(slice(None) for _ in shape)))
        else:  # each process reads only the blocks its own devices hold
            value = jax.make_array_from_callback(shape, _get_path(shardings, path), block)
        _set_path(params, path, value)
    _check_finite(params, model_dir)
    return params


def _check_finite(params: dict, model_dir: str) -> None:
    """Refuses weights holding NaN or inf (they decode garbage and train to a NaN loss).

    Checked on the device, where it is one fused pass at memory bandwidth, not on the host.
    """
    finite = jax.jit(lambda p: jax.tree.map(lambda x: jnp.isfinite(x).all(), p))(params)
    for path, ok in jax.tree_util.tree_flatten_with_path(finite)[0]:
        if not ok:
            name = "/".join(str(getattr(k, "key", k)) for k in path)
            raise ConfigError(f"checkpoint {model_dir} holds NaN or inf weights (in {name})")


def hf_config_dict(config: ModelConfig) -> dict[str, Any]:
    """A transformers `LlamaConfig`-compatible config.json dict for this config."""
    rope = {**dict(config.rope_scaling or ()), "rope_theta": config.rope_theta}
    rope.setdefault("rope_type", "default")
    eos = list(config.eos_token_ids)
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size,
        "num_hidden_layers": config.num_layers,
        "num_attention_heads": config.num_heads,
        "num_key_value_heads": config.num_kv_heads,
        "head_dim": config.head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": config.rms_norm_eps,
        "rope_theta": config.rope_theta,
        "rope_parameters": rope,
        "max_position_embeddings": config.max_position_embeddings,
        "tie_word_embeddings": config.tie_word_embeddings,
        "bos_token_id": config.bos_token_id,
        "eos_token_id": eos[0] if len(eos) == 1 else eos,
        "pad_token_id": config.pad_token_id,
        "attention_bias": False,
        "mlp_bias": False,
        "dtype": config.dtype,
    }


def save_params(params: dict, config: ModelConfig, out_dir: str, hf_config: dict | None = None) -> None:
    """Writes params as an HF checkpoint (`model.safetensors` + `config.json`) in their own dtype.

    Args:
      params: the bita_jax param tree.
      config: its model config.
      out_dir: created if missing.
      hf_config: config.json contents to write (e.g. the source checkpoint's); default built from
        `config`.
    """
    os.makedirs(out_dir, exist_ok=True)
    tensors: dict[str, np.ndarray] = {}
    for path, hf_name, in_dims in _entries(config):
        value = np.asarray(jax.device_get(_get_path(params, path)))
        if "{i}" in hf_name:
            for i in range(config.num_layers):
                tensors[hf_name.format(i=i)] = _to_hf(value[i], in_dims)
        else:
            tensors[hf_name] = _to_hf(value, in_dims)
    save_file(tensors, os.path.join(out_dir, SINGLE_FILE), metadata={"format": "pt"})
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(hf_config if hf_config is not None else hf_config_dict(config), f, indent=2)


# ---------------------------------------------------------------------------------------------
# Tokenizer


def load_tokenizer(model_dir: str) -> Tokenizer:
    """The checkpoint's tokenizer; without transformers (nor torch) when it has `tokenizer.json`."""
    return tokenizer_files.load_tokenizer(model_dir)


def encode_prompts(tokenizer: Tokenizer, texts: list[str], chat: bool) -> list[list[int]]:
    """Token ids per prompt: plain `encode(text)` ids, or the chat template with a generation prompt."""
    return [tokenizer.encode_chat(text) if chat else tokenizer.encode(text) for text in texts]
