"""``dispatch``: hooks that bring each block's weights to the device that runs it."""

from __future__ import annotations

import concurrent.futures
import os
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from xform.inference import _safetensors as st
from xform.inference import _store
from xform.inference._load import groups, install
from xform.inference._map import DeviceMap, lookup, tensors


def _to(x: Any, device: torch.device) -> Any:
    if isinstance(x, torch.Tensor):
        return x if x.device == device else x.to(device)
    if isinstance(x, (list, tuple)) and not hasattr(x, "_fields"):
        return type(x)(_to(v, device) for v in x)
    if isinstance(x, dict):
        return {k: _to(v, device) for k, v in x.items()}
    return x


class _Block:
    """One block's hooks: its remote tensors (canonical name -> home) and their aliases
    inside the block."""

    def __init__(self, name: str, execution: torch.device, remote: dict[str, Any], aliases: dict[str, list[str]],
                 is_param: dict[str, bool], move_inputs: bool):
        self.name, self.execution, self.remote = name, execution, remote
        self.aliases, self.is_param, self.move_inputs = aliases, is_param, move_inputs


class _Runner:
    """Loads blocks (now, or ahead of time on a worker thread / CUDA side stream) and swaps
    their weights in for the block's forward, out after it."""

    def __init__(self, module: nn.Module, blocks: list[_Block], prefetch: bool):
        self.module = module
        self.blocks = blocks
        self.next = {}
        offloaded = [b for b in blocks if b.remote]
        for a, b in zip(offloaded, offloaded[1:]):
            self.next[a.name] = b
        self.by_name = {b.name: b for b in offloaded}
        self.last: str | None = None  # the offloaded block that ran last
        self.prefetch = prefetch
        self.pool: concurrent.futures.ThreadPoolExecutor | None = None
        self.pending: tuple[str, concurrent.futures.Future] | None = None
        self.streams: dict[torch.device, Any] = {}
        self.saved: dict[str, list[tuple[list[str], Any, bool]]] = {}

    def load(self, block: _Block):
        """The block's remote tensors on its execution device, and a CUDA event (or None)."""
        cuda = block.execution.type == "cuda"
        out = {}
        event = None
        stream = None
        if cuda and self.prefetch:  # copies on a side stream of their own, overlapping the block running
            if block.execution not in self.streams:
                self.streams[block.execution] = torch.cuda.Stream(block.execution)
            stream = self.streams[block.execution]
        ctx = torch.cuda.stream(stream) if stream is not None else _Null()
        with torch.no_grad(), ctx:
            for c, home in block.remote.items():
                t = st.read(home, pin=cuda, mapped=True) if isinstance(home, st.Entry) else home
                out[c] = t.to(block.execution, non_blocking=cuda)
            if stream is not None:
                event = torch.cuda.Event()
                event.record(stream)
        return out, event

    def fetch(self, block: _Block):
        if self.pending is not None and self.pending[0] == block.name:
            _, future = self.pending
            self.pending = None
            out, event = future.result()
        else:
            if self.pending is not None:  # prefetched a block that is not the one running
                self.pending[1].result()
                self.pending = None
            out, event = self.load(block)
        if event is not None:
            current = torch.cuda.current_stream(block.execution)
            current.wait_event(event)
            for t in out.values():
                t.record_stream(current)
        return out

    def before(self, block: _Block, args, kwargs):
        if block.remote:
            weights = self.fetch(block)
            saved = []
            for c, t in weights.items():
                names = block.aliases[c]
                owner, _, attr = names[0].rpartition(".")
                sub = self.module.get_submodule(owner)
                old = (sub._parameters if block.is_param[c] else sub._buffers)[attr]
                saved.append((names, old, block.is_param[c]))
                install(self.module, names, t, block.is_param[c])
            self.saved[block.name] = saved
            if self.last is not None and self.last != block.name:
                self.next[self.last] = self.by_name[block.name]  # learn the order blocks really run in
            self.last = block.name
            nxt = self.next.get(block.name)
            if self.prefetch and nxt is not None and self.pending is None:
                if self.pool is None:
                    self.pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="xform-prefetch")
                self.pending = (nxt.name, self.pool.submit(self.load, nxt))
        if block.move_inputs:
            return _to(args, block.execution), _to(kwargs, block.execution)
        return None

    def after(self, block: _Block):
        for names, old, is_param in self.saved.pop(block.name, ()):
            install(self.module, names, old, is_param)


