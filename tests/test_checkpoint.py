"""Checkpoints: round trips, exact resume, refused mismatches, atomicity, weights_only,
and CheckpointManager."""

import json
import os

import pytest
import torch
import torch.nn as nn

import checkpoint_support as cs
import xform as xf
from xform.checkpoint import CheckpointError
from xform.testing import assert_resume_equivalent, assert_states_close

from _util import batch, init, make_state, mlp, run, snapshot, step

BATCHES = [batch(seed=s) for s in range(6)]


def trained(step_fn=step, n=3, **kw):
    return run(step_fn, init(step_fn, make_state(**kw)), BATCHES[:n])[0]


def leaves_unchanged(before, state):
    return all(
        (torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b)
        for (_, a), (_, b) in zip(snapshot(state), before)
    )


# --- round trips ----------------------------------------------------------------------------


def test_save_then_load_gives_every_leaf_back(tmp_path):
    fp16 = xf.mixed_precision(step, "fp16")
    state = trained(fp16)
    before = snapshot(state)
    path = xf.save(state, tmp_path / "ckpt")
    assert path == tmp_path / "ckpt" and sorted(os.listdir(path)) == ["meta.json", "tensors.pt"]
    like = init(fp16, make_state(seed=5))
    like_before = snapshot(like)
    loaded = xf.load(path, like=like)
    assert_states_close(loaded, state)
    assert loaded.step == 3 and loaded.data == {"seed": 0, "consumed": 3}
    assert loaded.opt_state["initialized"] is True
    assert float(loaded.transforms["mixed_precision"]["scale"]) == 2.0**16
    # Neither the saved state nor `like` is donated or changed.
    assert leaves_unchanged(before, state) and leaves_unchanged(like_before, like)
    assert json.loads((path / "meta.json").read_text())["step"] == 3


def test_a_loaded_state_trains_like_the_original(tmp_path):
    state = trained()
    loaded = xf.load(xf.save(state, tmp_path / "ckpt"), like=make_state())
    a, losses_a = run(step, state, BATCHES[3:])
    b, losses_b = run(step, loaded, BATCHES[3:])
    assert_states_close(b, a)
    assert all(torch.equal(x, y) for x, y in zip(losses_a, losses_b))


def test_resume_with_shuffling_dropout_and_transforms(tmp_path):
    dataset = torch.utils.data.TensorDataset(torch.randn(20, 4), torch.randint(0, 3, (20,)))
    loader = xf.DataLoader(dataset, batch_size=8, shuffle=True, drop_last=True)  # 2 batches an epoch
    tuple_step = lambda state, b: step(state, {"x": b[0], "y": b[1]})  # noqa: E731
    wrapped = xf.accumulate(xf.mixed_precision(tuple_step, "bf16"), 2)
    losses = assert_resume_equivalent(
        wrapped, lambda: make_state(dropout=0.3, sizes=(4, 16, 3)), loader, 3, tmp_path, num_steps=6
    )
    assert len(losses) == 6


def test_frozen_params_stay_frozen_after_load(tmp_path):
    model = mlp()
    model[0].weight.requires_grad_(False)
    state = xf.TrainState.create(model, optimizer=torch.optim.AdamW, lr=1e-2)
    state, _ = step(state, batch())
    like_model = mlp()
    like_model[0].weight.requires_grad_(False)
    loaded = xf.load(xf.save(state, tmp_path / "c"), like=xf.TrainState.create(like_model, optimizer=torch.optim.AdamW, lr=1e-2))
    assert {k: v.requires_grad for k, v in loaded.params.items()} == {"0.weight": False, "0.bias": True, "2.weight": True, "2.bias": True}
    loaded, _ = step(loaded, batch(seed=2))
    assert torch.equal(loaded.params["0.weight"], model[0].weight)


# --- refused loads --------------------------------------------------------------------------


def test_load_refuses_other_shapes_and_names_the_path(tmp_path):
    path = xf.save(make_state(), tmp_path / "c")
    wider_input = make_state(sizes=(5, 8, 3))
    with pytest.raises(ValueError) as info:
        xf.load(path, like=wider_input)
    assert str(info.value) == (
        f"xf.load: the checkpoint at {path} differs from `like` at params['0.weight']: checkpoint "
        "{'kind': 'tensor', 'dtype': 'float32', 'shape': [8, 4]}, like {'kind': 'tensor', 'dtype': 'float32', 'shape': [8, 5]}"
    )


