"""Checkpoints: a ``TrainState`` serialized, atomically, without pickled code.

Two layouts of one format (``meta.json`` holds the tree: paths, kinds, global shapes,
dtypes, the non-tensor leaves and a checksum of every stored tensor):

- one process: the tensors in ``tensors.pt``, read back with ``weights_only=True``;
- several processes: ``torch.distributed.checkpoint`` (DCP) files, each process writing
  its shards. DCP's metadata (a pickle) is read with an unpickler that admits an explicit
  list of DCP's own classes, and must agree with ``meta.json``; each process verifies
  the checksums of the bytes it reads. Loading reshards: a checkpoint of any world size
  and strategy loads into a state laid out for any other (2 -> 1, 1 -> 2, zero3 ->
  replicate).

What a checkpoint guarantees, and the tests that prove it: docs/checkpoints.md.
Several processes need a file system they all see (the usual case for checkpoints).
"""

from __future__ import annotations

import functools
import json
import os
import re
import shutil
import uuid
import zlib
from pathlib import Path
from typing import Any

import optree
import torch

from xform.core.group import default_group
from xform.core.optim import is_dtensor
from xform.core.state import TrainState
from xform.tree import NAMESPACE, path_str

__all__ = ["save", "load", "CheckpointManager", "PendingSave", "CheckpointError"]

_FORMAT = "xform-checkpoint-2"
_FORMATS = ("xform-checkpoint-1", _FORMAT)  # 1: written before checksums; loads unverified
_TENSORS = "tensors.pt"
_META = "meta.json"
_DCP = "dcp"
_DCP_META = f"{_DCP}/.metadata"
_PY = (bool, int, float, str, type(None))
_KINDS = {"bool": bool, "int": int, "float": float, "str": str, "NoneType": type(None)}
# crc32 (zlib, in every Python): ~3.4 GB/s here against ~1 GB/s for sha256. It guards
# against corruption (bad disks, cut copies), which is what a checksum stored beside the
# data can do: whoever can rewrite the files can rewrite meta.json too, so a
# cryptographic hash would add cost, not safety (safety is "no code", by construction).
_CHECKSUM = "crc32"
_BLOCK = 16 << 20
# Names this process's temporary directories: a save removes what interrupted saves left
# beside its path, never what this process is still writing (an async save in flight).
_TOKEN = uuid.uuid4().hex[:8]


def _own() -> str:
    """This process's mark (a forked child is another process)."""
    return f"{_TOKEN}{os.getpid():x}"


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded: a missing, truncated or corrupt file (checksum
    mismatch), content that disagrees with its metadata or with ``like``, or content
    xform never writes (pickled code). The message is one line naming the checkpoint, the
    file and the cause."""


def _fail(path: Path, file: str, cause: str) -> CheckpointError:
    return CheckpointError(_one_line(f"xf.load: cannot load the checkpoint at {path}: {file}: {cause}"))


def _one_line(text: str) -> str:
    return re.sub(r"\s*\n\s*", " ", text).strip()


def _cause(e: BaseException) -> str:
    """A library's exception in a few words: its type and first sentence."""
    text = str(e).strip()
    refused = re.search(r"Unsupported global: GLOBAL (\S+)", text)
    if refused:
        return f"it refers to {refused.group(1)}, which is not a tensor; refusing to unpickle it"
    first = re.split(r"(?<=\.)\s|\n", text, maxsplit=1)[0] if text else "(no message)"
    return f"{type(e).__name__}: {first}"


def _dist() -> tuple[int, int]:
    _, rank, world = default_group()
    return rank, world


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


# --- checksums ------------------------------------------------------------------------------


def _crc_tensor(t: torch.Tensor) -> str:
    """The crc32 of a tensor's bytes (its elements in row-major order)."""
    t = t.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    data = t.reshape(-1).contiguous().view(torch.uint8).numpy()
    return f"{zlib.crc32(data) & 0xFFFFFFFF:08x}"


