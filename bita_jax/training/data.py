"""Training data for BiTA, on the host in numpy: examples, group windows, batches.

Examples come from a jsonl file as written by decode.py (`prompt_ids` + `output_ids` used when
present, so targets are exactly what the model generated) or from any `datasets` dataset with
prompt/completion text columns, tokenized as decode.py tokenizes prompts. The target is the
response followed by EOS, so the mask tokens also learn to predict the end. Each example becomes
one multi-group sequence (bita/training_mask.py); batches are padded to length buckets with room
for the batch's longest normal part plus all G * M mask rows (the train step reads the normal part
from the first T - G * M slots).
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Iterator

import numpy as np

from bita_jax.bita.training_mask import IGNORE, NORMAL, build_sequence
from bita_jax.config import DataConfig
from bita_jax.errors import UserError

BATCH_FIELDS = ("tokens", "positions", "group", "visible_end", "labels")


@dataclasses.dataclass(frozen=True)
class Example:
    """source: prompt ids as the model saw them; target: response ids ending with EOS."""

    source: tuple[int, ...]
    target: tuple[int, ...]


# ---------------------------------------------------------------------------------------------
# Reading records


def _jsonl_records(path: str, shard: tuple[int, int]) -> Iterator[tuple[str, dict[str, Any]]]:
    """(where, record) for this host's lines (line k goes to host k % count), blank lines skipped."""
    index, count = shard
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(_lines(f, path), 1):
            if (line_no - 1) % count != index or not line.strip():
                continue
            where = f"{path} line {line_no}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"{where}: not valid JSON ({e.msg})") from None
            if not isinstance(record, dict):
                raise UserError(f"{where}: expected a JSON object")
            yield where, record


def _lines(f, path: str) -> Iterator[str]:
    """The lines of an open text file; bytes that are not UTF-8 raise UserError."""
    try:
        yield from f
    except UnicodeDecodeError as e:
        raise UserError(f"data file {path} is not UTF-8 text (byte {e.start})") from None


def _dataset_records(cfg: DataConfig, shard: tuple[int, int]) -> Iterator[tuple[str, dict[str, Any]]]:
    """Records of a `datasets` dataset (local file, saved directory or hub name), this host's shard."""
    import datasets

    path = cfg.path
    try:
        if os.path.isdir(path) and os.path.isfile(os.path.join(path, "dataset_info.json")):
            ds = datasets.load_from_disk(path)
        elif os.path.isfile(path):
            kind = {".json": "json", ".csv": "csv", ".parquet": "parquet", ".arrow": "arrow"}.get(
                os.path.splitext(path)[1]
            )
            if kind is None:
                raise UserError(f"unsupported data file type {path} (use .jsonl, .json, .csv or .parquet)")
            ds = datasets.load_dataset(kind, data_files=path)
        else:
            ds = datasets.load_dataset(path)
    except (FileNotFoundError, ValueError, ConnectionError, OSError) as e:
        raise UserError(f"cannot load data {path}: {str(e).splitlines()[0]}") from None
    if isinstance(ds, datasets.DatasetDict):
        if cfg.split not in ds:
            raise UserError(f"data {path} has no split {cfg.split!r} (splits: {sorted(ds)})")
        ds = ds[cfg.split]
    ds = ds.shard(num_shards=shard[1], index=shard[0], contiguous=False)
    for i, record in enumerate(ds):
        yield f"{path} row {i * shard[1] + shard[0]}", record


def _ids(value: Any, where: str, name: str) -> list[int]:
    if not isinstance(value, list) or not all(isinstance(t, int) and t >= 0 for t in value):
        raise UserError(f"{where}: {name} must be a list of non-negative integers")
    return value


