"""``accumulate``: splitting, equivalence with the full batch, metrics, and errors."""

import functools

import pytest
import torch
import torch.nn.functional as F

import xform as xf
from xform.core.primitives import handlers
from xform.transforms.accumulate import combine_metrics, split_batch
from xform.testing import assert_accumulate_equivalent, assert_states_close

from _util import batch, make_state, mlp, step, token_step


def token_batch():
    """Rows with 4, 0, 1 and 3 valid tokens: micro-batches of 2 rows hold 4 and 4, of
    1 row hold 4, 0, 1 and 3 tokens."""
    g = torch.Generator().manual_seed(5)
    y = torch.randint(0, 3, (4, 4), generator=g)
    for row, valid in enumerate([4, 0, 1, 3]):
        y[row, valid:] = -100
    return {"x": torch.randn(4, 4, 4, generator=g), "y": y}


def test_the_error_for_an_indivisible_batch_names_the_fix():
    with pytest.raises(ValueError) as info:
        xf.accumulate(step, 4)(make_state(), batch(30))
    assert str(info.value) == "accumulate: batch size 30 is not divisible by steps=4; pass a batch of 32 or use steps=5"


def test_the_state_is_kept_when_the_batch_is_refused():
    state = make_state()
    with pytest.raises(ValueError):
        xf.accumulate(step, 3)(state, batch(8))
    assert not state.donated and state.step == 0


@pytest.mark.parametrize(
    "steps, error, match",
    [
        (0, ValueError, "accumulate: steps must be >= 1, got 0"),
        (-2, ValueError, "accumulate: steps must be >= 1, got -2"),
        ("2", TypeError, "accumulate: steps must be an int, got '2'"),
        (2.0, TypeError, "accumulate: steps must be an int, got 2.0"),
        (True, TypeError, "accumulate: steps must be an int, got True"),
    ],
)
def test_bad_steps_are_refused_at_wrap_time(steps, error, match):
    with pytest.raises(error, match=match):
        xf.accumulate(step, steps)


def test_a_non_callable_step_is_refused():
    with pytest.raises(TypeError, match="accumulate: expected a step function step\\(state, batch\\) -> \\(state, metrics\\), got 3"):
        xf.accumulate(3, 2)


def test_one_step_is_the_identity_and_wrapping_keeps_the_name():
    assert xf.accumulate(step, 1) is step
    wrapped = xf.accumulate(step, 4)
    assert wrapped.__name__ == "step" and wrapped.xform.setting("accumulate", "steps") == 4 and wrapped.__wrapped__ is step


def test_equals_the_full_batch_step():
    ref, acc = assert_accumulate_equivalent(step, make_state, batch(8), 4)
    assert acc.step == ref.step == 3 and acc.data["consumed"] == 3


def test_token_loss_with_uneven_counts_equals_the_full_batch_step():
    assert_accumulate_equivalent(token_step, lambda: make_state(sizes=(4, 8, 3)), token_batch(), 4)


def test_a_micro_batch_without_any_item_is_fine():
    b = token_batch()
    b["y"][:2] = -100  # the first micro-batch of 2 rows holds no valid token
    assert_accumulate_equivalent(token_step, lambda: make_state(sizes=(4, 8, 3)), b, 2)


def test_averaging_per_micro_batch_means_is_not_the_full_batch_mean():
    """The negative control of the token test: a per-micro-batch mean loss weights a
    micro-batch with 1 token like one with 4, and the check above catches it."""

    def mean_step(state, b):
        def loss_fn(p):
            logits = xf.apply(state, p, b["x"])
            return F.cross_entropy(logits.flatten(0, -2), b["y"].flatten(), ignore_index=-100)

        loss, grads = xf.value_and_grad(loss_fn)(state.params)
        return state.apply_gradients(grads), {"loss": loss}

    b = token_batch()
    b["y"][1, 0] = 1  # no micro-batch without tokens: its mean would be nan
    make = lambda: make_state(sizes=(4, 8, 3))  # noqa: E731
    assert_accumulate_equivalent(mean_step, make, {**b, "y": b["y"].clone().fill_(1)}, 4)  # even counts: fine
    with pytest.raises(AssertionError, match=r"accumulate\(step, 4\) vs step, after update 1: the states differ at"):
        assert_accumulate_equivalent(mean_step, make, b, 4)