def _crc_range(f: Any, offset: int, length: int) -> str:
    f.seek(offset)
    crc, left = 0, length
    while left:
        block = f.read(min(left, _BLOCK))
        if not block:
            break
        crc, left = zlib.crc32(block, crc), left - len(block)
    return f"{crc & 0xFFFFFFFF:08x}"


def _write_single(tensors: dict[str, torch.Tensor], file: Path) -> dict[str, Any]:
    torch.save(tensors, file)
    return {"algorithm": _CHECKSUM, "tensors": {p: _crc_tensor(t) for p, t in tensors.items()}}


# --- save -----------------------------------------------------------------------------------


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


def save(
    state: TrainState, path: str | os.PathLike, *, async_save: bool = False, _extra: Any = None
) -> "Path | PendingSave":
    """Writes ``state`` to the directory ``path``, atomically.

    Everything in the state is saved: params, buffers, optimizer state, each transform's
    state (loss scale, ...), the RNG key, the data position and the step, with a crc32
    checksum of every tensor (every stored chunk, sharded). The files are written to a
    temporary directory beside ``path``, fsynced, and renamed into place; a previous
    checkpoint at ``path`` is kept as ``path.prev`` until the new one is in place, so an
    interrupted save never loses the last good checkpoint, and the temporary directories
    that interrupted saves to ``path`` left behind are removed. Under several processes
    every process must call ``save`` (each writes its shards).

    Args:
        state: the state to save.
        path: the checkpoint directory.
        async_save: copy the tensors to host memory, return a ``PendingSave`` at once,
            and write in the background; ``.wait()`` on it (every process) finishes.

    Returns:
        The checkpoint's path, or a ``PendingSave`` with ``async_save=True``.
    """
    if _extra is None:
        hook = _engine_hook(state)
        if hook is not None:  # an engine holds part of the state (DeepSpeed): it consolidates, then saves here
            return hook.save(state, Path(path), async_save=async_save, plain_save=save)
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
    if distributed and world > 1:
        meta["leaves"], partial = _union_leaves(meta["leaves"])
        if partial:
            meta["partial"] = True
    tmp = _shared_tmp(path, rank, world)
    future = None
    written: list[dict[str, Any]] = []
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
                future = pool.submit(_write_single, tensors, tmp / _TENSORS)
                pool.shutdown(wait=False)
            else:
                written.append(_write_single(tensors, tmp / _TENSORS))
        if _extra is not None:  # an engine's own files (every process), inside the same atomic directory
            _extra(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise

    def finish() -> Path:
        try:
            _barrier(world)
            if distributed:
                from xform import _checkpoint_dcp

                meta["checksums"] = _checkpoint_dcp.checksums(tmp / _DCP, rank, world)
            elif rank == 0:
                meta["checksums"] = written[0] if written else future.result()
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


def _holds_part(like: TrainState) -> bool:
    """Whether ``like`` holds part of a model's leaves by design: a pipeline process's
    state (its stages' params and optimizer state), laid out by ``shard(..., Pipeline)``."""
    return getattr(getattr(like._spec.layout, "strategy", None), "name", None) == "pp"


def _union_leaves(mine: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], bool]:
    """Every process's leaves, when they differ (a pipeline: each process holds its
    stages' params and optimizer state): rank 0's, then the others' new paths in rank
    order; and whether they differed. One object all-gather per save."""
    import torch.distributed as dist

    everyone: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)
    if all(e == everyone[0] for e in everyone):
        return mine, False
    merged, seen = [], set()
    for part in everyone:
        for e in part:
            if e["path"] not in seen:
                seen.add(e["path"])
                merged.append(e)
    return merged, True


def _engine_hook(state: Any) -> Any:
    """The checkpoint hook of a backend whose engine holds part of the state (DeepSpeed
    sets it on the module it wraps: ``backends/deepspeed/checkpoint.py``), or None."""
    module = getattr(state, "module", None) if isinstance(state, TrainState) else None
    return None if module is None else module.__dict__.get("_xform_checkpoint")


