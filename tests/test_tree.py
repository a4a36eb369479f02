"""``xf.tree``: optree in the "xform" namespace, seeing through TrainState and Mean."""

import optree
import pytest
import torch

import xform as xf
from xform.testing import assert_states_close

from _util import batch, make_state, run, step


def trained():
    return run(step, make_state(), [batch(seed=s) for s in range(2)])[0]


def test_leaves_of_a_state():
    state = trained()
    leaves = xf.tree.leaves(state)
    tensors = [t for t in leaves if isinstance(t, torch.Tensor)]
    assert len(tensors) == 4 + 4 * 3  # params, and exp_avg/exp_avg_sq/step for each
    assert leaves[0] == 2  # the step comes first
    assert optree.tree_leaves(state) == [state]  # plain optree needs the namespace


def test_flatten_with_path_names_every_leaf():
    paths = [p for p, _ in xf.tree.flatten_with_path(trained())]
    assert paths == [
        "step",
        "params['0.bias']", "params['0.weight']", "params['2.bias']", "params['2.weight']",
        "opt_state['initialized']",
        "opt_state['state']['0.bias']['exp_avg']", "opt_state['state']['0.bias']['exp_avg_sq']", "opt_state['state']['0.bias']['step']",
        "opt_state['state']['0.weight']['exp_avg']", "opt_state['state']['0.weight']['exp_avg_sq']", "opt_state['state']['0.weight']['step']",
        "opt_state['state']['2.bias']['exp_avg']", "opt_state['state']['2.bias']['exp_avg_sq']", "opt_state['state']['2.bias']['step']",
        "opt_state['state']['2.weight']['exp_avg']", "opt_state['state']['2.weight']['exp_avg_sq']", "opt_state['state']['2.weight']['step']",
        "rng", "data['consumed']", "data['seed']",
        "transforms['nonfinite']['consecutive']", "transforms['nonfinite']['skipped']",
    ]


def test_map_builds_a_new_state_that_trains():
    state = trained()
    cloned = xf.tree.map(lambda x: x.detach().clone() if isinstance(x, torch.Tensor) else x, state)
    assert isinstance(cloned, xf.TrainState) and cloned.module is state.module
    assert list(cloned.params) == list(state.params)  # module order, not optree's sorted order
    assert_states_close(cloned, state)
    a, _ = step(state, batch(seed=7))
    b, _ = step(cloned, batch(seed=7))
    assert_states_close(b, a)


def test_map_over_a_state_and_its_copy():
    a = trained()
    b = a.copy()
    diff = xf.tree.map(lambda x, y: x - y if isinstance(x, torch.Tensor) else x, a, b)
    assert isinstance(diff, xf.TrainState)
    assert all(not t.any() for t in xf.tree.leaves(diff.params))


def test_flatten_unflatten_and_structure():
    state = trained()
    leaves, spec = xf.tree.flatten(state)
    assert spec == xf.tree.structure(state)
    rebuilt = xf.tree.unflatten(spec, [x.clone() if isinstance(x, torch.Tensor) else x for x in leaves])
    assert_states_close(rebuilt, state)
    assert rebuilt.step == 2 and rebuilt.opt_state["initialized"] is True


def test_path_str():
    from xform.tree import path_str

    assert path_str(("params", "fc1.weight")) == "params['fc1.weight']"
    assert path_str(("opt_state", "state", "0.w", "exp_avg")) == "opt_state['state']['0.w']['exp_avg']"
    assert path_str(("data", "consumed")) == "data['consumed']"
    assert path_str(("layers", 0, "w")) == "layers[0]['w']"
    assert path_str(()) == ""


def test_tree_of_a_donated_state_raises():
    state = make_state()
    step(state, batch())
    with pytest.raises(xf.DonatedStateError, match="flattening a TrainState: this TrainState was donated"):
        xf.tree.flatten_with_path(state)
