"""Typed configuration of a training run: one nested pydantic tree, read from JSON.

Every section forbids unknown keys so a typo fails loudly, and every error is reported as
``dotted.field.path: reason (got value)`` through :class:`ConfigError`.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import sys
import textwrap
import types
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any, Literal, NamedTuple, Union

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    NonNegativeFloat,
    NonNegativeInt,
    PositiveFloat,
    PositiveInt,
    PrivateAttr,
    ValidationError,
    create_model,
    model_validator,
)
from pydantic_core import PydanticCustomError

from .atomic import atomic_write
from .registry import (
    ARCHITECTURES,
    LOSS_TERMS,
    NONLINEARITIES,
    SOURCES,
    ComponentError,
    Registry,
)
from .runs import run_name_problem

__all__ = [
    "KNOWN_LMS",
    "CheckpointConfig",
    "Config",
    "ConfigError",
    "DataConfig",
    "EvalConfig",
    "LMDataConfig",
    "LMShape",
    "LoggingConfig",
    "LossConfig",
    "ModelConfig",
    "NonlinearityConfig",
    "ParallelConfig",
    "SyntheticDataConfig",
    "TrainConfig",
    "config_help",
    "load_config",
    "main_config",
    "parse_override",
    "save_config",
    "validate_config",
]


class ConfigError(ValueError):
    """An invalid configuration; ``str()`` is one line per problem, each naming its field path."""


class LMShape(NamedTuple):
    """Layer count and widths of a language model."""

    n_layers: int
    d_model: int
    d_mlp: int


KNOWN_LMS: dict[str, LMShape] = {
    "smollm2-135m": LMShape(30, 576, 1536),
    "gpt2": LMShape(12, 768, 3072),
    "gpt2-medium": LMShape(24, 1024, 4096),
    "pythia-70m": LMShape(6, 512, 2048),
}

UnitOpen = Annotated[float, Field(gt=0, lt=1)]
Beta = Annotated[float, Field(ge=0, lt=1)]

# Errors found by model validators are raised with this type; their ctx carries
# (relative path, message) pairs so the translator can print full field paths.
_CROSS_FIELD = "config_cross_field"


def _fail_if(problems: list[tuple[str, str]]) -> None:
    if problems:
        text = "; ".join(f"{path}: {msg}" for path, msg in problems)
        raise PydanticCustomError(_CROSS_FIELD, text, {"problems": problems})


class _Section(BaseModel):
    # strict: no silent coercions such as true -> 1 or "12" -> 12 in a config file.
    model_config = ConfigDict(extra="forbid", strict=True)


# ---- components: a kind plus the arguments its dataclass declares ------------------------------


@functools.cache
def args_model(cls: type) -> type[BaseModel]:
    """The strict pydantic model of a component dataclass's init fields (``help`` metadata as
    descriptions), so a plug-in's arguments are validated like every other section."""
    hints = typing.get_type_hints(cls)
    fields: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:
            default = ...
        fields[f.name] = (hints[f.name], Field(default, description=f.metadata.get("help")))
    return create_model(f"{cls.__name__}Args", __base__=_Section, **fields)


# Fields every kind took before components had their own arguments, with the values that meant
# "unused": configs saved by earlier versions list them all, so the ones a kind does not take are
# dropped when they hold one of these values (any other value is still an error).
_LEGACY_DEFAULTS = {
    "nonlinearity": {"k": (None,), "batchtopk_scope": ("layer",), "threshold_ema_decay": (0.99,),
                     "rank_by_decoder_norm": (False,), "jumprelu_init_threshold": (0.1,),
                     "jumprelu_bandwidth": (0.1,)},
    "model": {"reach": (None, 1), "skip": (False,), "matryoshka_prefixes": (None,),
              "molt_rank_groups": (None,)},
}


def _validate_args(registry: Registry, kind: Any, args: dict[str, Any], legacy: dict[str, Any],
                   kind_path: str, where: str = "") -> dict[str, Any]:
    """The full arguments (defaults included) of ``kind`` from raw ``args``; problems are raised
    as config errors whose paths are ``where`` + the field (``kind_path`` for the kind)."""
    try:
        cls = registry.resolve(kind)
    except ComponentError as exc:
        _fail_if([(kind_path, str(exc))])
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    args = {k: v for k, v in args.items()
            if k in names or k not in legacy or v not in legacy[k]}
    try:
        return args_model(cls).model_validate(args).model_dump()
    except ValidationError as exc:
        takes = ", ".join(sorted(names)) or "none"

        def msg(e: dict) -> str:
            if e["type"] == "extra_forbidden":
                return f"is not an argument of {kind} (it takes: {takes}) (got {_show(e['input'])})"
            return e["msg"] + ("" if e["type"] == "missing" else f" (got {_show(e['input'])})")

        _fail_if([(f"{where}{_dotted(e['loc'])}", msg(e)) for e in exc.errors()])
        raise  # unreachable: _fail_if raised


