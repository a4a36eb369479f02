"""The primitives ``apply`` and ``value_and_grad``, their randomness, and the handler
stack."""

import pytest
import torch
import torch.nn.functional as F

import xform as xf

from _util import batch, make_state, step


def test_apply_runs_the_module_with_the_states_params():
    state = make_state()
    x = batch()["x"]
    out = xf.apply(state, state.params, x)
    expected = torch.func.functional_call(state.module, dict(state.params), (x,))
    assert torch.equal(out, expected)


def test_apply_with_other_params_uses_them():
    state = make_state()
    x = batch()["x"]
    doubled = {k: v * 2 for k, v in state.params.items()}
    out = xf.apply(state, doubled, x)
    assert torch.equal(out, torch.func.functional_call(state.module, doubled, (x,)))
    assert not torch.equal(out, xf.apply(state, state.params, x))


def test_apply_randomness_comes_from_the_state():
    state = make_state(dropout=0.5, sizes=(4, 64, 3))
    x = batch()["x"]
    a = xf.apply(state, state.params, x)
    b = xf.apply(state.copy(), state.params, x)
    assert torch.equal(a, b)
    other_key = xf.apply(state.replace(rng=1), state.params, x)
    other_position = xf.apply(state.replace(data={**state.data, "consumed": 1}), state.params, x)
    assert not torch.equal(a, other_key) and not torch.equal(a, other_position)


def test_apply_leaves_the_global_rng_alone():
    state = make_state(dropout=0.5, sizes=(4, 64, 3))
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    xf.apply(state, state.params, batch()["x"])
    step(state, batch())
    assert torch.equal(torch.rand(3), expected)


def test_dropout_masks_differ_between_steps_and_apply_calls():
    seen = []

    def two_calls(state, b):
        def loss_fn(p):
            first = xf.apply(state, p, b["x"])
            second = xf.apply(state, p, b["x"])
            seen.append(torch.equal(first, second))
            return F.cross_entropy(first + second, b["y"])

        loss, grads = xf.value_and_grad(loss_fn)(state.params)
        return state.apply_gradients(grads), {"loss": loss}

    state = make_state(dropout=0.5, sizes=(4, 64, 3))
    state, m1 = two_calls(state, batch())
    state, m2 = two_calls(state, batch())
    assert seen == [False, False]
    assert not torch.equal(m1["loss"], m2["loss"])


def test_value_and_grad_matches_autograd():
    state = make_state()
    b = batch()
    loss, grads = xf.value_and_grad(lambda p: F.cross_entropy(xf.apply(state, p, b["x"]), b["y"]))(state.params)
    ref = F.cross_entropy(state.module(b["x"]), b["y"])
    ref_grads = torch.autograd.grad(ref, list(state.params.values()))
    assert torch.equal(loss, ref.detach()) and not loss.requires_grad
    assert list(grads) == list(state.params)
    assert all(torch.equal(grads[k], g) for k, g in zip(state.params, ref_grads))


def test_value_and_grad_has_aux():
    state = make_state()
    b = batch()

    def loss_fn(p):
        logits = xf.apply(state, p, b["x"])
        return F.cross_entropy(logits, b["y"]), {"acc": (logits.argmax(-1) == b["y"]).float().mean()}

    (loss, aux), grads = xf.value_and_grad(loss_fn, has_aux=True)(state.params)
    assert loss.dim() == 0 and set(aux) == {"acc"} and len(grads) == 4
    with pytest.raises(ValueError, match=r"xf.value_and_grad: with has_aux=True the function must return \(loss, aux\), got Tensor"):
        xf.value_and_grad(lambda p: xf.apply(state, p, b["x"]).sum(), has_aux=True)(state.params)


def test_value_and_grad_of_a_mean_is_the_gradient_of_the_ratio():
    state = make_state()
    b = batch()
    out = lambda p: F.cross_entropy(xf.apply(state, p, b["x"]), b["y"], reduction="sum")  # noqa: E731
    value, grads = xf.value_and_grad(lambda p: xf.Mean(out(p), 8))(state.params)
    _, expected = xf.value_and_grad(lambda p: out(p) / 8)(state.params)
    assert isinstance(value, xf.Mean) and value.count == 8 and not value.total.requires_grad
    assert all(torch.equal(grads[k], expected[k]) for k in grads)


