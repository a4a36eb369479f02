"""``mixed_precision``: policies, the compute dtype, loss scaling and skipped updates."""

import attrs
import pytest
import torch
import torch.nn.functional as F

import xform as xf
from xform.testing import assert_states_close

from _util import batch, good, init, make_state, run, scaled_step, step

BATCHES = [batch(seed=s) for s in range(3)]




def bad(seed=0):
    return {**batch(seed=seed), "mult": torch.tensor(1e38)}  # times the loss scale: inf in fp32


# --- Policy -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "spec, param, compute, output",
    [
        ("bf16", torch.float32, torch.bfloat16, torch.float32),
        ("FP16", torch.float32, torch.float16, torch.float32),
        ("float32", torch.float32, torch.float32, torch.float32),
        ("params=float32,compute=bfloat16", torch.float32, torch.bfloat16, torch.float32),  # output: the params dtype
        ("params=bfloat16", torch.bfloat16, torch.bfloat16, torch.bfloat16),
        ("params=float32, compute=half, output=float32", torch.float32, torch.float16, torch.float32),
    ],
)
def test_policy_parse(spec, param, compute, output):
    policy = xf.Policy.parse(spec)
    assert (policy.param_dtype, policy.compute_dtype, policy.output_dtype) == (param, compute, output)
    assert xf.Policy.parse(str(policy)) == policy
    assert xf.Policy.parse(policy) is policy


@pytest.mark.parametrize(
    "spec, error, match",
    [
        ("bf17", ValueError, r"mixed_precision: unknown dtype 'bf17'; use one of float32, bfloat16, float16"),
        ("params=float32,compute=int8", ValueError, r"unknown dtype 'int8'"),
        ("params=float32,weights=bf16", ValueError, r"cannot parse policy 'params=float32,weights=bf16' at 'weights=bf16'; write e.g."),
        ("params=float32,bf16", ValueError, r"cannot parse policy .* at 'bf16'"),
        (torch.bfloat16, TypeError, r"mixed_precision: policy must be a string or xf.Policy, got torch.bfloat16"),
    ],
)
def test_bad_policies_are_refused_at_wrap_time(spec, error, match):
    with pytest.raises(error, match=match):
        xf.mixed_precision(step, spec)


def test_policy_is_frozen():
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        xf.Policy.parse("bf16").compute_dtype = torch.float16


# --- the transform ------------------------------------------------------------------------


@pytest.mark.parametrize("spec", ["fp32", "float32", "f32", "params=float32", xf.Policy()])
def test_fp32_is_the_identity(spec):
    assert xf.mixed_precision(step, spec) is step


def test_wrapping_keeps_name_docs_and_settings():
    wrapped = xf.mixed_precision(step, "fp16")
    assert wrapped.__name__ == "step" and wrapped.__doc__ == step.__doc__
    assert wrapped.xform.setting("mixed_precision", "policy") == xf.Policy.parse("fp16")
    assert wrapped.xform.setting("mixed_precision", "loss_scale") == xf.DynamicLossScale()
    assert xf.mixed_precision(step, "bf16").xform.setting("mixed_precision", "loss_scale") == xf.NoOpLossScale()


def test_bad_settings_are_refused():
    with pytest.raises(TypeError, match=r"mixed_precision: loss_scale must be NoOpLossScale\(\), StaticLossScale\(...\) or DynamicLossScale\(...\), got 'dynamic'"):
        xf.mixed_precision(step, "fp16", loss_scale="dynamic")
    with pytest.raises(TypeError, match="mixed_precision: expected a step function"):
        xf.mixed_precision("step", "bf16")
    with pytest.raises(ValueError, match="mixed_precision: this step is already wrapped in mixed_precision; apply one policy only"):
        xf.mixed_precision(xf.accumulate(xf.mixed_precision(step, "bf16"), 2), "fp16")
    for kwargs in (dict(growth_interval=0), dict(factor=1.0), dict(initial_scale=0.5), dict(min_scale=0)):
        with pytest.raises(ValueError, match="DynamicLossScale: need initial_scale >= 1, growth_interval >= 1"):
            xf.DynamicLossScale(**kwargs)


