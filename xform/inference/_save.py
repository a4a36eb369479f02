"""``save_sharded``: the common sharded safetensors layout (shards + index.json)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Mapping

import torch
from torch import nn

from xform.inference import _safetensors as st
from xform.inference._map import nbytes, parse_size

INDEX = "model.safetensors.index.json"


def save_sharded(module_or_state_dict: "nn.Module | Mapping[str, torch.Tensor]", directory: str | os.PathLike, *,
                 max_shard_size: int | str = "5GB") -> Path:
    """Writes weights as ``model-0000i-of-0000n.safetensors`` shards and
    ``model.safetensors.index.json`` (the layout Hugging Face models use), a tensor at a
    time. Tied tensors (one object under several names) are stored once, under their first
    name; ``xf.load_weights`` loads them into every alias. Shards hold whole tensors, in
    order, each under ``max_shard_size`` unless one tensor alone is larger.

    Args:
        module_or_state_dict: a module (its parameters and persistent buffers) or a dict
            of name to tensor.
        directory: created if needed.
        max_shard_size: bytes or a size string (``"100MB"``).

    Returns:
        The index's path.

    Example:
        >>> import json, tempfile, torch, xform as xf
        >>> index = xf.save_sharded(torch.nn.Linear(4, 4), tempfile.mkdtemp(), max_shard_size=40)
        >>> json.loads(index.read_text())["weight_map"]
        {'weight': 'model-00001-of-00002.safetensors', 'bias': 'model-00002-of-00002.safetensors'}
    """
    api = "save_sharded"
    if isinstance(module_or_state_dict, nn.Module):
        sd = module_or_state_dict.state_dict(keep_vars=True)
    elif isinstance(module_or_state_dict, Mapping):
        sd = dict(module_or_state_dict)
    else:
        raise TypeError(f"{api}: expected an nn.Module or a dict of tensors, got {type(module_or_state_dict).__name__}")
    limit = parse_size(max_shard_size, api=api, key="max_shard_size")
    seen: set[int] = set()
    items = []
    for name, t in sd.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{api}: {name} is a {type(t).__name__}, not a tensor")
        if t.device.type == "meta":
            raise ValueError(f"{api}: {name} is on meta (no data); load the weights before saving them")
        if id(t) in seen:
            continue
        seen.add(id(t))
        items.append((name, t))
    shards: list[list[tuple[str, torch.Tensor]]] = [[]]
    size = 0
    for name, t in items:
        n = nbytes(t)
        if shards[-1] and size + n > limit:
            shards.append([])
            size = 0
        shards[-1].append((name, t))
        size += n
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    weight_map = {}
    total = 0
    for i, shard in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        tensors = dict(shard)
        st.write(directory / fname, [(n, t.dtype, tuple(t.shape)) for n, t in shard], tensors.__getitem__)
        for n, t in shard:
            weight_map[n] = fname
            total += nbytes(t)
    index = directory / INDEX
    index.write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    return index
