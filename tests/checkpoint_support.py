"""Helpers of the checkpoint tests: functions run in pool processes (importable by spawned
workers), and ways to tamper with a checkpoint the way an attacker or a bad disk would."""

from __future__ import annotations

import io
import pickle
from pathlib import Path

import torch

import shard_support as sup
import xform as xf


def load_error(strategy: str | None, path: str) -> str:
    """Loads ``path`` like a ``strategy`` state on this process; the error, or "no error"."""
    _, like = sup.make(strategy)
    try:
        xf.load(path, like=like)
    except Exception as e:  # noqa: BLE001 - reported to the test
        return f"{type(e).__name__}: {e}"
    return "no error"


def full_params(state) -> dict[str, torch.Tensor]:
    return {k: (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().clone() for k, v in state.params.items()}


def load_params(strategy: str | None, path: str) -> dict[str, torch.Tensor]:
    _, like = sup.make(strategy)
    return full_params(xf.load(path, like=like))


# --- pickles that would run code ----------------------------------------------------------


def _text(s: str) -> bytes:
    b = s.encode()
    return b"\x8c" + bytes([len(b)]) + b  # SHORT_BINUNICODE


def _bytes(b: bytes) -> bytes:
    return b"B" + len(b).to_bytes(4, "little") + b  # BINBYTES


def call_pickle(module: str, name: str, arg: str | bytes) -> bytes:
    """A protocol-4 pickle of ``module``'s ``name`` (looked up with STACK_GLOBAL, so a
    dotted name walks attributes) called with one argument: ``find_class`` decides."""
    a = _text(arg) if isinstance(arg, str) else _bytes(arg)
    return b"\x80\x04" + _text(module) + _text(name) + b"\x93" + a + b"\x85R."


class Touch:
    """Unpickling this runs ``touch marker``."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        import os

        return (os.system, (f"touch {self.marker}",))


def code_pickle(marker: Path) -> bytes:
    """A plain pickle (``posix.system`` by GLOBAL) that touches ``marker`` when unpickled."""
    return pickle.dumps(Touch(marker), protocol=2)


# --- DCP metadata surgery -------------------------------------------------------------------


def read_metadata(ckpt: Path):
    with open(ckpt / "dcp" / ".metadata", "rb") as f:
        return pickle.load(f)  # trusted here: the test wrote it


def write_metadata(ckpt: Path, metadata) -> None:
    buf = io.BytesIO()
    pickle.dump(metadata, buf)
    (ckpt / "dcp" / ".metadata").write_bytes(buf.getvalue())


def storage_of(metadata, fqn: str):
    """The (MetadataIndex, _StorageInfo) pairs of tensor ``fqn``."""
    return [(k, v) for k, v in metadata.storage_data.items() if k.fqn == fqn]


def flip_byte_of(file: Path, tensor: torch.Tensor, at: int = 3) -> None:
    """Flips one bit of ``tensor``'s stored bytes inside ``file`` (found by content)."""
    raw = tensor.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
    data = bytearray(file.read_bytes())
    where = data.find(raw)
    assert where >= 0 and data.find(raw, where + 1) < 0, f"the bytes of the tensor are not in {file} exactly once"
    data[where + at] ^= 0x10
    file.write_bytes(bytes(data))
