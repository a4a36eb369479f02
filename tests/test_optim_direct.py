"""The direct optimizer update (``xform/core/optim.py``: torch's functional Adam/SGD called
on lists gathered once, instead of ``optimizer.step()``) must be ``step()`` bit for bit, and
must step aside whenever something observes ``step()``.

Each equivalence test runs the same gradients through an xform state and through the
torch optimizer a hand-written loop would use, and compares params and optimizer state
exactly (``torch.equal``). It also checks that the direct path actually ran (a test that
passed on the fallback would prove nothing)."""

import functools

import pytest
import torch
from torch.optim.optimizer import register_optimizer_step_post_hook

import xform as xf
from xform.core import optim as xopt


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3))


def _grads(i, shapes):
    g = torch.Generator().manual_seed(100 + i)
    return [torch.randn(s, generator=g) * (1 + i) for s in shapes]


def _two_groups(cls, **kw):
    """A factory that puts the weights and the biases in groups with other lr and decay
    (the order of the groups' params differs from the state's)."""

    def make(params):
        weights = [p for p in params if p.dim() > 1]
        biases = [p for p in params if p.dim() == 1]
        return cls([{"params": biases, "lr": 0.05, "weight_decay": 0.0}, {"params": weights}], **kw)

    return make


CONFIGS = {
    # name: (optimizer argument of TrainState.create, its kwargs, the bug it catches)
    "adamw": (torch.optim.AdamW, {"lr": 1e-2, "weight_decay": 0.1}),  # a dropped decoupled decay
    "adam_amsgrad": (torch.optim.Adam, {"lr": 1e-2, "amsgrad": True, "weight_decay": 0.01}),  # amsgrad's max list
    "adam_maximize_betas": (torch.optim.Adam, {"lr": 1e-2, "betas": (0.5, 0.9), "maximize": True}),
    "adam_single_tensor": (torch.optim.Adam, {"lr": 1e-2, "foreach": False}),
    "adam_fused": (torch.optim.AdamW, {"lr": 1e-2, "fused": True}),
    "sgd": (torch.optim.SGD, {"lr": 0.1}),  # no state at all
    "sgd_nesterov": (torch.optim.SGD, {"lr": 0.1, "momentum": 0.9, "nesterov": True, "weight_decay": 0.01}),
    "sgd_dampening": (torch.optim.SGD, {"lr": 0.1, "momentum": 0.8, "dampening": 0.3}),
    "two_groups_adamw": (_two_groups(torch.optim.AdamW, lr=1e-2, weight_decay=0.1), {}),  # group order
    "two_groups_sgd": (_two_groups(torch.optim.SGD, lr=0.1, momentum=0.9), {}),
}


def _reference(optimizer, kwargs, model, schedule=None):
    params = list(model.parameters())
    if isinstance(optimizer, type):
        kw = dict(kwargs)
        if schedule is not None:
            kw["lr"] = schedule(0)
        kw.setdefault("foreach", True) if "fused" not in kw else None
        return torch.optim.__dict__[optimizer.__name__](params, **kw), params
    return optimizer(params), params


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_direct_update_is_optimizer_step_bit_for_bit(name):
    optimizer, kwargs = CONFIGS[name]
    state = xf.TrainState.create(_model(), optimizer=optimizer, **kwargs)
    ref_opt, ref_params = _reference(optimizer, kwargs, _model())
    shapes = [p.shape for p in ref_params]
    for i in range(5):  # the first update runs step() (the state is created), the rest the direct path
        grads = _grads(i, shapes)
        state = state.apply_gradients(dict(zip(state.params, [g.clone() for g in grads])))
        for p, g in zip(ref_params, grads):
            p.grad = g.clone()
        ref_opt.step()
    plan = state._runtime("test").optimizer.__dict__.get("_xform_direct")
    assert isinstance(plan, xopt._DirectUpdate), f"the direct path did not run for {name}: {plan!r}"
    for (k, p), q in zip(state.params.items(), ref_params):
        assert torch.equal(p.detach(), q.detach()), f"{name}: param {k} differs from optimizer.step()'s"
        for key, v in ref_opt.state.get(q, {}).items():
            mine = state.opt_state["state"][k][key]
            assert torch.equal(mine, v), f"{name}: optimizer state {k}.{key} differs"


