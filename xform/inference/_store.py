"""Checkpoint sources read tensor by tensor, and the offload directory's index."""

from __future__ import annotations

import ctypes
import json
import mmap
import os
import re
import warnings
from pathlib import Path
from typing import Any, Iterable

import torch

from xform.inference import _safetensors as st

INDEX = "xform-offload.json"
_XFORM_KEY = re.compile(r"(params|buffers)\['(.*)'\]")


class Source:
    """Tensors of a checkpoint by name: ``specs`` (dtype, shape), ``read(names)``, and
    ``entry(name)`` (where a safetensors file holds it, or None)."""

    path: Path
    specs: dict[str, tuple[torch.dtype, tuple[int, ...]]]

    def entry(self, name: str) -> st.Entry | None:
        return None

    def order(self, name: str) -> tuple:
        return (0,)

    def read(self, names: list[str]) -> dict[str, torch.Tensor]:
        raise NotImplementedError


class Safetensors(Source):
    def __init__(self, path: Path, files: list[Path], weight_map: dict[str, str] | None):
        self.path = path
        self.entries: dict[str, st.Entry] = {}
        headers = {}
        for f in files:
            if not f.is_file():
                raise FileNotFoundError(f"xf.load_weights: the checkpoint at {path} lists the shard {f.name}, which is missing")
            headers[f.name] = st.read_header(f)
        if weight_map is None:
            for h in headers.values():
                self.entries.update(h)
        else:
            for name, fname in weight_map.items():
                h = headers[fname]
                if name not in h:
                    raise ValueError(f"xf.load_weights: the index of {path} puts {name} in {fname}, which does not hold it")
                self.entries[name] = h[name]
        self.specs = {n: (e.dtype, e.shape) for n, e in self.entries.items()}
        self._files = {str(f): i for i, f in enumerate(files)}

    def entry(self, name):
        return self.entries[name]

    def order(self, name):
        e = self.entries[name]
        return (self._files[e.file], e.offset)

    def read(self, names):
        return {n: st.read(self.entries[n]) for n in names}


def _drop_pages(t: torch.Tensor) -> None:
    """Lets the kernel drop the file pages under a memory-mapped tensor (read-only, private
    mapping: they are read again from the file if touched again)."""
    n = t.untyped_storage().nbytes()
    if not n:
        return
    page = mmap.PAGESIZE
    start = t.untyped_storage().data_ptr()
    lo, hi = (start + page - 1) // page * page, (start + n) // page * page
    if hi > lo:
        try:
            ctypes.CDLL(None, use_errno=True).madvise(ctypes.c_void_p(lo), ctypes.c_size_t(hi - lo), 4)  # MADV_DONTNEED
        except (OSError, AttributeError):
            pass


class XformSingle(Source):
    """``xf.save``'s one-process layout: ``tensors.pt`` read through a memory map, each
    tensor checked against its crc32 in ``meta.json``."""

    def __init__(self, path: Path, meta: dict[str, Any]):
        from xform import checkpoint as ck

        self.path = path
        file = path / ck._TENSORS
        if not file.is_file():
            raise FileNotFoundError(f"xf.load_weights: the checkpoint at {path} has no {ck._TENSORS}")
        try:
            self._tensors = torch.load(file, mmap=True, weights_only=True, map_location="cpu")
        except Exception as e:  # noqa: BLE001
            raise ck._fail(path, ck._TENSORS, ck._cause(e)) from None
        self._sums = (meta.get("checksums") or {}).get("tensors", {})
        self._keys = {}
        for key in self._tensors:
            m = _XFORM_KEY.fullmatch(key)
            if m:
                self._keys[m.group(2)] = key
        self.specs = {n: (self._tensors[k].dtype, tuple(self._tensors[k].shape)) for n, k in self._keys.items()}

    def read(self, names):
        from xform import checkpoint as ck

        out = {}
        for n in names:
            key = self._keys[n]
            src = self._tensors[key]
            t = src.clone()
            _drop_pages(src)
            if key in self._sums and (got := ck._crc_tensor(t)) != self._sums[key]:
                raise ck._fail(self.path, ck._TENSORS, f"tensor {key} fails its checksum (crc32 {got}, recorded {self._sums[key]}): the file is corrupt")
            out[n] = t
        return out


