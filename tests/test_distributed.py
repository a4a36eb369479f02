"""``xf.distributed``: the runtime, the collectives on 1, 2 and 4 real gloo processes, the
single-process answers without a group, errors, and a dead or hung peer."""

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch

import xform as xf
import xform.distributed  # noqa: F401 - xf.distributed
from xform.distributed.procs import ProcessPool, RemoteError

D = xf.distributed
LAUNCH_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "XFORM_TIMEOUT")


@pytest.fixture(scope="module")
def pools():
    """Pools of 1, 2 and 4 processes, started together and reused by every test here."""
    made = {n: ProcessPool(n, timeout_s=60) for n in (1, 2, 4)}
    yield made
    for p in made.values():
        p.close()


@pytest.fixture
def no_launch_env(monkeypatch):
    for k in LAUNCH_ENV:
        monkeypatch.delenv(k, raising=False)
    D.shutdown()
    yield monkeypatch
    D.shutdown()


# --- functions run on every rank of a pool --------------------------------------------------


def _runtime_on_rank():
    rt = D.initialize()  # the pool's group exists: returns its runtime
    again = D.initialize(backend="gloo", device="cpu")
    try:
        D.initialize(backend="nccl")
        refused = None
    except ValueError as e:
        refused = str(e)
    loader = xf.DataLoader(torch.arange(12), batch_size=2)
    return {
        "rt": rt, "same": again == rt, "refused": refused,
        "accessors": (D.rank(), D.world_size(), D.local_rank(), D.is_main_process(), D.is_local_main_process(), D.device()),
        "loader": (loader.rank, loader.world_size),
    }  # fmt: skip


def _reduce_on_rank():
    r = D.rank()
    tree = {
        "f": torch.tensor([r + 1.0, 2.0 * (r + 1)]),
        "i": torch.tensor(r + 1),
        "h": torch.full((2, 2), float(r), dtype=torch.bfloat16),
        "n": r + 1,
        "x": 0.25 * r,
        "b": torch.tensor([r == 0, True]),
    }
    before = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in tree.items()}
    no_bool = {k: v for k, v in tree.items() if k != "b"}
    out = {op: D.reduce(no_bool, op=op) for op in ("sum", "mean")}
    out["unchecked"] = D.reduce(no_bool, check=False)
    out.update({op: D.reduce(tree, op=op) for op in ("max", "min")})
    unchanged = all(
        torch.equal(tree[k], before[k]) if isinstance(before[k], torch.Tensor) else tree[k] == before[k] for k in tree
    )
    return out, unchanged


def _gather_on_rank():
    r = D.rank()
    tree = {
        "rows": torch.arange(3.0 * (r + 1)).reshape(r + 1, 3) + 100 * r,  # r + 1 rows
        "none_on_0": torch.full((r, 2), r, dtype=torch.int64),  # rank 0 has no rows
        "scalar": torch.tensor(float(r)),
        "mask": torch.tensor([r % 2 == 0]),
    }
    return D.gather(tree), D.gather_object({"rank": r})


def _broadcast_on_rank(src):
    r = D.rank()
    tree = {"w": torch.full((3,), float(r)), "k": torch.tensor([r, -r]), "tag": f"rank-{r}"}
    got = D.broadcast(tree, src=src)
    return got, D.broadcast_object(["hello", r], src=src), tree["w"][0].item()


def _main_first_on_rank(path):
    with D.main_process_first():
        if D.is_main_process():
            time.sleep(0.3)  # the others must still wait for it
        with open(path, "a") as f:
            f.write(f"{D.rank()}\n")
    D.wait_for_everyone()
    with open(path) as f:
        return f.read().split()


def _sync_rng_on_rank():
    r = D.rank()
    torch.manual_seed(1000 + r)
    D.sync_rng()
    default = torch.rand(4)
    g = torch.Generator().manual_seed(7 + r)
    D.sync_rng(g, src=D.world_size() - 1)
    return default, torch.rand(4, generator=g)


def _mismatch_on_rank(api):
    r = D.rank()
    if api == "reduce":
        D.reduce({"a": torch.zeros(2 + r)})
    elif api == "gather":
        D.gather({"a": torch.zeros(1, 2 + r)})
    else:
        D.broadcast({"a": torch.zeros(2)} if r == 0 else {"b": torch.zeros(2)})