def test_load_refuses_another_structure(tmp_path):
    path = xf.save(make_state(), tmp_path / "c")
    with pytest.raises(ValueError, match=r"does not have the structure of `like`: the first path that differs is params\['4.bias'\] \(only in `like`\); build `like` with the same module, optimizer and transforms \(state = step.init\(TrainState.create"):
        xf.load(path, like=make_state(sizes=(4, 8, 8, 3)))


def test_load_refuses_missing_transform_state(tmp_path):
    fp16 = xf.mixed_precision(step, "fp16")
    path = xf.save(trained(fp16, n=1), tmp_path / "c")
    with pytest.raises(ValueError, match=r"the first path that differs is transforms\['mixed_precision'\]\['good_steps'\] \(only in the checkpoint\)"):
        xf.load(path, like=make_state())  # forgot step.init
    assert xf.load(path, like=init(fp16, make_state())).step == 1


def test_load_refuses_another_dtype(tmp_path):
    path = xf.save(make_state(), tmp_path / "c")
    bf16 = xf.mixed_precision(step, "params=bfloat16")
    with pytest.raises(ValueError, match=r"differs from `like` at params\['0.bias'\]: checkpoint \{'kind': 'tensor', 'dtype': 'float32'"):
        xf.load(path, like=init(bf16, make_state()))


def test_load_refuses_another_optimizer(tmp_path):
    path = xf.save(make_state(), tmp_path / "c")
    with pytest.raises(ValueError, match=r"opt_state\['state'\]\['0.bias'\]"):
        xf.load(path, like=make_state(optimizer=torch.optim.SGD, lr=0.1, momentum=0.9))


def test_load_errors_for_missing_or_foreign_directories(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"xf.load: no checkpoint at .*nothing \(no meta.json in it\)"):
        xf.load(tmp_path / "nothing", like=make_state())
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "meta.json").write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(ValueError, match=r"is not an xform checkpoint \(format 'something-else'\)"):
        xf.load(tmp_path / "other", like=make_state())


def test_save_refuses_non_states_and_donated_states(tmp_path):
    with pytest.raises(TypeError, match="xf.save/xf.load: expected a TrainState, got dict"):
        xf.save({"w": torch.ones(1)}, tmp_path / "c")
    state = make_state()
    step(state, batch())
    with pytest.raises(xf.DonatedStateError):
        xf.save(state, tmp_path / "c")
    assert not (tmp_path / "c").exists()


