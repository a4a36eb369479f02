"""The primitives a step reaches the outside world through, and their handler stack.

A transform cannot look inside an eager PyTorch function, so it handles the few
operations where training semantics live, as an effect handler does:

- ``apply``: the forward pass with given params.
- ``value_and_grad``: the loss, its gradient, and ``objective``, the scalar that is
  differentiated (the loss scale multiplies it; reducers take over its normalization).
- ``apply_gradients``: what happens to gradients before the update (accumulate absorbs
  them until the last micro-batch; shard communicates them).
- ``update``: the optimizer update itself (mixed_precision unscales, checks finiteness
  and skips on overflow around it).

Handlers live on a ``contextvars`` stack installed by each transformed step for the
duration of its call, never in a global. The innermost transform's handler sees a
primitive first and calls ``next`` to pass it outward; the base implementation is last.
Splitting the gradient path into ``apply_gradients`` (reduction) and ``update`` (the
optimizer) is what makes ``accumulate(mixed_precision(f))`` and
``mixed_precision(accumulate(f))`` mean the same thing: the loss-scale check always
wraps the one real update, whatever the nesting.
"""

from __future__ import annotations

import contextvars
import fractions
import re
from typing import TYPE_CHECKING, Any, Callable

import optree
import torch

from xform.core.mean import Mean
from xform.tree import NAMESPACE

try:  # the engine entry torch.autograd.grad calls (see _grad)
    from torch.autograd.graph import _engine_run_backward as _run_backward
except ImportError:  # pragma: no cover - an older or newer torch
    _run_backward = None

if TYPE_CHECKING:
    from xform.core.state import TrainState

__all__ = [
    "Handler", "Reducer", "apply", "value_and_grad", "installed", "dispatch", "rng_salt", "rng_guard",
    "Trace", "tracing",
]


class Handler:
    """A transform's handler. Every method passes its primitive outward unchanged.

    Attributes:
        reduces: True for handlers that sum gradients over pieces of the batch
            (micro-batches, ranks): ``accumulate`` and ``shard``. See ``Reducer``.
    """

    reduces = False
    uses_backward = False  # take gradients with .backward() (module-hook based sharding)
    _memo: "tuple[_Stack, _Stack] | None" = None  # (outer stack, own stack) of a reused handler

    def apply(self, state, params, args, kwargs, next):
        return next(state, params, args, kwargs)

    def value_and_grad(self, fn, params, has_aux, next):
        return next(fn, params, has_aux)

    def objective(self, loss: Mean, next) -> torch.Tensor:
        return next(loss)

    def apply_gradients(self, state, grads, count, next):
        return next(state, grads, count)

    def update(self, state, grads, next):
        return next(state, grads)


class Reducer(Handler):
    """A handler that sums gradients over ``pieces`` pieces of the batch.

    Loss normalization across pieces: when reducers are installed, the gradient of
    piece i is taken of ``total_i`` (the un-normalized sum), its item count ``count_i``
    travels with the gradient (``apply_gradients``'s ``count``), each reducer sums both,
    and the update divides once by the total count: uneven pieces give exactly the
    full-batch gradient. A plain scalar loss counts as a mean over its piece; then the
    total number of pieces is known in advance, the gradient is divided by it up front
    (the backward starts from 1/pieces: the gradients of a hand-written loop's
    ``loss / pieces``, bit for bit) and the counts are exact fractions summing to 1.
    """

    reduces = True
    pieces = 1

    def __init__(self) -> None:
        self.pending: Any = None  # count recorded by value_and_grad, not yet passed on
        self.memo: dict[Any, Any] = {}  # exact counts by their terms (a Fraction is slow to build), backward seeds

    def at_last_piece(self) -> bool:
        """Whether the gradient being computed is this reducer's last piece."""
        return True

    def last_piece_inside(self) -> bool:
        """Whether every reducer installed inside this one is at its last piece: the
        gradient being computed is the last this reducer gets in this call."""
        stack = _HANDLERS.get().handlers
        return all(h.at_last_piece() for h in stack[stack.index(self) + 1 :] if h.reduces)

    def fold(self) -> dict[str, torch.Tensor] | None:
        """For an outer reducer that sends this last piece's gradient itself (``shard``'s
        buckets, as autograd produces each gradient): the sums of the earlier pieces'
        gradients, by name, which it adds before sending (the gradient then passes
        through this reducer's ``apply_gradients`` as it is); None when there is nothing
        to add."""
        return None

    def take_count(self, count: Any) -> Any:
        """The count of the gradients now entering ``apply_gradients``."""
        if count is None:
            count, self.pending = self.pending, None
            if count is None:
                raise RuntimeError(
                    "apply_gradients: no xf.value_and_grad call preceded it inside this transform; "
                    "compute grads with xf.value_and_grad in the step"
                )
        return count


