"""``accumulate``: the step on a batch, computed as k micro-batches.

Nesting: ``accumulate`` may sit inside or outside ``mixed_precision`` with the same
meaning (see ``xform.transforms.mixed_precision``); ``accumulate(mixed_precision(s))`` runs as
``mixed_precision(accumulate(s))``, the policy's handler installed once per step (``wrap``'s
``commutes``). ``accumulate(accumulate(step, a), b)`` runs a*b micro-batches. Outside
``shard``, it holds communication until the last micro-batch.
"""

from __future__ import annotations

import fractions
from collections.abc import Mapping
from typing import Any, Callable

import optree
import torch

from xform import tree
from xform.core.mean import Mean
from xform.core.primitives import Reducer, installed, rng_guard
from xform.core.state import TrainState
from xform.core.transform import check_result, check_step, commuting, transforms_of, wrap

__all__ = ["accumulate", "split_batch", "combine_metrics"]


class _Handler(Reducer):
    """Sums micro-batch gradients (and item counts); passes the sums on at the last one."""

    def __init__(self, steps: int):
        super().__init__()
        self.pieces = steps
        self.reset()

    def reset(self) -> None:
        """The state of a fresh call; also drops the last call's tensors (the handler is
        reused across calls, see ``accumulate``)."""
        self.pending = None
        self.micro = 0
        self.calls = 0  # apply_gradients calls seen in this micro-batch
        self.grads: list[torch.Tensor] | None = None
        self.names: list[str] | None = None
        self.count: Any = 0
        self.folded = False  # the last micro-batch's gradients already include the sums

    def at_last_piece(self) -> bool:
        return self.micro == self.pieces - 1

    def fold(self) -> dict[str, torch.Tensor] | None:
        if self.grads is None or self.micro != self.pieces - 1:
            return None
        self.folded = True
        return dict(zip(self.names, self.grads))

    def apply_gradients(self, state, grads, count, next):
        self.calls += 1
        if self.calls > 1:
            raise RuntimeError(
                f"accumulate: the step called apply_gradients twice on micro-batch {self.micro}; "
                "a step must call it exactly once"
            )
        self.count = _add_counts(self.count, self.take_count(count), self.memo)
        if self.folded:
            return next(state, grads, self.count)
        if self.grads is None:
            self.names = list(grads)
            self.grads = list(grads.values())  # fresh tensors from autograd: adopted, not copied
        else:
            torch._foreach_add_(self.grads, [grads[k] for k in self.names])
        if self.micro < self.pieces - 1:
            return state
        return next(state, dict(zip(self.names, self.grads)), self.count)


def _metrics_mismatch(metrics: list[Any]) -> ValueError | None:
    """The error for metrics whose structure differs between micro-batches, naming the
    first that differs; None when they all agree (the failure was something else)."""
    first = optree.tree_structure(metrics[0], is_leaf=_is_mean, namespace=tree.NAMESPACE)
    for i, m in enumerate(metrics[1:], 1):
        if optree.tree_structure(m, is_leaf=_is_mean, namespace=tree.NAMESPACE) != first:
            return ValueError(
                f"accumulate: micro-batch {i} returned metrics of another structure than micro-batch 0 "
                f"({_shape_of(m)} vs {_shape_of(metrics[0])}); return the same metrics from every micro-batch"
            )
    return None


def _is_mean(x: Any) -> bool:
    return isinstance(x, Mean)


def _shape_of(metrics: Any) -> str:
    return repr(sorted(metrics, key=repr)) if isinstance(metrics, dict) else type(metrics).__name__


def _add_counts(a: Any, b: Any, memo: dict[Any, fractions.Fraction]) -> Any:
    if type(a) is int and a == 0:  # the first micro-batch
        return b
    if type(a) is fractions.Fraction and type(b) is fractions.Fraction:  # plain mean losses: memoized sums
        # keyed by identity (hashing a Fraction runs Python code): the entry holds both
        # terms, so neither id is reused while it exists
        hit = memo.get((id(a), id(b)))
        if hit is None or hit[0] is not a or hit[1] is not b:
            hit = memo[(id(a), id(b))] = (a, b, a + b)
        return hit[2]
    if isinstance(a, fractions.Fraction) != isinstance(b, fractions.Fraction):
        raise ValueError(
            "accumulate: some micro-batches returned a plain loss and others an xf.Mean; "
            "return the same kind of loss from every micro-batch"
        )
    return a + b