def read_examples(
    cfg: DataConfig,
    model_dir: str,
    eos_id: int,
    shard: tuple[int, int] = (0, 1),
    vocab_size: int | None = None,
) -> list[Example]:
    """This host's examples, tokenized; records are either ids (decode.py output) or text.

    Args:
      cfg: data config (path, field names, chat template, max_length).
      model_dir: checkpoint directory, whose tokenizer is loaded only if some record is text.
      eos_id: appended to targets that do not already end with it.
      shard: (process index, process count); this host keeps records index, index + count, ...
      vocab_size: V of the model; ids >= V (the mask ids start at V) are refused.

    Raises:
      UserError: a missing file, malformed line or record without the needed fields, or ids
        outside the vocabulary.
    """
    if not cfg.path:
        raise UserError("no training data given (--data FILE_OR_DATASET)")
    if cfg.path.endswith(".jsonl"):
        if os.path.isdir(cfg.path):
            raise UserError(f"data file {cfg.path} is a directory")
        if not os.path.isfile(cfg.path):
            raise UserError(f"data file not found: {cfg.path}")
        records = _jsonl_records(cfg.path, shard)
    else:
        records = _dataset_records(cfg, shard)
    with_ids: list[tuple[list[int], list[int]]] = []
    with_text: list[tuple[str, str]] = []
    id_wheres, text_wheres = [], []  # where each record came from, for errors
    for where, record in records:
        if "prompt_ids" in record and "output_ids" in record:
            with_ids.append(
                (
                    _ids(record["prompt_ids"], where, "prompt_ids"),
                    _ids(record["output_ids"], where, "output_ids"),
                )
            )
            id_wheres.append(where)
            continue
        missing = [f for f in (cfg.prompt_field, cfg.completion_field) if not isinstance(record.get(f), str)]
        if missing:
            raise UserError(
                f"{where}: needs prompt_ids + output_ids, or text fields "
                f"{cfg.prompt_field!r} and {cfg.completion_field!r} (missing or not a string: {missing[0]!r})"
            )
        for field in (cfg.prompt_field, cfg.completion_field):
            try:
                record[field].encode("utf-8")
            except UnicodeEncodeError as e:  # a lone surrogate such as "\ud800": valid JSON, no text
                raise UserError(f"{where}: {field!r} holds invalid Unicode (character {e.start})") from None
        with_text.append((record[cfg.prompt_field], record[cfg.completion_field]))
        text_wheres.append(where)
    if with_text:
        from bita_jax.io.hf import encode_prompts, load_tokenizer

        tokenizer = load_tokenizer(model_dir)
        sources = encode_prompts(tokenizer, [p for p, _ in with_text], cfg.chat)
        # The response is tokenized on its own, as the reference template does and decode.py emits it.
        targets = [tokenizer.encode(c, add_special_tokens=False) for _, c in with_text]
        with_ids.extend(zip(sources, targets, strict=True))
    if vocab_size is not None:
        for where, ids in zip(id_wheres + text_wheres, with_ids, strict=True):
            _check_vocab(ids[0] + ids[1], vocab_size, where)
    examples = []
    for source, target in with_ids:
        if not target or target[-1] != eos_id:
            target = [*target, eos_id]
        target = target[: max(cfg.max_length - len(source), 0)]
        examples.append(Example(tuple(source[: cfg.max_length]), tuple(target)))
    return examples


def _check_vocab(ids: list[int], vocab_size: int, where: str) -> None:
    """Refuses token ids >= V: they index no embedding (V, V + 1, ... are the mask tokens' ids)."""
    largest = max(ids, default=0)
    if largest >= vocab_size:
        raise UserError(
            f"{where}: token id {largest} is not below the model's vocab_size {vocab_size} (ids from "
            f"{vocab_size} on are BiTA's mask tokens; data from another tokenizer?)"
        )


def full_count(examples: list[Example], max_length: int) -> int:
    """Examples whose prompt + response reach max_length: `read_examples` cut them there, unless one
    fitted exactly."""
    return sum(len(e.source) + len(e.target) >= max_length for e in examples)


def trainable_count(examples: list[Example], num_masks: int) -> int:
    """Examples whose response is longer than M tokens: only they give any mask a label."""
    return sum(len(e.target) > num_masks for e in examples)


# ---------------------------------------------------------------------------------------------
# The multi-group sequence format


