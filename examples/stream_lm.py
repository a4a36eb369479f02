"""Streaming text shards, read by worker processes on 2 processes: killed, resumed, exact.

The training data is an ``IterableDataset`` over text shard files (one line, one
example; lines of different lengths padded by ``xf.PadCollate`` and the loss an
``xf.Mean`` over real tokens). ``xf.DataLoader`` cuts the stream into global batches of
8 and gives each of the 2 processes its 4 examples; each process reads with 2 worker
processes. The data position lives in the state, so a checkpoint resumes with exactly
the next batches (the loader counts and skips the consumed ones).

    .venv/bin/python examples/stream_lm.py --demo

runs three launches (``xform launch --nproc 2``): an uninterrupted run of 12 steps; a
run that saves at step 5 and is killed (SIGKILL, every rank) at step 8; and a run
resumed from that checkpoint. It prints whether the resumed batches and losses equal
the uninterrupted run's. One training run by hand, logged to MLflow (hyperparameters,
losses by step, and the final checkpoint's ``meta.json``; from rank 0 only):

    xform launch --nproc 2 examples/stream_lm.py --run-dir runs/stream --steps 12 \
        --mlflow sqlite:///$PWD/runs/stream/mlflow.db
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

import xform as xf
import xform.distributed  # noqa: F401 - xf.distributed

TEXT = Path(__file__).with_name("data") / "lighthouse.txt"
PAD = -100
SHARDS = 4


def write_shards(directory: Path) -> None:
    """Splits the text's lines round-robin into ``SHARDS`` files."""
    directory.mkdir(parents=True, exist_ok=True)
    lines = [line for line in TEXT.read_text().splitlines() if line]
    for k in range(SHARDS):
        (directory / f"shard-{k:02d}.txt").write_text("\n".join(lines[k::SHARDS]) + "\n")


class TextShards(torch.utils.data.IterableDataset):
    """The lines of every shard file, shard by shard: ``{"x": ids[:-1], "y": ids[1:], "line": id}``."""

    def __init__(self, directory: Path):
        self.files = sorted(Path(directory).glob("shard-*.txt"))
        self.vocab = sorted({c for f in self.files for c in f.read_text()} | {"\n"})
        self.index = {c: i for i, c in enumerate(self.vocab)}

    def __iter__(self):
        for k, f in enumerate(self.files):
            with f.open() as lines:
                for n, line in enumerate(lines):
                    ids = [self.index[c] for c in line]
                    yield {"x": ids[:-1], "y": ids[1:], "line": 1000 * k + n}  # shard k, line n


class CharModel(torch.nn.Module):
    """A small causal model: embeddings, a GRU, a head."""

    def __init__(self, vocab: int, dim: int = 32):
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, dim)
        self.rnn = torch.nn.GRU(dim, dim, batch_first=True)
        self.head = torch.nn.Linear(dim, vocab)

    def forward(self, x):
        return self.head(self.rnn(self.embed(x))[0])


def step(state: xf.TrainState, batch):
    def loss_fn(params):
        logits = xf.apply(state, params, batch["x"])
        total = F.cross_entropy(logits.flatten(0, 1), batch["y"].flatten(), ignore_index=PAD, reduction="sum")
        return xf.Mean(total, (batch["y"] != PAD).sum())

    loss, grads = xf.value_and_grad(loss_fn)(state.params)
    return state.apply_gradients(grads), {"loss": loss}


