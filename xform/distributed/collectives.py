"""Collectives over pytrees for user code: reduce, gather, broadcast, barriers, RNG sync.

Public through ``xf.distributed`` (see its docstring). Every function answers as the only
process when no process group exists.
"""

from __future__ import annotations

import contextlib
import zlib
from typing import Any, Iterator, Literal

import torch
import torch.distributed as dist

from xform import tree as _tree
from xform.distributed.runtime import _HOST_BACKENDS, DistributedError, Runtime, _culprit, _first_line, runtime

__all__ = [
    "broadcast",
    "broadcast_object",
    "gather",
    "gather_for_metrics",
    "gather_object",
    "main_process_first",
    "reduce",
    "sync_rng",
    "wait_for_everyone",
]


@contextlib.contextmanager
def _comm(api: str, rt: Runtime) -> Iterator[None]:
    """Turns a failed torch collective into a ``DistributedError`` naming the API."""
    try:
        yield
    except DistributedError:
        raise
    except RuntimeError as e:
        limit = f"{rt.timeout.total_seconds():g} s" if rt.timeout is not None else "the group's timeout"
        raise DistributedError(
            f"{api}: the collective failed on rank {rt.rank} of {rt.world_size}: {_first_line(e)}. "
            f"{_culprit(e, rt)} exited or did not reach this collective within {limit}; its own output "
            "shows why. If a rank is legitimately slow (e.g. saving a checkpoint), raise the timeout: "
            "xf.distributed.initialize(timeout=...) or `xform launch --timeout S`"
        ) from e


def _comm_device(rt: Runtime) -> torch.device:
    return torch.device("cpu") if rt.backend in _HOST_BACKENDS else rt.device


def _paths(tree: Any) -> list[str]:
    return [p for p, _ in _tree.flatten_with_path(tree)]


def _signature(*parts: Any) -> int:
    return zlib.crc32(repr(parts).encode())


def _wire_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.uint8 if dtype == torch.bool else dtype


def _pack(tensors: list[torch.Tensor], dev: torch.device) -> torch.Tensor:
    """One flat buffer on ``dev`` holding ``tensors`` (all of one dtype), detached."""
    flat = [t.detach().reshape(-1).to(dev) for t in tensors]
    buf = torch.cat(flat) if len(flat) > 1 else flat[0].clone()
    return buf.to(_wire_dtype(buf.dtype))


def _buckets(tensors: list[torch.Tensor]) -> dict[torch.dtype, list[int]]:
    """Leaf indices grouped by dtype, so that each dtype costs one collective."""
    out: dict[torch.dtype, list[int]] = {}
    for i, t in enumerate(tensors):
        out.setdefault(t.dtype, []).append(i)
    return out


def _unpack(buf: torch.Tensor, like: list[torch.Tensor], shapes: list[torch.Size]) -> list[torch.Tensor]:
    out, at = [], 0
    for t, shape in zip(like, shapes):
        n = shape.numel()
        out.append(buf[at : at + n].reshape(shape).to(device=t.device, dtype=t.dtype))
        at += n
    return out


def _check_same(api: str, rt: Runtime, tree: Any, describe: list[Any]) -> None:
    """Raises the same clear error on every rank when the ranks' trees differ.

    One small all-reduce: the max of ``(sig, -sig)`` equals ``(sig, -sig)`` on every rank
    only when every rank's signature is the same. Only on a mismatch are the full
    descriptions exchanged, to say which leaf differs.
    """
    spec = str(_tree.structure(tree))
    sig = _signature(spec, describe)
    both = torch.tensor([sig, -sig], dtype=torch.int64, device=_comm_device(rt))
    with _comm(api, rt):
        dist.all_reduce(both, op=dist.ReduceOp.MAX)
    if both.tolist() == [sig, -sig]:
        return
    with _comm(api, rt):
        metas = [None] * rt.world_size
        dist.all_gather_object(metas, (spec, describe, _paths(tree)))
    raise ValueError(f"{api}: the processes passed different trees; {_difference(metas)}")