def _build_component(registry: Registry, kind: Any, values: dict[str, Any], kind_path: str,
                     where: str = "") -> Any:
    """The component of validated ``values``; the checks of its ``__post_init__`` are raised as
    config errors (on the field their message starts with, else on the section)."""
    try:
        return registry.build(kind, values)
    except (ValueError, TypeError) as exc:
        first, _, rest = str(exc).partition(" ")
        if first in values and rest:
            _fail_if([(f"{where}{first}", rest)])
        _fail_if([(where.rstrip(".") or kind_path, f"{kind}: {exc}")])
        raise  # unreachable: _fail_if raised


class _ComponentSection(_Section):
    """A section whose ``kind`` names a component and whose other fields (beyond ``_fixed``) are
    that component's arguments, validated by the component's own model."""

    model_config = ConfigDict(extra="allow", strict=True)
    _registry: typing.ClassVar[Registry]
    _kind_field: typing.ClassVar[str] = "kind"
    _legacy: typing.ClassVar[dict[str, Any]] = {}
    _component: Any = PrivateAttr(None)

    @model_validator(mode="before")
    @classmethod
    def _component_args(cls, raw: Any) -> Any:
        if not isinstance(raw, dict):
            return raw
        fixed = set(cls.model_fields)
        kind = raw.get(cls._kind_field, cls.model_fields[cls._kind_field].default)
        if kind is None or kind is ...:
            return raw  # "kind" missing: reported by the field itself
        args = {k: v for k, v in raw.items() if k not in fixed}
        values = _validate_args(cls._registry, kind, args, cls._legacy, cls._kind_field)
        return {**{k: v for k, v in raw.items() if k in fixed}, **values}

    @model_validator(mode="after")
    def _built(self) -> Any:
        """Build the component once here: its own checks run, and ``component`` keeps it."""
        kind = getattr(self, self._kind_field)
        self._component = _build_component(self._registry, kind, self.args, self._kind_field)
        return self

    @property
    def args(self) -> dict[str, Any]:
        """The component's arguments, defaults included."""
        return dict(self.__pydantic_extra__ or {})

    def build(self) -> Any:
        """A fresh component object (a dataclass instance; its ``kind`` is the config's)."""
        return self._registry.build(getattr(self, self._kind_field), self.args)

    @property
    def component(self) -> Any:
        """The component object built by validation (do not mutate it)."""
        return self._component


def _kind_text(registry: Registry) -> str:
    """How a kind field is filled, with the built-in names read from the registry."""
    path = "an import path 'package.module:Class'"
    names = ", ".join(registry.names())
    return f"a registered name ({names}) or {path}" if names else path


class ModelConfig(_ComponentSection):
    n_features: PositiveInt = Field(..., description="Features per layer (F), > 0.")
    layers: list[NonNegativeInt] | None = Field(
        None,
        min_length=1,
        description="LM layers the transcoder reads and writes, sorted and unique. "
        "null = all layers of the LM.",
    )
    architecture: str = Field(
        "transcoder", description=f"The architecture: {_kind_text(ARCHITECTURES)}. Its "
        "arguments are the other fields of this section."
    )
    _registry = ARCHITECTURES
    _kind_field = "architecture"
    _legacy = _LEGACY_DEFAULTS["model"]

    @model_validator(mode="after")
    def _layers_sorted_unique(self) -> ModelConfig:
        layers = self.layers
        if layers is not None and layers != sorted(set(layers)):
            _fail_if([("layers", f"must be sorted and without duplicates (got {layers})")])
        return self


class NonlinearityConfig(_ComponentSection):
    kind: str = Field(
        ..., description=f"Activation function that makes the codes sparse: "
        f"{_kind_text(NONLINEARITIES)}. Its arguments are the other fields of this section."
    )
    _registry = NONLINEARITIES
    _legacy = _LEGACY_DEFAULTS["nonlinearity"]