class XformDCP(Source):
    """``xf.save``'s several-process layout (torch.distributed.checkpoint files), read a
    block at a time without a process group."""

    def __init__(self, path: Path, meta: dict[str, Any]):
        self.path = path
        self._keys = {}
        self.specs = {}
        for e in meta["leaves"]:
            m = _XFORM_KEY.fullmatch(e["path"])
            if m and e["kind"] == "tensor":
                self._keys[m.group(2)] = e["path"]
                self.specs[m.group(2)] = (getattr(torch, e["dtype"]), tuple(e["shape"]))

    def read(self, names):
        import torch.distributed.checkpoint as dcp

        out = {n: torch.empty(self.specs[n][1], dtype=self.specs[n][0]) for n in names}
        with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
            warnings.simplefilter("ignore", UserWarning)
            dcp.load({self._keys[n]: t for n, t in out.items()}, checkpoint_id=str(self.path / "dcp"), no_dist=True)
        return out


def open_source(path: str | os.PathLike) -> Source:
    """The checkpoint at ``path``: a ``.safetensors`` file, an ``.index.json`` (HF's sharded
    layout), a directory holding one of those, or an ``xf.save`` checkpoint directory."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"xf.load_weights: no checkpoint at {p}")
    if p.is_dir():
        if (p / "meta.json").is_file():
            meta = json.loads((p / "meta.json").read_text())
            return XformDCP(p, meta) if meta.get("layout") == "dcp" else XformSingle(p, meta)
        indexes = sorted(p.glob("*.safetensors.index.json"))
        files = sorted(p.glob("*.safetensors"))
        if len(indexes) == 1:
            return _from_index(indexes[0])
        if len(indexes) > 1:
            raise ValueError(f"xf.load_weights: {p} holds several indexes ({[i.name for i in indexes]}); pass the path of one")
        if len(files) == 1:
            return Safetensors(p, files, None)
        raise ValueError(
            f"xf.load_weights: {p} holds no checkpoint xform reads ({len(files)} .safetensors files and no "
            "*.safetensors.index.json, no meta.json); pass a .safetensors file, an index, or an xf.save directory")
    if p.name.endswith(".index.json"):
        return _from_index(p)
    if p.suffix == ".safetensors":
        return Safetensors(p, [p], None)
    raise ValueError(f"xf.load_weights: {p} is not a .safetensors file, an .index.json or a checkpoint directory")


def _from_index(index: Path) -> Safetensors:
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (ValueError, KeyError, TypeError):
        raise ValueError(f"xf.load_weights: {index} is not a safetensors index (no 'weight_map')") from None
    files = [index.parent / f for f in dict.fromkeys(weight_map.values())]
    return Safetensors(index, files, weight_map)


# --- the offload directory -------------------------------------------------------------------


def read_index(directory: Path) -> dict[str, st.Entry]:
    f = directory / INDEX
    if not f.is_file():
        return {}
    raw = json.loads(f.read_text())
    return {n: st.Entry(e["file"], e["offset"], getattr(torch, e["dtype"]), tuple(e["shape"])) for n, e in raw.items()}


def write_index(directory: Path, entries: dict[str, st.Entry]) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    raw = {n: {"file": str(Path(e.file).resolve()), "offset": e.offset, "dtype": str(e.dtype).removeprefix("torch."),
               "shape": list(e.shape)} for n, e in entries.items()}
    tmp = directory / (INDEX + ".tmp")
    tmp.write_text(json.dumps(raw, indent=1))
    os.replace(tmp, directory / INDEX)


def block_file(directory: Path, block: str) -> Path:
    safe = re.sub(r"[^A-Za-z0-9_.-]", "_", block or "model")
    return directory / f"{safe}.safetensors"


def specs_of(names: Iterable[str], tensors: dict[str, torch.Tensor]) -> list:
    return [(n, tensors[n].dtype, tuple(tensors[n].shape)) for n in names]