def _describe(t: torch.Tensor) -> str:
    return f"{str(t.dtype).removeprefix('torch.')} of shape {tuple(t.shape)}"


def _difference(metas: list[Any]) -> str:
    spec0, desc0, paths0 = metas[0]
    for r, (spec, desc, paths) in enumerate(metas[1:], 1):
        if spec != spec0:
            return f"rank 0 has structure {spec0} but rank {r} has {spec}; pass the same structure on every rank"
        for path, a, b in zip(paths0, desc0, desc):
            if a != b:
                return (
                    f"leaf {path or '<root>'} is {a} on rank 0 but {b} on rank {r}; every rank must pass "
                    "the same dtypes and shapes"
                )
    return "their leaves differ"


def _as_tensor(api: str, path: str, leaf: Any) -> torch.Tensor:
    if isinstance(leaf, torch.Tensor):
        return leaf
    if isinstance(leaf, (bool, int, float)):
        dtype = torch.bool if isinstance(leaf, bool) else torch.int64 if isinstance(leaf, int) else torch.float64
        return torch.tensor(leaf, dtype=dtype)
    raise TypeError(
        f"{api}: leaf {path or '<root>'} is a {type(leaf).__name__}, not a tensor or number; "
        "use xf.distributed.broadcast_object/gather_object for other Python objects"
    )


_OPS = {"sum": "SUM", "mean": "SUM", "max": "MAX", "min": "MIN"}


def reduce(tree: Any, op: Literal["sum", "mean", "max", "min"] = "sum", *, check: bool = True) -> Any:
    """All-reduces every leaf of ``tree`` across processes; every rank gets the result.

    Leaves are tensors (any shape, the same on every rank) or Python numbers, which come
    back as Python numbers. Leaves of one dtype travel in one message. ``op="mean"``
    divides the sum by the world size (integers become floating point). Bool leaves
    allow ``"max"`` (any) and ``"min"`` (all). Without a group the tree is returned as
    is (``"mean"`` still turns integers into floats, as on many processes).

    With ``check=True`` one more small collective first makes sure that every rank
    passes the same structure, dtypes and shapes, and raises the same ``ValueError``
    on every rank otherwise (without it, mismatched ranks may hang or get wrong sums).
    ``check=False`` saves that collective (about 0.5 ms over gloo, and a host sync on
    GPUs) where the tree is known to agree, e.g. a per-step loss.

    Example:
        >>> import torch, xform as xf
        >>> xf.distributed.reduce({"correct": torch.tensor(3), "seen": 8})   # 1 process
        {'correct': tensor(3), 'seen': 8}
    """
    api = "xf.distributed.reduce"
    if op not in _OPS:
        raise ValueError(f"{api}: op must be one of {sorted(_OPS)}, got {op!r}")
    rt = runtime()
    paths_leaves = _tree.flatten_with_path(tree)
    leaves, spec = _tree.flatten(tree)
    tensors = [_as_tensor(api, p, leaf) for p, leaf in paths_leaves]
    for (p, _), t in zip(paths_leaves, tensors):
        if t.dtype == torch.bool and op not in ("max", "min"):
            raise TypeError(
                f"{api}: leaf {p or '<root>'} is a bool tensor and op={op!r}; use op='max' (any) or "
                "op='min' (all), or convert with .int() to count"
            )
    if rt.world_size > 1:
        if check:
            _check_same(api, rt, tree, [_describe(t) for t in tensors])
        out: list[torch.Tensor] = list(tensors)
        dev, red = _comm_device(rt), getattr(dist.ReduceOp, _OPS[op])
        for idx in _buckets(tensors).values():
            group = [tensors[i] for i in idx]
            buf = _pack(group, dev)
            with _comm(api, rt), torch.no_grad():
                dist.all_reduce(buf, op=red)
            for i, t in zip(idx, _unpack(buf, group, [g.shape for g in group])):
                out[i] = t
        tensors = out
    elif op != "mean":
        return tree
    if op == "mean":
        ws = rt.world_size
        tensors = [t / ws if (ws > 1 or not t.is_floating_point()) else t for t in tensors]
    new = [
        t.item() if not isinstance(leaf, torch.Tensor) else t for leaf, t in zip(leaves, tensors)
    ]
    return _tree.unflatten(spec, new)


