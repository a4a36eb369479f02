"""``device_map``: whole blocks of a module assigned to devices in order, by their bytes."""

from __future__ import annotations

import math
import re
from typing import Iterator, Mapping, Sequence

import attrs
import torch
from torch import nn

_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}
_OFFLOAD = ("cpu", "disk")


def parse_size(value: int | float | str | None, *, api: str = "device_map", key: str = "") -> float:
    """Bytes from ``1000``, ``"100MB"``, ``"20GiB"`` (``None``: no limit)."""
    if value is None:
        return math.inf
    if isinstance(value, bool):
        raise TypeError(f"{api}: max_memory[{key!r}] must be bytes (an int) or a string like '20GiB', got {value!r}")
    if isinstance(value, (int, float)):
        if value < 0:
            raise ValueError(f"{api}: max_memory[{key!r}] must be >= 0 bytes, got {value}")
        return float(value)
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", str(value))
    if not m or m.group(2).upper() not in _UNITS:
        raise ValueError(f"{api}: max_memory[{key!r}] must be bytes or a size like '100MB' or '20GiB', got {value!r}")
    return float(m.group(1)) * _UNITS[m.group(2).upper()]


def check_device(device: str, *, api: str) -> str:
    """A device name as xform places weights: ``"disk"``, ``"cpu"``, ``"cuda:0"``, ... ."""
    if device == "disk":
        return device
    try:
        d = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"{api}: unknown device {device!r}; use 'cpu', 'disk' or an accelerator like 'cuda:0'") from None
    if d.type not in ("cpu", "meta") and d.index is None:
        d = torch.device(d.type, 0)
    if d.type == "meta":
        raise ValueError(f"{api}: device 'meta' holds no weights; use 'cpu', 'disk' or an accelerator like 'cuda:0'")
    return str(d)


def fmt_bytes(n: float) -> str:
    if n == math.inf:
        return "unlimited"
    for unit, k in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= k:
            return f"{n / k:.1f} {unit}"
    return f"{int(n)} B"


def tensors(module: nn.Module) -> Iterator[tuple[str, torch.Tensor, bool]]:
    """Every (name, tensor, is_param) of the module, aliases of tied tensors included."""
    for name, p in module.named_parameters(remove_duplicate=False):
        yield name, p, True
    for name, b in module.named_buffers(remove_duplicate=False):
        yield name, b, False


def canonical_names(module: nn.Module) -> dict[str, str]:
    """Each tensor name to the first name of its tensor object (tied tensors share one)."""
    first: dict[int, str] = {}
    out = {}
    for name, t, _ in tensors(module):
        out[name] = first.setdefault(id(t), name)
    return out


def nbytes(t: torch.Tensor, dtype: torch.dtype | None = None) -> int:
    d = dtype if (dtype is not None and t.is_floating_point()) else t.dtype
    return t.numel() * torch.empty((), dtype=d).element_size()


def lookup(mapping: Mapping[str, str], name: str) -> str | None:
    """The entry of ``mapping`` (a block name or a tensor name) holding tensor ``name``."""
    parts = name.split(".")
    for i in range(len(parts), -1, -1):
        key = ".".join(parts[:i])
        if key in mapping:
            return key
    return None