def test_nested_accumulate_runs_the_product_of_micro_batches():
    make = lambda: make_state()  # noqa: E731
    nested, _ = xf.accumulate(xf.accumulate(step, 2), 3)(make(), batch(12))
    flat, _ = xf.accumulate(step, 6)(make(), batch(12))
    full, _ = step(make(), batch(12))
    assert nested.step == 1
    assert_states_close(nested, full, rtol=1e-6, atol=1e-7)
    assert_states_close(flat, full, rtol=1e-6, atol=1e-7)


def test_a_step_must_call_apply_gradients_exactly_once():
    def no_update(state, b):
        return state, {}

    def two_updates(state, b):
        _, grads = xf.value_and_grad(lambda p: F.cross_entropy(xf.apply(state, p, b["x"]), b["y"]))(state.params)
        state = state.apply_gradients(grads)
        return state.apply_gradients(grads), {}

    with pytest.raises(RuntimeError, match="accumulate: the step did not call state.apply_gradients on micro-batch 0; a step must call it exactly once"):
        xf.accumulate(no_update, 2)(make_state(), batch())
    with pytest.raises(RuntimeError, match="accumulate: the step called apply_gradients twice on micro-batch 0"):
        xf.accumulate(two_updates, 2)(make_state(), batch())



def test_accumulate_of_mixed_precision_runs_the_policy_once_per_step_outside_accumulate():
    """accumulate(mixed_precision(s)) runs as mixed_precision(accumulate(s)) (they mean the
    same; property_tests check the two handler orders agree bit for bit): the policy's
    handler sits outside accumulate's in every micro-batch, installed once per step."""
    seen = []

    def probe(state, b):
        seen.append(tuple(type(h).__module__.rsplit(".", 1)[-1] for h in handlers()))
        return step(state, b)

    wrapped = xf.accumulate(xf.mixed_precision(probe, "bf16"), 2)
    state, _ = wrapped(wrapped.init(make_state()), batch())
    assert seen == [("mixed_precision", "accumulate")] * 2 and state.step == 1
    assert wrapped.xform.names == ("mixed_precision", "accumulate")  # the record keeps what the user wrote


def test_a_function_wrapping_a_mixed_precision_step_still_runs_on_every_micro_batch():
    """functools.wraps copies the attributes of the mixed_precision step onto a wrapper;
    the rewrite above must not mistake the wrapper for that step and skip it."""
    mp_step = xf.mixed_precision(step, "bf16")
    calls = []

    @functools.wraps(mp_step)
    def logged(state, b):
        calls.append(b["x"].shape[0])
        return mp_step(state, b)

    state, _ = xf.accumulate(logged, 2)(mp_step.init(make_state()), batch(8))
    assert calls == [4, 4] and state.step == 1


# --- splitting ----------------------------------------------------------------------------


def test_split_batch_splits_tensors_and_repeats_the_rest():
    b = {"x": torch.arange(6).reshape(6, 1), "w": torch.tensor(2.0), "name": "abc", "pair": (torch.arange(6), 3)}
    pieces = split_batch("accumulate", b, 3)
    assert [p["x"].flatten().tolist() for p in pieces] == [[0, 1], [2, 3], [4, 5]]
    assert all(p["w"] is b["w"] and p["name"] == "abc" and p["pair"][1] == 3 for p in pieces)
    assert [p["pair"][0].tolist() for p in pieces] == [[0, 1], [2, 3], [4, 5]]


def test_split_batch_errors():
    with pytest.raises(ValueError, match=r"^accumulate: batch\['y'\] has leading size 6 but the batch size is 8 \(from batch\['x'\]\); every tensor"):
        split_batch("accumulate", {"x": torch.zeros(8), "y": torch.zeros(6)}, 2)
    with pytest.raises(ValueError, match="accumulate: the batch has no tensor with a batch dimension to split into 2 pieces"):
        split_batch("accumulate", {"n": 3, "w": torch.tensor(1.0)}, 2)


