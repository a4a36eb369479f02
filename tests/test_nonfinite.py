"""A non-finite loss or gradient never reaches the parameters, in any precision.

The update is skipped (params, optimizer state and ``state.step`` unchanged, bit for bit;
the data position advances), ``state.transforms["nonfinite"]`` counts the skips, and too
many in a row raise ``FloatingPointError``. The multi-process cases (every strategy, both
nesting orders) are in test_fp16_sharded.py.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import xform as xf
from xform.testing import assert_states_close

from _util import batch, good, init, make_state, scaled_step




def nan(seed=0):
    return {**batch(seed=seed), "mult": torch.tensor(math.nan)}


def wrapped(precision, k=1):
    s = scaled_step if precision == "fp32" else xf.mixed_precision(scaled_step, precision)
    return xf.accumulate(s, k) if k > 1 else s


def _unchanged_but_position(new, before):
    assert new.step == before.step and new.data["consumed"] == before.data["consumed"] + 1
    assert_states_close(new.params, before.params)
    assert_states_close(new.opt_state, before.opt_state)


@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("k", [1, 2])
def test_a_nan_loss_is_skipped_in_every_precision(precision, k):
    """Catches a NaN loss in fp32 or bf16 making every parameter NaN for good while
    ``step`` kept advancing (AdamW's moments and step count must not move either)."""
    s = wrapped(precision, k)
    state = init(s, make_state())
    state, _ = s(state, good(0))  # the optimizer state exists
    before = state.copy()
    new, metrics = s(state, nan(1))
    assert math.isnan(float(metrics["loss"]))
    _unchanged_but_position(new, before)
    assert new.transforms["nonfinite"] == {"skipped": 1, "consecutive": 1}
    newer, _ = s(new, good(2))
    assert newer.step == before.step + 1 and all(torch.isfinite(p).all() for p in newer.params.values())
    assert newer.transforms["nonfinite"] == {"skipped": 1, "consecutive": 0}


def test_a_nan_in_one_micro_batch_skips_the_whole_step():
    state = make_state()
    before = state.copy()
    b = {**batch(), "mult": torch.tensor([1.0, math.nan]).repeat_interleave(4)}  # per row

    def per_row(state, b):
        def loss_fn(p):
            losses = F.cross_entropy(xf.apply(state, p, b["x"]), b["y"], reduction="none")
            return (losses * b["mult"]).mean()

        loss, grads = xf.value_and_grad(loss_fn)(state.params)
        return state.apply_gradients(grads), {"loss": loss}

    new, _ = xf.accumulate(per_row, 2)(state, b)
    _unchanged_but_position(new, before)


@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_too_many_skips_in_a_row_raise(precision):
    """Catches fp16 skipping 200 NaN batches in a row without a word (step=0,
    consumed=200): 25 in a row (the default) raise, naming the count and the fix."""
    s = wrapped(precision)
    state = init(s, make_state())
    for i in range(24):
        state, _ = s(state, nan(i))
    assert state.transforms["nonfinite"] == {"skipped": 24, "consecutive": 24} and state.step == 0
    with pytest.raises(FloatingPointError, match=r"not finite \(NaN or inf\) in 25 updates in a row.*max_consecutive_skips"):
        s(state, nan(99))
    assert state.step == 0 and not state.donated  # the state before the error stays usable


def test_max_consecutive_skips_is_configurable_and_counts_only_runs():
    state = make_state(max_consecutive_skips=3)
    for b in [nan(0), nan(1), good(2), nan(3), nan(4)]:  # a good update resets the run
        state, _ = scaled_step(state, b)
    assert state.transforms["nonfinite"] == {"skipped": 4, "consecutive": 2} and state.step == 1
    with pytest.raises(FloatingPointError, match="in 3 updates in a row"):
        scaled_step(state, nan(5))
    never = make_state(max_consecutive_skips=None)
    for i in range(30):
        never, _ = scaled_step(never, nan(i))
    assert never.transforms["nonfinite"]["skipped"] == 30 and never.step == 0
    assert "skipped=30" in repr(never)


@pytest.mark.parametrize(
    "value, error, match",
    [
        (0, ValueError, r"max_consecutive_skips must be >= 1 or None, got 0"),
        (2.5, TypeError, r"max_consecutive_skips must be an int or None, got 2.5"),
        (True, TypeError, r"max_consecutive_skips must be an int or None, got True"),
    ],
)
def test_bad_max_consecutive_skips_is_refused(value, error, match):
    with pytest.raises(error, match=match):
        make_state(max_consecutive_skips=value)


def test_the_counter_is_saved_and_loaded(tmp_path):
    state = make_state()
    state, _ = scaled_step(state, nan(0))
    xf.save(state, tmp_path / "ckpt")
    loaded = xf.load(tmp_path / "ckpt", like=make_state())
    assert loaded.transforms["nonfinite"] == {"skipped": 1, "consecutive": 1}
