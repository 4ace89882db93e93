"""bita_jax.io.tokenizer gives transformers' AutoTokenizer ids and text, and decoding imports no torch."""

import json
import os
import subprocess
import sys

import jinja2
import numpy as np
import pytest
from tokenizers import Tokenizer as Backend
from tokenizers import decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from bita_jax import demo
from bita_jax.errors import ConfigError
from bita_jax.io.tokenizer import (
    NO_CHAT_TEMPLATE,
    FastTokenizer,
    TransformersTokenizer,
    load_tokenizer,
)
from tests.tiny_checkpoint import CORPUS, make_tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEXTS = [
    "def add(a, b):\n    return a + b\n",
    "The quick brown fox",
    "",
    "x",
    "  leading spaces\tand a tab\n\nand blank lines  ",
    "héllo wörld ✓ — 日本",
    "literal specials <s> </s> <unk> <pad> <cls> in text",
    "hello , world . isn't it ? yes !",
]
# Exercises the environment options of transformers' apply_chat_template: trim_blocks and lstrip_blocks
# (indented block tags on their own lines), loop controls, tojson (no HTML escaping, non-ASCII kept),
# raise_exception, strftime_now, the {% generation %} tag and the named special tokens.
CUSTOM_TEMPLATE = """{{ bos_token }}
{% for message in messages %}
    {% if message['role'] not in ['system', 'user', 'assistant'] %}
        {{ raise_exception('unknown role ' + message['role']) }}
    {% endif %}
    {% if 'forbidden' in message['content'] %}
        {{ raise_exception('forbidden word') }}
    {% endif %}
    {% if loop.index0 > 4 %}{% break %}{% endif %}
    {% if message['content'] == '' %}{% continue %}{% endif %}
<|{{ message['role'] }}|> {{ {'text': message['content'], 'n': loop.index} | tojson }}
    {{ message['content'] | trim }}{{ eos_token }}
{% endfor %}
[{{ strftime_now('%Y') }}|{{ pad_token }}|{{ unk_token }}|{{ cls_token }}]
{% if add_generation_prompt %}
    {% generation %}<|assistant|>{% endgeneration %}
{% endif %}"""


