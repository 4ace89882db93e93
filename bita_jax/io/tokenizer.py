"""A checkpoint's tokenizer without transformers (so decoding never imports torch).

transformers 5 imports torch whenever it is installed, so `FastTokenizer` rebuilds what
`AutoTokenizer.from_pretrained(dir)` gives for a `tokenizer.json` checkpoint from the `tokenizers`
library and jinja2: the same encode (post-processor BOS/EOS included), chat template rendering and
decode (`clean_up_tokenization_spaces` included). Two kinds of checkpoint go to
`TransformersTokenizer` (transformers imported when loaded), because only transformers gives their
exact ids: directories with only slow (SentencePiece) files, and those whose tokenizer_config.json
names a model-specific class (e.g. `LlamaTokenizer`), which transformers 5 rebuilds from the vocab
with its own pre-tokenizer (and, for Mistral vocabularies over 100k, its regex patch).
"""

from __future__ import annotations

import json
import os
from datetime import datetime
from typing import Any

from bita_jax.errors import ConfigError

TOKENIZER_FILE = "tokenizer.json"
CONFIG_FILE = "tokenizer_config.json"
SPECIAL_TOKENS_MAP_FILE = "special_tokens_map.json"
CHAT_TEMPLATE_FILE = "chat_template.jinja"
# Files a model-specific tokenizer class builds its vocabulary from, when there is no tokenizer.json.
VOCAB_FILES = ("tokenizer.model", "vocab.json", "vocab.txt", "tokenizer.model.v3", "spiece.model")
# The named special tokens transformers passes to chat templates (its SPECIAL_TOKENS_ATTRIBUTES).
SPECIAL_TOKEN_NAMES = (
    "bos_token",
    "eos_token",
    "unk_token",
    "sep_token",
    "pad_token",
    "cls_token",
    "mask_token",
)
NO_CHAT_TEMPLATE = "--chat was given but the tokenizer has no chat template"


class Tokenizer:
    """Token ids of prompts and text of generated ids; `chat_template` is None without a template."""

    chat_template: str | None = None

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Ids of `text`, with the post-processor's special tokens (e.g. BOS) if `add_special_tokens`."""
        raise NotImplementedError

    def encode_chat(self, text: str) -> list[int]:
        """Ids of one user message in the chat template, ending with the assistant's generation prompt."""
        if not self.chat_template:
            raise ConfigError(NO_CHAT_TEMPLATE)
        return self._encode_chat(text)

    def _encode_chat(self, text: str) -> list[int]:
        raise NotImplementedError

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        """The text of `ids`."""
        raise NotImplementedError


# tokenizer_config.json classes that transformers 5 builds from tokenizer.json as written.
GENERIC_CLASSES = (None, "PreTrainedTokenizerFast", "TokenizersBackend")


def load_tokenizer(model_dir: str) -> Tokenizer:
    """The tokenizer of a checkpoint directory: `FastTokenizer` when it has `tokenizer.json`."""
    if not os.path.isdir(model_dir):
        raise ConfigError(f"model directory not found: {model_dir}")
    config = _read_json(os.path.join(model_dir, "tokenizer_config.json"), model_dir)
    # transformers 5 rebuilds model-specific classes (LlamaTokenizer, ...) from their vocab and its
    # own settings instead of using tokenizer.json as written: only it gives their exact ids.
    generic = config.get("tokenizer_class") in GENERIC_CLASSES
    if generic and os.path.isfile(os.path.join(model_dir, TOKENIZER_FILE)):
        return FastTokenizer.from_dir(model_dir)
    if generic and not any(os.path.isfile(os.path.join(model_dir, f)) for f in VOCAB_FILES):
        # Without a file to build it from, transformers' own message lists its attempts over many lines.
        name = config.get("tokenizer_class")
        why = f"the class {name} is built from it" if name else "nor is any other tokenizer file there"
        raise ConfigError(f"cannot load a tokenizer from {model_dir}: {TOKENIZER_FILE} is missing ({why})")
    return TransformersTokenizer.from_dir(model_dir)


