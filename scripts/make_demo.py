"""Builds the packaged demo: a small LLaMA trained on the Python standard library, and its BiTA adapter.

  python scripts/make_demo.py                       # everything, into bita_jax/demo/
  python scripts/make_demo.py --work /tmp/demo --pretrain-steps 50 --adapter-steps 20   # a quick try

Stages (each writes under --work and is skipped when its output is already there, so an
interrupted run continues; --force redoes them all):
  1. corpus: the .py sources of the running Python's standard library (found through `sysconfig`),
     minus tests, tool GUIs and generated tables; the modules in HELD_OUT are kept for evaluation.
  2. tokenizer: byte-level BPE trained with `tokenizers` on the training modules, saved as a
     `transformers.PreTrainedTokenizerFast` (BOS prepended, like LLaMA's).
  3. base model: a small GQA LLaMA pretrained from scratch with `bita_jax.pretrain`, saved in
     Hugging Face format and checked against `transformers.LlamaForCausalLM` (logits must agree).
  4. prompts: function signatures with their docstrings and file openings, cut from the training
     modules (self-distillation) and from the held-out modules (evaluation).
  5. self-distillation with `decode.py --mode ar`, then the adapter with `train.py`.
  6. the model, tokenizer, adapter and held-out prompts are copied into --out (package data);
     the first --demo-prompts of them are what `python decode.py` (no arguments) completes.
  7. the tree tuner (`python -m bita_jax.tune`) calibrates on the other held-out prompts and
     writes the adapter's trees.json (statistics and this machine's choice, batch 1 and 4);
     `--tune-only` redoes just this stage on the packaged demo.
Everything is seeded; the same Python version and library versions reproduce the same files.
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import random
import shutil
import subprocess
import sys
import sysconfig
import textwrap

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from bita_jax.cli import UserError, run_main  # noqa: E402

# Held out of tokenizer training, pretraining and distillation; the evaluation prompts come from
# these. All exist (with these names) in every CPython from 3.8 to 3.13.
HELD_OUT = ("bisect", "colorsys", "fnmatch", "fractions", "heapq", "sched", "shlex", "textwrap")
# Directories of the stdlib that are not library code worth learning (tests, GUIs, demos,
# generated codec tables, vendored packages) or hold huge generated text.
SKIP_DIRS = {
    "test",
    "tests",
    "idle_test",
    "idlelib",
    "turtledemo",
    "site-packages",
    "dist-packages",
    "ensurepip",
    "encodings",
    "pydoc_data",
    "lib-dynload",
    "__pycache__",
    "tkinter",
    "lib2to3",
}
MAX_FILE_BYTES = 200_000  # skips a few generated or vendored giants (e.g. _pydecimal.py)
SPECIALS = ["<unk>", "<s>", "</s>", "<pad>"]  # ids 0..3
MAX_PROMPT_TOKENS = 96
UNTIL = ("base", "prompts", "adapter", "package")


def module_name(root: str, path: str) -> str:
    rel = os.path.relpath(path, root)[: -len(".py")]
    return rel.replace(os.sep, ".").removesuffix(".__init__")


def collect_corpus(stdlib: str) -> dict[str, str]:
    """{dotted module name: source} of the stdlib's Python files, sorted by name."""
    sources = {}
    for dirpath, dirnames, filenames in os.walk(stdlib):
        dirnames[:] = sorted(d for d in dirnames if d not in SKIP_DIRS and not d.startswith("config-"))
        for name in sorted(filenames):
            path = os.path.join(dirpath, name)
            if not name.endswith(".py") or os.path.getsize(path) > MAX_FILE_BYTES:
                continue
            try:
                with open(path, encoding="utf-8") as f:
                    sources[module_name(stdlib, path)] = f.read()
            except UnicodeDecodeError:
                continue
    return dict(sorted(sources.items()))


def split_corpus(sources: dict[str, str]) -> tuple[dict[str, str], dict[str, str]]:
    held = {m: s for m, s in sources.items() if m.split(".")[0] in HELD_OUT}
    missing = sorted(set(HELD_OUT) - {m.split(".")[0] for m in held})
    if missing:
        print(f"note: held-out modules missing from this Python: {missing}", file=sys.stderr)
    if not held:
        raise UserError("none of the held-out modules exist in this Python's standard library")
    return {m: s for m, s in sources.items() if m not in held}, held


# ---------------------------------------------------------------------------------------------
# Tokenizer


