"""The DeepSpeed config, generated from the transform stack (never written by hand).

Each generated key remembers what set it (``accumulate(4)``, ``mixed_precision('bf16')``,
``TrainState.create(max_grad_norm=1.0)``, ``xf.DeepSpeed(stage=2)``), so that a user
config key contradicting it is refused with an error naming the key, both values and
their sources. Pure Python: nothing here imports DeepSpeed.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any, Mapping

import torch

from xform.core.strategies import DeepSpeed
from xform.core.transform import Transforms

__all__ = ["Settings", "settings_of", "generate_config", "ENGINE_OWNED"]

# Transforms that DeepSpeed's engine takes over when they sit inside ``shard``: their
# settings become config, the engine does their work.
ENGINE_OWNED = ("accumulate", "mixed_precision")

BUCKET_ELEMENTS = 25 * 2**20 // 4  # 25 MB of fp32: the native ZeRO's default bucket_mb

# Keys xform sets from the state itself, which a user config may not replace.
_OWNED_BY_STATE = {
    "optimizer": "the optimizer comes from TrainState.create(optimizer=...) (a client optimizer); remove the "
    "'optimizer' section",
    "scheduler": "the learning-rate schedule comes from TrainState.create(lr=step -> lr); remove the 'scheduler' "
    "section",
}


class Settings:
    """What the transforms inside ``shard`` ask of the engine."""

    __slots__ = ("accumulation", "policy", "loss_scale", "sources")

    def __init__(self, accumulation: int, policy: Any, loss_scale: Any, sources: dict[str, str]):
        self.accumulation, self.policy, self.loss_scale, self.sources = accumulation, policy, loss_scale, sources


def settings_of(record: Transforms) -> Settings:
    """The engine's settings from ``step.xform`` (the transforms inside ``shard``).

    Refuses transforms the engine cannot take over (anything but ``accumulate`` and
    ``mixed_precision``)."""
    other = [name for name in record.names if name not in ENGINE_OWNED]
    if other:
        raise ValueError(
            f"shard: the DeepSpeed backend runs the step through its engine, which takes over accumulate and "
            f"mixed_precision only; the step is also wrapped in {other}; apply those outside shard, or use the "
            "torch backend"
        )
    steps = 1
    for applied in record.applied:
        if applied.name == "accumulate":
            steps *= applied["steps"]
    policy = record.setting("mixed_precision", "policy")
    loss_scale = record.setting("mixed_precision", "loss_scale")
    sources = {}
    if steps > 1:
        sources["accumulation"] = f"accumulate({steps})"
    if policy is not None:
        sources["precision"] = f"mixed_precision({str(policy)!r})"
    return Settings(steps, policy, loss_scale, sources)


def _precision_sections(settings: Settings) -> tuple[dict[str, Any], str]:
    """The ``bf16``/``fp16`` sections of the policy, and the dtype of the engine's model."""
    policy = settings.policy
    if policy is None:
        return {"bf16": {"enabled": False}, "fp16": {"enabled": False}}, "float32"
    source = settings.sources["precision"]
    if policy.param_dtype != torch.float32 or policy.output_dtype != torch.float32:
        raise ValueError(
            f"shard: DeepSpeed keeps float32 master weights and low-precision model weights; {source} asks for "
            f"'{policy}'; use mixed_precision(step, 'bf16') or 'fp16' (float32 params, outputs)"
        )
    if policy.compute_dtype == torch.bfloat16:
        return {"bf16": {"enabled": True}, "fp16": {"enabled": False}}, "bfloat16"
    if policy.compute_dtype == torch.float32:
        return {"bf16": {"enabled": False}, "fp16": {"enabled": False}}, "float32"
    # float16: the loss scale's settings
    from xform.transforms.mixed_precision import DynamicLossScale, NoOpLossScale, StaticLossScale

    scale = settings.loss_scale
    fp16: dict[str, Any] = {"enabled": True}
    if isinstance(scale, DynamicLossScale):
        power = math.log2(scale.initial_scale)
        if scale.factor != 2.0 or power != int(power) or scale.min_scale < 1:
            raise ValueError(
                f"shard: DeepSpeed's dynamic loss scale grows and shrinks by 2 from a power of 2 and never goes "
                f"below 1; {source} has {scale!r}; use DynamicLossScale(initial_scale=2.0**k, factor=2.0, "
                "min_scale>=1)"
            )
        fp16.update(
            loss_scale=0, initial_scale_power=int(power), loss_scale_window=scale.growth_interval,
            min_loss_scale=scale.min_scale, hysteresis=1,  # halve at every overflow, as DynamicLossScale does
        )
    elif isinstance(scale, StaticLossScale):
        fp16["loss_scale"] = float(scale.scale)
    elif isinstance(scale, NoOpLossScale):
        fp16["loss_scale"] = 1.0
    return {"bf16": {"enabled": False}, "fp16": fp16}, "float16"


