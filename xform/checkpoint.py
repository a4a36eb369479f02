"""Checkpoints: a ``TrainState`` serialized, atomically, without pickled code.

Two layouts of one format (``meta.json`` holds the tree: paths, kinds, global shapes,
dtypes and the non-tensor leaves):

- one process: the tensors in ``tensors.pt``, read back with ``weights_only=True``;
- several processes: ``torch.distributed.checkpoint`` (DCP) files, each process writing
  its shards; DCP's metadata is read with an unpickler that admits only DCP's own
  metadata classes. Loading reshards: a checkpoint of any world size and strategy loads
  into a state laid out for any other (2 -> 1, 1 -> 2, zero3 -> replicate).

Several processes need a file system they all see (the usual case for checkpoints).
"""

from __future__ import annotations

import functools
import io
import json
import os
import pickle
import re
import shutil
import uuid
from pathlib import Path
from typing import Any

import optree
import torch

from xform.core.optim import is_dtensor
from xform.core.state import TrainState
from xform.tree import NAMESPACE, path_str

__all__ = ["save", "load", "CheckpointManager", "PendingSave"]

_FORMAT = "xform-checkpoint-1"
_TENSORS = "tensors.pt"
_META = "meta.json"
_DCP = "dcp"
_PY = (bool, int, float, str, type(None))


