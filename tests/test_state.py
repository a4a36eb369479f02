"""TrainState: construction, leaves, functional updates, donation, and the optimizer
update checked against hand-written torch loops."""

import copy
import functools

import attrs
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import xform as xf
from xform.testing import assert_states_close

from _util import batch, init, make_state, mlp, run, snapshot, step


def torch_loop(model, optimizer, batches, *, clip=None, lrs=None):
    """The hand-written loop an xform step must equal: backward, clip, step."""
    losses = []
    for i, b in enumerate(batches):
        optimizer.zero_grad()
        loss = F.cross_entropy(model(b["x"]), b["y"])
        loss.backward()
        if clip is not None:
            torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], clip, foreach=True)
        if lrs is not None:
            for group in optimizer.param_groups:
                group["lr"] = lrs(i)
        optimizer.step()
        losses.append(loss.detach())
    return losses


def assert_matches_module(state, model):
    for name, p in model.named_parameters():
        assert torch.equal(state.params[name], p), name
    for name, b in model.named_buffers():
        assert torch.equal(state.buffers[name], b), name


BATCHES = [batch(seed=s) for s in range(4)]


# --- create -------------------------------------------------------------------------------


def test_create_with_class_and_kwargs():
    model = mlp()
    state = xf.TrainState.create(model, optimizer=torch.optim.AdamW, lr=1e-3, seed=7)
    assert state.step == 0 and state.rng == 7
    assert state.data == {"seed": 7, "consumed": 0}
    assert state.transforms == {"nonfinite": {"skipped": 0, "consecutive": 0}}
    assert list(state.params) == [n for n, _ in model.named_parameters()]
    assert state.module is model
    # The optimizer state's structure exists before the first update (for load(like=...)).
    assert state.opt_state["initialized"] is False
    entry = state.opt_state["state"]["0.weight"]
    assert sorted(entry) == ["exp_avg", "exp_avg_sq", "step"]
    assert entry["exp_avg"].shape == model[0].weight.shape


def test_create_with_class_equals_hand_written_loop_bit_for_bit():
    model = mlp()
    reference = copy.deepcopy(model)
    ref_opt = torch.optim.AdamW(reference.parameters(), lr=1e-2, foreach=True)
    state, losses = run(step, xf.TrainState.create(model, optimizer=torch.optim.AdamW, lr=1e-2), BATCHES)
    assert all(torch.equal(a, b) for a, b in zip(losses, torch_loop(reference, ref_opt, BATCHES)))
    assert_matches_module(state, reference)
    assert state.step == 4 and state.data["consumed"] == 4
    assert state.opt_state["initialized"] is True
    assert float(state.opt_state["state"]["0.weight"]["step"]) == 4


@pytest.mark.parametrize(
    "factory",
    [
        functools.partial(torch.optim.AdamW, lr=1e-2, foreach=True),
        lambda params: torch.optim.AdamW(params, lr=1e-2, foreach=True),
    ],
    ids=["partial", "lambda"],
)
def test_create_with_factory_equals_class_and_kwargs(factory):
    by_class, _ = run(step, make_state(optimizer=torch.optim.AdamW, lr=1e-2), BATCHES)
    by_factory, _ = run(step, xf.TrainState.create(mlp(), optimizer=factory), BATCHES)
    assert_states_close(by_factory, by_class)


def test_create_with_sgd_lambda_matches_torch():
    model = mlp()
    reference = copy.deepcopy(model)
    ref_opt = torch.optim.SGD(reference.parameters(), lr=0.1, momentum=0.9)
    state = xf.TrainState.create(model, optimizer=lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9))
    assert sorted(state.opt_state["state"]["0.weight"]) == ["momentum_buffer"]
    state, losses = run(step, state, BATCHES)
    assert all(torch.equal(a, b) for a, b in zip(losses, torch_loop(reference, ref_opt, BATCHES)))
    assert_matches_module(state, reference)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(module="not a module", optimizer=torch.optim.SGD, lr=0.1), TypeError, "module must be a torch.nn.Module, got str"),
        (dict(optimizer=torch.optim.SGD(mlp().parameters(), lr=0.1)), TypeError, r"got an optimizer instance \(SGD\); pass optimizer=SGD"),
        (dict(optimizer="adamw"), TypeError, "optimizer must be a torch.optim.Optimizer subclass or a callable"),
        (dict(optimizer=functools.partial(torch.optim.SGD, lr=0.1), momentum=0.9), TypeError, r"\['momentum'\].*bind them in the factory"),
        (dict(optimizer=lambda ps: "sgd"), TypeError, "the optimizer factory returned str, not a torch.optim.Optimizer"),
        (dict(optimizer=torch.optim.SGD, lr=0.1, seed=1.5), TypeError, "seed must be an int, got 1.5"),
        (dict(optimizer=torch.optim.SGD, lr=0.1, seed=True), TypeError, "seed must be an int, got True"),
        (dict(optimizer=torch.optim.SGD, lr=0.1, max_grad_norm=0.0), ValueError, "max_grad_norm must be > 0 or None, got 0.0"),
        (dict(optimizer=torch.optim.AdamW, lrr=1e-3), TypeError, "lrr"),
        (dict(optimizer=torch.optim.AdamW, lr=-1.0), ValueError, "Invalid learning rate: -1.0"),
        (dict(optimizer=torch.optim.AdamW, betas=(0.9, 1.5)), ValueError, "Invalid beta parameter"),
    ],
    ids=["module", "instance", "not-callable", "factory-kwargs", "factory-returns", "seed-float",
         "seed-bool", "max-grad-norm", "unknown-kwarg", "negative-lr", "bad-beta"],
)
def test_create_rejects_bad_arguments(kwargs, error, match):
    module = kwargs.pop("module", mlp())
    with pytest.raises(error, match=match) as info:
        xf.TrainState.create(module, **kwargs)
    # Errors name the API; an unknown optimizer keyword is torch's own TypeError, which
    # names the optimizer and the keyword.
    assert str(info.value).startswith("TrainState.create: ")