def accumulate(step: Callable[..., Any], steps: int):
    """Runs ``step`` on ``steps`` micro-batches of each batch, with one optimizer update.

    ``accumulate(step, k)(state, batch)`` equals ``step(state, batch)``: the gradient is
    the full batch's. Losses returned as ``xf.Mean(total, count)`` are normalized by the
    total count over all micro-batches, so uneven item counts (tokens) still give the
    full-batch gradient; a plain scalar loss is taken to be a mean over the (equal)
    micro-batches. Metrics are combined: ``xf.Mean`` pooled, floating tensors and floats
    averaged, integer tensors and ints summed, anything else the last value.

    Args:
        step: a step ``step(state, batch) -> (state, metrics)`` that calls
            ``apply_gradients`` once.
        steps: the number of micro-batches; the batch's leading dimension must be a
            multiple of it. Tensors and numpy arrays are split along dim 0, lists of
            per-example items (strings, token ids) into slices; scalars and strings are
            passed to every micro-batch; anything else is refused (``split_batch``).

    ``accumulate(step, 1) is step``.

    Example:
        >>> import torch, xform as xf
        >>> def step(state, batch):
        ...     loss, grads = xf.value_and_grad(lambda p: xf.apply(state, p, batch).square().mean())(state.params)
        ...     return state.apply_gradients(grads), {"loss": loss}
        >>> state = xf.TrainState.create(torch.nn.Linear(4, 2), optimizer=torch.optim.SGD, lr=0.1)
        >>> state, metrics = xf.accumulate(step, 4)(state, torch.ones(8, 4))
        >>> state.step
        1
    """
    check_step("accumulate", step)
    if isinstance(steps, bool) or not isinstance(steps, int):
        raise TypeError(f"accumulate: steps must be an int, got {steps!r}")
    if steps < 1:
        raise ValueError(f"accumulate: steps must be >= 1, got {steps}")
    if steps == 1:
        return step

    # accumulate(T(s)) for a transform T that commutes with accumulate (mixed_precision) runs
    # as T(accumulate(s)): T's handler installed once per step, not once per micro-batch
    commuted = commuting(step)
    inner = step if commuted is None else commuted[0]
    # what a bad result of `inner` is blamed on: the innermost transform as written
    blame = "accumulate" if commuted is None else transforms_of(step).applied[-1].name
    free: list[_Handler] = []  # a handler not in use, reused by the next call (none while one runs)

    def call(state: TrainState, batch: Any):
        micro_batches = split_batch("accumulate", batch, steps)
        handler = free.pop() if free else _Handler(steps)  # atomic: a concurrent call makes its own
        metrics = []
        try:
            with installed(handler, reused=True), rng_guard(state._runtime("accumulate").generator) as rng:
                for i, micro_batch in enumerate(micro_batches):
                    handler.micro, handler.calls = i, 0
                    rng.piece(i)  # rng_salt(i) for this micro-batch
                    out = inner(state, micro_batch)
                    if not (type(out) is tuple and len(out) == 2 and type(out[0]) is TrainState):
                        out = check_result(blame, out)
                    state, m = out
                    if handler.calls != 1:
                        raise RuntimeError(
                            f"accumulate: the step did not call state.apply_gradients on micro-batch {i}; "
                            "a step must call it exactly once"
                        )
                    metrics.append(m)
        finally:
            handler.reset()
            if not free:
                free.append(handler)
        try:
            return state, combine_metrics(metrics)
        except (ValueError, TypeError) as e:
            raise _metrics_mismatch(metrics) or e

    return wrap(
        step, call if commuted is None else commuted[1](call), lambda state: state,
        name="accumulate", steps=steps,
    )


