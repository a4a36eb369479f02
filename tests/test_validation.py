"""Bad input from a hostile user gets a clear error naming the API, the value and the fix;
nothing is passed through silently (issue 7, "bad input").

Each test names the bug it catches; each failed on the code before its fix.
"""

import collections

import numpy as np
import pytest
import torch

import xform as xf
from xform.transforms.accumulate import split_batch

from _util import batch, make_state, step

# --- what a step returns --------------------------------------------------------------------


def three_values(state, b):
    new, metrics = step(state, b)
    return new, metrics, "extra"


def state_only(state, b):
    return step(state, b)[0]


def swapped(state, b):
    new, metrics = step(state, b)
    return metrics, new


def params_not_state(state, b):
    new, metrics = step(state, b)
    return new.params, metrics


TRANSFORMS = {
    "accumulate": lambda f: xf.accumulate(f, 2),
    "mixed_precision": lambda f: xf.mixed_precision(f, "bf16"),
    "shard": lambda f: xf.shard(f),  # one process, no group: the step runs unchanged
}


@pytest.mark.parametrize("name", list(TRANSFORMS))
@pytest.mark.parametrize(
    "bad, error, match",
    [
        (three_values, ValueError,
         r"^{api}: the step returned a tuple of 3 values; a step returns \(state, metrics\): put extra outputs in the metrics$"),
        (state_only, TypeError,
         r"^{api}: the step returned a TrainState, not a \(state, metrics\) pair; return state\.apply_gradients\(grads\), metrics$"),
        (swapped, TypeError,
         r"^{api}: the step returned \(dict, TrainState\); a step returns \(state, metrics\), state first$"),
        (params_not_state, TypeError,
         r"^{api}: the step returned \(dict, dict\); a step returns \(state, metrics\) whose state is the TrainState "
         r"from state\.apply_gradients\(grads\)$"),
    ],
    ids=["three-values", "state-only", "swapped", "params-not-state"],
)  # fmt: skip
def test_what_a_step_returns_is_checked_by_every_transform(name, bad, error, match):
    """Bug: accumulate unpacked a 3-tuple with a bare 'too many values to unpack', and
    mixed_precision / shard passed any return value through silently."""
    s = TRANSFORMS[name](bad)
    state = getattr(s, "init", lambda x: x)(make_state())
    with pytest.raises(error, match=match.format(api=name)):
        s(state, batch())


def test_a_nested_step_is_blamed_on_the_innermost_transform():
    s = xf.accumulate(xf.mixed_precision(three_values, "bf16"), 2)
    with pytest.raises(ValueError, match="^mixed_precision: the step returned a tuple of 3 values"):
        s(s.init(make_state()), batch())


def test_a_list_pair_is_still_accepted():
    """Not an error: a step that returns [state, metrics] worked before and still does."""
    s = xf.accumulate(lambda st, b: list(step(st, b)), 2)
    state, metrics = s(make_state(), batch())
    assert state.step == 1 and set(metrics) == {"loss"}


# --- batch leaves that are not tensors, under accumulate -------------------------------------


def test_numpy_arrays_are_split_along_axis_0():
    """Bug: a numpy leaf was passed whole to every micro-batch."""
    b = {"x": torch.arange(6).reshape(6, 1), "w": np.arange(12).reshape(6, 2), "s": np.float32(0.5)}
    pieces = split_batch("accumulate", b, 3)
    assert [p["w"].tolist() for p in pieces] == [[[0, 1], [2, 3]], [[4, 5], [6, 7]], [[8, 9], [10, 11]]]
    assert all(p["s"] == np.float32(0.5) for p in pieces)  # 0-d: not per-example
    only_numpy = split_batch("accumulate", {"a": np.arange(4)}, 2)
    assert [p["a"].tolist() for p in only_numpy] == [[0, 1], [2, 3]]


