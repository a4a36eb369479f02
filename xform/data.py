"""``DataLoader``: a resumable loader whose position is a leaf of ``TrainState``."""

from __future__ import annotations

import math
import warnings
from typing import Any, Callable, Iterator

import torch
import torch.utils.data

from xform import _data_stream as _stream
from xform._data_stream import _mix, _seed_streams, _Streams
from xform._collate import PadCollate
from xform.distributed.runtime import runtime as _runtime
from xform.core.state import TrainState

__all__ = ["DataLoader", "PadCollate"]


_KEPT = 64  # layouts of the last served batches an iterable loader remembers


class _Batch(list):
    """One process's dataset indices of one batch, and the seed its worker draws from."""

    seed: int


class _SeededFetch(torch.utils.data.Dataset):
    """Seeds a worker's random streams from the batch before fetching it, so that random
    augmentations depend on the batch alone, not on which worker fetched what before."""

    def __init__(self, dataset: Any):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> Any:
        return self.dataset[i]

    def __getitems__(self, batch: _Batch) -> list[Any]:
        if torch.utils.data.get_worker_info() is not None:  # a worker process: its streams are its own
            _seed_streams(batch.seed)
            return self._fetch(batch)
        # The main process (num_workers=0): seed for the fetch, then give the user's
        # streams back, so that loading a batch leaves the process's randomness untouched.
        with _Streams():
            _seed_streams(batch.seed)
            return self._fetch(batch)

    def _fetch(self, batch: _Batch) -> list[Any]:
        getitems = getattr(self.dataset, "__getitems__", None)
        return getitems(list(batch)) if getitems else [self.dataset[i] for i in batch]


