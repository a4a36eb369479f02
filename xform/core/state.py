"""``TrainState``: all training state as one immutable pytree."""

from __future__ import annotations

import contextvars
import fractions
from typing import Any, Callable, Mapping, Protocol

import attrs
import optree
import torch

from xform.core import primitives
from xform.core.optim import (
    OptimizerFactory,
    _optimizer_factory,
    adopt_opt_state,
    build_optimizer,
    local_part,
    optimizer_step,
    placeholder_opt_state,
)
from xform.tree import NAMESPACE

__all__ = ["TrainState", "DonatedStateError", "LEAVES", "ShardedUpdate", "sharded_update"]


class DonatedStateError(RuntimeError):
    """A donated ``TrainState`` was used after the step that consumed it."""


_DONATED = (
    "{api}: this TrainState was donated to {by}; its tensors now belong to the state that "
    "made, and may hold updated values. Use that state, or keep this one by passing "
    "state.copy() instead (or apply_gradients(grads, donate=False))."
)


@attrs.frozen(eq=False)
class _Spec:
    """The static part of a state: what is not a leaf."""

    module: torch.nn.Module
    optimizer: OptimizerFactory
    schedule: Callable[[int], float] | None
    max_grad_norm: float | None
    trainable: tuple[str, ...]
    trainable_set: frozenset[str]
    aliases: Mapping[str, tuple[tuple[torch.nn.Module, str], ...]]  # name -> every (owner, attr)
    buffer_aliases: Mapping[str, tuple[tuple[torch.nn.Module, str], ...]]
    device: torch.device
    max_consecutive_skips: int | None = 25
    # What laid the state out (``shard``'s init sets it): a sharded step refuses a state
    # laid out otherwise. Static, so ``replace``, ``tree.map`` and ``load(like=...)`` keep it.
    layout: Any = None


class _Runtime:
    """Caches bound to one set of tensors: the optimizer and the module's binding.

    A state and the states that ``apply_gradients`` makes from it in place share one;
    a state rebuilt from leaves (``load``, ``tree.map``, ``replace``) gets a new one.
    """

    __slots__ = ("spec", "module", "device", "device_type", "optimizer", "extras", "generator", "__weakref__")

    def __init__(self, spec: _Spec):
        self.spec = spec
        self.module: torch.nn.Module = spec.module  # the spec's, as attributes: read on every apply
        self.device: torch.device = spec.device
        self.device_type: str = spec.device.type
        self.optimizer: torch.optim.Optimizer | None = None
        self.extras: dict[Any, Any] = {}  # handlers' caches bound to these tensors
        self.generator = primitives.generator_for(spec.device)  # the global RNG ``apply`` seeds

    def bind(self, state: "TrainState") -> None:
        """Points the module's parameter and buffer slots at this state's tensors."""
        module = self.spec.module
        if module.__dict__.get("_xform_bound") is self:
            return
        for name, t in state.params.items():
            if not t.requires_grad and name in self.spec.trainable:
                t.requires_grad_(True)
            for owner, attr in self.spec.aliases[name]:
                owner._parameters[attr] = t
        for name, t in state.buffers.items():
            for owner, attr in self.spec.buffer_aliases[name]:
                owner._buffers[attr] = t
        module.__dict__["_xform_bound"] = self


class _Tensors:
    """The ownership of one set of tensors. States that share tensors (``replace``)
    share it; an update that changes the tensors in place consumes it, and with it every
    state sharing them: nothing is left silently showing updated values."""

    __slots__ = ("consumed_by",)

    def __init__(self) -> None:
        self.consumed_by: str | None = None


class _Life:
    """Liveness of one state object: the tensors it owns, and its runtime."""

    __slots__ = ("tensors", "runtime")

    def __init__(self, runtime: _Runtime, tensors: _Tensors | None = None):
        self.tensors = tensors if tensors is not None else _Tensors()
        self.runtime = runtime

    @property
    def donated_by(self) -> str | None:
        return self.tensors.consumed_by


