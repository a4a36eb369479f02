"""``DataLoader``: order, epochs, positions, resume, ranks, workers, and errors."""

import itertools

import pytest
import torch

import xform as xf

from _util import mlp, step


def at(state, consumed):
    """``state`` with the data position of ``consumed`` batches."""
    return state.replace(data={**state.data, "consumed": consumed})


def take(loader, state, n):
    return [b.tolist() for b in itertools.islice(loader.iterate(state, epochs=None), n)]


class Squares(torch.utils.data.Dataset):
    def __init__(self, n):
        self.n = n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return torch.tensor(float(i * i))


class Augmented(Squares):
    """A random augmentation: noise drawn in ``__getitem__``."""

    def __getitem__(self, i):
        return torch.tensor(float(i)) + torch.rand(())


def make_state(seed=0):
    """A state whose ``seed`` (the default shuffle seed) is ``seed``."""
    return xf.TrainState.create(mlp(), optimizer=torch.optim.SGD, lr=0.1, seed=seed)


STATE = make_state(seed=3)


def test_unshuffled_batches_and_len():
    loader = xf.DataLoader(torch.arange(10), batch_size=4, shuffle=False)
    assert len(loader) == 3
    assert [b.tolist() for b in loader.iterate(STATE)] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    dropping = xf.DataLoader(torch.arange(10), batch_size=4, shuffle=False, drop_last=True)
    assert len(dropping) == 2
    assert [b.tolist() for b in dropping.iterate(STATE)] == [[0, 1, 2, 3], [4, 5, 6, 7]]


def test_each_shuffled_epoch_is_a_new_permutation():
    loader = xf.DataLoader(torch.arange(12), batch_size=4, shuffle=True)
    epochs = [sum((b.tolist() for b in loader.iterate(at(STATE, 3 * e))), []) for e in range(3)]
    assert all(sorted(e) == list(range(12)) for e in epochs)
    assert epochs[0] != epochs[1] != epochs[2] and epochs[0] != list(range(12))
    assert [loader.order(3, e).tolist() for e in range(3)] == epochs


def test_the_order_depends_on_the_seed_only():
    loader = xf.DataLoader(torch.arange(12), batch_size=4, shuffle=True)
    same = xf.DataLoader(torch.arange(12), batch_size=4, shuffle=True)
    assert take(loader, STATE, 6) == take(same, STATE, 6)  # another loader, the same order
    assert take(loader, make_state(seed=3), 6) == take(loader, STATE, 6)
    assert take(loader, make_state(seed=4), 3) != take(loader, STATE, 3)  # the seed of TrainState.create
    pinned = xf.DataLoader(torch.arange(12), batch_size=4, shuffle=True, seed=4)
    assert take(pinned, STATE, 3) == take(loader, make_state(seed=4), 3)


def test_epochs():
    loader = xf.DataLoader(torch.arange(6), batch_size=4, shuffle=True)
    assert len(list(loader.iterate(STATE))) == 2
    assert len(list(loader.iterate(STATE, epochs=3))) == 6
    assert len(list(loader.iterate(at(STATE, 1), epochs=2))) == 3  # the rest of epoch 0, then epoch 1
    assert len(take(loader, STATE, 50)) == 50  # epochs=None: forever


def test_position_follows_the_updates():
    loader = xf.DataLoader(torch.arange(10), batch_size=4, shuffle=True)
    state = make_state()
    assert loader.position(state) == (0, 0)
    assert loader.position(at(state, 2)) == (0, 2)
    assert loader.position(at(state, 3)) == (1, 0)
    assert loader.position(at(state, 7)) == (2, 1)


@pytest.mark.parametrize("drop_last", [False, True])
@pytest.mark.parametrize("consumed", [1, 3, 5])
def test_resuming_continues_with_exactly_the_next_batch(drop_last, consumed):
    loader = xf.DataLoader(torch.arange(10), batch_size=4, shuffle=True, drop_last=drop_last)
    full = take(loader, STATE, 8)
    assert take(loader, at(STATE, consumed), 8 - consumed) == full[consumed:]


def test_the_position_advances_once_per_step():
    loader = xf.DataLoader(
        torch.utils.data.TensorDataset(torch.randn(10, 4), torch.randint(0, 3, (10,))),
        batch_size=4, shuffle=True, collate_fn=lambda items: {"x": torch.stack([x for x, _ in items]), "y": torch.stack([y for _, y in items])},
    )
    state = xf.TrainState.create(mlp(), optimizer=torch.optim.AdamW, lr=1e-2)
    for b in itertools.islice(loader.iterate(state, epochs=None), 4):
        state, _ = xf.accumulate(step, 2)(state, b) if len(b["y"]) % 2 == 0 else step(state, b)
    assert state.data["consumed"] == 4 and loader.position(state) == (1, 1)