def assert_same_as_transformers(model_dir: str, vocab_ids: int, chat: bool = True) -> None:
    """encode, encode_chat and decode equal AutoTokenizer's on TEXTS and on random ids."""
    ours = load_tokenizer(model_dir)
    theirs = AutoTokenizer.from_pretrained(model_dir)
    for text in TEXTS:
        ids = theirs(text)["input_ids"]
        assert ours.encode(text) == ids, text
        assert (
            ours.encode(text, add_special_tokens=False) == theirs(text, add_special_tokens=False)["input_ids"]
        )
        if chat:
            chat_ids = theirs.apply_chat_template(
                [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=True
            )["input_ids"]
            assert ours.encode_chat(text) == chat_ids, text
            ids = chat_ids  # the template's own special tokens, for decode
        for skip in (True, False):
            assert ours.decode(ids, skip_special_tokens=skip) == theirs.decode(ids, skip_special_tokens=skip)
    rng = np.random.default_rng(0)
    for _ in range(20):
        ids = rng.integers(0, vocab_ids, size=int(rng.integers(1, 30))).tolist()
        for skip in (True, False):
            assert ours.decode(ids, skip_special_tokens=skip) == theirs.decode(ids, skip_special_tokens=skip)


def test_tiny_checkpoints_match_transformers(tiny_checkpoints):
    for path in tiny_checkpoints.values():
        tokenizer = load_tokenizer(path)
        assert isinstance(tokenizer, FastTokenizer)
        assert tokenizer.chat_template
        assert_same_as_transformers(path, vocab_ids=320)


def test_demo_tokenizer_matches_transformers_and_has_no_chat_template():
    tokenizer = load_tokenizer(demo.MODEL_DIR)
    assert tokenizer.chat_template is None
    vocab_ids = tokenizer.backend.get_vocab_size(with_added_tokens=True)
    assert_same_as_transformers(demo.MODEL_DIR, vocab_ids, chat=False)
    with pytest.raises(ConfigError) as info:
        tokenizer.encode_chat("def f(x):")
    assert str(info.value) == NO_CHAT_TEMPLATE


def edit_config(model_dir: str, **changes) -> None:
    path = os.path.join(model_dir, "tokenizer_config.json")
    with open(path) as f:
        config = json.load(f)
    config.update(changes)
    with open(path, "w") as f:
        json.dump(config, f)


@pytest.fixture(scope="module")
def custom_template_dir(tmp_path_factory):
    """Tiny tokenizer: CUSTOM_TEMPLATE, padding and truncation in tokenizer.json, add_bos/add_eos_token
    in its config, named special tokens not in its vocab."""
    path = str(tmp_path_factory.mktemp("custom_template"))
    tokenizer = make_tokenizer(320)
    tokenizer.chat_template = CUSTOM_TEMPLATE
    # Saved in tokenizer.json; transformers encodes without them.
    tokenizer.backend_tokenizer.enable_truncation(max_length=4)
    tokenizer.backend_tokenizer.enable_padding(length=64, pad_id=2, pad_token="</s>")
    tokenizer.save_pretrained(path)
    cls_token = {"__type": "AddedToken", "content": "<cls>", "lstrip": True, "normalized": False}
    cls_token.update(rstrip=False, single_word=False, special=True)
    edit_config(path, add_bos_token=True, add_eos_token=True, pad_token="<pad>", cls_token=cls_token)
    return path


def test_custom_chat_template_file_matches_transformers(custom_template_dir):
    assert os.path.isfile(os.path.join(custom_template_dir, "chat_template.jinja"))
    ours = load_tokenizer(custom_template_dir)
    # As in transformers 5, tokenizer.json's post-processor wins over the config's add_bos/add_eos_token.
    assert ours.encode("x")[0] == 1 and ours.encode("x")[-1] != 2
    # <pad> and <cls> were added after the 320 vocab ids.
    assert_same_as_transformers(custom_template_dir, vocab_ids=322)


def test_named_chat_templates_in_config_use_default(custom_template_dir, tmp_path):
    path = str(tmp_path / "named")
    AutoTokenizer.from_pretrained(custom_template_dir).save_pretrained(path)
    os.remove(os.path.join(path, "chat_template.jinja"))
    other = "{{ raise_exception('not the default template') }}"
    templates = [{"name": "tool_use", "template": other}, {"name": "default", "template": CUSTOM_TEMPLATE}]
    edit_config(path, chat_template=templates)
    assert load_tokenizer(path).chat_template == CUSTOM_TEMPLATE
    assert_same_as_transformers(path, vocab_ids=322)


def test_raise_exception_in_template_is_a_config_error(custom_template_dir):
    message = [{"role": "user", "content": "a forbidden prompt"}]
    with pytest.raises(jinja2.exceptions.TemplateError, match="forbidden word"):
        AutoTokenizer.from_pretrained(custom_template_dir).apply_chat_template(
            message, add_generation_prompt=True
        )
    with pytest.raises(ConfigError, match="^the tokenizer's chat template failed: forbidden word$"):
        load_tokenizer(custom_template_dir).encode_chat("a forbidden prompt")


def test_clean_up_tokenization_spaces_of_a_wordpiece_tokenizer(tmp_path):
    """transformers cleans decoded spaces before punctuation for non-BPE models when the config says so."""
    backend = Backend(models.WordPiece(unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.decoder = decoders.WordPiece(cleanup=False)
    trainer = trainers.WordPieceTrainer(vocab_size=200, special_tokens=["[UNK]"], show_progress=False)
    backend.train_from_iterator([*CORPUS, "hello, world. isn't it? yes!"], trainer)
    PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="[UNK]", clean_up_tokenization_spaces=True
    ).save_pretrained(str(tmp_path))
    with open(tmp_path / "tokenizer_config.json") as f:
        assert json.load(f)["clean_up_tokenization_spaces"] is True
    ours = load_tokenizer(str(tmp_path))
    ids = ours.encode("hello, world. isn't it? yes!")
    assert " ," in ours.backend.decode(ids)  # the raw decode has the spaces the clean-up removes
    assert ours.decode(ids) == "hello, world. isn't it? yes!"
    assert_same_as_transformers(str(tmp_path), vocab_ids=ours.backend.get_vocab_size(), chat=False)


def test_directory_without_tokenizer_json_falls_back_to_transformers(tmp_path):
    tokenizer = make_tokenizer(320)
    tokenizer.save_pretrained(str(tmp_path))
    tokenizer.backend_tokenizer.model.save(str(tmp_path))  # vocab.json + merges.txt
    os.remove(tmp_path / "tokenizer.json")
    edit_config(str(tmp_path), tokenizer_class="GPT2Tokenizer")
    assert isinstance(load_tokenizer(str(tmp_path)), TransformersTokenizer)
    assert_same_as_transformers(str(tmp_path), vocab_ids=320)


def test_bad_directories_are_one_line_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="^model directory not found: "):
        load_tokenizer(str(tmp_path / "missing"))
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(ConfigError, match="^cannot load a tokenizer from ") as info:
        load_tokenizer(str(tmp_path))
    assert "\n" not in str(info.value)


def test_decoding_imports_no_heavy_library(tiny_checkpoint):
    """load + AR generate in a new interpreter imports no torch, transformers, datasets, orbax, matplotlib."""
    code = (
        "import sys, bita_jax\n"
        f"model = bita_jax.load({tiny_checkpoint!r})\n"
        "records = model.generate(['def add(a, b):'], max_new_tokens=3, mode='ar')\n"
        "assert records[0]['new_tokens'] > 0\n"
        "heavy = ('torch', 'transformers', 'datasets', 'orbax', 'matplotlib')\n"
        "print(sorted({k.split('.')[0] for k in sys.modules if k.split('.')[0] in heavy}))\n"
    )
    env = {**os.environ, "PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "[]"
