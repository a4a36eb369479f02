"""save -> load -> continue equals the uninterrupted run, bit for bit on CPU: with
shuffling, dropout, an lr schedule, gradient clipping, mixed precision (with a skipped
fp16 update) and accumulation, across epoch boundaries, in this process and in a fresh
one."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import xform as xf
from xform.testing import assert_resume_equivalent, assert_states_close

import _resume_script
from _support import mlp_configs, state_factory

HERE = Path(__file__).parent


@st.composite
def resume_cases(draw):
    config = draw(mlp_configs())
    k = draw(st.sampled_from([1, 2]))
    batch_size = k * draw(st.integers(1, 3))
    size = draw(st.integers(batch_size, 24))
    # accumulate needs k | every batch: a partial last batch must be dropped unless it splits.
    drop_last = draw(st.booleans()) or (size % batch_size) % k != 0
    num_steps = draw(st.integers(2, 10))
    split_at = draw(st.integers(1, num_steps - 1))
    policy = draw(st.sampled_from(["fp32", "bf16", "fp16"]))
    return config, k, policy, size, batch_size, drop_last, num_steps, split_at, draw(st.integers(0, 2**16))


@given(case=resume_cases(), dropout=st.sampled_from([0.0, 0.3]))
def test_resume_in_process_equals_the_uninterrupted_run(case, dropout, tmp_path_factory):
    config, k, policy, size, batch_size, drop_last, num_steps, split_at, data_seed = case
    g = torch.Generator().manual_seed(data_seed)
    d, classes = config["sizes"][0], config["sizes"][-1]
    data = torch.utils.data.TensorDataset(torch.randn(size, d, generator=g), torch.randint(0, classes, (size,), generator=g))
    loader = xf.DataLoader(data, batch_size=batch_size, shuffle=True, drop_last=drop_last)
    wrapped = xf.accumulate(xf.mixed_precision(_resume_script.step, policy), k)
    assert_resume_equivalent(
        wrapped, state_factory(config, dropout=dropout, seed=data_seed), loader, split_at,
        tmp_path_factory.mktemp("resume"), num_steps=num_steps,
    )


def run(step, state, loader, n):
    losses = []
    for _, batch in zip(range(n), loader.iterate(state, epochs=None)):
        state, metrics = step(state, batch)
        losses.append(metrics["loss"])
    return state, losses


@pytest.mark.parametrize("split_at", [3])
def test_resume_in_a_fresh_process_equals_the_uninterrupted_run(tmp_path, split_at):
    """Both configurations of _resume_script (bf16 inside accumulate, fp16 outside it
    with a dynamic loss scale), 12 steps over 5-batch epochs: this process runs 12 steps
    straight, and 3 steps then saves; a fresh Python (with another PYTHONHASHSEED) loads
    into a state made with another seed and runs the other 9. The 12 losses and the final
    states must be equal bit for bit, the RNG key and data position the saved ones.

    Catches: a load keeping ``like``'s RNG key (dropout masks change) or data position."""
    total = 12
    expected = {}
    for name in _resume_script.CONFIGS:
        wrapped, make_state, loader = _resume_script.build(name)
        straight, losses = run(wrapped, wrapped.init(make_state()), loader, total)
        first, first_losses = run(wrapped, wrapped.init(make_state()), loader, split_at)
        xf.save(first, tmp_path / name / "ckpt")
        expected[name] = (straight, losses, first_losses)
    fp16 = expected["fp16"][0]
    assert fp16.step < total, "the fp16 run must skip an update (the dataset has an overflowing example)"

    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    proc = subprocess.run(
        [sys.executable, str(HERE / "_resume_script.py"), str(tmp_path), str(total - split_at), *_resume_script.CONFIGS],
        capture_output=True, text=True, env=env, timeout=240,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    for name in _resume_script.CONFIGS:
        straight, losses, first_losses = expected[name]
        resumed = torch.load(tmp_path / name / "losses.pt", weights_only=True)
        # Bit for bit; the losses of skipped fp16 updates are nan in both runs.
        assert_states_close(torch.stack(first_losses + list(resumed)), torch.stack(losses), msg=f"{name} losses")
        wrapped, make_state, _ = _resume_script.build(name)
        final = xf.load(tmp_path / name / "final", like=wrapped.init(make_state(seed=_resume_script.LIKE_SEED)))
        assert_states_close(final, straight, msg=f"{name} final state")
        # The key and position come from the checkpoints, not from `like` (another seed).
        assert (final.rng, final.data["seed"], final.data["consumed"]) == (_resume_script.SEED, _resume_script.SEED, total)
