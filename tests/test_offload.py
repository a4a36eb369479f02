"""offload: bit-exact equivalence with the plain step, composition, checkpoints, resident
memory, refusals.

Bit-exact (``torch.equal``) throughout: on a CPU device in float32 the offloaded update is
the same torch.optim code on views of the same values, so any difference is a bug.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import _util as u
import offload_support as sup
import xform as xf
from xform.distributed.procs import ProcessPool
from xform.transforms import offload as off

TINY = 5e-4  # MiB: ~0.5 KB chunks, so the weights are split into row blocks across chunks
SIZES = (4, 64, 3)

OPTIMIZERS = {
    # SGD: a wrong gradient scale or a lost momentum shows at once; dampening makes the
    # first step's lazy init (buf = grad, not (1 - d) * grad) matter.
    "sgd-momentum": dict(optimizer=torch.optim.SGD, lr=0.1, momentum=0.9, dampening=0.1),
    # AdamW with clipping and a schedule: the global norm, the per-block step counters,
    # the learning rate reaching every chunk's optimizer.
    "adamw-clip": dict(optimizer=torch.optim.AdamW, lr=lambda s: 1e-2 / (1 + s), max_grad_norm=0.05, weight_decay=0.1),
}
PLACES = {
    "optimizer-disk": dict(optimizer="disk"),
    "optimizer-cpu": dict(optimizer="cpu"),
    "params-disk": dict(params="disk"),
    "params-cpu": dict(params="cpu"),
    "both-disk": dict(params="disk", optimizer="disk"),
}


def train(step_fn, opt: dict, steps: int = 4, seeds=(0, 1)):
    state = u.init(step_fn, xf.TrainState.create(u.mlp(seeds[0], SIZES), **{**opt}))
    for i in range(steps):
        state, metrics = step_fn(state, u.batch(seed=seeds[1] + i))
    return state


def params_of(state) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in state.params.items()}


def assert_equal(got: dict, want: dict) -> None:
    assert got.keys() == want.keys()
    for k in want:
        assert torch.equal(got[k], want[k]), (k, (got[k] - want[k]).abs().max())


@pytest.mark.parametrize("opt", list(OPTIMIZERS))
@pytest.mark.parametrize("place", list(PLACES))
def test_offloaded_step_equals_the_plain_step_bit_for_bit(tmp_path, opt, place):
    """Catches: a chunk or row block skipped or stepped twice, a block's step counter out
    of sync (Adam's bias correction), the clip or the schedule not reaching a chunk, the
    first update's lazy state init differing (SGD dampening), state left in memory."""
    for seeds in ((0, 1), (5, 9)):
        want = params_of(train(u.step, OPTIMIZERS[opt], seeds=seeds))
        step = xf.offload(u.step, dir=tmp_path, chunk_mb=TINY, **PLACES[place])
        state = train(step, OPTIMIZERS[opt], seeds=seeds)
        assert_equal(params_of(state), want)
        assert state.step == 4
        disk_opt = PLACES[place].get("optimizer") == "disk"
        disk_params = PLACES[place].get("params") == "disk"
        for entry in state.opt_state["state"].values():
            for v in entry.values():
                if v.dim() > 0:
                    assert off._on_disk(v) == disk_opt
        assert all(off._on_disk(p) == disk_params for p in state.params.values())
        if disk_opt:
            streamed = state._runtime("t").extras[off._KEY]
            assert len(streamed.split) >= 4 and len(streamed.chunks) > len(state.params)


@pytest.mark.parametrize("foreach", [False, True])
def test_row_blocks_match_with_foreach_and_for_loop_kernels(tmp_path, foreach):
    """Catches: an update whose bits depend on how a parameter is cut (foreach vs the
    for-loop kernel; SIMD body vs tail at odd block boundaries): blocks of 1, 3 and 7 rows."""
    opt = dict(optimizer=torch.optim.AdamW, lr=1e-2, foreach=foreach, amsgrad=True)
    want = params_of(train(u.step, opt))
    for chunk in (0.0005, 0.0015, 0.0035):
        got = train(xf.offload(u.step, optimizer="disk", dir=tmp_path, chunk_mb=chunk), opt)
        assert_equal(params_of(got), want)


def test_the_host_update_of_a_device_state_runs_on_cpu(tmp_path, monkeypatch):
    """The CUDA path of optimizer='cpu' (staging buffers, host masters, copies back),
    run on the CPU as if the params were on a device: catches a gradient not staged, a
    master not copied back, state not adopted by the host optimizer, a lost schedule.
    (Pinned memory and asynchronous copies themselves need a GPU: not run here.)"""
    monkeypatch.setattr(off, "_off_host", lambda device: True)
    for opt in OPTIMIZERS.values():
        want = params_of(train(u.step, opt))
        state = train(xf.offload(u.step, optimizer="cpu"), opt)
        assert_equal(params_of(state), want)
        assert isinstance(state._runtime("t").extras[off._KEY], off._OnHost)


def test_composes_with_accumulate_and_mixed_precision_in_any_order(tmp_path):
    """Catches: the update run per micro-batch, or the loss-scale/autocast handlers
    bypassed by offload's update. bf16 on CPU stays bit-exact: the autocast forward and
    the fp32 update are the same code (on a GPU the host update of optimizer='cpu' would
    differ from the device update by float32 rounding only)."""
    opt = OPTIMIZERS["adamw-clip"]
    kw = dict(optimizer="disk", params="disk", dir=tmp_path, chunk_mb=TINY)
    want = params_of(train(xf.accumulate(u.step, 2), opt))
    assert_equal(params_of(train(xf.offload(xf.accumulate(u.step, 2), **kw), opt)), want)
    assert_equal(params_of(train(xf.accumulate(xf.offload(u.step, **kw), 2), opt)), want)
    want = params_of(train(xf.mixed_precision(xf.accumulate(u.step, 2), "bf16"), opt))
    assert_equal(params_of(train(xf.offload(xf.mixed_precision(xf.accumulate(u.step, 2), "bf16"), **kw), opt)), want)
    assert_equal(params_of(train(xf.mixed_precision(xf.offload(xf.accumulate(u.step, 2), **kw), "bf16"), opt)), want)
    # params stored in bf16: mixed_precision's init casts them after offload's; the first call moves them to disk
    policy = "params=bfloat16,compute=bfloat16"
    want = params_of(train(xf.mixed_precision(u.step, policy), OPTIMIZERS["sgd-momentum"]))
    state = train(xf.mixed_precision(xf.offload(u.step, **kw), policy), OPTIMIZERS["sgd-momentum"])
    assert_equal(params_of(state), want)
    assert all(p.dtype == torch.bfloat16 and off._on_disk(p) for p in state.params.values())


def test_checkpoints_are_ordinary_both_ways(tmp_path):
    """Catches: an offloaded state whose leaves do not save as tensors, a loaded state not
    moved back to disk (or trained from stale values), optimizer state lost on the way."""
    opt = OPTIMIZERS["adamw-clip"]
    plain = u.step
    offloaded = xf.offload(u.step, optimizer="disk", params="disk", dir=tmp_path / "d", chunk_mb=TINY)
    want = params_of(train(plain, opt, steps=4))
    for first, second in ((offloaded, plain), (plain, offloaded)):
        state = train(first, opt, steps=2)
        path = tmp_path / f"ckpt-{first is plain}"
        xf.save(state, path)
        like = u.init(second, xf.TrainState.create(u.mlp(0, SIZES), **opt))
        state = xf.load(path, like=like)
        for i in range(2, 4):
            state, _ = second(state, u.batch(seed=1 + i))
        assert_equal(params_of(state), want)
        if second is offloaded:
            assert all(off._on_disk(p) for p in state.params.values())


def test_replicate_on_two_processes_equals_it_without_offload(tmp_path):
    """Catches: offload breaking shard's gradient agreement or its update under
    replicate (both sides of the nesting run the same collectives)."""
    with ProcessPool(2, timeout_s=300) as pool:
        want = pool.run(sup.replicated, None)
        got = pool.run(sup.replicated, str(tmp_path))
    for g, w in zip(got, want):
        assert_equal(g, w)
    assert_equal(got[0], got[1])


def test_disk_optimizer_state_is_resident_one_chunk_at_a_time(tmp_path):
    """Catches: optimizer state left resident after its chunk (all of it in memory, as in
    the plain step), or params on disk left resident after the update. 8.4M params, AdamW: 64 MiB of optimizer state = 16 chunks of 4 MiB.
    The bound on peak resident growth during 3 steps: the gradients (32 MiB) + 4 chunks
    + 32 MiB; the plain step's growth holds the optimizer state (checked too, so the
    probe can fail)."""
    modes = ("plain", "optimizer", "both", "params")
    procs = [  # one process each (a peak is per process), run side by side
        subprocess.Popen(
            [sys.executable, str(Path(sup.__file__)), mode, str(tmp_path)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
        )
        for mode in modes
    ]
    results = []
    for p in procs:
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, err
        results.append(json.loads(out.splitlines()[-1]))
    plain, disk, both, params = results
    mib = 2**20
    assert disk["loss"] == plain["loss"] == both["loss"]
    assert plain["peak"] - plain["start"] >= plain["opt"], plain
    bound = disk["params"] + 4 * sup.CHUNK_MB * mib + 32 * mib
    for run in (disk, both):
        assert run["peak"] - run["start"] <= bound, (
            f"peak growth {(run['peak'] - run['start']) / mib:.0f} MiB > bound {bound / mib:.0f} MiB"
        )
    # params on disk: between steps they are not resident (the update drops their pages)
    held = lambda run: run["end"] - run["before"]  # noqa: E731
    assert held(both) <= held(disk) - both["params"] // 2, (held(both) / mib, held(disk) / mib)
    assert held(params) <= held(plain) - params["params"] // 2, (held(params) / mib, held(plain) / mib)


def test_bad_input_is_refused_with_the_fix(tmp_path):
    with pytest.raises(ValueError, match=r"offload: params must be None, 'cpu' or 'disk', got 'gpu'"):
        xf.offload(u.step, params="gpu")
    with pytest.raises(ValueError, match=r"offload: optimizer must be None, 'cpu' or 'disk', got 'nvme'"):
        xf.offload(u.step, optimizer="nvme")
    with pytest.raises(ValueError, match=r"offload: optimizer='disk' needs dir=\.\.\."):
        xf.offload(u.step, optimizer="disk")
    with pytest.raises(ValueError, match=r"offload: params='disk' needs dir=\.\.\."):
        xf.offload(u.step, params="disk")
    with pytest.raises(TypeError, match=r"offload: dir must be a path"):
        xf.offload(u.step, optimizer="disk", dir=3)
    with pytest.raises(ValueError, match=r"offload: chunk_mb must be > 0, got 0"):
        xf.offload(u.step, optimizer="disk", dir=tmp_path, chunk_mb=0)
    with pytest.raises(TypeError, match=r"offload: chunk_mb must be a number"):
        xf.offload(u.step, optimizer="disk", dir=tmp_path, chunk_mb="64")
    with pytest.raises(TypeError, match=r"offload: expected a step function"):
        xf.offload(None, optimizer="cpu")
    assert xf.offload(u.step) is u.step
    once = xf.offload(u.step, optimizer="cpu")
    with pytest.raises(ValueError, match=r"offload: this step is already wrapped in offload"):
        xf.offload(once, optimizer="disk", dir=tmp_path)
    with pytest.raises(ValueError, match=r"offload: the state is laid out for shard\('zero2'\).*shard\('replicate'\)"):
        xf.offload(xf.shard(u.step, "zero2"), optimizer="disk", dir=tmp_path)
    jitted = xf.jit(xf.offload(u.step, optimizer="disk", dir=tmp_path))
    state = jitted.init(u.make_state())
    with pytest.raises(ValueError, match=r"offload: the step is being traced by xf.jit"):
        for _ in range(3):  # xf.jit runs the first update eagerly, then traces
            state, _ = jitted(state, u.batch())
    step = xf.shard(xf.offload(u.step, optimizer="disk", dir=tmp_path), "zero3")
    with pytest.raises(ValueError, match=r"offload: the state is laid out for shard\('zero3'\).*CPUOffloadPolicy"):
        step(step.init(u.make_state()), u.batch())
