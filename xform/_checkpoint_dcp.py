"""Sharded (DCP) checkpoints read safely: DCP's pickled metadata through an explicit
(module, class) allow-list, validated against xform's ``meta.json``; the checksum of
every stored chunk written at save and verified, by each process, for what it reads.

Private to ``xform.checkpoint``, which imports it on first sharded use (so ``import
xform`` does not import DCP).
"""

from __future__ import annotations

import functools
import io
import math
import os
import pickle
import re
import warnings
from pathlib import Path
from typing import Any

import torch

from xform.checkpoint import (
    _CHECKSUM,
    _DCP,
    _DCP_META,
    CheckpointError,
    _cause,
    _crc_range,
    _dist,
    _dtype_names,
    _fail,
    _is_int,
)


def checksums(directory: Path, rank: int, world: int) -> dict[str, Any]:
    """The checksum of every stored chunk of a DCP checkpoint just written: each process
    hashes the chunks of every ``world``-th file (read back from the shared file system),
    and all of them get the whole list."""
    metadata = _unpickle_dcp_metadata(directory / ".metadata")
    chunks = sorted({(i.relative_path, i.offset, i.length, k.fqn) for k, i in metadata.storage_data.items()})
    files = sorted({c[0] for c in chunks})[rank::world]
    mine = []
    for name in files:
        with open(directory / name, "rb") as f:
            for file, offset, length, fqn in chunks:
                if file == name:
                    digest = _crc_range(f, offset, length)
                    mine.append({"tensor": fqn, "file": file, "offset": offset, "length": length, "crc32": digest})
    if world > 1:
        import torch.distributed as dist

        everyone: list[Any] = [None] * world
        dist.all_gather_object(everyone, mine)
        mine = [c for part in everyone for c in part]
    return {"algorithm": _CHECKSUM, "chunks": sorted(mine, key=lambda c: (c["file"], c["offset"]))}




def read(path: Path, targets: dict[str, torch.Tensor], checksums: dict[str, Any] | None) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException

    directory = path / _DCP
    try:
        metadata = _unpickle_dcp_metadata(directory / ".metadata")
    except FileNotFoundError:
        raise _fail(path, _DCP_META, "the file is missing") from None
    except _Refused as e:
        raise _fail(path, _DCP_META, str(e)) from None
    except Exception as e:  # noqa: BLE001 - whatever a damaged pickle raises
        raise _fail(path, _DCP_META, f"not DCP metadata ({_cause(e)})") from None
    chunks = None
    if checksums is not None:
        chunks = {(c["file"], c["offset"], c["length"]): (c["tensor"], c["crc32"]) for c in checksums["chunks"]}
    _check_dcp_metadata(path, metadata, targets, chunks)
    _, world = _dist()
    reader = _safe_reader_class()(str(directory), metadata, chunks, path)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*assuming the intent is to load in a single process")
            dcp.load(targets, storage_reader=reader, no_dist=world == 1)
    except CheckpointException as e:
        rank, failure = min(e.failures.items(), key=lambda kv: kv[0])
        exc = failure[0] if isinstance(failure, tuple) else getattr(failure, "exc", failure)
        who = f" (read by rank {rank})" if world > 1 else ""
        if isinstance(exc, CheckpointError):
            raise CheckpointError(f"{exc}{who}") from None
        raise _fail(path, _DCP, f"DCP failed{who}: {_cause(exc)}") from None


_SAFE_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")


def _check_dcp_metadata(path: Path, md: Any, targets: dict[str, torch.Tensor], chunks: dict | None) -> None:
    """DCP's metadata must describe exactly the tensors of meta.json (and ``like``), with
    their shapes and dtypes, stored in files of the checkpoint at the byte ranges whose
    checksums meta.json records; anything else (e.g. pickled bytes) is refused."""
    from torch.distributed.checkpoint.filesystem import _StorageInfo
    from torch.distributed.checkpoint.metadata import (
        BytesStorageMetadata,
        ChunkStorageMetadata,
        Metadata,
        MetadataIndex,
        TensorProperties,
        TensorStorageMetadata,
    )

    def bad(cause: str) -> CheckpointError:
        return _fail(path, _DCP_META, cause)

    if type(md) is not Metadata or type(md.state_dict_metadata) is not dict or type(md.storage_data) is not dict:
        raise bad(f"holds a {type(md).__name__}, not DCP metadata")
    entries = md.state_dict_metadata
    if set(entries) != set(targets):
        extra, missing = sorted(set(entries) - set(targets)), sorted(set(targets) - set(entries))
        raise bad(f"lists tensors {extra[:3]} that meta.json does not, and lacks {missing[:3]} that it does")
    for fqn, t in targets.items():
        e = entries[fqn]
        if type(e) is BytesStorageMetadata:
            raise bad(
                f"stores {fqn} as BytesStorageMetadata (a pickle, which DCP would unpickle with "
                "weights_only=False); xform never writes those: refusing the checkpoint"
            )
        if type(e) is not TensorStorageMetadata or type(e.properties) is not TensorProperties or type(e.size) is not torch.Size:
            raise bad(f"the entry of {fqn} is a {type(e).__name__}, not a tensor's")
        if e.properties.dtype != t.dtype or list(e.size) != list(t.shape):
            raise bad(f"declares {fqn} as {e.properties.dtype} {list(e.size)}, but meta.json says {t.dtype} {list(t.shape)}")
        volume = 0
        for c in e.chunks if isinstance(e.chunks, list) else [None]:
            if (
                type(c) is not ChunkStorageMetadata
                or type(c.offsets) is not torch.Size
                or type(c.sizes) is not torch.Size
                or not len(c.offsets) == len(c.sizes) == t.dim()
                or not all(0 <= o and o + n <= d for o, n, d in zip(c.offsets, c.sizes, t.shape))
            ):
                raise bad(f"a chunk of {fqn} is not a block inside its shape {list(t.shape)}: {c}")
            if MetadataIndex(fqn, c.offsets) not in md.storage_data:
                raise bad(f"has no storage for the chunk of {fqn} at {list(c.offsets)}")
            volume += math.prod(c.sizes)
        if volume != t.numel():
            raise bad(f"the chunks of {fqn} hold {volume} elements, not its {t.numel()}")
    for index, info in md.storage_data.items():
        if type(index) is not MetadataIndex or index.fqn not in targets or type(info) is not _StorageInfo:
            raise bad(f"holds storage for {getattr(index, 'fqn', index)!r}, which is not a tensor of the checkpoint")
        name = info.relative_path
        if not isinstance(name, str) or not _SAFE_NAME.fullmatch(name):
            raise bad(f"places {index.fqn} in {name!r}, which is not a file of the checkpoint's {_DCP} directory")
        if not _is_int(info.offset) or not _is_int(info.length) or info.offset < 0 or info.length < 0:
            raise bad(f"places {index.fqn} at bytes {info.offset!r}..+{info.length!r}")
        if getattr(info, "transform_descriptors", None):
            raise bad(f"stores {index.fqn} through transforms {info.transform_descriptors!r}, which xform never writes")
        if chunks is not None and chunks.get((name, info.offset, info.length), (None,))[0] != index.fqn:
            raise bad(
                f"places {index.fqn} at {_DCP}/{name} bytes {info.offset}..{info.offset + info.length}, "
                "where meta.json records no checksum of it"
            )