class _Stack:
    """The installed handlers, innermost last, with a per-primitive cache of the chain of
    the ones that override it (a handler that only passes a primitive on costs nothing).

    The chains are built on a primitive's first dispatch under this stack and reused by
    every later one (each micro-batch of ``accumulate``): no per-call allocation."""

    __slots__ = ("handlers", "chains", "reducers", "uses_backward", "kept", "rescales")

    def __init__(self, handlers: tuple[Handler, ...], kept: bool = False):
        self.handlers = handlers
        self.kept = kept  # every handler in it is reused across calls (see installed)
        self.chains: dict[str, tuple[Callable[..., Any], Callable[..., Any]]] = {}  # name -> (base, entry)
        self.reducers = tuple(h for h in handlers if h.reduces)
        self.uses_backward = any(h.uses_backward for h in handlers)
        self.rescales = any(type(h).objective is not Handler.objective for h in handlers)  # overrides objective

    def chain(self, name: str, base: Callable[..., Any]) -> Callable[..., Any]:
        """Builds and caches what ``dispatch`` calls (it looks in ``chains`` first): the
        innermost overriding handler's method linked to the ones outside it, ending in
        ``base``; ``base`` itself when none overrides."""
        default = getattr(Handler, name)
        entry = base
        for h in self.handlers:  # outermost first: each link's next is the one built before
            if getattr(type(h), name) is not default:
                entry = _Link(getattr(h, name), entry)
        self.chains[name] = (base, entry)
        return entry


class Trace:
    """What a traced step records (``xf.jit`` while it traces, the XLA backend while torch_xla
    records its lazy graph; see ``tracing``): the "gradient not finite" flag of each update,
    so that the update becomes a select on the device instead of a host read, and the
    caller reads the flag once, after the step."""

    __slots__ = ("flags", "capturable", "pending")

    def __init__(self, *, capturable: bool = True) -> None:
        self.flags: list[torch.Tensor] = []
        self.pending: list[tuple[torch.Tensor, torch.Tensor]] = []  # (tensor, new value) off the flag's device
        # the optimizer's step counts as tensors on the device (make_fx must not read them on
        # the host); False where host reads of CPU step counts are free and the device has no
        # capturable kernels (XLA's lazy tensors)
        self.capturable = capturable


_TRACING: contextvars.ContextVar[Trace | None] = contextvars.ContextVar("xform_tracing", default=None)


def tracing() -> Trace | None:
    """The ``Trace`` of the step being traced now (``xf.jit``, the XLA backend), or None (eager)."""
    return _TRACING.get()


_EMPTY = _Stack((), kept=True)
_HANDLERS: contextvars.ContextVar[_Stack] = contextvars.ContextVar("xform_handlers", default=_EMPTY)


