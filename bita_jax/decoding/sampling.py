"""The acceptance policy of AR and BiTA decoding: greedy or sampled (temperature, top-k, top-p).

`Sampler.processed_logits` reproduces transformers' `generate` warpers (TemperatureLogitsWarper, then
TopKLogitsWarper, then TopPLogitsWarper, each with min_tokens_to_keep=1) on float32 logits. `Sampler.choose`
draws `argmax(processed + g)` with Gumbel noise g keyed by (seed, prompt index, position): a token's draw
depends only on the seed, the prompt's index in the user's input, the token's absolute position and its
logits, never on batch size, batch slot, padding or the number of rows drawn together. AR and BiTA draw with
the same keys, so with equal logits they draw equal tokens (docs/sampling.md).
The seed travels with the rows (`streams`), not in the Sampler, so a new seed does not recompile.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

from bita_jax.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class Sampler:
    """Sampling options; hashable, so it can be a static jit argument.

    Attributes:
      temperature: logits are divided by it; 0 means greedy (argmax of the raw logits).
      top_k: keep the k largest processed logits (ties with the k-th are kept); 0 disables it.
      top_p: keep the smallest set of most probable tokens whose probability reaches top_p; 1 disables it.
    """

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0

    def __post_init__(self):
        if not 0 <= self.temperature < math.inf:  # inf would sample uniformly, NaN never compares
            raise ConfigError(f"temperature must be a finite number >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ConfigError(f"top_k must be >= 0, got {self.top_k}")

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0

    def processed_logits(self, logits: jax.Array) -> jax.Array:
        """Temperature, then top-k, then top-p, as transformers' warpers; filtered entries are -inf.

        Only for temperature > 0 (greedy draws use the raw logits).

        Args:
          logits: [..., V] raw logits.

        Returns:
          [..., V] float32 processed logits.
        """
        # XLA turns `x / t` into a multiply by the reciprocal on its own (1 ulp from transformers' division);
        # writing the multiply out keeps the rounding from depending on the compiler.
        scores = logits.astype(jnp.float32) * jnp.float32(1 / self.temperature)
        if self.top_k:
            scores = _top_k(scores, min(self.top_k, scores.shape[-1]))
        if self.top_p < 1:  # generate adds no top-p warper at 1.0
            scores = _top_p(scores, self.top_p)
        return scores

    def choose(self, logits: jax.Array, positions: jax.Array, streams: jax.Array) -> jax.Array:
        """Draws one token per row: argmax when greedy, else Gumbel-max over the processed logits.

        Args:
          logits: [B, T, V] raw logits.
          positions: [B, T] int32 absolute position of the token being drawn.
          streams: [B, 2] int32 (seed, index of the row's prompt in the user's input).

        Returns:
          [B, T] int32 tokens.
        """
        if self.is_greedy:
            return jnp.argmax(logits, axis=-1).astype(jnp.int32)
        noise = _gumbel_noise(streams, positions, logits.shape[-1])  # [B, T, V]
        return jnp.argmax(self.processed_logits(logits) + noise, axis=-1).astype(jnp.int32)


def _gumbel_noise(streams: jax.Array, positions: jax.Array, vocab: int) -> jax.Array:
    """Gumbel noise [B, T, V] float32 for [B, 2] streams and [B, T] positions.

    Row (b, t) draws from fold_in(fold_in(key(seed_b), prompt_b), positions[b, t]) and nothing else.
    """
    row_keys = jax.vmap(lambda s: jax.random.fold_in(jax.random.key(s[0]), s[1]))(streams)  # [B]
    keys = jax.vmap(jax.vmap(jax.random.fold_in, in_axes=(None, 0)))(row_keys, positions)  # [B, T]
    return jax.vmap(jax.vmap(lambda key: jax.random.gumbel(key, (vocab,), jnp.float32)))(keys)


def _top_k(scores: jax.Array, k: int) -> jax.Array:
    """[..., V] -> [..., V]: entries below the k-th largest become -inf (ties with it are kept)."""
    kth_largest = jax.lax.top_k(scores, k)[0][..., -1:]  # [..., 1]
    return jnp.where(scores < kth_largest, -jnp.inf, scores)


def _top_p(scores: jax.Array, top_p: float) -> jax.Array:
    """[..., V] -> [..., V]: transformers' TopPLogitsWarper with min_tokens_to_keep=1.

    Walking the tokens from least to most probable (a stable ascending sort, so among equal scores the lower
    index goes first), a token is removed while the probability summed so far, its own included, is
    <= 1 - top_p; the most probable token is always kept.
    """
    order = jnp.argsort(scores, axis=-1, stable=True)  # [..., V] ascending
    ascending = jnp.take_along_axis(scores, order, axis=-1)
    cumulative = jnp.cumsum(jax.nn.softmax(ascending, axis=-1), axis=-1)
    remove_sorted = (cumulative <= 1 - top_p).at[..., -1].set(False)
    remove = jnp.put_along_axis(jnp.zeros_like(remove_sorted), order, remove_sorted, axis=-1, inplace=False)
    return jnp.where(remove, -jnp.inf, scores)


GREEDY = Sampler()
# The sampling options besides temperature, and the values that turn each off.
SAMPLING_ONLY = {"top_k": 0, "top_p": 1.0, "seed": 0}


def used_options(temperature: float, top_k: int, top_p: float, seed: int) -> dict[str, float | int]:
    """The sampling options a decode actually uses: temperature alone when greedy (0), else all."""
    if temperature == 0:
        return {"temperature": 0.0}
    return {"temperature": temperature, "top_k": top_k, "top_p": top_p, "seed": seed}


def ignored_options(temperature: float, **options: float | int) -> list[str]:
    """Names of `SAMPLING_ONLY` options set (not off) although temperature 0 decodes greedily."""
    if temperature != 0:
        return []
    return [name for name, off in SAMPLING_ONLY.items() if name in options and options[name] != off]


def streams_for(seed: int, prompt_indices) -> np.ndarray:
    """[B, 2] int32 noise streams (seed, prompt index) of rows holding the given prompts."""
    indices = np.asarray(prompt_indices, np.int32)
    return np.stack([np.full_like(indices, seed), indices], axis=-1)