def split_batch(api: str, batch: Any, k: int) -> list[Any]:
    """Splits ``batch`` into ``k`` equal micro-batches along its batch dimension.

    What each leaf of the batch becomes:

    - a tensor or numpy array with a dimension: split along dim 0 (views, no copies);
      its leading size is the batch size, the same for all of them;
    - a list or tuple holding no tensor or array (strings, token ids, ragged lists,
      one item per example): split into slices of the same type; its length must be
      the batch size (it gives the batch size when there is no tensor or array);
    - a Python scalar, a string, a 0-d tensor or array, a dtype or device: not
      per-example, passed to every micro-batch;
    - anything else: refused (it could be per-example, and would reach every
      micro-batch whole).

    Containers that hold a tensor (a dict, a tuple ``(x, y)``, a namedtuple) are walked.
    """
    fast = _split_flat(batch, k)
    if fast is not None:
        return fast
    paths, leaves, spec = optree.tree_flatten_with_path(batch, is_leaf=_is_sequence_leaf, namespace=tree.NAMESPACE)
    kinds = [_kind(api, path, leaf, k) for path, leaf in zip(paths, leaves)]
    size = _batch_size(api, paths, leaves, kinds, k) // k
    pieces = []
    for kind, leaf in zip(kinds, leaves):
        if kind is _TENSOR:
            pieces.append(leaf.split(size))
        elif kind is _SHARED:
            pieces.append((leaf,) * k)
        else:  # numpy arrays and sequences slice alike
            pieces.append([leaf[i * size : (i + 1) * size] for i in range(k)])
    return [optree.tree_unflatten(spec, [p[i] for p in pieces]) for i in range(k)]


_TENSOR, _ARRAY, _SEQUENCE, _SHARED = "tensor", "array", "sequence", "shared"
_SHARED_TYPES = (bool, int, float, complex, str, bytes, torch.dtype, torch.device)


def _is_numpy(x: Any) -> bool:
    return type(x).__module__ == "numpy" and hasattr(x, "ndim")  # numpy itself is never imported


def _holds_arrays(x: Any) -> bool:
    if isinstance(x, torch.Tensor) or _is_numpy(x):
        return True
    if isinstance(x, (list, tuple)):
        return any(_holds_arrays(v) for v in x)
    if isinstance(x, dict):
        return any(_holds_arrays(v) for v in x.values())
    return False


def _is_sequence_leaf(x: Any) -> bool:
    """A plain list or tuple of per-example items: split as one leaf, not walked."""
    return type(x) in (list, tuple) and len(x) > 0 and not _holds_arrays(x)


def _where(path: tuple[Any, ...]) -> str:
    return "batch" + "".join(f"[{key!r}]" for key in path)


def _kind(api: str, path: tuple[Any, ...], leaf: Any, k: int) -> str:
    if isinstance(leaf, torch.Tensor):
        return _TENSOR if leaf.dim() > 0 else _SHARED
    if _is_numpy(leaf):
        return _ARRAY if leaf.ndim > 0 else _SHARED
    if type(leaf) in (list, tuple):
        return _SEQUENCE
    if isinstance(leaf, _SHARED_TYPES):
        return _SHARED
    hint = f" (a mapping: pass dict({_where(path)}))" if isinstance(leaf, Mapping) else ""
    raise TypeError(
        f"{api}: {_where(path)} is of type {type(leaf).__name__}, which cannot be split into {k} "
        f"micro-batches; pass tensors, numpy arrays, or lists with one item per example{hint}"
    )