def train(args: argparse.Namespace) -> None:
    xf.distributed.initialize()
    rank = xf.distributed.rank()
    run = Path(args.run_dir)
    data = TextShards(run / "shards")
    loader = xf.DataLoader(
        data, global_batch_size=8, num_workers=2, collate_fn=xf.PadCollate(pad={"x": 0, "y": PAD})
    )
    train_step = xf.shard(step, strategy="replicate")
    torch.manual_seed(0)  # the same initial weights in every run
    state = xf.TrainState.create(CharModel(len(data.vocab)), optimizer=torch.optim.AdamW, lr=3e-3, seed=1)
    state = train_step.init(state)
    manager = xf.CheckpointManager(run / args.ckpt, keep=2)
    if (restored := manager.restore(like=state)) is not None:
        state = restored
        if rank == 0:
            print(f"resumed from {manager.latest()} at step {state.step}", flush=True)
    state = loader.attach(state)
    tracker = xf.Trackers()
    if args.mlflow:
        tracker = xf.Trackers(xf.MLflowTracker("stream_lm", tracking_uri=args.mlflow, artifact_location=run / "mlartifacts"))
    tracker.log_hparams({"global_batch_size": loader.global_batch_size, "num_workers": 2, "lr": 3e-3, "steps": args.steps})
    log = (run / f"{args.log}.rank{rank}.jsonl").open("a")
    for batch in loader.iterate(state, epochs=None):
        if state.step >= args.steps:
            break
        if args.save_every and state.step and state.step % args.save_every == 0:
            manager.save(state)
        if args.die_at is not None and state.step == args.die_at:
            log.close()
            os.kill(os.getpid(), signal.SIGKILL)  # killed, as by the scheduler: no clean-up at all
        step_no = state.step
        state, metrics = train_step(state, batch)
        record = {"step": step_no, "lines": batch["line"].tolist(), "loss": float(metrics["loss"])}
        log.write(json.dumps(record) + "\n")
        log.flush()
        tracker.log(metrics, step=step_no)
    log.close()
    manager.save(state)
    for t in tracker.trackers:  # the final checkpoint's metadata, as an artifact (rank 0 only)
        t.log_artifact(Path(manager.latest()) / "meta.json", "checkpoint")
    tracker.finish()


def demo(run: Path) -> None:
    write_shards(run / "shards")
    for old in run.glob("*.jsonl"):
        old.unlink()
    launch = [sys.executable, "-m", "xform.cli", "launch", "--nproc", "2", __file__, "--run-dir", str(run)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[1]), os.environ.get("PYTHONPATH", "")])}
    subprocess.run([*launch, "--steps", "12", "--ckpt", "ckpt-full", "--log", "full"], check=True, env=env)
    killed = subprocess.run(
        [*launch, "--steps", "12", "--ckpt", "ckpt-killed", "--log", "killed", "--save-every", "5", "--die-at", "8"], env=env
    )
    print(f"the second run was killed at step 8 (exit status {killed.returncode})")
    subprocess.run([*launch, "--steps", "12", "--ckpt", "ckpt-killed", "--log", "resumed"], check=True, env=env)

    def read(name: str) -> dict[int, tuple]:
        steps: dict[int, list] = {}
        for r in range(2):
            for line in (run / f"{name}.rank{r}.jsonl").read_text().splitlines():
                rec = json.loads(line)
                steps.setdefault(rec["step"], []).append((rec["lines"], rec["loss"]))
        return {s: tuple(map(tuple, v)) for s, v in steps.items()}

    full, resumed = read("full"), read("resumed")
    same = sorted(resumed) == list(range(5, 12)) and all(resumed[s] == full[s] for s in resumed)
    print(f"resumed at step {min(resumed)}: batches of steps {min(resumed)}-{max(resumed)} on both ranks "
          f"(examples and losses) equal the uninterrupted run's: {same}")
    if not same:
        sys.exit(1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--demo", action="store_true", help="run, kill, resume and compare (3 launches)")
    parser.add_argument("--run-dir", default="runs/stream_lm")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--ckpt", default="ckpt")
    parser.add_argument("--log", default="batches")
    parser.add_argument("--save-every", type=int, default=0)
    parser.add_argument("--die-at", type=int, default=None)
    parser.add_argument("--mlflow", default=None, help="an MLflow tracking URI, e.g. sqlite:////abs/path/mlflow.db")
    args = parser.parse_args()
    if args.demo:
        demo(Path(args.run_dir))
    else:
        if not (Path(args.run_dir) / "shards").exists():
            write_shards(Path(args.run_dir) / "shards")
        train(args)


if __name__ == "__main__":
    main()