def gather(tree: Any) -> Any:
    """All-gathers every tensor leaf of ``tree`` along dim 0, in rank order.

    The ranks may hold different numbers of rows (dim 0); the other dims and the dtypes
    must agree. A 0-d tensor counts as one row, so it gathers into shape
    ``(world_size,)``. Leaves of one dtype travel in one message. Without a group each
    leaf comes back as is (0-d ones as one row).

    Example:
        >>> import torch, xform as xf
        >>> xf.distributed.gather({"pred": torch.tensor([1, 2]), "loss": torch.tensor(0.5)})
        {'pred': tensor([1, 2]), 'loss': tensor([0.5000])}
    """
    api = "xf.distributed.gather"
    rt = runtime()
    paths_leaves = _tree.flatten_with_path(tree)
    _, spec = _tree.flatten(tree)
    tensors = []
    for p, leaf in paths_leaves:
        if not isinstance(leaf, torch.Tensor):
            raise TypeError(
                f"{api}: leaf {p or '<root>'} is a {type(leaf).__name__}, not a tensor; wrap numbers with "
                "torch.tensor(...) or use xf.distributed.gather_object"
            )
        tensors.append(leaf.reshape(1) if leaf.dim() == 0 else leaf)
    if rt.world_size == 1:
        return _tree.unflatten(spec, tensors)
    meta = (str(spec), [(str(t.dtype), tuple(t.shape)) for t in tensors])
    metas: list[Any] = [None] * rt.world_size
    with _comm(api, rt):
        dist.all_gather_object(metas, meta)
    spec0, desc0 = metas[0]
    paths = [p for p, _ in paths_leaves]
    for r, (s, desc) in enumerate(metas):
        if s != spec0:
            raise ValueError(
                f"{api}: rank 0 passes structure {spec0} but rank {r} passes {s}; pass the same structure "
                "on every rank"
            )
        for path, (dt0, sh0), (dt, sh) in zip(paths, desc0, desc):
            if dt != dt0 or sh[1:] != sh0[1:]:
                raise ValueError(
                    f"{api}: leaf {path or '<root>'} is {dt0} of shape (n, {', '.join(map(str, sh0[1:]))}) "
                    f"on rank 0 but {dt} of shape {sh} on rank {r}; only dim 0 may differ between ranks"
                )
    dev = _comm_device(rt)
    rows = [[sh[0] for _, sh in desc] for _, desc in metas]  # rows[rank][leaf]
    out: list[Any] = list(tensors)
    for idx in _buckets(tensors).values():
        group = [tensors[i] for i in idx]
        inner = [t.shape[1:].numel() for t in group]
        sizes = [sum(rows[r][i] * n for i, n in zip(idx, inner)) for r in range(rt.world_size)]
        buf = _pack(group, dev)
        padded = torch.zeros(max(sizes), dtype=buf.dtype, device=dev)
        padded[: buf.numel()] = buf
        recv = [torch.empty_like(padded) for _ in range(rt.world_size)]
        with _comm(api, rt), torch.no_grad():
            dist.all_gather(recv, padded)
        parts: list[list[torch.Tensor]] = [[] for _ in idx]
        for r, b in enumerate(recv):
            shapes = [torch.Size((rows[r][i], *tensors[i].shape[1:])) for i in idx]
            for k, t in enumerate(_unpack(b[: sizes[r]], group, shapes)):
                parts[k].append(t)
        for k, i in enumerate(idx):
            out[i] = torch.cat(parts[k])
    return _tree.unflatten(spec, out)