@attrs.frozen(eq=False, repr=False)
class TrainState:
    """All training state as one immutable pytree (namespace ``"xform"``).

    Leaves: ``step``, ``params``, ``buffers``, ``opt_state``, ``rng`` (the key of a
    counter-based stream), ``data`` (the loader position) and ``transforms`` (each
    transform's own state: loss scale, ...). The module, the optimizer definition, the
    schedule and the gradient-clipping norm are static.

    ``apply_gradients`` updates the tensors in place with torch.optim's kernels and
    returns a new state; the old one is *donated*: any use of it raises
    ``DonatedStateError``. Keep a state alive with ``state.copy()``.

    Example:
        >>> import torch, xform as xf
        >>> state = xf.TrainState.create(torch.nn.Linear(2, 1), optimizer=torch.optim.AdamW, lr=1e-3)
        >>> state.step, sorted(state.params)
        (0, ['bias', 'weight'])
    """

    _step: int = attrs.field(alias="step")
    _params: dict[str, torch.Tensor] = attrs.field(alias="params")
    _buffers: dict[str, torch.Tensor] = attrs.field(alias="buffers")
    _opt_state: dict[str, Any] = attrs.field(alias="opt_state")
    _rng: int = attrs.field(alias="rng")
    _data: dict[str, int] = attrs.field(alias="data")
    _transforms: dict[str, Any] = attrs.field(alias="transforms")
    _spec: _Spec = attrs.field(alias="spec")
    _life: _Life = attrs.field(alias="life")

    # --- construction -------------------------------------------------------------------

    @classmethod
    def create(
        cls,
        module: torch.nn.Module,
        *,
        optimizer: type[torch.optim.Optimizer] | OptimizerFactory,
        seed: int = 0,
        max_grad_norm: float | None = None,
        max_consecutive_skips: int | None = 25,
        **optimizer_kwargs: Any,
    ) -> "TrainState":
        """Builds the initial state of ``module`` trained by ``optimizer``.

        Args:
            module: the model. Its parameters and buffers become the state's leaves; the
                module itself is static and only used to run the forward pass.
            optimizer: a ``torch.optim.Optimizer`` subclass (called as
                ``optimizer(params, **optimizer_kwargs)``) or any callable taking the
                list of trainable parameters, in ``state.params`` order, and returning
                an optimizer, e.g. ``functools.partial(torch.optim.AdamW, lr=1e-3)``.
            seed: the key of the random stream used by ``apply`` (dropout, ...) and
                the default shuffle seed of ``xf.DataLoader``.
            max_grad_norm: clip the gradient's global norm to this before each update.
            max_consecutive_skips: an update whose gradient is not finite (NaN or inf,
                in any precision, on any process) is skipped: params, optimizer state
                and ``step`` stay, the data position advances, and
                ``state.transforms["nonfinite"]`` counts it (``"skipped"`` in all,
                ``"consecutive"`` in a row). This many skips in a row raise
                ``FloatingPointError``; ``None`` never raises. The check is one fused
                kernel; whether to update is then read on the host, once per step (on a
                GPU, one scalar copied back: ``state.step`` is a host int, so it cannot
                advance or stay without knowing; the fp16 path always read it).
            **optimizer_kwargs: passed to the optimizer class. ``lr`` may be a function
                ``step -> lr``, a schedule evaluated before each update.
        """
        if not isinstance(module, torch.nn.Module):
            raise TypeError(
                f"TrainState.create: module must be a torch.nn.Module, got {type(module).__name__}"
            )
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise TypeError(f"TrainState.create: seed must be an int, got {seed!r}")
        if max_grad_norm is not None and not max_grad_norm > 0:
            raise ValueError(f"TrainState.create: max_grad_norm must be > 0 or None, got {max_grad_norm!r}")
        if max_consecutive_skips is not None and (
            isinstance(max_consecutive_skips, bool) or not isinstance(max_consecutive_skips, int)
        ):
            raise TypeError(
                f"TrainState.create: max_consecutive_skips must be an int or None, got {max_consecutive_skips!r}"
            )
        if max_consecutive_skips is not None and max_consecutive_skips < 1:
            raise ValueError(
                f"TrainState.create: max_consecutive_skips must be >= 1 or None, got {max_consecutive_skips}; "
                "pass None to skip non-finite updates without ever raising"
            )
        schedule = None
        if callable(optimizer_kwargs.get("lr")):
            schedule = optimizer_kwargs["lr"]
            optimizer_kwargs["lr"] = float(schedule(0))
        factory = _optimizer_factory(optimizer, optimizer_kwargs)

        params = dict(module.named_parameters())
        buffers = dict(module.named_buffers())
        if not params:
            raise ValueError("TrainState.create: the module has no parameters to train")
        aliases: dict[str, list] = {}
        for name, p in module.named_parameters(remove_duplicate=False):
            canonical = next(k for k, q in params.items() if q is p)
            aliases.setdefault(canonical, []).append(_owner(module, name))
        buffer_aliases: dict[str, list] = {}
        for name, b in module.named_buffers(remove_duplicate=False):
            canonical = next(k for k, q in buffers.items() if q is b)
            buffer_aliases.setdefault(canonical, []).append(_owner(module, name))
        trainable = tuple(k for k, p in params.items() if p.requires_grad)
        devices = {p.device for p in params.values()}
        if len(devices) != 1:
            raise ValueError(
                f"TrainState.create: parameters are on several devices {sorted(map(str, devices))}; "
                "move the module to one device first (module.to(device))"
            )
        spec = _Spec(
            module=module,
            optimizer=factory,
            schedule=schedule,
            max_grad_norm=max_grad_norm,
            trainable=trainable,
            trainable_set=frozenset(trainable),
            aliases={k: tuple(v) for k, v in aliases.items()},
            buffer_aliases={k: tuple(v) for k, v in buffer_aliases.items()},
            device=devices.pop(),
            max_consecutive_skips=max_consecutive_skips,
        )
        opt_state = {"initialized": False, "state": placeholder_opt_state(factory, params, trainable)}
        runtime = _Runtime(spec)
        state = cls(
            step=0,
            params=params,
            buffers=buffers,
            opt_state=opt_state,
            rng=seed,
            data={"seed": seed, "consumed": 0},
            transforms={_NONFINITE: {"skipped": 0, "consecutive": 0}},
            spec=spec,
            life=_Life(runtime),
        )
        module.__dict__["_xform_bound"] = runtime
        return state

    # --- leaves, checked for donation ---------------------------------------------------

    def _alive(self, api: str) -> None:
        by = self._life.tensors.consumed_by
        if by is not None:
            raise DonatedStateError(_DONATED.format(api=api, by=by))

    @property
    def step(self) -> int:
        """The number of optimizer updates applied so far."""
        self._alive("TrainState.step")
        return self._step

    @property
    def params(self) -> dict[str, torch.Tensor]:
        """Parameter name to tensor, in the module's ``named_parameters`` order."""
        life = self._life
        if life.tensors.consumed_by is not None:  # _alive, inlined: read in every step
            self._alive("TrainState.params")
        return self._params

    @property
    def buffers(self) -> dict[str, torch.Tensor]:
        self._alive("TrainState.buffers")
        return self._buffers

    @property
    def opt_state(self) -> dict[str, Any]:
        """``{"initialized": bool, "state": {param name: {key: tensor}}}``."""
        self._alive("TrainState.opt_state")
        return self._opt_state

    @property
    def rng(self) -> int:
        self._alive("TrainState.rng")
        return self._rng

    @property
    def data(self) -> dict[str, int]:
        """The data position: ``{"seed": shuffle seed, "consumed": batches consumed}``."""
        self._alive("TrainState.data")
        return self._data

    @property
    def transforms(self) -> dict[str, Any]:
        """Each transform's own state, by transform name."""
        self._alive("TrainState.transforms")
        return self._transforms

    @property
    def module(self) -> torch.nn.Module:
        return self._spec.module

    @property
    def donated(self) -> bool:
        return self._life.donated_by is not None

    def _runtime(self, api: str) -> _Runtime:
        life = self._life
        if life.tensors.consumed_by is not None:  # _alive, inlined: read by every apply
            self._alive(api)
        return life.runtime

    # --- functional updates -------------------------------------------------------------

    def replace(self, **changes: Any) -> "TrainState":
        """A new state with the given leaves replaced (``step``, ``params``, ...).

        The new state shares this one's other tensors. Both stay valid until either is
        donated to an update, which changes the shared tensors in place: then both are.
        Keep this one apart with ``state.copy().replace(...)``.
        """
        self._alive("TrainState.replace")
        unknown = set(changes) - _LEAF_NAMES
        if unknown:
            raise TypeError(
                f"TrainState.replace: unknown field(s) {sorted(unknown)}; the fields are {sorted(_LEAF_NAMES)}"
            )
        tensors_changed = bool({"params", "buffers", "opt_state"} & set(changes))
        runtime = _Runtime(self._spec) if tensors_changed else self._life.runtime
        return _evolve(self, life=_Life(runtime, self._life.tensors), **changes)

    def copy(self) -> "TrainState":
        """A state with its own copies of every tensor: donating it leaves ``self`` intact."""
        self._alive("TrainState.copy")
        leaves, spec = optree.tree_flatten(self, namespace=NAMESPACE)
        return optree.tree_unflatten(
            spec, [t.detach().clone() if isinstance(t, torch.Tensor) else t for t in leaves]
        )

    def apply_gradients(self, grads: Mapping[str, torch.Tensor], *, donate: bool = True) -> "TrainState":
        """Returns the state after one optimizer update with ``grads``.

        The update runs in place on this state's tensors, which makes this state
        *donated*: using it afterwards raises ``DonatedStateError``. With
        ``donate=False`` the update runs on a copy and this state stays valid.

        Inside transforms, the gradients first pass through their handlers:
        ``accumulate`` adds them up until the last micro-batch, ``mixed_precision``
        unscales and skips the update on overflow, ``shard`` communicates.
        """
        if self._life.tensors.consumed_by is not None:  # _alive, inlined
            self._alive("TrainState.apply_gradients")
        if type(grads) is not dict and not isinstance(grads, Mapping):  # the ABC check only off the common path
            raise TypeError(
                f"TrainState.apply_gradients: grads must be a dict of parameter name to tensor, "
                f"got {type(grads).__name__}"
            )
        if grads.keys() != self._spec.trainable_set:
            missing = sorted(set(self._spec.trainable) - grads.keys())
            extra = sorted(grads.keys() - set(self._spec.trainable))
            raise ValueError(
                "TrainState.apply_gradients: grads must have one entry per trainable parameter; "
                f"missing {missing[:5]}, unexpected {extra[:5]}; pass the grads xf.value_and_grad returned"
            )
        state = self if donate else self.copy()
        return primitives.dispatch("apply_gradients", _apply_gradients_base, state, dict(grads), None)

    def successor(self, *, updated: bool, **changes: Any) -> "TrainState":
        """The state after one update attempt: the data position always advances,
        ``step`` only when ``updated``. Shares this state's runtime and donates it."""
        data = self._data
        new = _evolve(
            self,
            step=self._step + 1 if updated else self._step,
            data={**data, "consumed": data["consumed"] + 1},
            life=_Life(self._life.runtime),
            **changes,
        )
        self._life.tensors.consumed_by = f"the update that produced step {new._step}"
        return new

    def _donate(self, by: str) -> None:
        """Marks this state (and every state sharing its tensors) used up."""
        self._life.tensors.consumed_by = by

    def _relaid(self, by: str, **changes: Any) -> "TrainState":
        """A state over tensors laid out anew (sharded, cast) that now own the old ones:
        this state and those sharing its tensors are donated to it."""
        new = _evolve(self, life=_Life(_Runtime(self._spec)), **changes)
        self._donate(by)
        return new

    def _moved(self, device: torch.device, by: str, **changes: Any) -> "TrainState":
        """``_relaid`` onto ``device``: the static part names the new device."""
        spec = attrs.evolve(self._spec, device=device)
        new = _evolve(self, spec=spec, life=_Life(_Runtime(spec)), **changes)
        self._donate(by)
        return new

    def _evolve_leaves(self, **changes: Any) -> "TrainState":
        """Same liveness and runtime, other non-tensor leaves (a handler's bookkeeping)."""
        return _evolve(self, life=self._life, **changes)

    def _laid_out(self, layout: Any) -> "TrainState":
        """This state, tagged as laid out by ``layout`` (``shard``'s init); shares its tensors."""
        spec = attrs.evolve(self._spec, layout=layout)
        return _evolve(self, spec=spec, life=_Life(_Runtime(spec), self._life.tensors))

    def _cast_params(self, dtype: torch.dtype) -> "TrainState":
        """Stores the params in ``dtype`` (no fp32 master copy); only before training."""
        if self._opt_state["initialized"]:
            raise ValueError(
                f"TrainState: cannot store params in {dtype} after training started (step {self._step}); "
                "lay the state out with step.init(state) right after TrainState.create"
            )
        params = {
            k: torch.nn.Parameter(v.detach().to(dtype), requires_grad=v.requires_grad)
            for k, v in self._params.items()
        }
        opt = {"initialized": False, "state": placeholder_opt_state(self._spec.optimizer, params, self._spec.trainable)}
        return self.replace(params=params, opt_state=opt)

    def __repr__(self) -> str:
        if self.donated:
            return f"TrainState(<donated to {self._life.donated_by}>)"
        n = sum(p.numel() for p in self._params.values())
        counter = self._transforms.get(_NONFINITE)
        skipped = f", skipped={counter['skipped']}" if counter and counter["skipped"] else ""
        return (
            f"TrainState(step={self._step}{skipped}, params={len(self._params)} tensors/{n:,} values, "
            f"module={type(self._spec.module).__name__}, "
            f"transforms={sorted(k for k in self._transforms if k != _NONFINITE)})"
        )


