"""The sampler against transformers' warpers: processed logits, drawn distribution, greedy and invariance."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats
import torch
from transformers import AutoTokenizer, LlamaForCausalLM
from transformers.generation.logits_process import (
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from bita_jax.config import ConfigError
from bita_jax.decoding.sampling import Sampler, streams_for
from bita_jax.io import hf
from bita_jax.models.llama import LlamaModel, causal_mask, forward
from tests.tiny_checkpoint import make_tiny_checkpoint

DRAWS = 2000
P_THRESHOLD = 1e-3  # a correct sampler fails one option set's test with probability 1e-3
OPTION_SETS = [
    Sampler(temperature=0.7, top_p=0.9),
    Sampler(temperature=1.0, top_k=20),
    Sampler(temperature=1.3),
]


def transformers_processed(logits: np.ndarray, sampler: Sampler) -> np.ndarray:
    """[R, V] -> [R, V] float32: the warpers `generate` applies for these options, in its order."""
    scores = torch.from_numpy(logits)
    if sampler.temperature != 1:
        scores = TemperatureLogitsWarper(sampler.temperature)(None, scores)
    if sampler.top_k:
        scores = TopKLogitsWarper(sampler.top_k)(None, scores)
    if sampler.top_p < 1:
        scores = TopPLogitsWarper(sampler.top_p)(None, scores)
    return scores.numpy()


def fit_p_value(counts: np.ndarray, probs: np.ndarray) -> float:
    """Chi-square goodness-of-fit p-value of draw counts [V] against probabilities [V].

    Categories expected fewer than 5 times are pooled into one bin (with the next smallest category when the
    pool alone is still under 5). A draw of a probability-0 token is impossible under the target: p is 0.
    """
    if counts[probs == 0].any():
        return 0.0
    expected = probs / probs.sum() * counts.sum()
    pooled = expected < 5
    if 0 < expected[pooled].sum() < 5:
        pooled[np.argmin(np.where(pooled, np.inf, expected))] = True
    observed_bins = np.append(counts[~pooled], counts[pooled].sum())
    expected_bins = np.append(expected[~pooled], expected[pooled].sum())
    keep = expected_bins > 0  # drops an empty pool
    return scipy.stats.chisquare(observed_bins[keep], expected_bins[keep]).pvalue


@pytest.fixture(scope="module")
def peaked_checkpoint(tmp_path_factory):
    """A tiny checkpoint whose next-token logits have a standard deviation near 1.8.

    The shared tiny checkpoint's logits (initializer_range 0.02) have a standard deviation of 0.17: its
    distributions are nearly uniform, so 2000 draws could not tell temperature T from T**2. With
    initializer_range 0.2, T=0.7 top-p 0.9 keeps 57 tokens, the largest with probability 0.27.
    """
    return make_tiny_checkpoint(str(tmp_path_factory.mktemp("peaked")), seed=0, initializer_range=0.2)


@pytest.fixture(scope="module")
def next_token_logits(peaked_checkpoint):
    """(ours [V], PyTorch's [V]) float32 logits of the token after one prompt, and the prompt's length."""
    tokens = AutoTokenizer.from_pretrained(peaked_checkpoint)("def add(a, b):")["input_ids"]
    with torch.no_grad():
        torch_logits = (
            LlamaForCausalLM.from_pretrained(peaked_checkpoint).eval()(torch.tensor([tokens])).logits
        )
    config = hf.load_config(peaked_checkpoint)
    model = LlamaModel(config)
    params = hf.load_params(peaked_checkpoint, config)
    positions = jnp.arange(len(tokens))[None]
    hidden, _ = forward(model, params, jnp.asarray([tokens]), positions, causal_mask(1, len(tokens)))
    ours = model.apply({"params": params}, hidden[0, -1], method="logits")
    return np.asarray(ours), torch_logits[0, -1].numpy(), len(tokens)


def first_token_counts(sampler: Sampler, logits: np.ndarray, position: int) -> np.ndarray:
    """[V] counts of DRAWS first tokens, one per prompt index 0..DRAWS-1 (seed 0)."""
    batch_logits = jnp.broadcast_to(jnp.asarray(logits), (DRAWS, 1, logits.shape[-1]))  # [B, 1, V]
    positions = jnp.full((DRAWS, 1), position, jnp.int32)
    tokens = jax.jit(sampler.choose)(batch_logits, positions, streams_for(0, np.arange(DRAWS)))
    return np.bincount(np.asarray(tokens[:, 0]), minlength=logits.shape[-1])


def transformers_probs(torch_logits: np.ndarray, sampler: Sampler) -> np.ndarray:
    """[V] float64 probabilities of transformers' processed logits."""
    processed = torch.from_numpy(transformers_processed(torch_logits[None], sampler)[0])
    return processed.double().softmax(-1).numpy()


@pytest.mark.parametrize("sampler", OPTION_SETS, ids=str)
def test_first_token_distribution_matches_transformers(next_token_logits, sampler):
    ours, torch_logits, prompt_len = next_token_logits
    counts = first_token_counts(sampler, ours, prompt_len)
    assert fit_p_value(counts, transformers_probs(torch_logits, sampler)) > P_THRESHOLD


@pytest.mark.parametrize("sampler", [OPTION_SETS[0], OPTION_SETS[2]], ids=str)
def test_chi_square_rejects_temperature_applied_twice(next_token_logits, sampler):
    ours, torch_logits, prompt_len = next_token_logits
    planted_bug = Sampler(sampler.temperature**2, sampler.top_k, sampler.top_p)
    counts = first_token_counts(planted_bug, ours, prompt_len)
    assert fit_p_value(counts, transformers_probs(torch_logits, sampler)) < P_THRESHOLD


def tied_logits(rows: int, vocab: int, seed: int) -> np.ndarray:
    """[rows, vocab] float32 logits on a grid of step 0.5, so most values are tied with others."""
    return (np.round(np.random.RandomState(seed).randn(rows, vocab) * 4) / 2).astype(np.float32)


@pytest.mark.parametrize(
    "sampler, logits",
    [
        *[(sampler, tied_logits(64, 320, seed=0)) for sampler in OPTION_SETS],
        (Sampler(0.8, top_k=10, top_p=0.5), tied_logits(64, 320, seed=0)),
        (Sampler(0.5, top_k=1), tied_logits(64, 320, seed=0)),
        (Sampler(1.0, top_p=1e-9), tied_logits(64, 320, seed=0)),  # only the min_tokens_to_keep token
        (Sampler(1.0, top_p=0.75), np.zeros((1, 4), np.float32)),  # a cumulative sum exactly at 1 - top_p
    ],
    ids=lambda option: str(option) if isinstance(option, Sampler) else "",
)
def test_processed_logits_match_transformers_warpers(sampler, logits):
    ours = np.asarray(sampler.processed_logits(jnp.asarray(logits)))
    expected = transformers_processed(logits, sampler)
    kept, expected_kept = np.isfinite(ours), np.isfinite(expected)
    # Among tokens tied exactly at the top-p cut, which ones transformers keeps follows torch's unstable
    # sort (implementation-defined); we keep as many, dropping lower ids first. Every other token agrees.
    boundary = np.where(expected_kept, logits, np.inf).min(axis=-1, keepdims=True)  # [R, 1]
    away_from_cut = logits != boundary
    np.testing.assert_array_equal(kept[away_from_cut], expected_kept[away_from_cut])
    np.testing.assert_array_equal(kept.sum(-1), expected_kept.sum(-1))
    assert (ours[~kept] == -np.inf).all()
    # Kept values: ours multiplies by 1/T in float32, transformers divides; they differ by at most 1 ulp.
    np.testing.assert_array_max_ulp(ours[kept & expected_kept], expected[kept & expected_kept], maxulp=1)


@pytest.mark.parametrize("sampler", [Sampler(), Sampler(0.0, top_k=3, top_p=0.5)], ids=str)
def test_temperature_zero_is_argmax(sampler):
    logits = jnp.asarray(tied_logits(3 * 5, 320, seed=1).reshape(3, 5, 320))
    positions = jnp.arange(15, dtype=jnp.int32).reshape(3, 5)
    chosen = sampler.choose(logits, positions, streams_for(9, np.arange(3)))
    assert chosen.dtype == jnp.int32
    np.testing.assert_array_equal(chosen, jnp.argmax(logits, axis=-1))


def test_draw_depends_only_on_seed_stream_position_and_logits():
    sampler = Sampler(temperature=1.0, top_p=0.95)
    logits = np.random.RandomState(2).randn(4, 3, 320).astype(np.float32)  # [B, T, V]
    positions = np.array([[7, 8, 9], [4, 5, 6], [7, 8, 9], [0, 1, 2]], np.int32)
    streams = streams_for(3, [5, 2, 0, 11])
    together = np.asarray(jax.jit(sampler.choose)(logits, positions, streams))
    for b in range(4):
        for t in range(3):
            alone = sampler.choose(
                logits[b : b + 1, t : t + 1], positions[b : b + 1, t : t + 1], streams[b : b + 1]
            )
            assert alone[0, 0] == together[b, t]
    # Another batch: reversed slots, one padding row, only the first two positions.
    slots = [3, 2, 1, 0, 0]
    pad_stream = np.concatenate([streams[slots[:4]], streams_for(3, [99])])
    other = sampler.choose(logits[slots, :2], positions[slots, :2], pad_stream)
    np.testing.assert_array_equal(np.asarray(other)[:4], together[slots[:4], :2])
    # The noise does vary with the stream and the position: equal logits, different keys, different draws.
    flat = np.broadcast_to(np.zeros(320, np.float32), (64, 1, 320))
    by_stream = sampler.choose(flat, np.zeros((64, 1), np.int32), streams_for(3, np.arange(64)))
    by_seed = sampler.choose(
        flat, np.zeros((64, 1), np.int32), np.stack([np.arange(64), np.zeros(64)], -1).astype(np.int32)
    )
    by_position = sampler.choose(flat, np.arange(64, dtype=np.int32)[:, None], streams_for(3, np.zeros(64)))
    assert min(len(np.unique(x)) for x in (by_stream, by_seed, by_position)) > 40


@pytest.mark.parametrize(
    "options, message",
    [
        (dict(temperature=-0.1), "temperature must be a finite number >= 0, got -0.1"),
        (dict(top_p=0.0), "top_p must be in (0, 1], got 0.0"),
        (dict(top_p=1.5), "top_p must be in (0, 1], got 1.5"),
        (dict(top_k=-1), "top_k must be >= 0, got -1"),
    ],
)
def test_bad_options_raise_one_line_config_errors(options, message):
    with pytest.raises(ConfigError) as error:
        Sampler(**options)
    assert str(error.value) == message


def test_sampler_is_hashable_and_greedy_by_default():
    assert Sampler().is_greedy and not Sampler(temperature=0.5).is_greedy
    assert hash(Sampler(0.7, 5, 0.9)) == hash(Sampler(0.7, 5, 0.9))