def train_tokenizer(texts: list[str], vocab_size: int, out_dir: str):
    """Byte-level BPE (no unknown bytes), saved so `AutoTokenizer.from_pretrained(out_dir)` loads it."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", SPECIALS.index("<s>"))]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        clean_up_tokenization_spaces=False,  # code: keep every space as generated
    )
    fast.save_pretrained(out_dir)
    return fast


# ---------------------------------------------------------------------------------------------
# Base model


def model_config(args, vocab_size: int):
    from bita_jax.config import ModelConfig

    return ModelConfig(
        vocab_size=vocab_size,
        hidden_size=args.hidden_size,
        intermediate_size=args.intermediate_size,
        num_layers=args.num_layers,
        num_heads=args.num_heads,
        num_kv_heads=args.num_kv_heads,
        head_dim=args.hidden_size // args.num_heads,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        rope_scaling=None,
        # The model is trained on windows of seq_len tokens only; positions beyond are unreliable.
        max_position_embeddings=args.seq_len,
        tie_word_embeddings=True,
        bos_token_id=SPECIALS.index("<s>"),
        eos_token_ids=(SPECIALS.index("</s>"),),
        pad_token_id=SPECIALS.index("<pad>"),
    )


def pretrain_base(args, tokenizer, train: dict[str, str], held: dict[str, str], out_dir: str) -> dict:
    """Pretrains the base model, saves it in HF format (with the tokenizer) and returns its metrics."""
    import jax

    from bita_jax.config import OptimizerConfig
    from bita_jax.io import hf
    from bita_jax.models.llama import init_params
    from bita_jax.training import pretrain

    eos = SPECIALS.index("</s>")
    encode = lambda texts: [e.ids for e in tokenizer.backend_tokenizer.encode_batch(texts)]  # noqa: E731
    windows = pretrain.pack_documents(encode(list(train.values())), args.seq_len, eos)
    eval_windows = pretrain.pack_documents(encode(list(held.values())), args.seq_len, eos)
    eval_windows = eval_windows[: 4 * args.batch_size]
    print(
        f"corpus: {len(train)} training modules -> {windows.size:,} tokens in {len(windows)} windows; "
        f"{len(held)} held-out modules -> {len(eval_windows)} eval windows",
        file=sys.stderr,
    )
    config = model_config(args, len(tokenizer))
    params = init_params(config, jax.random.key(args.seed))
    print(f"model: {sum(p.size for p in jax.tree.leaves(params)):,} params", file=sys.stderr)
    params, history = pretrain.pretrain(
        config,
        params,
        windows,
        steps=args.pretrain_steps,
        batch_size=args.batch_size,
        optimizer_config=OptimizerConfig(
            learning_rate=args.learning_rate,
            warmup_steps=max(1, args.pretrain_steps // 10),
            weight_decay=0.1,
            b2=0.95,
        ),
        seed=args.seed,
        eval_windows=eval_windows,
        metrics_path=os.path.join(args.work, "pretrain_metrics.jsonl"),
    )
    hf.save_params(params, config, out_dir)
    tokenizer.save_pretrained(out_dir)
    check_against_transformers(out_dir, config, params, list(held.values())[0])
    return {
        "params": int(sum(p.size for p in jax.tree.leaves(params))),
        "train_tokens": int(windows.size),
        "tokens_seen": int(args.pretrain_steps * args.batch_size * args.seq_len),
        **{f"final_{k}": v for k, v in history[-1].items()},
        "first_loss": history[0]["loss"],
    }


def check_against_transformers(model_dir: str, config, params, text: str) -> None:
    """Loads the saved model in PyTorch transformers and compares logits with ours (float32)."""
    try:
        import torch
        from transformers import AutoTokenizer, LlamaForCausalLM
    except ImportError:
        print("note: torch is not installed; skipped the transformers logit check", file=sys.stderr)
        return
    from bita_jax.models.llama import LlamaModel, causal_mask, forward

    ids = AutoTokenizer.from_pretrained(model_dir)(text[:400])["input_ids"]
    hf = LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        theirs = hf(torch.tensor([ids])).logits[0].numpy()
    model = LlamaModel(config)
    tokens = np.asarray([ids], np.int32)
    hidden, _ = forward(model, params, tokens, np.arange(len(ids))[None], causal_mask(1, len(ids)))
    ours = np.asarray(model.apply({"params": params}, hidden, method="logits"))[0]
    diff = float(np.abs(ours - theirs).max())
    print(f"transformers check: max |logit difference| {diff:.2e} over {len(ids)} tokens", file=sys.stderr)
    if diff > 1e-4:
        raise RuntimeError(f"saved model disagrees with transformers (max logit difference {diff})")


# ---------------------------------------------------------------------------------------------
# Prompts


def function_prompts(source: str) -> list[str]:
    """`def` line through the end of the docstring, dedented, for every documented function."""
    try:
        tree = ast.parse(source)
    except SyntaxError:
        return []
    lines = source.splitlines()
    prompts = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and ast.get_docstring(node):
            text = "\n".join(lines[node.lineno - 1 : node.body[0].end_lineno])
            prompts.append(textwrap.dedent(text))
    return prompts


def file_opening(source: str, min_chars: int = 240) -> str:
    """The first lines of a module, cut at a line end once min_chars are reached."""
    out = []
    for line in source.splitlines():
        out.append(line)
        if sum(len(x) + 1 for x in out) >= min_chars:
            break
    return "\n".join(out)


def cut_prompts(sources: dict[str, str], tokenizer, limit: int, seed: int) -> list[dict]:
    """Up to `limit` distinct prompts of 8..MAX_PROMPT_TOKENS tokens, in a seeded order.

    A prompt ends at the end of a line, without the newline, so the model writes the next line's
    break and indentation itself, as in the code it was trained on.
    """
    candidates = []
    for module, source in sources.items():
        cuts = [("opening", file_opening(source))] + [("function", p) for p in function_prompts(source)]
        candidates += [{"prompt": text.rstrip(), "module": module, "kind": kind} for kind, text in cuts]
    seen, prompts = set(), []
    random.Random(seed).shuffle(candidates)
    for c in candidates:
        n = len(tokenizer(c["prompt"])["input_ids"])
        if c["prompt"] not in seen and 8 <= n <= MAX_PROMPT_TOKENS:
            seen.add(c["prompt"])
            prompts.append(c)
        if len(prompts) == limit:
            break
    return prompts


def write_jsonl(rows: list[dict], path: str) -> None:
    with open(path, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


# ---------------------------------------------------------------------------------------------
# Self-distillation and adapter training (through the CLIs, exactly as a user runs them)


def run_cli(argv: list[str]) -> None:
    print("+ " + " ".join(argv), file=sys.stderr)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [REPO, os.environ.get("PYTHONPATH")]))}
    subprocess.run([sys.executable, *argv], cwd=REPO, env=env, check=True)


def distill_and_train(args, model_dir: str, prompts_file: str) -> str:
    data = os.path.join(args.work, "distill.jsonl")
    if args.force or not os.path.exists(data):
        run_cli([
            "decode.py", "--model", model_dir, "--mode", "ar", "--prompts", prompts_file,
            "--max-new-tokens", str(args.max_new_tokens), "--batch-size", "32", "--output", data,
        ])  # fmt: skip
    run_dir = os.path.join(args.work, "adapter_run")
    if args.force and os.path.isdir(run_dir):
        shutil.rmtree(run_dir)
    run_cli([
        "train.py", "--model", model_dir, "--data", data, "--output", run_dir,
        "--steps", str(args.adapter_steps), "--batch-size", str(args.adapter_batch_size),
        "--set", f"bita.num_prompt_tokens={args.prompt_tokens}",
        "--set", f"bita.num_mask_tokens={args.mask_tokens}", "--set", f"seed={args.seed}",
        "--set", f"data.max_length={args.seq_len}",
        # One padded length holds every sequence (prompt + completion + 64 mask groups): one compile.
        "--set", f"data.seq_buckets=[{args.seq_len + 64 * args.mask_tokens}]",
        "--set", f"optimizer.learning_rate={args.adapter_learning_rate}",
    ])  # fmt: skip
    return os.path.join(run_dir, "adapter")


# ---------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", default=os.path.join(REPO, "build", "demo_work"), help="intermediate files")
    p.add_argument("--out", default=os.path.join(REPO, "bita_jax", "demo"), help="package data directory")
    p.add_argument("--force", action="store_true", help="redo every stage")
    p.add_argument("--until", choices=UNTIL, default="package", help="stop after this stage")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--vocab-size", type=int, default=2048)
    p.add_argument("--hidden-size", type=int, default=192)
    p.add_argument("--intermediate-size", type=int, default=512)
    p.add_argument("--num-layers", type=int, default=4)
    p.add_argument("--num-heads", type=int, default=6)
    p.add_argument("--num-kv-heads", type=int, default=2)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--pretrain-steps", type=int, default=300)
    p.add_argument("--learning-rate", type=float, default=3e-3)
    p.add_argument("--distill-prompts", type=int, default=2000)
    p.add_argument("--eval-prompts", type=int, default=40)
    p.add_argument("--demo-prompts", type=int, default=6, help="how many `python decode.py` completes")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--prompt-tokens", type=int, default=16, help="BiTA P")
    p.add_argument("--mask-tokens", type=int, default=3, help="BiTA M")
    p.add_argument("--adapter-steps", type=int, default=400)
    p.add_argument("--adapter-batch-size", type=int, default=8)
    p.add_argument("--adapter-learning-rate", type=float, default=3e-2)
    p.add_argument("--tune-only", action="store_true", help="only stage 7 on the packaged demo in --out")
    return p


def tune_demo(args) -> None:
    """Stage 7: trees.json of the packaged adapter, calibrated on the held-out prompts that are not
    demo prompts (so the demo's measured tokens per step checks the prediction on unseen prompts)."""
    from bita_jax.demo import calibration_prompts

    calibration = os.path.join(args.work, "calibration_prompts.jsonl")
    os.makedirs(args.work, exist_ok=True)
    write_jsonl([{"prompt": p} for p in calibration_prompts(args.out)], calibration)
    run_cli([
        "-m", "bita_jax.tune", "--model", os.path.join(args.out, "model"),
        "--adapter", os.path.join(args.out, "adapter"), "--data", calibration, "--batch-sizes", "1,4",
        "--max-new-tokens", str(args.max_new_tokens), "--output-dir", os.path.join(args.work, "tune"),
    ])  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if args.tune_only:
        tune_demo(args)
        return 0
    os.makedirs(args.work, exist_ok=True)
    stdlib = sysconfig.get_paths()["stdlib"]
    train, held = split_corpus(collect_corpus(stdlib))
    recipe = {
        "python": sys.version.split()[0],  # whose stdlib it is (its path would name this machine)
        "held_out_modules": sorted(held),
        "training_modules": len(train),
        "args": {k: v for k, v in vars(args).items() if k not in ("work", "out", "force")},
    }

    model_dir = os.path.join(args.work, "model")
    if args.force or not os.path.exists(os.path.join(model_dir, "model.safetensors")):
        tokenizer = train_tokenizer(list(train.values()), args.vocab_size, model_dir)
        recipe["pretrain"] = pretrain_base(args, tokenizer, train, held, model_dir)
        with open(os.path.join(args.work, "pretrain.json"), "w") as f:
            json.dump(recipe["pretrain"], f, indent=2)
    else:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        with open(os.path.join(args.work, "pretrain.json")) as f:
            recipe["pretrain"] = json.load(f)

    if args.until == "base":
        return 0
    distill_file = os.path.join(args.work, "distill_prompts.jsonl")
    eval_file = os.path.join(args.work, "eval_prompts.jsonl")
    write_jsonl(cut_prompts(train, tokenizer, args.distill_prompts, args.seed), distill_file)
    write_jsonl(cut_prompts(held, tokenizer, args.eval_prompts, args.seed), eval_file)

    if args.until == "prompts":
        return 0
    adapter_dir = distill_and_train(args, model_dir, distill_file)
    if args.until == "adapter":
        return 0

    for name, src in (("model", model_dir), ("adapter", adapter_dir)):
        shutil.rmtree(os.path.join(args.out, name), ignore_errors=True)
        shutil.copytree(src, os.path.join(args.out, name))
    shutil.copy(eval_file, os.path.join(args.out, "prompts.jsonl"))
    with open(eval_file) as f:
        demo_prompts = [json.loads(line) for line in f.read().splitlines()[: args.demo_prompts]]
    write_jsonl(demo_prompts, os.path.join(args.out, "demo_prompts.jsonl"))
    with open(os.path.join(os.path.dirname(adapter_dir), "metrics.jsonl")) as f:
        recipe["adapter_training"] = json.loads(f.read().splitlines()[-1])
    with open(os.path.join(args.out, "recipe.json"), "w") as f:
        json.dump(recipe, f, indent=2)
    tune_demo(args)
    files = [os.path.join(d, n) for d, _, names in os.walk(args.out) for n in names]
    for path in files:
        os.chmod(path, 0o644)  # safetensors writes 0600; installed package data must be readable
    size = sum(os.path.getsize(p) for p in files)
    print(f"demo written to {args.out} ({size / 2**20:.1f} MiB)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
