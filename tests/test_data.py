"""The multi-group training format against the method doc's tables (2.3-2.5) and data reading."""

import json

import numpy as np
import pytest

from bita_jax.bita import training_mask
from bita_jax.cli import UserError
from bita_jax.config import DataConfig
from bita_jax.training import data
from bita_jax.training import loop as train_loop

V, M = 100, 2


def rule_mask(seq):
    """Method doc 2.4 written as loops over (row, key): an independent oracle for attention_mask."""
    group, visible = seq["group"], seq["visible_end"]
    T = len(group)
    out = np.zeros((T, T), bool)
    for q in range(T):
        for s in range(T):
            if group[q] < 0:  # normal row: plain causal over normal tokens
                out[q, s] = group[s] < 0 and s <= q
            else:  # mask k of group j: source + target[:s_j], then masks 0..k of its own group
                k_q = seq["positions"][q] - visible[q]
                k_s = seq["positions"][s] - visible[s]
                out[q, s] = (group[s] < 0 and s < visible[q]) or (group[s] == group[q] and k_s <= k_q)
    return out


def test_sequence_matches_method_tables():
    # S = 3, T = 5 (EOS = 9 included), M = 2: A = 3 offsets 0, 1, 2, all used (A <= G).
    example = data.Example(source=(1, 11, 12), target=(20, 21, 22, 23, 9))
    offsets = data.group_offsets(5, M, max_groups=64, rng=np.random.default_rng(0))
    np.testing.assert_array_equal(offsets, [0, 1, 2])
    seq = training_mask.build_sequence(example.source, example.target, offsets, V, M)
    # input = source ++ target[:s_last + M = 4] ++ 3 groups of [V, V+1]: the normal part runs M
    # past s_last so that the last group's labels have teacher rows (S + s_j + k predicts label k).
    masks = [V, V + 1] * 3
    np.testing.assert_array_equal(seq["tokens"], [1, 11, 12, 20, 21, 22, 23] + masks)
    np.testing.assert_array_equal(seq["group"], [-1] * 7 + [0, 0, 1, 1, 2, 2])
    # normal i -> i; mask k of group j -> S + s_j + k
    np.testing.assert_array_equal(seq["positions"], [0, 1, 2, 3, 4, 5, 6, 3, 4, 4, 5, 5, 6])
    # mask k of group j -> target[s_j + 1 + k], the normal token right after its teacher row
    np.testing.assert_array_equal(seq["labels"], [-100] * 7 + [21, 22, 22, 23, 23, 9])
    normal = seq["tokens"][:7]
    np.testing.assert_array_equal(seq["labels"][7:-1], normal[seq["positions"][7:-1] + 1])
    np.testing.assert_array_equal(seq["visible_end"], [1, 2, 3, 4, 5, 6, 7, 3, 3, 4, 4, 5, 5])
    mask = np.asarray(
        training_mask.attention_mask(*(seq[k][None] for k in ("group", "visible_end", "positions")))
    )[0]
    np.testing.assert_array_equal(mask, rule_mask(seq))
    # Spot checks straight from the table: group 1 (s_1 = 1) sees source + target[:1] and its own masks.
    row = 9  # mask 0 of group 1
    assert mask[row].nonzero()[0].tolist() == [0, 1, 2, 3, 9]
    assert mask[row + 1].nonzero()[0].tolist() == [0, 1, 2, 3, 9, 10]
    assert not mask[:7, 7:].any()  # normal rows never see masks