def test_lists_of_per_example_items_are_split():
    """Bug: a list of 6 strings (or ragged token ids) reached every micro-batch whole."""
    b = {
        "x": torch.arange(6).reshape(6, 1),
        "text": ["a", "b", "c", "d", "e", "f"],
        "ids": [[1], [2, 2], [3], [4, 4, 4], [5], [6]],
        "lr": 0.1,
        "name": "run",
    }
    pieces = split_batch("accumulate", b, 3)
    assert [p["text"] for p in pieces] == [["a", "b"], ["c", "d"], ["e", "f"]]
    assert [p["ids"] for p in pieces] == [[[1], [2, 2]], [[3], [4, 4, 4]], [[5], [6]]]
    assert all(p["lr"] == 0.1 and p["name"] == "run" for p in pieces)
    t = split_batch("accumulate", (torch.zeros(4, 2), ("p", "q", "r", "s")), 2)
    assert [p[1] for p in t] == [("p", "q"), ("r", "s")]


def test_accumulate_with_a_list_leaf_equals_the_full_batch():
    """End to end: a step that reads a per-example list sees only its micro-batch's items."""
    seen = []

    def tagged(state, b):
        seen.append(list(b["tag"]))
        assert len(b["tag"]) == b["x"].shape[0]
        return step(state, b)

    b = {**batch(8), "tag": [f"t{i}" for i in range(8)]}
    xf.accumulate(tagged, 4)(make_state(), b)
    assert seen == [["t0", "t1"], ["t2", "t3"], ["t4", "t5"], ["t6", "t7"]]


@pytest.mark.parametrize(
    "b, error, match",
    [
        ({"x": torch.zeros(6, 1), "text": ["a", "b"]}, ValueError,
         r"^accumulate: batch\['text'\] is a list of 2 items but the batch size is 6; give it one item per "
         r"example \(it is split into 3 micro-batches\), or pass values shared by all examples outside the batch$"),
        ({"x": torch.zeros(6, 1), "w": np.zeros((4, 2))}, ValueError,
         r"^accumulate: batch\['w'\] has leading size 4 but the batch size is 6"),
        ({"x": torch.zeros(6, 1), "obj": object()}, TypeError,
         r"^accumulate: batch\['obj'\] is of type object, which cannot be split into 3 micro-batches; pass tensors, "
         r"numpy arrays, or lists with one item per example"),
        ({"x": torch.zeros(6, 1), "y": torch.zeros(4)}, ValueError,
         r"^accumulate: batch\['y'\] has leading size 4 but the batch size is 6"),
    ],
    ids=["short-list", "numpy-size", "unknown-object", "tensor-size"],
)  # fmt: skip
def test_leaves_that_cannot_be_split_are_refused(b, error, match):
    """Bug: these were passed whole to every micro-batch (or, for tensors, reported
    without naming the leaf)."""
    with pytest.raises(error, match=match):
        split_batch("accumulate", b, 3)


def test_a_mapping_that_is_not_a_dict_is_refused_with_the_fix():
    """A dict-like batch (HF's BatchEncoding is a UserDict) is one opaque leaf to the
    pytree: refused, naming dict(batch) as the fix, not passed whole."""
    b = collections.UserDict({"x": torch.zeros(4, 1)})
    with pytest.raises(TypeError, match=(
        r"^accumulate: batch is of type UserDict, which cannot be split into 2 micro-batches; pass tensors, "
        r"numpy arrays, or lists with one item per example \(a mapping: pass dict\(batch\)\)$"
    )):  # fmt: skip
        split_batch("accumulate", b, 2)
    assert [p["x"].shape for p in split_batch("accumulate", dict(b), 2)] == [(2, 1), (2, 1)]


def test_lists_alone_give_the_batch_size():
    pieces = split_batch("accumulate", {"text": ["a", "b", "c", "d"]}, 2)
    assert [p["text"] for p in pieces] == [["a", "b"], ["c", "d"]]
    with pytest.raises(ValueError, match=r"accumulate: batch size 3 is not divisible by steps=2"):
        split_batch("accumulate", {"text": ["a", "b", "c"]}, 2)


