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

__all__ = ["Backend", "Layout", "BACKENDS", "available_backends", "get_backend"]


class Layout(Protocol):
    """A strategy bound to a backend and a mesh."""

    def init(self, state: TrainState) -> TrainState:
        """Lays ``state`` out (replicates, shards)."""

    def handler(self) -> Handler:
        """A fresh handler for one call of the step."""

    # Optional, for a layout whose optimizer runs on this process's shards only (ZeRO-1/2
    # over own code). ``shard`` then makes the base ``update`` call ``optimizer_update``, so
    # that every handler of ``update`` (the loss scale's unscale and skip) still wraps the
    # one real update:
    #
    #   runs_optimizer: bool                       (a property: True once there is a group)
    #   group() -> (process group, rank, world)    the group the shards are spread over
    #   owned_squares(state, grads) -> Tensor|None the float64 sum of squares of this
    #       process's gradient shards when clipping needs the global norm (shard folds it
    #       into its one agreement all-reduce), else None
    #   optimizer_update(state, grads, squares) -> opt_state   the update on the shards,
    #       params gathered after; ``squares`` is ``owned_squares`` summed over the group


class Backend(Protocol):
    name: str

    def layout(self, strategy: Any, mesh: Any, *, inner: Any = None) -> Layout:
        """The layout of ``strategy`` on ``mesh`` (None: every process, one axis);
        ``inner`` is the step being sharded (its ``policy`` sets gather dtypes)."""


# The one table of backends: name -> "module:class", or None for a backend that is named
# (the launch settings accept it) but not built in this version.
BACKENDS: dict[str, str | None] = {
    "torch": "xform.backends.torch_native:TorchBackend",
    "deepspeed": None,
    "xla": None,
}


def available_backends() -> list[str]:
    return [k for k, v in BACKENDS.items() if v is not None]


def get_backend(name: str | None = None, *, api: str = "shard") -> Backend:
    """The backend called ``name``; by default ``$XFORM_BACKEND`` or ``"torch"``."""
    name = name or os.environ.get("XFORM_BACKEND") or "torch"
    if name not in BACKENDS:
        raise ValueError(f"{api}: unknown backend {name!r}; the backends are {sorted(BACKENDS)}")
    if BACKENDS[name] is None:
        raise ValueError(
            f"{api}: backend {name!r} is not available in this version of xform; the available backend is "
            f"{available_backends()} (set it with xform config --backend torch)"
        )
    module, _, attr = BACKENDS[name].partition(":")
    return getattr(importlib.import_module(module), attr)()