class installed:
    """Pushes ``handler`` for the duration of a transformed step's call.

    With ``reused=True`` (a transform that takes its handler from a pool and resets it
    each call) the stack, with its chains, is kept on the handler and installed again
    as long as the stack outside is the same and itself made of reused handlers: no
    stack is allocated and no chain rebuilt per call, and a kept stack never holds a
    per-call handler (nor the tensors it refers to) past its call."""

    __slots__ = ("handler", "token", "reused")

    def __init__(self, handler: Handler, reused: bool = False):
        self.handler = handler
        self.reused = reused

    def __enter__(self) -> None:
        outer = _HANDLERS.get()
        handler = self.handler
        if not (self.reused and outer.kept):
            self.token = _HANDLERS.set(_Stack(outer.handlers + (handler,)))
            return
        memo = handler._memo
        if memo is None or memo[0] is not outer:
            memo = handler._memo = (outer, _Stack(outer.handlers + (handler,), kept=True))
        self.token = _HANDLERS.set(memo[1])

    def __exit__(self, *exc: Any) -> None:
        _HANDLERS.reset(self.token)


def handlers() -> tuple[Handler, ...]:
    """The installed handlers, outermost first."""
    return _HANDLERS.get().handlers


def dispatch(name: str, base: Callable[..., Any], *args: Any) -> Any:
    """Runs primitive ``name`` through the handlers, innermost first, then ``base``."""
    stack = _HANDLERS.get()
    if not stack.handlers:
        return base(*args)
    cached = stack.chains.get(name)  # (base, entry), built by the first dispatch under this stack
    if cached is not None and cached[0] is base:
        return cached[1](*args)
    return stack.chain(name, base)(*args)


class _Link:
    """A handler's method bound to its ``next``: the link outside it, or the base.

    Links hold no arguments (a recursive closure over them would be a reference cycle
    holding the primitive's tensors until the garbage collector ran), so a stack builds
    its chain once and every dispatch reuses it."""

    __slots__ = ("method", "next")

    def __init__(self, method: Callable[..., Any], next: Callable[..., Any]):
        self.method, self.next = method, next

    def __call__(self, *args: Any) -> Any:
        return self.method(*args, self.next)


# --- randomness -------------------------------------------------------------------------
# Randomness inside ``apply`` (dropout, ...) is drawn from a stream derived from the
# state's RNG key, its data position, the micro-batch (``salt``) and the index of the
# ``apply`` call within the current ``value_and_grad``: a step is a deterministic
# function of (state, batch). The frame below is per call, never global.


class _RngFrame:
    __slots__ = ("salt", "calls", "guarded")

    def __init__(self, salt: tuple[int, ...], guarded: bool):
        self.salt = salt
        self.calls = 0
        self.guarded = guarded  # an enclosing rng_guard restores the global generator


_RNG: contextvars.ContextVar[_RngFrame | None] = contextvars.ContextVar("xform_rng", default=None)


class rng_salt:
    """Gives the ``apply`` calls inside a distinct random stream (one per micro-batch)."""

    __slots__ = ("salt", "token")

    def __init__(self, *salt: int):
        self.salt = salt

    def __enter__(self) -> None:
        outer = _RNG.get()
        frame = _RngFrame(outer.salt + self.salt, outer.guarded) if outer else _RngFrame(self.salt, False)
        self.token = _RNG.set(frame)

    def __exit__(self, *exc: Any) -> None:
        _RNG.reset(self.token)


class rng_guard:
    """Saves the global generator of ``device`` (or ``device``, a generator) once and
    restores it on exit, so that the ``apply`` calls inside (all of a step's
    micro-batches) only seed it. ``piece(i)`` inside it is ``rng_salt(i)`` for what
    follows, up to the next ``piece`` (a loop over micro-batches, without a context per
    micro-batch)."""

    __slots__ = ("gen", "saved", "token", "frame", "base")

    def __init__(self, device: torch.device | torch.Generator):
        self.gen = device if isinstance(device, torch.Generator) else generator_for(device)

    def __enter__(self) -> "rng_guard":
        self.saved = self.gen.get_state()
        outer = _RNG.get()
        self.base = outer.salt if outer else ()
        self.frame = _RngFrame(self.base, True)
        self.token = _RNG.set(self.frame)
        return self

    def piece(self, i: int) -> None:
        """The ``apply`` calls from here on draw from piece ``i``'s stream: the frame
        ``rng_salt(i)`` would enter, counting its calls from 0 again."""
        frame = self.frame
        frame.salt = self.base + (i,)
        frame.calls = 0

    def __exit__(self, *exc: Any) -> None:
        _RNG.reset(self.token)
        self.gen.set_state(self.saved)


