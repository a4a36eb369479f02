"""The DeepSpeed backend on 2 gloo processes (DeepSpeed's CPU accelerator): stages 1-3
equal the single-process native step on the global batch, checkpoints resume exactly
and load on one process without the engine, stage="auto", refusals.

All checks share one pool: DeepSpeed's start (import, its shared-memory op, built once
per machine into ~/.cache/torch_extensions) is paid once.
"""

from __future__ import annotations

import pytest
import torch

import deepspeed_support as sup
from xform.distributed.procs import ProcessPool


@pytest.fixture(scope="module")
def pool2():
    with ProcessPool(2, timeout_s=600) as pool:
        yield pool


def _relative_error(got: dict, want: dict) -> float:
    return max(float((got[k] - want[k]).abs().max() / want[k].abs().max()) for k in want)


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_fp32_equals_the_single_process_step_with_and_without_accumulate(pool2, stage):
    """fp32, SGD with momentum (a wrong gradient scale shows in the params): catches
    gradients summed instead of averaged over processes, accumulation steps not given to
    the engine (it would step every micro-batch) or the loss not divided by them, a lost
    micro-batch, and a step or data position that does not advance at the boundary."""
    for acc in (1, 2):
        want, _ = sup.reference(acc, "fp32", "sgd")
        for full, step, losses in pool2.run(sup.ds_run, stage, acc, "fp32", "sgd"):
            assert step == 4
            for k in want:
                torch.testing.assert_close(full[k], want[k], rtol=1e-5, atol=1e-6)