class Payload:
    """A pickled object whose unpickling would run code (touch a file)."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_load_never_unpickles_code(tmp_path):
    path = xf.save(make_state(), tmp_path / "c")
    tensors = torch.load(path / "tensors.pt", weights_only=True)
    marker = tmp_path / "code-ran"
    torch.save({**tensors, "evil": Payload(marker)}, path / "tensors.pt")
    message = load_error(path)
    assert not marker.exists()
    assert "tensors.pt" in message and "io.open" in message and "refusing" in message, message


# --- integrity and clear errors (issue 7) ---------------------------------------------------


def load_error(path, like=None, error=CheckpointError) -> str:
    """The one-line error of loading ``path``, which must name the checkpoint."""
    with pytest.raises(error) as info:
        xf.load(path, like=like if like is not None else make_state())
    message = str(info.value)
    assert "\n" not in message and str(path) in message, message
    return message


def rewrite_tensors(path, **changes):
    tensors = torch.load(path / "tensors.pt", weights_only=True)
    torch.save({**tensors, **changes}, path / "tensors.pt")


def test_a_flipped_bit_in_the_tensor_file_is_detected_and_named(tmp_path):
    """Catches: a corrupted tensors.pt loading silently with wrong values."""
    state = trained(n=2)
    path = xf.save(state, tmp_path / "c")
    cs.flip_byte_of(path / "tensors.pt", state.params["2.weight"])
    message = load_error(path)
    assert "tensors.pt" in message and "params['2.weight']" in message and "checksum" in message, message


def test_a_tensor_of_another_shape_is_refused_not_broadcast(tmp_path):
    """Catches: ``copy_`` broadcasting a shape-(1,) tensor into the (3,) bias."""
    path = xf.save(make_state(), tmp_path / "c")
    rewrite_tensors(path, **{"params['2.bias']": torch.ones(1)})
    message = load_error(path)
    assert "tensors.pt" in message and "params['2.bias']" in message and "[1]" in message and "[3]" in message, message


def test_a_tensor_of_another_dtype_is_refused_not_converted(tmp_path):
    """Catches: ``copy_`` silently converting an int64 weight to float32."""
    path = xf.save(make_state(), tmp_path / "c")
    rewrite_tensors(path, **{"params['0.weight']": torch.ones(8, 4, dtype=torch.int64)})
    message = load_error(path)
    assert "params['0.weight']" in message and "int64" in message and "float32" in message, message


@pytest.mark.parametrize(
    "field, value, says",
    [
        ("step", "ten", "'step' must be an int"),
        ("step", True, "'step' must be an int"),
        ("layout", "zip", "'layout' must be 'single' or 'dcp'"),
        ("leaves", {"a": 1}, "'leaves' must be a list"),
    ],
)
def test_meta_json_fields_are_validated_by_type(tmp_path, field, value, says):
    """Catches: ``"step": "ten"`` (and other ill-typed fields) accepted by xf.load."""
    path = xf.save(make_state(), tmp_path / "c")
    meta = json.loads((path / "meta.json").read_text())
    meta[field] = value
    (path / "meta.json").write_text(json.dumps(meta))
    message = load_error(path)
    assert "meta.json" in message and says in message, message


def test_a_leaf_value_of_another_type_is_refused(tmp_path):
    path = xf.save(make_state(), tmp_path / "c")
    meta = json.loads((path / "meta.json").read_text())
    entry = next(e for e in meta["leaves"] if e["path"] == "data['consumed']")
    entry["value"] = "3"
    (path / "meta.json").write_text(json.dumps(meta))
    message = load_error(path)
    assert "meta.json" in message and "data['consumed']" in message, message


@pytest.mark.parametrize(
    "damage, says",
    [
        (lambda p: (p / "tensors.pt").write_bytes(b""), "empty"),
        (lambda p: (p / "tensors.pt").write_bytes((p / "tensors.pt").read_bytes()[:300]), "tensors.pt"),
        (lambda p: (p / "tensors.pt").unlink(), "missing"),
        (lambda p: (p / "meta.json").write_text('{"format": "xform-checkpoint-'), "not valid JSON"),
        (lambda p: (p / "meta.json").write_text("[1, 2]"), "must be a JSON object"),
    ],
    ids=["empty-tensors", "truncated-tensors", "missing-tensors", "truncated-meta", "meta-not-an-object"],
)
def test_every_load_failure_is_one_line_naming_path_file_and_cause(tmp_path, damage, says):
    """Catches: torch's bare ``EOFError`` for a 0-byte file, a bare ``JSONDecodeError``, ..."""
    path = xf.save(make_state(), tmp_path / "c")
    damage(path)
    message = load_error(path)
    assert says in message and ("tensors.pt" in message or "meta.json" in message), message


def test_structure_mismatches_are_checkpoint_errors(tmp_path):
    path = xf.save(make_state(), tmp_path / "c")
    assert "params['0.weight']" in load_error(path, like=make_state(sizes=(5, 8, 3)))


# --- atomic saves ---------------------------------------------------------------------------


def leftovers(directory):
    return sorted(p.name for p in directory.iterdir() if ".tmp-" in p.name)


@pytest.mark.parametrize("error", [OSError("disk full"), KeyboardInterrupt()], ids=["oserror", "interrupt"])
def test_an_interrupted_write_keeps_the_previous_checkpoint(tmp_path, monkeypatch, error):
    old = trained(n=1)
    path = xf.save(old, tmp_path / "c")
    new = trained(n=3)

    def failing_save(obj, f, *args, **kwargs):
        with open(f, "wb") as out:
            out.write(b"half a file")
        raise error

    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises(type(error)):
        xf.save(new, path)
    monkeypatch.undo()
    assert leftovers(tmp_path) == [] and sorted(os.listdir(tmp_path)) == ["c"]
    assert_states_close(xf.load(path, like=make_state()), old)


def test_an_interrupted_rename_puts_the_previous_checkpoint_back(tmp_path, monkeypatch):
    """The new checkpoint's rename into place fails after the old one was moved aside:
    the old one is put back at ``path``, intact, and nothing else is left behind."""
    old = trained(n=1)
    path = xf.save(old, tmp_path / "c")
    real_rename = os.rename

    def failing_rename(src, dst):
        if ".tmp-" in str(src):
            raise OSError("interrupted")
        return real_rename(src, dst)

    monkeypatch.setattr(os, "rename", failing_rename)
    with pytest.raises(OSError, match="interrupted"):
        xf.save(trained(n=3), path)
    monkeypatch.undo()
    assert leftovers(tmp_path) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c"]
    assert_states_close(xf.load(path, like=make_state()), old)


