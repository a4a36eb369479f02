"""Backends, chosen from a table, and the interface they reach the core through.

A backend says how a ``TrainState`` is laid out for a parallel strategy and how the
primitives run under it. Core names backends by import path only, so no backend's
dependency is imported before it is asked for.

What a backend may use of the core, besides the public API (``TrainState``'s leaves,
``Handler``/``Reducer`` from ``xform.core.primitives``, the optimizer helpers of
``xform.core.optim``), is the few functions below: nothing else of a state's private
parts.

- ``static(state)``: the state's static part, read-only: ``module``, ``optimizer`` (the
  factory ``params -> torch.optim.Optimizer``), ``trainable`` (names, in order),
  ``max_grad_norm``, ``device``.
- ``cached(state, key, make)``: a value bound to the state's tensors (an optimizer over
  views of them, a bucket plan), made once by ``make()`` and shared by the states that
  updates make in place; a state rebuilt from leaves gets a fresh cache.
- ``relaid(state, by, **leaves)``: the state over tensors laid out anew (sharded, cast);
  the old state, and every state sharing its tensors, is donated to it (``by`` says to
  what, in the error a later use raises).
- ``moved(state, device, by, **leaves)``: ``relaid`` onto another device (XLA).
"""

from __future__ import annotations

import importlib
import os
from typing import Any, Protocol

import torch

from xform.core.primitives import Handler
from xform.core.state import TrainState

__all__ = [
    "Backend", "Layout", "BACKENDS", "available_backends", "get_backend", "static", "cached", "relaid", "moved",
]


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
    #
    # Optional, for a layout whose engine runs the whole step (DeepSpeed: backward,
    # accumulation, loss scale, update; XLA: the step traced as one graph, ended by the
    # graph boundary). ``shard`` checks the layout tag, then calls it instead of the step:
    #
    #   run(state, batch) -> (state, metrics)
    #
    # Optional on a handler (a pipeline): ``prepare(step, state, batch)``, called under the
    # handler before the step, to collect what the schedule needs (each micro-batch's loss).


class Backend(Protocol):
    name: str

    def layout(self, strategy: Any, mesh: Any, *, inner: Any = None) -> Layout:
        """The layout of ``strategy`` on ``mesh`` (None: every process, one axis);
        ``inner`` is the step being sharded (its ``policy`` sets gather dtypes)."""


def static(state: TrainState) -> Any:
    """The static part of ``state``: ``module``, ``optimizer``, ``trainable``,
    ``max_grad_norm``, ``device`` (read-only)."""
    return state._spec


def cached(state: TrainState, key: Any, make: Any) -> Any:
    """``make()``'s value, made once per set of tensors (see the module docs)."""
    extras = state._runtime("TrainState.apply_gradients").extras
    value = extras.get(key)
    if value is None:
        value = extras[key] = make()
    return value


def moved(state: TrainState, device: Any, by: str, **leaves: Any) -> TrainState:
    """The state over ``leaves`` that now live on ``device`` (its static ``device`` too);
    donates ``state`` as ``relaid`` does."""
    return state._moved(torch.device(device), by, **leaves)


def relaid(state: TrainState, by: str, **leaves: Any) -> TrainState:
    """The state over re-laid-out tensors ``leaves``; donates ``state`` (see the module docs)."""
    return state._relaid(by, **leaves)


# The one table of backends: name -> "module:class", or None for a backend that is named
# (the launch settings accept it) but not built in this version.
BACKENDS: dict[str, str | None] = {
    "torch": "xform.backends.torch_native:TorchBackend",
    "deepspeed": "xform.backends.deepspeed:DeepSpeedBackend",
    "xla": "xform.backends.xla:XlaBackend",
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