@attrs.frozen(repr=False)
class DeviceMap(Mapping[str, str]):
    """Where each block of a model lives: a mapping from block name (a submodule's
    qualified name, or a tensor's for a tensor held directly by a split module; ``""``
    for the whole model) to ``"cuda:0"``, ``"cpu"`` or ``"disk"``, in the model's order.
    ``str()`` prints the placement table. Build one with ``xf.device_map``, or from any
    plain dict with ``DeviceMap.of``.

    ``sizes`` holds each block's bytes (tied tensors counted once, in their first block);
    ``reserved`` the bytes kept free on the execution device for two streamed blocks;
    ``execution`` the device that runs blocks kept on ``"cpu"`` or ``"disk"`` (the first
    accelerator in the map, else ``"cpu"``).

    Example:
        >>> import xform as xf
        >>> m = xf.DeviceMap.of({"0": "cpu", "1": "disk"})
        >>> dict(m), m.execution
        ({'0': 'cpu', '1': 'disk'}, 'cpu')
    """

    blocks: tuple[tuple[str, str], ...]
    sizes: tuple[int, ...] = attrs.field(default=())
    budgets: tuple[tuple[str, float], ...] = attrs.field(default=())
    reserved: int = 0

    @classmethod
    def of(cls, mapping: "Mapping[str, str] | DeviceMap") -> "DeviceMap":
        if isinstance(mapping, DeviceMap):
            return mapping
        if not isinstance(mapping, Mapping):
            raise TypeError(f"device map: expected a mapping of block name to device, got {type(mapping).__name__}")
        return cls(tuple((str(k), check_device(str(v), api="device map")) for k, v in mapping.items()))

    def __getitem__(self, key: str) -> str:
        return dict(self.blocks)[key]

    def __iter__(self):
        return (k for k, _ in self.blocks)

    def __len__(self) -> int:
        return len(self.blocks)

    @property
    def execution(self) -> str:
        return next((d for _, d in self.blocks if d not in _OFFLOAD), "cpu")

    def __repr__(self) -> str:
        return f"DeviceMap({dict(self.blocks)!r})"

    def __str__(self) -> str:
        rows = [("block", "device", "bytes")]
        for i, (name, dev) in enumerate(self.blocks):
            rows.append((name or "(model)", dev, fmt_bytes(self.sizes[i]) if i < len(self.sizes) else "?"))
        if self.sizes:
            totals: dict[str, int] = {}
            for (_, dev), n in zip(self.blocks, self.sizes):
                totals[dev] = totals.get(dev, 0) + n
            budgets = dict(self.budgets)
            rows.append(("", "", ""))
            for dev, n in totals.items():
                rows.append((f"total on {dev}", dev, fmt_bytes(n) + (f" of {fmt_bytes(budgets[dev])}" if dev in budgets else "")))
            if self.reserved:
                rows.append(("kept for 2 streamed blocks", self.execution, fmt_bytes(self.reserved)))
        w = [max(len(r[i]) for r in rows) for i in range(3)]
        return "\n".join(f"{r[0]:<{w[0]}}  {r[1]:<{w[1]}}  {r[2]:>{w[2]}}".rstrip() for r in rows)


def _split_into(module: nn.Module, prefix: str) -> list[tuple[str, "nn.Module | None"]]:
    """The units a module splits into: its direct tensors (by full name), then its children."""
    out: list[tuple[str, nn.Module | None]] = []
    for n, t in list(module._parameters.items()) + list(module._buffers.items()):
        if t is not None:
            out.append((f"{prefix}{n}", None))
    for n, c in module.named_children():
        out.append((f"{prefix}{n}", c))
    return out


