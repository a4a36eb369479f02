"""``xf.DataLoader`` across ranks: disjoint slices of every global batch, coverage per
epoch, padding of the last global batch and ``gather_for_metrics``, and resuming a
checkpoint on another number of processes (2 -> 1 and 1 -> 2) with exactly the next
global batches. Real processes over gloo (``ProcessPool``), and in-process loaders given
``rank=``/``world_size=`` for more world sizes."""

import itertools

import pytest
import torch
import torch.nn.functional as F

import xform as xf
import xform.distributed  # noqa: F401 - xf.distributed
from xform.distributed.procs import ProcessPool

N = 21  # examples: with a global batch of 8, each epoch is 8 + 8 + 5
GBS = 8


class Indexed(torch.utils.data.Dataset):
    """Example ``i`` is ``{"i": i, "x": [i], "y": [0]}``: batches show which examples they hold."""

    def __init__(self, n=N):
        self.n = n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return {"i": torch.tensor(i), "x": torch.tensor([float(i)]), "y": torch.tensor([0.0])}


def make_state():
    torch.manual_seed(0)
    return xf.TrainState.create(torch.nn.Linear(1, 1), optimizer=torch.optim.SGD, lr=1e-3, seed=5)


def step(state, batch):
    def loss_fn(params):
        return F.mse_loss(xf.apply(state, params, batch["x"]), batch["y"])

    _, grads = xf.value_and_grad(loss_fn)(state.params)
    return state.apply_gradients(grads), {}


def ids(batches):
    return [b["i"].tolist() for b in batches]


def single_process_batches(epochs):
    """The global batches a single process gets with ``batch_size=GBS``."""
    loader = xf.DataLoader(Indexed(), batch_size=GBS, world_size=1)
    return ids(loader.iterate(make_state(), epochs=epochs))


@pytest.fixture(scope="module")
def pool():
    with ProcessPool(2, timeout_s=60) as p:
        yield p


# --- functions run on every rank ------------------------------------------------------------


def _epochs_on_rank(epochs, drop_last):
    loader = xf.DataLoader(Indexed(), global_batch_size=GBS, drop_last=drop_last)
    state = make_state()
    out = []
    for i, batch in enumerate(loader.iterate(state, epochs=epochs)):
        out.append((batch["i"].tolist(), loader.padding(), loader.padding(i)))
    return out, (loader.rank, loader.world_size, loader.batch_size, len(loader))


def _gather_for_metrics_on_rank():
    loader = xf.DataLoader(Indexed(), global_batch_size=GBS)
    state = make_state()
    metrics, plain = [], []
    for batch in loader.iterate(state, epochs=2):
        # per-example outputs: the example index and a prediction-like float per example
        got = xf.distributed.gather_for_metrics({"i": batch["i"], "x": batch["x"] * 2}, loader=loader)
        metrics.append((got["i"].tolist(), got["x"].squeeze(1).tolist()))
        plain.append(xf.distributed.gather(batch["i"]).tolist())
    return metrics, plain


def _train_and_save_on_rank(path, steps, epochs):
    """Runs ``steps`` steps, saves, then keeps going: the uninterrupted 2-process run."""
    loader = xf.DataLoader(Indexed(), global_batch_size=GBS)
    state = make_state()
    seen = []
    for batch in loader.iterate(state, epochs=epochs):
        if state.data["consumed"] == steps:
            xf.save(state, path)
        seen.append(batch["i"].tolist())
        state, _ = step(state, batch)
    return seen


def _resume_on_rank(path, epochs):
    state = xf.load(path, like=make_state())
    loader = xf.DataLoader(Indexed(), global_batch_size=GBS)
    seen = []
    for batch in loader.iterate(state, epochs=epochs):
        seen.append((state.data["consumed"], batch["i"].tolist(), loader.padding()))
        state, _ = step(state, batch)
    return seen


# --- tests ---------------------------------------------------------------------------------


def union(per_rank, pad):
    """The ranks' slices of one global batch, in rank order, without the padding."""
    joined = sum(per_rank, [])
    return joined[: len(joined) - pad]


def test_ranks_get_disjoint_slices_whose_union_is_the_single_process_batch(pool):
    (r0, info0), (r1, info1) = pool.run(_epochs_on_rank, 2, False)
    assert info0 == (0, 2, 4, 3) and info1 == (1, 2, 4, 3)  # rank, world, per-rank batch, batches/epoch
    single = single_process_batches(2)
    assert len(r0) == len(r1) == len(single) == 6
    for i, ((a, pad_a, pad_ia), (b, pad_b, pad_ib)) in enumerate(zip(r0, r1)):
        assert len(a) == len(b), "every rank must get a batch of the same size"
        assert pad_a == pad_b == pad_ia == pad_ib == (1 if i % 3 == 2 else 0)
        assert not set(a) & set(b[: len(b) - pad_a]), f"batch {i}: ranks overlap"
        assert union([a, b], pad_a) == single[i]
    for epoch in range(2):
        examples = sum((union([r0[i][0], r1[i][0]], r0[i][1]) for i in range(3 * epoch, 3 * epoch + 3)), [])
        assert sorted(examples) == list(range(N)), f"epoch {epoch} must cover every example once"
    assert r0[0][0] != r0[3][0], "each epoch has its own order"
    padded = r1[2][0][-1]
    assert padded == single[0][0], "padding wraps around to the start of the epoch's order"