def _next_seed(state: "TrainState", frame: _RngFrame | None) -> int:
    """The seed of the next ``apply`` call (``state`` is known to be alive)."""
    if frame is None:
        salt, n = (), 0
    else:
        salt, n = frame.salt, frame.calls
        frame.calls += 1
    return hash((state._rng, state._data["consumed"], salt, n)) & 0x7FFF_FFFF_FFFF_FFFF


def generator_for(device: torch.device) -> torch.Generator:
    """The global generator of ``device`` (a state's runtime caches it)."""
    if device.type == "cuda":
        return torch.cuda.default_generators[device.index or 0]
    return torch.default_generator


# --- apply ------------------------------------------------------------------------------


def apply(state: "TrainState", params: dict[str, torch.Tensor], *args: Any, **kwargs: Any) -> Any:
    """Runs the state's module forward with ``params``.

    Randomness in the forward pass comes from the state's RNG key (see ``TrainState``),
    so the same (state, batch) always gives the same result. Handlers may cast params to
    a compute dtype, gather sharded params, or bring offloaded ones onto the device.

    Args:
        state: the ``TrainState`` whose module runs.
        params: a dict of parameter name to tensor, usually the one ``value_and_grad``
            passes to the loss function (``state.params`` or a handler's view of it).
        *args, **kwargs: the module's inputs.

    Example:
        >>> import torch, xform as xf
        >>> state = xf.TrainState.create(torch.nn.Linear(2, 1), optimizer=torch.optim.SGD, lr=0.1)
        >>> xf.apply(state, state.params, torch.ones(4, 2)).shape
        torch.Size([4, 1])
    """
    return dispatch("apply", _apply_base, state, params, args, kwargs)


def _apply_base(state: "TrainState", params, args, kwargs):
    try:
        rt = state._runtime("xf.apply")
    except AttributeError:
        raise TypeError(
            f"xf.apply: expected a TrainState as the first argument, got {type(state).__name__}; call "
            "xf.apply(state, params, *inputs)"
        ) from None
    gen = rt.generator
    frame = _RNG.get()
    saved = None if frame is not None and frame.guarded else gen.get_state()
    gen.manual_seed(_next_seed(state, frame))
    try:
        if params is state._params:  # (alive: _runtime checked)
            rt.bind(state)
            return rt.module(*args, **kwargs)
        _check_params(state, params)
        return torch.func.functional_call(rt.module, {**state.buffers, **params}, args, kwargs, strict=False)
    except RuntimeError as e:  # only now, never on the happy path: was it the inputs' device or dtype?
        mismatch = _input_mismatch(e, params, args, kwargs)
        if mismatch is None:
            raise
        raise mismatch from e
    finally:
        if saved is not None:
            gen.set_state(saved)


def _check_params(state: "TrainState", params: Any) -> None:
    """Params handed to ``apply`` that are not the state's own must fit its module: known
    names, tensors, the same shapes (functional_call would ignore an unknown name and
    use the module's own tensor, and broadcast or reshape its way past another model's)."""
    if not isinstance(params, dict):
        raise TypeError(
            f"xf.apply: params must be a dict of name to tensor (state.params), got {type(params).__name__}"
        )
    own = state.params
    for name, t in params.items():
        ref = own.get(name)
        if ref is None:
            ref = state.buffers.get(name)
            if ref is None:
                raise ValueError(
                    f"xf.apply: params[{name!r}] is not a parameter of the model; pass params of this model "
                    f"(state.params, or a dict with its names, e.g. {next(iter(own), '')!r})"
                )
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"xf.apply: params[{name!r}] must be a tensor, got {type(t).__name__}")
        if t.shape != ref.shape:
            raise ValueError(
                f"xf.apply: params[{name!r}] has shape {tuple(t.shape)} but the model's {name} has shape "
                f"{tuple(ref.shape)}; pass params of this model (state.params, or a dict with the same names "
                "and shapes)"
            )


