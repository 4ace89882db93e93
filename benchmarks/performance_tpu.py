"""Tables for docs/performance-tpu.md from `python -m bita_jax.aot --json` outputs (before/after a change).

  python benchmarks/performance_tpu.py --runs after=a.jsonl,before=b.jsonl \
      [--json benchmarks/performance_tpu.json --machine "..." --command "..."]

Per run, cache length and batch: every compiled step's per-chip memory, bytes accessed and flops,
the tree step's bytes over the AR step's, and the roofline projection (`bita_jax.cli.aot.projection`:
a projection from the TPU compile's bytes and flops and the chip's published figures, not a
measurement).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bita_jax.cli.aot import BANDWIDTH_EFFICIENCY, FLOPS_EFFICIENCY, projection  # noqa: E402

GIB = 2**30


def versions() -> str:
    """jax's and libtpu's versions where installed, without importing jax."""
    from importlib import metadata

    found = []
    for name in ("jax", "libtpu"):
        try:
            found.append(f"{name} {metadata.version(name)}")
        except metadata.PackageNotFoundError:
            pass
    return ", ".join(found)


def load(path: str) -> list[dict]:
    with open(path) as f:
        return [r for r in map(json.loads, f) if not r.get("projection")]


def table(runs: dict[str, list[dict]]) -> str:
    lines = [
        "| run | cache | batch | step | tree | rows | args GiB | temp GiB | out GiB | aliased GiB "
        "| accessed GiB | GFLOP | bytes / AR | projected ms | time / AR |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, records in runs.items():
        for cache in sorted({r["cache"] for r in records}):
            chosen = [r for r in records if r["cache"] == cache]
            projected = {(p["step"], p["tree"], p["batch"]): p for p in projection(chosen)}
            for r in sorted(chosen, key=lambda r: (r["batch"], r["rows"])):
                p = projected.get((r["step"], r["tree"], r["batch"]), {})
                if not r["fits"]:
                    lines.append(f"| {name} | {cache} | {r['batch']} | {r['step']} | {r['tree'] or ''} | "
                                 f"{r['rows']} | does not fit: {r['error']} |||||||||")  # fmt: skip
                    continue
                lines.append(
                    f"| {name} | {cache} | {r['batch']} | {r['step']} | {r['tree'] or ''} | {r['rows']} | "
                    f"{r['argument_bytes'] / GIB:.2f} | {r['temp_bytes'] / GIB:.2f} | "
                    f"{r['output_bytes'] / GIB:.2f} | {r['alias_bytes'] / GIB:.2f} | "
                    f"{r['bytes_accessed'] / GIB:.2f} | {r['flops'] / 1e9:.1f} | "
                    f"{p.get('bytes_vs_ar', float('nan')):.3f} | {p.get('ms', float('nan')):.2f} | "
                    f"{p.get('time_vs_ar', float('nan')):.3f} |"
                )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", required=True, help="name=file.jsonl,... (aot --json outputs)")
    parser.add_argument("--json", help="write all records here, each with its run name")
    parser.add_argument("--machine", default="", help="the host that compiled, for the JSON")
    parser.add_argument("--command", default="", help="the aot command line, for the JSON")
    args = parser.parse_args()
    runs: dict[str, list[dict]] = {}
    for item in args.runs.split(","):
        name, path = item.split("=", 1)
        runs.setdefault(name, []).extend(load(path))
    print(f"Projection: roofline at {BANDWIDTH_EFFICIENCY:.0%} of HBM bandwidth and "
          f"{FLOPS_EFFICIENCY:.0%} of peak.\n")
    print(table(runs))
    if args.json:
        records = [{"run": name, **r} for name, records in runs.items() for r in records]
        written = {"machine": args.machine, "command": args.command, "date": time.strftime("%Y-%m-%d"),
                   "versions": versions(), "records": records}  # fmt: skip
        with open(args.json, "w") as f:
            json.dump(written, f, indent=1)


if __name__ == "__main__":
    main()