def test_unused_params_get_zero_grads():
    state = make_state()
    _, grads = xf.value_and_grad(lambda p: xf.apply(state, p, batch()["x"])[:, 0].sum() * 0 + p["2.bias"].sum())(
        state.params
    )
    assert torch.equal(grads["2.bias"], torch.ones(3))


@pytest.mark.parametrize(
    "loss, desc",
    [
        (lambda out: out, r"a \(8, 3\) torch.float32 tensor"),
        (lambda out: out.sum().long(), r"a \(\) torch.int64 tensor"),
        (lambda out: 1.5, "float"),
    ],
    ids=["vector", "integer", "python-float"],
)
def test_value_and_grad_requires_a_scalar_loss(loss, desc):
    state = make_state()
    with pytest.raises(ValueError, match=rf"xf.value_and_grad: the loss must be a scalar floating-point tensor or xf.Mean, got {desc}; reduce it"):
        xf.value_and_grad(lambda p: loss(xf.apply(state, p, batch()["x"])))(state.params)


def test_value_and_grad_rejects_bad_arguments():
    state = make_state()
    with pytest.raises(TypeError, match="xf.value_and_grad: expected a function of params, got int"):
        xf.value_and_grad(3)
    with pytest.raises(TypeError, match=r"params must be a dict of name to tensor \(state.params\), got list"):
        xf.value_and_grad(lambda p: p[0].sum())(list(state.params.values()))


def test_a_failing_step_leaves_no_handler_installed():
    """Handlers are scoped to a call: after accumulate's step raises, a plain step
    updates at once (no accumulate handler is left on the stack to absorb it)."""

    def failing(state, b):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        xf.accumulate(failing, 2)(make_state(), batch())
    new, _ = step(make_state(), batch())
    assert new.step == 1


def test_the_engine_call_equals_autograd_grad_and_leaves_overriding_tensors_to_it():
    """``_grad`` calls the autograd engine directly (5 us less per backward). Catches a
    call that differs from ``torch.autograd.grad``: another start (ones by default),
    another input order, a lost unused input; and a tensor subclass whose
    ``__torch_function__`` overrides ``grad`` must still see the call."""
    from xform.core.primitives import _grad

    torch.manual_seed(0)
    w, b, unused = torch.randn(3, 2, requires_grad=True), torch.randn(2, requires_grad=True), torch.randn(2, requires_grad=True)
    x = torch.randn(4, 3)
    for seed in (None, torch.tensor(0.25)):
        loss = (x @ w + b).square().mean()
        ref = torch.autograd.grad(loss, (b, unused, w), seed, allow_unused=True, retain_graph=True)
        got = _grad(loss, (b, unused, w), seed)
        assert got[1] is None and ref[1] is None
        assert torch.equal(got[0], ref[0]) and torch.equal(got[2], ref[2])

    seen = []

    class Logged(torch.Tensor):
        @classmethod
        def __torch_function__(cls, func, types, args=(), kwargs=None):
            seen.append(getattr(func, "__name__", func))
            return super().__torch_function__(func, types, args, kwargs or {})

    v = torch.randn(3, requires_grad=True).as_subclass(Logged)
    _grad((v * 2).sum(), (v,), None)
    assert "grad" in seen


@pytest.mark.parametrize("loss_of", ["the parameter", "a view of it", "an xf.Mean of it"])
def test_the_loss_value_is_the_one_before_the_update(loss_of):
    """A loss that is a parameter or a view of one: ``loss.detach()`` would share the
    parameter's storage, and the metrics would show the value after the in-place
    update. Catches a value that aliases what the update writes: w = 3 before an SGD
    update with gradient 1 and lr 1, so the metric is 3 and w becomes 2."""
    module = torch.nn.Module()
    module.w = torch.nn.Parameter(torch.tensor([3.0]))
    state = xf.TrainState.create(module, optimizer=torch.optim.SGD, lr=1.0)
    fns = {
        "the parameter": lambda p: p["w"],
        "a view of it": lambda p: p["w"][0],
        "an xf.Mean of it": lambda p: xf.Mean(p["w"][0], 1),
    }
    loss, grads = xf.value_and_grad(fns[loss_of])(state.params)
    state = state.apply_gradients(grads)
    value = loss.value if isinstance(loss, xf.Mean) else loss
    assert float(state.params["w"].detach()[0]) == 2.0 and float(value.reshape(())) == 3.0