def test_adamw_with_clipping_and_a_global_mean_loss(pool2):
    """AdamW under clipping (max_grad_norm -> gradient_clipping; the clipped reference
    differs from the unclipped one, so a dropped clip fails), a learning-rate schedule
    (lost: the constant first lr), and an xf.Mean loss normalized by the global item count
    (not per process)."""
    clipped, _ = sup.reference(2, "fp32", "adamw", clip=0.05)
    unclipped, _ = sup.reference(2, "fp32", "adamw")
    assert _relative_error(clipped, unclipped) > 1e-3
    for full, step, _ in pool2.run(sup.ds_run, 3, 2, "fp32", "adamw", clip=0.05):
        for k in clipped:
            torch.testing.assert_close(full[k], clipped[k], rtol=1e-5, atol=1e-6)
    scheduled, _ = sup.reference(2, "fp32", "sgd-schedule")  # lr = schedule(step), set at each boundary
    for full, step, _ in pool2.run(sup.ds_run, 2, 2, "fp32", "sgd-schedule"):
        for k in scheduled:
            torch.testing.assert_close(full[k], scheduled[k], rtol=1e-5, atol=1e-6)
    want, _ = sup.reference(1, "fp32", "sgd", loss="sum_step")
    for stage in (1, 3):
        for full, step, _ in pool2.run(sup.ds_run, stage, 1, "fp32", "sgd", loss="sum_step"):
            for k in want:
                torch.testing.assert_close(full[k], want[k], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_bf16_is_within_the_measured_bound(pool2, stage):
    """bf16 (DeepSpeed: bf16 weights, fp32 master) against the native bf16 step (fp32
    weights under autocast), AdamW, accumulate(2), 4 steps: measured max relative error
    2.4e-3 (stages 1-3); bound 1e-2. Catches bf16 not enabled (the error would be ~1e-7)
    and a wrong scale (errors of order 1)."""
    want, _ = sup.reference(2, "bf16", "adamw")
    for full, step, _ in pool2.run(sup.ds_run, stage, 2, "bf16", "adamw"):
        assert step == 4
        error = _relative_error(full, want)
        assert 1e-5 < error < 1e-2, error


@pytest.mark.parametrize("stage, acc, precision, opt", [(2, 2, "bf16", "adamw"), (3, 1, "fp32", "adamw")])
def test_checkpoint_resumes_exactly_and_loads_on_one_process(pool2, tmp_path, stage, acc, precision, opt):
    """save -> load -> continue equals the uninterrupted run bit for bit (params as the
    engine holds them, fp32 masters, optimizer state, step, data position); the same
    checkpoint loads on one process without DeepSpeed (consolidated fp32 params and
    optimizer state) and continues like the single-process run. Catches a lost optimizer
    state or master copy (not bit-exact), a partition restored on the wrong process, and
    a consolidation that drops the optimizer state (the 1-process run would diverge)."""
    path = str(tmp_path / "ckpt")
    whole = pool2.run(sup.ds_phase, stage, acc, precision, opt, None, 0, 4)
    first = pool2.run(sup.ds_phase, stage, acc, precision, opt, path, 0, 2)
    second = pool2.run(sup.ds_phase, stage, acc, precision, opt, None, 2, 4, path)
    for (full_w, step_w, leaves_w, data_w), (full_s, step_s, leaves_s, data_s) in zip(whole, second):
        assert (step_s, data_s) == (step_w, data_w) == (4, {"seed": 0, "consumed": 4})
        for k in full_w:
            assert torch.equal(full_s[k], full_w[k]), k
        if stage < 3:  # whole tensors (ZeRO-3 leaves are padded partitions: compared whole above)
            for k in leaves_w:
                assert torch.equal(leaves_s[k], leaves_w[k]), k
    loaded, end, step = sup.plain_phase(acc, precision, opt, path, 2, 4)
    for k, v in first[0][0].items():
        assert torch.equal(loaded[k], v), k
    want, _ = sup.reference(acc, precision, opt)
    assert step == 4
    assert _relative_error(end, want) < (1e-5 if precision == "fp32" else 1e-2)


def test_refusals(pool2, tmp_path):
    """A checkpoint of another stage or model is refused naming what differs; fp16 is
    refused on the CPU accelerator with the fix."""
    path = str(tmp_path / "ckpt")
    pool2.run(sup.ds_phase, 2, 1, "fp32", "sgd", path, 0, 1)
    for text in pool2.run(sup.error_of, "ds_phase", 3, 1, "fp32", "sgd", None, 0, 1, path):
        assert "differs from `like` at deepspeed/layout.json:stage: checkpoint 2, like 3" in text, text
    for text in pool2.run(sup.error_of, "other_model_load", path):
        assert "CheckpointError" in text and "differs from `like` at params['0.bias']" in text, text
    for text in pool2.run(sup.error_of, "fp16_on_cpu"):
        assert "DeepSpeed does not run float16 on this device" in text and "'bf16'" in text, text


def test_auto_stage_picks_the_smallest_that_fits(pool2):
    """The model: 147 params, AdamW (8 bytes of state a param), fp32, 2 processes: the
    estimates are 2058 (stage 1), 1764 (2) and 1470 (3) bytes per process."""
    assert pool2.run(sup.auto_stage, 10**9) == [1, 1]
    assert pool2.run(sup.auto_stage, 1800) == [2, 2]
    assert pool2.run(sup.auto_stage, 1500) == [3, 3]
    for text in pool2.run(sup.error_of, "auto_stage", 100):
        assert "no stage fits the budget" in text and "stage 1: 0.00 MiB" in text, text


@pytest.mark.parametrize("native, stage", [("zero3", 3), (None, 2)])
def test_a_native_checkpoint_loads_into_deepspeed(pool2, tmp_path, native, stage):
    """A checkpoint of the native zero3 (2 processes) or of one plain process, loaded
    into a DeepSpeed state and trained on, equals the uninterrupted single-process run
    (AdamW, accumulate(2)): catches params or optimizer state laid into the wrong
    partition (ZeRO-3's last partition is padded), a lost optimizer state, a step counter
    not carried over."""
    path = str(tmp_path / "native")
    if native is None:
        sup.native_phase(None, path, 0, 2)
    else:
        pool2.run(sup.native_phase, native, path, 0, 2)
    want, _ = sup.reference(2, "fp32", "adamw")
    for full, step, _, data in pool2.run(sup.ds_phase, stage, 2, "fp32", "adamw", None, 2, 4, path):
        assert (step, data) == (4, {"seed": 0, "consumed": 4})
        for k in want:
            torch.testing.assert_close(full[k], want[k], rtol=1e-5, atol=1e-6)
