"""Pipeline parallelism (``xf.Pipeline``): the pipelined step equals the single-process
step on the global batch, for each schedule, alone (pp=2) and with data parallelism
(pp=2 x dp=2), on real gloo processes; its checkpoints load into one process and into
another pipeline size. One process pool per world size."""

from __future__ import annotations

import pytest
import torch

import pipeline_support as sup
import xform as xf
from xform.distributed.procs import ProcessPool

SCHEDULES = ["gpipe", "1f1b", "interleaved_1f1b"]
RTOL, ATOL = 1e-5, 1e-6


@pytest.fixture(scope="module")
def pool2():
    with ProcessPool(2, timeout_s=300) as pool:
        yield pool


@pytest.fixture(scope="module")
def pool4():
    with ProcessPool(4, timeout_s=300) as pool:
        yield pool


def _merged(results) -> dict[str, torch.Tensor]:
    """The params of all processes (each holds its stages'; replicas must agree)."""
    full: dict[str, torch.Tensor] = {}
    for params, _, _ in results:
        for k, v in params.items():
            if k in full:
                torch.testing.assert_close(v, full[k], rtol=0, atol=0, msg=f"replicas of {k} differ")
            full[k] = v
    return full


def _check(results, loss: str, opt: str, **ref_kwargs) -> None:
    ref, ref_losses = sup.reference(loss, opt, **ref_kwargs)
    full = _merged(results)
    assert sorted(full) == sorted(ref), "the stages together must hold every parameter once"
    for k in ref:
        torch.testing.assert_close(full[k], ref[k], rtol=RTOL, atol=ATOL, msg=f"{k} after {opt}/{loss}")
    for params, losses, _ in results:  # every process reports the loss of its batch
        assert params, "every process holds a stage"
        if ref_kwargs.get("accumulate", 1) == 1 and len(results) == 2:  # pp alone: the global batch
            torch.testing.assert_close(torch.tensor(losses), torch.tensor(ref_losses), rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_pp2_equals_the_single_process_step(pool2, schedule):
    """pp=2, three steps of AdamW and of SGD (plain mean loss), and of SGD (an xf.Mean loss
    whose count differs between micro-batches) equal one process on the global batch, and
    the loss comes back on both processes. Catches: a missing 1/M micro-batch scale of a
    plain mean loss (SGD shows it, AdamW would hide it), a count not summed over micro-batches or not
    broadcast from the last stage, a wrong stage order or split, a gradient left in
    ``.grad`` across steps, the loss of the first step polluted by the schedule's shape
    inference."""
    _check(pool2.run(sup.pipelined, schedule, "plain", "adamw"), "plain", "adamw")
    _check(pool2.run(sup.pipelined, schedule, "plain", "sgd"), "plain", "sgd")
    _check(pool2.run(sup.pipelined, schedule, "mean", "sgd", microbatches=4), "mean", "sgd")


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_pp2_x_dp2_equals_the_single_process_step(pool4, schedule):
    """pp=2 x dp=2 on 4 processes (each dp replica gets half of the global batch), the
    stages replicated over dp and fully sharded over dp (FSDP2). Catches: a stage's
    gradients not all-reduced over dp (replicas drift apart, which ``_merged`` checks
    exactly), the mean over dp missing (a gradient twice too large under SGD), the
    xf.Mean count not summed over dp, the dp and pp groups swapped, FSDP's
    reduce-scatter averaging instead of summing, or summed twice (all-reduced again)."""
    for mode in ("replicate", "fsdp"):
        _check(pool4.run(sup.pipelined, schedule, "plain", "sgd", dp=2, dp_mode=mode), "plain", "sgd")
        _check(pool4.run(sup.pipelined, schedule, "mean", "adamw", dp=2, dp_mode=mode), "mean", "adamw")


PLANS = {
    "inside": {"0": "colwise", "2": "rowwise", "4": "colwise", "6": "rowwise"},  # each pair in one stage
    "across": {"2": "colwise", "4": "rowwise"},  # a sharded activation crosses the stage boundary
}


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_pp2_x_tp2_equals_the_single_process_step(pool4, schedule):
    """pp=2 x tp=2 on 4 processes: Megatron pairs (colwise then rowwise) inside each
    stage, and a pair split by the stage boundary (stage 0 sends its tp shard of the
    activation to its tp peer of stage 1). Catches: a stage's tp group taken from the
    wrong mesh axis, the replicated params' grads summed over tp (twice too large under
    SGD), a sharded param saved or gathered at the wrong rows."""
    _check(pool4.run(sup.pipelined, schedule, "plain", "sgd", tp=2, tp_plan=PLANS["inside"]), "plain", "sgd")
    _check(pool4.run(sup.pipelined, schedule, "mean", "adamw", tp=2, tp_plan=PLANS["across"]), "mean", "adamw")


def test_accumulate_around_a_pipeline_is_k_times_m_micro_batches(pool2):
    """``accumulate(shard(step, Pipeline(microbatches=2)), 2)``: 4 micro-batches per
    update, equal to the plain step on the global batch. Catches: a pipeline round's
    plain-mean scale ignoring accumulate's pieces (gradient twice too large), the
    rounds' counts not summing to one batch (a wrong xf.Mean normalization)."""
    _check(pool2.run(sup.pipelined, "1f1b", "plain", "sgd", accumulate=2), "plain", "sgd")
    _check(pool2.run(sup.pipelined, "gpipe", "mean", "sgd", accumulate=2), "mean", "sgd")


def test_split_by_name_and_by_cost(pool2):
    """``split=("6",)`` puts only the last Linear on stage 1; the default split balances
    parameter bytes. Catches: a split point off by one child, stages built in the wrong
    order (the equivalence fails), params kept on a process that does not run them."""
    results = pool2.run(sup.pipelined, "gpipe", "plain", "sgd", split=("6",))
    assert sorted(results[1][0]) == ["6.bias", "6.weight"]
    _check(results, "plain", "sgd")
    m = sup.model()
    from xform.backends.torch_native.pipeline import plan_stages

    # Linear bytes: 0: 192, 2: 288, 4: 288, 6: 108 (the Tanh's hold none); the largest
    # stage is as small as it can be: 480 of 876 for 2 stages, 288 for 4.
    assert plan_stages(m, 2, None) == [["0", "1", "2"], ["3", "4", "5", "6"]]
    assert plan_stages(m, 4, None) == [["0"], ["1", "2"], ["3", "4"], ["5", "6"]]
    assert plan_stages(m, 3, ("2", "6")) == [["0", "1"], ["2", "3", "4", "5"], ["6"]]
    with pytest.raises(ValueError, match="not children of the model"):
        plan_stages(m, 2, ("7",))


def test_each_process_holds_only_its_stages(pool2):
    """After init, the module's other stages are meta tensors on each process (interleaved:
    stages 0, 2 on process 0 and 1, 3 on process 1). Catches: every process keeping the
    whole model's values (no memory saved), a stage assigned to the wrong process."""
    zero, one = pool2.run(sup.resident, "interleaved_1f1b")
    assert zero == ["0.bias", "0.weight", "4.bias", "4.weight"], zero
    assert one == ["2.bias", "2.weight", "6.bias", "6.weight"], one


def test_dropout_in_the_stages_is_a_function_of_the_state(pool2):
    """The stages draw dropout from the state's key and data position: the same step
    from copies of one state gives the same params and loss. Catches: the stages drawing
    from torch's global generator (the step no longer a function of (state, batch))."""
    assert pool2.run(sup.dropout_twice) == [True, True]


def test_the_backend_module_examples_run():
    """plan_stages's docstring examples (tests/test_doctests.py walks xform/ only)."""
    import doctest

    from xform.backends.torch_native import pipeline

    result = doctest.testmod(pipeline)
    assert result.attempted >= 4 and result.failed == 0, result


def test_checkpoint_loads_into_one_process_and_another_pipeline(pool2, pool4, tmp_path):
    """A pp=2 state saved after 2 AdamW steps loads (params, optimizer state, step) into
    one process and into pp=4 (gpipe, 4 processes) and into pp=2 x dp=2; one more step
    from each equals 3 uninterrupted single-process steps. Catches: a checkpoint holding
    only rank 0's stages, optimizer state lost on load, the union of leaves misordered."""
    path = str(tmp_path / "ckpt")
    saved = pool2.run(sup.pipelined, "1f1b", "plain", "adamw", steps=2, save=path)
    assert {s for _, _, s in saved} == {2}
    ref3, _ = sup.reference("plain", "adamw", steps=3)
    one, _ = sup.reference("plain", "adamw", steps=3, load=path, start=2)
    for k in ref3:
        torch.testing.assert_close(one[k], ref3[k], rtol=RTOL, atol=ATOL)
    for kwargs in ({"stages": 4}, {"dp": 2}, {"dp": 2, "dp_mode": "fsdp"}):
        results = pool4.run(sup.pipelined, "gpipe", "plain", "adamw", steps=3, load=path, start=2, **kwargs)
        assert {s for _, _, s in results} == {3}
        full = _merged(results)
        for k in ref3:
            torch.testing.assert_close(full[k], ref3[k], rtol=RTOL, atol=ATOL, msg=f"{k} after load into {kwargs}")


def test_a_single_process_checkpoint_loads_into_a_pipeline(pool2, tmp_path):
    """A one-process checkpoint (tensors.pt) loads into pp=2 (each process takes its
    stages); one more step equals the uninterrupted run. Catches: a pipelined ``like``
    refused as another model, the other stages' tensors loaded into the wrong slots."""
    path = str(tmp_path / "single")
    sup.save_single(path)
    ref3, _ = sup.reference("plain", "adamw", steps=3)
    full = _merged(pool2.run(sup.pipelined, "gpipe", "plain", "adamw", steps=3, load=path, start=2))
    for k in ref3:
        torch.testing.assert_close(full[k], ref3[k], rtol=RTOL, atol=ATOL, msg=f"{k} after 1 -> pp=2")


@pytest.mark.parametrize("layout", ["fsdp", "tp"])
def test_checkpoint_of_pp_x_fsdp_or_tp_loads_into_one_process_and_pp_alone(pool2, pool4, tmp_path, layout):
    """A pp=2 x dp=2 (fsdp) or pp=2 x tp=2 state, its params and AdamW state sharded
    DTensors, saved after 2 steps loads into one process and into pp=2 alone; one more
    step equals the uninterrupted run. Catches: the union of leaves losing the
    DTensors' global shapes, a shard written twice or not at all."""
    path = str(tmp_path / "ckpt")
    how = {"dp": 2, "dp_mode": "fsdp"} if layout == "fsdp" else {"tp": 2, "tp_plan": PLANS["across"]}
    pool4.run(sup.pipelined, "1f1b", "plain", "adamw", steps=2, save=path, **how)
    ref3, _ = sup.reference("plain", "adamw", steps=3)
    one, _ = sup.reference("plain", "adamw", steps=3, load=path, start=2)
    full = _merged(pool2.run(sup.pipelined, "interleaved_1f1b", "plain", "adamw", steps=3, load=path, start=2))
    for k in ref3:
        torch.testing.assert_close(one[k], ref3[k], rtol=RTOL, atol=ATOL, msg=f"{k} after load into 1 process")
        torch.testing.assert_close(full[k], ref3[k], rtol=RTOL, atol=ATOL, msg=f"{k} after load into pp=2")


@pytest.mark.parametrize(
    "case, message",
    [
        ("not_sequential", "must be a torch.nn.Sequential"),
        ("two_applies", "called xf.apply more than once"),
        ("no_apply", "did not call xf.apply"),
        ("interleaved_one_stage", "use stages=4"),
        ("indivisible_batch", "batch has 6 rows, which microbatches=4 does not divide; pass a batch of 8 rows"),
    ],
)
def test_misuse_is_refused_with_a_clear_error(pool2, case, message):
    for text in pool2.run(sup.error_of, case):
        assert message in text, text


def test_an_unused_mesh_axis_is_refused(pool4):
    for text in pool4.run(sup.error_of, "tp_axis"):
        assert "the mesh axes {'tp': 2} are not used" in text and "tensor_parallel=xf.TensorParallel" in text, text


def test_wrap_time_errors():
    with pytest.raises(ValueError, match="schedule must be one of"):
        xf.Pipeline(schedule="zb")
    with pytest.raises(ValueError, match="microbatches must be an int >= 1"):
        xf.Pipeline(microbatches=0)
    with pytest.raises(ValueError, match="cuts 2 stages but stages=3"):
        xf.Pipeline(split=("2",), stages=3)
    with pytest.raises(ValueError, match="data_parallel must be None, 'replicate' or 'fsdp'"):
        xf.Pipeline(data_parallel="zero2")
    with pytest.raises(ValueError, match=r"pp x dp x tp|composes with the pipeline alone"):
        xf.Pipeline(data_parallel="fsdp", tensor_parallel=xf.TensorParallel(plan={"0": "colwise"}))
    with pytest.raises(TypeError, match="tensor_parallel must be an xf.TensorParallel"):
        xf.Pipeline(tensor_parallel={"0": "colwise"})
    with pytest.raises(ValueError, match="accumulate inside a pipelined shard"):
        xf.shard(xf.accumulate(sup.step, 2), xf.Pipeline())


def test_without_a_process_group_it_is_the_plain_step():
    """One process, no group: the pipelined step is the plain step (the same params)."""
    s = xf.shard(sup.step, xf.Pipeline(schedule="gpipe"))
    state = s.init(xf.TrainState.create(sup.model(), optimizer=sup.OPTIMIZERS["sgd"]))
    for b in sup.data(2):
        state, _ = s(state, b)
    ref, _ = sup.reference("plain", "sgd", steps=2)
    for k in ref:
        torch.testing.assert_close(state.params[k], ref[k], rtol=0, atol=0)