_ABOUT_TYPES = re.compile(r"dtype|scalar type|\btype\b|\b(?:long|int|double|float|half|bfloat16)\b", re.IGNORECASE)


def _input_mismatch(e: RuntimeError, params: Any, args: Any, kwargs: Any) -> Exception | None:
    """An error naming the first input on another device than the params (a
    ``ValueError``) or of another dtype (a ``TypeError``) when that explains ``e`` (the
    module call failed); None otherwise. A floating input of another floating dtype
    always does; an integer input only when torch's message is about types (an int64
    input is right for an embedding). 0-d inputs may live on the CPU."""
    tensors = [t for t in params.values() if isinstance(t, torch.Tensor)]
    inputs = list(_inputs(args, kwargs))
    devices = {t.device for t in tensors}
    for where, x in inputs:
        if x.dim() > 0 and devices and x.device not in devices:
            model = next(iter(devices)) if len(devices) == 1 else sorted(map(str, devices))
            return ValueError(
                f"xf.apply: input {where} is on {x.device} but the model's params are on {model}; move the "
                "batch to the params' device (x.to(xf.distributed.device()))"
            )
    dtypes = {t.dtype for t in tensors if t.is_floating_point()}
    if not dtypes:
        return None
    want = next(iter(dtypes)) if len(dtypes) == 1 else None
    about_types = _ABOUT_TYPES.search(str(e)) is not None
    for where, x in inputs:
        if x.dtype in dtypes or x.is_complex():
            continue
        if x.is_floating_point() or (about_types and x.dtype != torch.bool):
            model = want if want is not None else sorted(map(str, dtypes))
            cast = want if want is not None else "the params' dtype"
            return TypeError(
                f"xf.apply: input {where} is a {x.dtype} tensor but the model's params are {model}; cast the "
                f"batch (x.to({cast})) or run the step under xf.mixed_precision"
            )
    return None


def _inputs(args: Any, kwargs: Any):
    """``(where, tensor)`` for the tensors among the module's inputs, as ``args[0]``,
    ``kwargs['x']``, ``args[0]['ids']``."""
    for root, tree_ in (("args", args), ("kwargs", kwargs)):
        paths, leaves, _ = optree.tree_flatten_with_path(tree_, namespace=NAMESPACE)
        for path, leaf in zip(paths, leaves):
            if isinstance(leaf, torch.Tensor):
                yield root + "".join(f"[{k!r}]" for k in path), leaf


# --- value_and_grad ---------------------------------------------------------------------

_HAS_AUX_ERROR = (
    "xf.value_and_grad: with has_aux=True the function must return (loss, aux), got {got}; "
    "return a pair, or pass has_aux=False"
)


_NO_GRAD_FN_ERROR = (
    "xf.value_and_grad: the loss does not depend on the params (it has no grad_fn); compute it from the "
    "params the loss function receives, e.g. xf.apply(state, params, x), without .detach() or torch.no_grad()"
)


