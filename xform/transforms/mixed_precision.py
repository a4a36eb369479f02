"""``mixed_precision``: compute in a lower precision, keep fp32 master weights.

Nesting: ``mixed_precision`` may sit inside or outside ``accumulate`` and ``shard`` with
the same meaning. The loss scale's unscale wraps the one real optimizer update (the
``update`` primitive; under ZeRO the sharded update is reached through it too), and
autocast wraps every ``apply``, whatever the order. Whether the unscaled gradient is
finite is decided by the update itself, in every precision, agreed by all processes
under ``shard``: a skipped update halves the dynamic scale on every process.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

import attrs
import torch

from xform import tree
from xform.core.mean import Mean
from xform.core.optim import local_part
from xform.core.primitives import Handler, installed
from xform.core.state import TrainState
from xform.core.transform import check_step, transforms_of, wrap
from xform.transforms.fp8 import Float8, convert as convert_to_fp8

__all__ = ["Policy", "NoOpLossScale", "StaticLossScale", "DynamicLossScale", "mixed_precision"]

_DTYPES = {
    "float32": torch.float32, "fp32": torch.float32, "f32": torch.float32, "float": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "f16": torch.float16, "half": torch.float16,
}
_SHORT = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def _dtype(api: str, name: str) -> torch.dtype:
    try:
        return _DTYPES[name.strip().lower()]
    except KeyError:
        raise ValueError(f"{api}: unknown dtype {name!r}; use one of float32, bfloat16, float16") from None


@attrs.frozen
class Policy:
    """Which dtype params are stored in, computed in, and returned in (jmp's policy).

    Example:
        >>> import xform as xf
        >>> xf.Policy.parse("params=float32,compute=bfloat16")
        Policy(param_dtype=torch.float32, compute_dtype=torch.bfloat16, output_dtype=torch.float32)
        >>> str(xf.Policy.parse("fp16"))
        'params=float32,compute=float16,output=float32'
    """

    param_dtype: torch.dtype = attrs.field(kw_only=True, default=torch.float32)
    compute_dtype: torch.dtype = attrs.field(kw_only=True, default=torch.float32)
    output_dtype: torch.dtype = attrs.field(kw_only=True, default=torch.float32)

    def __attrs_post_init__(self) -> None:
        _check_policy(self)

    @classmethod
    def parse(cls, spec: "str | Policy") -> "Policy":
        """``"bf16"``, ``"fp16"``, ``"fp32"`` or ``"params=...,compute=...,output=..."``.

        A short name computes in that dtype with float32 params and outputs; in the long
        form, ``compute`` and ``output`` default to ``params`` (float32 when unnamed).
        """
        if isinstance(spec, Policy):
            return spec
        if not isinstance(spec, str):
            raise TypeError(f"mixed_precision: policy must be a string or xf.Policy, got {spec!r}")
        if "=" not in spec:
            return cls(compute_dtype=_dtype("mixed_precision", _SHORT.get(spec.strip().lower(), spec)))
        parts: dict[str, torch.dtype] = {}
        for item in spec.split(","):
            key, sep, value = item.partition("=")
            key = key.strip().lower()
            if not sep or key not in ("params", "compute", "output"):
                raise ValueError(
                    f"mixed_precision: cannot parse policy {spec!r} at {item!r}; write e.g. "
                    "'params=float32,compute=bfloat16,output=float32'"
                )
            parts[key] = _dtype("mixed_precision", value)
        param = parts.get("params", torch.float32)
        compute = parts.get("compute", param)
        return cls(param_dtype=param, compute_dtype=compute, output_dtype=parts.get("output", param))

    def cast_to_output(self, x: Any) -> Any:
        return _cast_floats(x, self.output_dtype)

    def __str__(self) -> str:
        name = lambda d: str(d).removeprefix("torch.")  # noqa: E731
        return f"params={name(self.param_dtype)},compute={name(self.compute_dtype)},output={name(self.output_dtype)}"


_WIDTH = {torch.float32: 32, torch.bfloat16: 16, torch.float16: 16}


def _check_policy(policy: "Policy") -> None:
    """Refuses policies that cannot mean what they say."""
    fields = {"params": policy.param_dtype, "compute": policy.compute_dtype, "output": policy.output_dtype}
    for key, dtype in fields.items():
        if dtype not in _WIDTH:
            raise TypeError(
                f"mixed_precision: a policy's {key} dtype must be torch.float32, torch.bfloat16 or "
                f"torch.float16, got {dtype!r}"
            )
    name = lambda d: str(d).removeprefix("torch.")  # noqa: E731
    spec = ",".join(f"{k}={name(v)}" for k, v in fields.items())
    if {torch.float16, torch.bfloat16} <= set(fields.values()):
        raise ValueError(
            f"mixed_precision: the policy {spec} mixes float16 and bfloat16, whose ranges differ (a cast "
            "between them overflows or drops digits); keep one 16-bit type, e.g. "
            "'params=float32,compute=bfloat16' or 'fp16' (float32 params, float16 compute)"
        )
    if _WIDTH[policy.compute_dtype] > _WIDTH[policy.param_dtype]:
        raise ValueError(
            f"mixed_precision: the policy {spec} computes in a wider dtype than the params are stored in, "
            f"which pays for {name(policy.compute_dtype)} compute with {name(policy.param_dtype)} precision; "
            f"use 'params=float32,compute={name(policy.param_dtype)}' (float32 master weights) or "
            f"'params={name(policy.param_dtype)}'"
        )


def _cast_floats(x: Any, dtype: torch.dtype) -> Any:
    if type(x) is torch.Tensor:  # the common case, without the pytree machinery
        return x.to(dtype) if x.is_floating_point() and x.dtype != dtype else x
    return tree.map(lambda t: _cast_leaf(t, dtype), x)


def _cast_leaf(t: Any, dtype: torch.dtype) -> Any:
    """A leaf of the pytree: a tensor, or a container the pytree does not know (Hugging
    Face's ``ModelOutput``, other ``Mapping`` subclasses, dataclasses), cast inside and
    rebuilt as the same type."""
    if isinstance(t, torch.Tensor):
        return t.to(dtype) if t.is_floating_point() and t.dtype != dtype else t
    if isinstance(t, Mapping):
        items = {k: _cast_floats(v, dtype) for k, v in t.items()}
        if dataclasses.is_dataclass(t):
            names = {f.name for f in dataclasses.fields(t) if f.init}
            if set(items) <= names:
                return dataclasses.replace(t, **items)
        try:
            return type(t)(items)
        except TypeError as e:
            raise TypeError(
                f"mixed_precision: cannot cast an output of type {type(t).__name__} to {dtype} ({e}); return "
                "a dict, tuple or dataclass from the module, or use a policy whose output dtype is the compute dtype"
            ) from None
    if dataclasses.is_dataclass(t) and not isinstance(t, type):
        return dataclasses.replace(
            t, **{f.name: _cast_floats(getattr(t, f.name), dtype) for f in dataclasses.fields(t) if f.init}
        )
    return t


# --- loss scales: frozen settings; their values live in TrainState.transforms -------------


@attrs.frozen
class NoOpLossScale:
    """No loss scaling (bf16, fp32)."""

    def initial(self, device: torch.device) -> dict[str, torch.Tensor] | None:
        return None


@attrs.frozen
class StaticLossScale:
    """Multiplies the loss by a fixed ``scale``; skips the update on overflow."""

    scale: float = attrs.field(default=2.0**15)

    def initial(self, device: torch.device) -> dict[str, torch.Tensor]:
        return {"scale": torch.tensor(float(self.scale), device=device), "good_steps": torch.tensor(0, device=device)}

    def adjust(self, value: dict[str, torch.Tensor], finite: bool) -> dict[str, torch.Tensor]:
        return value


@attrs.frozen
class DynamicLossScale:
    """Halves the scale on overflow (skipping that update); doubles it after
    ``growth_interval`` finite updates in a row (torch's GradScaler, jmp's
    DynamicLossScale)."""

    initial_scale: float = attrs.field(default=2.0**16, kw_only=True)
    growth_interval: int = attrs.field(default=2000, kw_only=True)
    factor: float = attrs.field(default=2.0, kw_only=True)
    min_scale: float = attrs.field(default=1.0, kw_only=True)

    def __attrs_post_init__(self):
        if not (self.initial_scale >= 1 and self.growth_interval >= 1 and self.factor > 1 and self.min_scale > 0):
            raise ValueError(
                f"DynamicLossScale: need initial_scale >= 1, growth_interval >= 1, factor > 1 and "
                f"min_scale > 0, got {self!r}"
            )

    def initial(self, device: torch.device) -> dict[str, torch.Tensor]:
        return {
            "scale": torch.tensor(float(self.initial_scale), device=device),
            "good_steps": torch.tensor(0, dtype=torch.int64, device=device),
        }

    def adjust(self, value: dict[str, torch.Tensor], finite: bool) -> dict[str, torch.Tensor]:
        scale, good = value["scale"], value["good_steps"]
        if not finite:
            return {"scale": torch.clamp(scale / self.factor, min=self.min_scale), "good_steps": torch.zeros_like(good)}
        good = good + 1
        grow = good >= self.growth_interval  # on the device: no host read
        return {"scale": torch.where(grow, scale * self.factor, scale), "good_steps": torch.where(grow, 0, good)}


LossScale = NoOpLossScale | StaticLossScale | DynamicLossScale
_KEY = "mixed_precision"

_TWICE = (
    "mixed_precision: the step called state.apply_gradients twice; a step must call it exactly once "
    "(sum the losses, or the grads, and apply them once)"
)
_NO_INIT = (
    "mixed_precision: the state has no loss scale; lay it out first with state = step.init(state) "
    "(the step returned by the transforms)"
)


class _Handler(Handler):
    def __init__(self, policy: Policy, loss_scale: Any):
        self.policy = policy
        self.loss_scale = loss_scale
        self.scale: torch.Tensor | None = None
        self.calls = 0  # apply_gradients calls in this call of the step
        self.compute, self.output = policy.compute_dtype, policy.output_dtype
        self.cast_inputs = policy.compute_dtype == policy.param_dtype  # params stored in it: cast, no autocast
        self.autocast: torch.autocast | None = None  # reused by apply calls in turn (see apply)
        self.depth = 0  # apply calls running under this handler (nested ones make their own autocast)

    def apply(self, state, params, args, kwargs, next):
        dtype = self.compute
        if self.cast_inputs:
            out = next(state, params, _cast_floats(args, dtype), _cast_floats(kwargs, dtype))
        else:
            # One autocast context made once and reused by the apply calls one after another
            # (building one costs more than entering it). A context records on itself what it
            # restores, so a nested apply makes its own; so does one while torch.compile
            # traces (it follows the contexts it sees made), and one after the device or the
            # autocast cache setting changed.
            device_type = state._runtime("xf.apply").device_type
            ac = self.autocast
            if (
                ac is None or self.depth or ac.device != device_type
                or ac._cache_enabled != torch.is_autocast_cache_enabled() or torch.compiler.is_compiling()
            ):
                ac = torch.autocast(device_type, dtype=dtype)
                if not self.depth and not torch.compiler.is_compiling():
                    self.autocast = ac
            self.depth += 1
            try:
                with ac:
                    out = next(state, params, args, kwargs)
            finally:
                self.depth -= 1
        return _cast_floats(out, self.output)

    def apply_gradients(self, state, grads, count, next):
        self.calls += 1
        if self.calls > 1:
            raise RuntimeError(_TWICE)
        if not self.cast_inputs:
            torch.clear_autocast_cache()  # casts of the weights the update is about to change
        return next(state, grads, count)


class _ScaledHandler(_Handler):
    """The handler of a policy with a loss scale (fp16): it also scales the objective and
    unscales before the update. A policy without one (bf16) has no ``objective`` or
    ``update`` of its own, so those primitives skip it (see ``_Stack.chain``). While it is
    installed (a call of the step) ``scale`` is the state's loss scale."""

    def objective(self, loss: Mean, next):
        return next(loss) * self.scale

    def update(self, state: TrainState, grads, next):
        value = state.transforms[_KEY]
        # Unscale on the device; whether the result is finite (on every process, under
        # shard) is decided once, by the update itself, which skips a non-finite one.
        glist = [local_part(g) for g in grads.values()]
        torch._foreach_mul_(glist, (1.0 / value["scale"].double()).float())
        before = state._step
        new = next(state, grads)
        finite = new._step != before
        return new._evolve_leaves(transforms={**new.transforms, _KEY: self.loss_scale.adjust(value, finite)})


def mixed_precision(
    step: Callable[..., Any],
    policy: "str | Policy" = "bf16",
    *,
    loss_scale: LossScale | None = None,
    fp8: "Float8 | None" = None,
):
    """Runs ``step`` with its forward pass in a lower precision.

    Args:
        step: a step ``step(state, batch) -> (state, metrics)``.
        policy: ``"bf16"``, ``"fp16"``, ``"fp32"``, an ``xf.Policy`` or its string form
            ``"params=float32,compute=bfloat16,output=float32"``. With float32 params
            (master weights) the forward runs under ``torch.autocast`` in the compute
            dtype, and autocast's casts of the weights are kept from the first ``apply``
            of a call to its update: each weight is cast once per step, not once per
            micro-batch under ``accumulate`` (bitwise the same result). With params
            stored in the compute dtype (``"params=bfloat16"``), ``step.init`` casts
            them and inputs are cast instead. Outputs of ``apply`` are cast to the
            output dtype.
        loss_scale: for float16 compute, ``DynamicLossScale()`` by default; its value
            lives in ``state.transforms["mixed_precision"]``. An update whose unscaled
            gradients are not finite is skipped: params and ``state.step`` stay, the
            scale shrinks, the data position advances.
        fp8: train the large ``nn.Linear`` layers in float8 through torchao
            (``xf.Float8(...)``: which layers, tensorwise or rowwise scaling); the rest
            computes in bf16. ``policy="fp8"`` is ``"bf16"`` with ``fp8=xf.Float8()``.
            ``step.init`` swaps the chosen layers for torchao's ``Float8Linear`` (the
            params keep their names and fp32 master values). Put it inside ``shard``.
            See docs/fp8.md.

    ``mixed_precision(step, "fp32") is step``.

    Example:
        >>> import torch, xform as xf
        >>> def step(state, batch):
        ...     loss, grads = xf.value_and_grad(lambda p: xf.apply(state, p, batch).square().mean())(state.params)
        ...     return state.apply_gradients(grads), {"loss": loss}
        >>> step = xf.mixed_precision(step, "bf16")
        >>> state = step.init(xf.TrainState.create(torch.nn.Linear(4, 2), optimizer=torch.optim.SGD, lr=0.1))
        >>> state, metrics = step(state, torch.ones(8, 4))
        >>> state.step, metrics["loss"].dtype
        (1, torch.float32)
    """
    check_step("mixed_precision", step)
    if isinstance(policy, str) and policy.strip().lower() == "fp8":
        policy, fp8 = "bf16", Float8() if fp8 is None else fp8
    policy = Policy.parse(policy)
    if fp8 is not None:
        _check_fp8(step, policy, fp8, loss_scale)
    if loss_scale is None:
        loss_scale = DynamicLossScale() if policy.compute_dtype == torch.float16 else NoOpLossScale()
    if not isinstance(loss_scale, (NoOpLossScale, StaticLossScale, DynamicLossScale)):
        raise TypeError(
            f"mixed_precision: loss_scale must be NoOpLossScale(), StaticLossScale(...) or "
            f"DynamicLossScale(...), got {loss_scale!r}"
        )
    if policy == Policy() and isinstance(loss_scale, NoOpLossScale):
        return step
    if "mixed_precision" in transforms_of(step):
        raise ValueError(
            "mixed_precision: this step is already wrapped in mixed_precision; apply one policy only"
        )
    scaled = not isinstance(loss_scale, NoOpLossScale)
    kind = _ScaledHandler if scaled else _Handler

    def init(state: TrainState) -> TrainState:
        if policy.param_dtype != torch.float32:
            state = state._cast_params(policy.param_dtype)
        if scaled and _KEY not in state.transforms:
            value = loss_scale.initial(state._runtime("mixed_precision.init").device)
            state = state.replace(transforms={**state.transforms, _KEY: value})
        if fp8 is not None:
            state = convert_to_fp8(state, fp8)
        return state

    free: list[_Handler] = []  # a handler not in use, reused by the next call (none while one runs)

    def around(inner: Callable[..., Any]) -> Callable[[TrainState, Any], Any]:
        """``inner`` run under this policy's handler (``inner`` is ``step``, or what
        ``accumulate`` makes of it: see ``wrap``'s ``commutes``)."""

        def call(state: TrainState, batch: Any):
            scale = None
            if scaled:
                value = state.transforms.get(_KEY)
                if value is None:
                    raise ValueError(_NO_INIT)
                scale = value["scale"]
            handler = free.pop() if free else kind(policy, loss_scale)  # atomic: a concurrent call makes its own
            handler.scale, handler.calls = scale, 0
            # autocast's cache of the weights' casts is kept for the whole step, not dropped
            # after each apply: the weights are cast once per step, not once per micro-batch
            # (the cache is dropped before the update, see apply_gradients)
            keep = not handler.cast_inputs and not torch.compiler.is_compiling()
            try:
                with installed(handler, reused=True):
                    if not keep:
                        return inner(state, batch)
                    torch.autocast_increment_nesting()
                    try:
                        return inner(state, batch)
                    finally:
                        if torch.autocast_decrement_nesting() == 0:
                            torch.clear_autocast_cache()
            finally:
                handler.scale = None  # hold no tensor between calls
                if not free:
                    free.append(handler)

        return call

    return wrap(
        step, around(step), init,
        name="mixed_precision", policy=policy, loss_scale=loss_scale, fp8=fp8,
        # accumulate(mixed_precision(s)) means mixed_precision(accumulate(s)) (see the module
        # docstring) and runs that way: this handler installed once per step, not per micro-batch
        commutes=around,
    )


def _check_fp8(step: Any, policy: Policy, fp8: Any, loss_scale: Any) -> None:
    """Refuses fp8 settings that cannot mean what they say (see docs/fp8.md)."""
    if not isinstance(fp8, Float8):
        raise TypeError(f"mixed_precision: fp8 must be an xf.Float8(...) or None, got {fp8!r}")
    if policy.param_dtype != torch.float32 or policy.compute_dtype != torch.bfloat16:
        raise ValueError(
            f"mixed_precision: fp8 trains Linear layers in float8 beside bf16 compute with float32 master "
            f"weights, got the policy {policy}; use mixed_precision(step, 'fp8') or policy 'bf16' with fp8=..."
        )
    if loss_scale is not None and not isinstance(loss_scale, NoOpLossScale):
        raise ValueError(
            f"mixed_precision: fp8 takes no loss scale (each fp8 cast has its own dynamic scale, and the rest "
            f"computes in bf16), got loss_scale={loss_scale!r}; drop loss_scale, or use 'fp16' for loss scaling"
        )
    if "shard" in transforms_of(step):
        raise ValueError(
            "mixed_precision: fp8 converts the module's Linear layers, which must happen before shard lays "
            "them out; nest it inside: shard(mixed_precision(step, 'fp8'), 'zero3')"
        )