def _shared_tmp(path: Path, rank: int, world: int) -> Path:
    """A temporary directory beside ``path``, the same on every process. Rank 0 first
    removes what interrupted saves to ``path`` left there."""
    # Rank 0's verdict on ``path`` travels with the name, so every process raises together.
    name = [f".{path.name}.tmp-{_own()}-{uuid.uuid4().hex[:8]}", _foreign(path) if rank == 0 else None]
    if world > 1:
        import torch.distributed as dist

        dist.broadcast_object_list(name, src=0)
    if name[1] is not None:
        raise ValueError(name[1])
    tmp = path.parent / name[0]
    if rank == 0:
        path.parent.mkdir(parents=True, exist_ok=True)
        prefixes = tuple(f".{path.name}{s}" for s in (".tmp-", ".trash-", ".prev.trash-"))
        _remove_garbage(path.parent, lambda n: n.startswith(prefixes))
        tmp.mkdir()
    _barrier(world)
    return tmp


def _foreign(path: Path) -> str | None:
    """Why ``save`` must not replace ``path`` (it holds something other than a checkpoint:
    a file, or a non-empty directory without meta.json), or None."""
    if not path.exists():
        return None
    if path.is_dir() and ((path / _META).is_file() or not any(path.iterdir())):
        return None
    return (
        f"xf.save: {path} exists and is not an xform checkpoint (no {_META} in it), and saving would "
        "replace it; pass a new or empty directory, or remove it first"
    )


def _remove_garbage(directory: Path, is_garbage) -> None:
    """Deletes the temporary and half-deleted directories ``is_garbage`` names, except
    this process's own temporary directories (an async save may be writing one)."""
    try:
        names = os.listdir(directory)
    except FileNotFoundError:
        return
    for name in names:
        if is_garbage(name) and f".tmp-{_own()}-" not in name:
            shutil.rmtree(directory / name, ignore_errors=True)


def _discard(p: Path) -> None:
    """Deletes directory ``p`` so that it is never seen half deleted: renamed to a garbage
    name first (atomic), then deleted; a kill in between leaves garbage that the next save
    or ``CheckpointManager`` removes, never a listed but unloadable checkpoint."""
    trash = p.with_name(f".{p.name}.trash-{_own()}-{uuid.uuid4().hex[:8]}")
    try:
        os.rename(p, trash)
    except FileNotFoundError:
        return
    shutil.rmtree(trash, ignore_errors=True)


def _barrier(world: int) -> None:
    if world > 1:
        import torch.distributed as dist

        dist.barrier()


def _swap_into_place(tmp: Path, path: Path) -> None:
    prev = path.with_name(path.name + ".prev")
    if path.exists():
        if prev.exists():
            _discard(prev)
        os.rename(path, prev)
    try:
        os.rename(tmp, path)
    except BaseException:
        if prev.exists() and not path.exists():
            os.rename(prev, path)  # put the last good checkpoint back
        raise
    _fsync(path.parent)
    if prev.exists():
        _discard(prev)


# --- load -----------------------------------------------------------------------------------


