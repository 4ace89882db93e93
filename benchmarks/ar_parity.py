"""Checks decode.py's AR output against transformers' greedy `generate` on a real checkpoint.

  python decode.py --model DIR --mode ar --chat --prompts P.jsonl --max-new-tokens 32 --output AR.jsonl
  python benchmarks/ar_parity.py DIR AR.jsonl

For each record: are decode.py's output ids those of `generate(do_sample=False)`, and how far apart
are our float32 logits and PyTorch's over the prompt plus the generated tokens (max |diff|).
"""

from __future__ import annotations

import argparse
import json

import jax.numpy as jnp
import numpy as np
import torch
from transformers import LlamaForCausalLM

from bita_jax.io import hf
from bita_jax.models.llama import LlamaModel, causal_mask, forward


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model_dir")
    parser.add_argument("records", help="decode.py --output jsonl (float32, --mode ar)")
    args = parser.parse_args()
    config = hf.load_config(args.model_dir, dtype="float32", scan_layers=False)
    params = hf.load_params(args.model_dir, config)
    model = LlamaModel(config)
    reference = LlamaForCausalLM.from_pretrained(args.model_dir, dtype=torch.float32).eval()
    same = 0
    with open(args.records) as f:
        records = [json.loads(line) for line in f]
    for r in records:
        prompt = torch.tensor([r["prompt_ids"]])
        with torch.no_grad():
            out = reference.generate(prompt, max_new_tokens=len(r["output_ids"]), do_sample=False)
        hf_ids = out[0, prompt.shape[1] :].tolist()
        seq = r["prompt_ids"] + r["output_ids"]
        tokens = jnp.asarray([seq], jnp.int32)
        positions = jnp.arange(len(seq), dtype=jnp.int32)[None]
        hidden, _ = forward(model, params, tokens, positions, causal_mask(1, len(seq)))
        ours = np.asarray(model.apply({"params": params}, hidden, method="logits"))[0]
        with torch.no_grad():
            theirs = reference(torch.tensor([seq])).logits[0].numpy()
        equal = hf_ids == r["output_ids"]
        print(
            f"{r['prompt'][:40]!r:44} tokens={len(r['output_ids']):3d} equal_to_hf={equal} "
            f"max|logit diff|={np.abs(ours - theirs).max():.2e}"
        )
        same += equal
    print(f"{same}/{len(records)} outputs identical to transformers' greedy generate")


if __name__ == "__main__":
    main()
