"""The one recipe every transform follows (jax ``_src/api.py`` style).

Validate eagerly; build the wrapper with ``functools.wraps``; give it ``init`` (the inner
step's ``init`` followed by this transform's); install the handler for the duration of
each call.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Protocol

from xform.core.state import TrainState

__all__ = ["Step", "TransformedStep", "init_of", "wrap"]


class Step(Protocol):
    """A training step: ``step(state, batch) -> (state, metrics)``."""

    def __call__(self, state: TrainState, batch: Any, /) -> tuple[TrainState, Any]: ...


class TransformedStep(Step, Protocol):
    """A step returned by a transform: callable, plus ``init(state) -> state``, which lays
    the state out for the transforms (adds their state, casts, shards)."""

    def init(self, state: TrainState, /) -> TrainState: ...


def init_of(step: Callable[..., Any]) -> Callable[[TrainState], TrainState]:
    init = getattr(step, "init", None)
    return init if callable(init) else (lambda state: state)


def check_step(api: str, step: Any) -> None:
    if not callable(step):
        raise TypeError(f"{api}: expected a step function step(state, batch) -> (state, metrics), got {step!r}")


def wrap(
    step: Callable[..., Any],
    call: Callable[[TrainState, Any], tuple[TrainState, Any]],
    init: Callable[[TrainState], TrainState],
    **attrs: Any,
) -> TransformedStep:
    """``call`` under ``step``'s name and docs, with ``init`` run after the inner one's."""
    inner_init = init_of(step)

    @functools.wraps(step)
    def transformed(state: TrainState, batch: Any):
        return call(state, batch)

    transformed.init = lambda state: init(inner_init(state))  # type: ignore[attr-defined]
    for k, v in attrs.items():
        setattr(transformed, k, v)
    return transformed  # type: ignore[return-value]