def test_fp16_without_init_is_refused():
    with pytest.raises(ValueError, match=r"mixed_precision: the state has no loss scale; lay it out first with state = step.init\(state\)"):
        xf.mixed_precision(step, "fp16")(make_state(), batch())


def test_bf16_computes_in_bf16_and_keeps_fp32_master_weights():
    dtypes = []
    wrapped = xf.mixed_precision(step, "bf16")
    state = init(wrapped, make_state())
    state.module[0].register_forward_hook(lambda mod, inp, out: dtypes.append(out.dtype))
    outputs = []

    def probe(state, b):
        outputs.append(xf.apply(state, state.params, b["x"]).dtype)
        return step(state, b)

    state, losses = run(xf.mixed_precision(probe, "bf16"), state, BATCHES)
    assert dtypes and set(dtypes) == {torch.bfloat16}
    assert set(outputs) == {torch.float32}  # apply's outputs are cast to the output dtype
    assert all(p.dtype == torch.float32 for p in state.params.values())
    assert all(t.dtype == torch.float32 for t in xf.tree.leaves(state.opt_state["state"]) if t.is_floating_point())
    assert "mixed_precision" not in state.transforms and all(loss.dtype == torch.float32 for loss in losses)
    # It really ran in bf16: not bit-equal to the fp32 run.
    fp32, _ = run(step, make_state(), BATCHES)
    assert not torch.equal(fp32.params["0.weight"], state.params["0.weight"])


def test_an_apply_nested_in_another_leaves_autocast_as_it_found_it():
    """The handler reuses one autocast context across apply calls; a context records on
    itself what it restores, so an apply nested inside another (a module calling
    xf.apply) must get its own, or the outer exit would restore the nested entry's
    settings and leave autocast on after the step."""
    helper = make_state(1)
    seen = []

    def hook(mod, inp, out):
        if not seen:  # once: the nested apply runs this hook's module again
            seen.append("in")
            xf.apply(helper, helper.params, inp[0])
            seen.append(torch.is_autocast_enabled("cpu"))

    wrapped = xf.mixed_precision(step, "bf16")
    state = init(wrapped, make_state())
    handle = state.module[0].register_forward_hook(hook)
    try:
        for b in BATCHES[:2]:
            seen.clear()
            state, _ = wrapped(state, b)
            assert seen == ["in", True]  # still under the outer apply's autocast
            assert not torch.is_autocast_enabled("cpu")  # and off after the step
    finally:
        handle.remove()


class _CountCasts(torch.utils._python_dispatch.TorchDispatchMode):
    """Counts autocast's casts of fp32 tensors to bf16 (``aten._to_copy``)."""

    def __init__(self):
        super().__init__()
        self.n = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.ops.aten._to_copy.default and args[0].dtype == torch.float32 \
                and kwargs.get("dtype") == torch.bfloat16:
            self.n += 1
        return func(*args, **kwargs)


@pytest.mark.parametrize("k", [1, 2, 4])
def test_bf16_casts_each_weight_once_per_step_not_once_per_micro_batch(k):
    """autocast caches the casts of the weights (leaves that require grad) until the
    outermost autocast region exits; the step keeps them for all of its micro-batches.
    Catches: the cache dropped after each apply (k casts of each weight), as a hand
    loop that enters autocast per micro-batch does."""
    wrapped = xf.accumulate(xf.mixed_precision(step, "bf16"), k)
    state = init(wrapped, make_state())
    state, _ = wrapped(state, BATCHES[0])  # the optimizer's state is made
    weights = len(state.params)  # 2 Linear layers: 2 weights, 2 biases
    with _CountCasts() as counted:
        state, _ = wrapped(state, BATCHES[1])
    inputs = k * 2  # each micro-batch's input to each Linear: not cached (not a leaf requiring grad)
    assert counted.n == weights + inputs


