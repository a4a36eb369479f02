"""``xform.testing``: the checks pass on correct steps and fail, with useful messages, on
broken ones."""

import itertools

import pytest
import torch
import torch.nn.functional as F

import xform as xf
from xform.testing import (
    assert_accumulate_equivalent,
    assert_deterministic,
    assert_resume_equivalent,
    assert_states_close,
    counting_collectives,
    fresh_states,
    run_steps,
)

from _util import batch, make_state, mlp, step

BATCHES = [batch(seed=s) for s in range(5)]


# --- assert_states_close ------------------------------------------------------------------


def test_states_close_passes_on_equal_states():
    state = make_state()
    assert_states_close(state.copy(), state)
    assert_states_close({"a": torch.tensor([1.0, float("nan")])}, {"a": torch.tensor([1.0, float("nan")])})


def test_states_close_names_the_first_differing_path():
    state = make_state()
    other = state.copy()
    other.params["2.weight"][1, 2] += 1e-3
    other.params["2.bias"][0] += 1.0
    with pytest.raises(AssertionError) as info:
        assert_states_close(other, state, msg="after step 1")
    message = str(info.value)
    assert message.startswith("after step 1: the states differ at params['2.bias'] (bit for bit): max abs diff 1,")
    assert "1 of 3 elements differ, the first at index (0,)" in message
    assert "(1 other leaves differ too: [\"params['2.weight']\"])" in message
    assert_states_close(other.params["2.weight"], state.params["2.weight"], atol=2e-3)
    with pytest.raises(AssertionError, match=r"the states differ at <root> \(rtol=1e-06, atol=1e-07\): max abs diff 0.001"):
        assert_states_close(other.params["2.weight"], state.params["2.weight"], rtol=1e-6, atol=1e-7)


def test_states_close_checks_non_tensor_leaves_dtypes_and_structure():
    state = make_state()
    with pytest.raises(AssertionError, match="the states differ at step \\(bit for bit\\): 3 vs 0"):
        assert_states_close(state.replace(step=3), state)
    with pytest.raises(AssertionError, match=r"shape/dtype \(2,\) torch.float32 vs \(2,\) torch.float64"):
        assert_states_close({"w": torch.zeros(2)}, {"w": torch.zeros(2, dtype=torch.float64)})
    with pytest.raises(AssertionError, match="different structures: b is in one tree only"):
        assert_states_close({"a": 1}, {"a": 1, "b": 2})
    with pytest.raises(AssertionError, match="different structures"):
        assert_states_close({"loss": xf.Mean(torch.tensor(1.0), 1)}, {"loss": torch.tensor(1.0)})


# --- fresh_states -------------------------------------------------------------------------


def test_fresh_states_refuses_a_factory_that_reuses_its_module():
    model = mlp()
    with pytest.raises(AssertionError, match=r"make_state\(\) returned states that share the tensor at params\['0.bias'\]"):
        fresh_states(lambda: xf.TrainState.create(model, optimizer=torch.optim.SGD, lr=0.1), 2)


def test_fresh_states_refuses_an_unseeded_factory():
    with pytest.raises(AssertionError, match=r"two calls of make_state\(\) gave different states .*torch.manual_seed"):
        fresh_states(lambda: xf.TrainState.create(torch.nn.Linear(2, 2), optimizer=torch.optim.SGD, lr=0.1), 2)
    with pytest.raises(TypeError, match=r"make_state\(\) must return a TrainState, got Linear"):
        fresh_states(lambda: torch.nn.Linear(2, 2), 1)


def test_run_steps():
    state, history = run_steps(step, make_state(), BATCHES, 3)
    assert state.step == 3 and len(history) == 3
    with pytest.raises(ValueError, match="the batches ran out after 5 of 6 steps"):
        run_steps(step, make_state(), BATCHES, 6)


# --- assert_deterministic -----------------------------------------------------------------


def test_deterministic_passes_with_dropout_and_transforms():
    make = lambda: make_state(dropout=0.5, sizes=(4, 16, 3))  # noqa: E731
    assert_deterministic(step, make, batch())
    assert_deterministic(xf.accumulate(xf.mixed_precision(step, "fp16"), 2), make, batch())


def test_deterministic_catches_randomness_outside_the_state():
    def noisy(state, b):
        def loss_fn(p):
            noise = torch.randn_like(b["x"]) * 0.1  # the global RNG: not derived from the state
            return F.cross_entropy(xf.apply(state, p, b["x"] + noise), b["y"])

        loss, grads = xf.value_and_grad(loss_fn)(state.params)
        return state.apply_gradients(grads), {"loss": loss}

    with pytest.raises(AssertionError, match="two copies of one state gave different states: the states differ at params"):
        assert_deterministic(noisy, make_state, batch())


def test_deterministic_catches_a_step_that_changes_its_input():
    def sneaky(state, b):
        state.params["2.bias"].data.add_(1.0)  # in place, and no donation
        loss, grads = xf.value_and_grad(lambda p: F.cross_entropy(xf.apply(state, p, b["x"]), b["y"]))(state.params)
        return state.apply_gradients(grads, donate=False), {"loss": loss}

    with pytest.raises(AssertionError, match=r"step\(state.copy\(\), batch\) changed `state`|changed `state`"):
        assert_deterministic(sneaky, make_state, batch())


# --- assert_resume_equivalent -------------------------------------------------------------


def test_resume_passes_for_sequences_and_loaders(tmp_path):
    losses = assert_resume_equivalent(step, make_state, BATCHES, 2, tmp_path)
    assert len(losses) == 5 and all(isinstance(m["loss"], torch.Tensor) for m in losses)
    loader = xf.DataLoader(torch.utils.data.TensorDataset(torch.randn(10, 4), torch.randint(0, 3, (10,))), batch_size=4)
    tuple_step = lambda state, b: step(state, {"x": b[0], "y": b[1]})  # noqa: E731
    assert_resume_equivalent(tuple_step, make_state, loader, 4, tmp_path, num_steps=7)