def value_and_grad(fn: Callable[..., Any], *, has_aux: bool = False) -> Callable[..., Any]:
    """Returns ``g(params) -> (value, grads)`` for a loss function of params.

    ``fn(params)`` returns a scalar loss tensor, or an ``xf.Mean(total, count)`` when the
    loss is a sum over a variable number of items; with ``has_aux=True`` it returns
    ``(loss, aux)`` and ``g`` returns ``((value, aux), grads)``. ``grads`` is a dict with
    an entry for each parameter that requires grad. ``value`` is the loss detached (a
    ``Mean`` stays a ``Mean``, so metrics pool exactly across micro-batches).

    Example:
        >>> import torch, xform as xf
        >>> state = xf.TrainState.create(torch.nn.Linear(2, 1), optimizer=torch.optim.SGD, lr=0.1)
        >>> loss, grads = xf.value_and_grad(lambda p: xf.apply(state, p, torch.ones(4, 2)).sum())(state.params)
        >>> sorted(grads)
        ['bias', 'weight']
    """
    if not callable(fn):
        raise TypeError(f"xf.value_and_grad: expected a function of params, got {type(fn).__name__}")

    def value_and_grad_fn(params: dict[str, torch.Tensor]):
        if not isinstance(params, dict):
            raise TypeError(
                f"xf.value_and_grad: params must be a dict of name to tensor (state.params), "
                f"got {type(params).__name__}"
            )
        return dispatch("value_and_grad", _value_and_grad_base, fn, params, has_aux)

    return value_and_grad_fn


def _value_and_grad_base(fn, params, has_aux):
    # the apply calls inside count from 0: the enclosing frame's count set aside (a fresh
    # frame with its salt, without making one), or a frame of its own outside any
    frame = _RNG.get()
    if frame is not None:
        calls, frame.calls = frame.calls, 0
        try:
            out = fn(params)
        finally:
            frame.calls = calls
    else:
        token = _RNG.set(_RngFrame((), False))
        try:
            out = fn(params)
        finally:
            _RNG.reset(token)
    if has_aux:
        if not (isinstance(out, tuple) and len(out) == 2):
            raise ValueError(_HAS_AUX_ERROR.format(got=type(out).__name__))
        loss, aux = out
    else:
        loss, aux = out, None
    stack = _HANDLERS.get()
    seed = None  # the gradient the backward pass starts from: None for 1, else 1/pieces (see _piece_seed)
    if type(loss) is torch.Tensor and not stack.rescales:
        # a scalar mean loss that no handler rescales: _objective_base's plain-mean case, without the Mean
        objective = _check_scalar(loss)
        if stack.reducers:
            seed = _piece_seed(objective, stack.reducers)
    else:
        mean = loss if isinstance(loss, Mean) else Mean(_check_scalar(loss), 1)
        _check_scalar(mean.total)
        objective = dispatch("objective", _objective_base, mean)
    names, inputs = [], []
    for k, p in params.items():
        if p.requires_grad:
            names.append(k)
            inputs.append(p)
    if not names:
        raise ValueError(
            f"xf.value_and_grad: none of the {len(params)} params requires grad (e.g. {next(iter(params), '')!r}); "
            "pass state.params, whose trainable tensors do"
        )
    try:
        if stack.uses_backward:
            objective.backward(seed)
            found = []
            for k in names:
                found.append(params[k].grad)
                params[k].grad = None
        else:
            found = _grad(objective, tuple(inputs), seed)
    except RuntimeError:
        if objective.requires_grad:
            raise
        raise ValueError(_NO_GRAD_FN_ERROR) from None
    if seed is not None and seed._version:  # a custom backward wrote into it: not reused
        _forget_seed(stack.reducers[-1].memo, seed)
    # a parameter the loss does not use: a zero gradient (shard sends it with the rest)
    grads = {k: (g if g is not None else torch.zeros_like(params[k])) for k, g in zip(names, found)}
    value = _value(loss)
    return ((value, aux) if has_aux else value), grads


def _value(loss: Any) -> Any:
    """The loss as ``value_and_grad`` returns it: detached, and a copy where it would
    share a parameter's storage (the loss is a parameter or a view of one), which the
    update then changes in place."""
    if isinstance(loss, Mean):
        value = loss.detach()
        return Mean(_value(loss.total), value.count) if _aliases(loss.total) else value
    if not isinstance(loss, torch.Tensor):
        return loss
    value = loss.detach()
    return value.clone() if _aliases(loss) else value


