"""Hugging Face ``datasets`` with ``xf.DataLoader``: a map-style ``Dataset`` and a
streaming ``IterableDataset`` (built in memory, no downloads), variable-length token
sequences padded by ``xf.PadCollate``, on 1 and 2 processes, resumed exactly."""

import itertools

import pytest
import torch

import xform as xf
from xform.distributed.procs import ProcessPool

import datasets  # noqa: E402  (a test dependency: fail, never skip, when it is missing)

N = 22


def rows():
    """Example ``i``: ``i % 5 + 1`` tokens, each ``i``; ``labels`` are the same tokens."""
    ids = [[i] * (i % 5 + 1) for i in range(N)]
    return {"input_ids": ids, "labels": ids, "i": list(range(N))}


def map_style():
    return datasets.Dataset.from_dict(rows())


def streaming(shards=3):
    return map_style().to_iterable_dataset(num_shards=shards)


COLLATE = xf.PadCollate(pad={"input_ids": 0, "labels": -100})


def make_state(seed=0):
    torch.manual_seed(0)
    return xf.TrainState.create(torch.nn.Linear(1, 1), optimizer=torch.optim.SGD, lr=1e-3, seed=seed)


STATE = make_state()


def at(state, consumed):
    return state.replace(data={**state.data, "consumed": consumed})


def ids(batches):
    return [b["i"].tolist() for b in batches]


def take(loader, state, n):
    return ids(itertools.islice(loader.iterate(state, epochs=None), n))


def test_pad_collate_pads_to_the_longest_sequence_of_the_batch():
    batch = COLLATE([{"input_ids": [1, 2, 3], "labels": [1, 2, 3], "i": 0}, {"input_ids": [4], "labels": [4], "i": 1}])
    assert batch["input_ids"].tolist() == [[1, 2, 3], [4, 0, 0]]
    assert batch["labels"].tolist() == [[1, 2, 3], [4, -100, -100]]
    assert batch["i"].tolist() == [0, 1] and batch["input_ids"].dtype == torch.long
    eight = xf.PadCollate(pad={"input_ids": 0}, multiple_of=8)([{"input_ids": [1, 2, 3]}])
    assert eight["input_ids"].shape == (1, 8)


@pytest.mark.parametrize(
    "kwargs, examples, error, match",
    [
        (dict(pad={"input_ids": 0}), [[1, 2]], TypeError, r"xf.PadCollate: examples must be dicts of fields, got list"),
        (dict(pad={"tokens": 0}), [{"input_ids": [1]}], ValueError, r"xf.PadCollate: an example has no field 'tokens' \(it has \['input_ids'\]\); name the sequence fields in pad="),
    ],
)  # fmt: skip
def test_pad_collate_errors(kwargs, examples, error, match):
    with pytest.raises(error, match=match):
        xf.PadCollate(**kwargs)(examples)


def test_pad_collate_arguments():
    with pytest.raises(TypeError, match=r"xf.PadCollate: pad must be a dict of field name to pad value, got list"):
        xf.PadCollate(pad=["input_ids"])
    with pytest.raises(ValueError, match=r"xf.PadCollate: multiple_of must be a positive int, got 0"):
        xf.PadCollate(pad={"input_ids": 0}, multiple_of=0)


def test_a_map_style_dataset_shuffles_and_resumes_exactly():
    loader = xf.DataLoader(map_style(), batch_size=4, collate_fn=COLLATE)
    full = take(loader, STATE, 9)
    assert sorted(sum(full[:6], [])) == list(range(N)), "an epoch covers each example once"
    assert take(loader, at(STATE, 4), 5) == full[4:]


def test_a_streaming_dataset_is_read_in_order_and_resumes_exactly():
    """Catches a skipped batch after resume (count and skip), also across the epoch end."""
    loader = xf.DataLoader(streaming(), batch_size=4, collate_fn=COLLATE)
    assert loader.resume_method == "count-and-skip"
    full = [b for b in itertools.islice(loader.iterate(STATE, epochs=None), 9)]
    assert ids(full[:6]) == [list(range(j, min(j + 4, N))) for j in range(0, N, 4)]
    assert full[0]["labels"].tolist()[0] == [0, -100, -100, -100]
    assert full[0]["input_ids"].tolist() == [[0, 0, 0, 0], [1, 1, 0, 0], [2, 2, 2, 0], [3, 3, 3, 3]]
    assert take(loader, at(STATE, 4), 5) == ids(full[4:])


def test_workers_read_a_sharded_streaming_dataset_without_overlap():
    """Catches a worker re-reading a shard: a Hugging Face IterableDataset hands each
    torch worker a subset of its shards by itself; the loader splits the stream itself,
    so 2 workers must give the batches of the main process, not each worker's shards."""
    plain = take(xf.DataLoader(streaming(), batch_size=4, collate_fn=COLLATE), STATE, 8)
    workers = xf.DataLoader(streaming(), batch_size=4, collate_fn=COLLATE, num_workers=2)
    assert take(workers, STATE, 8) == plain
    assert take(workers, at(STATE, 3), 5) == plain[3:]


