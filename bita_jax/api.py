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
from bita_jax.config import BiTAConfig, MeshConfig, ModelConfig
from bita_jax.decoding import loop, runner
from bita_jax.decoding.acceptance import GREEDY
from bita_jax.errors import ConfigError
from bita_jax.io import adapter_files, hf
from bita_jax.models.llama import abstract_params
from bita_jax.sharding import check_mesh_fits, make_mesh, mesh_rules, tree_shardings

MODES = ("ar", "bita")


@dataclasses.dataclass
class Run:
    """One `Model.run`: records and per-prompt generations in input order, and the run's totals.

    Attributes:
      accepted_per_level: BiTA only, [prompts, Dt] steps in which draft level m was accepted.
    """

    mode: str
    records: list[dict[str, Any]]
    generations: list[runner.Generation]
    seconds: float
    compile_seconds: float
    tree: DraftTree | None = None
    accepted_per_level: np.ndarray | None = None


class Model:
    """A base model, its tokenizer and optionally a BiTA adapter, placed on one device or a mesh."""

    def __init__(
        self,
        config: ModelConfig,
        params,
        tokenizer,
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
        """Decodes prompts; returns one record per prompt, in input order (options as in `run`)."""
        return self.run(prompts, **options).records

    def _data_ways(self) -> int:
        """Ways the batch is split over the mesh (data * fsdp); 1 without a mesh."""
        return 1 if self.mesh is None else self.mesh.shape["data"] * self.mesh.shape["fsdp"]

    def check(self, prompts: list[str], **options) -> None:
        """Raises ConfigError for options or prompts that `run` would refuse, before any compile."""
        self._plan(prompts, **options)

    def _plan(
        self,
        prompts: list[str],
        max_new_tokens: int = 128,
        mode: str | None = None,
        tree: str = DEFAULT_TREE,
        batch_size: int = 1,
        chat: bool = False,
    ) -> tuple[str, DraftTree | None, list[list[int]]]:
        """Validates a request: (mode, draft tree or None, prompt ids)."""
        mode = mode or ("bita" if self.adapter is not None else "ar")
        if mode not in MODES:
            raise ConfigError(f"mode must be one of {MODES}, got {mode!r}")
        if batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
        if self.mesh is not None:
            ways = self._data_ways()
            if batch_size % ways:
                raise ConfigError(f"batch size {batch_size} must be a multiple of data*fsdp = {ways}")
        draft_tree = None
        if mode == "bita":
            if self.adapter is None:
                raise ConfigError("mode bita needs an adapter (bita_jax.load(..., adapter=DIR))")
            draft_tree = parse_tree(tree, self.bita_config.num_mask_tokens)
            draft_tree.check_vocab(self.config.vocab_size)
        prompt_ids = self.encode(prompts, chat)
        runner.check_lengths(self.config, [len(p) for p in prompt_ids], max_new_tokens)
        return mode, draft_tree, prompt_ids

    def run(
        self,
        prompts: list[str],
        max_new_tokens: int = 128,
        mode: str | None = None,
        tree: str = DEFAULT_TREE,
        batch_size: int = 1,
        chat: bool = False,
        on_batch: Callable[[list[dict[str, Any]]], None] | None = None,
    ) -> Run:
        """Decodes prompts with AR or BiTA.

        Args:
          prompts: prompt texts.
          max_new_tokens: new tokens per prompt at most (rows also stop at EOS).
          mode: "ar" or "bita"; default "bita" with an adapter, else "ar".
          tree: BiTA draft tree spec (`upper:K`, `chain` or JSON rank paths).
          batch_size: prompts decoded together (a multiple of the mesh's data*fsdp); clamped to the
            number of prompts (rounded up to data*fsdp).
          chat: wrap prompts in the tokenizer's chat template.
          on_batch: called with each finished batch's records, in input order (to write them
            out at once).
        """
        mode, draft_tree, prompt_ids = self._plan(prompts, max_new_tokens, mode, tree, batch_size, chat)
        policy = GREEDY
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
        finished = 0  # prompts decoded so far
        # A batch larger than the prompts only decodes copies of the last prompt.
        batch_size = min(batch_size, self._data_ways() * -(-len(prompts) // self._data_ways()))

        def batch_done(state, batch: list[runner.Generation]):
            nonlocal finished
            if mode == "bita":
                accepted.append(np.asarray(state.extra.accepted_per_level)[: len(batch)])
            if on_batch is not None:
                done = slice(finished, finished + len(batch))
                on_batch(result_records(self.tokenizer, prompts[done], prompt_ids[done], batch))
            finished += len(batch)

        with mesh_rules(self.mesh):
            generations, seconds = runner.generate(
                compiled, weights, prompt_ids, batch_size, self.config.pad_id, batch_done
            )
        return Run(
            mode=mode,
            records=result_records(self.tokenizer, prompts, prompt_ids, generations),
            generations=generations,
            seconds=seconds,
            compile_seconds=compiled.compile_seconds - compile_before,
            tree=draft_tree,
            accepted_per_level=np.concatenate(accepted) if accepted else None,
        )


def result_records(
    tokenizer, texts: list[str], prompt_ids: list[list[int]], generations: list[runner.Generation]
) -> list[dict[str, Any]]:
    """One output record per prompt, in input order."""
    return [
        {
            "prompt": text,
            "completion": tokenizer.decode(gen.output_ids, skip_special_tokens=True),
            "prompt_ids": ids,
            "output_ids": gen.output_ids,
            "new_tokens": len(gen.output_ids),
            "steps": gen.steps,
            "seconds": round(gen.seconds, 6),
        }
        for text, ids, gen in zip(texts, prompt_ids, generations, strict=True)
    ]


def load(
    model_dir: str,
    adapter: str | None = None,
    dtype: str = "float32",
    mesh: Mesh | str | None = None,
    scan_layers: bool = loop.SCAN_LAYERS,
) -> Model:
    """Loads a Hugging Face LlamaForCausalLM directory (and a BiTA adapter directory) for decoding.

    Args:
      model_dir: checkpoint directory (config.json, safetensors, tokenizer).
      adapter: adapter directory written by train.py (adapter.safetensors, adapter_config.json).
      dtype: "float32" or "bfloat16", the weights' and activations' dtype.
      mesh: a (data, fsdp, tensor) Mesh, or its spec such as "data=1,fsdp=1,tensor=8";
        default one device.
      scan_layers: run the layers as one scan (faster compiles of deep models, slower steps).
    """
    config = hf.load_config(model_dir, dtype=dtype, scan_layers=scan_layers)
    tokenizer = hf.load_tokenizer(model_dir)
    if isinstance(mesh, str):
        mesh = make_mesh(MeshConfig.parse(mesh))
    if mesh is not None:
        check_mesh_fits(config, mesh)
    shardings = None if mesh is None else tree_shardings(abstract_params(config), mesh)
    params = hf.load_params(model_dir, config, shardings)
    bita_config = arrays = None
    if adapter is not None:
        bita_config, loaded = adapter_files.load_adapter(adapter, config)
        adapter_files.warn_if_other_base(adapter, model_dir)
        arrays = place_adapter(loaded, mesh)
    return Model(config, params, tokenizer, arrays, bita_config, mesh)