def test_workers_give_the_same_batches():
    data = Squares(16)
    plain = xf.DataLoader(data, batch_size=4, shuffle=True)
    workers = xf.DataLoader(data, batch_size=4, shuffle=True, num_workers=2)
    assert take(workers, STATE, 6) == take(plain, STATE, 6)
    assert take(workers, at(STATE, 3), 3) == take(plain, STATE, 6)[3:]


def test_random_augmentations_in_workers_resume_exactly():
    """The docstring: "Workers are seeded from (seed, epoch, position), so random
    augmentations resume exactly too." Resuming mid-epoch must give the same noisy
    batches as the uninterrupted run."""
    loader = xf.DataLoader(Augmented(12), batch_size=3, shuffle=True, num_workers=2)
    full = take(loader, STATE, 6)
    assert take(loader, STATE, 6) == full  # reproducible
    assert take(loader, at(STATE, 2), 4) == full[2:]


def test_ranks_get_disjoint_slices_of_each_global_batch():
    single = xf.DataLoader(torch.arange(16), batch_size=8, shuffle=True)
    ranks = [xf.DataLoader(torch.arange(16), batch_size=4, shuffle=True, rank=r, world_size=2) for r in range(2)]
    per_rank = [take(r, STATE, 4) for r in ranks]
    assert ranks[0].global_batch_size == 8 and len(ranks[0]) == 2
    for i, batch in enumerate(take(single, STATE, 4)):
        assert per_rank[0][i] + per_rank[1][i] == batch


def test_ranks_with_an_uneven_last_batch_stay_in_step():
    """9 examples on 2 ranks of 2 (global batch 4): the last global batch holds one
    example. Every rank gets as many batches as the others, of the same sizes (else one
    rank waits forever in a collective); the repeats that even out the last batch sit at
    its end, ``padding(i)`` counts them, and without them the ranks' slices in rank order
    are the single-process batches."""
    single = [b.tolist() for b in xf.DataLoader(torch.arange(9), batch_size=4, shuffle=True).iterate(STATE)]
    ranks = [xf.DataLoader(torch.arange(9), batch_size=2, shuffle=True, rank=r, world_size=2) for r in range(2)]
    per_rank = [[b.tolist() for b in loader.iterate(STATE)] for loader in ranks]
    assert [len(b) for b in per_rank[0]] == [len(b) for b in per_rank[1]] == [2, 2, 1]
    assert [ranks[0].padding(i) for i in range(3)] == [0, 0, 1]
    for i, expected in enumerate(single):
        merged = per_rank[0][i] + per_rank[1][i]
        assert merged[: len(merged) - ranks[0].padding(i)] == expected


@pytest.mark.parametrize(
    "dataset, kwargs, error, match",
    [
        (iter(range(10)), {}, TypeError, "xf.DataLoader: dataset must be map-style \\(__len__ and __getitem__\\) or a torch.utils.data.IterableDataset, got range_iterator"),
        (torch.arange(10), dict(batch_size=0), ValueError, "xf.DataLoader: batch_size must be a positive int, got 0"),
        (torch.arange(10), dict(batch_size=True), ValueError, "batch_size must be a positive int, got True"),
        (torch.arange(10), dict(batch_size="4"), ValueError, "batch_size must be a positive int, got '4'"),
        (torch.arange(10), dict(rank=2, world_size=2), ValueError, r"xf.DataLoader: rank must be in \[0, 2\), got 2"),
        (torch.arange(3), dict(batch_size=4, drop_last=True), ValueError, "a dataset of 3 examples gives no batch of global size 4 with drop_last=True"),
    ],
    ids=["iterator", "zero", "bool", "str", "rank", "drop-last"],
)
def test_bad_arguments(dataset, kwargs, error, match):
    kwargs = {"batch_size": 4, **kwargs}
    with pytest.raises(error, match=match):
        xf.DataLoader(dataset, **kwargs)


class SizedStream(torch.utils.data.IterableDataset):
    def __iter__(self):
        return iter(range(10))

    def __len__(self):
        return 10


def test_an_iterable_dataset_with_len_is_read_as_a_stream():
    """An IterableDataset is not map-style even when it has ``__len__`` (torch's Dataset
    base class defines a ``__getitem__`` that raises NotImplementedError): it is read as
    a stream (tests/test_data_stream.py), never indexed."""
    loader = xf.DataLoader(SizedStream(), batch_size=4)
    assert loader.resume_method == "count-and-skip"
    assert [b.tolist() for b in loader.iterate(STATE)] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]


def test_iterate_needs_a_state():
    loader = xf.DataLoader(torch.arange(10), batch_size=4)
    with pytest.raises(TypeError, match="xf.DataLoader.iterate: expected a TrainState, got dict"):
        next(loader.iterate({"consumed": 0}))