@pytest.mark.parametrize("policy", ["bf16", "fp16"])
def test_cast_cache_changes_no_bit_of_the_result(policy):
    """The same steps with autocast's cache off (each apply casts again): bitwise equal
    (fp16: with its loss scale, whose handler drops the cache before the unscale too).
    Catches: casts kept from one step to the next (the next step computes with the
    weights before the update)."""
    wrapped = xf.accumulate(xf.mixed_precision(step, policy), 4)
    cached, _ = run(wrapped, init(wrapped, make_state()), BATCHES)
    before = torch.is_autocast_cache_enabled()
    torch.set_autocast_cache_enabled(False)
    try:
        uncached, _ = run(wrapped, init(wrapped, make_state()), BATCHES)
    finally:
        torch.set_autocast_cache_enabled(before)
    assert_states_close(cached, uncached, atol=0, rtol=0)


def _autocast_nesting() -> int:
    level = torch.autocast_increment_nesting() - 1
    torch.autocast_decrement_nesting()
    return level


@pytest.mark.parametrize("k", [1, 2])
def test_a_step_leaves_autocast_nesting_as_it_found_it(k):
    """The step holds one autocast nesting level to keep the casts; it must give it back,
    also when the step raises. Catches: the level leaked, after which no autocast region
    of the caller ever drops its cache (stale casts and memory held in their eval loop)."""
    wrapped = xf.accumulate(xf.mixed_precision(step, "bf16"), k)
    state = init(wrapped, make_state())
    before = _autocast_nesting()
    for b in BATCHES:
        state, _ = wrapped(state, b)
        assert _autocast_nesting() == before
    with pytest.raises(RuntimeError, match="shapes cannot be multiplied"):
        wrapped(state, {"x": torch.ones(8, 5), "y": BATCHES[0]["y"]})  # wrong input width
    assert _autocast_nesting() == before


def test_an_apply_after_the_update_sees_the_new_weights_not_stale_casts():
    """A step that evaluates the updated state inside the same call: its apply must cast
    the weights the update wrote, not reuse the casts of the old ones. Catches: the
    cache kept past the update."""

    def step_then_eval(state, b):
        new, metrics = step(state, b)
        return new, {**metrics, "after": xf.apply(new, new.params, b["x"])}

    wrapped = xf.mixed_precision(step_then_eval, "bf16")
    state = init(wrapped, make_state())
    for b in BATCHES:
        state, metrics = wrapped(state, b)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            expected = state.module(b["x"]).float()
        torch.testing.assert_close(metrics["after"], expected, atol=0, rtol=0)
    assert not torch.is_autocast_enabled("cpu")


def test_bf16_params_are_cast_by_init():
    wrapped = xf.mixed_precision(step, "params=bfloat16")
    state = init(wrapped, make_state())
    assert all(p.dtype == torch.bfloat16 for p in state.params.values())
    assert state.opt_state["state"]["0.weight"]["exp_avg"].dtype == torch.bfloat16
    state, losses = run(wrapped, state, BATCHES)
    assert state.step == 3 and all(torch.isfinite(loss) for loss in losses)
    assert all(p.dtype == torch.bfloat16 for p in state.params.values())
    with pytest.raises(ValueError, match=r"TrainState: cannot store params in torch.bfloat16 after training started \(step 3\)"):
        init(wrapped, state)


def test_bf16_params_cast_keyword_inputs_too():
    """With params stored in bf16 the inputs are cast to the compute dtype; an input
    given by keyword (``xf.apply(state, params, input=x)``) must be cast as well."""

    def by_keyword(state, x):
        loss, grads = xf.value_and_grad(lambda p: xf.apply(state, p, input=x).float().square().mean())(state.params)
        return state.apply_gradients(grads), {"loss": loss}

    wrapped = xf.mixed_precision(by_keyword, "params=bfloat16")
    state = init(wrapped, xf.TrainState.create(torch.nn.Linear(4, 2), optimizer=torch.optim.SGD, lr=0.1))
    state, _ = wrapped(state, torch.ones(8, 4))
    assert state.step == 1


# --- loss scaling ---------------------------------------------------------------------------


