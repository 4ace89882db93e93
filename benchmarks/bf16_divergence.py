"""Experiment: where bfloat16 BiTA output leaves AR output on a real model (random adapter).

  python benchmarks/bf16_divergence.py --model /work/models/smollm2-bf16 --num-prompts 16 \
      --max-new-tokens 64 --trees chain,upper:2,upper:5

BiTA's committed tokens must equal AR's for any adapter, so a random one serves. Prints, per tree,
how many outputs differ and where they first diverge; then, at the first divergence, a layer-by-
layer comparison of the pending token's row in the tree step against the AR step's single row,
both fed the same AR-built cache; then, for each precision candidate, whether those rows are
bitwise equal over many steps and what AR decoding costs in tokens/s (the exact precision policy
is one candidate).
"""

from __future__ import annotations

import argparse
import functools

import jax
import jax.numpy as jnp
import numpy as np

from bita_jax.bita import adapter as bita_adapter
from bita_jax.bita.tree import parse_tree
from bita_jax.io.prompts import read_prompts
from bita_jax.config import BiTAConfig, decoding_dtypes
from bita_jax.decoding import loop, runner
from bita_jax.decoding.cache import KVCache
from bita_jax.decoding.sampling import GREEDY, streams_for
from bita_jax.decoding.tree_step import step_inputs
from bita_jax.io import hf
from bita_jax.models.llama import LlamaModel

BITA = BiTAConfig(num_prompt_tokens=16, num_mask_tokens=3)
# Intermediate order within a layer (flax module names in bita_jax/models/llama.py).
MODULE_ORDER = ("input_layernorm", "self_attn", "post_attention_layernorm", "mlp", "__call__")


def generate(config, params, adapter, prompt_ids, max_new, tree=None) -> tuple[list[list[int]], float]:
    """Greedy outputs one prompt at a time, and tokens/s excluding compiles."""
    fn = (
        loop.make_ar_generate(config, max_new)
        if tree is None
        else loop.make_bita_generate(config, tree, max_new)
    )
    weights = params if tree is None else (params, adapter)
    gens, seconds = runner.generate(runner.CompiledByShape(fn), weights, prompt_ids, 1, config.pad_id)
    return [g.output_ids for g in gens], sum(len(g.output_ids) for g in gens) / seconds