def test_a_lost_checkpoint_names_the_previous_one(tmp_path):
    """If a crash leaves only ``path.prev`` (between the two renames), ``xf.load`` says where it is."""
    old = trained(n=1)
    xf.save(old, tmp_path / "c")
    os.rename(tmp_path / "c", tmp_path / "c.prev")
    with pytest.raises(FileNotFoundError, match=r"c.prev holds the previous one \(a save was interrupted\); load that path"):
        xf.load(tmp_path / "c", like=make_state())
    assert_states_close(xf.load(tmp_path / "c.prev", like=make_state()), old)


def test_saving_over_a_checkpoint_replaces_it(tmp_path):
    path = xf.save(trained(n=1), tmp_path / "c")
    newer = trained(n=2)
    xf.save(newer, path)
    assert sorted(os.listdir(tmp_path)) == ["c"]
    assert_states_close(xf.load(path, like=make_state()), newer)


# --- CheckpointManager ----------------------------------------------------------------------


def test_manager_keeps_the_last_n(tmp_path):
    manager = xf.CheckpointManager(tmp_path / "run", keep=2)
    assert manager.checkpoints() == [] and manager.latest() is None
    assert manager.restore(like=make_state()) is None
    state = make_state()
    saved = []
    for b in BATCHES[:5]:
        state, _ = step(state, b)
        saved.append(state.copy())
        manager.save(state)
    assert [p.name for p in manager.checkpoints()] == ["step_000000004", "step_000000005"]
    assert sorted(os.listdir(tmp_path / "run")) == ["step_000000004", "step_000000005"]
    assert_states_close(manager.restore(like=make_state()), saved[-1])


def test_manager_ignores_incomplete_checkpoints(tmp_path):
    manager = xf.CheckpointManager(tmp_path, keep=None)
    for n in (1, 2, 3):
        manager.save(trained(n=n))
    (tmp_path / "step_000000009").mkdir()  # no meta.json: a save that never finished
    (tmp_path / ".step_000000010.tmp-1-abc").mkdir()
    assert [p.name for p in manager.checkpoints()] == ["step_000000001", "step_000000002", "step_000000003"]
    assert manager.restore(like=make_state()).step == 3


@pytest.mark.parametrize("keep", [0, -1, True, 1.5])
def test_manager_refuses_a_bad_keep(tmp_path, keep):
    with pytest.raises(ValueError, match="CheckpointManager: keep must be a positive int or None"):
        xf.CheckpointManager(tmp_path, keep=keep)


def test_tied_weights_round_trip(tmp_path):
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.a = nn.Linear(4, 4)
            self.b = nn.Linear(4, 4)
            self.b.weight = self.a.weight

        def forward(self, x):
            return self.b(torch.relu(self.a(x)))[:, :3]

    make = lambda: xf.TrainState.create(Tied(), optimizer=torch.optim.AdamW, lr=1e-2)  # noqa: E731
    assert_resume_equivalent(step, make, BATCHES, 2, tmp_path)


def test_the_recorded_global_batch_size_survives_a_checkpoint(tmp_path):
    """Catches: a resume with another global batch size going unnoticed because the
    checkpoint lost (or ``like`` overrode) the size the position was counted in."""
    dataset = torch.utils.data.TensorDataset(torch.randn(24, 4), torch.randint(0, 3, (24,)))
    loader = xf.DataLoader(dataset, batch_size=4)
    state = loader.attach(make_state())
    for _, (x, y) in zip(range(3), loader.iterate(state)):
        state, _ = step(state, {"x": x, "y": y})
    manager = xf.CheckpointManager(tmp_path, keep=1)
    manager.save(state)
    restored = manager.restore(like=make_state())  # `like` records no size
    assert restored.data == {"seed": 0, "consumed": 3, "global_batch_size": 4}
    with pytest.raises(ValueError, match="counts global batches of 4 examples, but this loader's global batch is 8"):
        next(xf.DataLoader(dataset, batch_size=8).iterate(restored))
    assert loader.attach(restored) is restored
    # A checkpoint of an unrecorded position loads into a `like` that records one.
    plain = xf.load(xf.save(make_state(), tmp_path / "plain"), like=loader.attach(make_state()))
    assert plain.data == {"seed": 0, "consumed": 0}


def test_a_checkpoint_written_before_checksums_still_loads(tmp_path):
    """Backward compatibility: format 1 (no checksums) loads, its structure still checked."""
    state = trained(n=2)
    path = xf.save(state, tmp_path / "c")
    meta = json.loads((path / "meta.json").read_text())
    meta["format"] = "xform-checkpoint-1"
    del meta["checksums"]
    (path / "meta.json").write_text(json.dumps(meta))
    assert_states_close(xf.load(path, like=make_state()), state)
    assert "params['0.weight']" in load_error(path, like=make_state(sizes=(5, 8, 3)))