def _dist() -> tuple[int, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _entries(state: TrainState) -> tuple[list[str], list[Any], optree.PyTreeSpec]:
    if not isinstance(state, TrainState):
        raise TypeError(f"xf.save/xf.load: expected a TrainState, got {type(state).__name__}")
    paths, leaves, spec = optree.tree_flatten_with_path(state, namespace=NAMESPACE)
    return [path_str(p) for p in paths], leaves, spec


def _describe(leaf: Any) -> dict[str, Any]:
    if isinstance(leaf, torch.Tensor):
        return {"kind": "tensor", "dtype": str(leaf.dtype).removeprefix("torch."), "shape": list(leaf.shape)}
    if isinstance(leaf, _PY):
        return {"kind": type(leaf).__name__, "value": leaf}
    raise TypeError(
        f"xf.save: cannot store a leaf of type {type(leaf).__name__}; state leaves must be tensors "
        "or bool/int/float/str/None"
    )


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    for dirpath, _, files in os.walk(root):
        for f in files:
            _fsync(Path(dirpath) / f)
        _fsync(Path(dirpath))


class PendingSave:
    """An asynchronous save in flight: ``wait()`` (on every process) finishes it."""

    def __init__(self, finish, future=None):
        self._finish, self._future, self._path = finish, future, None

    def wait(self) -> Path:
        if self._path is None:
            if self._future is not None:
                self._future.result()
            self._path = self._finish()
        return self._path

    def done(self) -> bool:
        return self._path is not None or (self._future is not None and self._future.done())


def save(state: TrainState, path: str | os.PathLike, *, async_save: bool = False) -> "Path | PendingSave":
    """Writes ``state`` to the directory ``path``, atomically.

    Everything in the state is saved: params, buffers, optimizer state, each transform's
    state (loss scale, ...), the RNG key, the data position and the step. The files are
    written to a temporary directory beside ``path``, fsynced, and renamed into place; a
    previous checkpoint at ``path`` is kept as ``path.prev`` until the new one is in
    place, so an interrupted save never loses the last good checkpoint. Under several
    processes every process must call ``save`` (each writes its shards).

    Args:
        state: the state to save.
        path: the checkpoint directory.
        async_save: copy the tensors to host memory, return a ``PendingSave`` at once,
            and write in the background; ``.wait()`` on it (every process) finishes.

    Returns:
        The checkpoint's path, or a ``PendingSave`` with ``async_save=True``.
    """
    path = Path(path)
    paths, leaves, _ = _entries(state)
    rank, world = _dist()
    distributed = world > 1 or any(is_dtensor(t) for t in leaves)
    meta = {"format": _FORMAT, "layout": "dcp" if distributed else "single", "step": state.step, "leaves": []}
    tensors = {}
    for p, leaf in zip(paths, leaves):
        meta["leaves"].append({"path": p, **_describe(leaf)})
        if isinstance(leaf, torch.Tensor):
            tensors[p] = leaf.detach()
    tmp = _shared_tmp(path, rank, world)
    future = None
    groups: list[Any] = []
    try:
        if distributed:
            import torch.distributed as dist
            import torch.distributed.checkpoint as dcp

            writer = dcp.FileSystemWriter(str(tmp / _DCP))
            if async_save:
                # Snapshot now (training updates tensors in place), and write over a group of
                # its own: collectives of two threads on one group would interleave.
                tensors = {k: v.detach().clone() for k, v in tensors.items()}
                group = dist.new_group(backend="gloo") if world > 1 else None
                future = dcp.async_save(tensors, storage_writer=writer, process_group=group)
                groups.append(group)
            else:
                dcp.save(tensors, storage_writer=writer)
        elif rank == 0:
            if async_save:
                tensors = {k: v.to("cpu", copy=True) for k, v in tensors.items()}  # snapshot now
                import concurrent.futures

                pool = concurrent.futures.ThreadPoolExecutor(max_workers=1)
                future = pool.submit(torch.save, tensors, tmp / _TENSORS)
                pool.shutdown(wait=False)
            else:
                torch.save(tensors, tmp / _TENSORS)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise

    def finish() -> Path:
        try:
            _barrier(world)
            if rank == 0:
                (tmp / _META).write_text(json.dumps(meta, indent=1))
                _fsync_tree(tmp)
                _swap_into_place(tmp, path)
            _barrier(world)
        except BaseException:
            if rank == 0:
                shutil.rmtree(tmp, ignore_errors=True)
            raise
        finally:
            for g in groups:
                if g is not None:
                    import torch.distributed as dist

                    dist.destroy_process_group(g)
        return path

    pending = PendingSave(finish, future)
    return pending if async_save else pending.wait()


def _shared_tmp(path: Path, rank: int, world: int) -> Path:
    """A temporary directory beside ``path``, the same on every process."""
    name = [f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"]
    if world > 1:
        import torch.distributed as dist

        dist.broadcast_object_list(name, src=0)
    tmp = path.parent / name[0]
    if rank == 0:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.mkdir()
    _barrier(world)
    return tmp


def _barrier(world: int) -> None:
    if world > 1:
        import torch.distributed as dist

        dist.barrier()


def _swap_into_place(tmp: Path, path: Path) -> None:
    prev = path.with_name(path.name + ".prev")
    if path.exists():
        if prev.exists():
            shutil.rmtree(prev)
        os.rename(path, prev)
    try:
        os.rename(tmp, path)
    except BaseException:
        if prev.exists() and not path.exists():
            os.rename(prev, path)  # put the last good checkpoint back
        raise
    _fsync(path.parent)
    if prev.exists():
        shutil.rmtree(prev)


def load(path: str | os.PathLike, *, like: TrainState) -> TrainState:
    """Reads the checkpoint at ``path`` into a state laid out like ``like``.

    ``like`` is a state built the same way (same module, optimizer and transforms, e.g.
    ``step.init(TrainState.create(...))``): it gives the structure, the static parts, the
    devices and the sharding; the checkpoint may come from another number of processes
    or another strategy. Tensors are read without unpickling code.

    ``like`` stays valid, except when its params are sharded (DTensors, which FSDP and
    tensor parallelism keep registered in the module): those are loaded in place and
    ``like`` is donated.

    Raises:
        FileNotFoundError: no checkpoint at ``path``.
        ValueError: the checkpoint's tree, shapes or dtypes differ from ``like``'s; the
            message names the first path that differs.
    """
    path = Path(path)
    if not (path / _META).exists():
        prev = path.with_name(path.name + ".prev")
        if (prev / _META).exists():
            raise FileNotFoundError(
                f"xf.load: no checkpoint at {path}, but {prev} holds the previous one (a save was "
                f"interrupted); load that path"
            )
        raise FileNotFoundError(f"xf.load: no checkpoint at {path} (no {_META} in it)")
    meta = json.loads((path / _META).read_text())
    if meta.get("format") != _FORMAT:
        raise ValueError(f"xf.load: {path} is not an xform checkpoint (format {meta.get('format')!r})")
    paths, like_leaves, spec = _entries(like)
    saved = {e["path"]: e for e in meta["leaves"]}
    saved_paths = [e["path"] for e in meta["leaves"]]
    if saved_paths != paths:
        first = next((a for a, b in zip(paths, saved_paths) if a != b), None)
        if first is None:
            longer = paths if len(paths) > len(saved_paths) else saved_paths
            first = longer[min(len(paths), len(saved_paths))]
        where = "only in `like`" if first not in saved else ("only in the checkpoint" if first not in paths else "in another place")
        raise ValueError(
            f"xf.load: the checkpoint at {path} does not have the structure of `like`: the first path that "
            f"differs is {first} ({where}); build `like` with the same module, optimizer and transforms "
            "(state = step.init(TrainState.create(...)))"
        )
    for p, ref in zip(paths, like_leaves):
        entry, want = saved[p], _describe(ref)
        if entry["kind"] != want["kind"] or entry.get("dtype") != want.get("dtype") or entry.get("shape") != want.get("shape"):
            got = {k: v for k, v in entry.items() if k in ("kind", "dtype", "shape")}
            exp = {k: v for k, v in want.items() if k in ("kind", "dtype", "shape")}
            raise ValueError(f"xf.load: the checkpoint at {path} differs from `like` at {p}: checkpoint {got}, like {exp}")
    in_place = any(is_dtensor(t) for t in like.params.values())
    targets = {
        p: (ref.detach() if in_place and p.startswith("params") else _empty_like(ref))
        for p, ref in zip(paths, like_leaves)
        if isinstance(ref, torch.Tensor)
    }
    if meta.get("layout") == "dcp":
        _read_dcp(path / _DCP, targets)
    else:
        _read_single(path / _TENSORS, targets)
    leaves = []
    for p, ref in zip(paths, like_leaves):
        if isinstance(ref, torch.Tensor):
            t = targets[p]
            if ref.requires_grad and not in_place:
                t.requires_grad_(True)
            leaves.append(ref if in_place and p.startswith("params") else t)
        else:
            leaves.append(saved[p]["value"])
    out = optree.tree_unflatten(spec, leaves)
    if in_place:
        like._donate("xf.load, which loaded its sharded params in place")
    return out


def _empty_like(t: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return torch.empty_like(t.detach())


def _read_single(file: Path, targets: dict[str, torch.Tensor]) -> None:
    tensors = torch.load(file, weights_only=True, map_location="cpu")
    with torch.no_grad():
        for p, t in targets.items():
            src = tensors[p]
            if is_dtensor(t):
                from torch.distributed.tensor import distribute_tensor

                src = distribute_tensor(src.to(t.device_mesh.device_type), t.device_mesh, t.placements)
            t.copy_(src)


def _read_dcp(directory: Path, targets: dict[str, torch.Tensor]) -> None:
    import torch.distributed.checkpoint as dcp

    import warnings

    _, world = _dist()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*assuming the intent is to load in a single process")
        dcp.load(targets, storage_reader=_safe_reader_class()(str(directory)), no_dist=world == 1)


# DCP pickles its metadata; read it admitting only the classes that metadata is made of.
_ALLOWED_MODULES = (
    "torch.distributed.checkpoint.metadata",
    "torch.distributed.checkpoint.filesystem",
    "torch.distributed.checkpoint.planner",
    "torch.distributed.checkpoint._hf_utils",
)
_ALLOWED = {("torch", "Size"), ("collections", "OrderedDict"), ("builtins", "set"), ("builtins", "frozenset"),
            ("builtins", "slice"), ("torch", "device"), ("torch.serialization", "_get_layout"),
            ("pathlib", "PosixPath"), ("pathlib", "PurePosixPath"), ("pathlib", "WindowsPath"), ("pathlib", "PureWindowsPath")}


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (
            module in _ALLOWED_MODULES
            or (module, name) in _ALLOWED
            or (module == "torch" and isinstance(getattr(torch, name, None), (torch.dtype, torch.layout, torch.memory_format)))
        ):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(
            f"xf.load: the checkpoint's DCP metadata refers to {module}.{name}, which is not part of "
            "DCP metadata; refusing to unpickle it"
        )


@functools.cache
def _safe_reader_class():
    """DCP's file reader, reading the metadata with ``_MetadataUnpickler`` (made once, on
    first use, so that ``import xform`` does not import DCP)."""
    from torch.distributed.checkpoint import FileSystemReader

    class SafeReader(FileSystemReader):
        def read_metadata(self, *args: Any, **kwargs: Any):
            from torch.distributed.checkpoint.metadata import StorageMeta

            rank = kwargs.get("rank")
            with self.fs.create_stream(self._get_metadata_path(rank), "rb") as f:
                metadata = _MetadataUnpickler(io.BytesIO(f.read())).load()
            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata

    return SafeReader


class CheckpointManager:
    """Numbered checkpoints in one directory, keeping the last ``keep``.

    Example:
        >>> import torch, tempfile, xform as xf
        >>> state = xf.TrainState.create(torch.nn.Linear(2, 1), optimizer=torch.optim.SGD, lr=0.1)
        >>> manager = xf.CheckpointManager(tempfile.mkdtemp(), keep=2)
        >>> manager.save(state).name
        'step_000000000'
        >>> manager.restore(like=state).step
        0
    """

    _NAME = re.compile(r"^step_(\d+)$")

    def __init__(self, directory: str | os.PathLike, *, keep: int | None = 3):
        if keep is not None and (isinstance(keep, bool) or not isinstance(keep, int) or keep < 1):
            raise ValueError(f"CheckpointManager: keep must be a positive int or None (keep all), got {keep!r}")
        self.directory = Path(directory)
        self.keep = keep

    def checkpoints(self) -> list[Path]:
        """Complete checkpoints, oldest first."""
        if not self.directory.exists():
            return []
        found = [
            (int(m.group(1)), p)
            for p in self.directory.iterdir()
            if (m := self._NAME.match(p.name)) and (p / _META).exists()
        ]
        return [p for _, p in sorted(found)]

    def latest(self) -> Path | None:
        found = self.checkpoints()
        return found[-1] if found else None

    def save(self, state: TrainState) -> Path:
        """Saves ``state`` as ``step_<step>`` and removes all but the newest ``keep``."""
        out = save(state, self.directory / f"step_{state.step:09d}")
        if self.keep is not None and _dist()[0] == 0:
            for old in self.checkpoints()[: -self.keep]:
                shutil.rmtree(old, ignore_errors=True)
        _barrier(_dist()[1])
        return out

    def restore(self, *, like: TrainState) -> TrainState | None:
        """The newest checkpoint loaded like ``like``, or None when there is none."""
        latest = self.latest()
        return None if latest is None else load(latest, like=like)
