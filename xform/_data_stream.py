"""The iterable-dataset half of ``xf.DataLoader``: one global stream, resumed by count and skip.

An ``IterableDataset`` cannot be indexed, so the loader gives it the meaning a map-style
dataset has with ``shuffle=False``: the examples the dataset yields, in order, are one
global stream per epoch; global batch ``g`` is the next ``global_batch_size`` of them
and rank ``r`` gets the ``r``-th of ``world_size`` equal slices. Every reader (the main
process, or each worker process of each rank) iterates the whole stream and keeps only
what is its own: its rank's slice of the global batches its worker owns (worker ``w`` of
``n`` owns the batches ``start + w``, ``start + w + n``, ... in the order torch's
``DataLoader`` collects them). So the ranks never overlap, the workers never serve a
batch twice, and the union over ranks is what one process would see.

The position is ``state.data["consumed"]`` global batches, as for map-style datasets;
a resumed reader reads and drops the examples of the consumed batches (count and skip),
crossing epoch ends as the uninterrupted run did (``set_epoch(e)`` is called on datasets
that have it at the start of epoch ``e``; see ``own_epoch``). The cost is reading the skipped examples once
per reader, and, as the price of not depending on how a dataset splits itself, each
reader reads the stream whole. Because the position counts global batches of one
stream, a checkpoint resumes on any number of processes with the same global batch size.

Random augmentations drawn while iterating are reproducible: the random streams (torch,
``random``, numpy) are seeded from (seed, global batch index) before each global batch
is read, by every reader alike; in the main process they are given back afterwards.
"""

from __future__ import annotations

import itertools
import math
import random
import sys
from typing import Any, Callable, Iterator

import torch
import torch.utils.data

__all__: list[str] = []


def _mix(*xs: int) -> int:
    return hash(tuple(xs)) & 0x7FFF_FFFF_FFFF_FFFF


def _seed_streams(seed: int) -> None:
    torch.default_generator.manual_seed(seed)
    random.seed(seed)
    if "numpy" in sys.modules:
        sys.modules["numpy"].random.seed(seed % 2**32)


class _Streams:
    """Saves the process's random streams on enter and gives them back on exit."""

    def __enter__(self) -> None:
        np = sys.modules.get("numpy")
        self.saved = (torch.default_generator.get_state(), random.getstate(), np.random.get_state() if np else None)

    def __exit__(self, *exc: Any) -> None:
        torch.default_generator.set_state(self.saved[0])
        random.setstate(self.saved[1])
        np = sys.modules.get("numpy")
        if np is not None and self.saved[2] is not None:
            np.random.set_state(self.saved[2])


def layout(rest: int, batch_size: int, world_size: int) -> tuple[int, int]:
    """``(examples per process, padded examples)`` of a global batch of ``rest`` examples."""
    if rest >= batch_size * world_size:
        return batch_size, 0
    per = math.ceil(rest / world_size)
    return per, per * world_size - rest


def examples(dataset: Any) -> Iterator[Any]:
    """The dataset's whole stream, also in a worker process.

    A Hugging Face ``datasets.IterableDataset`` splits its shards among torch's worker
    processes by itself; the loader splits the stream itself, so it reads such a dataset
    through ``.iter`` (which does not split), one example at a time.
    """
    if torch.utils.data.get_worker_info() is not None and type(dataset).__module__.startswith("datasets."):
        for row in dataset.iter(batch_size=1):
            yield {k: v[0] for k, v in row.items()}
        return
    yield from dataset


def own_epoch(dataset: Any) -> Any:
    """The dataset to read, with an epoch of this reader's own.

    A Hugging Face ``datasets.IterableDataset`` keeps its epoch in one shared-memory
    tensor, the same in the main process and in every DataLoader worker (it is meant to
    be set in the main process and read by the workers). Every reader sets its own
    epoch, in its own process: on that tensor they would race (``set_epoch`` is a
    read-modify-write) and read each other's epoch (a shuffle of another epoch, or a
    negative one). The reader gets a shallow copy whose epoch is not shared; the user's
    dataset keeps its own. Any other dataset is read as it is.
    """
    epoch = getattr(dataset, "_epoch", None)
    if not (isinstance(epoch, torch.Tensor) and epoch.is_shared()):
        return dataset
    own = object.__new__(type(dataset))
    own.__dict__.update(dataset.__dict__)  # a new __dict__: copy.copy would share the original's (its __setstate__)
    own._epoch = epoch.clone()
    return own