def test_drop_last_gives_full_disjoint_batches(pool):
    (r0, _), (r1, _) = pool.run(_epochs_on_rank, 1, True)
    single = xf.DataLoader(Indexed(), batch_size=GBS, drop_last=True, world_size=1)
    assert [a + b for (a, *_), (b, *_) in zip(r0, r1)] == ids(single.iterate(make_state()))
    assert all(len(a) == len(b) == 4 and pad == 0 for (a, pad, _), (b, *_) in zip(r0, r1))


def test_gather_for_metrics_drops_exactly_the_padding(pool):
    (m0, p0), (m1, p1) = pool.run(_gather_for_metrics_on_rank)
    single = single_process_batches(2)
    assert m0 == m1
    assert [i for i, _ in m0] == single
    assert [x for _, x in m0] == [[2.0 * i for i in batch] for batch in single]
    assert [len(b) for b in p0] == [8, 8, 6, 8, 8, 6], "plain gather keeps the padded example"
    assert p0[2][:5] == single[2] and p0[2][5] == single[0][0]


def test_resume_2_processes_on_1(pool, tmp_path):
    """A checkpoint taken after 2 steps on 2 processes, resumed on 1 with the same global
    batch size, continues with exactly the next global batches, across the epoch end."""
    path = str(tmp_path / "ckpt")
    seen0, seen1 = pool.run(_train_and_save_on_rank, path, 2, 2)
    single = single_process_batches(2)
    state = xf.load(path, like=make_state())
    assert state.data["consumed"] == 2
    loader = xf.DataLoader(Indexed(), global_batch_size=GBS)
    assert loader.world_size == 1
    resumed = ids(loader.iterate(state, epochs=1))  # the rest of epoch 0: one batch
    resumed += ids(loader.iterate(state.replace(data={**state.data, "consumed": 3}), epochs=1))
    assert resumed == single[2:]
    two_process = [union([a, b], 1 if i % 3 == 2 else 0) for i, (a, b) in enumerate(zip(seen0, seen1))]
    assert two_process == single  # the uninterrupted 2-process run saw the same global batches


def test_resume_1_process_on_2(pool, tmp_path):
    path = tmp_path / "ckpt"
    loader = xf.DataLoader(Indexed(), global_batch_size=GBS)
    state = make_state()
    for batch in itertools.islice(loader.iterate(state, epochs=None), 4):  # into the second epoch
        state, _ = step(state, batch)
    xf.save(state, path)
    single = single_process_batches(3)
    r0, r1 = pool.run(_resume_on_rank, str(path), 2)
    assert [c for c, _, _ in r0] == [c for c, _, _ in r1] == [4, 5, 6, 7, 8]
    got = [union([a, b], pad) for (_, a, pad), (_, b, _) in zip(r0, r1)]
    assert got == single[4:9]


@pytest.mark.parametrize("world", [3, 4, 5])
@pytest.mark.parametrize("n", [1, 10, 24, 23])
def test_slices_for_more_world_sizes(world, n):
    """In-process loaders given rank/world_size: equal sizes per rank, disjoint slices,
    padding at the end of the global batch, and each example once per epoch."""
    ranks = [xf.DataLoader(Indexed(n), batch_size=2, rank=r, world_size=world) for r in range(world)]
    state = make_state()
    per_rank = [ids(loader.iterate(state)) for loader in ranks]
    single = ids(xf.DataLoader(Indexed(n), batch_size=2 * world, world_size=1).iterate(state))
    covered = []
    for i, batches in enumerate(zip(*per_rank)):
        assert len({len(b) for b in batches}) == 1
        pad = ranks[0].padding(i)
        assert union(list(batches), pad) == single[i]
        assert pad == len(batches[0]) * world - len(single[i]) < world
        covered += single[i]
    assert sorted(covered) == list(range(n))


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(global_batch_size=10, world_size=4), ValueError, r"xf.DataLoader: global_batch_size=10 is not divisible by the 4 processes; pass a multiple of 4 \(e.g. 8 or 12\), or batch_size= per process"),
        (dict(batch_size=2, global_batch_size=8), TypeError, r"xf.DataLoader: pass exactly one of batch_size= \(examples per process\) and global_batch_size="),
        (dict(), TypeError, r"xf.DataLoader: pass exactly one of batch_size="),
        (dict(global_batch_size=0), ValueError, r"xf.DataLoader: global_batch_size must be a positive int, got 0"),
        (dict(batch_size=2, world_size=0), ValueError, r"xf.DataLoader: world_size must be a positive int, got 0"),
    ],
)  # fmt: skip
def test_batch_size_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        xf.DataLoader(Indexed(), **kwargs)


def test_global_batch_size_splits_over_the_processes():
    loader = xf.DataLoader(Indexed(20), global_batch_size=12, rank=1, world_size=3)
    assert (loader.batch_size, loader.global_batch_size, len(loader)) == (4, 12, 2)
    assert loader.layout(0) == (4, 0)
    assert loader.layout(1) == loader.layout(3) == (3, 1)  # 8 examples left: 3 per rank, 1 repeated
    assert xf.DataLoader(Indexed(21), global_batch_size=12, world_size=3).layout(1) == (3, 0)
