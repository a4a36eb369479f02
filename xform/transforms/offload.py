"""``offload``: keep the optimizer state, or the params, off the compute device.

Two designs, from DeepSpeed's papers:

- ``optimizer="cpu"`` (ZeRO-Offload): the optimizer state lives in host memory and the
  update runs there. On a CUDA device, gradients are copied to pinned host buffers, the
  optimizer steps a host copy of the params (the master, equal to the params) and the
  updated values are copied back. On a CPU device the state already lives in host
  memory and the step is the plain step.
- ``optimizer="disk"`` (ZeRO-Infinity): every optimizer-state tensor shaped like its
  parameter lives in a memory-mapped file under ``dir``, and the update streams it in
  chunks of about ``chunk_mb``: the pages of one chunk are mapped in, the optimizer steps
  the params of that chunk, and the pages are dropped from the process
  (``madvise(MADV_DONTNEED)``: the data stays in the file, the page cache may keep it)
  while the next chunk is already being read ahead (``MADV_WILLNEED``, the kernel's
  asynchronous read-ahead, so no Python thread competes for the interpreter). Resident
  memory holds one chunk of optimizer state at a time.
- ``params="disk"``: every parameter lives in a memory-mapped file under ``dir``; a
  module's pages are read ahead just before its forward, dropped after it, read again
  for its backward and dropped once its gradient is computed (a hook on the parameter),
  the module after it read ahead meanwhile. ``params="cpu"`` on a CPU device keeps them
  where they are (the plain step).

The state stays an ordinary ``TrainState``: its leaves are tensors whose storage is a
file mapping (the files are unlinked as soon as they are mapped, so nothing is left
behind), so ``xf.save`` writes them like any other and a checkpoint of an offloaded state
loads without ``offload`` and the other way round. A state whose tensors are not in
place yet (a loaded one, one cast by ``mixed_precision``'s init) is moved on the first
call of the step.

How the update is taken over: the base ``update`` runs the state's optimizer through
``optimizer_step`` (clipping, learning-rate schedule, then ``optimizer.step()``). The
offloaded step gives the state's runtime a stand-in optimizer whose ``step()`` streams
the chunks through optimizers built by the state's own factory over views of them. So the
finiteness check, the skip, the loss scale and the clipping are the plain step's code,
and so is the arithmetic of each parameter: the same torch.optim algorithm (foreach or
for-loop, as the plain step) on views. A parameter larger than a chunk is split at row
boundaries, for the optimizers whose update is elementwise (SGD, Adam, AdamW, ...; other
optimizers step each parameter whole).

Nesting: ``offload`` composes with ``accumulate`` and ``mixed_precision`` in any order
(it handles the update and ``apply``; they handle the reduction and the loss scale), and
with ``shard("replicate")`` on either side. Under the sharded strategies (zero1/2/3,
hsdp, tp) the update runs on each process's shards and is refused: ZeRO-3 with params on
the host is FSDP2's ``CPUOffloadPolicy``, not built in this version. There is no separate
fp32 master copy under ``mixed_precision`` in this design: the params are the master
(fp32 params with autocast), or are stored in the low precision (``"params=bfloat16"``).
"""

from __future__ import annotations

import mmap
import os
import tempfile
from typing import Any, Callable

import torch

from xform.core.primitives import Handler, installed, tracing
from xform.core.state import TrainState
from xform.core.strategies import Replicate
from xform.core.transform import check_step, transforms_of, wrap

__all__ = ["offload"]

_PLACES = (None, "cpu", "disk")
_KEY = "offload"  # the runtime cache of the offloaded step
_PAGE = mmap.PAGESIZE
# torch.optim algorithms whose update of an element depends on that element only: a
# parameter may be split into row blocks stepped separately, with the same bits.
_ELEMENTWISE = frozenset(
    getattr(torch.optim, n) for n in
    ("SGD", "Adam", "AdamW", "Adamax", "NAdam", "RAdam", "Adagrad", "Adadelta", "RMSprop", "Rprop", "ASGD")
    if hasattr(torch.optim, n)
)


# --- file-backed tensors ----------------------------------------------------------------

_MAP_ATTR = "_xform_offload_map"  # on a file-backed tensor: its mmap object


def _on_disk(t: Any) -> bool:
    return isinstance(t, torch.Tensor) and t.__dict__.get(_MAP_ATTR) is not None


