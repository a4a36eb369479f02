"""``accumulate(step, k)`` equals ``step`` on the full batch.

Tolerances: the two differ only in the order of floating-point sums (k micro-batch
gradients summed, then divided once), i.e. by fp32 rounding, ~1e-7 relative per gradient
element. The optimizer is AdamW with ``eps=1e-3``: its update ``lr * m / (sqrt(v) + eps)``
then changes by at most ``lr / eps = 1`` times a change of the gradient, so the
rounding stays ~1e-8 in the params (measured: at most 9e-9 beyond rtol=1e-6 over 6,000
random cases) and rtol=1e-6, atol=1e-7 hold with a wide margin. With AdamW's default
``eps=1e-8``, a gradient element that nearly cancels (|g| ~ 1e-7, far below the terms
summed into it) gets a rounding error amplified by up to ``lr / eps = 1e5``: about 1 case
in 1,000 then differs by 1e-7 to 2e-6, a property of AdamW, not of ``accumulate``.
tests/test_accumulate.py checks fixed cases with the default eps.
"""

import pytest
import torch
from hypothesis import assume, given
from hypothesis import strategies as st

import xform as xf
from xform.transforms.accumulate import split_batch
from xform.testing import assert_accumulate_equivalent

from _support import (
    classification_batch,
    mlp_configs,
    state_factory,
    step,
    token_batch,
    token_mean_step,
    token_step,
)

RTOL, ATOL = 1e-6, 1e-7


@given(config=mlp_configs(), k=st.integers(1, 4), micro=st.integers(1, 4), data_seed=st.integers(0, 2**16))
def test_accumulate_equals_the_full_batch_step(config, k, micro, data_seed):
    batch = classification_batch(config, k * micro, data_seed)
    assert_accumulate_equivalent(step, state_factory(config, eps=1e-3), batch, k, steps=3, rtol=RTOL, atol=ATOL)


@given(config=mlp_configs(), k=st.integers(2, 4), micro=st.integers(1, 4), data_seed=st.integers(0, 2**16))
def test_accumulate_with_sgd_equals_the_full_batch_step(config, k, micro, data_seed):
    """Catches: a plain mean loss summed over the micro-batches instead of averaged (k
    times the gradient). AdamW is blind to a constant gradient factor; SGD's update is
    the gradient times lr, so the factor shows in the params. Rounding: sums in another
    order, ~1e-7 relative per gradient element, passed linearly to the params."""
    batch = classification_batch(config, k * micro, data_seed)
    make_state = state_factory(config, optimizer=torch.optim.SGD, lr=0.1)
    assert_accumulate_equivalent(step, make_state, batch, k, steps=3, rtol=RTOL, atol=ATOL)


@st.composite
def token_cases(draw):
    """A token batch whose rows carry 0..seq valid labels: micro-batches hold uneven counts."""
    config = draw(mlp_configs())
    k = draw(st.integers(2, 4))
    micro = draw(st.integers(1, 3))
    seq = draw(st.integers(1, 5))
    valid = draw(st.lists(st.integers(0, seq), min_size=k * micro, max_size=k * micro))
    assume(sum(valid) > 0)
    return config, k, token_batch(config, valid, seq, draw(st.integers(0, 2**16)))


@given(case=token_cases())
def test_token_loss_with_uneven_counts_equals_the_full_batch_step(case):
    config, k, batch = case
    assert_accumulate_equivalent(token_step, state_factory(config, eps=1e-3), batch, k, steps=3, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize(
    "sizes, valid",
    [((3, 8, 3), [6, 1, 2, 5]), ((2, 4, 4, 2), [1, 6, 6, 6]), ((5, 12, 4), [2, 2, 6, 1, 1, 3, 6, 4])],
)
def test_averaging_micro_batch_means_does_not_match(sizes, valid):
    """The negative control: with the loss as a per-micro-batch mean (not ``xf.Mean``),
    micro-batches with few tokens weigh as much as those with many, and the check fails
    (while the same batch passes with ``xf.Mean``)."""
    config = {"sizes": sizes, "seed": 0}
    batch = token_batch(config, valid, 6, seed=1)
    make_state = state_factory(config, eps=1e-3)
    k = len(valid) // 2 if len(valid) > 4 else len(valid)
    assert_accumulate_equivalent(token_step, make_state, batch, k, rtol=RTOL, atol=ATOL)
    with pytest.raises(AssertionError, match=r"accumulate\(step, \d\) vs step, after update 1: the states differ at"):
        assert_accumulate_equivalent(token_mean_step, make_state, batch, k, rtol=RTOL, atol=ATOL)


@given(n=st.integers(1, 500), k=st.integers(2, 64))
def test_the_indivisible_batch_error_suggests_fixes_that_work(n, k):
    assume(n % k)
    with pytest.raises(ValueError) as info:
        split_batch("accumulate", torch.zeros(n, 1), k)
    message = str(info.value)
    prefix = f"accumulate: batch size {n} is not divisible by steps={k}; pass a batch of "
    assert message.startswith(prefix)
    bigger, closest = (int(x) for x in message[len(prefix):].split(" or use steps="))
    assert bigger % k == 0 and n < bigger < n + k
    assert n % closest == 0
    assert all(abs(d - k) >= abs(closest - k) for d in range(1, n + 1) if n % d == 0)
    assert len(split_batch("accumulate", torch.zeros(n, 1), closest)) == closest


@given(config=mlp_configs(), k=st.integers(2, 4), micro=st.integers(1, 3), data_seed=st.integers(0, 2**16))
def test_accumulate_metrics_pool_to_the_full_batch_metrics(config, k, micro, data_seed):
    batch = classification_batch(config, k * micro, data_seed)
    make_state = state_factory(config)
    _, full = step(make_state(), batch)
    _, pooled = xf.accumulate(step, k)(make_state(), batch)
    assert torch.allclose(pooled["loss"], full["loss"], rtol=1e-6, atol=1e-7)