def read_user_config(config: Any) -> dict[str, Any]:
    """The user's extra config: a dict, or a JSON file's path."""
    if config is None:
        return {}
    if isinstance(config, Mapping):
        return json.loads(json.dumps(dict(config)))  # a deep, plain copy
    path = os.fspath(config)
    try:
        with open(path) as f:
            data = json.load(f)
    except FileNotFoundError:
        raise FileNotFoundError(f"DeepSpeed: config file {path} does not exist; pass a dict or an existing JSON file") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"DeepSpeed: config file {path} is not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise ValueError(f"DeepSpeed: config file {path} must hold a JSON object, got {type(data).__name__}")
    return data


def generate_config(
    strategy: DeepSpeed, settings: Settings, *, max_grad_norm: float | None, stage: int | None = None,
    offload_optimizer: str | None = None, offload_params: str | None = None,
) -> dict[str, Any]:
    """The engine's config: generated keys, with the user's ``strategy.config`` merged in.

    ``stage``/``offload_*`` override the strategy's (``stage="auto"`` resolved).

    Example:
        >>> import xform as xf
        >>> from xform.backends.deepspeed.config import generate_config, settings_of
        >>> step = xf.accumulate(xf.mixed_precision(lambda s, b: (s, {}), "bf16"), 4)
        >>> cfg = generate_config(xf.DeepSpeed(stage=2), settings_of(step.xform), max_grad_norm=1.0)
        >>> cfg["gradient_accumulation_steps"], cfg["bf16"], cfg["gradient_clipping"], cfg["zero_optimization"]["stage"]
        (4, {'enabled': True}, 1.0, 2)
    """
    stage = strategy.stage if stage is None else stage
    offload_optimizer = strategy.offload_optimizer if offload_optimizer is None else offload_optimizer
    offload_params = strategy.offload_params if offload_params is None else offload_params
    ds_source = f"xf.DeepSpeed(stage={stage!r})"
    generated: dict[str, tuple[Any, str]] = {}  # dotted key -> (value, source)
    acc_source = settings.sources.get("accumulation", "no accumulate (1 micro-batch)")
    generated["gradient_accumulation_steps"] = (settings.accumulation, acc_source)
    sections, _ = _precision_sections(settings)
    prec_source = settings.sources.get("precision", "no mixed_precision (float32)")
    for section, body in sections.items():
        for key, value in body.items():
            generated[f"{section}.{key}"] = (value, prec_source)
    clip_source = f"TrainState.create(max_grad_norm={max_grad_norm!r})"
    generated["gradient_clipping"] = (float(max_grad_norm) if max_grad_norm is not None else 0.0, clip_source)
    generated["zero_optimization.stage"] = (stage, ds_source)
    if offload_optimizer is not None:
        generated["zero_optimization.offload_optimizer.device"] = (offload_optimizer, f"xf.DeepSpeed(offload_optimizer={offload_optimizer!r})")
    if offload_params is not None:
        generated["zero_optimization.offload_param.device"] = (offload_params, f"xf.DeepSpeed(offload_params={offload_params!r})")
    # Any torch optimizer is a client optimizer (DeepSpeed only vouches for Adam by default),
    # also with the optimizer offloaded (the CPU Adam is DeepSpeed's suggestion, not a need).
    generated["zero_allow_untested_optimizer"] = (True, "xform (the optimizer of TrainState.create)")
    generated["zero_force_ds_cpu_optimizer"] = (False, "xform (the optimizer of TrainState.create)")

    user = read_user_config(strategy.config)
    for key, why in _OWNED_BY_STATE.items():
        if key in user:
            raise ValueError(f"shard: DeepSpeed config key {key!r} cannot be set under xform: {why}")
    out = json.loads(json.dumps(user))
    for dotted, (value, source) in generated.items():
        parts = dotted.split(".")
        node = out
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ValueError(
                    f"shard: DeepSpeed config key {part!r} must be a section (a dict), got {child!r}; {source} sets "
                    f"{dotted} = {value!r}"
                )
            node = child
        last = parts[-1]
        if last in node and node[last] != value and not _same(node[last], value):
            raise ValueError(
                f"shard: DeepSpeed config key {dotted!r} is {node[last]!r} in the user config but {source} sets it "
                f"to {value!r}; remove the key from the config or change the transform"
            )
        node[last] = value
    out.setdefault("train_micro_batch_size_per_gpu", 1)  # only DeepSpeed's sample counters read it (see docs)
    # DeepSpeed's buckets default to 5e8 elements (a 1.9 GiB fp32 buffer per process, measured by
    # bench/deepspeed.py); xform's ZeRO buckets are 25 MB: the same here, unless the user sets them.
    zero = out["zero_optimization"]
    for key in ("reduce_bucket_size", "allgather_bucket_size"):
        zero.setdefault(key, BUCKET_ELEMENTS)
    out.setdefault("steps_per_print", 2**31 - 1)  # no per-step logging from the engine
    return out


def _same(a: Any, b: Any) -> bool:
    return isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool) and float(a) == float(b)


def model_dtype(settings: Settings) -> str:
    return _precision_sections(settings)[1]