def _batch_size(api: str, paths, leaves, kinds, k: int) -> int:
    """The leading size of the batch, read from its first tensor (else numpy array, else
    list), divisible by ``k``; an error naming the first leaf that disagrees."""
    by_kind: dict[str, list[tuple[Any, Any, str]]] = {_TENSOR: [], _ARRAY: [], _SEQUENCE: []}
    for path, leaf, kind in zip(paths, leaves, kinds):
        if kind is not _SHARED:
            by_kind[kind].append((path, leaf, kind))
    ordered = by_kind[_TENSOR] + by_kind[_ARRAY] + by_kind[_SEQUENCE]
    if not ordered:
        raise ValueError(f"{api}: the batch has no tensor with a batch dimension to split into {k} pieces")
    n, source = len(ordered[0][1]), _where(ordered[0][0])
    for path, leaf, kind in ordered:
        if len(leaf) == n:
            continue
        if kind is _SEQUENCE:
            raise ValueError(
                f"{api}: {_where(path)} is a {type(leaf).__name__} of {len(leaf)} items but the batch size is {n}; "
                f"give it one item per example (it is split into {k} micro-batches), or pass values shared by "
                "all examples outside the batch"
            )
        raise ValueError(
            f"{api}: {_where(path)} has leading size {len(leaf)} but the batch size is {n} (from {source}); "
            "every tensor in a batch needs the same batch dimension"
        )
    if n % k:
        bigger = (n // k + 1) * k
        divisors = [d for d in range(1, n + 1) if n % d == 0]
        closest = min(divisors, key=lambda d: (abs(d - k), -d))
        raise ValueError(
            f"{api}: batch size {n} is not divisible by steps={k}; pass a batch of {bigger} or use steps={closest}"
        )
    return n


def _split_flat(batch: Any, k: int) -> list[Any] | None:
    """The common batch, a dict, tuple or list of tensors of one divisible size, split
    without the pytree machinery; None for anything else (the general path)."""
    kind = type(batch)
    if kind is tuple or kind is list:
        tensors = batch
    elif kind is dict:
        tensors = list(batch.values())
    else:
        return None
    n = -1
    for t in tensors:
        if type(t) is not torch.Tensor or not t.dim():  # 0-d: passed whole to every micro-batch (the general path)
            return None
        size = t.size(0)
        if n < 0:
            n = size
        elif size != n:
            return None
    if n <= 0 or n % k:  # also an empty batch (n < 0)
        return None
    pieces = zip(*[t.chunk(k) for t in tensors])  # k equal views (n divisible by k): chunk is split without its Python
    if kind is dict:
        keys = list(batch)
        return [dict(zip(keys, p)) for p in pieces]
    return list(pieces) if kind is tuple else [list(p) for p in pieces]


def combine_metrics(metrics: list[Any]) -> Any:
    """Pools per-piece metrics: Mean pooled, floats averaged, integers summed."""

    def combine(*xs: Any) -> Any:
        x = xs[0]
        if isinstance(x, Mean):
            out = xs[0]
            for m in xs[1:]:
                out = out + m
            return out
        if isinstance(x, torch.Tensor):
            return _pool_tensors(xs)
        if isinstance(x, bool):
            return xs[-1]
        if isinstance(x, int):
            return sum(xs)
        if isinstance(x, float):
            return sum(xs) / len(xs)
        return xs[-1]

    first = metrics[0]
    if type(first) is dict:  # the common case, directly: dicts with the same keys of tensors or Means
        keys, out = first.keys(), {}
        for m in metrics:
            if type(m) is not dict or m.keys() != keys:
                break
        else:
            for key, x in first.items():
                if type(x) is torch.Tensor:
                    out[key] = _pool_tensors([m[key] for m in metrics])
                elif type(x) is Mean:
                    out[key] = combine(*(m[key] for m in metrics))
                else:
                    break
            else:
                return out
    return optree.tree_map(
        combine, first, *metrics[1:], is_leaf=lambda x: isinstance(x, Mean), namespace=tree.NAMESPACE
    )


def _pool_tensors(xs: Any) -> torch.Tensor:
    """The micro-batches' values of one tensor metric: floating ones averaged, others summed."""
    x = xs[0]
    total = x.detach() if x.requires_grad else x  # value_and_grad's values come detached
    for t in xs[1:]:
        total = total + (t.detach() if t.requires_grad else t)
    return total / len(xs) if x.is_floating_point() or x.is_complex() else total