def _cannot_load(model_dir: str, error: Exception) -> ConfigError:
    return ConfigError(f"cannot load a tokenizer from {model_dir}: {(str(error).splitlines() or [''])[0]}")


def _read_json(path: str, model_dir: str) -> dict[str, Any]:
    """A JSON object file's contents; {} when the file is missing."""
    if not os.path.isfile(path):
        return {}
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError) as e:
        raise _cannot_load(model_dir, e) from None
    if not isinstance(data, dict):
        name = os.path.basename(path)
        raise ConfigError(f"cannot load a tokenizer from {model_dir}: {name} is not a JSON object")
    return data


def _read_chat_template(model_dir: str, config: dict[str, Any]) -> str | None:
    """`chat_template.jinja`, else tokenizer_config's "chat_template" (of a list: the one named "default")."""
    path = os.path.join(model_dir, CHAT_TEMPLATE_FILE)
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            return f.read()
    template = config.get("chat_template")
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    return template if isinstance(template, str) else None


def _added_token(value: Any):
    """A `tokenizers.AddedToken` from a tokenizer_config value (a string or a serialized AddedToken)."""
    from tokenizers import AddedToken

    if isinstance(value, dict):
        fields = {k: v for k, v in value.items() if k != "__type"}
        return AddedToken(**fields)
    # transformers adds a named special token given as a plain string this way.
    return AddedToken(value, special=True, normalized=False)


def _token_text(value: Any) -> str | None:
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


def _compile_chat_template(template: str):
    """The template in the sandboxed jinja2 environment of transformers' `apply_chat_template`."""
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class GenerationTag(jinja2.ext.Extension):
        """`{% generation %}...{% endgeneration %}` (marks assistant text for masks): renders its body."""

        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller):
            return caller()

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        # jinja's own tojson escapes HTML characters; transformers' does not.
        return json.dumps(
            x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
        )

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[GenerationTag, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(template)
    except jinja2.exceptions.TemplateError as e:
        raise ConfigError(f"the tokenizer's chat template does not parse: {e}") from None


class FastTokenizer(Tokenizer):
    """`tokenizer.json` through the `tokenizers` library, set up as transformers 5 sets it up.

    Args:
      backend: the `tokenizers.Tokenizer`, with the config's added tokens and post-processor applied.
      special_tokens: {name: text} of the named special tokens (bos_token, ...) passed to the template.
      chat_template: the jinja2 chat template, or None.
      clean_up_spaces: remove spaces before punctuation after decoding.
    """

    def __init__(
        self, backend, special_tokens: dict[str, str], chat_template: str | None, clean_up_spaces: bool
    ):
        self.backend = backend
        self.special_tokens = special_tokens
        self.chat_template = chat_template
        self.clean_up_spaces = clean_up_spaces
        self._compiled_template = None

    @classmethod
    def from_dir(cls, model_dir: str) -> FastTokenizer:
        from tokenizers import Tokenizer as Backend

        try:
            backend = Backend.from_file(os.path.join(model_dir, TOKENIZER_FILE))
        except Exception as e:  # tokenizers raises a bare Exception for unreadable files
            raise _cannot_load(model_dir, e) from None
        config = _read_json(os.path.join(model_dir, CONFIG_FILE), model_dir)
        if "added_tokens_decoder" not in config:
            # Legacy checkpoints keep the named special tokens in a separate file, which wins.
            config.update(_read_json(os.path.join(model_dir, SPECIAL_TOKENS_MAP_FILE), model_dir))
        # Encoding never pads or truncates (transformers turns off what tokenizer.json may set).
        backend.no_padding()
        backend.no_truncation()
        backend.encode_special_tokens = bool(config.get("split_special_tokens", False))
        named = {name: config[name] for name in SPECIAL_TOKEN_NAMES if _token_text(config.get(name))}
        _add_config_tokens(backend, config, named)
        # tokenizer.json's post-processor is used as is: transformers 5 ignores the config's add_bos_token
        # and add_eos_token when there is a tokenizer.json.
        clean_up = bool(config.get("clean_up_tokenization_spaces", False))
        # transformers skips the clean-up for BPE models (it corrupts their text) unless forced.
        if type(backend.model).__name__ == "BPE":
            clean_up = clean_up and bool(
                config.get("clean_up_tokenization_spaces_for_bpe_even_though_it_will_corrupt_output", False)
            )
        special_tokens = {name: _token_text(value) for name, value in named.items()}
        return cls(backend, special_tokens, _read_chat_template(model_dir, config), clean_up)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def render_chat(self, text: str) -> str:
        """The chat template applied to one user message, with the generation prompt."""
        import jinja2

        if self._compiled_template is None:
            self._compiled_template = _compile_chat_template(self.chat_template)
        try:
            return self._compiled_template.render(
                messages=[{"role": "user", "content": text}],
                tools=None,
                documents=None,
                add_generation_prompt=True,
                **self.special_tokens,
            )
        except jinja2.exceptions.TemplateError as e:
            raise ConfigError(f"the tokenizer's chat template failed: {e}") from None

    def _encode_chat(self, text: str) -> list[int]:
        # The template writes the special tokens itself, so the post-processor adds none.
        return self.encode(self.render_chat(text), add_special_tokens=False)

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        text = self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)
        return _clean_up_spaces(text) if self.clean_up_spaces else text