def test_create_rejects_a_module_without_parameters():
    with pytest.raises(ValueError, match="TrainState.create: the module has no parameters to train"):
        xf.TrainState.create(nn.ReLU(), optimizer=torch.optim.SGD, lr=0.1)


def test_create_rejects_parameters_on_several_devices():
    model = mlp()
    model[2].to("meta")
    with pytest.raises(ValueError, match=r"parameters are on several devices \['cpu', 'meta'\]; move the module"):
        xf.TrainState.create(model, optimizer=torch.optim.SGD, lr=0.1)


# --- leaves and functional updates ----------------------------------------------------------


def test_state_is_frozen():
    state = make_state()
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        state.step = 3


def test_replace_returns_a_new_state_and_leaves_the_old_one():
    state = make_state()
    new = state.replace(step=5, rng=11)
    assert (new.step, new.rng) == (5, 11)
    assert (state.step, state.rng) == (0, 0)
    assert new.params is state.params  # leaves not replaced are shared, as in flax
    with pytest.raises(TypeError, match=r"TrainState.replace: unknown field\(s\) \['stpe'\]; the fields are \["):
        state.replace(stpe=1)


def test_replace_params_trains_from_the_new_params():
    state = make_state()
    zeros = {k: torch.zeros_like(v) for k, v in state.params.items()}
    new, _ = step(state.replace(params=zeros), batch())
    assert new.step == 1
    # Cross-entropy of zero logits: only the last layer's bias gets a gradient at first.
    assert torch.count_nonzero(new.params["2.bias"]) == 3 and torch.count_nonzero(new.params["0.weight"]) == 0
    # The old state shares its buffers and optimizer state with the new one, which the
    # update changed in place: it is donated with it rather than silently stale.
    with pytest.raises(xf.DonatedStateError, match="donated to the update that produced step 1"):
        state.params


def test_copy_is_independent_and_equal():
    state, _ = run(step, make_state(), BATCHES[:2])
    dup = state.copy()
    assert_states_close(dup, state)
    ptrs = {t.untyped_storage().data_ptr() for t in xf.tree.leaves(state) if isinstance(t, torch.Tensor)}
    assert not any(t.untyped_storage().data_ptr() in ptrs for t in xf.tree.leaves(dup) if isinstance(t, torch.Tensor))


def test_repr():
    state = make_state()
    assert repr(state) == "TrainState(step=0, params=4 tensors/67 values, module=Sequential, transforms=[])"
    step(state, batch())
    assert repr(state) == "TrainState(<donated to the update that produced step 1>)"


# --- donation -----------------------------------------------------------------------------


@pytest.mark.parametrize("field", ["step", "params", "buffers", "opt_state", "rng", "data", "transforms"])
def test_every_leaf_of_a_donated_state_raises(field):
    state = make_state()
    new, _ = step(state, batch())
    assert state.donated and not new.donated
    with pytest.raises(xf.DonatedStateError, match=rf"TrainState.{field}: this TrainState was donated .* step 1.*state.copy\(\)"):
        getattr(state, field)


