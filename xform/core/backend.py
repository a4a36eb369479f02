"""Backends, chosen from a table.

A backend says how a ``TrainState`` is laid out for a parallel strategy and how the
primitives run under it. Core names backends by import path only, so no backend's
dependency is imported before it is asked for.
"""

from __future__ import annotations

import importlib
import os
from typing import Any, Protocol

from xform.core.primitives import Handler
from xform.core.state import TrainState

__all__ = ["Backend", "Layout", "BACKENDS", "get_backend"]


class Layout(Protocol):
    """A strategy bound to a backend and a mesh."""

    def init(self, state: TrainState) -> TrainState:
        """Lays ``state`` out (replicates, shards)."""

    def handler(self) -> Handler:
        """A fresh handler for one call of the step."""


class Backend(Protocol):
    name: str

    def layout(self, strategy: Any, mesh: Any, *, inner: Any = None) -> Layout:
        """The layout of ``strategy`` on ``mesh`` (None: every process, one axis);
        ``inner`` is the step being sharded (its ``policy`` sets gather dtypes)."""


BACKENDS: dict[str, str] = {
    "torch": "xform.backends.torch_native:TorchBackend",
}


def get_backend(name: str | None = None) -> Backend:
    """The backend called ``name``; by default ``$XFORM_BACKEND`` or ``"torch"``."""
    name = name or os.environ.get("XFORM_BACKEND") or "torch"
    if name not in BACKENDS:
        raise ValueError(f"shard: unknown backend {name!r}; the backends are {sorted(BACKENDS)}")
    module, _, attr = BACKENDS[name].partition(":")
    return getattr(importlib.import_module(module), attr)()
