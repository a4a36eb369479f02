"""``load_weights``: stream a checkpoint into a module, block by block, onto its devices."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping

import torch
from torch import nn

from xform.inference import _safetensors as st
from xform.inference import _store
from xform.inference._map import DeviceMap, canonical_names, lookup, tensors


def install(module: nn.Module, names: list[str], value: torch.Tensor | None, is_param: bool, requires_grad: bool = False):
    """Puts ``value`` under every alias in ``names`` (one object, so ties stay ties)."""
    if is_param and value is not None and not isinstance(value, nn.Parameter):
        value = nn.Parameter(value, requires_grad=requires_grad)
    for name in names:
        owner, _, attr = name.rpartition(".")
        sub = module.get_submodule(owner)
        (sub._parameters if is_param else sub._buffers)[attr] = value
    return value


def groups(module: nn.Module) -> dict[str, tuple[list[str], torch.Tensor, bool]]:
    """Canonical tensor name to (its aliases, the tensor, is it a parameter), in module order."""
    out: dict[str, tuple[list[str], torch.Tensor, bool]] = {}
    canon = canonical_names(module)
    for name, t, is_param in tensors(module):
        c = canon[name]
        if c not in out:
            out[c] = ([], t, is_param)
        out[c][0].append(name)
    return out


def load_weights(module: nn.Module, path: str | os.PathLike, *, device_map: "Mapping[str, str] | DeviceMap | None" = None,
                 offload_dir: str | os.PathLike | None = None, strict: bool = True) -> nn.Module:
    """Streams the checkpoint at ``path`` into ``module``, tensor by tensor, onto the devices
    of ``device_map``: the whole model is never in memory at once.

    ``path`` is a ``.safetensors`` file, a sharded safetensors checkpoint (a directory
    with ``*.safetensors`` and one ``*.safetensors.index.json``, or the index itself), or an
    ``xf.save`` checkpoint directory (its ``params`` and ``buffers``; one-process
    checkpoints are checked against their crc32 sums). Each tensor is read (with plain
    reads, no memory map), converted to the dtype of the module's tensor, moved to its
    block's device and put in place of the module's (meta) tensor; tied tensors, stored
    once, are loaded once and stay one object. Blocks mapped to ``"disk"`` stay on meta:
    their tensors are recorded in ``offload_dir`` (a reference into the checkpoint's own
    safetensors files when it has them, else a copy written there) for ``xf.dispatch``.

    Args:
        module: the model, typically from ``xf.init_empty``.
        path: the checkpoint.
        device_map: block name to device (an ``xf.device_map`` or a dict); without it,
            every tensor goes to ``"cpu"`` (or stays on the device it is already on).
        offload_dir: where disk blocks are recorded; required when the map has ``"disk"``.
        strict: refuse checkpoint tensors the module does not have.

    Returns:
        ``module``, loaded in place.

    Raises:
        FileNotFoundError: no checkpoint, or a shard its index lists is missing.
        ValueError: a tensor missing from the checkpoint, a shape that differs, an
            unexpected tensor (``strict``), or ``"disk"`` without ``offload_dir``.

    Example:
        >>> import tempfile, torch, xform as xf
        >>> d = tempfile.mkdtemp()
        >>> _ = xf.save_sharded(torch.nn.Linear(4, 4), d, max_shard_size="40B")
        >>> m = xf.load_weights(xf.init_empty(lambda: torch.nn.Linear(4, 4)), d)
        >>> m.weight.device
        device(type='cpu')
    """
    api = "xf.load_weights"
    if not isinstance(module, nn.Module):
        raise TypeError(f"{api}: expected an nn.Module, got {type(module).__name__}")
    dm = DeviceMap.of(device_map) if device_map is not None else None
    src = _store.open_source(path)
    found: dict[str, tuple[str, list[str], torch.Tensor, bool, str]] = {}  # key -> (canonical, aliases, t, param, dev)
    missing = []
    for c, (aliases, t, is_param) in groups(module).items():
        key = next((a for a in aliases if a in src.specs), None)
        if key is None:
            if t.device.type == "meta":
                missing.append(c)
            continue
        dtype, shape = src.specs[key]
        if tuple(shape) != tuple(t.shape):
            raise ValueError(f"{api}: {key} is {list(shape)} in the checkpoint at {src.path} but {list(t.shape)} in the module; "
                             "build the module with the checkpoint's configuration")
        if dm is not None:
            block = lookup(dm, c)
            if block is None:
                raise ValueError(f"{api}: the device map places no block holding {c}; add it (or a block above it) to the map")
            dev = dm[block]
        else:
            dev = "cpu" if t.device.type == "meta" else str(t.device)
        found[key] = (c, aliases, t, is_param, dev)
    if missing:
        raise ValueError(f"{api}: the checkpoint at {src.path} has no tensor for {missing[0]!r}"
                         + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
                         + "; it was saved from another model, or pass the checkpoint of this one")
    if strict and (extra := [k for k in src.specs if k not in found and not _alias_of_found(k, module)]):
        raise ValueError(f"{api}: the checkpoint at {src.path} holds {extra[0]!r}"
                         + (f" (and {len(extra) - 1} more)" if len(extra) > 1 else "")
                         + ", which the module does not have; pass strict=False to ignore such tensors")
    disk = {k: v for k, v in found.items() if v[4] == "disk"}
    if disk and offload_dir is None:
        raise ValueError(f"{api}: the device map puts {len(disk)} tensors on 'disk' (e.g. {next(iter(disk))}); pass offload_dir=")
    keys = sorted((k for k in found if k not in disk), key=src.order)
    with torch.no_grad():
        for k in keys:  # one tensor in memory at a time, besides what stays on the devices
            c, aliases, t, is_param, dev = found[k]
            value = src.read([k])[k].to(dtype=t.dtype)
            value = value.to(dev)
            install(module, aliases, value, is_param, requires_grad=t.requires_grad if is_param else False)
            del value
        if disk:
            _record_disk(module, src, disk, Path(offload_dir), dm)
    return module


def _alias_of_found(key: str, module: nn.Module) -> bool:
    """A checkpoint key naming another alias of a tensor already loaded (a tie stored twice)."""
    try:
        owner, _, attr = key.rpartition(".")
        sub = module.get_submodule(owner)
    except AttributeError:
        return False
    return attr in sub._parameters or attr in sub._buffers


def _record_disk(module, src: _store.Source, disk: dict, directory: Path, dm: DeviceMap | None) -> None:
    """References (or copies) of the disk blocks' tensors in ``directory``'s index."""
    index = _store.read_index(directory)
    copies: dict[str, list[str]] = {}
    for k, (c, aliases, t, is_param, dev) in disk.items():
        e = src.entry(k)
        if e is not None and e.dtype == t.dtype:
            index[c] = e
        else:
            copies.setdefault(lookup(dm, c) if dm is not None else "", []).append(k)
    directory.mkdir(parents=True, exist_ok=True)
    for block, ks in copies.items():
        dtypes = {k: disk[k][2].dtype for k in ks}
        specs = [(disk[k][0], dtypes[k], tuple(disk[k][2].shape)) for k in ks]
        by_c = {disk[k][0]: k for k in ks}
        written = st.write(_store.block_file(directory, block), specs,
                           lambda c: src.read([by_c[c]])[by_c[c]].to(dtypes[by_c[c]]))
        index.update(written)
    _store.write_index(directory, index)
