"""``Mean``: a loss that is a sum over a number of items, normalized where it is pooled."""

from __future__ import annotations

from typing import Any

import optree
import torch

from xform.tree import NAMESPACE


class Mean:
    """``total / count``, kept as its two parts so that means pool exactly.

    Return ``xf.Mean(loss_sum, n_tokens)`` from a loss function when the loss is a sum
    over a variable number of items. ``accumulate`` and ``shard`` then divide the summed
    gradient by the total count over all micro-batches and ranks, so uneven micro-batches
    still give the gradient of the full batch. As a metric, ``Mean`` pools the same way.

    Example:
        >>> import torch, xform as xf
        >>> m = xf.Mean(torch.tensor(6.0), 3) + xf.Mean(torch.tensor(4.0), 1)
        >>> float(m)
        2.5
    """

    __slots__ = ("total", "count")

    def __init__(self, total: Any, count: Any):
        if not isinstance(total, torch.Tensor):
            total = torch.as_tensor(total, dtype=torch.get_default_dtype())
        if isinstance(count, bool) or not isinstance(count, (int, float, torch.Tensor)):
            raise TypeError(
                f"xf.Mean: count must be a number or a tensor, got {type(count).__name__}; "
                "pass the number of items the total sums over, e.g. (labels != -100).sum()"
            )
        object.__setattr__(self, "total", total)
        object.__setattr__(self, "count", count)

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError(f"xf.Mean is immutable: cannot assign to field {name!r}")

    @property
    def value(self) -> torch.Tensor:
        """``total / count`` as a tensor."""
        return self.total / self.count

    def item(self) -> float:
        return float(self.value)

    def __float__(self) -> float:
        return float(self.value)

    def __add__(self, other: "Mean") -> "Mean":
        if not isinstance(other, Mean):
            return NotImplemented
        return Mean(self.total + other.total, self.count + other.count)

    def detach(self) -> "Mean":
        count = self.count.detach() if isinstance(self.count, torch.Tensor) else self.count
        return Mean(self.total.detach(), count)

    def __repr__(self) -> str:
        return f"Mean({float(self.value):.6g}, total={float(self.total):.6g}, count={float(self.count):g})"


optree.register_pytree_node(
    Mean,
    lambda m: ((m.total, m.count), None, ("total", "count")),
    lambda _, children: Mean(*children),
    namespace=NAMESPACE,
)
