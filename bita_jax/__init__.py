"""bita_jax: BiTA (Bi-directional Tuning for lossless Acceleration) for LLaMA-family models in JAX.

The public API (bita_jax/api.py):

    import bita_jax
    model = bita_jax.load("MODEL_DIR", adapter="ADAPTER_DIR", dtype="float32")   # adapter optional
    records = model.generate(["def add(a, b):"], max_new_tokens=64, mode="bita", tree="upper:5")

`DecodingOptions` holds the decoding options every entry point shares (load's dtype, precision and
mesh; run's mode, tree, batch size, chat and sampling).

Sub-packages import downwards only, in this order (top first): recipe > cli > api > demo > tuning >
training > io > decoding > bita > models > sharding > config > errors. docs/architecture.md gives the
reasons; tests/test_layering.py fails on an import that climbs or a cycle.
"""

from __future__ import annotations

__all__ = ["DecodingOptions", "GenerateOptions", "Model", "Run", "load"]


def __getattr__(name: str):
    # Imported on first use, so `import bita_jax.config` (train.py before jax.distributed starts,
    # tools that only read configs) does not load the model and decoding code.
    if name in __all__:
        from bita_jax import api

        return getattr(api, name)
    raise AttributeError(f"module 'bita_jax' has no attribute {name!r}")