@pytest.mark.parametrize("loss_scale", [xf.StaticLossScale(2.0**10), xf.DynamicLossScale()])
def test_power_of_two_loss_scale_in_fp32_is_exact(loss_scale):
    """Scaling the loss by 2**k and the gradients back is exact in fp32: the result is
    bit-for-bit the plain step's."""
    wrapped = xf.mixed_precision(step, "fp32", loss_scale=loss_scale)
    scaled, scaled_losses = run(wrapped, init(wrapped, make_state()), BATCHES)
    plain, plain_losses = run(step, make_state(), BATCHES)
    assert_states_close(scaled.params, plain.params)
    assert_states_close(scaled.opt_state, plain.opt_state)
    assert all(torch.equal(a, b) for a, b in zip(scaled_losses, plain_losses))


def test_fp16_overflow_skips_the_update_and_halves_the_scale():
    wrapped = xf.mixed_precision(scaled_step, "fp16")
    state, _ = run(wrapped, init(wrapped, make_state()), [good(0)])
    assert float(state.transforms["mixed_precision"]["scale"]) == 2.0**16
    assert int(state.transforms["mixed_precision"]["good_steps"]) == 1
    before = state.copy()
    new, metrics = wrapped(state, bad(1))
    assert not torch.isfinite(metrics["loss"] * 2.0**16)
    assert new.step == 1 and new.data["consumed"] == 2
    assert float(new.transforms["mixed_precision"]["scale"]) == 2.0**15
    assert int(new.transforms["mixed_precision"]["good_steps"]) == 0
    # Everything but the data position and the loss scale is as before, bit for bit.
    assert_states_close(new.replace(data=before.data, transforms=before.transforms), before)
    # The next good batch updates again.
    newer, _ = wrapped(new, good(2))
    assert newer.step == 2 and not torch.equal(newer.params["0.weight"], before.params["0.weight"])


def test_fp16_overflow_in_the_forward_pass_is_skipped():
    """Activations beyond fp16's range (65504) give inf/nan: the update is skipped."""
    wrapped = xf.mixed_precision(step, "fp16")
    state = init(wrapped, make_state())
    weight = state.params["0.weight"].clone()
    huge = {**batch(), "x": batch()["x"] * 1e6}
    new, metrics = wrapped(state, huge)
    assert not torch.isfinite(metrics["loss"])
    assert new.step == 0 and new.data["consumed"] == 1 and torch.equal(new.params["0.weight"], weight)
    assert float(new.transforms["mixed_precision"]["scale"]) == 2.0**15


def test_dynamic_scale_grows_after_growth_interval_good_steps_and_respects_min_scale():
    wrapped = xf.mixed_precision(
        scaled_step, "fp16", loss_scale=xf.DynamicLossScale(initial_scale=4.0, growth_interval=3, min_scale=2.0)
    )
    state = init(wrapped, make_state())
    scales = []
    for b in [good(), good(), good(), good(), bad(), bad(), bad(), good()]:
        state, _ = wrapped(state, b)
        scales.append(float(state.transforms["mixed_precision"]["scale"]))
    assert scales == [4.0, 4.0, 8.0, 8.0, 4.0, 2.0, 2.0, 2.0]
    assert state.step == 5 and state.data["consumed"] == 8


def test_static_loss_scale_skips_overflow_but_keeps_its_scale():
    wrapped = xf.mixed_precision(scaled_step, "fp16", loss_scale=xf.StaticLossScale(128.0))
    state = init(wrapped, make_state())
    state, _ = wrapped(state, bad())
    assert state.step == 0 and float(state.transforms["mixed_precision"]["scale"]) == 128.0
    state, _ = wrapped(state, good())
    assert state.step == 1 and float(state.transforms["mixed_precision"]["scale"]) == 128.0


def test_bf16_has_no_loss_scale_and_does_not_skip():
    wrapped = xf.mixed_precision(scaled_step, "bf16")
    state = init(wrapped, make_state())
    assert "mixed_precision" not in state.transforms
    state, _ = wrapped(state, good())
    assert state.step == 1