def load(path: str | os.PathLike, *, like: TrainState, _plain: bool = False) -> TrainState:
    """Reads the checkpoint at ``path`` into a state laid out like ``like``.

    ``like`` is a state built the same way (same module, optimizer and transforms, e.g.
    ``step.init(TrainState.create(...))``): it gives the structure, the static parts, the
    devices and the sharding; the checkpoint may come from another number of processes
    or another strategy. Tensors are read without unpickling code, each checked against
    its checksum, and must have exactly ``like``'s shapes and dtypes (nothing is
    broadcast or converted).

    ``like`` stays valid, except when its params are sharded (DTensors, which FSDP and
    tensor parallelism keep registered in the module): those are loaded in place and
    ``like`` is donated.

    Raises:
        FileNotFoundError: no checkpoint at ``path``.
        CheckpointError: (a ``ValueError``) a file is missing, truncated, corrupt or holds
            what xform never writes, or the checkpoint's tree, shapes or dtypes differ
            from ``like``'s; one line naming the checkpoint, the file (or the first path
            that differs) and the cause.
    """
    hook = None if _plain else _engine_hook(like)
    if hook is not None:  # `like` is laid out by an engine (DeepSpeed): it reads its part, the rest here
        return hook.load(Path(path), like, plain_load=functools.partial(load, _plain=True))
    path = Path(path)
    if not (path / _META).exists():
        prev = path.with_name(path.name + ".prev")
        if (prev / _META).exists():
            raise FileNotFoundError(
                f"xf.load: no checkpoint at {path}, but {prev} holds the previous one (a save was "
                f"interrupted); load that path"
            )
        raise FileNotFoundError(f"xf.load: no checkpoint at {path} (no {_META} in it)")
    meta = _read_meta(path)
    paths, like_leaves, spec = _entries(like)
    # The data position is the checkpoint's, whatever keys it has (DataLoader.attach adds
    # "global_batch_size"); `like`'s own position is not compared.
    position = _position(path, [e for e in meta["leaves"] if _is_data(e["path"])])
    saved = {e["path"]: e for e in meta["leaves"] if not _is_data(e["path"])}
    saved_paths = [e["path"] for e in meta["leaves"] if not _is_data(e["path"])]
    like_data = [(p, ref) for p, ref in zip(paths, like_leaves) if _is_data(p)]
    paths, like_leaves = map(list, zip(*[(p, ref) for p, ref in zip(paths, like_leaves) if not _is_data(p)]))
    # A checkpoint of processes holding different leaves (a pipeline, "partial") lists their
    # union: it loads into a state holding all of them (one process), in another order,
    # or into one holding some (another pipeline layout).
    partial = bool(meta.get("partial")) or _holds_part(like)
    if saved_paths != paths and not (partial and set(paths) <= set(saved_paths)):
        in_like = set(paths)
        only_like = next((i for i, p in enumerate(paths) if p not in saved), None)
        only_ckpt = next((i for i, p in enumerate(saved_paths) if p not in in_like), None)
        if only_like is not None and (only_ckpt is None or only_like <= only_ckpt):
            first, where = paths[only_like], "only in `like`"
        elif only_ckpt is not None:
            first, where = saved_paths[only_ckpt], "only in the checkpoint"
        else:
            first, where = next(a for a, b in zip(paths, saved_paths) if a != b), "in another place"
        raise CheckpointError(
            f"xf.load: the checkpoint at {path} does not have the structure of `like`: the first path that "
            f"differs is {first} ({where}); build `like` with the same module, optimizer and transforms "
            "(state = step.init(TrainState.create(...)))"
        )
    for p, ref in zip(paths, like_leaves):
        entry, want = saved[p], _describe(ref)
        if entry["kind"] != want["kind"] or entry.get("dtype") != want.get("dtype") or entry.get("shape") != want.get("shape"):
            got = {k: v for k, v in entry.items() if k in ("kind", "dtype", "shape")}
            exp = {k: v for k, v in want.items() if k in ("kind", "dtype", "shape")}
            raise CheckpointError(f"xf.load: the checkpoint at {path} differs from `like` at {p}: checkpoint {got}, like {exp}")
    in_place = any(is_dtensor(t) for t in like.params.values())
    targets = {
        p: (ref.detach() if in_place and p.startswith("params") else _empty_like(ref))
        for p, ref in zip(paths, like_leaves)
        if isinstance(ref, torch.Tensor)
    }
    checksums = meta.get("checksums")
    if partial:  # DCP reads exactly the checkpoint's tensors: the ones `like` lacks are read and dropped
        for p, entry in saved.items():
            if p not in targets and entry["kind"] == "tensor":
                targets[p] = torch.empty(entry["shape"], dtype=getattr(torch, entry["dtype"]))
    if meta["layout"] == "dcp":
        from xform import _checkpoint_dcp

        _checkpoint_dcp.read(path, targets, checksums)
    else:
        _read_single(path, targets, checksums)
    leaves = {p: ref for p, ref in like_data}
    for p, ref in zip(paths, like_leaves):
        if isinstance(ref, torch.Tensor):
            t = targets[p]
            if ref.requires_grad and not in_place:
                t.requires_grad_(True)
            leaves[p] = ref if in_place and p.startswith("params") else t
        else:
            leaves[p] = saved[p]["value"]
    all_paths, _, _ = _entries(like)
    out = optree.tree_unflatten(spec, [leaves[p] for p in all_paths])
    if position != out.data:
        out = out.replace(data=position)
    if in_place:
        like._donate("xf.load, which loaded its sharded params in place")
    return out


