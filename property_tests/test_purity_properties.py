"""Purity: a step is a function of (state, batch). Equal inputs give equal outputs bit
for bit (dropout included: its randomness derives from the state); the input state is
never silently changed: stepping a copy leaves it intact, stepping it donates it."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import xform as xf
from xform.testing import assert_deterministic, assert_states_close

from _support import classification_batch, init, mlp_configs, state_factory, step

TRANSFORMS = {
    "plain": lambda f: f,
    "accumulate": lambda f: xf.accumulate(f, 2),
    "bf16": lambda f: xf.mixed_precision(f, "bf16"),
    "fp16": lambda f: xf.mixed_precision(f, "fp16"),
    "accumulate(fp16)": lambda f: xf.accumulate(xf.mixed_precision(f, "fp16"), 2),
    "bf16(accumulate)": lambda f: xf.mixed_precision(xf.accumulate(f, 2), "bf16"),
}


@given(
    config=mlp_configs(),
    transform=st.sampled_from(sorted(TRANSFORMS)),
    dropout=st.sampled_from([0.0, 0.5]),
    n=st.sampled_from([2, 4, 8]),
    data_seed=st.integers(0, 2**16),
)
def test_steps_are_deterministic_and_never_silently_change_their_input(config, transform, dropout, n, data_seed):
    wrapped = TRANSFORMS[transform](step)
    assert_deterministic(wrapped, state_factory(config, dropout=dropout), classification_batch(config, n, data_seed))


@given(config=mlp_configs(), transform=st.sampled_from(sorted(TRANSFORMS)), data_seed=st.integers(0, 2**16))
def test_the_donated_input_refuses_every_access(config, transform, data_seed):
    wrapped = TRANSFORMS[transform](step)
    state = init(wrapped, state_factory(config)())
    new, _ = wrapped(state, classification_batch(config, 4, data_seed))
    assert state.donated and not new.donated
    for use in (
        lambda s: s.params,
        lambda s: s.opt_state,
        lambda s: s.step,
        lambda s: s.data,
        lambda s: s.copy(),
        lambda s: xf.tree.leaves(s),
        lambda s: wrapped(s, classification_batch(config, 4, data_seed)),
    ):
        with pytest.raises(xf.DonatedStateError, match="this TrainState was donated"):
            use(state)


@given(config=mlp_configs(), dropout=st.sampled_from([0.0, 0.5]), seed=st.integers(0, 2**16), data_seed=st.integers(0, 2**16))
def test_dropout_depends_on_the_rng_key_and_position_only(config, dropout, seed, data_seed):
    """Two states with equal leaves but from separate modules give the same result; a
    different RNG key gives a different one when there is dropout."""
    batch = classification_batch(config, 8, data_seed)
    make_state = state_factory(config, dropout=dropout, seed=seed)
    a, ma = step(make_state(), batch)
    b, mb = step(make_state(), batch)
    assert_states_close(a, b)
    assert_states_close(ma, mb)
    wide = dropout and config["sizes"][1] >= 4
    if wide:
        c, mc = step(state_factory(config, dropout=dropout, seed=seed + 1)(), batch)
        assert not torch.equal(mc["loss"], ma["loss"])


@given(config=mlp_configs(min_width=8), k=st.integers(2, 4), seed=st.integers(0, 2**16), data_seed=st.integers(0, 2**16))
def test_each_micro_batch_draws_its_own_dropout_mask(config, k, seed, data_seed):
    """Catches: a dropout stream not salted per micro-batch (every micro-batch of
    ``accumulate`` drawing the same mask). The batch is k copies of one micro-batch, so
    the micro-batches' losses differ only by their masks (>= 8 units at p=0.5 over 4 rows:
    two equal masks have probability <= 2**-32)."""
    one = classification_batch(config, 4, data_seed)
    batch = {key: torch.cat([v] * k) for key, v in one.items()}
    losses = []

    def recording(state, b):
        state, metrics = step(state, b)
        losses.append(float(metrics["loss"]))
        return state, metrics

    xf.accumulate(recording, k)(state_factory(config, dropout=0.5, seed=seed)(), batch)
    assert len(set(losses)) == k, losses