# The leaves, in flattening order: every attrs field but the static two. The one list.
LEAVES: tuple[str, ...] = tuple(f.alias for f in attrs.fields(TrainState) if f.alias not in ("spec", "life"))
_LEAF_NAMES = frozenset(LEAVES)
_PRIVATE = tuple("_" + name for name in LEAVES)


def _make_evolve() -> Callable[..., TrainState]:
    """``attrs.evolve`` for ``TrainState``, generated from its fields (``LEAVES`` plus the
    static two): the same result without evolve's per-call field walk and kwargs dict
    (it runs once per update). An unknown keyword is a ``TypeError``, as with evolve."""
    fields = attrs.fields(TrainState)
    params = ", ".join(f"{f.alias}=_KEEP" for f in fields)
    # each slot written through its descriptor (what a frozen class's __init__ does, and what
    # dynamo can trace: it maps object.__setattr__ to the class's, which raises)
    body = "\n".join(
        f"    _slot_{f.name}(new, self.{f.name} if {f.alias} is _KEEP else {f.alias})" for f in fields
    )
    source = f"def _evolve(self, *, {params}):\n    new = _new(_cls)\n{body}\n    return new\n"
    namespace = {"_KEEP": object(), "_new": object.__new__, "_cls": TrainState}
    namespace.update({f"_slot_{f.name}": TrainState.__dict__[f.name].__set__ for f in fields})
    exec(compile(source, "<xform.core.state._evolve>", "exec"), namespace)  # noqa: S102 (our own fields)
    return namespace["_evolve"]