class StreamReader(torch.utils.data.IterableDataset):
    """One reader's batches, from global batch ``start`` on: ``(index, epoch, per, pad, batch)``."""

    def __init__(
        self,
        dataset: Any,
        *,
        batch_size: int,
        rank: int,
        world_size: int,
        drop_last: bool,
        seed: int,
        start: int,
        epochs: int | None,
        collate_fn: Callable[[list[Any]], Any],
        all_ranks: bool = False,
    ):
        self.all_ranks = all_ranks  # dispatch: every rank's slice, as a list in rank order
        self.dataset, self.batch_size, self.rank, self.world_size = dataset, batch_size, rank, world_size
        self.drop_last, self.seed, self.start, self.epochs, self.collate_fn = drop_last, seed, start, epochs, collate_fn

    def _read(self, it: Iterator[Any], n: int, index: int, main: bool) -> list[Any]:
        if not main:
            _seed_streams(_mix(self.seed, index))
            return list(itertools.islice(it, n))
        with _Streams():
            _seed_streams(_mix(self.seed, index))
            return list(itertools.islice(it, n))

    def __iter__(self) -> Iterator[tuple[int, int, int, int, Any]]:
        info = torch.utils.data.get_worker_info()
        w, n = (0, 1) if info is None else (info.id, info.num_workers)
        main = info is None
        G = self.batch_size * self.world_size
        dataset = own_epoch(self.dataset)
        index, epoch, last = 0, 0, None
        while last is None or epoch < last:
            if hasattr(dataset, "set_epoch"):
                dataset.set_epoch(epoch)
            it = examples(dataset)
            head: list[Any] = []
            first = index
            while True:
                chunk = self._read(it, G, index, main)
                if not chunk or (len(chunk) < G and self.drop_last):
                    break
                if index == first:
                    head = chunk
                if index >= self.start:
                    if last is None and self.epochs is not None:
                        last = epoch + self.epochs
                    if (index - self.start) % n == w:
                        per, pad = layout(len(chunk), self.batch_size, self.world_size)
                        padded = chunk + [head[i % len(head)] for i in range(pad)]
                        if self.all_ranks:
                            slices = [self.collate_fn(padded[r * per : (r + 1) * per]) for r in range(self.world_size)]
                            yield index, epoch, per, pad, slices
                        else:
                            mine = padded[self.rank * per : (self.rank + 1) * per]
                            yield index, epoch, per, pad, self.collate_fn(mine)
                index += 1
                if len(chunk) < G:
                    break
            if index == first:  # an empty epoch: the stream is over for good
                return
            epoch += 1


def count(dataset: Any, global_batch_size: int, drop_last: bool, seed: int, consumed: int) -> tuple[int, int]:
    """``(epoch, index in that epoch)`` of global batch ``consumed``, by reading the stream."""
    reader = StreamReader(
        dataset, batch_size=global_batch_size, rank=0, world_size=1, drop_last=drop_last, seed=seed,
        start=0, epochs=None, collate_fn=len,
    )
    firsts: dict[int, int] = {}
    for index, epoch, _, _, _ in reader:
        first = firsts.setdefault(epoch, index)
        if index == consumed:
            return epoch, index - first
    raise ValueError(
        f"xf.DataLoader.position: the stream ends before global batch {consumed}; "
        "the state's position does not belong to this dataset"
    )


def identity(x: Any) -> Any:
    return x


def dispatch(source: Iterator[tuple[int, int, int, list[Any]]] | None, world_size: int) -> Iterator[tuple[int, int, int, Any]]:
    """``dispatch=True``: rank 0 iterates ``source`` (``(index, per, pad, slices in rank
    order)``) and scatters each rank its slice; the other ranks pass ``None`` and receive.
    A ``None`` after the last batch ends every rank's iteration at the same step."""
    import torch.distributed as dist

    from xform.distributed.collectives import _comm
    from xform.distributed.runtime import runtime

    rt = runtime()
    api = "xf.DataLoader.iterate (dispatch=True)"
    while True:
        box: list[Any] = [None]
        if source is not None:
            item = next(source, None)
            out = [None] * world_size if item is None else [(*item[:3], s) for s in item[3]]
        with _comm(api, rt):
            dist.scatter_object_list(box, out if source is not None else None, src=0)
        if box[0] is None:
            return
        yield box[0]
