"""``xform launch``: through the real entry point (``python -m xform.cli launch``), a script
that joins with ``xf.distributed.initialize()`` and all-reduces; settings from the config
file under flags; restarts; failures; and the torchrun argument list for several nodes."""

import json
import os
import subprocess
import sys
import textwrap

import pytest

import xform.cli
from xform.cli._launch import STEADY_MALLOC, torchrun_argv

SCRIPT = textwrap.dedent(
    """
    import json, os, sys, torch
    import xform.distributed as D
    rt = D.initialize()
    total = D.reduce(torch.tensor([float(rt.rank + 1)]))
    cfg = json.loads(os.environ.get("XFORM_LAUNCH_CONFIG", "null"))
    sys.stdout.write(json.dumps({               # one write: the ranks share stdout, unbuffered
        "rank": rt.rank, "world": rt.world_size, "sum": total.item(), "args": sys.argv[1:],
        "backend": rt.backend, "timeout": rt.timeout and rt.timeout.total_seconds(),
        "precision": cfg and cfg["precision"], "malloc": os.environ.get("GLIBC_TUNABLES"),
    }) + "\\n")
    sys.stdout.flush()
    D.shutdown()
    """
)

FLAKY = textwrap.dedent(
    """
    import os, sys
    attempt = int(os.environ["TORCHELASTIC_RESTART_COUNT"])
    if attempt == 0:
        sys.exit("failing on the first attempt")
    print(f"succeeded on restart {attempt}", flush=True)
    """
)

