"""fp8 training of ``nn.Linear`` layers through torchao's float8 training, for
``mixed_precision(step, "fp8")``.

How it fits a state whose module is static and whose params are leaves: ``step.init``
converts the state's module once (torchao's ``convert_to_float8_training``: each chosen
``nn.Linear`` is swapped for a ``Float8Linear`` holding *the same* weight and bias
``Parameter``), then returns a state over the converted module. Params keep their names
and their float32 master values (the optimizer updates them as before); the old state is
donated to the new one. Every other op runs under bf16 autocast, as with ``"bf16"``.

Scaling is dynamic: each matmul operand (input, weight, output gradient) is cast to fp8
with a scale computed from its own absolute maximum at that call (tensorwise by default:
one scale per tensor; ``Float8(scaling="rowwise")``: one per row). So there is no fp8
state to carry between steps: no amax history, no scales. ``TrainState`` and its
checkpoints hold the fp32 master params, as with bf16, and a resumed run computes the
same scales from the same params.
"""

from __future__ import annotations

import importlib.util
from typing import Any

import attrs
import torch

from xform.core.optim import placeholder_opt_state
from xform.core.state import TrainState, _evolve, _Life, _Runtime  # the spec of a state over a new module

__all__ = ["Float8", "convertible", "convert"]

_SCALINGS = ("tensorwise", "rowwise")


def _check_scaling(instance: Any, attribute: Any, value: Any) -> None:
    if value not in _SCALINGS:
        raise ValueError(f"Float8: scaling must be 'tensorwise' or 'rowwise', got {value!r}")


def _check_min(instance: Any, attribute: Any, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"Float8: min_params must be an int >= 0, got {value!r}; e.g. Float8(min_params=2**20)")


def _to_tuple(value: Any) -> tuple[str, ...]:
    if isinstance(value, str):
        return (value,)
    value = tuple(value)
    if not all(isinstance(v, str) for v in value):
        raise TypeError(f"Float8: skip must be module names (strings), got {value!r}; e.g. skip=('lm_head',)")
    return value


@attrs.frozen
class Float8:
    """Which ``nn.Linear`` layers train in fp8, and how (torchao's float8 training).

    A Linear is converted when all of these hold (the filter; the others stay in bf16):

    - ``in_features`` and ``out_features`` are both multiples of 16 (what
      ``torch._scaled_mm`` needs);
    - its weight has at least ``min_params`` values (``in * out``; the default, 2**20,
      is a 1024x1024 layer: below that, the casts cost more than the fp8 matmul saves);
    - no name in ``skip`` is part of its module path (``skip=("lm_head",)`` keeps the
      output projection in bf16);
    - its weight is not shared with another module (a tied ``lm_head``/embedding).

    Args:
        scaling: ``"tensorwise"`` (one dynamic scale per tensor; the default) or
            ``"rowwise"`` (one per row, torchao's rowwise recipe).
        min_params: the smallest weight converted, in values.
        skip: module-path substrings never converted.
        fsdp_float8_all_gather: under ``shard("zero3")``, all-gather the weights in fp8
            (FSDP2 with torchao's float8 weight wrapper; tensorwise only): half the bytes
            of a bf16 gather.

    Example:
        >>> import torch
        >>> from xform.transforms.fp8 import Float8
        >>> Float8(min_params=0).convertible(torch.nn.Linear(32, 48), "mlp.up")
        True
        >>> Float8(min_params=0).convertible(torch.nn.Linear(30, 48), "mlp.up")  # 30: no multiple of 16
        False
        >>> Float8().convertible(torch.nn.Linear(32, 48), "mlp.up")  # 1,536 < min_params weights
        False
    """

    scaling: str = attrs.field(default="tensorwise", kw_only=True, validator=_check_scaling)
    min_params: int = attrs.field(default=2**20, kw_only=True, validator=_check_min)
    skip: tuple[str, ...] = attrs.field(default=(), kw_only=True, converter=_to_tuple)
    fsdp_float8_all_gather: bool = attrs.field(default=False, kw_only=True)

    def __attrs_post_init__(self) -> None:
        if importlib.util.find_spec("torchao") is None:
            raise ImportError(
                "Float8: fp8 training needs torchao (its float8 training); install it: "
                "pip install 'torchao>=0.10' (or use mixed_precision(step, 'bf16'))"
            )
        if self.fsdp_float8_all_gather and self.scaling != "tensorwise":
            raise ValueError(
                f"Float8: fsdp_float8_all_gather needs scaling='tensorwise' (torchao's fp8 all-gather), "
                f"got scaling={self.scaling!r}"
            )

    def convertible(self, module: torch.nn.Module, path: str) -> bool:
        """Whether the filter converts ``module`` found at ``path`` (ties aside)."""
        if not isinstance(module, torch.nn.Linear):
            return False
        n, k = module.weight.shape
        if n % 16 or k % 16 or n * k < self.min_params:
            return False
        return not any(s in path for s in self.skip)

    def config(self) -> Any:
        """torchao's ``Float8LinearConfig`` for these settings."""
        from torchao.float8 import Float8LinearConfig

        if self.scaling == "rowwise":
            return Float8LinearConfig.from_recipe_name("rowwise")
        return Float8LinearConfig(enable_fsdp_float8_all_gather=self.fsdp_float8_all_gather)