@pytest.mark.parametrize(
    "n, k, bigger, closest",
    [(30, 4, 32, 5), (7, 2, 8, 1), (10, 4, 12, 5), (9, 4, 12, 3), (1, 3, 3, 1)],
)
def test_the_suggested_fixes(n, k, bigger, closest):
    with pytest.raises(ValueError, match=rf"^accumulate: batch size {n} is not divisible by steps={k}; pass a batch of {bigger} or use steps={closest}$"):
        split_batch("accumulate", torch.zeros(n, 1), k)


# --- metrics ------------------------------------------------------------------------------


def test_combine_metrics():
    parts = [
        {"mean": xf.Mean(torch.tensor(6.0), 3), "loss": torch.tensor(1.0), "n": torch.tensor(2), "count": 2, "lr": 0.5, "flag": False, "tag": "a"},
        {"mean": xf.Mean(torch.tensor(4.0), 1), "loss": torch.tensor(3.0), "n": torch.tensor(5), "count": 3, "lr": 1.5, "flag": True, "tag": "b"},
    ]
    out = combine_metrics(parts)
    assert float(out["mean"]) == 2.5 and float(out["mean"].count) == 4
    assert out["loss"].item() == 2.0 and out["n"].item() == 7 and out["n"].dtype == torch.int64
    assert (out["count"], out["lr"], out["flag"], out["tag"]) == (5, 1.0, True, "b")


def test_combine_metrics_of_tensors_and_means_only_pools_the_same_way():
    """The dict of tensors and Means (the common metrics) is pooled without the pytree
    walk: floating tensors averaged, integer ones summed, Means pooled, as above."""
    parts = [
        {"loss": torch.tensor(1.0), "n": torch.tensor(2), "mean": xf.Mean(torch.tensor(6.0), 3)},
        {"loss": torch.tensor(2.0), "n": torch.tensor(5), "mean": xf.Mean(torch.tensor(4.0), 1)},
        {"loss": torch.tensor(6.0), "n": torch.tensor(1), "mean": xf.Mean(torch.tensor(2.0), 2)},
    ]
    out = combine_metrics(parts)
    assert out["loss"].item() == 3.0 and out["n"].item() == 8 and out["n"].dtype == torch.int64
    assert float(out["mean"]) == 2.0 and float(out["mean"].count) == 6
    with pytest.raises(ValueError):  # another key set in one micro-batch: refused, not half-pooled
        combine_metrics([parts[0], {"loss": torch.tensor(1.0)}])


def test_token_metric_pools_exactly():
    full, ref_metrics = token_step(make_state(), token_batch())
    _, metrics = xf.accumulate(token_step, 4)(make_state(), token_batch())
    assert int(metrics["loss"].count) == int(ref_metrics["loss"].count) == 8
    assert float(metrics["loss"]) == pytest.approx(float(ref_metrics["loss"]), rel=1e-6)


def test_mixing_plain_and_mean_losses_across_micro_batches_is_refused():
    def mixed(state, b):
        def loss_fn(p):
            total = F.cross_entropy(xf.apply(state, p, b["x"]), b["y"], reduction="sum")
            return xf.Mean(total, len(b["y"])) if bool(b["mean"][0]) else total / len(b["y"])

        loss, grads = xf.value_and_grad(loss_fn)(state.params)
        return state.apply_gradients(grads), {}

    b = {**batch(4), "mean": torch.tensor([True, True, False, False])}
    with pytest.raises(ValueError, match="accumulate: some micro-batches returned a plain loss and others an xf.Mean; return the same kind"):
        xf.accumulate(mixed, 2)(make_state(), b)