def _still_works_on_rank():
    return D.reduce(torch.ones(1)).item()


# --- tests ---------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [1, 2, 4])
def test_initialize_returns_the_existing_groups_runtime(pools, n):
    for r, got in enumerate(pools[n].run(_runtime_on_rank)):
        assert got["rt"] == D.Runtime(
            rank=r, world_size=n, local_rank=r, local_world_size=n, device=torch.device("cpu"), backend="gloo"
        )
        assert got["same"]
        assert got["refused"].startswith("xf.distributed.initialize: already initialized with other settings: backend='nccl'")
        assert got["accessors"] == (r, n, r, r == 0, r == 0, torch.device("cpu"))
        assert got["loader"] == (r, n)


@pytest.mark.parametrize("n", [1, 2, 4])
def test_reduce(pools, n):
    results = pools[n].run(_reduce_on_rank)
    ranks = range(n)
    total_f = torch.tensor([sum(r + 1.0 for r in ranks), sum(2.0 * (r + 1) for r in ranks)])
    for out, unchanged in results:
        assert unchanged, "reduce modified its input"
        s, m = out["sum"], out["mean"]
        assert xf.tree.structure(out["unchecked"]) == xf.tree.structure(s)
        assert all(torch.equal(torch.as_tensor(a), torch.as_tensor(b)) for a, b in zip(xf.tree.leaves(out["unchecked"]), xf.tree.leaves(s)))
        torch.testing.assert_close(s["f"], total_f)
        assert s["i"].item() == sum(r + 1 for r in ranks) and s["i"].dtype == torch.int64
        assert s["h"].dtype == torch.bfloat16 and torch.equal(s["h"], torch.full((2, 2), float(sum(ranks)), dtype=torch.bfloat16))
        assert s["n"] == sum(r + 1 for r in ranks) and isinstance(s["n"], int)
        assert s["x"] == pytest.approx(0.25 * sum(ranks))
        torch.testing.assert_close(m["f"], total_f / n)
        assert m["i"].is_floating_point() and m["i"].item() == pytest.approx((n + 1) / 2)
        assert m["n"] == pytest.approx((n + 1) / 2) and isinstance(m["n"], float)
        assert out["max"]["i"].item() == n and out["min"]["i"].item() == 1
        assert out["max"]["b"].tolist() == [True, True] and out["min"]["b"].tolist() == [n == 1, True]
        assert out["max"]["b"].dtype == torch.bool


@pytest.mark.parametrize("n", [1, 2, 4])
def test_gather_with_different_leading_sizes(pools, n):
    results = pools[n].run(_gather_on_rank)
    want_rows = torch.cat([torch.arange(3.0 * (r + 1)).reshape(r + 1, 3) + 100 * r for r in range(n)])
    want_none = torch.cat([torch.full((r, 2), r, dtype=torch.int64) for r in range(n)])
    for gathered, objects in results:
        assert torch.equal(gathered["rows"], want_rows)
        assert torch.equal(gathered["none_on_0"], want_none) and gathered["none_on_0"].shape == (sum(range(n)), 2)
        assert gathered["scalar"].tolist() == [float(r) for r in range(n)]
        assert gathered["mask"].tolist() == [r % 2 == 0 for r in range(n)]
        assert objects == [{"rank": r} for r in range(n)]


@pytest.mark.parametrize("n", [1, 2, 4])
def test_broadcast_from_the_last_rank(pools, n):
    src = n - 1
    for r, (got, obj, own_w) in enumerate(pools[n].run(_broadcast_on_rank, src)):
        assert got["w"].tolist() == [float(src)] * 3
        assert got["k"].tolist() == [src, -src] and got["k"].dtype == torch.int64
        assert got["tag"] == f"rank-{src}"
        assert obj == ["hello", src]
        assert own_w == float(r), "broadcast modified its input"


@pytest.mark.parametrize("n", [2, 4])
def test_main_process_first(pools, n, tmp_path):
    for order in pools[n].run(_main_first_on_rank, str(tmp_path / "order")):
        assert order[0] == "0" and sorted(order) == [str(r) for r in range(n)]