_evolve = _make_evolve()


def _flatten(s: TrainState):
    s._alive("flattening a TrainState")
    return tuple(getattr(s, a) for a in _PRIVATE), s._spec, LEAVES


def _unflatten(spec: _Spec, children) -> TrainState:
    return TrainState(**dict(zip(LEAVES, children)), spec=spec, life=_Life(_Runtime(spec)))


optree.register_pytree_node(TrainState, _flatten, _unflatten, namespace=NAMESPACE)


# --- the base implementations of apply_gradients and update -------------------------------


def _apply_gradients_base(state: TrainState, grads: dict[str, torch.Tensor], count: Any) -> TrainState:
    if not _is_unit(count):  # a sum over `count` items (see Reducer)
        torch._foreach_div_(list(grads.values()), count if isinstance(count, torch.Tensor) else float(count))
    return primitives.dispatch("update", _update_base, state, grads)


def _is_unit(count: Any) -> bool:
    """Whether gradients with this count need no division: None, 1, or Fraction(1)
    (``Fraction.__eq__`` is slow; the common counts are told apart by type)."""
    if count is None or (type(count) is int and count == 1):
        return True
    if type(count) is fractions.Fraction:
        return count.numerator == 1 and count.denominator == 1
    return count == 1 if not isinstance(count, torch.Tensor) else False