class _Null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def dispatch(module: nn.Module, device_map: "Mapping[str, str] | DeviceMap", *, offload_dir: str | os.PathLike | None = None,
             prefetch: bool = True) -> nn.Module:
    """Installs hooks so that a plain ``module(x)`` runs across the devices of ``device_map``.

    Blocks on an accelerator keep their weights there; blocks on ``"cpu"`` run on the
    map's execution device (the first accelerator it names, else the CPU: then they are
    plain resident blocks); blocks on ``"disk"`` keep their weights in ``offload_dir`` and
    read them (plain reads, no memory map) just before their forward, dropping them after.
    Each block's inputs are moved to the device that runs it. With ``prefetch``, the next
    offloaded block is loaded while one runs: on a worker thread from disk, copied on a
    CUDA side stream to an accelerator (pinned memory). At most two offloaded blocks are
    in memory at a time, which is the room ``xf.device_map`` keeps.

    Weights the module holds for a disk block (a model built in memory) are written to
    ``offload_dir`` and freed; weights ``xf.load_weights`` left on meta are read from the
    records it wrote there. Tied tensors live once, with their first block.

    Args:
        module: the model, loaded (``xf.load_weights``) or in memory.
        device_map: block name to device (an ``xf.device_map`` or a dict).
        offload_dir: the directory of disk blocks; required when the map has ``"disk"``.
        prefetch: load the next offloaded block while one runs.

    Returns:
        ``module``, with hooks.

    Raises:
        ValueError: a tensor no block of the map holds, an unknown device, a tensor still
            on meta that ``offload_dir`` has no record of, or ``"disk"`` without ``offload_dir``.

    Example:
        >>> import tempfile, torch, xform as xf
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
        >>> x = torch.randn(3, 4)
        >>> want = model(x)
        >>> _ = xf.dispatch(model, {"0": "cpu", "1": "cpu", "2": "disk"}, offload_dir=tempfile.mkdtemp())
        >>> model[2].weight.device, torch.equal(model(x), want)
        (device(type='meta'), True)
    """
    api = "xf.dispatch"
    if not isinstance(module, nn.Module):
        raise TypeError(f"{api}: expected an nn.Module, got {type(module).__name__}")
    dm = DeviceMap.of(device_map)
    has_disk = "disk" in dm.values()
    if has_disk and offload_dir is None:
        raise ValueError(f"{api}: the device map puts blocks on 'disk'; pass offload_dir= (a directory for their weights)")
    directory = Path(offload_dir) if offload_dir is not None else None
    index = _store.read_index(directory) if directory is not None else {}
    execution = dm.execution
    names = {n for n, _ in module.named_modules()}
    tensor_names = {n for n, _, _ in tensors(module)}
    for block, dev in dm.items():
        if block not in names and block not in tensor_names:
            raise ValueError(f"{api}: the device map names {block!r}, which is neither a submodule nor a tensor of the model")
        if block not in names and dev == "disk":
            raise ValueError(f"{api}: the device map puts the tensor {block!r} on 'disk', but a tensor held directly by a "
                             "module has no forward of its own to load it in; map it (or its module) to a device")
    # 1. Homes: where each canonical tensor lives (a device, or an entry on disk).
    homes: dict[str, Any] = {}
    info = groups(module)
    to_write: dict[str, list[str]] = {}
    with torch.no_grad():
        for c, (aliases, t, is_param) in info.items():
            block = lookup(dm, c)
            if block is None:
                raise ValueError(f"{api}: the device map places no block holding {c}; add it (or a block above it) to the map")
            dev = dm[block]
            if dev == "disk":
                if t.device.type == "meta":
                    if c not in index:
                        raise ValueError(f"{api}: {c} is on meta and {directory} has no record of it; load the weights "
                                         "first with xf.load_weights(module, path, device_map=..., offload_dir=the same directory)")
                    e = index[c]
                    if tuple(e.shape) != tuple(t.shape):
                        raise ValueError(f"{api}: {c} is {list(e.shape)} in {directory} but {list(t.shape)} in the module")
                else:
                    to_write.setdefault(block, []).append(c)
            else:
                if t.device.type == "meta":
                    raise ValueError(f"{api}: {c} is on meta (no weights); load them first with xf.load_weights(module, path, device_map=...)")
                home = dev if (dev != "cpu" or execution == "cpu") else "cpu"
                if str(t.device) != home or (home == "cpu" and execution != "cpu" and not t.is_pinned()):
                    moved = t.detach().to(home)
                    if home == "cpu" and execution != "cpu":
                        moved = moved.pin_memory()
                    install(module, aliases, moved, is_param, requires_grad=t.requires_grad)
                homes[c] = module.get_parameter(c) if is_param else module.get_buffer(c)
        if to_write:
            directory.mkdir(parents=True, exist_ok=True)
        for block, cs in to_write.items():  # weights in memory for a disk block: write them once, free them
            file = _store.block_file(directory, block)
            held = {c: info[c][1] for c in cs}
            index.update(st.write(file, _store.specs_of(cs, held), held.__getitem__))
            for c in cs:
                install(module, info[c][0], info[c][1].detach().to("meta"), info[c][2], requires_grad=info[c][1].requires_grad)
        if to_write:
            _store.write_index(directory, index)
    for c, (aliases, t, is_param) in info.items():
        if dm[lookup(dm, c)] == "disk":
            homes[c] = index[c]
    # 2. Blocks: what each one must fetch for its forward.
    devices = {d if d not in ("cpu", "disk") else execution for d in dm.values()}
    blocks = []
    canon_of = {a: c for c, (aliases, _, _) in info.items() for a in aliases}
    for block, sub, dev in _hookable(module, dm, names):
        run = torch.device(dev if dev not in ("cpu", "disk") else execution)
        pre = f"{block}." if block else ""
        remote, aliases, is_param = {}, {}, {}
        for n, _, p in tensors(sub):
            c = canon_of[pre + n]
            home = homes[c]
            if isinstance(home, st.Entry) or home.device != run:
                remote[c] = home
                aliases.setdefault(c, []).append(pre + n)
                is_param[c] = p
        if remote or len(devices) > 1:
            blocks.append((sub, _Block(block, run, remote, aliases, is_param, move_inputs=len(devices) > 1)))
    runner = _Runner(module, [b for _, b in blocks], prefetch)
    for sub, b in blocks:
        sub.register_forward_pre_hook(lambda m, args, kwargs, b=b: runner.before(b, args, kwargs), with_kwargs=True)
        if b.remote:
            sub.register_forward_hook(lambda m, args, out, b=b: runner.after(b))
    return module



def _hookable(module: nn.Module, dm: DeviceMap, names: set[str]):
    """The map's blocks as modules whose forward runs: a container without a forward of its
    own (``ModuleList``, ``ModuleDict``) stands for its children."""
    def expand(name: str, sub: nn.Module, dev: str):
        if type(sub).forward is nn.Module.forward and list(sub.children()):
            pre = f"{name}." if name else ""
            for n, c in sub.named_children():
                yield from expand(pre + n, c, dev)
        else:
            yield name, sub, dev

    for block, dev in dm.items():
        if block in names:  # else a tensor held directly by a split module: resident, no forward to hook
            yield from expand(block, module.get_submodule(block), dev)
