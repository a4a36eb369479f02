"""shard refuses a state its init did not lay out, batches of unequal sizes under a plain
mean loss, and apply_gradients called twice (under shard and under mixed_precision)."""

from __future__ import annotations

import pytest
import torch

import numerics_support as sup
import xform as xf
from xform.distributed.procs import ProcessPool


@pytest.fixture(scope="module")
def pool2():
    with ProcessPool(2, timeout_s=60) as pool:
        yield pool


@pytest.mark.parametrize("strategy", ["replicate", "zero1", "zero2", "zero3"])
def test_a_state_not_laid_out_by_init_is_refused(pool2, strategy):
    """Catches shard("replicate") and "zero3" without step.init(state) training diverged
    copies with no error, and zero2 without init failing deep in the optimizer code."""
    for text in pool2.run(sup.error_of, "without_init", strategy):
        assert text.startswith(
            f"ValueError: shard: this state was not laid out for shard('{strategy}'); call state = step.init(state)"
        ), text


def test_a_state_laid_out_for_another_strategy_is_refused(pool2):
    for text in pool2.run(sup.error_of, "laid_out_for_another", "zero3", "replicate"):
        assert "shard: this state was laid out for shard('zero3'), not for shard('replicate')" in text, text


def test_the_layout_survives_replace_tree_map_copy_and_load(tmp_path):
    """The tag lives in the state's static part, so every way of rebuilding a state keeps
    it (on one process, shard's init tags the state too: the same script scales up)."""
    s = xf.shard(sup.step, "zero2")
    state = s.init(xf.TrainState.create(sup.model(), optimizer=torch.optim.AdamW, lr=0.1))
    b = sup._plain_batch(4)
    state, _ = s(state, b)
    xf.save(state, tmp_path / "ckpt")
    fresh = s.init(xf.TrainState.create(sup.model(), optimizer=torch.optim.AdamW, lr=0.1))
    for other in (state.replace(step=5), xf.tree.map(lambda t: t, state.copy()), state.copy(), xf.load(tmp_path / "ckpt", like=fresh)):
        other, _ = s(other, b)
    with pytest.raises(ValueError, match=r"not laid out for shard\('zero2'\)"):
        s(xf.TrainState.create(sup.model(), optimizer=torch.optim.AdamW, lr=0.1), b)


def test_unequal_batch_sizes_are_refused_for_a_plain_mean_loss(pool2):
    """Catches ranks with 4 and 3 rows accepted silently: a plain mean per process weights
    the processes alike, so the step is not the global batch's. With xf.Mean (normalized by
    the global count) unequal sizes are exact and accepted."""
    for text in pool2.run(sup.error_of, "unequal_rows", "plain"):
        assert "ValueError: shard: the processes got batches of unequal sizes" in text, text
        assert "7 over 2 processes" in text and "xf.Mean(sum, count)" in text, text
    assert pool2.run(sup.unequal_rows, "mean") == ["trained", "trained"]


@pytest.mark.parametrize("strategy, precision", [("replicate", "fp32"), ("zero2", "fp32"), ("zero3", "bf16")])
def test_apply_gradients_twice_is_refused_under_shard(pool2, strategy, precision):
    for text in pool2.run(sup.error_of, "apply_gradients_twice", strategy, precision):
        assert "called state.apply_gradients twice; a step must call it exactly once" in text, text


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_apply_gradients_twice_is_refused_under_mixed_precision(precision):
    """Catches a second apply_gradients under mixed_precision being accepted silently
    (two updates in one step)."""
    text = sup.error_of("apply_gradients_twice", None, precision)
    assert text.startswith("RuntimeError: mixed_precision: the step called state.apply_gradients twice"), text