def first_divergence(a: list[int], b: list[int]) -> int | None:
    for i, (x, y) in enumerate(zip(a, b, strict=False)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def ar_cache(model, params, prompt: list[int], generated: list[int], max_len: int):
    """The AR path's cache after prefill and len(generated) AR steps, and the pending token."""
    tokens = jnp.asarray([prompt], jnp.int32)
    cache = loop.prefill(
        model, params, tokens, jnp.asarray([len(prompt)]), KVCache.init(model.config, 1, max_len)
    )
    pending = jnp.asarray([prompt[-1]], jnp.int32)
    step = jax.jit(functools.partial(loop.ar_step, model, GREEDY))
    for token in generated:
        _, cache = step(params, cache, pending, streams_for(0, np.zeros(1, np.int32)))
        pending = jnp.asarray([token], jnp.int32)
    return cache, pending


@functools.cache
def forward_with_intermediates(model: LlamaModel):
    """Jitted forward returning (intermediates, row-0 logits); params and cache are arguments."""

    def run(params, cache, tokens, positions, self_mask, adapter, prefix_visible):
        if adapter is None:
            embeds, extra = model.apply({"params": params}, tokens, method="embed"), {}
        else:
            embeds = bita_adapter.embed(model, params, tokens, adapter)
            extra = {"prefix": bita_adapter.prefix(adapter), "prefix_visible": prefix_visible}
        (hidden, _), state = model.apply(
            {"params": params},
            embeds,
            positions,
            self_mask,
            **cache.model_inputs(tokens.shape[1]),
            **extra,
            capture_intermediates=True,
            mutable=["intermediates"],
        )
        logits = model.apply({"params": params}, hidden[:, 0], method="logits")
        return state["intermediates"], logits[0]

    return jax.jit(run)


def row_intermediates(model, params, adapter, tree, cache, pending, drafts):
    """{name: row-0 array} for the AR step (one row) and the tree step (all rows), same cache."""
    run = forward_with_intermediates(model)
    ar = run(params, cache, pending[:, None], cache.length[:, None], jnp.ones((1, 1, 1), bool), None, None)
    tokens, positions, self_mask, visible = step_inputs(
        tree, model.config.vocab_size, cache.length, pending, drafts
    )
    tr = run(params, cache, tokens, positions, self_mask, adapter, visible)
    return ar, tr


def flat_rows(intermediates, num_layers: int) -> list[tuple[str, np.ndarray]]:
    """(name, row 0 as float32) in forward order: per layer norm1, attn out, k, v, norm2, mlp, block."""
    out = []
    for i in range(num_layers):
        layer = intermediates[f"layers_{i}"]
        for module in MODULE_ORDER:
            value = layer[module]["__call__"][0] if module != "__call__" else layer["__call__"][0]
            if module in ("self_attn", "__call__"):
                y, (k, v) = value
                names = ("attn_out", "k", "v") if module == "self_attn" else ("block_out",)
                values = (y, k, v) if module == "self_attn" else (y,)
            else:
                names, values = (module,), (value,)
            for name, x in zip(names, values, strict=True):
                out.append((f"L{i}.{name}", np.asarray(x[0, 0], np.float32)))
    out.append(("final_norm", np.asarray(intermediates["norm"]["__call__"][0][0, 0], np.float32)))
    return out


def compare_rows(ar, tr, num_layers: int) -> list[tuple[str, float]]:
    """(name, max |diff|) for every intermediate, AR row vs the tree step's pending row."""
    rows_ar, rows_tr = flat_rows(ar, num_layers), flat_rows(tr, num_layers)
    return [(n, float(np.abs(a - b).max())) for (n, a), (_, b) in zip(rows_ar, rows_tr, strict=True)]


def top2(logits) -> tuple[int, int, float]:
    x = np.asarray(logits, np.float32)
    i1, i2 = np.argsort(-x)[:2]
    return int(i1), int(i2), float(x[i1] - x[i2])


def random_drafts(rng, tree, vocab):
    return jnp.asarray(rng.integers(3, vocab, (1, tree.depth, tree.draft_width)), jnp.int32)


def diagnose_divergence(model, params, adapter, tree, prompt, ar_out, bita_out, d, max_len):
    """Prints the pending row's first differing op at the divergence step (same AR cache)."""
    cache, pending = ar_cache(model, params, prompt, ar_out[:d], max_len)
    drafts = random_drafts(np.random.default_rng(0), tree, model.config.vocab_size)
    (ar_int, ar_logits), (tr_int, tr_logits) = row_intermediates(
        model, params, adapter, tree, cache, pending, drafts
    )
    diffs = compare_rows(ar_int, tr_int, model.config.num_layers)
    first = next(((n, x) for n, x in diffs if x > 0), None)
    print(f"  divergence at new token {d}: AR {ar_out[d]} vs BiTA {bita_out[d]}")
    a1, a2, agap = top2(ar_logits)
    t1, t2, tgap = top2(tr_logits)
    print(f"  same cache: AR top-2 ({a1}, {a2}) gap {agap:.4f}; tree row top-2 ({t1}, {t2}) gap {tgap:.4f}")
    gap = np.abs(np.asarray(ar_logits) - np.asarray(tr_logits)).max()
    print(f"  max |logit diff| AR row vs tree row: {gap:.4f}")
    print(f"  first differing intermediate: {first}")
    for name, x in diffs:
        if name.startswith(("L0.", "L1.", "L29.")) or name == "final_norm":
            print(f"    {name:24s} max|diff| {x:.3e}")
    return first


def row_equality(model, params, adapter, tree, prompts, steps, max_len) -> tuple[int, int]:
    """(steps whose pending row is bitwise equal in every intermediate, steps checked)."""
    equal = total = 0
    rng = np.random.default_rng(1)
    ar = jax.jit(functools.partial(loop.ar_step, model, GREEDY))
    for prompt in prompts:
        cache, pending = ar_cache(model, params, prompt, [], max_len)
        for _ in range(steps):
            (ai, _), (ti, _) = row_intermediates(
                model,
                params,
                adapter,
                tree,
                cache,
                pending,
                random_drafts(rng, tree, model.config.vocab_size),
            )
            equal += all(x == 0 for _, x in compare_rows(ai, ti, model.config.num_layers))
            total += 1
            pending, cache = ar(params, cache, pending, streams_for(0, np.zeros(1, np.int32)))
    return equal, total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--prompts", default="benchmarks/chat_prompts.jsonl")
    parser.add_argument("--num-prompts", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--trees", default="chain,upper:2,upper:5")
    parser.add_argument("--row-steps", type=int, default=8, help="steps per prompt for the row check")
    parser.add_argument("--skip-generation", action="store_true")
    args = parser.parse_args()

    tokenizer = hf.load_tokenizer(args.model)
    texts = read_prompts(args.prompts)[: args.num_prompts]
    prompt_ids = hf.encode_prompts(tokenizer, texts, chat=True)
    config = hf.load_config(args.model, **decoding_dtypes("bfloat16", "fast"), scan_layers=False)
    params = hf.load_params(args.model, config)
    adapter = bita_adapter.init_adapter(config, BITA, jax.random.key(0))
    model = LlamaModel(config)
    trees = {spec: parse_tree(spec, BITA.num_mask_tokens) for spec in args.trees.split(",")}
    max_len = loop.cache_length(runner.prompt_bucket(max(map(len, prompt_ids))), args.max_new_tokens, 64)

    if not args.skip_generation:
        ar_out, ar_tps = generate(config, params, adapter, prompt_ids, args.max_new_tokens)
        print(f"AR bf16: {ar_tps:.1f} tokens/s")
        for spec, tree in trees.items():
            outs, tps = generate(config, params, adapter, prompt_ids, args.max_new_tokens, tree)
            where = [first_divergence(a, b) for a, b in zip(ar_out, outs, strict=True)]
            differ = [i for i, d in enumerate(where) if d is not None]
            print(
                f"tree {spec} ({tree.num_rows} rows/step): {len(differ)}/{len(outs)} outputs differ "
                f"from AR; first divergence at new token {[where[i] for i in differ]} ({tps:.1f} tok/s)"
            )
            if differ and spec == args.trees.split(",")[-1]:
                i = differ[0]
                print(f" prompt {i} {texts[i]!r}:")
                diagnose_divergence(
                    model, params, adapter, tree, prompt_ids[i], ar_out[i], outs[i], where[i], max_len
                )

    tree = list(trees.values())[-1]
    row_prompts = prompt_ids[:4]
    f32 = hf.load_config(args.model, dtype="float32", scan_layers=False)
    candidates = {
        "bf16 (precision fast)": (config, params),
        "bf16 weights, f32 compute and cache (exact)": (
            hf.load_config(args.model, **decoding_dtypes("bfloat16", "exact"), scan_layers=False),
            params,
        ),
        "f32 (bf16-rounded weights upcast)": (f32, jax.tree.map(lambda x: x.astype(jnp.float32), params)),
    }
    print(f"row check: tree step {tree.num_rows} rows vs AR 1 row, same cache, {len(row_prompts)} prompts")
    for name, (cfg, weights) in candidates.items():
        m = LlamaModel(cfg)
        weights = jax.device_put(weights)
        equal, total = row_equality(m, weights, adapter, tree, row_prompts, args.row_steps, max_len)
        _, tps = generate(cfg, weights, adapter, row_prompts, args.max_new_tokens)
        print(f"  {name:40s} rows bitwise equal in {equal}/{total} steps; AR {tps:.1f} tokens/s")


if __name__ == "__main__":
    main()