def _is_data(p: str) -> bool:
    return p.startswith("data[")


_DATA_KEY = re.compile(r"data\['([A-Za-z_][A-Za-z0-9_]*)'\]")


def _position(path: Path, entries: list[dict[str, Any]]) -> dict[str, Any]:
    """The data position of meta.json's leaves: ``seed`` and ``consumed`` ints, and other
    keys (``global_batch_size``) ints or None."""
    position = {}
    for e in entries:
        key = _DATA_KEY.fullmatch(e["path"])
        if key is None or e["kind"] not in ("int", "NoneType"):
            raise _fail(path, _META, f"the data position leaf {e['path']} must be an int or null under a plain key, got {e}")
        position[key.group(1)] = e["value"]
    for key in ("seed", "consumed"):
        if not _is_int(position.get(key)):
            raise _fail(path, _META, f"the data position must hold an int {key!r}, got {position.get(key)!r}")
    return position


@functools.cache
def _dtype_names() -> frozenset[str]:
    """torch's dtype names (looked up in a set: ``getattr(torch, name)`` may import)."""
    return frozenset(n for n, v in vars(torch).items() if isinstance(v, torch.dtype))


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


_HEX8 = re.compile(r"[0-9a-f]{8}")


def _read_meta(path: Path) -> dict[str, Any]:
    """``meta.json``, every field checked by type."""
    try:
        meta = json.loads((path / _META).read_text())
    except json.JSONDecodeError as e:
        raise _fail(path, _META, f"not valid JSON ({e})") from None
    except (OSError, UnicodeDecodeError) as e:
        raise _fail(path, _META, _cause(e)) from None
    if not isinstance(meta, dict):
        raise _fail(path, _META, f"must be a JSON object, got a {type(meta).__name__}")
    if meta.get("format") not in _FORMATS:
        raise CheckpointError(f"xf.load: {path} is not an xform checkpoint (format {meta.get('format')!r})")

    def bad(field: str, want: str, got: Any) -> CheckpointError:
        return _fail(path, _META, f"field {field!r} must be {want}, got {got!r}")

    if meta.get("layout") not in ("single", "dcp"):
        raise bad("layout", "'single' or 'dcp'", meta.get("layout"))
    if not _is_int(meta.get("step")) or meta["step"] < 0:
        raise bad("step", "an int >= 0", meta.get("step"))
    leaves = meta.get("leaves")
    if not isinstance(leaves, list):
        raise bad("leaves", "a list", leaves)
    seen = set()
    for i, e in enumerate(leaves):
        if not isinstance(e, dict) or not isinstance(e.get("path"), str) or e["path"] in seen:
            raise bad(f"leaves[{i}]", "an object with a 'path' of its own", e)
        seen.add(e["path"])
        kind = e.get("kind")
        if kind == "tensor":
            if not isinstance(e.get("dtype"), str) or e["dtype"] not in _dtype_names():
                raise bad(f"leaves[{i}] ({e['path']}) 'dtype'", "a torch dtype name", e.get("dtype"))
            shape = e.get("shape")
            if not isinstance(shape, list) or not all(_is_int(n) and n >= 0 for n in shape):
                raise bad(f"leaves[{i}] ({e['path']}) 'shape'", "a list of ints >= 0", shape)
        elif kind in _KINDS:
            if type(e.get("value")) is not _KINDS[kind] or "value" not in e:
                raise bad(f"leaves[{i}] ({e['path']}) 'value'", f"a {kind} (its kind)", e.get("value"))
        else:
            raise bad(f"leaves[{i}] ({e['path']}) 'kind'", f"'tensor' or one of {sorted(_KINDS)}", kind)
    step_leaf = next((e for e in leaves if e["path"] == "step"), None)
    if step_leaf is not None and step_leaf.get("value") != meta["step"]:
        raise bad("step", f"the step leaf's value {step_leaf.get('value')!r}", meta["step"])
    if meta["format"] != _FORMAT:
        return meta  # written before checksums: nothing to verify
    sums = meta.get("checksums")
    if not isinstance(sums, dict) or sums.get("algorithm") != _CHECKSUM:
        raise bad("checksums", f"an object with 'algorithm': {_CHECKSUM!r}", sums)
    tensor_paths = {e["path"] for e in leaves if e["kind"] == "tensor"}
    if meta["layout"] == "single":
        table = sums.get("tensors")
        if not isinstance(table, dict) or set(table) != tensor_paths or not all(
            isinstance(v, str) and _HEX8.fullmatch(v) for v in table.values()
        ):
            raise bad("checksums.tensors", "one crc32 (8 hex digits) per tensor leaf", table)
    else:
        chunks = sums.get("chunks")
        ok = isinstance(chunks, list) and all(
            isinstance(c, dict)
            and c.get("tensor") in tensor_paths
            and isinstance(c.get("file"), str)
            and _is_int(c.get("offset"))
            and _is_int(c.get("length"))
            and isinstance(c.get("crc32"), str)
            and _HEX8.fullmatch(c["crc32"])
            for c in chunks
        )
        if not ok:
            raise bad("checksums.chunks", "a list of {tensor, file, offset, length, crc32}", chunks)
    return meta