def group_offsets(target_len: int, num_masks: int, max_groups: int, rng: np.random.Generator) -> np.ndarray:
    """Start offsets s_0 < ... < s_{g-1} of the mask groups (docs/method.md section 2.3, step 2).

    All A = T - M offsets when A <= G, else a random window of G consecutive ones. Empty when
    T <= M (the example has no loss tokens).
    """
    candidates = target_len - num_masks
    if candidates <= 0:
        return np.zeros((0,), np.int64)
    start = rng.integers(0, candidates - max_groups + 1) if candidates > max_groups else 0
    return start + np.arange(min(candidates, max_groups))


def default_buckets(cfg: DataConfig, num_masks: int) -> tuple[int, ...]:
    """Powers of two from 64 up to the longest sequence (max_length + G * M, rounded up to 16)."""
    if cfg.seq_buckets:
        return cfg.seq_buckets
    longest = -(-(cfg.max_length + cfg.max_groups * num_masks) // 16) * 16
    buckets = [b for b in (64 << i for i in range(20)) if b < longest]
    return (*buckets, longest)


def bucket_for(length: int, buckets: tuple[int, ...]) -> int:
    for bucket in buckets:
        if length <= bucket:
            return bucket
    raise UserError(
        f"a training batch needs {length} tokens (longest normal part + max_groups * M), "
        f"more than the largest bucket {buckets[-1]}"
    )


def collate(sequences: list[dict[str, np.ndarray]], length: int, pad_id: int) -> dict[str, np.ndarray]:
    """Right-pads sequences to `length`; padding is harmless normal rows with no label. [B, T] each."""
    batch = {}
    for name in BATCH_FIELDS:
        out = np.empty((len(sequences), length), np.int32)
        for row, seq in zip(out, sequences, strict=True):
            n = len(seq[name])
            row[:n] = seq[name]
            pad_index = np.arange(n, length)
            row[n:] = {
                "tokens": pad_id,
                "positions": pad_index,
                "group": NORMAL,
                "visible_end": pad_index + 1,
                "labels": IGNORE,
            }[name]
        batch[name] = out
    return batch


class BatchStream:
    """Deterministic, resumable stream of this host's batches.

    Epoch e visits this host's examples in a permutation seeded by (seed, e); each example's mask
    window is redrawn every epoch from (seed, e, example index), so a position (epoch, index) fully
    determines what comes next and is all a checkpoint has to store.
    """

    def __init__(
        self,
        examples: list[Example],
        local_batch: int,
        steps_per_epoch: int,
        cfg: DataConfig,
        vocab_size: int,
        num_masks: int,
        seed: int,
    ):
        if not examples:
            raise UserError(f"no training examples in {cfg.path}")
        self.examples = examples
        self.local_batch = local_batch
        self.steps_per_epoch = steps_per_epoch
        self.cfg = cfg
        self.vocab_size = vocab_size
        self.num_masks = num_masks
        self.seed = seed
        self.buckets = default_buckets(cfg, num_masks)

    def sequences(self, epoch: int, index: int) -> list[dict[str, np.ndarray]]:
        """The per-token arrays of batch `index` of `epoch` (examples cycle if this host has few)."""
        n = len(self.examples)
        order = np.random.default_rng([self.seed, epoch]).permutation(n)
        picks = order[(index * self.local_batch + np.arange(self.local_batch)) % n]
        out = []
        for i in picks:
            example = self.examples[i]
            rng = np.random.default_rng([self.seed, epoch, int(i)])
            offsets = group_offsets(len(example.target), self.num_masks, self.cfg.max_groups, rng)
            out.append(
                build_sequence(example.source, example.target, offsets, self.vocab_size, self.num_masks)
            )
        return out

    def needed_length(self, sequences: list[dict[str, np.ndarray]]) -> int:
        """Tokens a batch needs: its longest normal part plus R = G * M mask rows.

        The train step runs the first T - R slots as the normal part and gathers R rows from where
        each sequence's masks start, so a sequence with fewer groups still needs the full R.
        """
        num_rows = self.cfg.max_groups * self.num_masks
        return max(int(np.sum(s["group"] == NORMAL)) for s in sequences) + num_rows

    def advance(self, epoch: int, index: int) -> tuple[int, int]:
        """The data position after (epoch, index)."""
        return (epoch + 1, 0) if index + 1 >= self.steps_per_epoch else (epoch, index + 1)
