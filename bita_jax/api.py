"""The Python API: load a checkpoint (and an adapter) once, then generate with AR or BiTA.

    import bita_jax
    model = bita_jax.load("MODEL_DIR", adapter="ADAPTER_DIR", dtype="float32")
    records = model.generate(["def add(a, b):"], max_new_tokens=64, mode="bita", tree="upper:5")

`generate` returns the records decode.py writes, in input order. Compiled generate functions are
cached on the Model, so a second call with the same shapes does not compile again.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import numpy as np
from jax.sharding import Mesh

from bita_jax.bita.adapter import Adapter, place_adapter
from bita_jax.bita.tree import DEFAULT_TREE, DraftTree, parse_tree
from bita_jax.config import BiTAConfig, MeshConfig, ModelConfig, decoding_dtypes
from bita_jax.decoding import loop, runner
from bita_jax.decoding.sampling import Sampler
from bita_jax.errors import ConfigError
from bita_jax.io import adapter_files, hf
from bita_jax.io.tokenizer import Tokenizer
from bita_jax.models.llama import abstract_params
from bita_jax.sharding import make_mesh, mesh_rules, tree_shardings

MODES = ("ar", "bita")


@dataclasses.dataclass
class Run:
    """One `Model.run`: records and per-prompt generations in input order, and the run's totals.

    Attributes:
      accepted_per_level: BiTA only, [prompts, Dt] steps in which draft level m was accepted.
    """

    mode: str
    sampler: Sampler
    records: list[dict[str, Any]]
    generations: list[runner.Generation]
    seconds: float
    compile_seconds: float
    tree: DraftTree | None = None
    accepted_per_level: np.ndarray | None = None


@dataclasses.dataclass(frozen=True)
class GenerateOptions:
    """Options of `Model.generate` / `Model.run`.

    Attributes:
      max_new_tokens: new tokens per prompt at most (rows also stop at EOS).
      mode: "ar" or "bita"; default "bita" with an adapter, else "ar".
      tree: BiTA draft tree spec (`upper:K`, `chain` or JSON rank paths).
      batch_size: prompts decoded together (a multiple of the mesh's data*fsdp).
      chat: wrap prompts in the tokenizer's chat template.
      temperature: 0 decodes greedily; above 0 samples from softmax(logits / temperature), after
        top_k (0: off) and top_p (1: off), as transformers' `generate` does. BiTA's sampled output
        equals AR's for the same options and seed.
      seed: the sampling seed; a prompt's draws depend only on it, its index and the options.
    """

    max_new_tokens: int = 128
    mode: str | None = None
    tree: str = DEFAULT_TREE
    batch_size: int = 1
    chat: bool = False
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0


class Model:
    """A base model, its tokenizer and optionally a BiTA adapter, placed on one device or a mesh."""

    def __init__(
        self,
        config: ModelConfig,
        params,
        tokenizer: Tokenizer,
        adapter: Adapter | None = None,
        bita_config: BiTAConfig | None = None,
        mesh: Mesh | None = None,
    ):
        self.config = config
        self.params = params
        self.tokenizer = tokenizer
        self.adapter = adapter
        self.bita_config = bita_config
        self.mesh = mesh
        self._compiled: dict[Any, runner.CompiledByShape] = {}

    def encode(self, prompts: list[str], chat: bool = False) -> list[list[int]]:
        """Token ids per prompt (`chat` wraps each prompt in the tokenizer's chat template)."""
        return hf.encode_prompts(self.tokenizer, prompts, chat)

    def generate(self, prompts: list[str], **options) -> list[dict[str, Any]]:
        """Decodes prompts; returns one record per prompt, in input order (`GenerateOptions`)."""
        return self.run(prompts, **options).records

    def check(self, prompts: list[str], **options) -> None:
        """Raises ConfigError for options (`GenerateOptions` fields) or prompts that `run` would
        refuse, before any compile."""
        self._plan(prompts, GenerateOptions(**options))

    def _plan(
        self, prompts: list[str], options: GenerateOptions
    ) -> tuple[str, DraftTree | None, Sampler, list[list[int]]]:
        """Validates a request: (mode, draft tree or None, sampler, prompt ids)."""
        sampler = Sampler(options.temperature, options.top_k, options.top_p)
        seed, batch_size = options.seed, options.batch_size
        if not isinstance(seed, int) or not 0 <= seed < 2**31:
            raise ConfigError(f"seed must be an integer in [0, 2**31), got {seed!r}")
        mode = options.mode or ("bita" if self.adapter is not None else "ar")
        if mode not in MODES:
            raise ConfigError(f"mode must be one of {MODES}, got {mode!r}")
        if batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
        if self.mesh is not None:
            ways = self.mesh.shape["data"] * self.mesh.shape["fsdp"]
            if batch_size % ways:
                raise ConfigError(f"batch size {batch_size} must be a multiple of data*fsdp = {ways}")
        draft_tree = None
        if mode == "bita":
            if self.adapter is None:
                raise ConfigError("mode bita needs an adapter (bita_jax.load(..., adapter=DIR))")
            draft_tree = parse_tree(options.tree, self.bita_config.num_mask_tokens)
        prompt_ids = self.encode(prompts, options.chat)
        runner.check_lengths(self.config, [len(p) for p in prompt_ids], options.max_new_tokens)
        return mode, draft_tree, sampler, prompt_ids

    def run(self, prompts: list[str], on_batch: Callable[[int], None] | None = None, **options) -> Run:
        """Decodes prompts with AR or BiTA.

        Args:
          prompts: prompt texts.
          on_batch: called with the number of prompts after each finished batch (progress).
          **options: `GenerateOptions` fields (max_new_tokens, mode, tree, batch_size, chat,
            temperature, top_k, top_p, seed).
        """
        options = GenerateOptions(**options)
        mode, draft_tree, policy, prompt_ids = self._plan(prompts, options)
        max_new_tokens = options.max_new_tokens

        if mode == "bita":
            key = ("bita", draft_tree, max_new_tokens, policy)
            make = lambda: loop.make_bita_generate(self.config, draft_tree, max_new_tokens, policy)  # noqa: E731
            weights = (self.params, self.adapter)
        else:
            key = ("ar", max_new_tokens, policy)
            make = lambda: loop.make_ar_generate(self.config, max_new_tokens, policy)  # noqa: E731
            weights = self.params
        if key not in self._compiled:
            self._compiled[key] = runner.CompiledByShape(make())
        compiled = self._compiled[key]
        compile_before = compiled.compile_seconds
        accepted = []

        def batch_done(state, count):
            if mode == "bita":
                accepted.append(np.asarray(state.extra.accepted_per_level)[:count])
            if on_batch is not None:
                on_batch(count)

        with mesh_rules(self.mesh):
            generations, seconds = runner.generate(
                compiled,
                weights,
                prompt_ids,
                options.batch_size,
                self.config.pad_id,
                options.seed,
                batch_done,
            )
        sampling = {k: getattr(options, k) for k in ("temperature", "top_k", "top_p", "seed")}
        return Run(
            mode=mode,
            sampler=policy,
            records=result_records(self.tokenizer, prompts, prompt_ids, generations, sampling),
            generations=generations,
            seconds=seconds,
            compile_seconds=compiled.compile_seconds - compile_before,
            tree=draft_tree,
            accepted_per_level=np.concatenate(accepted) if accepted else None,
        )


def result_records(
    tokenizer: Tokenizer,
    texts: list[str],
    prompt_ids: list[list[int]],
    generations: list[runner.Generation],
    sampling: dict[str, Any],
) -> list[dict[str, Any]]:
    """One output record per prompt, in input order, with the sampling options that made it."""
    return [
        {
            "prompt": text,
            "completion": tokenizer.decode(gen.output_ids, skip_special_tokens=True),
            "prompt_ids": ids,
            "output_ids": gen.output_ids,
            "new_tokens": len(gen.output_ids),
            "steps": gen.steps,
            "seconds": round(gen.seconds, 6),
            **sampling,
        }
        for text, ids, gen in zip(texts, prompt_ids, generations, strict=True)
    ]


def load(
    model_dir: str,
    adapter: str | None = None,
    dtype: str = "float32",
    precision: str = "exact",
    mesh: Mesh | str | None = None,
    scan_layers: bool = loop.SCAN_LAYERS,
) -> Model:
    """Loads a Hugging Face LlamaForCausalLM directory (and a BiTA adapter directory) for decoding.

    Args:
      model_dir: checkpoint directory (config.json, safetensors, tokenizer).
      adapter: adapter directory written by train.py (adapter.safetensors, adapter_config.json).
      dtype: "float32" or "bfloat16", the weights' dtype.
      precision: "exact" computes activations, logits and the KV cache in float32 (bfloat16
        weights: BiTA's output equals AR's, the cache takes twice the bytes); "fast" computes in
        `dtype` (see `config.decoding_dtypes`).
      mesh: a (data, fsdp, tensor) Mesh, or its spec such as "data=1,fsdp=1,tensor=8";
        default one device.
      scan_layers: run the layers as one scan (faster compiles of deep models, slower steps).
    """
    config = hf.load_config(model_dir, **decoding_dtypes(dtype, precision), scan_layers=scan_layers)
    tokenizer = hf.load_tokenizer(model_dir)
    if isinstance(mesh, str):
        mesh = make_mesh(MeshConfig.parse(mesh))
    shardings = None if mesh is None else tree_shardings(abstract_params(config), mesh)
    params = hf.load_params(model_dir, config, shardings)
    bita_config = arrays = None
    if adapter is not None:
        bita_config, loaded = adapter_files.load_adapter(adapter, config)
        arrays = place_adapter(loaded, mesh)
    return Model(config, params, tokenizer, arrays, bita_config, mesh)