def _aliases(loss: torch.Tensor) -> bool:
    """Whether ``loss.detach()`` may share a parameter's storage: the loss is a leaf (a
    parameter) or a view of a tensor (of one)."""
    return loss.grad_fn is None or loss._is_view()


def _grad(objective: torch.Tensor, inputs: tuple[torch.Tensor, ...], seed: torch.Tensor | None):
    """``torch.autograd.grad(objective, inputs, seed, allow_unused=True)``, calling the
    engine the way that function does (``_engine_run_backward``) without its argument
    normalization, which costs about as much as a small layer's backward (5 us). The
    public function where the engine entry is missing, a tensor overrides torch
    functions, or dynamo traces."""
    if _run_backward is None or torch.compiler.is_compiling() or torch._C._has_torch_function((objective, *inputs)):
        return torch.autograd.grad(objective, inputs, seed, allow_unused=True)
    if seed is None:
        seed = torch.ones_like(objective, memory_format=torch.preserve_format)  # as autograd.grad's default
    return _run_backward((objective,), (seed,), False, False, inputs, True, accumulate_grad=False)


def _objective_base(mean: Mean) -> torch.Tensor:
    reducers = _HANDLERS.get().reducers
    if not reducers:
        return mean.total if _is_one(mean.count) else mean.total / mean.count
    if _is_one(mean.count):
        return _per_piece(mean.total, reducers)
    reducers[-1].pending = mean.count
    return mean.total


def _pieces(reducers: tuple[Reducer, ...]) -> int:
    """The number of pieces a plain mean loss stands for one of; its count (the fraction
    of the batch, exact) recorded for ``apply_gradients``."""
    pieces = 1
    for h in reducers:
        pieces *= h.pieces
    memo = reducers[-1].memo
    unit = memo.get(pieces)
    if unit is None:
        unit = memo[pieces] = fractions.Fraction(1, pieces)
    reducers[-1].pending = unit
    return pieces


def _per_piece(total: torch.Tensor, reducers: tuple[Reducer, ...]) -> torch.Tensor:
    """A plain mean loss under reducers, normalized by the number of pieces now."""
    pieces = _pieces(reducers)
    return total if pieces == 1 else total / pieces


def _piece_seed(loss: torch.Tensor, reducers: tuple[Reducer, ...]) -> torch.Tensor | None:
    """``_per_piece`` for the scalar loss differentiated directly: the division by the
    number of pieces moved into the gradient the backward pass starts from. The
    gradients are bitwise those of ``loss / pieces`` (whose backward starts from
    ``ones / pieces``, computed by the same kernel), without the division's forward op
    and backward node. None when there is one piece (the plain start, ones)."""
    pieces = _pieces(reducers)
    if pieces == 1:
        return None
    if loss.grad_fn is None or torch.compiler.is_compiling():
        # a leaf loss gets the start back as its gradient, and a tensor made while tracing
        # must not outlive the trace: a fresh one
        return torch.ones_like(loss) / pieces
    memo = reducers[-1].memo
    key = (pieces, loss.dtype, loss.device, loss.shape)
    seed = memo.get(key)
    if seed is None:
        seed = memo[key] = torch.ones_like(loss) / pieces
    return seed


def _forget_seed(memo: dict[Any, Any], seed: torch.Tensor) -> None:
    for key, value in list(memo.items()):
        if value is seed:
            del memo[key]


def _is_one(count: Any) -> bool:
    return type(count) is int and count == 1


def _check_scalar(loss: Any) -> torch.Tensor:
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1 or not loss.is_floating_point():
        desc = f"a {tuple(loss.shape)} {loss.dtype} tensor" if isinstance(loss, torch.Tensor) else type(loss).__name__
        raise ValueError(
            f"xf.value_and_grad: the loss must be a scalar floating-point tensor or xf.Mean, got {desc}; "
            "reduce it (loss.mean(), or xf.Mean(loss.sum(), n) for a sum over n items)"
        )
    return loss
