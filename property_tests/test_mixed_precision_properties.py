"""``mixed_precision`` against the plain fp32 step: identity, exact loss scaling, a
measured bf16 bound, nesting orders, and the dynamic loss scale."""

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

import xform as xf
from xform.testing import assert_states_close, run_steps

from _support import classification_batch, init, mlp, mlp_configs, state_factory, step

FP32_SPELLINGS = ["fp32", "float32", "f32", "float", "FP32", "params=float32", "params=float32,compute=float32", xf.Policy()]


@pytest.mark.parametrize("spelling", FP32_SPELLINGS, ids=str)
def test_fp32_is_the_step_itself(spelling):
    """Every spelling of fp32 without a loss scale returns the step unchanged (running it
    would only compare the step with itself)."""
    assert xf.mixed_precision(step, spelling) is step


# --- against a hand-written PyTorch loop --------------------------------------------------


def scaled_step(state, batch):
    """``step`` with the loss times ``batch["mult"]``: 1e38 overflows the scaled gradients."""

    def loss_fn(params):
        logits = xf.apply(state, params, batch["x"])
        return torch.nn.functional.cross_entropy(logits, batch["y"]) * batch["mult"]

    loss, grads = xf.value_and_grad(loss_fn)(state.params)
    return state.apply_gradients(grads), {"loss": loss}


def hand_written_run(config, batches, dtype, *, scaler=None, lr=0.1):
    """The reference, written without xform as a user would: fp32 params, the forward
    under ``torch.autocast``, the loss in fp32, ``backward``, SGD; with ``scaler`` (a
    ``torch.amp.GradScaler``) the loss is scaled and an overflowing step skipped."""
    model = mlp(config["sizes"], config["seed"], 0.0, config.get("activation", "relu"))
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    losses, scales = [], []
    for b in batches:
        with torch.autocast("cpu", dtype=dtype):
            logits = model(b["x"])
        loss = F.cross_entropy(logits.float(), b["y"]) * b.get("mult", 1.0)
        if scaler is None:
            loss.backward()
            opt.step()
        else:
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            scales.append(float(scaler.get_scale()))
        opt.zero_grad(set_to_none=True)
        losses.append(loss.detach())
    return dict(model.named_parameters()), losses, scales


@given(config=mlp_configs(), n=st.integers(1, 16), data_seed=st.integers(0, 2**16))
def test_bf16_equals_a_hand_written_autocast_loop(config, n, data_seed):
    """``mixed_precision(step, "bf16")`` is autocast around the forward with fp32 master
    weights: equal to the hand-written loop bit for bit (params and losses, 3 SGD steps).
    Catches any change to what is cast, where, or in which order."""
    batches = [classification_batch(config, n, data_seed + i) for i in range(3)]
    wrapped = xf.mixed_precision(step, "bf16")
    state, metrics = run_steps(wrapped, init(wrapped, state_factory(config, optimizer=torch.optim.SGD, lr=0.1)()), batches)
    params, losses, _ = hand_written_run(config, batches, torch.bfloat16)
    assert_states_close(dict(state.params), {k: v.detach() for k, v in params.items()}, msg="params")
    assert_states_close([m["loss"] for m in metrics], losses, msg="losses")


@given(
    config=mlp_configs(),
    overflows=st.lists(st.booleans(), min_size=1, max_size=6),
    growth_interval=st.integers(1, 3),
    data_seed=st.integers(0, 2**16),
)
def test_fp16_equals_a_hand_written_grad_scaler_loop(config, overflows, growth_interval, data_seed):
    """fp16 with ``DynamicLossScale`` against ``torch.amp.GradScaler`` driving the same
    model: equal params, losses and scales after each step, bit for bit, with overflows
    (a loss times 1e38) injected. Catches a scale that never grows or never shrinks, an
    unscale by the wrong factor, an overflowing update that is not skipped."""
    batches = [
        {**classification_batch(config, 4, data_seed + i), "mult": torch.tensor(1e38 if o else 1.0)}
        for i, o in enumerate(overflows)
    ]
    wrapped = xf.mixed_precision(
        scaled_step, "fp16", loss_scale=xf.DynamicLossScale(initial_scale=2.0**10, growth_interval=growth_interval)
    )
    state = init(wrapped, state_factory(config, optimizer=torch.optim.SGD, lr=0.1)())
    got_losses, got_scales = [], []
    for b in batches:
        state, metrics = wrapped(state, b)
        got_losses.append(metrics["loss"])
        got_scales.append(float(state.transforms["mixed_precision"]["scale"]))
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=growth_interval)
    params, losses, scales = hand_written_run(config, batches, torch.float16, scaler=scaler)
    assert got_scales == scales
    assert_states_close(dict(state.params), {k: v.detach() for k, v in params.items()}, msg="params")
    assert_states_close(got_losses, losses, msg="losses")