@pytest.mark.parametrize(
    "use",
    [
        lambda s: s.replace(step=1),
        lambda s: s.copy(),
        lambda s: s.apply_gradients({}),
        lambda s: step(s, batch()),
        lambda s: xf.tree.leaves(s),
        lambda s: xf.apply(s, s._params, torch.ones(1, 4)),
    ],
    ids=["replace", "copy", "apply_gradients", "step", "tree", "apply"],
)
def test_every_use_of_a_donated_state_raises(use):
    state = make_state()
    step(state, batch())
    with pytest.raises(xf.DonatedStateError):
        use(state)


def test_apply_gradients_without_donation_keeps_the_state():
    state = make_state()
    before = state.copy()
    b = batch()
    _, grads = xf.value_and_grad(lambda p: F.cross_entropy(xf.apply(state, p, b["x"]), b["y"]))(state.params)
    kept = state.apply_gradients({k: g.clone() for k, g in grads.items()}, donate=False)
    assert not state.donated and kept.step == 1
    assert_states_close(state, before)
    donated = state.apply_gradients(grads)
    assert state.donated
    assert_states_close(kept, donated)


def test_stepping_a_copy_leaves_the_state_bit_identical():
    state, _ = run(step, make_state(dropout=0.5, sizes=(4, 16, 3)), BATCHES[:2])
    before = snapshot(state)
    step(state.copy(), batch(seed=9))
    after = snapshot(state)
    assert [p for p, _ in after] == [p for p, _ in before]
    for (path, a), (_, b) in zip(after, before):
        assert (torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b), path


@pytest.mark.parametrize("how", ["replace", "init"])
def test_a_state_sharing_tensors_with_a_donated_one_is_not_silently_stale(how):
    """DESIGN.md: "touching a donated state raises a clear error ... Nothing is ever
    silently stale." A state made by ``replace`` (or by ``step.init``, which uses it)
    shares its tensors; when the new state is donated, the old one must raise
    DonatedStateError on access or keep its values, not show the updated tensors.
    """
    state = make_state()
    before = state.params["0.weight"].clone()
    if how == "replace":
        step_fn, derived = step, state.replace(rng=1)
    else:
        step_fn = xf.mixed_precision(step, "fp16")
        derived = step_fn.init(state)
    step_fn(derived, batch())
    try:
        weight = state.params["0.weight"]
    except xf.DonatedStateError:
        return
    if not torch.equal(weight, before):
        pytest.fail(f"after stepping a state made by {how}, the old state silently shows the updated tensors")


# --- apply_gradients ------------------------------------------------------------------------


def grads_of(state, b=None):
    b = b or batch()
    return xf.value_and_grad(lambda p: F.cross_entropy(xf.apply(state, p, b["x"]), b["y"]))(state.params)[1]


def test_apply_gradients_rejects_wrong_keys():
    state = make_state()
    grads = grads_of(state)
    missing = {k: v for k, v in grads.items() if k != "0.bias"}
    with pytest.raises(ValueError, match=r"missing \['0.bias'\], unexpected \[\]; pass the grads xf.value_and_grad returned"):
        state.apply_gradients(missing)
    with pytest.raises(ValueError, match=r"missing \[\], unexpected \['extra'\]"):
        state.apply_gradients({**grads, "extra": torch.zeros(1)})
    with pytest.raises(TypeError, match="grads must be a dict of parameter name to tensor, got list"):
        state.apply_gradients(list(grads.values()))
    assert not state.donated  # a refused update donates nothing
    assert state.apply_gradients(grads).step == 1


def test_lr_schedule_is_evaluated_at_each_step():
    schedule = lambda i: 0.1 / (1 + i)  # noqa: E731
    model = mlp()
    reference = copy.deepcopy(model)
    ref_opt = torch.optim.SGD(reference.parameters(), lr=schedule(0))
    state = xf.TrainState.create(model, optimizer=torch.optim.SGD, lr=schedule)
    state, losses = run(step, state, BATCHES)
    assert all(torch.equal(a, b) for a, b in zip(losses, torch_loop(reference, ref_opt, BATCHES, lrs=schedule)))
    assert_matches_module(state, reference)
    constant, _ = run(step, make_state(optimizer=torch.optim.SGD, lr=0.1), BATCHES)
    assert not torch.equal(constant.params["0.weight"], state.params["0.weight"])