def _add_config_tokens(backend, config: dict[str, Any], named: dict[str, Any]) -> None:
    """Adds tokenizer_config's added tokens and named special tokens missing from the backend.

    transformers re-adds every `added_tokens_decoder` entry (so its flags win) and then each named
    special token that is not yet an added token, as a special token.
    """
    decoder = config.get("added_tokens_decoder") or {}
    tokens = [_added_token(decoder[index]) for index in sorted(decoder, key=int)]
    present = {t.content for t in backend.get_added_tokens_decoder().values()} | {t.content for t in tokens}
    for value in named.values():
        if _token_text(value) not in present:
            tokens.append(_added_token(value))
            present.add(_token_text(value))
    if tokens:
        backend.add_tokens(tokens)


def _clean_up_spaces(text: str) -> str:
    """transformers' `clean_up_tokenization`: drops the spaces word-piece decoding puts before punctuation."""
    for spaced, joined in (
        (" .", "."),
        (" ?", "?"),
        (" !", "!"),
        (" ,", ","),
        (" ' ", "'"),
        (" n't", "n't"),
        (" 'm", "'m"),
        (" 's", "'s"),
        (" 've", "'ve"),
        (" 're", "'re"),
    ):
        text = text.replace(spaced, joined)
    return text


class TransformersTokenizer(Tokenizer):
    """`transformers.AutoTokenizer` (for checkpoints without `tokenizer.json`); imports transformers."""

    def __init__(self, hf_tokenizer):
        self.hf_tokenizer = hf_tokenizer
        template = hf_tokenizer.chat_template
        self.chat_template = template.get("default") if isinstance(template, dict) else template

    @classmethod
    def from_dir(cls, model_dir: str) -> TransformersTokenizer:
        from transformers import AutoTokenizer

        try:
            return cls(AutoTokenizer.from_pretrained(model_dir, local_files_only=True))
        except (OSError, ValueError) as e:
            raise _cannot_load(model_dir, e) from None

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return list(self.hf_tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"])

    def _encode_chat(self, text: str) -> list[int]:
        out = self.hf_tokenizer.apply_chat_template(
            [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=True
        )
        # transformers 5 returns a BatchEncoding here; older versions a plain list.
        return list(out["input_ids"] if hasattr(out, "keys") else out)

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.hf_tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)