class ShardedUpdate(Protocol):
    """How the base ``update`` runs under ``shard`` (set by its handler with ``sharded_update``).

    ``agree(state, grads, bad)`` takes the final gradients (this process's part) and this
    process's "gradient not finite" flag (a 0-dim tensor, nonzero when its part holds a
    NaN or inf) and returns, on every process alike, whether the gradient is finite on
    all of them (at most one small all-reduce and one host read). ``run(state, grads)``,
    when not None, is the optimizer update on this process's shards (ZeRO); it returns
    the new ``opt_state``."""

    def agree(self, state: "TrainState", grads: dict[str, torch.Tensor], bad: torch.Tensor) -> bool: ...

    run: Callable[["TrainState", dict[str, torch.Tensor]], dict[str, Any]] | None


_SHARDED: contextvars.ContextVar[ShardedUpdate | None] = contextvars.ContextVar("xform_sharded_update", default=None)


class sharded_update:
    """Makes the base ``update`` inside run under ``how`` (a ``ShardedUpdate``)."""

    __slots__ = ("how", "token")

    def __init__(self, how: ShardedUpdate):
        self.how = how

    def __enter__(self) -> None:
        self.token = _SHARDED.set(self.how)

    def __exit__(self, *exc: Any) -> None:
        _SHARDED.reset(self.token)


