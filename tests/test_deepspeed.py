"""The DeepSpeed backend on one process, no engine: the config generated from the
transforms, its refusals, the strategy's validation, routing, the stage="auto" estimate.

The engine itself (2 processes, stages 1-3, checkpoints): tests/test_deepspeed_dist.py.
"""

from __future__ import annotations

import json

import pytest

import deepspeed_support as sup
import xform as xf
from xform.backends.deepspeed.config import generate_config, settings_of
from xform.backends.deepspeed.layout import estimate_stage_memory
from xform.cli._config import LaunchConfig


def cfg(step, strategy=None, max_grad_norm=None):
    return generate_config(strategy or xf.DeepSpeed(stage=2), settings_of(step.xform if hasattr(step, "xform") else xf.core.transform.Transforms()), max_grad_norm=max_grad_norm)


def test_config_is_generated_from_the_transforms():
    """Catches a transform's setting lost on the way to the engine (accumulation steps,
    precision, clipping, stage, offload)."""
    c = cfg(xf.accumulate(xf.mixed_precision(sup.step, "bf16"), 4), xf.DeepSpeed(stage=3, offload_optimizer="cpu", offload_params="cpu"), 0.5)
    assert c["gradient_accumulation_steps"] == 4
    assert c["bf16"] == {"enabled": True} and c["fp16"] == {"enabled": False}
    assert c["gradient_clipping"] == 0.5
    buckets = {"reduce_bucket_size": 25 * 2**20 // 4, "allgather_bucket_size": 25 * 2**20 // 4}
    assert c["zero_optimization"] == {"stage": 3, "offload_optimizer": {"device": "cpu"}, "offload_param": {"device": "cpu"}, **buckets}
    plain = cfg(sup.step, xf.DeepSpeed(stage=1))
    assert plain["gradient_accumulation_steps"] == 1 and plain["gradient_clipping"] == 0.0
    assert plain["bf16"] == {"enabled": False} and plain["fp16"] == {"enabled": False}
    assert plain["zero_optimization"] == {"stage": 1, **buckets}
    # accumulate nested twice: the product; mixed_precision outside accumulate means the same
    assert cfg(xf.mixed_precision(xf.accumulate(xf.accumulate(sup.step, 2), 3), "bf16"))["gradient_accumulation_steps"] == 6


def test_fp16_config_carries_the_loss_scale_settings():
    """Catches the dynamic loss scale's settings (initial power, growth interval, minimum)
    dropped or changed; DeepSpeed's hysteresis must be 1 to halve at every overflow."""
    c = cfg(xf.mixed_precision(sup.step, "fp16", loss_scale=xf.DynamicLossScale(initial_scale=2.0**12, growth_interval=100, min_scale=2.0)))
    assert c["fp16"] == {
        "enabled": True, "loss_scale": 0, "initial_scale_power": 12, "loss_scale_window": 100, "min_loss_scale": 2.0,
        "hysteresis": 1,
    }
    assert c["bf16"] == {"enabled": False}
    static = cfg(xf.mixed_precision(sup.step, "fp16", loss_scale=xf.StaticLossScale(1024.0)))
    assert static["fp16"] == {"enabled": True, "loss_scale": 1024.0}
    with pytest.raises(ValueError, match="grows and shrinks by 2.*factor=3"):
        cfg(xf.mixed_precision(sup.step, "fp16", loss_scale=xf.DynamicLossScale(factor=3.0)))


@pytest.mark.parametrize(
    "user, step, message",
    [
        ({"gradient_accumulation_steps": 8}, lambda: xf.accumulate(sup.step, 4),
         "key 'gradient_accumulation_steps' is 8 in the user config but accumulate(4) sets it to 4"),
        ({"fp16": {"enabled": True}}, lambda: xf.mixed_precision(sup.step, "bf16"),
         "key 'fp16.enabled' is True in the user config but mixed_precision('params=float32,compute=bfloat16,output=float32') sets it to False"),
        ({"bf16": {"enabled": True}}, lambda: sup.step, "key 'bf16.enabled' is True in the user config but no mixed_precision (float32) sets it to False"),
        ({"gradient_clipping": 2.0}, lambda: sup.step, "key 'gradient_clipping' is 2.0 in the user config but TrainState.create(max_grad_norm=None) sets it to 0.0"),
        ({"zero_optimization": {"stage": 3}}, lambda: sup.step, "key 'zero_optimization.stage' is 3 in the user config but xf.DeepSpeed(stage=2) sets it to 2"),
        ({"optimizer": {"type": "Adam"}}, lambda: sup.step, "key 'optimizer' cannot be set under xform"),
    ],
)
def test_a_user_key_that_contradicts_the_transforms_is_refused_naming_it(user, step, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)").replace(".", r"\.")):
        cfg(step(), xf.DeepSpeed(stage=2, config=user))


def test_user_keys_that_agree_or_add_are_kept(tmp_path):
    user = {"gradient_accumulation_steps": 4, "zero_optimization": {"stage": 2, "overlap_comm": True}, "wall_clock_breakdown": False}
    c = cfg(xf.accumulate(sup.step, 4), xf.DeepSpeed(stage=2, config=user))
    assert c["zero_optimization"]["overlap_comm"] is True and c["wall_clock_breakdown"] is False
    assert user["zero_optimization"] == {"stage": 2, "overlap_comm": True}  # the user's dict is not changed
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"gradient_accumulation_steps": 3}))
    with pytest.raises(ValueError, match="'gradient_accumulation_steps' is 3"):
        cfg(xf.accumulate(sup.step, 4), xf.DeepSpeed(config=str(path)))
    path.write_text("{not json")
    with pytest.raises(ValueError, match="is not valid JSON"):
        cfg(sup.step, xf.DeepSpeed(config=path))


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        (dict(stage=4), ValueError, "stage must be 1, 2, 3 or 'auto', got 4"),
        (dict(stage=True), ValueError, "stage must be 1, 2, 3 or 'auto'"),
        (dict(offload_optimizer="nvme"), ValueError, "offload_optimizer='nvme' is not supported"),
        (dict(offload_optimizer="gpu"), ValueError, "offload_optimizer must be None or 'cpu', got 'gpu'"),
        (dict(stage=2, offload_params="cpu"), ValueError, "offload_params needs stage 3"),
        (dict(config=3), TypeError, "config must be None, a dict or a path"),
        (dict(stage=2, memory_budget=10**9), ValueError, "memory_budget only chooses the stage under stage='auto'"),
        (dict(stage="auto", memory_budget=-1), ValueError, "memory_budget must be a positive number of bytes"),
    ],
)
def test_bad_strategy_settings_are_refused(kwargs, error, message):
    with pytest.raises(error, match=message.replace("(", r"\(").replace(")", r"\)")):
        xf.DeepSpeed(**kwargs)