# --- xf.apply with params of another model ----------------------------------------------------


def test_apply_refuses_params_of_other_shapes():
    """Bug: a (4, 9, 3) MLP's params ran silently through a (4, 8, 3) model."""
    state = make_state()
    other = dict(make_state(sizes=(4, 9, 3)).params)
    with pytest.raises(ValueError, match=(
        r"^xf.apply: params\['0.weight'\] has shape \(9, 4\) but the model's 0.weight has shape \(8, 4\); "
        r"pass params of this model \(state.params, or a dict with the same names and shapes\)$"
    )):  # fmt: skip
        xf.apply(state, other, batch()["x"])


def test_apply_refuses_params_the_model_does_not_have():
    """Bug: a name the module lacks was ignored by functional_call, so the module's own
    tensor was used instead of the one passed."""
    state = make_state()
    renamed = {("layer." + k): v for k, v in state.params.items()}
    with pytest.raises(ValueError, match=r"^xf.apply: params\['layer.0.weight'\] is not a parameter of the model"):
        xf.apply(state, renamed, batch()["x"])
    with pytest.raises(TypeError, match=r"^xf.apply: params\['0.bias'\] must be a tensor, got float"):
        xf.apply(state, {**state.params, "0.bias": 0.5}, batch()["x"])


def test_apply_still_takes_partial_and_equal_shaped_params():
    state = make_state()
    x = batch()["x"]
    half = {"0.weight": state.params["0.weight"] * 0.5}
    assert torch.equal(xf.apply(state, half, x), torch.func.functional_call(state.module, half, (x,)))


# --- inputs of the wrong dtype ----------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float64, torch.int64])
def test_an_input_of_the_wrong_dtype_names_the_input_and_both_dtypes(dtype):
    """Bug: 'mat1 and mat2 must have the same dtype, but got Double and Float' from deep
    inside torch, not naming the input or the fix."""
    state = make_state()
    x = batch()["x"].to(dtype)
    match = (
        rf"^xf.apply: input args\[0\] is a {dtype} tensor but the model's params are torch.float32; cast the "
        r"batch \(x.to\(torch.float32\)\) or run the step under xf.mixed_precision$"
    )
    for params in (state.params, dict(state.params)):  # the fast path and functional_call
        with pytest.raises(TypeError, match=match) as info:
            xf.apply(state, params, x)
        assert isinstance(info.value.__cause__, RuntimeError)