def test_resume_catches_state_kept_outside_the_train_state(tmp_path):
    calls = itertools.count()

    def hidden(state, b):
        scale = 1.0 + next(calls) % 3  # a counter that a checkpoint does not hold
        loss, grads = xf.value_and_grad(lambda p: F.cross_entropy(xf.apply(state, p, b["x"]), b["y"]) * scale)(state.params)
        return state.apply_gradients(grads), {"loss": loss}

    with pytest.raises(AssertionError, match="metrics of the run resumed after step 2 vs the uninterrupted run"):
        assert_resume_equivalent(hidden, make_state, BATCHES, 2, tmp_path)


def test_resume_catches_a_loader_that_ignores_the_position(tmp_path):
    class Restarting:
        def __init__(self, loader):
            self.loader = loader

        def iterate(self, state, epochs=None):
            return self.loader.iterate(state.replace(data={**state.data, "consumed": 0}), epochs=epochs)

    loader = xf.DataLoader(torch.utils.data.TensorDataset(torch.randn(12, 4), torch.randint(0, 3, (12,))), batch_size=4)
    tuple_step = lambda state, b: step(state, {"x": b[0], "y": b[1]})  # noqa: E731
    with pytest.raises(AssertionError, match="resumed after step 2"):
        assert_resume_equivalent(tuple_step, make_state, Restarting(loader), 2, tmp_path, num_steps=4)


@pytest.mark.parametrize("leaf", ["rng", "step", "data"])
def test_resume_catches_a_load_that_keeps_likes_values(tmp_path, monkeypatch, leaf):
    """Catches: ``xf.load`` taking the RNG key, step or data position from ``like`` instead
    of the checkpoint. ``like`` is built by the same ``make_state`` (same seed), so the
    check must give it other values for this to show."""
    import xform.testing as testing

    real_load = testing.load

    def keeping(path, *, like):
        return real_load(path, like=like).replace(**{leaf: getattr(like, leaf)})

    monkeypatch.setattr(testing, "load", keeping)
    with pytest.raises(AssertionError, match=rf"the loaded state differs from the saved one: the states differ at {leaf}"):
        assert_resume_equivalent(step, make_state, BATCHES, 2, tmp_path)


def test_resume_argument_errors(tmp_path):
    with pytest.raises(ValueError, match=r"need 0 < split_at < 5, got 5"):
        assert_resume_equivalent(step, make_state, BATCHES, 5, tmp_path)
    with pytest.raises(TypeError, match="pass num_steps with a data loader"):
        assert_resume_equivalent(step, make_state, xf.DataLoader(torch.arange(4), batch_size=2), 1, tmp_path)


# --- assert_accumulate_equivalent -----------------------------------------------------------


def test_accumulate_equivalent_reports_the_update_and_the_path():
    def per_row_weighted(state, b):
        # Weights each micro-batch's mean by its first label: not a function of the full batch.
        def loss_fn(p):
            return F.cross_entropy(xf.apply(state, p, b["x"]), b["y"]) * (1 + b["y"][0])

        loss, grads = xf.value_and_grad(loss_fn)(state.params)
        return state.apply_gradients(grads), {"loss": loss}

    b = {"x": batch()["x"], "y": torch.tensor([0, 1, 2, 0, 2, 2, 1, 0])}
    with pytest.raises(AssertionError, match=r"accumulate\(step, 2\) vs step, after update 1: the states differ at params\['0\.\w+'\] \(rtol=1e-06, atol=1e-07\): max abs diff"):
        assert_accumulate_equivalent(per_row_weighted, make_state, b, 2)


@pytest.mark.parametrize("policy", ["fp16", "params=bfloat16"])
def test_make_state_may_return_an_initialized_state(policy, tmp_path):
    wrapped = xf.mixed_precision(step, policy)
    make = lambda: wrapped.init(make_state())  # noqa: E731
    assert_deterministic(wrapped, make, batch())
    assert_resume_equivalent(wrapped, make, BATCHES, 2, tmp_path)
    assert_accumulate_equivalent(wrapped, make, batch(), 2, rtol=1e-2, atol=1e-2)


# --- counting_collectives -----------------------------------------------------------------


def _count_calls():
    import torch.distributed as dist

    group = dist.group.WORLD
    f32, f64 = torch.ones(4), torch.ones(1, dtype=torch.float64)
    with counting_collectives() as calls:
        dist.all_reduce(f32)  # the module's: counted once, not again for its call on the group
        group.allreduce([f32]).wait()  # on the group directly, as xform's buckets call it
        dist.all_reduce(f64)
        dist.broadcast(f32, src=0)
    inside = dict(calls)
    dist.all_reduce(f32)  # after the block: nothing counted, and both calls still work
    group.allreduce([f32]).wait()
    return inside, dict(calls), float(f32[0])


def test_counting_collectives_counts_each_collective_once_and_puts_everything_back():
    """Catches a collective counted twice (module function, then its call on the group),
    one on a group missed, and a group method put back broken (a pybind method restored as
    a plain attribute loses its binding: the next call on a group fails)."""
    from xform.distributed.procs import ProcessPool

    with ProcessPool(2, timeout_s=120) as pool:
        results = pool.run(_count_calls)
    for inside, after, value in results:
        assert inside == {"all_reduce": 2, "all_reduce:f64": 1, "broadcast": 1}
        assert after == inside
        assert value == 2.0**4  # four sums of two ones: the broadcast kept rank 0's value
