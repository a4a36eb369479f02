"""The one recipe every transform follows (jax ``_src/api.py`` style).

Validate eagerly; build the wrapper with ``functools.wraps``; give it ``init`` (the inner
step's ``init`` followed by this transform's); install the handler for the duration of
each call. A transformed step carries ``step.xform``, a ``Transforms`` record of what
wraps it (innermost first, each with its settings): nesting rules and backends read
that record, never ad-hoc attributes.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Protocol

import attrs

from xform.core.primitives import handlers
from xform.core.state import TrainState
from xform.distributed.runtime import step_failure

__all__ = [
    "Applied", "Step", "Transforms", "TransformedStep", "check_result", "commuting", "init_of", "transforms_of", "wrap",
]


@attrs.frozen
class Applied:
    """One transform applied to a step: its name and its settings."""

    name: str
    settings: tuple[tuple[str, Any], ...] = ()

    def __getitem__(self, key: str) -> Any:
        for k, v in self.settings:
            if k == key:
                return v
        raise KeyError(f"{self.name} has no setting {key!r}; its settings are {[k for k, _ in self.settings]}")


@attrs.frozen
class Transforms:
    """What wraps a step, innermost first (``step.xform``).

    Example:
        >>> import torch, xform as xf
        >>> def step(state, batch):
        ...     loss, grads = xf.value_and_grad(lambda p: xf.apply(state, p, batch).sum())(state.params)
        ...     return state.apply_gradients(grads), {"loss": loss}
        >>> wrapped = xf.accumulate(xf.mixed_precision(step, "bf16"), 4)
        >>> wrapped.xform.names
        ('mixed_precision', 'accumulate')
        >>> wrapped.xform.find("accumulate")["steps"]
        4
    """

    applied: tuple[Applied, ...] = ()

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(a.name for a in self.applied)

    def __contains__(self, name: object) -> bool:
        return any(a.name == name for a in self.applied)

    def find(self, name: str) -> Applied | None:
        """The innermost application of transform ``name``, or None."""
        return next((a for a in self.applied if a.name == name), None)

    def setting(self, name: str, key: str, default: Any = None) -> Any:
        """Setting ``key`` of the innermost ``name``, or ``default`` when not applied."""
        applied = self.find(name)
        return default if applied is None else applied[key]

    def then(self, name: str, **settings: Any) -> "Transforms":
        """This record with ``name`` applied outside it."""
        return Transforms(self.applied + (Applied(name, tuple(settings.items())),))


def transforms_of(step: Any) -> Transforms:
    """The record of what wraps ``step`` (empty for a plain step)."""
    record = getattr(step, "xform", None)
    return record if isinstance(record, Transforms) else Transforms()


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


def check_result(api: str, out: Any) -> Any:
    """``out`` when it is a ``(state, metrics)`` pair whose state is a ``TrainState``;
    otherwise an error naming ``api``. An isinstance and a len check: no pytree walk."""
    if type(out) is tuple and len(out) == 2 and type(out[0]) is TrainState:  # the common case
        return out
    if isinstance(out, (tuple, list)) and len(out) == 2 and isinstance(out[0], TrainState):
        return out
    raise _bad_result(api, out)


def _bad_result(api: str, out: Any) -> Exception:
    head = f"{api}: the step returned"
    if not isinstance(out, (tuple, list)):
        return TypeError(
            f"{head} a {type(out).__name__}, not a (state, metrics) pair; "
            "return state.apply_gradients(grads), metrics"
        )
    if len(out) != 2:
        return ValueError(
            f"{head} a {type(out).__name__} of {len(out)} values; a step returns (state, metrics): "
            "put extra outputs in the metrics"
        )
    got = f"({type(out[0]).__name__}, {type(out[1]).__name__})"
    if isinstance(out[1], TrainState):
        return TypeError(f"{head} {got}; a step returns (state, metrics), state first")
    return TypeError(
        f"{head} {got}; a step returns (state, metrics) whose state is the TrainState from "
        "state.apply_gradients(grads)"
    )


def wrap(
    step: Callable[..., Any],
    call: Callable[[TrainState, Any], tuple[TrainState, Any]],
    init: Callable[[TrainState], TrainState],
    *,
    name: str,
    api: str | None = None,
    commutes: Callable[[Callable[..., Any]], Callable[[TrainState, Any], Any]] | None = None,
    **settings: Any,
) -> TransformedStep:
    """``call`` under ``step``'s name and docs, with ``init`` run after the inner one's.

    ``commutes``, for a transform T that means the same inside or outside ``accumulate``:
    ``commutes(c)`` is T's call around another call ``c`` (``call`` is
    ``commutes(step)``). ``accumulate`` then runs ``accumulate(T(s))`` as ``T(accumulate(s))``,
    T's work once per step rather than once per micro-batch (see ``commuting``).

    The transformed step checks what ``call`` returns (``check_result``), and turns a
    failed collective inside it or its ``init`` (a dead or hung peer) into an
    ``xf.DistributedError`` naming the rank, the step and the phase. ``name`` and
    ``settings`` are added to the step's ``Transforms`` record (``step.xform``); ``api``
    names the transform in errors (by default ``name``).
    """
    inner_init = init_of(step)
    record = transforms_of(step).then(name, **settings)
    if api is None:
        api = name
    comm_api = "shard" if "shard" in record else api  # the transform whose collectives can fail

    @functools.wraps(step)
    def transformed(state: TrainState, batch: Any):
        if type(state) is not TrainState and not isinstance(state, TrainState):
            raise TypeError(
                f"{api}: expected a TrainState as the first argument, got {type(state).__name__}; call "
                "step(state, batch) with state = step.init(xf.TrainState.create(...))"
            )
        try:
            out = call(state, batch)
        except RuntimeError as e:
            if handlers():  # nested in another transformed step: the outermost one explains it
                raise
            failure = step_failure(comm_api, e, state)
            if failure is None:
                raise
            raise failure from e
        if type(out) is tuple and len(out) == 2 and type(out[0]) is TrainState:
            return out
        return check_result(api, out)

    def init_all(state: TrainState) -> TrainState:
        try:
            return init(inner_init(state))
        except RuntimeError as e:
            failure = step_failure(comm_api, e, state, phase="step.init (laying the state out)")
            if failure is None:
                raise
            raise failure from e

    transformed.init = init_all  # type: ignore[attr-defined]
    transformed.xform = record  # type: ignore[attr-defined]
    # (functools.wraps copied the inner step's; the identity says whose it is, see commuting)
    transformed._xform_commutes = None if commutes is None else (transformed, step, commutes)  # type: ignore[attr-defined]
    return transformed  # type: ignore[return-value]


def commuting(step: Callable[..., Any]) -> tuple[Callable[..., Any], Callable[..., Any]] | None:
    """``(inner, around)`` when ``step`` is ``T(inner)`` for a transform T made with
    ``wrap(..., commutes=around)``; None for any other step, including a function that
    merely wraps such a step with ``functools.wraps`` (which copies the attribute, not
    the identity it is checked against)."""
    found = getattr(step, "_xform_commutes", None)
    if found is None or found[0] is not step:
        return None
    return found[1], found[2]