def test_a_keyword_input_of_the_wrong_dtype_is_named():
    class Kw(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(4, 3)

        def forward(self, *, features):
            return self.lin(features)

    state = xf.TrainState.create(Kw(), optimizer=torch.optim.SGD, lr=0.1)

    def bad_step(st, b):
        loss, grads = xf.value_and_grad(lambda p: xf.apply(st, p, features=b["x"].double()).sum())(st.params)
        return st.apply_gradients(grads), {}

    with pytest.raises(TypeError, match=r"^xf.apply: input kwargs\['features'\] is a torch.float64 tensor"):
        xf.accumulate(bad_step, 2)(state, batch())


def test_other_errors_of_the_module_pass_through_unchanged():
    """Not every RuntimeError is a dtype error: a shape error stays torch's."""
    state = make_state()
    with pytest.raises(RuntimeError, match="mat1 and mat2 shapes cannot be multiplied"):
        xf.apply(state, state.params, torch.zeros(8, 5))
    emb = xf.TrainState.create(torch.nn.Embedding(5, 2), optimizer=torch.optim.SGD, lr=0.1)
    assert xf.apply(emb, emb.params, torch.tensor([1, 2])).shape == (2, 2)  # int64 ids are fine


# --- misuses found along the way ----------------------------------------------------------------


@pytest.mark.parametrize("name", list(TRANSFORMS))
def test_a_transformed_step_names_a_state_that_is_not_a_trainstate(name):
    """Bug: "'Sequential' object has no attribute '_spec'" (accumulate) or "'dict' object
    has no attribute 'params'" from deep inside, for a module or the batch passed first."""
    s = TRANSFORMS[name](step)
    state = getattr(s, "init", lambda x: x)(make_state())
    with pytest.raises(TypeError, match=(
        rf"^{name}: expected a TrainState as the first argument, got Sequential; call step\(state, batch\)"
    )):  # fmt: skip
        s(state.module, batch())
    with pytest.raises(TypeError, match=rf"^{name}: expected a TrainState as the first argument, got dict"):
        s(batch(), state)


def test_apply_names_a_state_that_is_not_a_trainstate():
    """Bug: "'Sequential' object has no attribute '_runtime'"."""
    state = make_state()
    with pytest.raises(TypeError, match=(
        r"^xf.apply: expected a TrainState as the first argument, got Sequential; call xf.apply\(state, params, \*inputs\)$"
    )):  # fmt: skip
        xf.apply(state.module, state.params, batch()["x"])


def test_a_loss_that_does_not_depend_on_the_params_is_named():
    """Bug: torch's 'element 0 of tensors does not require grad and does not have a
    grad_fn' for a detached loss or one computed without the params."""
    state = make_state()
    x = batch()["x"]
    match = (
        r"^xf.value_and_grad: the loss does not depend on the params \(it has no grad_fn\); compute it from "
        r"the params the loss function receives, e.g. xf.apply\(state, params, x\), without .detach\(\) or "
        r"torch.no_grad\(\)$"
    )
    with pytest.raises(ValueError, match=match):
        xf.value_and_grad(lambda p: xf.apply(state, p, x).sum().detach())(state.params)
    with pytest.raises(ValueError, match=match):
        xf.value_and_grad(lambda p: torch.tensor(1.0))(state.params)


def test_params_that_do_not_require_grad_are_named():
    """Bug: torch's '`inputs` argument to `grad()` cannot be empty'."""
    state = make_state()
    frozen = {k: v.detach() for k, v in state.params.items()}
    with pytest.raises(ValueError, match=(
        r"^xf.value_and_grad: none of the 4 params requires grad \(e.g. '0.weight'\); pass state.params, whose "
        r"trainable tensors do"
    )):  # fmt: skip
        xf.value_and_grad(lambda p: xf.apply(state, p, batch()["x"]).sum())(frozen)


def test_metrics_that_differ_between_micro_batches_are_named():
    """Bug: optree's 'dictionary key mismatch; expected key(s): ...' without saying which
    transform or micro-batch."""
    calls = []

    def varying(state, b):
        new, metrics = step(state, b)
        calls.append(None)
        return new, (metrics if len(calls) == 1 else {**metrics, "acc": torch.tensor(1.0)})

    with pytest.raises(ValueError, match=(
        r"^accumulate: micro-batch 1 returned metrics of another structure than micro-batch 0 "
        r"\(\['acc', 'loss'\] vs \['loss'\]\); return the same metrics from every micro-batch$"
    )):  # fmt: skip
        xf.accumulate(varying, 2)(make_state(), batch())


def test_an_input_on_another_device_names_the_input_and_both_devices():
    """Bug: torch's 'Tensor on device cpu is not on the expected device meta!' (or, on a
    GPU, 'Expected all tensors to be on the same device') without naming the input or
    the fix. The meta device stands in for a GPU here."""
    state = make_state()
    x = batch()["x"].to("meta")
    with pytest.raises(ValueError, match=(
        r"^xf.apply: input args\[0\] is on meta but the model's params are on cpu; move the batch to the "
        r"params' device \(x.to\(xf.distributed.device\(\)\)\)$"
    )) as info:  # fmt: skip
        xf.apply(state, state.params, x)
    assert isinstance(info.value.__cause__, RuntimeError)