def test_repr():
    loader = xf.DataLoader(torch.arange(10), batch_size=4, drop_last=True)
    assert repr(loader) == "DataLoader(Tensor[10], batch_size=4, world_size=1, shuffle=True, drop_last=True)"


def test_loading_in_the_main_process_leaves_the_global_random_streams_alone():
    import random

    class Noisy(torch.utils.data.Dataset):
        def __len__(self):
            return 8

        def __getitem__(self, i):
            return torch.rand(()) + random.random()

    state = make_state()
    loader = xf.DataLoader(Noisy(), batch_size=4, shuffle=True)
    torch.manual_seed(123)
    random.seed(123)
    expected = (torch.rand(3), random.random())
    torch.manual_seed(123)
    random.seed(123)
    first = [b.clone() for b in loader.iterate(state)]
    assert torch.equal(torch.rand(3), expected[0]) and random.random() == expected[1]
    again = [b.clone() for b in loader.iterate(state)]  # augmentations depend on the batch alone
    assert all(torch.equal(a, b) for a, b in zip(first, again))


# --- a changed global batch size on resume (issue 7) ----------------------------------------


def flat(batches):
    return [i for b in batches for i in b.tolist()]


def test_resuming_with_another_global_batch_size_is_refused():
    """Catches: a resume with another global batch size silently repeating and skipping
    examples (6 repeated and 38 skipped in the report): the position counts batches."""
    data = torch.arange(24)
    six = xf.DataLoader(data, batch_size=6)
    state = at(six.attach(STATE), 3)  # 3 batches of 6 served (a restored checkpoint, say)
    assert state.data == {"seed": 3, "consumed": 3, "global_batch_size": 6}
    four = xf.DataLoader(data, batch_size=4)
    message = "the state's data position counts global batches of 6 examples, but this loader's global batch is 4"
    with pytest.raises(ValueError, match=f"xf.DataLoader.iterate: {message}.*global_batch_size=6.*reslice=True"):
        next(four.iterate(state))
    with pytest.raises(ValueError, match=f"xf.DataLoader.attach: {message}"):
        four.attach(state)
    with pytest.raises(ValueError, match=f"xf.DataLoader.position: {message}"):
        four.position(state)
    # The same global batch on another number of processes resumes exactly.
    halves = [xf.DataLoader(data, global_batch_size=6, rank=r, world_size=2) for r in (0, 1)]
    assert [h.attach(state) is state for h in halves] == [True, True]
    assert flat([next(h.iterate(state)) for h in halves]) == flat([next(six.iterate(state))])


def test_attach_records_the_size_once_and_updates_keep_it():
    loader = xf.DataLoader(torch.utils.data.TensorDataset(torch.randn(8, 4), torch.randint(0, 3, (8,))), batch_size=4)
    state = loader.attach(make_state())
    assert loader.attach(state) is state
    for x, y in loader.iterate(state):
        state, _ = step(state, {"x": x, "y": y})
    assert state.data == {"seed": 0, "consumed": 2, "global_batch_size": 4}


def test_reslice_continues_at_the_example_position():
    data = torch.arange(24)
    six, four = xf.DataLoader(data, batch_size=6), xf.DataLoader(data, batch_size=4)
    for consumed in (2, 4 + 2):  # 12 examples into epoch 0, then into epoch 1
        state = at(six.attach(STATE), consumed)
        epoch = consumed // 4
        served = flat(itertools.islice(six.iterate(at(state, 4 * epoch)), consumed % 4))
        resliced = four.attach(state, reslice=True)
        assert resliced.data == {"seed": 3, "consumed": 6 * epoch + 3, "global_batch_size": 4}
        rest = flat(four.iterate(resliced, epochs=1))
        assert sorted(served + rest) == list(range(24))  # none twice, none skipped
        assert served + rest == six.order(3, epoch).tolist()


def test_reslice_off_a_batch_boundary_skips_less_than_a_batch_and_says_so():
    data = torch.arange(24)
    six, four = xf.DataLoader(data, batch_size=6), xf.DataLoader(data, batch_size=4)
    state = at(six.attach(STATE), 3)  # 18 examples served; batches of 4 start at 16 and 20
    with pytest.warns(UserWarning, match="skips 2 examples of epoch 0 to start at a batch boundary"):
        resliced = four.attach(state, reslice=True)
    assert resliced.data["consumed"] == 5
    assert flat(four.iterate(resliced, epochs=1)) == six.order(3, 0)[20:].tolist()


def test_a_bad_recorded_size_is_refused():
    bad = STATE.replace(data={**STATE.data, "global_batch_size": "6"})
    with pytest.raises(ValueError, match="records global_batch_size='6', which is not a positive int"):
        next(xf.DataLoader(torch.arange(8), batch_size=4).iterate(bad))
