import argparse
import json
import os
import pty
import subprocess
import sys
import textwrap
import types
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import pytest
import torch

import xform.cli
from xform.cli import COMMANDS, Command, main
from xform.cli._config import (
    LaunchConfig,
    config_path,
    load_config,
    print_config,
    read_config_file,
    resolve_config,
    resolve_config_with_sources,
    save_config,
)
from xform.cli._estimate import human


MODEL = textwrap.dedent(
    """
    import torch

    def build(hidden=64, depth=2):
        layers = [torch.nn.Linear(10, hidden), torch.nn.ReLU()]
        for _ in range(depth - 1):
            layers += [torch.nn.Linear(hidden, hidden), torch.nn.ReLU()]
        return torch.nn.Sequential(*layers, torch.nn.Linear(hidden, 2))

    def not_a_module():
        return 3
    """
)


@pytest.fixture
def home(tmp_path, monkeypatch):
    """A clean config location for in-process calls."""
    monkeypatch.delenv("XFORM_CONFIG", raising=False)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    return tmp_path


def cli_env(tmp_path, **extra):
    env = {k: v for k, v in os.environ.items() if k not in ("XFORM_CONFIG", "RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    env["XDG_CONFIG_HOME"] = str(tmp_path / "xdg")
    env.update(extra)
    return env


def installed_version(name):
    try:
        return version(name)
    except PackageNotFoundError:
        return None


# --- through the real entry points --------------------------------------------------------
# Each run starts Python and imports torch (~2 s), so they all start at once, here, and each
# test waits for its own.

SCRIPT = Path(sys.executable).parent / "xform"
WRITE_FLAGS = ["--backend", "deepspeed", "--strategy", "zero2", "--precision", "bf16", "--accumulation-steps", "4",
               "--nproc-per-node", "2", "--nnodes", "1"]  # fmt: skip
ANSWERS = "deepspeed\nzero9\nzero3\nmany\n8\n\n\n"  # zero9 and many are refused and asked again


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli")
    (d / "mymodel.py").write_text(MODEL)
    save_config(LaunchConfig(precision="bf16", nproc_per_node=4), d / "xdg" / "xform" / "config.json")
    save_config(LaunchConfig(strategy="zero2"), d / "shown.json")
    master, slave = pty.openpty()
    os.write(master, ANSWERS.encode())
    python = [sys.executable, "-m", "xform.cli"]
    plans = {
        "help": (python + ["--help"], {}, subprocess.DEVNULL),
        "env": (python + ["env"], {"RANK": "3", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"}, subprocess.DEVNULL),
        "write": (python + ["config", *WRITE_FLAGS], {"XFORM_CONFIG": str(d / "written" / "xform.json")}, subprocess.DEVNULL),
        "show": (python + ["config", "show", "--nnodes", "2"], {"XFORM_CONFIG": str(d / "shown.json")}, subprocess.DEVNULL),
        "bad": (python + ["config", "--strategy", "zero4"], {"XFORM_CONFIG": str(d / "bad.json")}, subprocess.DEVNULL),
        "asked": (python + ["config", "--path", str(d / "asked.json"), "--precision", "bf16"], {}, slave),
        "estimate": (
            python + ["estimate-memory", "mymodel.py:build", "--args", '{"hidden": 100}', "--world-sizes", "1,4",
                      "--json", "--input-shape", "8,10"],  # fmt: skip
            {},
            subprocess.DEVNULL,
        ),
    }
    if SCRIPT.exists():
        plans["script"] = ([str(SCRIPT), "env", "--json"], {}, subprocess.DEVNULL)
    procs = {
        name: subprocess.Popen(cmd, cwd=d, env=cli_env(d, **env), stdin=stdin, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)  # fmt: skip
        for name, (cmd, env, stdin) in plans.items()
    }
    os.close(slave)
    done = {}

    def result(name):
        if name not in done:
            out, err = procs[name].communicate(timeout=180)
            done[name] = subprocess.CompletedProcess(procs[name].args, procs[name].returncode, out, err)
        return done[name]

    result.dir = d
    yield result
    for name in procs:
        result(name)
    os.close(master)


def test_help_lists_the_commands(runs):
    out = runs("help")
    assert out.returncode == 0, out.stderr
    for name in ("env", "config", "estimate-memory"):
        assert f"\n    {name}" in out.stdout
    assert "Run 'xform <command> --help'" in out.stdout


def test_env_for_a_bug_report(runs):
    out = runs("env")
    assert out.returncode == 0, out.stderr
    text = out.stdout
    assert text.startswith("## xform environment\n")
    pairs = [line[2:].split(":", 1) for line in text.splitlines() if line.startswith("- ") and ":" in line]
    lines = {k.strip(): v.strip() for k, v in pairs}
    assert lines["torch"] == torch.__version__ and lines["xform"] == installed_version("xform")
    for pkg in ("deepspeed", "torch_xla", "wandb", "tensorboard", "optree", "attrs"):
        assert lines[pkg] == (installed_version(pkg) or "not installed"), pkg
    assert lines["RANK"] == "3" and lines["MASTER_ADDR"] == "127.0.0.1" and lines["MASTER_PORT"] == "29500"
    assert lines["WORLD_SIZE"] == "(unset)"
    assert lines["CPUs"].startswith(f"{os.cpu_count()} logical")
    assert lines["CUDA available"].startswith("yes" if torch.cuda.is_available() else "no")
    assert "gloo: yes" in lines["torch.distributed"]
    assert f"### Saved config ({runs.dir / 'xdg' / 'xform' / 'config.json'})" in text
    assert lines["precision"] == "bf16" and lines["nproc_per_node"] == "4"


def test_config_written_from_flags(runs):
    out = runs("write")
    assert out.returncode == 0, out.stderr
    assert "Backend [" not in out.stdout  # stdin is not a terminal: no questions
    path = runs.dir / "written" / "xform.json"
    assert f"Saved to {path}:" in out.stdout
    assert json.loads(path.read_text()) == {
        "version": 1, "backend": "deepspeed", "strategy": "zero2", "precision": "bf16",
        "accumulation_steps": 4, "nproc_per_node": 2, "nnodes": 1,
    }  # fmt: skip


def test_config_show(runs):
    out = runs("show")
    assert out.returncode == 0, out.stderr
    path = runs.dir / "shown.json"
    assert f"Config file: {path}\n" in out.stdout
    assert f"strategy            zero2         (config file {path})" in out.stdout
    assert "nnodes              2             (flag)" in out.stdout


def test_config_refuses_bad_values_with_exit_code_2(runs):
    out = runs("bad")
    assert out.returncode == 2
    assert "argument --strategy: invalid choice: 'zero4' (choose from" in out.stderr
    assert not (runs.dir / "bad.json").exists()


def test_config_asks_on_a_terminal(runs):
    out = runs("asked")
    assert out.returncode == 0, out.stderr
    assert "Backend [torch/deepspeed/xla] (torch): " in out.stdout
    assert "Precision" not in out.stdout  # given as a flag
    assert "strategy must be one of replicate, ddp, zero1, zero2, zero3, fsdp, hsdp; got 'zero9'" in out.stdout
    assert "accumulation_steps must be an int >= 1; got 'many'" in out.stdout
    saved = read_config_file(runs.dir / "asked.json")
    assert saved == {
        "backend": "deepspeed", "strategy": "zero3", "precision": "bf16",
        "accumulation_steps": 8, "nproc_per_node": 1, "nnodes": 1,
    }  # fmt: skip


def test_estimate_memory_json(runs):
    out = runs("estimate")
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    P = 10 * 100 + 100 + 100 * 100 + 100 + 100 * 2 + 2
    assert data["num_params"] == data["trainable_params"] == P
    rows = {(r["strategy"], r["precision"], r["world_size"]): r for r in data["estimates"]}
    assert len(rows) == 4 * 3 * 2
    steps = 4 * 6  # Adam's step counter per tensor
    assert rows["replicate", "fp32", 1]["total"] - rows["replicate", "fp32", 1]["activations"] == 16 * P + steps
    z2 = rows["zero2", "bf16", 4]
    assert (z2["params"], z2["grads"], z2["optimizer_state"]) == (2 * P, 2 * -(-P // 4), 12 * -(-P // 4) + steps)
    # fp32 activations: the input 8x10, two ReLU outputs 8x100, the output 8x2
    assert rows["zero3", "fp32", 4]["activations"] == 4 * 8 * (10 + 100 + 100 + 2)
    assert rows["zero3", "bf16", 4]["activations"] == 2 * 8 * (10 + 100 + 100 + 2)
    assert data["activations"].startswith("measured")


def test_installed_script(runs):
    if not SCRIPT.exists():
        pytest.skip(f"no installed xform script at {SCRIPT} (install the package: pip install -e .)")
    out = runs("script")
    assert out.returncode == 0, out.stderr
    info = json.loads(out.stdout)
    assert info["packages"]["torch"] == torch.__version__
    assert info["config"]["path"] == str(runs.dir / "xdg" / "xform" / "config.json")
    assert info["config"]["settings"]["nproc_per_node"] == 4


# --- in process ---------------------------------------------------------------------------


def test_no_command_prints_help(capsys):
    assert main([]) == 2
    assert "commands:" in capsys.readouterr().out


def test_adding_a_command_is_one_registration(monkeypatch, capsys):
    hello = types.ModuleType("xform_test_hello")
    hello.__doc__ = "Say hello."
    hello.HELP = "say hello"
    hello.add_arguments = lambda p: p.add_argument("--name", default="world")
    hello.run = lambda args: print(f"hello {args.name}") or 0
    monkeypatch.setitem(sys.modules, "xform_test_hello", hello)
    monkeypatch.setattr(xform.cli, "COMMANDS", COMMANDS + (Command("hello", "xform_test_hello"),))
    assert main(["hello", "--name", "xform"]) == 0
    assert capsys.readouterr().out == "hello xform\n"
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "say hello" in capsys.readouterr().out


def test_config_path_precedence(home, monkeypatch):
    assert config_path() == home / "xdg" / "xform" / "config.json"
    monkeypatch.delenv("XDG_CONFIG_HOME")
    monkeypatch.setenv("HOME", str(home / "h"))
    assert config_path() == home / "h" / ".config" / "xform" / "config.json"
    monkeypatch.setenv("XFORM_CONFIG", str(home / "env.json"))
    assert config_path() == home / "env.json"
    assert config_path(home / "flag.json") == home / "flag.json"


def test_defaults_then_file_then_flags(home):
    assert load_config() == LaunchConfig()  # no file at the default place: the defaults
    path = home / "c.json"
    path.write_text(json.dumps({"precision": "bf16", "nnodes": 2}))  # a file may hold some settings
    config, sources = resolve_config_with_sources({"nnodes": 4, "strategy": None, "script": "train.py"}, path=path)
    assert config == LaunchConfig(precision="bf16", nnodes=4)
    assert sources == {"backend": "default", "strategy": "default", "precision": f"config file {path}",
                       "accumulation_steps": "default", "nproc_per_node": "default", "nnodes": "flag"}  # fmt: skip
    ns = argparse.Namespace(precision="fp16", backend=None)
    assert resolve_config(ns, path=path).precision == "fp16"
    with pytest.raises(FileNotFoundError, match="no config file at .*missing.json; write one with `xform config --path"):
        load_config(home / "missing.json")
    with pytest.raises(ValueError, match="flags: nnodes must be an int >= 1; got 0"):
        resolve_config({"nnodes": 0}, path=path)


def test_print_config_shows_each_source(home, capsys):
    path = save_config(LaunchConfig(backend="xla", strategy="fsdp"))
    assert path == home / "xdg" / "xform" / "config.json"
    config = print_config({"precision": "bf16"})
    out = capsys.readouterr().out
    assert config == LaunchConfig(backend="xla", strategy="fsdp", precision="bf16")
    assert out.startswith("Settings (defaults < config file < flags):\n")
    assert f"  backend             xla           (config file {path})" in out
    assert "  precision           bf16          (flag)" in out


def test_bad_config_files_are_named_with_the_fix(home, capsys):
    path = home / "c.json"
    for text, message in (
        ("{not json", "is not valid JSON"),
        ('["torch"]', "must hold a JSON object, not list"),
        ('{"backend": "torch", "gpus": 8}', r"unknown settings \['gpus'\]"),
        ('{"precision": "fp8"}', "precision must be one of fp32, bf16, fp16; got 'fp8'"),
        ('{"nproc_per_node": true}', "nproc_per_node must be an int >= 1; got True"),
    ):
        path.write_text(text)
        with pytest.raises(ValueError, match=f"config file {path}.*{message}.*rewrite it with `xform config --path {path}`"):
            read_config_file(path)
    assert main(["config", "show", "--path", str(path)]) == 2
    assert "xform config: error: config file" in capsys.readouterr().err
    # writing replaces a broken file, and says so
    assert main(["config", "--path", str(path), "--no-input", "--backend", "xla"]) == 0
    assert "warning: ignoring the settings in" in capsys.readouterr().err
    assert load_config(path) == LaunchConfig(backend="xla")


def test_config_keeps_saved_settings_not_given(home):
    assert main(["config", "--precision", "bf16", "--no-input"]) == 0
    assert main(["config", "--nnodes", "3", "--no-input"]) == 0
    assert load_config() == LaunchConfig(precision="bf16", nnodes=3)


def test_estimate_memory_table(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "mymodel.py").write_text(MODEL)
    assert main(["estimate-memory", "mymodel:build", "--args", "[32, 3]"]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    P = 10 * 32 + 32 + 2 * (32 * 32 + 32) + 32 * 2 + 2
    assert lines[0] == f"Model: mymodel:build ({P:,} parameters, {P:,} trainable)"
    assert "Activations: not estimated (pass --input-shape to measure them)" in lines[1]
    header = next(i for i, line in enumerate(lines) if line.startswith("strategy"))
    assert lines[header].split() == ["strategy", "precision", "ranks", "params", "grads", "optimizer", "activations", "total"]
    rows = lines[header + 2 : header + 2 + 48]
    assert [tuple(r.split()[:3]) for r in rows[:5]] == [("replicate", "fp32", n) for n in "1248"] + [("replicate", "bf16", "1")]
    assert lines[header + 2 + 48] == ""  # 4 strategies x 3 precisions x 4 world sizes
    (z3,) = [r for r in rows if r.split()[:3] == ["zero3", "fp32", "8"]]
    shard = -(-P // 8)
    cells = [human(4 * shard), human(4 * shard), human(8 * shard + 4 * 8), "-", human(16 * shard + 4 * 8)]
    assert [c.strip() for c in z3.split("  ") if c.strip()][3:] == cells


def test_estimate_memory_user_errors(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "mymodel.py").write_text(MODEL)
    cases = [
        (["build"], "MODEL must be module:callable or path/to/file.py:callable, got 'build'"),
        (["nope.py:build"], "no such file 'nope.py'"),
        (["no_such_module:build"], "cannot import 'no_such_module'"),
        (["mymodel:missing"], "'mymodel' has no attribute 'missing'"),
        (["mymodel:not_a_module"], "mymodel:not_a_module returned a int, not a torch.nn.Module"),
        (["mymodel:build", "--args", "{hidden: 3}"], "--args is not valid JSON"),
        (["mymodel:build", "--args", '{"width": 3}'], "building mymodel:build failed: TypeError"),
    ]
    for argv, message in cases:
        assert main(["estimate-memory", *argv]) == 2, argv
        assert f"xform estimate-memory: error: {message}" in capsys.readouterr().err, argv

