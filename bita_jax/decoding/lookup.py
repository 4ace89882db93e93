"""Prompt lookup on device: draft the tokens that followed the last earlier occurrence of the newest n-gram.

Each row's history is its prompt followed by the tokens generated so far (its last token is the
pending one). For g = MAX_NGRAM down to 1, the lookup searches the most recent earlier start i
(i + g < L, L the history length) with history[i : i + g] == history[L - g : L]; the first g that
matches wins, and the proposal is what followed that occurrence, copied on as an overlapping copy:
proposal[k] = history[i + g + (k mod p)] with period p = L - i - g. (A match right before the end,
such as "a b a b" matching "a b", continues the repetition "a b a b ..." instead of stopping at the
end of what is known.) A row without any match proposes `no_match` ids (the vocabulary size V,
which no choice over the V real tokens can equal, so such candidates are never accepted).

Everything has fixed shapes, vectorised over the batch, with no host round trip: the cost is
about MAX_NGRAM^2 comparisons per history slot, negligible beside a model forward.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

# Longest n-gram matched (transformers' prompt lookup uses 2 by default; 3 matches more precisely
# where a longer context repeats, and falls back to 2 and 1).
MAX_NGRAM = 3


def history(prompt: jax.Array, prompt_lens: jax.Array, output: jax.Array, num_generated: jax.Array):
    """Each row's prompt followed by its generated tokens.

    Args:
      prompt: [B, T] right-padded prompts; prompt_lens [B] int32.
      output: [B, O] generated ids; num_generated [B] int32 of them are valid.

    Returns:
      tokens [B, T + O] int32 (pad past the length) and lengths [B] int32.
    """
    slots = jnp.arange(prompt.shape[1] + output.shape[1])[None, :]  # [1, S]
    from_prompt = jnp.take_along_axis(prompt, jnp.minimum(slots, prompt.shape[1] - 1), axis=1)
    from_output = jnp.take_along_axis(
        output, jnp.clip(slots - prompt_lens[:, None], 0, output.shape[1] - 1), axis=1
    )
    tokens = jnp.where(slots < prompt_lens[:, None], from_prompt, from_output)
    return tokens.astype(jnp.int32), (prompt_lens + num_generated).astype(jnp.int32)


def propose(tokens: jax.Array, lengths: jax.Array, num_tokens: int, no_match: int,
            max_ngram: int = MAX_NGRAM) -> jax.Array:  # fmt: skip
    """The prompt-lookup proposal of each row (see the module docstring).

    Args:
      tokens: [B, S] int32 histories; slots at and past lengths[b] are ignored.
      lengths: [B] int32 L, at least 1.
      num_tokens: n, tokens proposed per row.
      no_match: the id proposed by rows without a match.
      max_ngram: the longest n-gram tried.

    Returns:
      [B, n] int32 proposals.
    """
    batch, slots = tokens.shape
    starts = jnp.arange(slots)[None, :]  # [1, S] candidate starts i
    found = jnp.full((batch,), -1, jnp.int32)  # start of the chosen match, -1 none yet
    period = jnp.ones((batch,), jnp.int32)
    for g in range(max_ngram, 0, -1):  # longest first: a shorter n-gram only where no longer one matched
        match = starts + g < lengths[:, None]  # [B, S] earlier occurrences only
        for t in range(g):
            at = jnp.take_along_axis(tokens, jnp.minimum(starts + t, slots - 1), axis=1)  # [B, S]
            want = jnp.take_along_axis(tokens, jnp.maximum(lengths - g + t, 0)[:, None], axis=1)  # [B, 1]
            match &= at == want
        latest = jnp.max(jnp.where(match, starts, -1), axis=1)  # [B]
        take = (found < 0) & (latest >= 0)
        found = jnp.where(take, latest + g, found)  # found: where the copy starts (i + g)
        period = jnp.where(take, lengths - latest - g, period)
    copy_from = jnp.maximum(found, 0)[:, None] + jnp.arange(num_tokens)[None, :] % period[:, None]
    proposal = jnp.take_along_axis(tokens, jnp.minimum(copy_from, slots - 1), axis=1)
    return jnp.where((found >= 0)[:, None], proposal, no_match).astype(jnp.int32)


def no_match_proposals(batch: int, num_tokens: int, vocab_size: int) -> jax.Array:
    """[B, n] proposals of rows without a match: id V, which no choice over the V real tokens equals."""
    return jnp.full((batch, num_tokens), vocab_size, jnp.int32)
