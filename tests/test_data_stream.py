"""``xf.DataLoader`` over an ``IterableDataset``: one global stream cut into global
batches, split across ranks and worker processes without overlap, resumed by count and
skip with exactly the next batches (in process, and on 2 real processes over gloo)."""

import itertools

import pytest
import torch
import torch.nn.functional as F

import xform as xf
from xform.distributed.procs import ProcessPool

N = 21  # examples per epoch: with a global batch of 4, 5 full batches and one of 1


class Stream(torch.utils.data.IterableDataset):
    """Example ``i`` is ``i``; ``noise=True`` adds a random augmentation drawn while
    iterating; ``set_epoch`` shifts the values, as a dataset that reshuffles per epoch would."""

    def __init__(self, n=N, noise=False):
        self.n, self.noise, self.epoch = n, noise, 0

    def set_epoch(self, epoch):
        self.epoch = epoch

    def __iter__(self):
        for i in range(self.n):
            x = float(i + 100 * self.epoch)
            yield torch.tensor(x + torch.rand(()).item()) if self.noise else torch.tensor(x)


class Counting(Stream):
    """Counts the examples each reader pulls (in the main process)."""

    pulled = 0

    def __iter__(self):
        for x in super().__iter__():
            Counting.pulled += 1
            yield x


def make_state(seed=0):
    torch.manual_seed(0)
    return xf.TrainState.create(torch.nn.Linear(1, 1), optimizer=torch.optim.SGD, lr=1e-3, seed=seed)


def at(state, consumed):
    return state.replace(data={**state.data, "consumed": consumed})


def take(loader, state, n):
    return [b.tolist() for b in itertools.islice(loader.iterate(state, epochs=None), n)]


STATE = make_state()


def test_batches_of_one_stream_and_epochs():
    loader = xf.DataLoader(Stream(), batch_size=4)
    assert loader.resume_method == "count-and-skip" and loader.shuffle is False
    got = take(loader, STATE, 12)
    epoch0 = [[float(i) for i in range(j, min(j + 4, N))] for j in range(0, N, 4)]
    assert got[:6] == epoch0
    assert got[6:] == [[x + 100 for x in b] for b in epoch0], "set_epoch(1) is called for the next epoch"
    assert [b.tolist() for b in loader.iterate(STATE)] == epoch0, "epochs=1: the rest of the current epoch"


@pytest.mark.parametrize("consumed", [1, 5, 6, 8, 13])
def test_resuming_continues_with_exactly_the_next_batch(consumed):
    """Catches a skipped or repeated batch after resume: mid-epoch, at the last (short)
    batch, on an epoch boundary and in a later epoch."""
    loader = xf.DataLoader(Stream(), batch_size=4)
    full = take(loader, STATE, 16)
    assert take(loader, at(STATE, consumed), 16 - consumed) == full[consumed:]


def test_drop_last_drops_the_short_batch():
    loader = xf.DataLoader(Stream(), batch_size=4, drop_last=True)
    full = take(loader, STATE, 10)
    assert all(len(b) == 4 for b in full) and full[5][0] == 100.0
    assert take(loader, at(STATE, 5), 5) == full[5:]


def test_the_position_follows_the_updates():
    from _util import mlp

    state = xf.TrainState.create(mlp(sizes=(1, 1)), optimizer=torch.optim.SGD, lr=0.1)
    loader = xf.DataLoader(Stream(), batch_size=4)

    def step(state, x):
        def loss_fn(p):
            return F.mse_loss(xf.apply(state, p, x[:, None]), x[:, None])

        _, g = xf.value_and_grad(loss_fn)(state.params)
        return state.apply_gradients(g), {}

    seen = []
    for b in itertools.islice(loader.iterate(state, epochs=None), 8):
        seen.append(b.tolist())
        state, _ = step(state, b)
    assert state.data["consumed"] == 8 and loader.position(state) == (1, 2)
    assert take(loader, state, 2) == take(loader, STATE, 10)[8:]


@pytest.mark.parametrize("world", [2, 3])
def test_ranks_get_disjoint_slices_whose_union_is_the_single_process_batch(world):
    """Catches a rank overlap (two ranks training on the same examples) and a lost
    example: in rank order, the ranks' slices without the padding are the batch a single
    process gets with the global batch size; all ranks get batches of one size."""
    single = take(xf.DataLoader(Stream(), batch_size=2 * world), STATE, 12)
    ranks = [xf.DataLoader(Stream(), batch_size=2, rank=r, world_size=world) for r in range(world)]
    per_rank = []
    for loader in ranks:
        batches, pads = [], []
        for b in itertools.islice(loader.iterate(STATE, epochs=None), 12):
            batches.append(b.tolist())
            pads.append(loader.padding())
        per_rank.append((batches, pads))
    for i, expected in enumerate(single):
        slices = [batches[i] for batches, _ in per_rank]
        pad = per_rank[0][1][i]
        assert len({len(s) for s in slices}) == 1 and all(p[i] == pad for _, p in per_rank)
        merged = sum(slices, [])
        assert merged[: len(merged) - pad] == expected
    # and the resumed ranks continue with exactly their next slices
    for loader, (batches, _) in zip(ranks, per_rank):
        assert take(loader, at(STATE, 7), 5) == batches[7:]