def test_grads_must_come_from_value_and_grad():
    def by_hand(state, b):
        loss = F.cross_entropy(xf.apply(state, state.params, b["x"]), b["y"])
        grads = dict(zip(state.params, torch.autograd.grad(loss, list(state.params.values()))))
        return state.apply_gradients(grads), {}

    assert by_hand(make_state(), batch())[0].step == 1  # fine without a reducing transform
    with pytest.raises(RuntimeError, match="apply_gradients: no xf.value_and_grad call preceded it inside this transform"):
        xf.accumulate(by_hand, 2)(make_state(), batch())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_gradient_is_bitwise_that_of_the_loss_divided_by_the_micro_batches(dtype):
    """A plain mean loss under accumulate is differentiated from 1/k instead of through
    ``loss / k`` (one op and one backward node less per micro-batch). Catches a start
    of another value than the division's (a division lost or applied twice, as the
    seeded mutations of the start show): the weights equal, bit for bit, those of the
    hand loop that divides the loss, over 3 updates of SGD (no Adam normalization
    hiding a scale) with k = 3 (not a power of two: rounding shows)."""
    k = 3
    xs = [batch(6, seed=s) for s in range(3)]
    model = mlp()
    params = list(model.parameters())
    opt = torch.optim.SGD(params, lr=0.5)
    for b in xs:
        grads = None
        for x, y in zip(b["x"].chunk(k), b["y"].chunk(k)):
            with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
                loss = F.cross_entropy(model(x).float(), y)
            g = torch.autograd.grad(loss / k, params)
            grads = list(g) if grads is None else [a + c for a, c in zip(grads, g)]
        for p, g in zip(params, grads):
            p.grad = g
        opt.step()
    policy = "fp32" if dtype == torch.float32 else "bf16"
    run = xf.accumulate(xf.mixed_precision(step, policy), k)
    state = run.init(xf.TrainState.create(mlp(), optimizer=torch.optim.SGD, lr=0.5))
    for b in xs:
        state, _ = run(state, b)
    for name, p in model.named_parameters():
        assert torch.equal(state.params[name], p.detach()), name


def _sgd_state(w: float) -> xf.TrainState:
    module = torch.nn.Module()
    module.w = torch.nn.Parameter(torch.tensor(w))
    return xf.TrainState.create(module, optimizer=torch.optim.SGD, lr=1.0)


def test_a_loss_that_is_a_parameter_itself_accumulates_right_on_every_call():
    """A leaf loss is differentiated from a fresh start, never the shared one: the
    autograd engine hands the start back as the gradient of a loss that is itself an
    input, and accumulate adds the next micro-batch into the gradient it adopted, which
    would change the start of every later call. The loss is a plain tensor (a Parameter
    takes the general objective path, which divides instead). Gradient of w is 1 per
    update, so w drops by 1 per call."""

    def leaf_step(state, b):
        w = state.params["w"].detach().requires_grad_()  # a plain leaf tensor over the param's storage
        loss, grads = xf.value_and_grad(lambda p: p["w"])({"w": w})
        return state.apply_gradients(grads), {"loss": loss}

    run = xf.accumulate(leaf_step, 2)
    state = _sgd_state(5.0)
    for _ in range(3):
        state, _ = run(state, torch.zeros(4, 1))
    assert float(state.params["w"].detach()) == 2.0


class _DoublesInPlace(torch.autograd.Function):
    """Identity forward; its backward doubles the incoming gradient in place."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        return g.mul_(2)


def test_a_backward_that_writes_into_its_incoming_gradient_does_not_leak_into_the_next_micro_batch():
    """Catches a reused backward start that a custom backward wrote into: the next
    micro-batch (and call) would start from the written value. Each micro-batch's
    gradient of 3*w is doubled: 6 per update, with 2 micro-batches as with one."""

    def doubling_step(state, b):
        loss, grads = xf.value_and_grad(lambda p: _DoublesInPlace.apply(p["w"] * 3.0))(state.params)
        return state.apply_gradients(grads), {}

    whole = _sgd_state(0.0)
    acc, run = _sgd_state(0.0), xf.accumulate(doubling_step, 2)
    for _ in range(3):
        whole, _ = doubling_step(whole, torch.zeros(4, 1))
        acc, _ = run(acc, torch.zeros(4, 1))
    assert float(whole.params["w"]) == -18.0 and float(acc.params["w"]) == -18.0


def test_a_loss_of_one_element_but_not_zero_dimensions_accumulates():
    """A loss of shape (1,) (``_check_scalar`` takes any one-element tensor): the
    gradient the backward pass starts from has the loss's shape, or autograd refuses it."""

    def shaped_step(state, b):
        def loss_fn(p):
            return F.cross_entropy(xf.apply(state, p, b["x"]), b["y"]).reshape(1)

        loss, grads = xf.value_and_grad(loss_fn)(state.params)
        return state.apply_gradients(grads), {"loss": loss}

    assert_accumulate_equivalent(shaped_step, make_state, batch(8), 2)
