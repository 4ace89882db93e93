"""The Python API: the README's example runs as written and gives decode.py's output ids; compiled
generate functions are reused across calls."""

import json
import re

import jax
import pytest

import decode
from bita_jax.bita import adapter as bita_adapter
from bita_jax.cli import run_main
from bita_jax.config import BiTAConfig
from bita_jax.io import adapter_files, hf

README = "README.md"


@pytest.fixture(scope="module")
def adapter_dir(tiny_checkpoint, tmp_path_factory):
    config = hf.load_config(tiny_checkpoint)
    bita = BiTAConfig(num_prompt_tokens=4, num_mask_tokens=3)
    out = str(tmp_path_factory.mktemp("api_adapter"))
    return adapter_files.save_adapter(
        out, bita_adapter.init_adapter(config, bita, jax.random.key(0)), bita, tiny_checkpoint
    )


def readme_example() -> str:
    """The code block of the README's "Python API" section."""
    text = open(README).read()
    section = text[text.index("## Python API") :]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_readme_example_equals_decode_py(tiny_checkpoint, adapter_dir, tmp_path):
    code = readme_example().replace("MODEL_DIR", tiny_checkpoint).replace("ADAPTER_DIR", adapter_dir)
    namespace = {}
    exec(code, namespace)
    records = namespace["records"]
    out = tmp_path / "out.jsonl"
    argv = [
        "--model", tiny_checkpoint, "--mode", "bita", "--adapter", adapter_dir, "--tree", "upper:5",
        "--batch-size", "4", "--max-new-tokens", "64", "--prompt", "def add(a, b):", "--output", str(out),
    ]  # fmt: skip
    assert run_main(decode.main, argv) == 0
    expected = [json.loads(line) for line in open(out)]
    assert [r["output_ids"] for r in records] == [r["output_ids"] for r in expected]
    # decode.py's file records also carry "run" (what made them, checked by --resume).
    assert {k for k in records[0]} == {k for k in expected[0]} - {"run"}
    assert records[0]["new_tokens"] > 0


def test_second_generate_does_not_compile(tiny_checkpoint, adapter_dir):
    import bita_jax

    model = bita_jax.load(tiny_checkpoint, adapter=adapter_dir)
    prompts = ["def add(a, b):", "x", "import os"]
    for mode in ("ar", "bita"):
        first = model.run(prompts, max_new_tokens=8, mode=mode, batch_size=2)
        second = model.run(prompts[::-1], max_new_tokens=8, mode=mode, batch_size=2, temperature=0.0, seed=3)
        assert first.compile_seconds > 0 and second.compile_seconds == 0, mode
        assert [r["output_ids"] for r in second.records] == [r["output_ids"] for r in first.records][::-1]
    sampled = model.run(prompts, max_new_tokens=8, mode="ar", batch_size=2, temperature=0.7)
    reseeded = model.run(prompts, max_new_tokens=8, mode="ar", batch_size=2, temperature=0.7, seed=1)
    assert sampled.compile_seconds > 0 and reseeded.compile_seconds == 0


def test_a_records_seconds_is_its_own_time(tiny_checkpoint):
    """`seconds` runs from the prompt's insert to the chunk that finished it: within the run's time;
    one slot decodes the prompts one after another (their times fit in the run's); two slots decode
    two equal budgets side by side, finishing in the same chunk (the one admitted later took no
    longer, and together they took more than the run: not a share of it)."""
    import bita_jax

    model = bita_jax.load(tiny_checkpoint)
    prompts = ["def add(a, b):", "x"]
    options = dict(max_new_tokens=40, mode="ar", ignore_eos=True, chunk_steps=8)
    one_slot = model.run(prompts, batch_size=1, **options)
    times = [g.seconds for g in one_slot.generations]
    assert [r["seconds"] for r in one_slot.records] == [round(t, 6) for t in times]
    assert all(0 < t <= one_slot.seconds for t in times) and sum(times) <= one_slot.seconds
    two_slots = model.run(prompts, batch_size=2, **options)
    first, second = (g.seconds for g in two_slots.generations)
    assert 0 < second <= first <= two_slots.seconds
    assert first + second > two_slots.seconds