@pytest.mark.parametrize("n", [2, 4])
def test_sync_rng(pools, n):
    results = pools[n].run(_sync_rng_on_rank)
    torch.manual_seed(1000)
    want_default = torch.rand(4)  # rank 0's draw
    want_g = torch.rand(4, generator=torch.Generator().manual_seed(7 + n - 1))  # the last rank's
    for default, from_g in results:
        assert torch.equal(default, want_default)
        assert torch.equal(from_g, want_g)


@pytest.mark.parametrize(
    "api, match",
    [
        ("reduce", r"xf.distributed.reduce: the processes passed different trees; leaf a is float32 of shape \(2,\) on rank 0 but float32 of shape \(3,\) on rank 1; every rank must pass the same dtypes and shapes"),
        ("gather", r"xf.distributed.gather: leaf a is torch.float32 of shape \(n, 2\) on rank 0 but torch.float32 of shape \(1, 3\) on rank 1; only dim 0 may differ"),
        ("broadcast", r"xf.distributed.broadcast: the processes passed different trees; rank 0 has structure PyTreeSpec\(\{'a': \*\}.*but rank 1 has PyTreeSpec\(\{'b': \*\}"),
    ],
)  # fmt: skip
def test_ranks_that_disagree_get_the_same_clear_error(pools, api, match):
    with pytest.raises(RemoteError, match=match):
        pools[2].run(_mismatch_on_rank, api)
    assert pools[2].run(_still_works_on_rank) == [2.0, 2.0]  # every rank raised; none is stuck


# --- one process, no group -----------------------------------------------------------------


def test_without_a_launcher_everything_is_one_process(no_launch_env):
    rt = D.initialize()
    assert rt == D.Runtime(rank=0, world_size=1, local_rank=0, local_world_size=1, device=rt.device, backend=None)
    assert not torch.distributed.is_initialized()
    assert D.initialize() == rt  # idempotent
    assert (D.rank(), D.world_size(), D.local_rank(), D.is_main_process(), D.is_local_main_process()) == (0, 1, 0, True, True)
    assert D.initialize(device="cpu").device == torch.device("cpu")

    tree = {"loss": torch.tensor(2.0), "count": torch.tensor(3), "n": 4}
    assert D.reduce(tree) is tree
    mean = D.reduce(tree, op="mean")
    assert mean["loss"] is tree["loss"] and mean["count"].dtype == torch.float32 and mean["n"] == 4.0
    gathered = D.gather({"p": torch.tensor([1, 2]), "s": torch.tensor(5.0)})
    assert gathered["p"].tolist() == [1, 2] and gathered["s"].shape == (1,)
    assert D.broadcast(tree) is tree and D.broadcast_object("x") == "x" and D.gather_object(1) == [1]
    D.wait_for_everyone()
    ran = []
    with D.main_process_first():
        ran.append(1)
    assert ran == [1]
    g = torch.Generator().manual_seed(3)
    D.sync_rng(g)
    assert torch.equal(torch.rand(2, generator=g), torch.rand(2, generator=torch.Generator().manual_seed(3)))
    loader = xf.DataLoader(torch.arange(5), batch_size=2, shuffle=False)
    state = xf.TrainState.create(torch.nn.Linear(1, 1), optimizer=torch.optim.SGD, lr=0.1)
    for batch in loader.iterate(state):
        assert torch.equal(D.gather_for_metrics(batch, loader=loader), batch)
    D.shutdown()
    D.shutdown()  # safe without a group


def test_a_launch_environment_of_one_makes_a_group(no_launch_env, tmp_path):
    no_launch_env.setenv("RANK", "0")
    no_launch_env.setenv("WORLD_SIZE", "1")
    rt = D.initialize(init_method=f"file://{tmp_path / 'store'}", timeout=30)
    try:
        assert torch.distributed.is_initialized()
        assert (rt.rank, rt.world_size, rt.backend, rt.device, rt.timeout.total_seconds()) == (0, 1, "gloo", torch.device("cpu"), 30)
        assert D.initialize(timeout=30) is rt
        with pytest.raises(ValueError, match=r"already initialized with other settings: timeout=5 s \(the group's is 30 s\)"):
            D.initialize(timeout=5)
        assert D.reduce(torch.tensor(3.0)).item() == 3.0
    finally:
        D.shutdown()
    assert not torch.distributed.is_initialized()