def test_window_of_g_groups_and_padding():
    example = data.Example(source=(1, 2), target=tuple(range(30, 50)) + (9,))  # T = 21
    offsets = data.group_offsets(21, M, max_groups=4, rng=np.random.default_rng(5))
    assert len(offsets) == 4 and np.all(np.diff(offsets) == 1) and 0 <= offsets[0] <= 21 - M - 4
    seq = training_mask.build_sequence(example.source, example.target, offsets, V, M)
    assert len(seq["tokens"]) == 2 + offsets[-1] + M + 4 * M
    batch = data.collate([seq], 40, pad_id=9)
    padded = {k: v[0] for k, v in batch.items()}
    mask = np.asarray(
        training_mask.attention_mask(*(batch[k] for k in ("group", "visible_end", "positions")))
    )[0]
    np.testing.assert_array_equal(mask, rule_mask(padded))
    n = len(seq["tokens"])
    assert (padded["labels"][n:] == -100).all() and not mask[:n, n:].any()  # padding is invisible
    # A target no longer than M yields no groups and no labels.
    assert len(data.group_offsets(2, M, 64, np.random.default_rng(0))) == 0


def test_read_ids_and_text_and_errors(tiny_checkpoint, tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(
        json.dumps({"prompt_ids": [1, 5, 6], "output_ids": [7, 8, 2]})
        + "\n"
        + json.dumps({"prompt_ids": [1, 5], "output_ids": [7, 8]})
        + "\n\n"
        + json.dumps({"prompt": "def add", "completion": "return a"})
        + "\n"
    )
    examples = data.read_examples(DataConfig(path=str(path)), tiny_checkpoint, eos_id=2)
    assert examples[0] == data.Example((1, 5, 6), (7, 8, 2))  # EOS already there: kept once
    assert examples[1] == data.Example((1, 5), (7, 8, 2))  # EOS appended
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_checkpoint)
    assert examples[2].source == tuple(tok("def add")["input_ids"])
    assert examples[2].target == (*tok("return a", add_special_tokens=False)["input_ids"], 2)
    chat = data.read_examples(DataConfig(path=str(path), chat=True), tiny_checkpoint, eos_id=2)
    assert tok.decode(chat[2].source).endswith("assistant:")
    # Host sharding: host 1 of 2 gets lines 2, 4, ...
    assert data.read_examples(DataConfig(path=str(path)), tiny_checkpoint, 2, shard=(1, 2)) == [
        examples[1],
        examples[2],
    ]

    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt_ids": [1], "output_ids": [2]}) + "\n{not json\n")
    with pytest.raises(UserError, match=r"bad.jsonl line 2: not valid JSON"):
        data.read_examples(DataConfig(path=str(bad)), tiny_checkpoint, 2)
    bad.write_text(json.dumps({"question": "x"}) + "\n")
    with pytest.raises(UserError, match=r"line 1: needs prompt_ids"):
        data.read_examples(DataConfig(path=str(bad)), tiny_checkpoint, 2)


def test_datasets_directory(tiny_checkpoint, tmp_path):
    import datasets

    ds = datasets.Dataset.from_dict({"q": ["def add", "import os"], "a": ["return a", "print"]})
    ds.save_to_disk(str(tmp_path / "ds"))
    cfg = DataConfig(path=str(tmp_path / "ds"), prompt_field="q", completion_field="a")
    examples = data.read_examples(cfg, tiny_checkpoint, eos_id=2)
    assert len(examples) == 2 and all(e.target[-1] == 2 for e in examples)


def test_stream_is_deterministic_and_redraws_windows():
    examples = [data.Example((1, 2, 3), tuple(range(10, 10 + n)) + (9,)) for n in (20, 25, 30, 12)]
    cfg = DataConfig(max_groups=3, seq_buckets=(32, 64))
    stream = data.BatchStream(examples, 2, 2, cfg, V, M, seed=7)

    def batch(epoch, index):  # as the training loop builds it
        sequences = stream.sequences(epoch, index)
        return data.collate(sequences, train_loop.agreed_length(stream, sequences), pad_id=9)

    a, b = batch(0, 1), batch(0, 1)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])
    assert a["tokens"].shape[1] in (32, 64)
    assert stream.advance(0, 1) == (1, 0) and stream.advance(0, 0) == (0, 1)
    windows = {tuple(s["positions"][-1:]) for e in range(6) for s in stream.sequences(e, 0)}
    assert len(windows) > 2  # fresh random windows every epoch