def test_a_draft_tree_is_accepted_where_a_tree_spec_is(tiny_checkpoint, adapter_dir):
    import bita_jax
    from bita_jax.bita.tree import DraftTree, parse_tree
    from bita_jax.errors import ConfigError

    model = bita_jax.load(tiny_checkpoint, adapter=adapter_dir)
    prompts = ["def add(a, b):", "import os"]
    tree = DraftTree.from_paths([(0,), (1,), (0, 0)]).with_lookup(2)
    by_spec = model.run(prompts, max_new_tokens=8, mode="bita", tree=tree.spec)
    by_tree = model.run(prompts, max_new_tokens=8, mode="bita", tree=tree)
    assert by_tree.tree == by_spec.tree == tree and by_tree.compile_seconds == 0  # the same engine
    assert [r["output_ids"] for r in by_tree.records] == [r["output_ids"] for r in by_spec.records]
    lookup = model.run(prompts, max_new_tokens=8, mode="lookup", tree=parse_tree("lookup:3", 0))
    assert lookup.tree == DraftTree((), 3)
    with pytest.raises(ConfigError, match="depth 4 exceeds the adapter's 3 mask tokens"):
        model.check(prompts, mode="bita", tree=DraftTree.from_paths([(0,) * (m + 1) for m in range(4)]))
    for given in (tree, tree.spec):  # mode lookup drafts without the adapter: refused alike
        with pytest.raises(ConfigError, match="drafts with mask tokens: it needs an adapter"):
            model.check(prompts, mode="lookup", tree=given)


def test_mode_errors(tiny_checkpoint):
    import bita_jax
    from bita_jax.errors import ConfigError

    model = bita_jax.load(tiny_checkpoint)
    with pytest.raises(ConfigError, match="needs an adapter"):
        model.generate(["x"], mode="bita")
    with pytest.raises(ConfigError, match="mode must be one of"):
        model.generate(["x"], mode="beam")
    with pytest.raises(ConfigError, match="temperature must be a finite number >= 0"):
        model.generate(["x"], temperature=-1.0)


def test_token_id_prompts_decode_as_their_texts_do(tiny_checkpoint, adapter_dir):
    """Encoded prompts (HF generate's input_ids, a chat template applied elsewhere, a text continued
    from its own ids) decode to exactly what their texts give; records carry their decoded text."""
    import numpy as np

    import bita_jax
    from bita_jax.errors import ConfigError, PromptError

    model = bita_jax.load(tiny_checkpoint, adapter=adapter_dir)
    texts = ["def add(a, b):", "import os"]
    for chat in (False, True):
        ids = model.encode(texts, chat)
        given = [ids[0], np.asarray(ids[1], np.int32)]  # lists and 1-D integer arrays alike
        for mode in ("ar", "bita"):
            by_text = model.generate(texts, max_new_tokens=8, mode=mode, chat=chat)
            by_ids = model.generate(given, max_new_tokens=8, mode=mode)
            assert [r["output_ids"] for r in by_ids] == [r["output_ids"] for r in by_text]
            assert [r["prompt_ids"] for r in by_ids] == ids
            assert [r["prompt"] for r in by_ids] == [model.tokenizer.decode(p, False) for p in ids]
    vocab = model.config.vocab_size
    with pytest.raises(
        ConfigError, match="chat applies the template to texts; token-id prompts are decoded as given"
    ):
        model.check([ids[0]], chat=True)
    for bad, reason in (
        ([ids[0], "import os"], r"prompts\[1\] is a str: prompts are all texts or all token-id lists"),
        ([ids[0], []], r"prompts\[1\] has no token ids"),
        ([[1, vocab]], rf"prompts\[0\] holds {vocab}, not a token id in \[0, {vocab}\)"),
        ([[1, -1]], r"prompts\[0\] holds -1"),
        ([[1, 2.0]], r"prompts\[0\] holds 2.0"),
        ([[True]], r"prompts\[0\] holds True"),
    ):
        with pytest.raises(PromptError, match=reason):
            model.check(bad)