# --- policies that make no sense are refused ------------------------------------------------


@pytest.mark.parametrize(
    "spec, error, match",
    [
        ("params=float16,compute=bfloat16", ValueError, r"mixed_precision: the policy params=float16,compute=bfloat16,output=float16 mixes float16 and bfloat16.*keep one 16-bit type"),
        ("params=bfloat16,compute=float16", ValueError, r"mixes float16 and bfloat16"),
        ("params=float32,compute=bfloat16,output=float16", ValueError, r"mixes float16 and bfloat16"),
        ("params=bfloat16,compute=float32", ValueError, r"computes in a wider dtype than the params are stored in.*use 'params=float32,compute=bfloat16'"),
        ("params=float16,compute=float32,output=float32", ValueError, r"computes in a wider dtype"),
    ],
)
def test_nonsensical_policies_are_refused(spec, error, match):
    """Catches policies accepted silently though they cannot mean what they say (issue 7:
    params=float16,compute=bfloat16 was accepted)."""
    with pytest.raises(error, match=match):
        xf.Policy.parse(spec)
    with pytest.raises(error, match=match):
        xf.mixed_precision(step, spec)


def test_policy_objects_are_checked_too():
    with pytest.raises(ValueError, match="mixes float16 and bfloat16"):
        xf.Policy(param_dtype=torch.float16, compute_dtype=torch.bfloat16, output_dtype=torch.float16)
    with pytest.raises(TypeError, match=r"a policy's compute dtype must be torch.float32, torch.bfloat16 or torch.float16, got torch.int8"):
        xf.Policy(compute_dtype=torch.int8)


@pytest.mark.parametrize("spec", ["params=float16", "params=bfloat16", "params=float32,compute=float16,output=float16", "bf16"])
def test_sensible_policies_are_accepted(spec):
    assert xf.Policy.parse(str(xf.Policy.parse(spec))) == xf.Policy.parse(spec)


# --- outputs of every container type are cast ---------------------------------------------


def _tiny_gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50, n_positions=16,
                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return GPT2LMHeadModel(cfg)


def test_a_hugging_face_model_output_is_cast_to_the_output_dtype():
    """Catches a ``ModelOutput`` (an OrderedDict subclass the pytree sees as a leaf)
    returned uncast under bf16: ``out.logits`` stayed bfloat16 while a tuple was cast."""
    state = xf.TrainState.create(_tiny_gpt2(), optimizer=torch.optim.AdamW, lr=1e-3)
    ids = torch.randint(0, 50, (2, 8), generator=torch.Generator().manual_seed(0))
    seen = []

    def lm_step(state, ids):
        def loss_fn(p):
            out = xf.apply(state, p, input_ids=ids)
            seen.append(out)
            return F.cross_entropy(out.logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())

        loss, grads = xf.value_and_grad(loss_fn)(state.params)
        return state.apply_gradients(grads), {"loss": loss}

    wrapped = xf.mixed_precision(lm_step, "bf16")
    state, _ = wrapped(init(wrapped, state), ids)
    out = seen[-1]
    assert type(out).__name__ == "CausalLMOutputWithCrossAttentions"  # the container type is kept
    assert out.logits.dtype == torch.float32 and out["logits"] is out.logits
    assert state.step == 1


def test_mapping_subclasses_and_dataclasses_keep_their_type():
    import collections
    import dataclasses

    @dataclasses.dataclass
    class Out:
        logits: torch.Tensor
        extra: tuple

    class Box(collections.OrderedDict):
        pass

    policy = xf.Policy.parse("params=float32,compute=bfloat16,output=float32")
    x = torch.ones(2, dtype=torch.bfloat16)
    out = policy.cast_to_output((Box(a=x, b=[x]), Out(logits=x, extra=(x, 3))))
    assert type(out[0]) is Box and out[0]["a"].dtype == torch.float32 and out[0]["b"][0].dtype == torch.float32
    assert type(out[1]) is Out and out[1].logits.dtype == torch.float32 and out[1].extra[0].dtype == torch.float32
    assert out[1].extra[1] == 3