_NONFINITE = "nonfinite"
_TOO_MANY_SKIPS = (
    "TrainState.apply_gradients: the gradient was not finite (NaN or inf) in {n} updates in a row, all "
    "skipped (step {step}, data position {consumed}; params unchanged since). Lower the learning rate, "
    "check the data before that position, use bf16 rather than fp16, or raise "
    "TrainState.create(max_consecutive_skips=...) (None: never raise)"
)


class _Found:
    """The scalars of the non-finite check, made once per runtime and reused: ``found``
    (the flag the kernel sets), ``one`` (its unscale factor) and ``clear``, True while
    ``found`` is known to hold 0 (read as 0 on the host, untouched since)."""

    __slots__ = ("found", "one", "clear")

    def __init__(self, device: torch.device):
        self.found = torch.zeros((), device=device)
        self.one = torch.ones((), device=device)
        self.clear = True


def _nonfinite(grads: list[torch.Tensor], scratch: dict[Any, Any]) -> torch.Tensor:
    """A 0-dim float32 tensor, 1 when any gradient holds a NaN or inf (this process's part).

    torch's fused check (GradScaler's, with a scale of 1): one kernel, a few µs. Its two
    scalars are made once per runtime (``scratch``) and reused; the flag is only zeroed
    when it may hold a 1 (the update marks it read as 0: ``clear``)."""
    # plain tensors as they are, DTensors' local parts (a mixed list is fine)
    local = [g if type(g) is torch.Tensor else local_part(g) for g in grads]
    flag = scratch.get(_NONFINITE)
    if flag is None:
        flag = scratch[_NONFINITE] = _Found(local[0].device if local else torch.device("cpu"))
    found = flag.found
    if not flag.clear:
        found.zero_()
    flag.clear = False  # from here on, until read as 0
    if local:
        torch._amp_foreach_non_finite_check_and_unscale_(local, found, flag.one)
    return found