class LossTermConfig(_ComponentSection):
    kind: str = Field(..., description=f"A loss term (a clt.losses.LossTerm dataclass): "
                      f"{_kind_text(LOSS_TERMS)}.")
    _registry = LOSS_TERMS


class LossConfig(_Section):
    sparsity_coef: NonNegativeFloat = Field(
        0.0, description="lambda of the tanh sparsity penalty, >= 0."
    )
    sparsity_c: PositiveFloat = Field(1.0, description="c inside tanh(c * a * ||W_dec||), > 0.")
    sparsity_warmup_steps: NonNegativeInt = Field(
        0, description="Steps over which lambda ramps linearly from 0, <= train.steps."
    )
    l0_coef: NonNegativeFloat = Field(0.0, description="Weight of JumpReLU's L0 penalty, >= 0.")
    preact_coef: NonNegativeFloat = Field(
        0.0, description="Weight of the pre-activation loss (fights dead features), >= 0."
    )
    matryoshka_weights: list[PositiveFloat] | None = Field(
        None, description="Weight of each Matryoshka prefix's reconstruction loss (one per "
        "model.matryoshka_prefixes); null = equal weights."
    )
    auxk_alpha: NonNegativeFloat = Field(
        1 / 32, description="Weight of the AuxK loss (TopK family), >= 0."
    )
    auxk_k: PositiveInt | None = Field(
        None, description="k_aux, dead features AuxK decodes per token; null = min(512, F)."
    )
    dead_tokens: PositiveInt = Field(
        10_000_000, description="A feature is dead once it has not fired for this many tokens."
    )
    extra: list[LossTermConfig] = Field(
        [], description="Extra loss terms, each {\"kind\": ..., \"coef\": ..., <its "
        "fields>}, added to the objective as coef * term."
    )


class SyntheticDataConfig(_Section):
    n_layers: PositiveInt = Field(..., description="Layers of the planted model, >= 1.")
    d_in: PositiveInt = Field(..., description="Input width, >= 1.")
    d_out: PositiveInt = Field(..., description="Output width, >= 1.")
    n_true_features: PositiveInt = Field(256, description="Planted features per layer, >= 1.")
    active_per_layer: PositiveInt = Field(
        4, description="Planted features active per (token, layer), <= n_true_features."
    )
    noise: NonNegativeFloat = Field(
        0.0, description="Std of Gaussian noise added to inputs and targets."
    )
    seed: int = Field(0, description="Seed of the planted dictionary.")

    @model_validator(mode="after")
    def _active_fits(self) -> SyntheticDataConfig:
        if self.active_per_layer > self.n_true_features:
            msg = f"must be <= n_true_features = {self.n_true_features}"
            _fail_if([("active_per_layer", f"{msg} (got {self.active_per_layer})")])
        return self


class LMDataConfig(_Section):
    name: str = Field(
        "smollm2-135m",
        description="Language model: 'smollm2-135m' (embedded, offline), a transformer-lens "
        "official name such as 'gpt2', or 'tiny' (randomly initialised, for tests).",
    )
    tiny_n_layers: PositiveInt = Field(2, description="Layers of the 'tiny' model.")
    tiny_d_model: PositiveInt = Field(64, description="Residual width of the 'tiny' model.")
    tiny_d_mlp: PositiveInt = Field(256, description="MLP width of the 'tiny' model.")
    input_hook: Literal["hook_mlp_in", "ln2.hook_normalized"] = Field(
        "hook_mlp_in", description="Per-block hook the transcoder reads."
    )
    output_hook: Literal["hook_mlp_out", "hook_mlp_in"] = Field(
        "hook_mlp_out",
        description="Per-block hook the transcoder reconstructs; equal to input_hook = an SAE.",
    )
    dataset: str = Field(
        "shakespeare",
        description="Text: 'shakespeare' (embedded), a local path to text/parquet/jsonl files, "
        "or a hub dataset name.",
    )
    seq_len: int = Field(128, ge=2, description="Tokens per LM context, >= 2.")
    heldout_fraction: float = Field(
        0.05, ge=0, lt=0.5, description="Fraction of the text held out for evaluation, [0, 0.5)."
    )
    buffer_tokens: PositiveInt = Field(65536, description="Tokens in the shuffle buffer.")
    buffer_dtype: Literal["float32", "bfloat16"] = Field(
        "float32", description="Storage dtype of buffered activations."
    )
    lm_batch_size: PositiveInt = Field(8, description="Sequences per LM forward pass.")
    refill_fraction: float = Field(
        0.5, gt=0, le=1, description="Refill the buffer once this fraction is consumed, (0, 1]."
    )
    reuse_factor: PositiveInt = Field(
        1, description="Times each LM-computed token is served (1 = once; more trades LM "
        "compute for correlated batches)."
    )
    producer_thread: bool = Field(
        True, description="Run the LM in a background thread so its forward overlaps training."
    )
    prefetch_batches: PositiveInt = Field(
        2, description="LM batches the producer thread may compute ahead of the buffer."
    )
    cache_dir: str | None = Field(
        None, description="Folder of an on-disk activation cache (safetensors shards and "
        "manifest.json): written on the first run, read by later matching runs without the LM."
    )
    cache_shard_tokens: PositiveInt = Field(
        65536, description="Tokens per activation-cache shard (whole LM batches)."
    )

    @property
    def shape(self) -> LMShape | None:
        """Layer count and widths of the LM, or None for a name not in KNOWN_LMS."""
        if self.name == "tiny":
            return LMShape(self.tiny_n_layers, self.tiny_d_model, self.tiny_d_mlp)
        return KNOWN_LMS.get(self.name)