# --- 2 real processes over gloo ---------------------------------------------------------------


@pytest.fixture(scope="module")
def pool():
    with ProcessPool(2, timeout_s=60) as p:
        yield p


def _train_then_resume_on_rank(path, kind, num_workers, save_at, steps):
    """The uninterrupted run of ``steps`` steps (saving at ``save_at``), then the run
    resumed from that checkpoint: both batch sequences, as seen by this rank."""
    if num_workers:  # see tests/test_data_stream.py: the pool's ranks are spawned daemons
        import multiprocessing

        multiprocessing.current_process()._config["daemon"] = False
        multiprocessing.set_start_method("fork", force=True)
    dataset = map_style() if kind == "map" else streaming()
    loader = xf.DataLoader(dataset, global_batch_size=4, collate_fn=COLLATE, num_workers=num_workers)

    def run(state, n):
        seen = []
        for batch in itertools.islice(loader.iterate(state, epochs=None), n):
            if state.data["consumed"] == save_at:
                xf.save(state, path)
            seen.append((batch["i"].tolist(), batch["input_ids"].tolist(), loader.padding()))
            _, grads = xf.value_and_grad(lambda p: xf.apply(state, p, batch["labels"][:, :1].float()).sum())(state.params)
            state = state.apply_gradients(grads)
        return seen

    full = run(loader.attach(make_state()), steps)
    resumed = run(loader.attach(xf.load(path, like=make_state())), steps - save_at)
    return full, resumed


@pytest.mark.parametrize("kind, num_workers", [("map", 0), ("stream", 2)])
def test_two_processes_split_and_resume_exactly(pool, tmp_path, kind, num_workers):
    """On 2 processes: each global batch is split between the ranks without overlap (in
    rank order they are the single-process batch), and the resumed run continues with
    exactly the batches of the uninterrupted one."""
    dataset = map_style() if kind == "map" else streaming()
    single = take(xf.DataLoader(dataset, batch_size=4, collate_fn=COLLATE), STATE, 8)
    (f0, r0), (f1, r1) = pool.run(_train_then_resume_on_rank, str(tmp_path / "ckpt"), kind, num_workers, 3, 8)
    merged = [(a + b)[: len(a) * 2 - pad] for (a, _, pad), (b, _, _) in zip(f0, f1)]
    assert merged == single
    assert r0 == f0[3:] and r1 == f1[3:]


def test_a_shuffled_streaming_dataset_resumes_exactly_across_epochs():
    """A buffer-shuffled stream reshuffles each epoch through ``set_epoch``; every reader
    (the main process, each worker) calls it alike, so a resume continues exactly."""
    shuffled = lambda: streaming().shuffle(seed=3, buffer_size=8)  # noqa: E731
    loader = xf.DataLoader(shuffled(), batch_size=4, collate_fn=COLLATE)
    full = take(loader, STATE, 12)
    assert full[:6] != full[6:12] and sorted(sum(full[:6], [])) == list(range(N))
    assert take(loader, at(STATE, 7), 5) == full[7:]
    assert take(xf.DataLoader(shuffled(), batch_size=4, collate_fn=COLLATE, num_workers=2), at(STATE, 5), 4) == full[5:9]


def test_a_dataset_split_by_node_is_refused():
    """``datasets.distributed.split_dataset_by_node`` gives each rank part of the stream;
    the loader would then cut each part again and drop examples."""
    from datasets.distributed import split_dataset_by_node

    part = split_dataset_by_node(streaming(), rank=0, world_size=2)
    with pytest.raises(ValueError, match=r"xf.DataLoader: this Hugging Face IterableDataset is already split by node \(split_dataset_by_node\); pass the whole dataset: xf.DataLoader splits it over the ranks itself"):
        xf.DataLoader(part, batch_size=4)


def test_readers_never_write_the_epoch_a_streaming_dataset_shares_with_its_workers():
    """A Hugging Face ``IterableDataset`` keeps its epoch in one shared-memory tensor, the
    same in the main process and every DataLoader worker. Each reader sets its own epoch,
    in its own process: written into that tensor, the workers raced (``set_epoch`` is a
    read-modify-write) and one read the other's epoch: seen once as a negative epoch that
    numpy refused (``test_two_processes_split_and_resume_exactly[stream-2]``), or a
    shuffle of the wrong epoch. Catches a reader that writes into the shared epoch: it
    reads 3 epochs, and the dataset's epoch must still be the user's."""
    from xform._data_stream import StreamReader

    ds = streaming()
    ds.set_epoch(5)
    reader = StreamReader(
        ds, batch_size=4, rank=0, world_size=1, drop_last=False, seed=0, start=0, epochs=3, collate_fn=len,
    )
    epochs = sorted({epoch for _, epoch, _, _, _ in reader})
    assert epochs == [0, 1, 2] and ds.epoch == 5