@given(config=mlp_configs(), log2_scale=st.integers(0, 24), k=st.sampled_from([1, 2]), data_seed=st.integers(0, 2**16))
def test_fp32_compute_with_a_power_of_two_loss_scale_is_bit_exact(config, log2_scale, k, data_seed):
    """Multiplying the loss by 2**j and the gradients by 2**-j is exact in fp32, so the
    whole loss-scaling path (scale, unscale, finiteness check) must not change a bit."""
    wrapped = xf.accumulate(xf.mixed_precision(step, "fp32", loss_scale=xf.StaticLossScale(2.0**log2_scale)), k)
    plain = xf.accumulate(step, k)
    batches = [classification_batch(config, 8, data_seed + i) for i in range(3)]
    make_state = state_factory(config)
    a, ma = run_steps(wrapped, init(wrapped, make_state()), batches)
    b, mb = run_steps(plain, make_state(), batches)
    assert_states_close(a.params, b.params)
    assert_states_close(a.opt_state, b.opt_state)
    assert_states_close(ma, mb)


# --- bf16 against fp32 --------------------------------------------------------------------

BF16_BOUND = 0.05
LOSS_BOUND = 1e-2


def relative_update_difference(policy, config, batch, steps=10):
    """||update_policy - update_fp32|| / ||update_fp32|| over all params after ``steps``
    SGD steps, and the relative difference of the last loss."""
    make_state = state_factory(config, optimizer=torch.optim.SGD, lr=0.1)
    out = {}
    for name in ("fp32", policy):
        wrapped = xf.mixed_precision(step, name)
        state = init(wrapped, make_state())
        start = {k: v.detach().float().clone() for k, v in state.params.items()}
        state, metrics = run_steps(wrapped, state, [batch] * steps)
        out[name] = (start, {k: v.detach().float() for k, v in state.params.items()}, float(metrics[-1]["loss"]))
    start, ref, ref_loss = out["fp32"]
    _, got, loss = out[policy]
    diff = math.sqrt(sum(float(((got[k] - ref[k]) ** 2).sum()) for k in ref))
    update = math.sqrt(sum(float(((ref[k] - start[k]) ** 2).sum()) for k in ref))
    return diff / update, abs(loss - ref_loss) / abs(ref_loss)


@given(
    config=mlp_configs(min_width=8, max_width=32, activation="tanh"),
    n=st.integers(4, 32),
    data_seed=st.integers(0, 2**16),
)
def test_bf16_stays_within_the_measured_bound_of_fp32(config, n, data_seed):
    """bf16 compute with fp32 master weights: after 10 SGD steps (lr 0.1) the update
    differs from the fp32 run's by at most 5% of its norm, and the loss by at most 1%.

    Why: bf16 keeps 8 significant bits (unit roundoff u = 2**-9 ~ 2e-3). Autocast rounds
    the matmul inputs of the forward and backward passes to bf16 and accumulates in
    fp32, so each gradient carries a relative error of a few u; SGD's update is linear in
    it, and 10 steps of a smooth (tanh) MLP do not amplify it much. Measured over 2,000
    random cases of this strategy: median 0.2%, worst 1.8% for the update; worst 0.3% for
    the loss. The bound leaves a 2.7x (3x) margin. It does not hold for every model: with
    ReLU a unit near its kink can flip under bf16 rounding (measured up to 19% with
    widths >= 8, up to 90% with widths of 1-2), hence the tanh family. Storing the params
    in bf16 as well (no fp32 master weights) breaks the bound (median 10%): see
    ``test_bf16_params_without_master_weights_break_the_bound``.
    """
    batch = classification_batch(config, n, data_seed)
    update_diff, loss_diff = relative_update_difference("bf16", config, batch)
    assert 0 < update_diff < BF16_BOUND, update_diff  # > 0: it really computed in bf16
    assert loss_diff < LOSS_BOUND, loss_diff