class DataConfig(_Section):
    source: str = Field(
        "lm", description=f"Where activations come from: {_kind_text(SOURCES)}. 'lm' reads "
        "data.lm, 'synthetic' data.synthetic, a plug-in data.args."
    )
    args: dict[str, Any] | None = Field(
        None, description="Arguments of a plug-in source (data.source an import path)."
    )
    synthetic: SyntheticDataConfig | None = Field(
        None, description="Planted dictionary; required when source is 'synthetic'."
    )
    lm: LMDataConfig = Field(default_factory=LMDataConfig, description="LM activation source.")
    standardize_tokens: int = Field(
        100_000, ge=2, description="Tokens used to estimate per-(layer, dim) mean and std, >= 2."
    )

    _component: Any = PrivateAttr(None)

    @model_validator(mode="after")
    def _source_args(self) -> DataConfig:
        if self.source == "synthetic" and self.synthetic is None:
            _fail_if([("synthetic", "is required when source is 'synthetic'")])
        if self.args is not None or self.source not in ("lm", "synthetic"):
            self.args = _validate_args(SOURCES, self.source, self.args or {}, {}, "source",
                                       "args.")
        self._component = _build_component(SOURCES, self.source, self.args or {}, "source",
                                            "args.")
        return self

    @property
    def component(self) -> Any:
        """The source component (``clt.data.sources``) built by validation: a plug-in's checks
        may read files (``source_n_layers`` asks it several times per validation)."""
        return self._component


class TrainConfig(_Section):
    steps: PositiveInt = Field(..., description="Optimizer steps, > 0.")
    batch_tokens: PositiveInt = Field(
        4096, description="Tokens per optimizer step (N) over all data-parallel replicas, "
        "divisible by grad_accum * parallel.data * parallel.tensor."
    )
    lr: PositiveFloat = Field(2e-4, description="Peak learning rate, > 0.")
    warmup_steps: NonNegativeInt = Field(
        0, description="Steps of linear learning-rate warmup, < steps."
    )
    decay: Literal["cosine", "linear", "constant"] = Field(
        "cosine", description="Learning-rate schedule after warmup."
    )
    min_lr_ratio: float = Field(
        0.0, ge=0, le=1, description="Final learning rate as a fraction of lr, [0, 1]."
    )
    grad_clip: PositiveFloat | None = Field(
        1.0, description="Max global gradient norm; null disables clipping."
    )
    grad_accum: PositiveInt = Field(1, description="Micro-batches per optimizer step.")
    optimizer: Literal["adam", "adamw"] = Field("adam", description="Optimizer.")
    weight_decay: NonNegativeFloat = Field(0.0, description="Weight decay, >= 0.")
    # strict=False so the JSON list [b1, b2] is accepted as a tuple (items stay strict floats).
    betas: tuple[Beta, Beta] = Field(
        (0.9, 0.999), strict=False, description="Adam betas, each in [0, 1)."
    )
    seed: int = Field(0, description="Seed of initialisation and data order.")
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="'auto' uses CUDA when available."
    )
    mixed_precision: Literal["no", "bf16", "fp16"] = Field(
        "no", description="Autocast dtype of the forward pass (fp16 adds a gradient scaler)."
    )
    profile_steps: NonNegativeInt = Field(
        0, description="Profile this many steps (after one warmup step) with torch.profiler and "
        "write a Chrome trace to the run folder; 0 = off."
    )