def _tied(module: torch.nn.Module) -> set[int]:
    """ids of the params held by more than one module."""
    owners: dict[int, int] = {}
    for _, m in module.named_modules(remove_duplicate=False):
        for p in m._parameters.values():
            if p is not None:
                owners[id(p)] = owners.get(id(p), 0) + 1
    return {k for k, n in owners.items() if n > 1}


def convertible(module: torch.nn.Module, settings: Float8) -> list[str]:
    """The module paths of the Linear layers that ``settings`` converts to fp8 in ``module``.

    Example:
        >>> import torch
        >>> net = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Linear(64, 10))
        >>> convertible(net, Float8(min_params=0))  # 10 outputs: no multiple of 16
        ['0']
    """
    tied = _tied(module)
    return [
        path for path, m in module.named_modules()
        if settings.convertible(m, path) and id(m.weight) not in tied
    ]


_NO_LAYER = (
    "mixed_precision('fp8'): no nn.Linear of {module} passes the fp8 filter ({settings}): a layer needs "
    "in/out features that are multiples of 16 and at least min_params={min} weights; lower it "
    "(fp8=Float8(min_params=0), from xform.transforms.fp8) or use 'bf16'"
)
_TRAINED = (
    "mixed_precision('fp8'): cannot convert the module to fp8 after training started (step {step}); call "
    "state = step.init(state) right after TrainState.create"
)
_SHARDED = (
    "mixed_precision('fp8'): the state's module is already sharded ({layout}); convert it first: put "
    "mixed_precision inside shard, shard(mixed_precision(step, 'fp8'), 'zero3'), and lay a fresh state out"
)


def convert(state: TrainState, settings: Float8) -> TrainState:
    """The state over its module with the chosen Linears swapped for torchao's
    ``Float8Linear`` (in place: the module is the state's); ``state`` is donated to it.

    A module converted already (this step's init run twice, or a state loaded with
    ``like=``) is left as it is.
    """
    from torchao.float8 import convert_to_float8_training
    from torchao.float8.float8_linear import Float8Linear

    module = state.module
    if any(isinstance(m, Float8Linear) for m in module.modules()):
        return state
    if state._spec.layout is not None:
        raise ValueError(_SHARDED.format(layout=state._spec.layout))
    if state.opt_state["initialized"]:
        raise ValueError(_TRAINED.format(step=state.step))
    chosen = set(convertible(module, settings))
    if not chosen:
        raise ValueError(_NO_LAYER.format(module=type(module).__name__, settings=settings, min=settings.min_params))
    root = convert_to_float8_training(
        module, module_filter_fn=lambda m, path: path in chosen, config=settings.config()
    )
    return _over(state, root)


def _over(state: TrainState, root: torch.nn.Module) -> TrainState:
    """``state`` rebuilt over ``root`` (the converted module): each param keeps its name;
    its tensor is the module's (the same object, or torchao's float8-gather wrapper of it)."""
    spec = state._spec
    names = {id(t): k for k, t in state.params.items()}
    params: dict[str, torch.Tensor] = {}
    aliases: dict[str, list] = {}
    for path, p in root.named_parameters(remove_duplicate=False):
        inner = getattr(p, "_tensor", p)  # WeightWithDynamicFloat8CastTensor wraps the original
        name = names.get(id(p), names.get(id(inner)))
        if name is None:
            raise RuntimeError(f"mixed_precision('fp8'): the converted module has a parameter {path!r} the state lacks")
        params.setdefault(name, p)
        owner, _, attr = path.rpartition(".")
        aliases.setdefault(name, []).append((root.get_submodule(owner), attr))
    buffer_aliases: dict[str, list] = {}
    buffer_names = {id(t): k for k, t in state.buffers.items()}
    for path, b in root.named_buffers(remove_duplicate=False):
        owner, _, attr = path.rpartition(".")
        buffer_aliases.setdefault(buffer_names[id(b)], []).append((root.get_submodule(owner), attr))
    params = {k: params[k] for k in state.params}  # the state's order
    new_spec = attrs.evolve(
        spec,
        module=root,
        aliases={k: tuple(v) for k, v in aliases.items()},
        buffer_aliases={k: tuple(v) for k, v in buffer_aliases.items()},
    )
    opt = {"initialized": False, "state": placeholder_opt_state(spec.optimizer, params, spec.trainable)}
    new = _evolve(state, spec=new_spec, params=params, opt_state=opt, life=_Life(_Runtime(new_spec)))
    state._donate("mixed_precision('fp8')'s step.init, which converted its module")
    return new