def test_bf16_params_without_master_weights_break_the_bound():
    """The negative control of the bound: rounding every update into bf16 params loses
    small updates, and the same measure goes well past 5%."""
    config = {"sizes": (4, 16, 16, 3), "seed": 0, "activation": "tanh"}
    batch = classification_batch(config, 16, 0)
    within, _ = relative_update_difference("bf16", config, batch)
    beyond, _ = relative_update_difference("params=bfloat16", config, batch)
    assert within < BF16_BOUND < beyond


# --- nesting orders -----------------------------------------------------------------------


@given(
    config=mlp_configs(),
    policy=st.sampled_from(["bf16", "fp16"]),
    k=st.integers(2, 4),
    micro=st.integers(1, 3),
    dropout=st.sampled_from([0.0, 0.3]),
    data_seed=st.integers(0, 2**16),
)
def test_both_nesting_orders_are_equal(config, policy, k, micro, dropout, data_seed):
    """``accumulate(mixed_precision(step, p), k)`` and ``mixed_precision(accumulate(step,
    k), p)`` mean the same: equal states and metrics, bit for bit (dropout included).

    ``accumulate`` runs the first as the second (the policy's handler installed once per
    step, outside accumulate's). A plain function around the mixed_precision step hides it
    from that rewrite, so the third run has the policy's handler installed per micro-batch,
    inside accumulate's: the handler orders agree, not only the two spellings."""
    inner = xf.accumulate(xf.mixed_precision(step, policy), k)
    outer = xf.mixed_precision(xf.accumulate(step, k), policy)
    mp_step = xf.mixed_precision(step, policy)
    per_micro = xf.accumulate(lambda s, b: mp_step(s, b), k)
    batches = [classification_batch(config, k * micro, data_seed + i) for i in range(3)]
    make_state = state_factory(config, dropout=dropout)
    a, ma = run_steps(inner, init(inner, make_state()), batches)
    b, mb = run_steps(outer, init(outer, make_state()), batches)
    c, mc = run_steps(per_micro, init(mp_step, make_state()), batches)
    assert_states_close(a, b)
    assert_states_close(ma, mb)
    assert_states_close(a, c)
    assert_states_close(ma, mc)
    assert a.step == 3


# --- the dynamic loss scale ---------------------------------------------------------------


@given(
    config=mlp_configs(),
    overflows=st.lists(st.booleans(), min_size=1, max_size=8),
    growth_interval=st.integers(1, 3),
    k=st.sampled_from([1, 2]),
    data_seed=st.integers(0, 2**16),
)
def test_fp16_dynamic_loss_scale_follows_its_definition(config, overflows, growth_interval, k, data_seed):
    """Against a model of GradScaler: an overflowing update is skipped (params, optimizer
    state and ``state.step`` unchanged, the data position advanced) and halves the scale;
    ``growth_interval`` finite updates in a row double it."""
    wrapped = xf.accumulate(
        xf.mixed_precision(scaled_step, "fp16", loss_scale=xf.DynamicLossScale(initial_scale=2.0**10, growth_interval=growth_interval)),
        k,
    )
    state = init(wrapped, state_factory(config)())
    scale, good, updates = 2.0**10, 0, 0
    for i, overflow in enumerate(overflows):
        batch = {**classification_batch(config, 2 * k, data_seed + i), "mult": torch.tensor(1e38 if overflow else 1.0)}
        before = {"params": state.params, "opt_state": state.opt_state}
        before = xf.tree.map(lambda t: t.clone() if isinstance(t, torch.Tensor) else t, before)
        state, _ = wrapped(state, batch)
        if overflow:
            scale, good = max(scale / 2, 1.0), 0
            assert_states_close({"params": state.params, "opt_state": state.opt_state}, before)
        else:
            updates, good = updates + 1, good + 1
            if good == growth_interval:
                scale, good = scale * 2, 0
            assert any(not torch.equal(state.params[name], before["params"][name]) for name in state.params)
        value = state.transforms["mixed_precision"]
        assert (float(value["scale"]), int(value["good_steps"])) == (scale, good)
        assert state.step == updates and state.data["consumed"] == i + 1
