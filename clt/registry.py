"""Component registries: the nonlinearity, architecture, activation source and extra loss terms
a config names by ``kind``.

A kind is a registered name (the built-ins below) or an import path ``package.module:Class`` of a
user's class, so a plug-in needs no change to this project. A component class is a dataclass
whose fields are its config arguments (types and defaults; ``field(metadata={"help": ...})``
for ``--help``; range checks in ``__post_init__`` raising ``ValueError("field must ...")``,
reported as that field's error): ``clt.config`` builds
the strict pydantic model of those fields, and the run's saved config keeps the kind as written,
so evaluate, export and resume import the same class again.

Imports nothing heavy: built-ins are import paths resolved on first use, and this module stays
importable without pydantic (the GPU bench machines have none).
"""

from __future__ import annotations

import dataclasses
import importlib
import traceback
from typing import Any


class ComponentError(ValueError):
    """A kind that names no registered component, or an import path that does not resolve to
    one; the message says which and what is available."""


class Registry:
    """Names of one component kind mapped to ``"module:attr"`` import paths."""

    def __init__(self, what: str, base: str, builtins: dict[str, str]) -> None:
        self.what = what
        self.base = base  # "module:attr" of the class every component of this kind derives from
        self._paths = dict(builtins)

    def names(self) -> list[str]:
        return list(self._paths)

    def register(self, name: str, path: str) -> None:
        """Add a named component (``path``: ``"module:attr"``); a taken name is an error."""
        if name in self._paths and self._paths[name] != path:
            raise ComponentError(f"{self.what} {name!r} is registered already "
                                 f"({self._paths[name]})")
        self._paths[name] = path

    def resolve(self, kind: str) -> type:
        """The class a kind names: a registered name or ``package.module:Class``."""
        if not isinstance(kind, str) or not kind:
            raise ComponentError(f"a {self.what} kind is a name or 'package.module:Class', "
                                 f"got {kind!r}")
        path = self._paths.get(kind)
        if path is None and ":" not in kind:
            raise ComponentError(f"unknown {self.what} {kind!r}: one of {self.names()} or an "
                                 f"import path 'package.module:Class'")
        cls = load_path(path or kind, self.what)
        base = load_path(self.base, self.what)
        if not (isinstance(cls, type) and issubclass(cls, base)
                and dataclasses.is_dataclass(cls)):
            raise ComponentError(f"{self.what} {kind!r} is not a dataclass subclass of "
                                 f"{self.base.replace(':', '.')}")
        return cls

    def build(self, kind: str, args: dict[str, Any]) -> Any:
        """An instance of ``kind`` from already validated arguments."""
        obj = self.resolve(kind)(**args)
        obj.kind = kind
        return obj


def load_path(path: str, what: str = "component") -> Any:
    """The object an import path ``package.module:attr`` names."""
    module_name, _, attr = path.partition(":")
    if not module_name or not attr:
        raise ComponentError(f"{what} {path!r}: an import path is 'package.module:Class'")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        raise ComponentError(f"{what} {path!r}: cannot import {module_name} ({exc}); is its "
                             f"package installed or on PYTHONPATH?") from None
    except Exception as exc:  # the plug-in's own module fails: say where, in one line
        raise ComponentError(f"{what} {path!r}: importing {module_name} failed: "
                             f"{type(exc).__name__}: {exc}{_raised_at(exc)}") from None
    try:
        return getattr(module, attr)
    except AttributeError:
        raise ComponentError(f"{what} {path!r}: {module_name} has no {attr!r}") from None


def _raised_at(exc: BaseException) -> str:
    """`` (file:line)`` of the innermost frame an exception passed through (a SyntaxError's
    message names its place already)."""
    frames = traceback.extract_tb(exc.__traceback__)
    if isinstance(exc, SyntaxError) or not frames:
        return ""
    return f" ({frames[-1].filename}:{frames[-1].lineno})"


NONLINEARITIES = Registry("nonlinearity", "clt.nonlinearities:Nonlinearity", {
    "topk": "clt.nonlinearities:TopK",
    "batchtopk": "clt.nonlinearities:BatchTopK",
    "jumprelu": "clt.nonlinearities:JumpReLU",
    "relu": "clt.nonlinearities:ReLU",
})
ARCHITECTURES = Registry("architecture", "clt.encoder:Architecture", {
    "transcoder": "clt.model:Transcoder",
    "molt": "clt.molt:MOLT",
})
SOURCES = Registry("activation source", "clt.data.sources:Source", {
    "lm": "clt.data.sources:LMSource",
    "synthetic": "clt.data.sources:SyntheticSource",
})
# the built-in objective's terms are the config's loss section; this holds users' extra terms
LOSS_TERMS = Registry("loss term", "clt.losses:LossTerm", {})