def _to_disk(t: torch.Tensor, directory: str, chunk: int) -> torch.Tensor:
    """A copy of ``t`` whose storage is a shared mapping of a file under ``directory``
    (unlinked at once: the space is freed with the tensor). Copied ``chunk`` bytes at a
    time, each dropped from memory after: moving a tensor to disk never holds it whole."""
    src = t.detach()
    nbytes = src.numel() * src.element_size()
    if nbytes == 0:
        return src.clone()
    fd, path = tempfile.mkstemp(prefix="xform-offload-", suffix=".bin", dir=directory)
    try:
        os.ftruncate(fd, nbytes)
        mm = mmap.mmap(fd, nbytes, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE)
    finally:
        os.close(fd)
        os.unlink(path)
    out = torch.frombuffer(mm, dtype=torch.uint8, count=nbytes).view(src.dtype).view(src.shape)
    flat_out, flat_src = out.view(-1), src.reshape(-1)
    step = max(1, chunk // src.element_size())
    for i in range(0, flat_out.numel(), step):
        flat_out[i : i + step].copy_(flat_src[i : i + step])
        _advise(mm, out, flat_out[i : i + step], mmap.MADV_DONTNEED)
    out.__dict__[_MAP_ATTR] = mm
    return out


def _advise(mm: mmap.mmap, base: torch.Tensor, view: torch.Tensor, advice: int) -> None:
    """``madvise`` over the pages ``view`` (a contiguous view of ``base``) spans."""
    start = view.data_ptr() - base.data_ptr()
    end = start + view.numel() * view.element_size()
    lo = start - start % _PAGE
    hi = min(len(mm), -(-end // _PAGE) * _PAGE)
    if hi > lo:
        mm.madvise(advice, lo, hi - lo)


def _drop(t: torch.Tensor) -> None:
    """Drops the pages of a file-backed tensor from this process (the file keeps them)."""
    mm = t.__dict__.get(_MAP_ATTR)
    if mm is not None:
        mm.madvise(mmap.MADV_DONTNEED)


def _prefetch(t: torch.Tensor) -> None:
    mm = t.__dict__.get(_MAP_ATTR)
    if mm is not None:
        mm.madvise(mmap.MADV_WILLNEED)


def _off_host(device: torch.device) -> bool:
    """Whether ``optimizer="cpu"`` moves anything: the compute device is not the host."""
    return device.type != "cpu"


def _param_shaped(v: Any, p: torch.Tensor) -> bool:
    return isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape == p.shape


def _pinned(t: torch.Tensor) -> torch.Tensor:
    """``t`` in host memory, pinned when CUDA is there (fast, asynchronous copies)."""
    host = t.detach().to("cpu", copy=True)
    return host.pin_memory() if torch.cuda.is_available() else host


# --- the chunked update -------------------------------------------------------------------


class _Piece:
    """A parameter, or a block of its rows, inside one chunk: views of the param, its
    optimizer-state leaves and (at step time) its gradient."""

    __slots__ = ("name", "rows", "param", "view", "leaves", "state")

    def __init__(self, name: str, rows: slice | None, param: torch.Tensor, leaves: dict[str, Any]):
        self.name, self.rows, self.param, self.leaves = name, rows, param, leaves
        self.view = param.detach() if rows is None else param.detach()[rows]
        self.state: dict[str, Any] = {}

    def cut(self, t: torch.Tensor) -> torch.Tensor:
        return t if self.rows is None else t[self.rows]


class _Chunk:
    __slots__ = ("pieces", "optimizer", "disk")

    def __init__(self, pieces: list[_Piece]):
        self.pieces = pieces
        self.optimizer: torch.optim.Optimizer | None = None
        self.disk: list[tuple[torch.Tensor, torch.Tensor]] = []  # (file-backed leaf, its view here)


def _plan(spec: Any, state: TrainState, chunk: int) -> list[_Chunk]:
    """The params in ``trainable`` order, grouped into chunks of about ``chunk`` bytes of
    streamed state; a parameter larger than a chunk split at row boundaries when the
    optimizer is elementwise."""
    factory = spec.optimizer
    split_ok = getattr(factory, "func", None) in _ELEMENTWISE
    params, leaves = state._params, state._opt_state["state"]
    chunks: list[_Chunk] = []
    current: list[_Piece] = []
    used = 0
    for name in spec.trainable:
        p = params[name]
        per_elem = sum(v.element_size() for v in leaves[name].values() if _param_shaped(v, p))
        per_elem += p.element_size() if _on_disk(p) else 0
        size = max(1, p.numel() * per_elem)
        if size > chunk and split_ok and p.dim() > 0 and p.shape[0] > 1:
            if current:
                chunks.append(_Chunk(current))
                current, used = [], 0
            row = max(1, size // p.shape[0])
            rows = max(1, chunk // row)
            for r in range(0, p.shape[0], rows):
                chunks.append(_Chunk([_Piece(name, slice(r, min(r + rows, p.shape[0])), p, leaves[name])]))
            continue
        if current and used + size > chunk:
            chunks.append(_Chunk(current))
            current, used = [], 0
        current.append(_Piece(name, None, p, leaves[name]))
        used += size
    if current:
        chunks.append(_Chunk(current))
    for c in chunks:
        for piece in c.pieces:
            for key, v in piece.leaves.items():
                if _param_shaped(v, piece.param):
                    view = piece.cut(v)
                    piece.state[key] = view
                    if _on_disk(v):
                        c.disk.append((v, view))
                elif isinstance(v, torch.Tensor) and piece.rows is not None:
                    piece.state[key] = v.clone()  # a block's own step counter, synced with the leaf
                else:
                    piece.state[key] = v
            if _on_disk(piece.param):
                c.disk.append((piece.param, piece.view))
    return chunks


class _Streamed:
    """Stands in for the state's optimizer inside the base update (see the module docs):
    ``optimizer_step`` sets the gradients and the learning rate on it and calls ``step``."""

    def __init__(self, spec: Any, state: TrainState, chunk: int):
        self.spec = spec
        self.names = spec.trainable
        self.params = [state._params[k] for k in self.names]
        self.leaves = state._opt_state["state"]
        self.initialized = state._opt_state["initialized"]
        self.chunks = _plan(spec, state, chunk)
        self.split = [piece for c in self.chunks for piece in c.pieces if piece.rows is not None]
        self.param_groups = [{"lr": None}]  # the schedule writes the learning rate here
        self.state = {p: self.leaves[k] for k, p in zip(self.names, self.params)}  # what adopt_opt_state reads

    def step(self) -> None:
        lr = self.param_groups[0]["lr"] if self.spec.schedule is not None else None
        chunks = self.chunks
        if self.initialized:  # the blocks' own counters (step) from the leaf
            for piece in self.split:
                for key, v in piece.state.items():
                    if isinstance(v, torch.Tensor) and not _param_shaped(v, piece.view):
                        v.copy_(piece.leaves[key])
        if chunks:
            _read_ahead(chunks[0])
        for i, c in enumerate(chunks):
            if i + 1 < len(chunks):
                _read_ahead(chunks[i + 1])
            opt = c.optimizer
            if opt is None:
                opt = c.optimizer = self.spec.optimizer([piece.view for piece in c.pieces])
                if self.initialized:
                    for piece in c.pieces:
                        opt.state[piece.view] = dict(piece.state)
            if lr is not None:
                for group in opt.param_groups:
                    group["lr"] = lr
            for piece in c.pieces:
                piece.view.grad = piece.cut(piece.param.grad)
            opt.step()
            for piece in c.pieces:
                piece.view.grad = None
                if not self.initialized:
                    self._adopt(opt, piece)
            for leaf, view in c.disk:
                _advise(leaf.__dict__[_MAP_ATTR], leaf, view, mmap.MADV_DONTNEED)
        if self.initialized:  # the blocks' own counters (step) back into the leaf, from the first block
            for piece in self.split:
                if piece.rows.start == 0:
                    for key, v in piece.state.items():
                        if isinstance(v, torch.Tensor) and not _param_shaped(v, piece.view):
                            piece.leaves[key].copy_(v)
        self.initialized = True

    def _adopt(self, opt: torch.optim.Optimizer, piece: _Piece) -> None:
        """After the first update: the state torch.optim made for this chunk moves into the
        (file-backed) leaves and the chunk's optimizer steps those from now on."""
        live = opt.state[piece.view]
        for key, v in list(live.items()):
            leaf = piece.leaves.get(key)
            if not isinstance(v, torch.Tensor) or not isinstance(leaf, torch.Tensor) or leaf.dtype != v.dtype:
                piece.leaves[key] = live[key] = v
                continue
            if _param_shaped(leaf, piece.param):
                target = piece.cut(leaf)
                target.copy_(v)
                live[key] = target
            else:
                if piece.rows is None or piece.rows.start == 0:
                    leaf.copy_(v)
                live[key] = v if piece.rows is not None else leaf
            piece.state[key] = live[key]


def _read_ahead(c: _Chunk) -> None:
    for leaf, view in c.disk:
        _advise(leaf.__dict__[_MAP_ATTR], leaf, view, mmap.MADV_WILLNEED)


class _OnHost:
    """Stands in for the optimizer of a state on a CUDA device when the optimizer state
    lives in host memory: gradients to pinned host buffers, the update on host copies of
    the params (equal to them), the results copied back asynchronously."""

    def __init__(self, spec: Any, state: TrainState):
        self.spec = spec
        self.params = [state._params[k] for k in spec.trainable]
        self.masters = [_pinned(p) for p in self.params]
        self.staging = [torch.empty_like(m).pin_memory() if m.is_pinned() else torch.empty_like(m) for m in self.masters]
        self.optimizer = spec.optimizer(self.masters)
        if state._opt_state["initialized"]:
            for k, m in zip(spec.trainable, self.masters):
                self.optimizer.state[m] = dict(state._opt_state["state"][k])
        self.param_groups = self.optimizer.param_groups

    @property
    def state(self) -> dict[torch.Tensor, Any]:
        return {p: self.optimizer.state[m] for p, m in zip(self.params, self.masters)}

    def step(self) -> None:
        for s, p in zip(self.staging, self.params):
            s.copy_(p.grad, non_blocking=True)
        if self.params[0].is_cuda:
            torch.cuda.current_stream(self.params[0].device).synchronize()
        for m, s in zip(self.masters, self.staging):
            m.grad = s
        self.optimizer.step()
        for m, p in zip(self.masters, self.params):
            m.grad = None
            p.detach().copy_(m, non_blocking=True)


# --- the handler ----------------------------------------------------------------------------


class _Handler(Handler):
    """Takes over the optimizer of the base update (``_Streamed``/``_OnHost``) and, with
    params on disk, reads each module's pages ahead of its forward and drops them after it
    and after its backward."""

    def __init__(self, settings: "_Settings"):
        self.settings = settings

    def apply(self, state, params, args, kwargs, next):
        if self.settings.params != "disk":
            return next(state, params, args, kwargs)
        order = _owners(state)
        handles = []
        for i, (module, tensors) in enumerate(order):
            after = order[i + 1][1] if i + 1 < len(order) else ()
            handles.append(module.register_forward_pre_hook(_before(tensors, after)))
            handles.append(module.register_forward_hook(_after(tensors)))
        try:
            return next(state, params, args, kwargs)
        finally:
            for h in handles:
                h.remove()

    def value_and_grad(self, fn, params, has_aux, next):
        if self.settings.params != "disk":
            return next(fn, params, has_aux)
        hooks = [p.register_hook(_released(p)) for p in params.values() if p.requires_grad and _on_disk(p)]
        try:
            return next(fn, params, has_aux)
        finally:
            for h in hooks:
                h.remove()

    def update(self, state, grads, next):
        settings = self.settings
        rt = state._runtime("offload")
        cache = rt.extras.get(_KEY)
        if settings.optimizer == "disk" or (settings.optimizer == "cpu" and _off_host(rt.device)):
            if cache is None or rt.optimizer is not cache:
                cache = rt.extras[_KEY] = rt.optimizer = (
                    _Streamed(state._spec, state, settings.chunk) if settings.optimizer == "disk"
                    else _OnHost(state._spec, state)
                )
        try:
            return next(state, grads)
        finally:
            if settings.params == "disk":
                for p in state._params.values():
                    _drop(p)


_TRACED = (
    "offload: the step is being traced by xf.jit, whose update runs on copies of the whole optimizer state "
    "in memory; run the offloaded step eagerly (drop xf.jit), or drop offload to compile it"
)


def _owners(state: TrainState) -> list[tuple[torch.nn.Module, tuple[torch.Tensor, ...]]]:
    """The modules that directly hold file-backed params, in registration order."""
    out = []
    for module in state._spec.module.modules():
        own = tuple(p for p in module._parameters.values() if p is not None and _on_disk(p))
        if own:
            out.append((module, own))
    return out


def _before(tensors, after) -> Callable[..., None]:
    def hook(module, args):
        for t in tensors:
            _prefetch(t)
        for t in after:  # the next module's pages, read while this one computes
            _prefetch(t)

    return hook


def _after(tensors) -> Callable[..., None]:
    def hook(module, args, out):
        for t in tensors:
            _drop(t)

    return hook


def _released(p: torch.Tensor) -> Callable[[torch.Tensor], None]:
    def hook(grad: torch.Tensor) -> None:
        _drop(p)  # its backward is done: the pages go until the update

    return hook


# --- the transform ----------------------------------------------------------------------------


class _Settings:
    __slots__ = ("params", "optimizer", "dir", "chunk")

    def __init__(self, params: str | None, optimizer: str | None, directory: str | None, chunk: int):
        self.params, self.optimizer, self.dir, self.chunk = params, optimizer, directory, chunk


_SHARDED = (
    "offload: the state is laid out for {strategy}, whose update runs on each process's shards; offload "
    "composes with shard('replicate') only in this version (ZeRO-3 with params on the host is FSDP2's "
    "CPUOffloadPolicy, not built here); use shard('replicate') with offload, or the sharded strategy alone"
)


def _check_layout(state: TrainState) -> None:
    strategy = getattr(state._spec.layout, "strategy", None)
    if strategy is not None and type(strategy) is not Replicate:
        raise ValueError(_SHARDED.format(strategy=f"shard({getattr(strategy, 'name', type(strategy).__name__)!r})"))


def _check_device(state: TrainState, settings: _Settings) -> None:
    device = state._spec.device
    if settings.params is not None and device.type != "cpu":
        raise ValueError(
            f"offload: params={settings.params!r} with the model on {device} is not built in this version "
            "(params are offloaded for a CPU compute device only); use optimizer='cpu' or 'disk' on "
            f"{device.type}, or build the model on the CPU"
        )


def _moved(state: TrainState, settings: _Settings) -> TrainState:
    """``state`` with its tensors where ``settings`` keep them: the same state when they
    are there already (a fast check per call, by the runtime's cache), else a new one."""
    rt = state._runtime("offload")
    if rt.extras.get(_KEY + ".placed") is settings:
        return state
    directory, chunk = settings.dir, settings.chunk
    host = settings.optimizer == "cpu" and _off_host(state._spec.device)
    params = state._params
    new_params = None
    if settings.params == "disk" and not all(_on_disk(p) for p in params.values()):
        os.makedirs(directory, exist_ok=True)
        new_params = {}
        for k, p in params.items():
            if _on_disk(p):
                new_params[k] = p
                continue
            disk = _to_disk(p, directory, chunk)
            q = torch.nn.Parameter(disk, requires_grad=p.requires_grad)
            q.__dict__[_MAP_ATTR] = disk.__dict__.get(_MAP_ATTR)
            new_params[k] = q
    opt = state._opt_state
    new_opt = None
    if settings.optimizer == "disk" or host:
        ref = new_params or params
        entries = {}
        changed = False
        for k, entry in opt["state"].items():
            out = {}
            for key, v in entry.items():
                if settings.optimizer == "disk" and _param_shaped(v, ref[k]) and not _on_disk(v):
                    os.makedirs(directory, exist_ok=True)
                    v, changed = _to_disk(v, directory, chunk), True
                elif host and isinstance(v, torch.Tensor) and v.device.type != "cpu":
                    v, changed = _pinned(v), True
                out[key] = v
            entries[k] = out
        if changed:
            new_opt = {"initialized": opt["initialized"], "state": entries}
    if new_params is not None or new_opt is not None:
        changes = {}
        if new_params is not None:
            changes["params"] = new_params
        if new_opt is not None:
            changes["opt_state"] = new_opt
        state = state.replace(**changes)
    state._runtime("offload").extras[_KEY + ".placed"] = settings
    return state


def offload(
    step: Callable[..., Any],
    *,
    params: str | None = None,
    optimizer: str | None = None,
    dir: str | os.PathLike | None = None,  # noqa: A002 (the issue's name)
    chunk_mb: float = 64,
):
    """Runs ``step`` with the optimizer state, or the params, kept off the compute device.

    Args:
        step: a step ``step(state, batch) -> (state, metrics)``, possibly transformed.
        params: ``None``, ``"cpu"`` or ``"disk"``. ``"disk"``: params in memory-mapped
            files under ``dir``; each module's pages are read ahead before its forward
            and dropped after it and after its backward (CPU compute device only in this
            version). ``"cpu"`` on a CPU device: where they are already.
        optimizer: ``None``, ``"cpu"`` or ``"disk"``. ``"cpu"``: the optimizer state in
            (pinned) host memory and the update run there (on a CPU device, the plain
            step). ``"disk"``: the optimizer state in memory-mapped files under ``dir``,
            streamed through the update ``chunk_mb`` at a time.
        dir: the directory of the files (created if missing; the files are unlinked once
            mapped, so nothing stays there). Needed with ``"disk"``; put it on a real
            disk, not a tmpfs (which is memory).
        chunk_mb: the streamed state's bytes per chunk of the update (MiB).

    The result equals the plain step bit for bit on a CPU device in float32 (the same
    torch.optim code runs on views of the same values). ``offload(step)`` is ``step``.

    Example:
        >>> import tempfile, torch, xform as xf
        >>> def step(state, batch):
        ...     loss, grads = xf.value_and_grad(lambda p: xf.apply(state, p, batch).square().mean())(state.params)
        ...     return state.apply_gradients(grads), {"loss": loss}
        >>> with tempfile.TemporaryDirectory() as d:  # the files are unlinked once mapped: d can go
        ...     offloaded = xf.offload(step, optimizer="disk", dir=d, chunk_mb=1)
        ...     state = xf.TrainState.create(torch.nn.Linear(4, 2), optimizer=torch.optim.AdamW, lr=0.1)
        ...     state, metrics = offloaded(offloaded.init(state), torch.ones(8, 4))
        >>> state.step
        1
    """
    check_step("offload", step)
    for what, value in (("params", params), ("optimizer", optimizer)):
        if value not in _PLACES:
            raise ValueError(f"offload: {what} must be None, 'cpu' or 'disk', got {value!r}")
    if dir is not None and not isinstance(dir, (str, os.PathLike)):
        raise TypeError(f"offload: dir must be a path (str or os.PathLike), got {type(dir).__name__}")
    if "disk" in (params, optimizer) and dir is None:
        which = "params" if params == "disk" else "optimizer"
        raise ValueError(
            f"offload: {which}='disk' needs dir=..., a directory on a real disk for the memory-mapped files, "
            "e.g. offload(step, optimizer='disk', dir='/scratch/offload')"
        )
    if isinstance(chunk_mb, bool) or not isinstance(chunk_mb, (int, float)):
        raise TypeError(f"offload: chunk_mb must be a number of MiB, got {chunk_mb!r}")
    if not chunk_mb > 0:
        raise ValueError(f"offload: chunk_mb must be > 0, got {chunk_mb!r}; use e.g. chunk_mb=64")
    if params is None and optimizer is None:
        return step
    record = transforms_of(step)
    if "offload" in record:
        raise ValueError("offload: this step is already wrapped in offload; apply it once, with both settings")
    inner_strategy = record.setting("shard", "strategy")
    if inner_strategy is not None and type(inner_strategy) is not Replicate:
        raise ValueError(_SHARDED.format(strategy=f"shard({inner_strategy.name!r})"))
    settings = _Settings(params, optimizer, None if dir is None else os.fspath(dir), max(1, int(chunk_mb * 2**20)))

    def init(state: TrainState) -> TrainState:
        _check_layout(state)
        _check_device(state, settings)
        return _moved(state, settings)

    def call(state: TrainState, batch: Any):
        if tracing() is not None:
            raise ValueError(_TRACED)
        _check_layout(state)
        if settings.params is not None:
            _check_device(state, settings)
        state = _moved(state, settings)
        with installed(_Handler(settings)):
            return step(state, batch)

    return wrap(
        step, call, init,
        name="offload", params=params, optimizer=optimizer, dir=settings.dir, chunk_mb=chunk_mb,
    )