def test_max_grad_norm_clips_like_torch():
    model = mlp()
    reference = copy.deepcopy(model)
    ref_opt = torch.optim.SGD(reference.parameters(), lr=0.5)
    state = xf.TrainState.create(model, optimizer=torch.optim.SGD, lr=0.5, max_grad_norm=0.05)
    state, losses = run(step, state, BATCHES)
    assert all(torch.equal(a, b) for a, b in zip(losses, torch_loop(reference, ref_opt, BATCHES, clip=0.05)))
    assert_matches_module(state, reference)
    # The gradient norm is well above 0.05, so the first update is exactly lr * 0.05 long.
    g = grads_of(make_state(optimizer=torch.optim.SGD, lr=0.5), batch(seed=0))
    assert torch.stack([v.norm() for v in g.values()]).norm() > 4 * 0.05
    clipped, _ = step(xf.TrainState.create(mlp(), optimizer=torch.optim.SGD, lr=0.5, max_grad_norm=0.05), batch(seed=0))
    start = make_state(optimizer=torch.optim.SGD, lr=0.5)
    delta = torch.stack([(clipped.params[k] - start.params[k]).detach().norm() for k in start.params]).norm()
    assert float(delta) == pytest.approx(0.5 * 0.05, rel=1e-4)


class Frozen(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Linear(4, 8)
        self.head = nn.Linear(8, 3)
        self.body.weight.requires_grad_(False)

    def forward(self, x):
        return self.head(torch.relu(self.body(x)))


def test_frozen_params_get_no_grads_and_do_not_change():
    model = Frozen()
    reference = copy.deepcopy(model)
    ref_opt = torch.optim.AdamW([p for p in reference.parameters() if p.requires_grad], lr=1e-2, foreach=True)
    state = xf.TrainState.create(model, optimizer=torch.optim.AdamW, lr=1e-2)
    frozen = state.params["body.weight"].clone()
    assert "body.weight" in state.params and "body.weight" not in state.opt_state["state"]
    assert sorted(grads_of(state)) == ["body.bias", "head.bias", "head.weight"]
    with pytest.raises(ValueError, match=r"unexpected \['body.weight'\]"):
        state.apply_gradients({**grads_of(state), "body.weight": torch.zeros(8, 4)})
    state, losses = run(step, state, BATCHES)
    assert all(torch.equal(a, b) for a, b in zip(losses, torch_loop(reference, ref_opt, BATCHES)))
    assert_matches_module(state, reference)
    assert torch.equal(state.params["body.weight"], frozen)
    # Still frozen after a copy (whose tensors are plain detached clones).
    again = state.copy()
    assert sorted(grads_of(again)) == ["body.bias", "head.bias", "head.weight"]


class TiedBN(nn.Module):
    """Tied input/output embeddings and a BatchNorm: shared params and buffers."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(10, 6)
        self.bn = nn.BatchNorm1d(6)
        self.out = nn.Linear(6, 10, bias=False)
        self.out.weight = self.emb.weight

    def forward(self, x):
        return self.out(torch.relu(self.bn(self.emb(x))))


def token_batches(n=4):
    g = torch.Generator().manual_seed(3)
    return [{"x": torch.randint(0, 10, (8,), generator=g), "y": torch.randint(0, 10, (8,), generator=g)} for _ in range(n)]


def test_tied_weights_and_batchnorm_buffers_match_torch():
    model = TiedBN()
    reference = copy.deepcopy(model)
    ref_opt = torch.optim.AdamW(reference.parameters(), lr=1e-2, foreach=True)
    state = xf.TrainState.create(model, optimizer=torch.optim.AdamW, lr=1e-2)
    assert list(state.params) == ["emb.weight", "bn.weight", "bn.bias"]  # one entry for the tied pair
    assert list(state.buffers) == ["bn.running_mean", "bn.running_var", "bn.num_batches_tracked"]
    batches = token_batches()
    state, losses = run(step, state, batches)
    assert all(torch.equal(a, b) for a, b in zip(losses, torch_loop(reference, ref_opt, batches)))
    assert_matches_module(state, reference)
    assert int(state.buffers["bn.num_batches_tracked"]) == 4
    assert model.out.weight is model.emb.weight is state.params["emb.weight"]


def test_tied_weights_and_buffers_survive_copy():
    batches = token_batches(6)
    straight, _ = run(step, xf.TrainState.create(TiedBN(), optimizer=torch.optim.AdamW, lr=1e-2), batches)
    half, _ = run(step, xf.TrainState.create(TiedBN(), optimizer=torch.optim.AdamW, lr=1e-2), batches[:3])
    before = snapshot(half)
    resumed, _ = run(step, half.copy(), batches[3:])
    assert_states_close(resumed, straight)
    # The copy's BatchNorm updated its own buffers, not the original's.
    assert all(torch.equal(a, b) for (_, a), (_, b) in zip(snapshot(half), before) if isinstance(a, torch.Tensor))


def test_transforms_copy_and_init_are_composable():
    fp16 = xf.mixed_precision(step, "fp16")
    state = init(fp16, make_state())
    assert sorted(state.transforms["mixed_precision"]) == ["good_steps", "scale"]
    assert init(fp16, state).transforms.keys() == state.transforms.keys()  # init twice is harmless
    assert_states_close(state.copy(), state)