def test_wrap_time_routing_and_refusals():
    """A DeepSpeed strategy object picks the deepspeed backend; backend='deepspeed' maps
    zero1/2/3 to DeepSpeed stages and refuses the rest; transforms the engine cannot take
    over and policies it cannot run are refused before any process group exists."""
    from xform.backends.deepspeed import DeepSpeedLayout

    layouts = []
    real = DeepSpeedLayout.__init__

    def spy(self, strategy, inner):
        real(self, strategy, inner)
        layouts.append(self.strategy)

    DeepSpeedLayout.__init__ = spy
    try:
        xf.shard(sup.step, xf.DeepSpeed(stage=1))
        xf.shard(sup.step, "zero2", backend="deepspeed")
        xf.shard(sup.step, "zero3", backend="deepspeed")
        xf.configure(sup.step, LaunchConfig(backend="deepspeed", strategy="zero1", accumulation_steps=2))
    finally:
        DeepSpeedLayout.__init__ = real
    assert [s.stage for s in layouts] == [1, 2, 3, 1]
    with pytest.raises(ValueError, match="the deepspeed backend runs ZeRO stages only"):
        xf.shard(sup.step, "replicate", backend="deepspeed")
    with pytest.raises(TypeError, match="the torch backend has no strategy"):
        xf.shard(sup.step, xf.DeepSpeed(stage=1), backend="torch")
    with pytest.raises(ValueError, match="keeps float32 master weights"):
        xf.shard(xf.mixed_precision(sup.step, "params=bfloat16"), xf.DeepSpeed())

    def custom(step):
        from xform.core.transform import wrap

        return wrap(step, step, lambda s: s, name="custom")

    with pytest.raises(ValueError, match=r"takes over accumulate and mixed_precision only; the step is also wrapped in \['custom'\]"):
        xf.shard(custom(sup.step), xf.DeepSpeed())
    with pytest.raises(RuntimeError, match="needs a process group"):
        xf.shard(sup.step, xf.DeepSpeed()).init(sup.fresh("sgd"))


def test_stage_memory_estimate_falls_with_the_stage_and_offload():
    """Catches a stage that shards nothing more than the one below it in the estimate
    stage='auto' chooses from."""
    kw = dict(low_precision=True)
    s1, s2, s3 = (estimate_stage_memory(10**6, 8, 4, s, **kw) for s in (1, 2, 3))
    assert s1 == 2 * 10**6 + 2 * 10**6 + 12 * 10**6 // 4
    assert s2 == 2 * 10**6 + (2 * 10**6 + 12 * 10**6) // 4
    assert s3 == (2 + 2 + 12) * 10**6 // 4
    assert estimate_stage_memory(10**6, 8, 4, 3, offload_optimizer="cpu", **kw) == (2 + 2) * 10**6 // 4
    assert estimate_stage_memory(10**6, 8, 4, 3, offload_optimizer="cpu", offload_params="cpu", **kw) == 2 * 10**6 // 4
    assert estimate_stage_memory(10**6, 8, 1, 1, low_precision=False) == (4 + 4 + 12) * 10**6


def test_docstring_examples_of_the_backend_run():
    """tests/test_doctests.py walks ``xform``'s own directory, not ``backends/``: run this
    backend's examples here."""
    import doctest
    import importlib

    ran = 0
    for name in ("xform.backends.deepspeed.config", "xform.backends.deepspeed.layout"):
        module = importlib.import_module(name)
        result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
        assert result.failed == 0, name
        ran += result.attempted
    assert ran >= 3


def test_estimate_memory_shows_the_deepspeed_stages(capsys):
    """`xform estimate-memory --backend deepspeed`: the engine's per-process model states
    per stage, the same figures stage='auto' chooses from (147 params, Adam, fp32, 2
    ranks: 2058, 1764, 1470 bytes)."""
    from xform.cli import main

    assert main(["estimate-memory", "tests/deepspeed_support.py:model", "--world-sizes", "2", "--precisions", "fp32",
                 "--strategies", "zero1", "--backend", "deepspeed"]) == 0  # fmt: skip
    out = capsys.readouterr().out
    assert "fp32    2 ranks: zero1 2.01 KiB, zero2 1.72 KiB, zero3 1.44 KiB, zero3+offload_opt 588 B" in out, out