class ParallelConfig(_Section):
    data: PositiveInt = Field(1, description="Data-parallel ranks.")
    tensor: PositiveInt = Field(1, description="Tensor-parallel ranks (shard features).")
    timeout_s: PositiveFloat = Field(
        600.0, description="Seconds a collective may wait for the other ranks before the run "
        "fails with an error (a dead or stuck rank never hangs the others forever)."
    )


class LoggingConfig(_Section):
    wandb_mode: Literal["offline", "online", "disabled"] = Field(
        "offline", description="wandb mode."
    )
    wandb_project: str = Field("clt", description="wandb project.")
    every: PositiveInt = Field(50, description="Log metrics every this many steps.")
    run_dir: str = Field("runs", description="Folder that holds one subfolder per run.")
    run_name: str | None = Field(
        None, description="Run subfolder name (one folder inside run_dir); null = generated."
    )

    @model_validator(mode="after")
    def _name_stays_inside(self) -> LoggingConfig:
        problem = None if self.run_name is None else run_name_problem(self.run_name)
        if problem:
            _fail_if([("run_name", f"{problem} (got {_show(self.run_name)})")])
        return self


class EvalConfig(_Section):
    every: PositiveInt = Field(1000, description="Evaluate every this many steps.")
    tokens: int = Field(
        8192, ge=2, description="Held-out tokens per evaluation, >= 2 (FVU needs a variance)."
    )
    replacement_tokens: NonNegativeInt = Field(
        2048, description="Held-out tokens for the replacement-model metrics (CE, KL, open and "
        "closed loop) at the end of an LM run; 0 = skip."
    )
    graph_prompts: NonNegativeInt = Field(
        4, description="Held-out prompts (the first sequences of the split) whose attribution "
        "graphs give the replacement and completeness scores next to the replacement-model "
        "metrics; 0 = skip."
    )
    graph_prompt_tokens: int = Field(
        32, ge=2, description="Tokens per attribution prompt, BOS included (at most "
        "data.lm.seq_len), >= 2."
    )
    graph_batch: PositiveInt = Field(
        64, description="Target nodes per backward pass of the attribution graphs."
    )
    pages: bool = Field(
        False, description="At the end of an LM run, write RUN/pages/: the attribution-graph "
        "page of the first held-out sequence (eval.graph_prompt_tokens tokens) and the feature "
        "pages of every feature (clt.graph, clt.features); logged to wandb when it is on."
    )


class CheckpointConfig(_Section):
    every: PositiveInt = Field(1000, description="Checkpoint every this many steps.")
    keep_last: PositiveInt = Field(2, description="Checkpoints kept on disk, >= 1.")


