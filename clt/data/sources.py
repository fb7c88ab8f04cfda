"""Activation source components (``data.source``): where a run's ``(x, y)`` activations come from.

A source is a dataclass (its fields are ``data.args``; the built-ins read their own sections,
``data.lm`` and ``data.synthetic``) whose :meth:`Source.build` returns a stream with
``d_in``, ``d_out``, ``next_batch(n) -> (x [L, n, d_in], y [L, n, d_out])``,
``heldout_batches(n_tokens) -> [(x, y), ...]`` (the same on every process),
``state_dict()`` / ``load_state_dict(state)`` (an exact resume) and ``close()``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from . import lm_source
from .synthetic import PlantedDictionary


@dataclass
class Source:
    """Base class of activation sources."""

    kind: ClassVar[str] = ""
    # activations of a language model: replacement-model metrics, graphs and pages apply
    has_lm: ClassVar[bool] = False

    def n_layers(self) -> int | None:
        """Layers the source provides (None: unknown until it is built)."""
        return None

    def build(self, cfg: Any, device: Any, shard: tuple[int, int]) -> Any:
        """The stream; ``shard = (i, n)``: the i-th of n processes. The processes of a
        tensor-parallel group each draw ``1/P`` of a batch, concatenated in rank order
        (``clt.parallel.ShardedSource``)."""
        raise NotImplementedError


@dataclass
class LMSource(Source):
    """A frozen language model's MLP activations on a token stream (``data.lm``), optionally
    through an on-disk activation cache."""

    kind: ClassVar[str] = "lm"
    has_lm: ClassVar[bool] = True

    def build(self, cfg: Any, device: Any, shard: tuple[int, int]) -> Any:
        return lm_source(cfg, device, shard)


@dataclass
class SyntheticSource(Source):
    """A planted dictionary (``data.synthetic``): known features, for tests and recovery
    checks."""

    kind: ClassVar[str] = "synthetic"

    def build(self, cfg: Any, device: Any, shard: tuple[int, int]) -> Any:
        return PlantedDictionary(**cfg.data.synthetic.model_dump(), shard=shard[0])
