"""Checkpoints: a ``TrainState`` serialized, atomically, without pickled code."""

from __future__ import annotations

import json
import os
import re
import shutil
import uuid
from pathlib import Path
from typing import Any

import optree
import torch

from xform.tree import NAMESPACE, path_str
from xform._state import TrainState

__all__ = ["save", "load", "CheckpointManager"]

_FORMAT = "xform-checkpoint-1"
_TENSORS = "tensors.pt"
_META = "meta.json"
_PY = (bool, int, float, str, type(None))


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


def save(state: TrainState, path: str | os.PathLike) -> Path:
    """Writes ``state`` to the directory ``path``, atomically.

    Everything in the state is saved: params, buffers, optimizer state, each transform's
    state (loss scale, ...), the RNG key, the data position and the step. The files are
    written to a temporary directory beside ``path``, fsynced, and renamed into place; a
    previous checkpoint at ``path`` is kept as ``path.prev`` until the new one is in
    place, so an interrupted save never loses the last good checkpoint.

    Returns:
        The checkpoint's path.
    """
    path = Path(path)
    paths, leaves, _ = _entries(state)
    meta = {"format": _FORMAT, "step": state.step, "leaves": []}
    tensors = {}
    for p, leaf in zip(paths, leaves):
        meta["leaves"].append({"path": p, **_describe(leaf)})
        if isinstance(leaf, torch.Tensor):
            tensors[p] = leaf.detach()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        torch.save(tensors, tmp / _TENSORS)
        (tmp / _META).write_text(json.dumps(meta, indent=1))
        for f in (_TENSORS, _META):
            _fsync(tmp / f)
        _fsync(tmp)
        prev = path.with_name(path.name + ".prev")
        if path.exists():
            if prev.exists():
                shutil.rmtree(prev)
            os.rename(path, prev)
        os.rename(tmp, path)
        _fsync(path.parent)
        if prev.exists():
            shutil.rmtree(prev)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def load(path: str | os.PathLike, *, like: TrainState) -> TrainState:
    """Reads the checkpoint at ``path`` into a state laid out like ``like``.

    ``like`` is a state built the same way (same module, optimizer and transforms, e.g.
    ``step.init(TrainState.create(...))``); it gives the structure, the static parts and
    the devices, and stays valid. Tensors are read with ``weights_only=True``: loading
    never runs pickled code.

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
    tensors = torch.load(path / _TENSORS, weights_only=True, map_location="cpu")
    leaves = []
    for p, ref in zip(paths, like_leaves):
        entry, want = saved[p], _describe(ref)
        if entry["kind"] != want["kind"] or entry.get("dtype") != want.get("dtype") or entry.get("shape") != want.get("shape"):
            got = {k: v for k, v in entry.items() if k in ("kind", "dtype", "shape")}
            exp = {k: v for k, v in want.items() if k in ("kind", "dtype", "shape")}
            raise ValueError(f"xf.load: the checkpoint at {path} differs from `like` at {p}: checkpoint {got}, like {exp}")
        if entry["kind"] == "tensor":
            t = tensors[p].to(ref.device)
            leaves.append(t.requires_grad_(ref.requires_grad) if t.is_floating_point() else t)
        else:
            leaves.append(entry["value"])
    return optree.tree_unflatten(spec, leaves)


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
        if self.keep is not None:
            for old in self.checkpoints()[: -self.keep]:
                shutil.rmtree(old, ignore_errors=True)
        return out

    def restore(self, *, like: TrainState) -> TrainState | None:
        """The newest checkpoint loaded like ``like``, or None when there is none."""
        latest = self.latest()
        return None if latest is None else load(latest, like=like)
