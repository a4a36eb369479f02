"""``DataLoader``: a resumable loader whose position is a leaf of ``TrainState``."""

from __future__ import annotations

import math
from typing import Any, Callable, Iterator

import torch
import torch.utils.data

from xform._state import TrainState

__all__ = ["DataLoader"]


def _mix(*xs: int) -> int:
    return hash(tuple(xs)) & 0x7FFF_FFFF_FFFF_FFFF


class DataLoader:
    """Batches of a map-style dataset, resumable from a ``TrainState``.

    The position is ``state.data``: the shuffle seed and the number of batches consumed,
    which ``apply_gradients`` advances by one per update attempt (one per batch, also
    when ``mixed_precision`` skips an overflowing update). So the loop

    .. code-block:: python

        for batch in loader.iterate(state):
            state, metrics = step(state, batch)

    run on a state restored with ``xf.load`` continues with exactly the next batch, in
    the same shuffle order, and the next epoch's order after this one ends. Each epoch's
    order is a permutation drawn from ``(seed, epoch)`` alone.

    Args:
        dataset: a map-style dataset (``__len__`` and ``__getitem__``).
        batch_size: examples per batch on each process. With ``world_size`` processes the
            global batch is ``batch_size * world_size``; each process gets a disjoint
            slice of it.
        shuffle: draw a new order every epoch.
        seed: the shuffle seed; ``None`` takes ``state.data["seed"]`` (the seed given to
            ``TrainState.create``).
        drop_last: drop the last, incomplete global batch.
        num_workers, collate_fn, pin_memory: as in ``torch.utils.data.DataLoader``.
            Workers are seeded from (seed, epoch, position), so random augmentations
            resume exactly too.
        rank, world_size: this process's slice; by default from ``torch.distributed``
            when it is initialized, else 0 and 1.

    Example:
        >>> import torch, xform as xf
        >>> state = xf.TrainState.create(torch.nn.Linear(1, 1), optimizer=torch.optim.SGD, lr=0.1)
        >>> loader = xf.DataLoader(torch.arange(10.0), batch_size=4, shuffle=False)
        >>> [b.tolist() for b in loader.iterate(state)]
        [[0.0, 1.0, 2.0, 3.0], [4.0, 5.0, 6.0, 7.0], [8.0, 9.0]]
    """

    def __init__(
        self,
        dataset: Any,
        *,
        batch_size: int,
        shuffle: bool = True,
        seed: int | None = None,
        drop_last: bool = False,
        num_workers: int = 0,
        collate_fn: Callable[[list[Any]], Any] | None = None,
        pin_memory: bool = False,
        rank: int | None = None,
        world_size: int | None = None,
    ):
        if not hasattr(dataset, "__len__") or not hasattr(dataset, "__getitem__"):
            raise TypeError(
                f"xf.DataLoader: dataset must be map-style (__len__ and __getitem__), got {type(dataset).__name__}"
            )
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"xf.DataLoader: batch_size must be a positive int, got {batch_size!r}")
        if world_size is None:
            dist = torch.distributed.is_available() and torch.distributed.is_initialized()
            world_size = torch.distributed.get_world_size() if dist else 1
            rank = (torch.distributed.get_rank() if dist else 0) if rank is None else rank
        rank = 0 if rank is None else rank
        if not 0 <= rank < world_size:
            raise ValueError(f"xf.DataLoader: rank must be in [0, {world_size}), got {rank}")
        self.dataset = dataset
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.drop_last = drop_last
        self.num_workers = num_workers
        self.collate_fn = collate_fn
        self.pin_memory = pin_memory
        self.rank = rank
        self.world_size = world_size
        if len(self) == 0:
            raise ValueError(
                f"xf.DataLoader: a dataset of {len(dataset)} examples gives no batch of global size "
                f"{self.global_batch_size} with drop_last=True; use a smaller batch_size or drop_last=False"
            )

    @property
    def global_batch_size(self) -> int:
        return self.batch_size * self.world_size

    def __len__(self) -> int:
        """Batches per epoch."""
        n = len(self.dataset) / self.global_batch_size
        return math.floor(n) if self.drop_last else math.ceil(n)

    def position(self, state: TrainState) -> tuple[int, int]:
        """``(epoch, index of the next batch in that epoch)`` for ``state``."""
        return divmod(state.data["consumed"], len(self))

    def order(self, seed: int, epoch: int) -> torch.Tensor:
        """The dataset indices of ``epoch``, in the order they are served."""
        n = len(self.dataset)
        if not self.shuffle:
            return torch.arange(n)
        return torch.randperm(n, generator=torch.Generator().manual_seed(_mix(seed, epoch)))

    def iterate(self, state: TrainState, *, epochs: int | None = 1) -> Iterator[Any]:
        """Yields the batches after ``state``'s position: the rest of the current epoch,
        then ``epochs - 1`` more (``epochs=None``: forever)."""
        if not isinstance(state, TrainState):
            raise TypeError(f"xf.DataLoader.iterate: expected a TrainState, got {type(state).__name__}")
        seed = state.data["seed"] if self.seed is None else self.seed
        epoch, index = self.position(state)
        last = None if epochs is None else epoch + epochs
        while last is None or epoch < last:
            yield from self._epoch(seed, epoch, index)
            epoch, index = epoch + 1, 0

    def _epoch(self, seed: int, epoch: int, start: int) -> Iterator[Any]:
        order = self.order(seed, epoch)
        gbs, bs = self.global_batch_size, self.batch_size
        batches = []
        for b in range(start, len(self)):
            chunk = order[b * gbs : (b + 1) * gbs]
            if len(chunk) < gbs and self.world_size > 1:
                per = math.ceil(len(chunk) / self.world_size)
                mine = chunk[self.rank * per : (self.rank + 1) * per]
            else:
                mine = chunk[self.rank * bs : (self.rank + 1) * bs]
            batches.append(mine.tolist())
        if not batches:
            return
        loader = torch.utils.data.DataLoader(
            self.dataset,
            batch_sampler=batches,
            num_workers=self.num_workers,
            collate_fn=self.collate_fn,
            pin_memory=self.pin_memory,
            generator=torch.Generator().manual_seed(_mix(seed, epoch, start, self.rank)),
        )
        yield from loader

    def __repr__(self) -> str:
        return (
            f"DataLoader({type(self.dataset).__name__}[{len(self.dataset)}], batch_size={self.batch_size}, "
            f"world_size={self.world_size}, shuffle={self.shuffle}, drop_last={self.drop_last})"
        )