def device_map(module: nn.Module, *, max_memory: Mapping[str, int | str | None],
               no_split: Sequence[str | type] = (), dtype: torch.dtype | None = None) -> DeviceMap:
    """Assigns the module's blocks to devices, in module order, by their bytes.

    Devices fill in the order ``max_memory`` lists them (``"disk"`` always last). A
    block that does not fit in what is left of a device is split into its children
    (its own tensors become entries of their own) unless its class is in ``no_split``
    or it has no children; a block that cannot be split moves on to the next device.
    Tied tensors are counted once, in their first block. When blocks go to ``"disk"``
    (or to ``"cpu"`` beside an accelerator), the device that runs them keeps room for two
    of the largest unsplittable blocks (the one running and the next one, prefetched),
    and offloaded blocks are split down to that size.

    Args:
        module: the model, typically built with ``xf.init_empty`` (meta tensors cost
            nothing but are measured all the same).
        max_memory: device to budget: bytes, a size string (``"20GiB"``, ``"100MB"``)
            or ``None`` for no limit; e.g. ``{"cuda:0": "20GiB", "cpu": "30GiB",
            "disk": None}``.
        no_split: module classes (or class names) never split across devices, e.g. a
            transformer layer with a residual connection.
        dtype: count floating tensors in this dtype (the dtype they will be loaded in).

    Returns:
        A ``DeviceMap``; ``print`` it for the placement table.

    Raises:
        ValueError: an unknown device, a bad size, a budget too small for the largest
            unsplittable block, or a model too large for every budget together.

    Example:
        >>> import torch, xform as xf
        >>> model = xf.init_empty(lambda: torch.nn.Sequential(*[torch.nn.Linear(256, 256) for _ in range(4)]))
        >>> dm = xf.device_map(model, max_memory={"cpu": "800KB", "disk": None})
        >>> dict(dm)
        {'0': 'cpu', '1': 'disk', '2': 'disk', '3': 'disk'}
    """
    api = "device_map"
    if not isinstance(module, nn.Module):
        raise TypeError(f"{api}: expected an nn.Module, got {type(module).__name__}")
    if not isinstance(max_memory, Mapping) or not max_memory:
        raise ValueError(f"{api}: max_memory must name at least one device, e.g. {{'cpu': '30GiB', 'disk': None}}; got {max_memory!r}")
    budgets = {check_device(str(k), api=api): parse_size(v, api=api, key=str(k)) for k, v in max_memory.items()}
    order = [d for d in budgets if d != "disk"] + (["disk"] if "disk" in budgets else [])
    if not order or order == ["disk"]:
        raise ValueError(f"{api}: max_memory needs a device that runs the model ('cpu' or an accelerator), got only {list(budgets)}")
    names = {n if isinstance(n, str) else n.__name__ for n in no_split}
    execution = next((d for d in order if d not in _OFFLOAD), "cpu")
    if execution not in budgets:
        execution = order[0]
    canon = canonical_names(module)
    owners = {}  # canonical tensor name -> unit that counts it
    by_name = dict((n, t) for n, t, _ in tensors(module))

    def unsplittable(m: "nn.Module | None") -> bool:
        return m is None or type(m).__name__ in names or not any(True for _ in m.children())

    def size(unit: str, m: "nn.Module | None", claim: bool) -> int:
        """Bytes of the unit, tied tensors counted where first claimed."""
        if m is None:
            items = [(unit, by_name[unit])]
        else:
            pre = f"{unit}." if unit else ""
            items = [(pre + n, t) for n, t, _ in tensors(m)]
        total, seen = 0, set()
        for n, t in items:
            c = canon[n]
            if owners.get(c, unit) != unit or c in seen:
                continue
            seen.add(c)
            if claim:
                owners[c] = unit
            total += nbytes(t, dtype)
        return total

    def leaves(unit: str, m: "nn.Module | None") -> Iterator[tuple[str, int]]:
        if m is None:
            return  # a tensor held directly by a split module stays resident: never streamed
        if unsplittable(m):
            yield unit, sum(nbytes(t, dtype) for _, t, _ in tensors(m))
        else:
            for u, c in _split_into(m, f"{unit}." if unit else ""):
                yield from leaves(u, c)

    largest_name, largest = max(leaves("", module), key=lambda x: x[1], default=("", 0))
    total = sum(nbytes(by_name[c], dtype) for c in set(canon.values()))
    resident = sum(budgets[d] for d in order if d != "disk" and (d == execution or d not in _OFFLOAD))
    offloading = total > resident
    reserve = 2 * largest if offloading else 0
    if offloading and budgets[execution] < reserve:
        raise ValueError(
            f"{api}: the model ({fmt_bytes(total)}) does not fit in max_memory[{execution!r}] = {fmt_bytes(budgets[execution])}, "
            f"and running its offloaded blocks needs room for two of its largest unsplittable blocks, {largest_name or '(model)'!r} "
            f"({fmt_bytes(largest)}): the one running and the next one, prefetched; raise max_memory[{execution!r}] to at "
            f"least {fmt_bytes(reserve)}, or let that block split (remove its class from no_split)")
    queue: list[tuple[str, nn.Module | None]] = [("", module)]
    placed: list[tuple[str, str, int]] = []
    di, used = 0, 0.0
    while queue:
        unit, m = queue[0]
        dev = order[di]
        offloaded = dev == "disk" or (dev in _OFFLOAD and dev != execution)
        cap = budgets[dev] - (reserve if dev == execution else 0)
        n = size(unit, m, claim=False)
        too_big_to_stream = offloaded and n > largest
        if used + n <= cap and not too_big_to_stream:
            size(unit, m, claim=True)
            placed.append((unit, dev, n))
            used += n
            queue.pop(0)
        elif not unsplittable(m):
            queue[0:1] = _split_into(m, f"{unit}." if unit else "")
        elif m is None and dev == "disk":
            # A tensor held directly by a split module has no forward of its own to hook:
            # it stays resident, on the device that runs the model.
            size(unit, m, claim=True)
            placed.append((unit, execution, n))
            queue.pop(0)
        else:
            di, used = di + 1, 0.0
            if di == len(order):
                left = sum(size(u, c, claim=False) for u, c in queue)
                raise ValueError(
                    f"{api}: the model ({fmt_bytes(total)}) does not fit in max_memory {dict(max_memory)!r}: "
                    f"{fmt_bytes(left)} from {unit or '(model)'!r} on have no room; raise a budget or add "
                    f"'disk': None to max_memory (offload_dir then holds those blocks)")
    offloaded = any(d == "disk" or (d in _OFFLOAD and d != execution) for _, d, _ in placed)
    return DeviceMap(tuple((u, d) for u, d, _ in placed), tuple(n for _, _, n in placed),
                     tuple((d, budgets[d]) for d in order), reserve if offloaded else 0)