OWN_MALLOC = "glibc.malloc.arena_max=2"
CLEAN = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "XFORM_TIMEOUT", "XFORM_LAUNCH_CONFIG")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Starts every launch at once (they are mostly waiting on imports), then collects them."""
    d = tmp_path_factory.mktemp("launch")
    (d / "script.py").write_text(SCRIPT)
    (d / "flaky.py").write_text(FLAKY)
    (d / "config.json").write_text(json.dumps({"nproc_per_node": 2, "precision": "bf16"}))
    env = {k: v for k, v in os.environ.items() if k not in CLEAN and k != "GLIBC_TUNABLES"}
    env.update(XFORM_CONFIG=str(d / "config.json"), OMP_NUM_THREADS="1")
    cli = [sys.executable, "-m", "xform.cli", "launch"]
    commands = {
        # nproc 2 from the config file; the script's own --nproc 9 is the script's
        "config": cli + ["--timeout", "90", str(d / "script.py"), "--lr", "0.1", "--nproc", "9"],
        "one": cli + ["--nproc", "1", str(d / "script.py")],  # the flag beats the config file; own malloc settings
        "plain": [sys.executable, str(d / "script.py")],
        "restart": cli + ["--nproc", "1", "--max-restarts", "1", str(d / "flaky.py")],
        "fail": cli + ["--nproc", "1", str(d / "flaky.py")],
    }
    envs = {"one": {**env, "GLIBC_TUNABLES": OWN_MALLOC}}
    procs = {
        name: subprocess.Popen(
            cmd, env=envs.get(name, env), cwd=d, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for name, cmd in commands.items()
    }
    done = {}
    try:
        for name, p in procs.items():
            out, err = p.communicate(timeout=120)
            done[name] = subprocess.CompletedProcess(p.args, p.returncode, out, err)
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.kill()
                p.communicate()
    return done


def lines(run):
    assert run.returncode == 0, f"exit {run.returncode}\nstdout:\n{run.stdout}\nstderr:\n{run.stderr}"
    return sorted((json.loads(x) for x in run.stdout.splitlines() if x.startswith("{")), key=lambda r: r["rank"])


def test_two_processes_with_settings_from_the_config_file(runs):
    run = runs["config"]
    got = lines(run)
    assert [(r["rank"], r["world"], r["sum"]) for r in got] == [(0, 2, 3.0), (1, 2, 3.0)]
    assert all(r["args"] == ["--lr", "0.1", "--nproc", "9"] for r in got)
    assert all(r["backend"] == "gloo" and r["timeout"] == 90.0 and r["precision"] == "bf16" for r in got)
    err = run.stderr
    assert "xform launch: settings, for xf.configure / xf.launch_config in the script (defaults < config file < flags):" in err
    assert err.count("xform launch: settings") == 1, "only the launcher prints the settings"
    assert "nproc_per_node      2             (config file " in err
    assert "precision           bf16          (config file " in err
    assert "timeout             90 s" in err
    assert "xform launch: torchrun --nnodes 1 --nproc-per-node 2 --standalone --max-restarts 0 " in err
    # a CPU host: the ranks start with glibc's heap trimming off (STEADY_MALLOC), and say so
    assert all(r["malloc"] == STEADY_MALLOC for r in got), got
    assert f"GLIBC_TUNABLES      {STEADY_MALLOC} (CPU host" in err


def test_one_process_by_flag_and_by_plain_python(runs):
    (one,) = lines(runs["one"])
    assert (one["rank"], one["world"], one["sum"], one["backend"], one["timeout"]) == (0, 1, 1.0, "gloo", 600.0)
    assert "nproc_per_node      1             (flag)" in runs["one"].stderr
    assert one["malloc"] == OWN_MALLOC, "the launcher replaced the user's GLIBC_TUNABLES"
    (plain,) = lines(runs["plain"])
    assert (plain["rank"], plain["world"], plain["sum"], plain["backend"], plain["precision"]) == (0, 1, 1.0, None, None)
    assert plain["malloc"] is None


def test_max_restarts_is_passed_through(runs):
    run = runs["restart"]
    assert run.returncode == 0, run.stderr
    assert "succeeded on restart 1" in run.stdout
    assert "failing on the first attempt" in run.stderr


def test_a_failing_script_fails_the_launch(runs):
    run = runs["fail"]
    assert run.returncode == 1
    assert "failing on the first attempt" in run.stderr
    assert "FAILED" in run.stderr and "exitcode  : 1" in run.stderr


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--nnodes", "2", "s.py"], "--nnodes 2 needs a rendezvous every node can reach: --rdzv-endpoint HOST:PORT"),
        (["--standalone", "--rdzv-endpoint", "h:1", "s.py"], "--standalone runs one node with a private rendezvous"),
        (["--master-addr", "h", "--rdzv-endpoint", "h:1", "s.py"], "pass either --master-addr/--master-port (static) or --rdzv-endpoint (c10d), not both"),
        (["--rdzv-backend", "etcd", "s.py"], "--rdzv-backend etcd needs --rdzv-endpoint HOST:PORT"),
        (["--nnodes", "2", "--master-addr", "h", "s.py"], "--nnodes 2 with --master-addr needs --node-rank I"),
        (["--nproc", "2", "no-such-script.py"], "no script at 'no-such-script.py'"),
        (["--backend", "xla", "--nproc", "2", "s.py"], "--backend xla runs one process (SPMD over every XLA device"),
    ],
)  # fmt: skip
def test_bad_launches_are_refused_before_starting(argv, message, capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("XFORM_CONFIG", str(tmp_path / "config.json"))
    (tmp_path / "config.json").write_text("{}")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "s.py").write_text("")
    assert xform.cli.main(["launch", *argv]) == 2
    assert f"xform launch: error: {message}" in capsys.readouterr().err


@pytest.mark.parametrize("text", ["0", "-1", "x"])
def test_bad_timeout(text, capsys):
    with pytest.raises(SystemExit):
        xform.cli.main(["launch", "--timeout", text, "s.py"])
    assert "argument --timeout: must be seconds > 0" in capsys.readouterr().err


def parse(argv):
    args = xform.cli.build_parser().parse_args(["launch", *argv])
    return torchrun_argv(args, args.nproc_per_node, args.nnodes or 1)


def test_torchrun_arguments_for_several_nodes():
    """The argument lists, and torchrun's own parser reading them as meant."""
    from torch.distributed.run import parse_args

    elastic = parse(["--nnodes", "2", "--nproc", "4", "--rdzv-endpoint", "h0:29400", "--rdzv-id", "job1",
                     "--rdzv-conf", "join_timeout=900", "--max-restarts", "3", "train.py", "--epochs", "2"])  # fmt: skip
    assert elastic == [
        "--nnodes", "2", "--nproc-per-node", "4", "--rdzv-backend", "c10d", "--rdzv-endpoint", "h0:29400",
        "--rdzv-id", "job1", "--rdzv-conf", "join_timeout=900", "--max-restarts", "3", "train.py", "--epochs", "2",
    ]  # fmt: skip
    a = parse_args(elastic)
    assert (a.nnodes, a.nproc_per_node, a.rdzv_backend, a.rdzv_endpoint, a.rdzv_id, a.max_restarts) == ("2", "4", "c10d", "h0:29400", "job1", 3)
    assert (a.training_script, a.training_script_args, a.standalone) == ("train.py", ["--epochs", "2"], False)

    static = parse(["--nnodes", "2", "--nproc", "8", "--node-rank", "1", "--master-addr", "h0", "--master-port", "29500", "-m", "pkg.train"])
    a = parse_args(static)
    assert (a.nnodes, a.nproc_per_node, a.node_rank, a.master_addr, a.master_port, a.rdzv_backend) == ("2", "8", 1, "h0", 29500, "static")
    assert a.module and a.training_script == "pkg.train"

    assert parse(["--nproc", "2", "t.py", "--", "--x"])[-3:] == ["--standalone", "--max-restarts", "0", "t.py", "--x"][-3:]