def gather_for_metrics(tree: Any, *, loader: Any, index: int | None = None) -> Any:
    """``gather`` for per-example outputs, without the examples the loader padded.

    With ``drop_last=False`` on several processes, ``xf.DataLoader`` pads the last global
    batch of an epoch with examples from the start of the epoch so that every rank gets
    as many; gathering would count them twice. This gathers and drops them, so metrics
    over the gathered values cover each example exactly once.

    Args:
        tree: per-example outputs of this rank's batch (predictions, labels, losses):
            every leaf has this rank's batch along dim 0.
        loader: the ``xf.DataLoader`` that served the batch.
        index: the batch's global index (``state.data["consumed"]`` when it was served);
            by default the batch that ``loader`` served last.

    Example (on each process):
        >>> for batch in loader.iterate(state):                     # doctest: +SKIP
        ...     preds = model(batch["x"]).argmax(-1)
        ...     preds, labels = xf.distributed.gather_for_metrics((preds, batch["y"]), loader=loader)
    """
    api = "xf.distributed.gather_for_metrics"
    layout = getattr(loader, "layout", None)
    if not callable(layout):
        raise TypeError(f"{api}: loader must be the xf.DataLoader that served the batch, got {type(loader).__name__}")
    rt = runtime()
    if loader.world_size != rt.world_size:
        raise ValueError(
            f"{api}: the loader splits batches over world_size={loader.world_size} but this run has "
            f"{rt.world_size} processes; build the loader after xf.distributed.initialize()"
        )
    per_rank, pad = layout(index)
    out = gather(tree)
    total = per_rank * rt.world_size
    for p, leaf in _tree.flatten_with_path(out):
        if leaf.shape[0] != total:
            raise ValueError(
                f"{api}: leaf {p or '<root>'} has {leaf.shape[0]} rows after gathering, but the global batch "
                f"has {total} ({per_rank} per process); pass per-example values (the batch on dim 0), or "
                "use xf.distributed.gather/reduce for other values"
            )
    if not pad:
        return out
    return _tree.map(lambda t: t[: total - pad], out)


def broadcast(tree: Any, src: int = 0) -> Any:
    """Every rank gets rank ``src``'s ``tree``.

    Every rank passes a tree of the same structure, with tensors of the same shapes and
    dtypes (their values are replaced; the results land on each rank's own leaf
    devices). Non-tensor leaves take ``src``'s values. Leaves of one dtype travel in one
    message. Without a group the tree is returned as is.

    Example:
        >>> import torch, xform as xf
        >>> xf.distributed.broadcast({"w": torch.ones(2)})["w"].tolist()
        [1.0, 1.0]
    """
    api = "xf.distributed.broadcast"
    rt = runtime()
    _check_src(api, src, rt)
    if rt.world_size == 1:
        return tree
    leaves, spec = _tree.flatten(tree)
    describe = [_describe(x) if isinstance(x, torch.Tensor) else type(x).__name__ for x in leaves]
    _check_same(api, rt, tree, describe)
    objects = broadcast_object(
        [None if isinstance(x, torch.Tensor) else x for x in leaves], src=src
    ) if any(not isinstance(x, torch.Tensor) for x in leaves) else [None] * len(leaves)
    tensor_idx = [i for i, x in enumerate(leaves) if isinstance(x, torch.Tensor)]
    tensors = [leaves[i] for i in tensor_idx]
    out = [objects[i] for i in range(len(leaves))]
    dev = _comm_device(rt)
    for idx in _buckets(tensors).values():
        group = [tensors[k] for k in idx]
        if rt.rank == src:
            buf = _pack(group, dev)
        else:
            buf = torch.empty(sum(t.numel() for t in group), dtype=_wire_dtype(group[0].dtype), device=dev)
        with _comm(api, rt), torch.no_grad():
            dist.broadcast(buf, src=src)
        if rt.rank == src:
            results = group
        else:
            results = _unpack(buf, group, [t.shape for t in group])
        for k, t in zip(idx, results):
            out[tensor_idx[k]] = t
    return _tree.unflatten(spec, out)