def test_a_position_resumes_on_another_number_of_processes():
    """The position counts global batches of one stream, so a checkpoint of 2 ranks
    (global batch 6) resumes on 3 ranks or 1 with exactly the next global batches."""
    single = take(xf.DataLoader(Stream(noise=True), batch_size=6), STATE, 9)
    for world in (1, 2, 3):
        ranks = [xf.DataLoader(Stream(noise=True), global_batch_size=6, rank=r, world_size=world) for r in range(world)]
        per_rank = [take(loader, at(STATE, 4), 5) for loader in ranks]
        merged = [sum(slices, []) for slices in zip(*per_rank)]
        assert [m[: len(s)] for m, s in zip(merged, single[4:])] == single[4:], f"world_size={world}"


@pytest.mark.parametrize("noise", [False, True], ids=["plain", "augmented"])
def test_workers_give_the_batches_of_the_main_process_and_resume_exactly(noise):
    """Catches a worker re-reading what another worker served (each batch twice, or in
    the wrong order) and augmentations that depend on which worker drew them: 2 workers
    give exactly the batches of the main process, also after a resume mid-epoch."""
    plain = take(xf.DataLoader(Stream(noise=noise), batch_size=4), STATE, 9)
    workers = xf.DataLoader(Stream(noise=noise), batch_size=4, num_workers=2)
    assert take(workers, STATE, 9) == plain
    assert take(workers, at(STATE, 3), 6) == plain[3:]
    if noise:
        assert take(xf.DataLoader(Stream(noise=True), batch_size=4), make_state(seed=1), 2) != plain[:2]


def test_loading_in_the_main_process_leaves_the_global_random_streams_alone():
    torch.manual_seed(7)
    expected = torch.rand(3)
    torch.manual_seed(7)
    take(xf.DataLoader(Stream(noise=True), batch_size=4), STATE, 3)
    assert torch.equal(torch.rand(3), expected)


def test_the_main_process_reads_each_example_once_then_skips_on_resume():
    """Count and skip reads the skipped examples once (not once per epoch or per batch)."""
    loader = xf.DataLoader(Counting(), batch_size=4)
    Counting.pulled = 0
    take(loader, STATE, 3)
    assert Counting.pulled == 12
    Counting.pulled = 0
    take(loader, at(STATE, 2), 1)
    assert Counting.pulled == 12


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(shuffle=True), ValueError, r"xf.DataLoader: shuffle=True needs a map-style dataset; an IterableDataset is read in its own order \(shuffle it in the dataset, e.g. a Hugging Face dataset's \.shuffle\(seed=\.\.\., buffer_size=\.\.\.\), whose set_epoch the loader calls each epoch\)"),
    ],
)  # fmt: skip
def test_bad_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        xf.DataLoader(Stream(), batch_size=4, **kwargs)


def test_map_style_only_methods_say_so():
    loader = xf.DataLoader(Stream(), batch_size=4)
    with pytest.raises(TypeError, match=r"xf.DataLoader.order: .*IterableDataset"):
        loader.order(0, 0)
    with pytest.raises(TypeError, match=r"xf.DataLoader: an IterableDataset has no len"):
        len(loader)
    with pytest.raises(ValueError, match=r"xf.DataLoader.attach: .*reslice=True needs a map-style dataset"):
        xf.DataLoader(Stream(), batch_size=2).attach(loader.attach(STATE), reslice=True)


def test_an_empty_stream_gives_no_batch():
    assert take(xf.DataLoader(Stream(0), batch_size=4), STATE, 3) == []


# --- 2 real processes over gloo ---------------------------------------------------------------

GBS = 4


@pytest.fixture(scope="module")
def pool():
    with ProcessPool(2, timeout_s=60) as p:
        yield p


def _run_on_rank(path, save_at, steps, num_workers, resume):
    """Trains ``steps`` steps from the start (saving at ``save_at``) or from the checkpoint."""
    if num_workers:
        import multiprocessing

        # ProcessPool's ranks are spawned daemons: daemons may not start workers, and a
        # spawned process spawns its workers too (each one importing torch: ~15 s here).
        # A rank started by `xform launch` or torchrun is neither, and forks its workers.
        multiprocessing.current_process()._config["daemon"] = False
        multiprocessing.set_start_method("fork", force=True)
    loader = xf.DataLoader(Stream(noise=True), global_batch_size=GBS, num_workers=num_workers)
    state = make_state()
    if resume:
        state = xf.load(path, like=state)
    state = loader.attach(state)
    seen = []
    for batch in itertools.islice(loader.iterate(state, epochs=None), steps - state.data["consumed"]):
        if state.data["consumed"] == save_at and not resume:
            xf.save(state, path)
        seen.append((state.data["consumed"], batch.tolist(), loader.padding()))
        _, grads = xf.value_and_grad(lambda p: xf.apply(state, p, batch[:, None]).sum())(state.params)
        state = state.apply_gradients(grads)
    return seen