def _empty_like(t: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return torch.empty_like(t.detach())


def _read_single(path: Path, targets: dict[str, torch.Tensor], checksums: dict[str, Any] | None) -> None:
    file = path / _TENSORS
    try:
        size = file.stat().st_size
    except FileNotFoundError:
        raise _fail(path, _TENSORS, "the file is missing") from None
    if size == 0:
        raise _fail(path, _TENSORS, "the file is empty (0 bytes): it was not written completely")
    try:
        tensors = torch.load(file, weights_only=True, map_location="cpu")
    except Exception as e:  # noqa: BLE001 - torch's many ways to say "corrupt", made one
        raise _fail(path, _TENSORS, _cause(e)) from None
    if not isinstance(tensors, dict) or set(tensors) != set(targets):
        names = sorted(tensors) if isinstance(tensors, dict) else type(tensors).__name__
        raise _fail(path, _TENSORS, f"holds {str(names)[:200]}, not the {len(targets)} tensors meta.json lists")
    sums = None if checksums is None else checksums["tensors"]
    for p, t in targets.items():  # verify everything before writing into any target
        src = tensors[p]
        if not isinstance(src, torch.Tensor) or src.dtype != t.dtype or src.shape != t.shape:
            got = f"{src.dtype} {list(src.shape)}" if isinstance(src, torch.Tensor) else type(src).__name__
            raise _fail(
                path, _TENSORS,
                f"tensor {p} is {got}, but meta.json and `like` say {t.dtype} {list(t.shape)} (nothing is broadcast or converted)",
            )
        if sums is not None and (got := _crc_tensor(src)) != sums[p]:
            raise _fail(path, _TENSORS, f"tensor {p} fails its checksum ({_CHECKSUM} {got}, recorded {sums[p]}): the file is corrupt")
    with torch.no_grad():
        for p, t in targets.items():
            src = tensors[p]
            if is_dtensor(t):
                from torch.distributed.tensor import distribute_tensor

                src = distribute_tensor(src.to(t.device_mesh.device_type), t.device_mesh, t.placements)
            t.copy_(src)


# --- CheckpointManager ----------------------------------------------------------------------


def _complete(p: Path) -> bool:
    """A checkpoint directory with all its files (meta.json is written last)."""
    return (p / _META).is_file() and ((p / _TENSORS).is_file() or (p / _DCP_META).is_file())


class CheckpointManager:
    """Numbered checkpoints in one directory, keeping the last ``keep``.

    Interrupted saves cost nothing: at start (and before each save) the manager removes
    the temporary and half-deleted directories they left, and puts back a checkpoint
    whose replacement by a save of the same step was cut off (``step_N.prev``). Old
    checkpoints are renamed away before they are deleted, so a listed checkpoint is
    always complete.

    Example:
        >>> import torch, tempfile, xform as xf
        >>> state = xf.TrainState.create(torch.nn.Linear(2, 1), optimizer=torch.optim.SGD, lr=0.1)
        >>> manager = xf.CheckpointManager(tempfile.mkdtemp(), keep=2)
        >>> manager.save(state).name
        'step_000000000'
        >>> manager.restore(like=state).step
        0
    """

    _NAME = re.compile(r"^step_(\d+)(\.prev)?$")
    _GARBAGE = re.compile(r"^\.step_\d+(\.prev)?\.(tmp|trash)-")

    def __init__(self, directory: str | os.PathLike, *, keep: int | None = 3):
        if keep is not None and (isinstance(keep, bool) or not isinstance(keep, int) or keep < 1):
            raise ValueError(f"CheckpointManager: keep must be a positive int or None (keep all), got {keep!r}")
        self.directory = Path(directory)
        self.keep = keep
        if _dist()[0] == 0:
            self._tidy()

    def _tidy(self) -> None:
        """Removes what interrupted saves left, and renames back a ``step_N.prev`` whose
        ``step_N`` is gone (the save that replaced it was cut off between its renames)."""
        _remove_garbage(self.directory, lambda n: self._GARBAGE.match(n) is not None)
        for prev in self.directory.glob("step_*.prev") if self.directory.is_dir() else ():
            current = prev.with_name(prev.name.removesuffix(".prev"))
            if not self._NAME.match(current.name):
                continue
            try:
                if _complete(current):
                    _discard(prev)
                elif _complete(prev) and not current.exists():
                    os.rename(prev, current)
            except FileNotFoundError:  # another process tidies too
                pass

    def checkpoints(self) -> list[Path]:
        """Complete checkpoints, oldest first (a ``step_N.prev`` stands in for a missing
        ``step_N``)."""
        if not self.directory.exists():
            return []
        names = {p.name.removesuffix(".prev") for p in self.directory.iterdir() if self._NAME.match(p.name)}
        found = []
        for name in sorted(names, key=lambda n: int(n.removeprefix("step_"))):
            current = self.directory / name
            # current, prev, current: a rename of prev back to current in between is seen.
            for p in (current, current.with_name(current.name + ".prev"), current):
                if _complete(p):
                    found.append(p)
                    break
        return found

    def latest(self) -> Path | None:
        found = self.checkpoints()
        return found[-1] if found else None

    def save(self, state: TrainState) -> Path:
        """Saves ``state`` as ``step_<step>`` and removes all but the newest ``keep``."""
        rank, world = _dist()
        if rank == 0:
            self._tidy()
        out = save(state, self.directory / f"step_{state.step:09d}")
        if self.keep is not None and rank == 0:
            for old in self.checkpoints()[: -self.keep]:
                _discard(old)
        _barrier(world)
        return out

    def restore(self, *, like: TrainState) -> TrainState | None:
        """The newest checkpoint loaded like ``like``, or None when there is none."""
        latest = self.latest()
        return None if latest is None else load(latest, like=like)