def _verify_reads(directory: Path, storage_data: dict, items: list, chunks: dict | None, checkpoint: Path) -> None:
    """Checks the bytes this process is about to read: there (not truncated) and, with
    checksums, equal to what was written."""
    per_file: dict[str, dict[tuple, str]] = {}
    for item in items:
        info = storage_data[item.storage_index]
        per_file.setdefault(info.relative_path, {})[(info.relative_path, info.offset, info.length)] = item.storage_index.fqn
    for name, keys in sorted(per_file.items()):
        file = f"{_DCP}/{name}"
        try:
            f = open(directory / name, "rb")
        except FileNotFoundError:
            raise _fail(checkpoint, file, "the file is missing") from None
        with f:
            size = os.fstat(f.fileno()).st_size
            for key, fqn in sorted(keys.items()):
                _, offset, length = key
                if offset + length > size:
                    raise _fail(
                        checkpoint, file,
                        f"the file is truncated: tensor {fqn} is stored at bytes {offset}..{offset + length}, the file has {size}",
                    )
                if chunks is not None and (got := _crc_range(f, offset, length)) != (want := chunks[key][1]):
                    raise _fail(
                        checkpoint, file,
                        f"tensor {fqn} (bytes {offset}..{offset + length}) fails its checksum ({_CHECKSUM} {got}, "
                        f"recorded {want}): the file is corrupt",
                    )


# DCP pickles its metadata. It is read admitting these classes only, by (module, name):
# never a whole module, never a dotted name (which would walk attributes, e.g. to `os`).
_DCP_CLASSES = frozenset(
    [("torch.distributed.checkpoint.metadata", n) for n in (
        "Metadata", "TensorStorageMetadata", "BytesStorageMetadata", "TensorProperties",
        "ChunkStorageMetadata", "MetadataIndex", "StorageMeta", "_MEM_FORMAT_ENCODING",
    )]
    + [("torch.distributed.checkpoint.filesystem", "_StorageInfo"), ("torch", "Size"),
       ("torch.serialization", "_get_layout"), ("collections", "OrderedDict")]
    + [("pathlib", n) for n in ("PosixPath", "PurePosixPath", "WindowsPath", "PureWindowsPath")]
)


class _Refused(pickle.UnpicklingError):
    pass


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if "." not in name and ((module, name) in _DCP_CLASSES or (module == "torch" and name in _dtype_names())):
            return super().find_class(module, name)
        raise _Refused(
            f"it refers to {module}.{name}, which is not one of the classes DCP metadata is made of; "
            "refusing to unpickle it"
        )

    def persistent_load(self, pid: Any) -> Any:
        raise _Refused("it holds a persistent reference, which DCP metadata never does; refusing to unpickle it")


def _unpickle_dcp_metadata(file: Path) -> Any:
    return _MetadataUnpickler(io.BytesIO(file.read_bytes()), fix_imports=False).load()


@functools.cache
def _safe_reader_class():
    """DCP's file reader over metadata ``xf.load`` has read safely and validated, checking
    what each process reads (made once, on first use, so that ``import xform`` does not
    import DCP)."""
    from torch.distributed.checkpoint import FileSystemReader

    class SafeReader(FileSystemReader):
        def __init__(self, directory: str, metadata: Any, chunks: dict | None, checkpoint: Path):
            super().__init__(directory)
            self._xform = (metadata, chunks, checkpoint)

        def read_metadata(self, *args: Any, **kwargs: Any):
            from torch.distributed.checkpoint.metadata import StorageMeta

            metadata = self._xform[0]
            metadata.storage_meta = StorageMeta(load_id=self.load_id)
            return metadata

        def read_data(self, plan: Any, planner: Any):
            _, chunks, checkpoint = self._xform
            _verify_reads(Path(self.path), self.storage_data, plan.items, chunks, checkpoint)
            return super().read_data(plan, planner)

    return SafeReader