@pytest.mark.parametrize("num_workers", [0, 2])
def test_two_processes_resume_with_exactly_the_next_global_batches(pool, tmp_path, num_workers):
    """On 2 processes (with 0 and 2 workers each): the ranks' slices, merged, are the
    single-process global batches (no rank overlap, no lost example), and a run resumed
    from a checkpoint taken mid-epoch continues with exactly the batches the
    uninterrupted run saw (no skipped or repeated batch, augmentations included)."""
    path = str(tmp_path / "ckpt")
    single = take(xf.DataLoader(Stream(noise=True), batch_size=GBS), STATE, 9)
    r0, r1 = pool.run(_run_on_rank, path, 3, 9, num_workers, False)
    merged = [(a + b)[: len(a) * 2 - pad] for (_, a, pad), (_, b, _) in zip(r0, r1)]
    assert merged == single
    q0, q1 = pool.run(_run_on_rank, path, 3, 9, num_workers, True)
    assert [c for c, _, _ in q0] == [3, 4, 5, 6, 7, 8]
    assert q0 == r0[3:] and q1 == r1[3:]


# --- dispatch=True: rank 0 reads, the ranks get their slices -----------------------------------


class OnlyRank0(Stream):
    """A stream only rank 0 can read (a dataset that cannot be split by rank)."""

    def __iter__(self):
        if torch.distributed.get_rank() != 0:
            raise RuntimeError("dispatch=True read the dataset on a rank other than 0")
        return super().__iter__()


class Noisy(torch.utils.data.Dataset):
    def __len__(self):
        return N

    def __getitem__(self, i):
        if torch.distributed.get_rank() != 0:
            raise RuntimeError("dispatch=True read the dataset on a rank other than 0")
        return torch.tensor(float(i)) + torch.rand(())


def _dispatch_on_rank(kind, num_workers):
    """``dispatch=True`` batches from the start and after a resume at 3, and the batches
    the same rank gets without dispatch (reading the dataset itself)."""
    if num_workers:
        import multiprocessing

        multiprocessing.current_process()._config["daemon"] = False
        multiprocessing.set_start_method("fork", force=True)
    make = {"stream": lambda: OnlyRank0(noise=True), "map": Noisy}[kind]
    kw = dict(global_batch_size=GBS, num_workers=num_workers)
    loader = xf.DataLoader(make(), dispatch=True, **kw)
    full = [(b.tolist(), loader.padding()) for b in itertools.islice(loader.iterate(STATE, epochs=None), 8)]
    resumed = [b.tolist() for b in itertools.islice(loader.iterate(at(STATE, 3), epochs=None), 5)]
    return full, resumed


@pytest.mark.parametrize("kind, num_workers", [("stream", 0), ("map", 2)])
def test_dispatch_gives_every_rank_its_slice_read_on_rank_0(pool, kind, num_workers):
    """dispatch=True: only rank 0 reads (the dataset raises elsewhere), and each rank gets
    exactly the slice it would have read itself: merged in rank order, the single-process
    global batches (random augmentations included); resumed, exactly the next ones."""
    (f0, r0), (f1, r1) = pool.run(_dispatch_on_rank, kind, num_workers)
    if kind == "stream":
        single = take(xf.DataLoader(Stream(noise=True), batch_size=GBS), STATE, 8)
        merged = [(a + b)[: len(a) * 2 - pad] for (a, pad), (b, _) in zip(f0, f1)]
        assert merged == single
    else:  # the per-rank slices of a non-dispatching loader given rank=/world_size=
        for r, got in ((0, f0), (1, f1)):
            plain = xf.DataLoader(NoisyAnywhere(), global_batch_size=GBS, rank=r, world_size=2)
            assert [b for b, _ in got] == take(plain, STATE, 8)
    assert r0 == [b for b, _ in f0[3:]] and r1 == [b for b, _ in f1[3:]]


class NoisyAnywhere(Noisy):
    def __getitem__(self, i):
        return torch.tensor(float(i)) + torch.rand(())


def test_dispatch_on_one_process_is_the_plain_loader():
    assert take(xf.DataLoader(Stream(), batch_size=4, dispatch=True), STATE, 7) == take(
        xf.DataLoader(Stream(), batch_size=4), STATE, 7
    )
    with pytest.raises(TypeError, match=r"xf.DataLoader: dispatch must be a bool, got 'yes'"):
        xf.DataLoader(Stream(), batch_size=4, dispatch="yes")