def _update_base(state: TrainState, grads: dict[str, torch.Tensor]) -> TrainState:
    spec = state._spec
    rt = state._runtime("TrainState.apply_gradients")
    sharded = _SHARDED.get()
    trace = primitives.tracing()
    if trace is not None and (sharded is None or (getattr(sharded, "whole", False) and sharded.run is None)):
        # (gradients all-reduced whole are the same on every process, so is their flag)
        return _traced_update(state, grads, trace)
    glist = [grads[k] for k in spec.trainable]
    # The one host read of a step: whether to update. A skipped update changes nothing but
    # the data position and the counter (see TrainState.create's max_consecutive_skips).
    bad = _nonfinite(glist, rt.extras)
    if sharded is not None:
        finite = sharded.agree(state, grads, bad)
    else:
        finite = not bool(bad)
        if finite:
            rt.extras[_NONFINITE].clear = True  # read as 0: the next check needs no zeroing
    counter = state._transforms.get(_NONFINITE)
    if not finite:
        if counter is None:
            return state.successor(updated=False)
        n = counter["consecutive"] + 1
        if spec.max_consecutive_skips is not None and n >= spec.max_consecutive_skips:
            raise FloatingPointError(_TOO_MANY_SKIPS.format(n=n, step=state._step, consumed=state._data["consumed"]))
        counter = {"skipped": counter["skipped"] + 1, "consecutive": n}
        return state.successor(updated=False, transforms={**state._transforms, _NONFINITE: counter})
    opt_state = state._opt_state
    if sharded is not None and sharded.run is not None:
        opt_state = sharded.run(state, grads)
    else:
        if rt.optimizer is None:
            rt.optimizer = build_optimizer(spec.optimizer, spec.trainable, state._params, opt_state)
        params = [state._params[k] for k in spec.trainable]
        optimizer_step(state, rt.optimizer, params, glist)
        if not opt_state["initialized"]:
            opt_state = {"initialized": True, "state": adopt_opt_state(rt.optimizer, spec.trainable, params, opt_state)}
    if counter is not None and counter["consecutive"]:
        transforms = {**state._transforms, _NONFINITE: {**counter, "consecutive": 0}}
        return state.successor(updated=True, opt_state=opt_state, transforms=transforms)
    return state.successor(updated=True, opt_state=opt_state)


def _traced_update(state: TrainState, grads: dict[str, torch.Tensor], trace: "primitives.Trace") -> TrainState:
    """The base ``update`` while ``xf.jit`` traces the step: no host read. The update
    always runs and a select on the device (``torch.where`` on the non-finite flag) keeps
    the old params and optimizer state when the gradient was not finite; the flag goes
    to ``trace`` and ``xf.jit`` does the host bookkeeping (``step``, the skip counters)
    after the compiled step returns. The optimizer state must be initialized (``xf.jit``
    runs a state's first update eagerly)."""
    spec = state._spec
    state._alive("TrainState.apply_gradients")
    glist = [grads[k] for k in spec.trainable]
    # The check as reductions a compiler fuses (torch's fused check is an in-place kernel
    # that a compiled graph runs on copies of every gradient).
    ok = torch.stack([torch.isfinite(local_part(g)).all() for g in glist]).all()
    trace.flags.append((~ok).float())
    # The update runs on copies, then one select writes them back: a compiler fuses the
    # copies into the update's first reads and the select into its last writes (an
    # in-place update followed by a select back to a saved copy would keep the copy).
    opt_state = state._opt_state
    params = [state._params[k] for k in spec.trainable]
    work = [p.detach().clone() for p in params]
    work_state = {
        k: {key: v.clone() if isinstance(v, torch.Tensor) else v for key, v in opt_state["state"][k].items()}
        for k in spec.trainable
    }
    optimizer = build_optimizer(spec.optimizer, spec.trainable, work, {"initialized": True, "state": work_state})
    groups = [g for g in optimizer.param_groups if g.get("capturable") is False] if trace.capturable else []
    with torch.no_grad():
        for g in groups:  # bias corrections from the step tensors on the device, not with .item()
            g["capturable"] = True
        optimizer_step(state, optimizer, work, glist)
        for k, p, w in zip(spec.trainable, params, work):
            p.copy_(torch.where(ok, w, p))
            for key, v in opt_state["state"][k].items():
                if not isinstance(v, torch.Tensor):
                    continue
                if v.device == ok.device:
                    v.copy_(torch.where(ok, optimizer.state[w][key], v))
                else:  # a host step count (capturable=False): written once the host reads the flag
                    trace.pending.append((v, optimizer.state[w][key]))
    return state.successor(updated=True)


def _owner(module: torch.nn.Module, dotted: str) -> tuple[torch.nn.Module, str]:
    *path, attr = dotted.split(".")
    owner = module
    for part in path:
        owner = getattr(owner, part)
    return owner, attr