def _check_src(api: str, src: Any, rt: Runtime) -> None:
    if isinstance(src, bool) or not isinstance(src, int) or not 0 <= src < rt.world_size:
        raise ValueError(f"{api}: src must be a rank in [0, {rt.world_size}), got {src!r}")


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s picklable ``obj``, on every rank (``obj`` itself without a group).

    Example:
        >>> import xform as xf
        >>> xf.distributed.broadcast_object({"run": "a1"})
        {'run': 'a1'}
    """
    api = "xf.distributed.broadcast_object"
    rt = runtime()
    _check_src(api, src, rt)
    if rt.world_size == 1:
        return obj
    box = [obj if rt.rank == src else None]
    with _comm(api, rt):
        dist.broadcast_object_list(box, src=src)
    return box[0]


def gather_object(obj: Any) -> list[Any]:
    """Every rank's picklable ``obj``, in rank order, on every rank (``[obj]`` without a group)."""
    api = "xf.distributed.gather_object"
    rt = runtime()
    if rt.world_size == 1:
        return [obj]
    out: list[Any] = [None] * rt.world_size
    with _comm(api, rt):
        dist.all_gather_object(out, obj)
    return out


def wait_for_everyone() -> None:
    """Blocks until every process reaches this point (a barrier; nothing without a group)."""
    rt = runtime()
    if not rt.distributed:
        return
    with _comm("xf.distributed.wait_for_everyone", rt):
        dist.barrier()


@contextlib.contextmanager
def main_process_first(*, local: bool = False) -> Iterator[None]:
    """Runs the block on the main process first; the others enter it once it is done.

    For work whose result the others reuse: downloading a data set, building a cache.
    With ``local=True`` the first process of each node goes first (for node-local
    disks). If the main process fails in the block the others still run it.

    Example:
        >>> import xform as xf
        >>> with xf.distributed.main_process_first():
        ...     data = list(range(3))         # e.g. download on rank 0, read from cache elsewhere
    """
    rt = runtime()
    first = rt.is_local_main_process if local else rt.is_main_process
    if not first:
        wait_for_everyone()
    try:
        yield
    finally:
        if first:
            wait_for_everyone()


def sync_rng(*generators: torch.Generator, src: int = 0) -> None:
    """Copies rank ``src``'s random-number-generator states to every rank.

    Args:
        *generators: the ``torch.Generator`` objects to synchronize; by default torch's
            global CPU generator and, on a CUDA device, that device's default generator.
        src: the rank whose states the others take.

    ``TrainState``'s own random key needs no synchronization: it is part of the state.

    Example:
        >>> import torch, xform as xf
        >>> xf.distributed.sync_rng()                          # every rank now draws alike
        >>> xf.distributed.sync_rng(torch.Generator().manual_seed(1))
    """
    api = "xf.distributed.sync_rng"
    rt = runtime()
    for g in generators:
        if not isinstance(g, torch.Generator):
            raise TypeError(f"{api}: expected torch.Generator objects, got {type(g).__name__}; e.g. sync_rng(gen)")
    _check_src(api, src, rt)
    if not generators:
        gens = [torch.default_generator]
        if rt.device.type == "cuda":
            gens.append(torch.cuda.default_generators[rt.device.index or 0])
    else:
        gens = list(generators)
    if rt.world_size == 1:
        return
    states = broadcast([g.get_state() for g in gens], src=src)
    for g, s in zip(gens, states):
        g.set_state(s.cpu())