class Config(_Section):
    model: ModelConfig = Field(..., description="Transcoder shape.")
    nonlinearity: NonlinearityConfig = Field(..., description="Sparsifying activation.")
    loss: LossConfig = Field(default_factory=LossConfig, description="Loss terms.")
    data: DataConfig = Field(default_factory=DataConfig, description="Activation source.")
    train: TrainConfig = Field(..., description="Optimisation.")
    parallel: ParallelConfig = Field(default_factory=ParallelConfig, description="Parallelism.")
    logging: LoggingConfig = Field(default_factory=LoggingConfig, description="Logging.")
    eval: EvalConfig = Field(default_factory=EvalConfig, description="Evaluation.")
    checkpoint: CheckpointConfig = Field(
        default_factory=CheckpointConfig, description="Checkpointing."
    )

    @property
    def source_n_layers(self) -> int | None:
        """Layers of the activation source (LM, planted model or plug-in); None when unknown."""
        if self.data.source == "synthetic":
            assert self.data.synthetic is not None
            return self.data.synthetic.n_layers
        if self.data.source != "lm":
            return self.data.component.n_layers()
        shape = self.data.lm.shape
        return shape.n_layers if shape else None

    @property
    def n_layers(self) -> int | None:
        """L, the number of trained layers; None when it depends on an unknown LM."""
        if self.model.layers is not None:
            return len(self.model.layers)
        return self.source_n_layers

    @property
    def resolved_layers(self) -> list[int] | None:
        """Source layers that are trained, in order; None when unknown."""
        if self.model.layers is not None:
            return list(self.model.layers)
        n = self.source_n_layers
        return list(range(n)) if n is not None else None

    @property
    def resolved_reach(self) -> int | None:
        """R: the layers a feature writes to (model.reach, or L for a CLT; 1 for a MOLT);
        None when L is unknown."""
        n = self.n_layers
        return None if n is None else self.model.component.reach_of(n)

    @property
    def is_sae(self) -> bool:
        """True when the transcoder reconstructs its own input hook."""
        return self.data.source == "lm" and self.data.lm.output_hook == self.data.lm.input_hook

    @model_validator(mode="after")
    def _cross_field(self) -> Config:
        _fail_if(
            self._feature_problems()
            + self.model.component.config_problems(self)
            + self._layer_problems()
            + self._batch_problems()
            + self._schedule_problems()
        )
        return self

    def _feature_problems(self) -> list[tuple[str, str]]:
        f, tp = self.model.n_features, self.parallel.tensor
        problems = []
        for path, k in (("nonlinearity.k", self.nonlinearity.component.k),
                        ("loss.auxk_k", self.loss.auxk_k)):
            if k is not None and k > f:
                problems.append((path, f"must be <= model.n_features = {f} (got {k})"))
        if f % tp:
            problems.append(
                ("model.n_features", f"must be divisible by parallel.tensor = {tp} (got {f})")
            )
        arch = self.model.component
        if not arch.module.shardable and self.parallel.data * tp > 1:
            problems.append(("parallel", f"a {self.model.architecture} model trains in one "
                             "process (tensor and data must be 1)"))
        return problems

    def _layer_problems(self) -> list[tuple[str, str]]:
        problems = []
        n_src, layers = self.source_n_layers, self.model.layers
        if n_src is not None and layers is not None and layers[-1] >= n_src:
            source = (
                "the synthetic source" if self.data.source == "synthetic" else self.data.lm.name
            )
            bad = [i for i in layers if i >= n_src]
            msg = (
                f"layers {bad} do not exist in {source}, which has {n_src} layers (0..{n_src - 1})"
            )
            problems.append(("model.layers", msg))
        return problems

    def _batch_problems(self) -> list[tuple[str, str]]:
        problems = []
        par = self.parallel
        per_step = self.train.grad_accum * par.data * par.tensor
        if self.train.batch_tokens % per_step:
            msg = (f"must be divisible by train.grad_accum * parallel.data * parallel.tensor = "
                   f"{per_step} (each tensor-parallel rank produces a slice of the batch)")
            problems.append(("train.batch_tokens", f"{msg} (got {self.train.batch_tokens})"))
        micro = self.train.batch_tokens // per_step * par.tensor  # tokens of one micro-batch
        if micro < 2:
            problems.append(("train.batch_tokens", f"gives {micro} token(s) per micro-batch "
                             "(batch_tokens / (grad_accum * parallel.data)); the FVU of a batch "
                             f"needs >= 2 (got {self.train.batch_tokens})"))
        if self.data.source == "lm":
            buffer = self.data.lm.buffer_tokens
            fit = min(self.train.batch_tokens, self.data.standardize_tokens)
            for what, n in (("a micro-batch", micro // par.tensor),
                            ("a standardization batch", fit // par.tensor)):
                if n > buffer:
                    problems.append(("data.lm.buffer_tokens", f"must hold {what} of {n} tokens "
                                     f"per process (got {buffer})"))
        if self.train.mixed_precision == "fp16" and par.data * par.tensor > 1:
            problems.append(("train.mixed_precision", "fp16 needs a loss scaler whose overflow "
                             "check is per rank; use bf16 with parallel.data or .tensor > 1"))
        return problems

    def _schedule_problems(self) -> list[tuple[str, str]]:
        steps, problems = self.train.steps, []
        warmup, sparsity_warmup = self.train.warmup_steps, self.loss.sparsity_warmup_steps
        if warmup >= steps:
            problems.append(
                ("train.warmup_steps", f"must be < train.steps = {steps} (got {warmup})")
            )
        if sparsity_warmup > steps:
            msg = f"must be <= train.steps = {steps} (got {sparsity_warmup})"
            problems.append(("loss.sparsity_warmup_steps", msg))
        return problems


def _dotted(loc: Sequence[str | int]) -> str:
    path = ""
    for part in loc:
        path += f"[{part}]" if isinstance(part, int) else (f".{part}" if path else str(part))
    return path


def _show(value: Any, limit: int = 80) -> str:
    try:
        text = json.dumps(value)
    except (TypeError, ValueError):
        text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _error_lines(exc: ValidationError) -> list[str]:
    lines = []
    for err in exc.errors():
        loc = list(err["loc"])
        if err["type"] == _CROSS_FIELD:
            # Model validators report paths relative to the model they sit on.
            for path, msg in err["ctx"]["problems"]:
                lines.append(f"{_dotted([*loc, *path.split('.')])}: {msg}")
            continue
        line = f"{_dotted(loc) or '<top level>'}: {err['msg']}"
        if err["type"] != "missing":
            line += f" (got {_show(err['input'])})"
        lines.append(line)
    return lines


def validate_config(raw: Any) -> Config:
    """Validate a raw (JSON-like) dict into a Config, raising ConfigError on any problem."""
    try:
        return Config.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError("\n".join(_error_lines(exc))) from None


def parse_override(text: str) -> tuple[list[str], object]:
    """Split ``a.b.c=value`` into (["a", "b", "c"], value); value is JSON if it parses, else str."""
    key, sep, value = text.partition("=")
    path = key.strip().split(".")
    if not sep or any(not part for part in path):
        raise ConfigError(f"override {text!r}: expected section.field=value")
    try:
        return path, json.loads(value)
    except json.JSONDecodeError:
        return path, value


def _apply_override(raw: dict[str, Any], path: list[str], value: object) -> None:
    node = raw
    for i, part in enumerate(path[:-1]):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        elif not isinstance(child, dict):
            where = ".".join(path[: i + 1])
            raise ConfigError(f"{where}: is not a section, cannot set {'.'.join(path)}")
        node = child
    node[path[-1]] = value


def _read_json(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such config file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read config file ({exc})") from None
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(
            f"{path}: invalid JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}"
        ) from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a JSON object")
    return raw


def load_config(path: str | Path, overrides: Sequence[str] = ()) -> Config:
    """Read a JSON config, apply ``section.field=value`` overrides in order, and validate it."""
    raw = _read_json(Path(path))
    for text in overrides:
        _apply_override(raw, *parse_override(text))
    return validate_config(raw)


def save_config(cfg: Config, path: str | Path) -> None:
    """Write the fully resolved config (defaults included) as indented JSON, atomically (a kill
    never leaves half a config)."""
    atomic_write(Path(path), json.dumps(cfg.model_dump(mode="json"), indent=2) + "\n")


def _type_name(annotation: Any) -> str:
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is Annotated:
        return _type_name(args[0])
    if origin is Literal:
        return "|".join(str(a) for a in args)
    if origin in (Union, types.UnionType):
        return " | ".join(_type_name(a) for a in args)
    if origin is not None:
        return f"{origin.__name__}[{', '.join(_type_name(a) for a in args)}]"
    if annotation is type(None):
        return "null"
    return getattr(annotation, "__name__", str(annotation))


def _section_type(annotation: Any) -> type[BaseModel] | None:
    """The model class behind a field (also through ``Model | None`` and ``list[Model]``)."""
    for candidate in (annotation, *typing.get_args(annotation)):
        if isinstance(candidate, type) and issubclass(candidate, BaseModel):
            return candidate
    return None


def _field_lines(path: str, field: Any, note: str = "") -> list[str]:
    default = "required" if field.is_required() else f"default {_show(field.default)}"
    section = _section_type(field.annotation)
    type_name = _type_name(field.annotation)
    if section is not None:
        type_name = "list of sections" if typing.get_origin(field.annotation) is list \
            else "section | null"
    lines = [f"  {path}  ({type_name}, {default}){note}"]
    return lines + textwrap.wrap(field.description or "", width=96, initial_indent=" " * 6,
                                 subsequent_indent=" " * 6)


def _component_lines(registry: Registry, prefix: str, kinds: Sequence[str]) -> list[str]:
    """Each kind's own arguments, as ``prefix.field`` lines labelled with the kind."""
    lines = []
    for kind in kinds:
        try:
            fields = args_model(registry.resolve(kind)).model_fields
        except ComponentError as exc:
            lines.append(f"  {prefix}*  ({kind}: {exc})")
            continue
        for name, field in fields.items():
            lines += _field_lines(f"{prefix}{name}", field, f"  [{kind}]")
    return lines


# where each component kind's arguments go: (registry, section model, argument prefix)
_COMPONENT_SECTIONS = {
    "model": (ARCHITECTURES, "model."),
    "nonlinearity": (NONLINEARITIES, "nonlinearity."),
    "loss.extra": (LOSS_TERMS, "loss.extra[i]."),
    "data": (SOURCES, "data.args."),
}


def _help_lines(model: type[BaseModel], prefix: str, plugins: dict[str, list[str]]) -> list[str]:
    lines = []
    for name, field in model.model_fields.items():
        path = f"{prefix}{name}"
        section = _section_type(field.annotation)
        if section is not None and field.annotation is section:
            lines += _help_lines(section, f"{path}.", plugins)
            continue
        lines += _field_lines(path, field)
        if section is not None:  # an optional section, or a list of them: list its fields too
            lines += _help_lines(section, f"{path}[i]." if path == "loss.extra" else f"{path}.",
                                 plugins)
    key = prefix.rstrip(".").removesuffix("[i]")
    if key in _COMPONENT_SECTIONS:
        registry, args_prefix = _COMPONENT_SECTIONS[key]
        builtin = [k for k in registry.names()
                   if dataclasses.fields(registry.resolve(k)) or key == "loss.extra"]
        lines += _component_lines(registry, args_prefix, builtin + plugins.get(key, []))
    return lines


def _plugin_kinds(raw: Any) -> dict[str, list[str]]:
    """Import-path kinds a raw config names, by component section (for ``--help``)."""
    if not isinstance(raw, dict):
        return {}

    def get(*path: str) -> Any:
        node: Any = raw
        for part in path:
            node = node.get(part) if isinstance(node, dict) else None
        return node

    extra = get("loss", "extra")
    found = {"model": [get("model", "architecture")], "nonlinearity": [get("nonlinearity", "kind")],
             "data": [get("data", "source")],
             "loss.extra": [t.get("kind") for t in extra if isinstance(t, dict)]
             if isinstance(extra, list) else []}
    return {key: [k for k in kinds if isinstance(k, str) and ":" in k]
            for key, kinds in found.items()}


def config_help(raw: Any = None) -> str:
    """Every config field path with its type, default and description, for ``--help``; the
    arguments of each built-in component and of the plug-ins a raw config names."""
    head = "config fields (set in the JSON file or with --set PATH=VALUE):"
    return "\n".join([head, *_help_lines(Config, "", _plugin_kinds(raw))])


def _help_epilog(argv: Sequence[str]) -> str | None:
    """``config_help`` for a command line that asks for ``--help`` (None otherwise: it resolves
    every component), with the plug-ins its config and its ``--set`` overrides name when they
    read."""
    if not {"-h", "--help"} & set(argv):
        return None
    sets = [v for a, v in zip(argv, argv[1:], strict=False) if a == "--set"]
    sets += [a.removeprefix("--set=") for a in argv if a.startswith("--set=")]
    paths = [a for a in argv if a.endswith(".json") and not a.startswith("-") and a not in sets]
    try:
        raw = _read_json(Path(paths[0])) if paths else {}
        for text in sets:
            _apply_override(raw, *parse_override(text))
    except ConfigError:
        raw = None
    return config_help(raw)


def main_config(argv: Sequence[str] | None = None) -> tuple[Config, argparse.Namespace]:
    """Parse the command line and load the config; on a config error print it and exit 2."""
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = argparse.ArgumentParser(
        description="Train a crosslayer transcoder.",
        epilog=_help_epilog(argv),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "config", nargs="?", default=None,
        help="JSON config file (see configs/); optional with --resume (then RUN_DIR/config.json).",
    )
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="SECTION.FIELD=VALUE",
        help="Override one field; the value is parsed as JSON when it parses. Repeatable.",
    )
    parser.add_argument("--resume", metavar="RUN_DIR", default=None, help="Run folder to resume.")
    args = parser.parse_args(argv)
    if args.config is None and args.resume is None:
        parser.error("a config file is required (or --resume RUN_DIR)")
    config_path = args.config or Path(args.resume) / "config.json"
    try:
        cfg = load_config(config_path, args.set)
    except ConfigError as exc:
        for line in str(exc).splitlines():
            print(f"config error: {line}", file=sys.stderr)
        sys.exit(2)
    return cfg, args
