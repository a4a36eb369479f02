"""safetensors files read and written one tensor at a time.

The safetensors format: 8 bytes (little-endian u64) giving the header's length, a JSON
header ``{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}``
and the raw bytes. A tensor is read into memory of its own (a plain read, or a memory map
of just its bytes that is unmapped when it dies), never through a long-lived map of the
whole file: a tensor costs resident memory while it lives and nothing after, which is
what streaming a model larger than memory needs.
"""

from __future__ import annotations

import json
import mmap
import os
import struct
import warnings
from pathlib import Path
from typing import Any, Callable, Iterable

import attrs
import torch

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
NAMES = {v: k for k, v in DTYPES.items()}
_MAX_HEADER = 100 << 20
_OWN_MAP = 1 << 20  # tensors from 1 MiB up are mapped, each with a mapping of its own


@attrs.frozen
class Entry:
    """Where one tensor's bytes lie: ``file``, absolute byte ``offset``, ``dtype``, ``shape``."""

    file: str
    offset: int
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n * torch.empty((), dtype=self.dtype).element_size()


def read_header(file: str | os.PathLike) -> dict[str, Entry]:
    """The entries of a safetensors file, by tensor name (in file order).

    Raises:
        FileNotFoundError: no such file.
        ValueError: not a safetensors file (a bad header or an unknown dtype).
    """
    file = str(file)
    size = os.path.getsize(file)
    with open(file, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ValueError(f"xf.load_weights: {file} is not a safetensors file ({size} bytes)")
        (n,) = struct.unpack("<Q", head)
        if n > _MAX_HEADER or 8 + n > size:
            raise ValueError(f"xf.load_weights: {file} is not a safetensors file (header of {n} bytes in a file of {size})")
        try:
            header = json.loads(f.read(n))
        except ValueError:
            raise ValueError(f"xf.load_weights: {file} is not a safetensors file (its header is not JSON)") from None
    out = {}
    for name, e in header.items():
        if name == "__metadata__":
            continue
        if e["dtype"] not in DTYPES:
            raise ValueError(f"xf.load_weights: {file}: tensor {name} has dtype {e['dtype']}, which xform does not read")
        begin, end = e["data_offsets"]
        entry = Entry(file, 8 + n + begin, DTYPES[e["dtype"]], tuple(e["shape"]))
        if end - begin != entry.nbytes or 8 + n + end > size:
            raise ValueError(f"xf.load_weights: {file}: tensor {name} has {end - begin} bytes for shape {list(entry.shape)} "
                             f"(or lies past the end of the file): the file is truncated or corrupt")
        out[name] = entry
    return dict(sorted(out.items(), key=lambda kv: kv[1].offset))


def read(entry: Entry, *, pin: bool = False, mapped: bool = False) -> torch.Tensor:
    """A CPU tensor holding the entry's bytes, that costs resident memory only while it lives.

    ``mapped`` (for a tensor dropped soon after, as a disk block's), from 1 MiB up and not
    ``pin``: a private memory map of the file's range of its own,
    populated at once (``MAP_POPULATE``: the page cache's pages mapped in one call, no
    copy) and unmapped when the tensor dies. Below, or into pinned memory for a copy to an
    accelerator, or for a tensor that stays (a map of a private file range would show
    later changes to the file): a plain read into a fresh tensor. Either way nothing stays mapped or
    cached in this process after the tensor is dropped, unlike a long-lived map of the
    whole file, whose touched pages all count as resident.
    """
    if mapped and entry.nbytes >= _OWN_MAP and not pin:
        start = entry.offset - entry.offset % mmap.ALLOCATIONGRANULARITY
        # Read-only: populating a writable private map would copy every page (the kernel
        # breaks copy-on-write ahead of time); a read-only one maps the page cache's pages.
        flags = mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0)
        with open(entry.file, "rb") as f:
            region = mmap.mmap(f.fileno(), entry.offset - start + entry.nbytes, flags=flags, prot=mmap.PROT_READ,
                               offset=start)
        with warnings.catch_warnings():  # "the given buffer is not writable": weights are read, never written
            warnings.simplefilter("ignore", UserWarning)
            flat = torch.frombuffer(region, dtype=torch.uint8, offset=entry.offset - start, count=entry.nbytes)
        return flat.view(entry.dtype).view(entry.shape)
    t = torch.empty(entry.shape, dtype=entry.dtype, pin_memory=pin)
    if entry.nbytes:
        buf = memoryview(t.view(-1).view(torch.uint8).numpy())
        with open(entry.file, "rb", buffering=0) as f:
            f.seek(entry.offset)
            got = 0
            while got < entry.nbytes:
                k = f.readinto(buf[got:])
                if not k:
                    raise ValueError(f"xf.load_weights: {entry.file} ends before its tensor at byte {entry.offset + got}")
                got += k
    return t


def write(file: str | os.PathLike, specs: Iterable[tuple[str, torch.dtype, tuple[int, ...]]],
          get: Callable[[str], torch.Tensor], metadata: dict[str, str] | None = None) -> dict[str, Entry]:
    """Writes a safetensors file tensor by tensor: ``specs`` gives names, dtypes and shapes
    (the header comes first), ``get(name)`` each tensor when its bytes are due, so at most
    one tensor is held at a time. Returns the entries written."""
    specs = list(specs)
    header: dict[str, Any] = {"__metadata__": dict(metadata or {"format": "pt"})}
    pos = 0
    for name, dtype, shape in specs:
        nbytes = Entry("", 0, dtype, tuple(shape)).nbytes
        header[name] = {"dtype": NAMES[dtype], "shape": list(shape), "data_offsets": [pos, pos + nbytes]}
        pos += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    base = 8 + len(raw)
    with open(file, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for name, dtype, shape in specs:
            t = get(name).detach()
            if t.dtype != dtype or tuple(t.shape) != tuple(shape):
                raise ValueError(f"save_sharded: tensor {name} changed while being written ({t.dtype} {list(t.shape)})")
            t = t.to("cpu").contiguous()
            if t.numel():
                f.write(memoryview(t.view(-1).view(torch.uint8).numpy()))
    return {name: Entry(str(file), base + header[name]["data_offsets"][0], dtype, tuple(shape)) for name, dtype, shape in specs}