def test_direct_update_reads_the_schedule_and_clipping_each_step():
    """Catches a learning rate read once when the lists are gathered (the schedule would
    stop at the second step) and clipping skipped on the direct path."""

    def schedule(step):
        return 0.1 / (1 + step)

    state = xf.TrainState.create(_model(), optimizer=torch.optim.SGD, lr=schedule, momentum=0.9, max_grad_norm=0.5)
    ref_opt, ref_params = _reference(torch.optim.SGD, {"momentum": 0.9}, _model(), schedule)
    for i in range(4):
        grads = _grads(i, [p.shape for p in ref_params])
        state = state.apply_gradients(dict(zip(state.params, [g.clone() for g in grads])))
        for p, g in zip(ref_params, grads):
            p.grad = g
        torch.nn.utils.clip_grad_norm_(ref_params, 0.5, foreach=True)  # the hand loop's clipping
        for g in ref_opt.param_groups:
            g["lr"] = schedule(i)
        ref_opt.step()
        # clip_grad_norm_ scales by clamp(max/(norm+1e-6), max=1), as xform does: equal up to rounding
        for p, q in zip(state.params.values(), ref_params):
            torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-6, atol=1e-7)
    assert isinstance(state._runtime("test").optimizer.__dict__.get("_xform_direct"), xopt._DirectUpdate)


def test_a_step_hook_or_a_profiler_gets_optimizer_step():
    """Catches the direct path skipping what observes ``step()``: a global step hook must
    run on every update, and a profiler must see the ``Optimizer.step`` range."""
    state = xf.TrainState.create(_model(), optimizer=torch.optim.AdamW, lr=1e-2)
    names = list(state.params)
    shapes = [p.shape for p in state.params.values()]
    for i in range(2):
        state = state.apply_gradients(dict(zip(names, _grads(i, shapes))))
    calls = []
    handle = register_optimizer_step_post_hook(lambda opt, args, kwargs: calls.append(1))
    try:
        state = state.apply_gradients(dict(zip(names, _grads(2, shapes))))
    finally:
        handle.remove()
    assert calls == [1], "a global optimizer step hook did not run: the direct path ignored it"
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        state = state.apply_gradients(dict(zip(names, _grads(3, shapes))))
    assert any("Optimizer.step" in e.name for e in prof.events()), "the profiler saw no Optimizer.step range"


def test_the_plan_follows_a_reloaded_optimizer_state():
    """Catches lists gathered once and kept after ``load_state_dict`` replaced the
    optimizer's state tensors: the update would land in tensors the optimizer dropped."""
    model = _model()
    params = list(model.parameters())
    opt = torch.optim.AdamW(params, lr=1e-2, foreach=True)
    ref_model = _model()
    ref_params = list(ref_model.parameters())
    ref = torch.optim.AdamW(ref_params, lr=1e-2, foreach=True)
    shapes = [p.shape for p in params]
    for i in range(3):
        grads = _grads(i, shapes)
        if i == 0:  # creates the state
            for p, g in zip(params, grads):
                p.grad = g.clone()
            with torch.no_grad():
                opt.step()
            for p in params:
                p.grad = None
        else:
            if i == 2:
                opt.load_state_dict(opt.state_dict())  # new state tensors
            plan = xopt._direct(opt, params)
            assert plan is not None
            with torch.no_grad():
                plan([g.clone() for g in grads])
        for p, g in zip(ref_params, grads):
            p.grad = g.clone()
        ref.step()
    for p, q in zip(params, ref_params):
        assert torch.equal(p.detach(), q.detach())
        assert torch.equal(opt.state[p]["exp_avg"], ref.state[q]["exp_avg"]), "the update missed the reloaded state"


def test_other_optimizers_keep_optimizer_step():
    """A subclass with its own ``step`` (or any other optimizer) is never called directly."""

    class Halved(torch.optim.SGD):
        def step(self, closure=None):
            for g in self.param_groups:
                g["lr"] = 0.05
            return super().step(closure)

    for factory in (functools.partial(Halved, lr=0.1), functools.partial(torch.optim.RMSprop, lr=0.01)):
        state = xf.TrainState.create(_model(), optimizer=factory)
        shapes = [p.shape for p in state.params.values()]
        for i in range(3):
            state = state.apply_gradients(dict(zip(state.params, _grads(i, shapes))))
        assert state._runtime("test").optimizer.__dict__.get("_xform_direct") is xopt._NOT_DIRECT