@pytest.mark.parametrize(
    "env, kwargs, error, match",
    [
        ({}, dict(timeout="10"), TypeError, r"xf.distributed.initialize: timeout must be a datetime.timedelta or seconds as a number, got '10'"),
        ({}, dict(timeout=0), ValueError, r"xf.distributed.initialize: timeout must be positive, got 0"),
        ({}, dict(backend=1), TypeError, r"xf.distributed.initialize: backend must be a string"),
        ({}, dict(device="cpu", backend="nccl"), ValueError, r"backend='nccl' needs a CUDA device, got device='cpu'; use backend='gloo'"),
        ({}, dict(device="nonsense"), ValueError, r"device='nonsense' is not a device"),
        ({}, dict(init_method="file:///tmp/x"), ValueError, r"init_method='file:///tmp/x' needs RANK and WORLD_SIZE in the environment"),
        ({"RANK": "0"}, {}, ValueError, r"the environment sets \['RANK'\] but not \['WORLD_SIZE'\]"),
        ({"RANK": "a", "WORLD_SIZE": "2"}, {}, ValueError, r"environment variable RANK='a' is not an integer"),
        ({"RANK": "2", "WORLD_SIZE": "2"}, {}, ValueError, r"RANK=2 is not in \[0, WORLD_SIZE=2\)"),
        ({"RANK": "0", "WORLD_SIZE": "2"}, {}, ValueError, r"RANK and WORLD_SIZE are set but \['MASTER_ADDR', 'MASTER_PORT'\] are not"),
        ({"XFORM_TIMEOUT": "soon", "RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "1"}, {}, ValueError, r"\$XFORM_TIMEOUT='soon' is not a number of seconds"),
        ({"XFORM_TIMEOUT": "0", "RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "1"}, {}, ValueError, r"\$XFORM_TIMEOUT\): timeout must be positive"),
    ],
)  # fmt: skip
def test_initialize_errors(no_launch_env, env, kwargs, error, match):
    for k, v in env.items():
        no_launch_env.setenv(k, v)
    with pytest.raises(error, match=match):
        D.initialize(**kwargs)
    assert not torch.distributed.is_initialized()


@pytest.mark.parametrize(
    "call, error, match",
    [
        (lambda: D.reduce(torch.ones(1), op="avg"), ValueError, r"xf.distributed.reduce: op must be one of \['max', 'mean', 'min', 'sum'\], got 'avg'"),
        (lambda: D.reduce({"a": "text"}), TypeError, r"xf.distributed.reduce: leaf a is a str, not a tensor or number; use xf.distributed.broadcast_object/gather_object"),
        (lambda: D.reduce({"m": torch.tensor([True])}), TypeError, r"xf.distributed.reduce: leaf m is a bool tensor and op='sum'; use op='max'"),
        (lambda: D.gather({"a": 1.0}), TypeError, r"xf.distributed.gather: leaf a is a float, not a tensor; wrap numbers with torch.tensor"),
        (lambda: D.broadcast(torch.ones(1), src=1), ValueError, r"xf.distributed.broadcast: src must be a rank in \[0, 1\), got 1"),
        (lambda: D.broadcast_object(1, src=-1), ValueError, r"xf.distributed.broadcast_object: src must be a rank in \[0, 1\), got -1"),
        (lambda: D.sync_rng(3), TypeError, r"xf.distributed.sync_rng: expected torch.Generator objects, got int"),
        (lambda: D.gather_for_metrics(torch.ones(1), loader=[1]), TypeError, r"xf.distributed.gather_for_metrics: loader must be the xf.DataLoader that served the batch, got list"),
        (lambda: D.gather_for_metrics(torch.ones(1), loader=xf.DataLoader(torch.arange(4), batch_size=2, world_size=2)), ValueError, r"gather_for_metrics: the loader splits batches over world_size=2 but this run has 1 processes"),
        (lambda: D.gather_for_metrics(torch.ones(1), loader=xf.DataLoader(torch.arange(4), batch_size=2)), ValueError, r"xf.DataLoader.layout: this loader has served no batch yet; pass index="),
        (lambda: D.gather_for_metrics(torch.ones(1), loader=xf.DataLoader(torch.arange(4), batch_size=2), index=0), ValueError, r"gather_for_metrics: leaf <root> has 1 rows after gathering, but the global batch has 2 \(2 per process\)"),
    ],
)  # fmt: skip
def test_collective_errors(no_launch_env, call, error, match):
    with pytest.raises(error, match=match):
        call()


# --- a dead or hung peer -------------------------------------------------------------------

PEER = textwrap.dedent(
    """
    import os, signal, sys, time, torch
    import xform.distributed as D
    mode, store, rank = sys.argv[1], sys.argv[2], os.environ["RANK"]
    open(f"{store}.ready{rank}", "w").close()      # imports done: start the 3 s clock together
    while not all(os.path.exists(f"{store}.ready{r}") for r in "01"):
        time.sleep(0.01)
    rt = D.initialize(init_method=f"file://{store}", timeout=3)
    D.reduce(torch.ones(1))                       # both ranks are up
    if rt.rank == 1:
        if mode == "killed":
            os.kill(os.getpid(), signal.SIGKILL)
        time.sleep(120)                           # hung: alive, never reaches the collective
    start = time.monotonic()
    try:
        for _ in range(1000):
            D.reduce(torch.ones(1))
    except D.DistributedError as e:
        print(f"{time.monotonic() - start:.2f}")
        print(e, flush=True)
        D.shutdown()
        sys.exit(3)
    D.shutdown()
    """
)


def test_a_dead_or_hung_peer_fails_rank_0_within_the_timeout(tmp_path):
    """Rank 1 is SIGKILLed, or hangs, mid-run; rank 0 (timeout=3 s) must fail with a clear
    error naming rank 1 (the only peer of a group of two), within the timeout, not hang."""
    script = tmp_path / "peer.py"
    script.write_text(PEER)
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_ENV}
    procs = {}
    for mode in ("killed", "hung"):
        procs[mode] = [
            subprocess.Popen(
                [sys.executable, str(script), mode, str(tmp_path / f"store-{mode}")],
                env={**env, "RANK": str(r), "WORLD_SIZE": "2", "OMP_NUM_THREADS": "1"},
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            )
            for r in range(2)
        ]  # fmt: skip
    try:
        for mode, (rank0, rank1) in procs.items():
            out, err = rank0.communicate(timeout=60)
            assert rank0.returncode == 3, f"{mode}: rank 0 exited {rank0.returncode}\n{out}\n{err}"
            elapsed, message = out.split("\n", 1)
            assert message.startswith("xf.distributed.reduce: the collective failed on rank 0 of 2: ")
            assert "The peer, rank 1, exited or did not reach this collective within 3 s" in message
            assert "xf.distributed.initialize(timeout=...)" in message
            if mode == "killed":
                assert float(elapsed) < 4.5, message  # at once, or at worst by the timeout
                assert rank1.wait(timeout=30) == -signal.SIGKILL
            else:
                assert 2.5 < float(elapsed) < 8, message
                assert "Timed out" in message
    finally:
        for pair in procs.values():
            for p in pair:
                if p.poll() is None:
                    p.kill()
                p.communicate()


PEER_IN_STEP = textwrap.dedent(
    """
    import os, sys, time, torch, torch.nn.functional as F
    import xform as xf
    import xform.distributed as D
    mode, store, rank = sys.argv[1], sys.argv[2], int(os.environ["RANK"])

    def together(name):                            # a barrier that no timeout can fail
        open(f"{store}.{name}{rank}", "w").close()
        while not all(os.path.exists(f"{store}.{name}{r}") for r in "01"):
            time.sleep(0.01)

    together("imported")
    # A dead peer must be detected at once, not by the timeout: give it a long one. A hung
    # peer is detected by the timeout: a short one.
    D.initialize(init_method=f"file://{store}", timeout=3 if mode.startswith("hung") else 30)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, 3))

    seen = {}

    def fail_here(where, state):
        seen[state.step, where] = n = seen.get((state.step, where), 0) + 1
        last = where == "count"  # the count is reduced once, after the last of 2 micro-batches
        if rank == 1 and state.step == 2 and mode.endswith(where) and n == (2 if last else 1):
            if mode.startswith("hung"):
                time.sleep(120)                       # alive, never reaches the collective
            os._exit(0)                               # dead: its sockets close

    def step(state, batch):
        def loss_fn(params):
            out = xf.apply(state, params, batch["x"])
            out.register_hook(lambda g: fail_here("backward", state))
            return xf.Mean(F.mse_loss(out, batch["y"], reduction="sum"), batch["x"].shape[0])

        fail_here("forward", state)
        loss, grads = xf.value_and_grad(loss_fn)(state.params)
        fail_here("count", state)
        return state.apply_gradients(grads), {"loss": loss}

    strategy = mode.split("-")[1]
    s = xf.shard(xf.accumulate(step, 2), strategy)
    state = xf.TrainState.create(model, optimizer=torch.optim.SGD, lr=0.1)
    together("set-up")                             # a loaded machine may skew the ranks' set-up
    if rank == 1 and mode.endswith("init"):
        os._exit(0)
    try:
        state = s.init(state)
    except Exception as e:
        print("0.00")
        print(type(e).__name__, type(e.__cause__).__name__)
        print(e, flush=True)
        os._exit(3)
    for i in range(4):
        start = time.monotonic()
        try:
            state, _ = s(state, {"x": torch.randn(4, 5), "y": torch.randn(4, 3)})
        except Exception as e:
            print(f"{time.monotonic() - start:.2f}")
            print(type(e).__name__, type(e.__cause__).__name__)
            print(e, flush=True)
            os._exit(3)
    D.shutdown()
    """
)


def test_a_dead_or_hung_peer_inside_a_step_is_a_distributed_error(tmp_path):
    """Bug: rank 1 dying inside a step surfaced on rank 0 as gloo's raw 'RuntimeError:
    [.../pair.cc:537] Read error ...: Connection reset by peer', not the documented
    xf.DistributedError. Rank 1 exits (or hangs) at step 2 in the backward pass of
    replicate (the gradient all-reduce), before the forward of zero3 (the FSDP
    all-gather), and between the backward and apply_gradients of zero3 (the item count
    reduction), and before ``step.init`` (the broadcast of rank 0's params); rank 0 must
    raise xf.DistributedError naming rank 1, the step and the phase, with torch's error as
    __cause__: at once for a dead peer (its timeout is 30 s), after the timeout (3 s) for a
    hung one."""
    script = tmp_path / "peer_in_step.py"
    script.write_text(PEER_IN_STEP)
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_ENV}
    phases = {
        "dead-replicate-backward": "in the backward pass (xf.value_and_grad)",
        "dead-zero3-forward": "in the forward pass (xf.apply), at distributed_c10d.all_gather",
        "dead-zero3-count": "in the gradient reduction (state.apply_gradients), at distributed_c10d.all_reduce",
        "hung-replicate-forward": "in the backward pass (xf.value_and_grad)",
        "dead-replicate-init": "in step.init (laying the state out), at ",
    }
    procs = {
        mode: [
            subprocess.Popen(
                [sys.executable, str(script), mode, str(tmp_path / f"store-{mode}")],
                env={**env, "RANK": str(r), "WORLD_SIZE": "2", "OMP_NUM_THREADS": "1"},
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            )
            for r in range(2)
        ]
        for mode in phases
    }  # fmt: skip
    try:
        for mode, (rank0, rank1) in procs.items():
            out, err = rank0.communicate(timeout=90)
            assert rank0.returncode == 3, f"{mode}: rank 0 exited {rank0.returncode}\n{out}\n{err}"
            elapsed, types, message = out.split("\n", 2)
            assert types == "DistributedError RuntimeError", f"{mode}: {types}\n{message}"
            at_step = "at state.step=0" if mode.endswith("init") else "at state.step=2"
            assert message.startswith(f"shard: a collective failed on rank 0 of 2 {at_step}, "), message
            assert phases[mode] in message, f"{mode}: {message}"
            assert "xf.distributed.initialize(timeout=...)" in message and "\n" not in message.strip()
            if mode.startswith("dead"):
                assert "The peer, rank 1, exited or did not reach the collective within 30 s" in message
                assert float(elapsed) < 10, f"{mode}: {elapsed} s\n{message}"  # at once, not by the timeout
                assert "by peer" in message, message
            else:
                assert "The peer, rank 1, exited or did not reach the collective within 3 s" in message
                assert 2.5 < float(elapsed) < 12, f"{mode}: {elapsed} s\n{message}"
                assert "Timed out" in message, message
    finally:
        for pair in procs.values():
            for p in pair:
                if p.poll() is None:
                    p.kill()
                p.communicate()