class DataLoader:
    """Batches of a map-style or iterable dataset, split across processes, resumable from a ``TrainState``.

    The position is ``state.data``: the shuffle seed and the number of *global* batches
    consumed, which ``apply_gradients`` advances by one per update attempt (one per
    batch, also when ``mixed_precision`` skips an overflowing update). So the loop

    .. code-block:: python

        for batch in loader.iterate(state):
            state, metrics = step(state, batch)

    run on a state restored with ``xf.load`` continues with exactly the next batch, in
    the same shuffle order, and the next epoch's order after this one ends. Each epoch's
    order is a permutation drawn from ``(seed, epoch)`` alone.

    On ``world_size`` processes, global batch ``i`` is the examples
    ``order[i * G : (i + 1) * G]`` (``G = global_batch_size``) and rank ``r`` gets the
    ``r``-th of ``world_size`` equal, disjoint slices of it; their union, in rank order,
    is the batch a single process would get with ``batch_size=G``. The position counts
    global batches, so a checkpoint taken on N processes resumes on M with exactly the
    next global batches when ``global_batch_size`` is kept (pass
    ``global_batch_size=G``, or scale ``batch_size`` by ``N / M``). ``attach(state)``
    records ``G`` in the position; from then on ``iterate`` refuses a loader of another
    global batch size (``attach(state, reslice=True)`` opts into re-slicing the epoch).

    The last global batch of an epoch may be short. With ``drop_last=False`` and several
    processes it is padded, as ``torch.utils.data.DistributedSampler`` pads, with
    examples from the start of the epoch's order, up to a multiple of ``world_size``, so
    that every rank gets a batch of the same size; ``padding(i)`` says how many examples
    of global batch ``i`` are such repeats (always at the end of the global batch, i.e.
    on the last ranks), and ``xf.distributed.gather_for_metrics`` drops them. In training
    the repeats take part in that last step; ``drop_last=True`` keeps every step equal to
    the single-process step on the same global batch.

    An ``IterableDataset`` (a stream of files, a Hugging Face streaming dataset) is one
    global stream per epoch, read in its own order (``shuffle`` must stay off; shuffle in
    the dataset, whose ``set_epoch(e)`` the loader calls): global batch ``i`` is its next
    ``G`` examples, cut into rank slices as above. Every reader (process, or worker
    process) reads the stream whole and keeps its own slices, so ranks and workers never
    overlap. A resumed loader reads and drops the consumed batches (count and skip;
    ``resume_method`` says which method a dataset gets), so the position still counts
    global batches and resumes on any number of processes. ``len``, ``order``,
    ``indices`` and ``attach(reslice=True)`` need a map-style dataset.

    ``dispatch=True`` is for datasets that cannot be split by rank (one reader, one
    connection): only rank 0 reads; it scatters each rank the very slice that rank would
    have read itself (same order, same seeds), one message per step.

    Args:
        dataset: a map-style dataset (``__len__`` and ``__getitem__``) or a
            ``torch.utils.data.IterableDataset``.
        batch_size: examples per batch on each process. With ``world_size`` processes the
            global batch is ``batch_size * world_size``.
        global_batch_size: the alternative to ``batch_size``: examples per global batch,
            a multiple of ``world_size``; each process gets ``global_batch_size //
            world_size``.
        shuffle: draw a new order every epoch (default: on for a map-style dataset, off,
            and only off, for an iterable one).
        seed: the shuffle seed; ``None`` takes ``state.data["seed"]`` (the seed given to
            ``TrainState.create``).
        drop_last: drop the last, incomplete global batch.
        num_workers, collate_fn, pin_memory: as in ``torch.utils.data.DataLoader``.
            Each batch is fetched with the random streams (torch, ``random``, numpy)
            seeded from (seed, epoch, batch, rank), so random augmentations resume
            exactly too; in the main process (``num_workers=0``) the streams are given
            back afterwards, so loading leaves the process's own randomness untouched.
        rank, world_size: this process's slice; by default ``xf.distributed.rank()`` and
            ``xf.distributed.world_size()`` (0 and 1 without a process group).
        dispatch: rank 0 reads every global batch and scatters the slices (needs the
            process group; ``rank``/``world_size`` left unset).

    Example:
        >>> import torch, xform as xf
        >>> state = xf.TrainState.create(torch.nn.Linear(1, 1), optimizer=torch.optim.SGD, lr=0.1)
        >>> loader = xf.DataLoader(torch.arange(10.0), batch_size=4, shuffle=False)
        >>> [b.tolist() for b in loader.iterate(state)]
        [[0.0, 1.0, 2.0, 3.0], [4.0, 5.0, 6.0, 7.0], [8.0, 9.0]]
        >>> two = xf.DataLoader(torch.arange(9.0), global_batch_size=4, shuffle=False, rank=1, world_size=2)
        >>> [b.tolist() for b in two.iterate(state)], two.padding(2)   # rank 1 of 2
        ([[2.0, 3.0], [6.0, 7.0], [0.0]], 1)
    """

    def __init__(
        self,
        dataset: Any,
        *,
        batch_size: int | None = None,
        global_batch_size: int | None = None,
        shuffle: bool | None = None,
        seed: int | None = None,
        drop_last: bool = False,
        num_workers: int = 0,
        collate_fn: Callable[[list[Any]], Any] | None = None,
        pin_memory: bool = False,
        rank: int | None = None,
        world_size: int | None = None,
        dispatch: bool = False,
    ):
        iterable = isinstance(dataset, torch.utils.data.IterableDataset)
        if not iterable and (not hasattr(dataset, "__len__") or not hasattr(dataset, "__getitem__")):
            raise TypeError(
                "xf.DataLoader: dataset must be map-style (__len__ and __getitem__) or a "
                f"torch.utils.data.IterableDataset, got {type(dataset).__name__}"
            )
        if iterable and getattr(dataset, "_distributed", None) is not None and type(dataset).__module__.startswith("datasets."):
            raise ValueError(
                "xf.DataLoader: this Hugging Face IterableDataset is already split by node "
                "(split_dataset_by_node); pass the whole dataset: xf.DataLoader splits it over the ranks itself"
            )
        if iterable and shuffle:
            raise ValueError(
                "xf.DataLoader: shuffle=True needs a map-style dataset; an IterableDataset is read in its "
                "own order (shuffle it in the dataset, e.g. a Hugging Face dataset's .shuffle(seed=..., "
                "buffer_size=...), whose set_epoch the loader calls each epoch)"
            )
        if not isinstance(dispatch, bool):
            raise TypeError(f"xf.DataLoader: dispatch must be a bool, got {dispatch!r}")
        if (batch_size is None) == (global_batch_size is None):
            raise TypeError(
                "xf.DataLoader: pass exactly one of batch_size= (examples per process) and "
                f"global_batch_size= (examples per step over all processes); got batch_size={batch_size!r}, "
                f"global_batch_size={global_batch_size!r}"
            )
        name, size = ("batch_size", batch_size) if global_batch_size is None else ("global_batch_size", global_batch_size)
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise ValueError(f"xf.DataLoader: {name} must be a positive int, got {size!r}")
        if world_size is None:
            rt = _runtime()
            world_size = rt.world_size
            rank = rt.rank if rank is None else rank
        if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
            raise ValueError(f"xf.DataLoader: world_size must be a positive int, got {world_size!r}")
        rank = 0 if rank is None else rank
        if not 0 <= rank < world_size:
            raise ValueError(f"xf.DataLoader: rank must be in [0, {world_size}), got {rank}")
        if global_batch_size is not None:
            if global_batch_size % world_size:
                lo = max(world_size, global_batch_size - global_batch_size % world_size)
                raise ValueError(
                    f"xf.DataLoader: global_batch_size={global_batch_size} is not divisible by the "
                    f"{world_size} processes; pass a multiple of {world_size} (e.g. {lo} or "
                    f"{lo + world_size}), or batch_size= per process"
                )
            batch_size = global_batch_size // world_size
        self.dataset = dataset
        self.batch_size = batch_size
        self.shuffle = not iterable if shuffle is None else bool(shuffle)
        self._iterable = iterable
        self._layouts: dict[int, tuple[int, int]] = {}  # served global batch -> layout (iterable datasets)
        self.seed = seed
        self.drop_last = drop_last
        self.num_workers = num_workers
        self.collate_fn = collate_fn
        self.pin_memory = pin_memory
        self.rank = rank
        self.world_size = world_size
        self.dispatch = dispatch
        self._served: int | None = None  # global index of the batch iterate() yielded last
        if not iterable and len(self) == 0:
            raise ValueError(
                f"xf.DataLoader: a dataset of {len(dataset)} examples gives no batch of global size "
                f"{self.global_batch_size} with drop_last=True; use a smaller batch_size or drop_last=False"
            )

    @property
    def global_batch_size(self) -> int:
        """Examples per global batch: ``batch_size * world_size``."""
        return self.batch_size * self.world_size

    @property
    def resume_method(self) -> str:
        """How ``iterate`` finds its place: ``"index"`` (a map-style dataset: the batch's
        examples are computed from the position) or ``"count-and-skip"`` (an
        ``IterableDataset``: the consumed batches are read again and dropped)."""
        return "count-and-skip" if self._iterable else "index"

    def __len__(self) -> int:
        """Batches per epoch."""
        if self._iterable:
            raise TypeError(
                "xf.DataLoader: an IterableDataset has no len (batches per epoch are known only by "
                "reading the stream); use loader.position(state) for the epoch and batch of a state"
            )
        return self._per_epoch(self.global_batch_size)

    def _per_epoch(self, global_batch_size: int) -> int:
        n = len(self.dataset) / global_batch_size
        return math.floor(n) if self.drop_last else math.ceil(n)

    def position(self, state: TrainState) -> tuple[int, int]:
        """``(epoch, index of the next batch in that epoch)`` for ``state``."""
        self._check(state, "xf.DataLoader.position")
        if self._iterable:  # reads the stream up to the position
            seed = state.data["seed"] if self.seed is None else self.seed
            return _stream.count(self.dataset, self.global_batch_size, self.drop_last, seed, state.data["consumed"])
        return divmod(state.data["consumed"], len(self))

    def attach(self, state: TrainState, *, reslice: bool = False) -> TrainState:
        """``state`` with its data position recorded in this loader's global batch size.

        The position counts global batches, so it means something only with the global
        batch size that produced it. Once recorded (``state.data["global_batch_size"]``,
        kept by every update and by checkpoints), ``iterate`` refuses a loader of
        another global batch size instead of repeating or skipping examples. Call it on
        the state the training loop starts from, fresh or restored:

        .. code-block:: python

            state = loader.attach(manager.restore(like=state) or state)
            for batch in loader.iterate(state):
                state, metrics = step(state, batch)

        Args:
            state: the state to train from. Returned unchanged when it already records
                this global batch size; a new state (``state.replace``) otherwise.
            reslice: when ``state`` records another global batch size, continue at its
                example position instead of refusing: the rest of the current epoch is
                cut into batches of this loader's size, starting at the first batch
                boundary at or after the examples already served (a warning says how
                many examples that skips; none when the position falls on a boundary).
                Nothing is ever served twice.

        Raises:
            ValueError: ``state`` records another global batch size and ``reslice`` is
                False.
        """
        api = "xf.DataLoader.attach"
        if not isinstance(state, TrainState):
            raise TypeError(f"{api}: expected a TrainState, got {type(state).__name__}")
        recorded, size = self._recorded(state, api), self.global_batch_size
        if recorded == size:
            return state
        if recorded is None:
            return state.replace(data={**state.data, "global_batch_size": size})
        if not reslice:
            raise ValueError(self._mismatch(api, recorded))
        if self._iterable:
            raise ValueError(
                f"{api}: reslice=True needs a map-style dataset; an IterableDataset's position counts global "
                f"batches of {recorded} examples of its stream, so keep global_batch_size={recorded}"
            )
        epoch, b = divmod(state.data["consumed"], self._per_epoch(recorded))
        n = len(self.dataset)
        served = min(b * recorded, n)
        start = -(-served // size)  # the first new batch that holds no served example
        if start >= len(self):
            epoch, start, skipped = epoch + 1, 0, n - served
        else:
            skipped = start * size - served
        if skipped:
            warnings.warn(
                f"{api}: re-slicing a position of {b} batches of {recorded} into batches of {size} skips "
                f"{skipped} examples of epoch {epoch if start else epoch - 1} to start at a batch boundary",
                stacklevel=2,
            )
        data = {**state.data, "consumed": epoch * len(self) + start, "global_batch_size": size}
        return state.replace(data=data)

    def _recorded(self, state: TrainState, api: str) -> int | None:
        size = state.data.get("global_batch_size")
        if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size < 1):
            raise ValueError(
                f"{api}: the state's data position records global_batch_size={size!r}, which is not a "
                "positive int; pass a state made by TrainState.create and DataLoader.attach"
            )
        return size

    def _mismatch(self, api: str, recorded: int) -> str:
        return (
            f"{api}: the state's data position counts global batches of {recorded} examples, but this "
            f"loader's global batch is {self.global_batch_size} ({self.batch_size} per process x "
            f"{self.world_size}); resuming would repeat or skip examples. Keep the global batch size "
            f"(xf.DataLoader(..., global_batch_size={recorded})), or continue at the example position "
            "with state = loader.attach(state, reslice=True)"
        )

    def _check(self, state: TrainState, api: str) -> None:
        recorded = self._recorded(state, api)
        if recorded is not None and recorded != self.global_batch_size:
            raise ValueError(self._mismatch(api, recorded))

    def order(self, seed: int, epoch: int) -> torch.Tensor:
        """The dataset indices of ``epoch``, in the order they are served."""
        self._map_style("xf.DataLoader.order")
        n = len(self.dataset)
        if not self.shuffle:
            return torch.arange(n)
        return torch.randperm(n, generator=torch.Generator().manual_seed(_mix(seed, epoch)))

    def layout(self, index: int | None = None) -> tuple[int, int]:
        """``(examples per process, padded examples)`` of global batch ``index``.

        ``index`` counts global batches from the start of training, like
        ``state.data["consumed"]`` (the batch a state at ``consumed == i`` is fed has index
        ``i``); by default the batch that ``iterate`` yielded last.
        """
        if index is None:
            if self._served is None:
                raise ValueError(
                    "xf.DataLoader.layout: this loader has served no batch yet; pass index= (the batch's "
                    'state.data["consumed"] when it was served)'
                )
            index = self._served
        if isinstance(index, bool) or not isinstance(index, int) or index < 0:
            raise ValueError(f"xf.DataLoader.layout: index must be a non-negative int, got {index!r}")
        if self._iterable:
            if index not in self._layouts:
                raise ValueError(
                    f"xf.DataLoader.layout: global batch {index} is not among the last {_KEPT} batches this "
                    "loader served; an IterableDataset's batch sizes are known only once read"
                )
            return self._layouts[index]
        b = index % len(self)
        rest = len(self.dataset) - b * self.global_batch_size
        if rest >= self.global_batch_size:
            return self.batch_size, 0
        per = math.ceil(rest / self.world_size)
        return per, per * self.world_size - rest

    def padding(self, index: int | None = None) -> int:
        """How many examples of global batch ``index`` (by default the one served last)
        repeat earlier ones to even out the last batch over the ranks; 0 on one process."""
        return self.layout(index)[1]

    def iterate(self, state: TrainState, *, epochs: int | None = 1) -> Iterator[Any]:
        """Yields the batches after ``state``'s position: the rest of the current epoch,
        then ``epochs - 1`` more (``epochs=None``: forever).

        Raises:
            ValueError: ``state``'s position records another global batch size (see
                ``attach``).
        """
        if not isinstance(state, TrainState):
            raise TypeError(f"xf.DataLoader.iterate: expected a TrainState, got {type(state).__name__}")
        self._check(state, "xf.DataLoader.iterate")
        seed = state.data["seed"] if self.seed is None else self.seed
        index = state.data["consumed"]
        if self.dispatch and self.world_size > 1:
            yield from self._dispatched(seed, index, epochs)
            return
        if self._iterable:
            yield from self._stream_batches(seed, index, epochs)
            return
        epoch, start = divmod(index, len(self))
        last = None if epochs is None else epoch + epochs
        while last is None or epoch < last:
            for batch in self._epoch(seed, epoch, start):
                self._served = index
                index += 1
                yield batch
            epoch, start = epoch + 1, 0

    def indices(self, seed: int, index: int) -> list[int]:
        """The dataset indices of this process's slice of global batch ``index``."""
        self._map_style("xf.DataLoader.indices")
        epoch, b = divmod(index, len(self))
        return list(self._slice(self.order(seed, epoch), b))

    def _map_style(self, api: str) -> None:
        if self._iterable:
            raise TypeError(f"{api}: this loader reads an IterableDataset, which has no indices; it needs a map-style dataset")

    def _stream_reader(self, seed: int, start: int, epochs: int | None, all_ranks: bool = False) -> Iterator[Any]:
        reader = _stream.StreamReader(
            self.dataset, batch_size=self.batch_size, rank=self.rank, world_size=self.world_size,
            drop_last=self.drop_last, seed=seed, start=start, epochs=epochs,
            collate_fn=self.collate_fn or torch.utils.data.default_collate, all_ranks=all_ranks,
        )
        loader = torch.utils.data.DataLoader(
            reader, batch_size=None, num_workers=self.num_workers, collate_fn=_stream.identity,
            pin_memory=self.pin_memory and not all_ranks,
            generator=torch.Generator().manual_seed(_mix(seed, start, self.rank)),  # not the global one
        )
        for index, _, per, pad, batch in loader:
            yield index, per, pad, batch

    def _serve(self, batches: Iterator[tuple[int, int, int, Any]]) -> Iterator[Any]:
        for index, per, pad, batch in batches:
            self._layouts[index] = (per, pad)
            self._layouts.pop(index - _KEPT, None)
            self._served = index
            yield batch

    def _stream_batches(self, seed: int, start: int, epochs: int | None) -> Iterator[Any]:
        yield from self._serve(self._stream_reader(seed, start, epochs))

    def _dispatched(self, seed: int, start: int, epochs: int | None) -> Iterator[Any]:
        rt = _runtime()
        if (rt.rank, rt.world_size) != (self.rank, self.world_size):
            raise ValueError(
                f"xf.DataLoader.iterate: dispatch=True scatters over the process group, which has rank "
                f"{rt.rank} of {rt.world_size}, but this loader was given rank={self.rank}, "
                f"world_size={self.world_size}; leave rank= and world_size= unset"
            )
        source = None
        if self.rank == 0:
            if self._iterable:
                source = self._stream_reader(seed, start, epochs, all_ranks=True)
            else:
                source = self._map_all_ranks(seed, start, epochs)
        yield from self._serve(_stream.dispatch(source, self.world_size))

    def _map_all_ranks(self, seed: int, start: int, epochs: int | None) -> Iterator[tuple[int, int, int, list[Any]]]:
        """Rank 0's side of dispatch for a map-style dataset: every rank's slice of each
        global batch, fetched with that rank's seeds, so each gets what it would read."""
        epoch, b0 = divmod(start, len(self))
        last = None if epochs is None else epoch + epochs
        index = start
        while last is None or epoch < last:
            order = self.order(seed, epoch)
            slices = [self._slice(order, b, r) for b in range(b0, len(self)) for r in range(self.world_size)]
            if not slices:
                epoch, b0 = epoch + 1, 0
                continue
            for k, s in enumerate(slices):
                b, r = divmod(k, self.world_size)
                s.seed = _mix(seed, epoch, b0 + b, r)
            loader = torch.utils.data.DataLoader(
                _SeededFetch(self.dataset), batch_sampler=slices, num_workers=self.num_workers,
                collate_fn=self.collate_fn, generator=torch.Generator().manual_seed(_mix(seed, epoch, b0)),
            )
            it = iter(loader)
            for _ in range(b0, len(self)):
                per, pad = self.layout(index)
                yield index, per, pad, [next(it) for _ in range(self.world_size)]
                index += 1
            epoch, b0 = epoch + 1, 0

    def _slice(self, order: torch.Tensor, b: int, rank: int | None = None) -> _Batch:
        gbs = self.global_batch_size
        rank = self.rank if rank is None else rank
        chunk = order[b * gbs : (b + 1) * gbs]
        per, pad = self.layout(b)
        if pad:  # wrap around to the start of the epoch's order (cyclically, for tiny data)
            chunk = torch.cat([chunk, order[torch.arange(pad) % len(order)]])
        return _Batch(chunk[rank * per : (rank + 1) * per].tolist())

    def _epoch(self, seed: int, epoch: int, start: int) -> Iterator[Any]:
        order = self.order(seed, epoch)
        batches = [self._slice(order, b) for b in range(start, len(self))]
        if not batches:
            return
        dataset = _SeededFetch(self.dataset)
        for b, batch in enumerate(batches, start):
            batch.seed = _mix(seed, epoch, b, self.rank)
        loader = torch.utils.data.DataLoader(
            dataset,
            batch_sampler=batches,
            num_workers=self.num_workers,
            collate_fn=self.collate_fn,
            pin_memory=self.pin_memory,
            generator=torch.Generator().manual_seed(_mix(seed, epoch, start, self.rank)),
        )
        yield from loader

    def __repr__(self) -> str:
        if self._iterable:
            return (
                f"DataLoader({type(self.dataset).__name__}, batch_size={self.batch_size}, "
                f"world_size={self.world_size}, drop_last={self.drop_last})"
            )
        return (
            f"DataLoader({type(self.dataset).__name__}[{len(self.dataset)}], batch_size={self.batch_size}, "
            f"world_size={self.world_size}, shuffle={self.shuffle}, drop_last={self.drop_last})"
        )
