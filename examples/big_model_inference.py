"""Run a model larger than a memory budget: empty init, a device map, a sharded checkpoint
streamed into place, disk offload, and a plain ``model(x)``.

    python examples/big_model_inference.py --model-mb 400 --budget 100MB

A child process builds the model (random weights), saves it as a sharded safetensors
checkpoint and records its output; this process then builds the model empty, maps its
blocks to the CPU budget and disk, loads, runs it, and prints the placement table, the
output check and its peak resident memory against a bare ``import torch, xform``.
"""

from __future__ import annotations

import argparse
import resource
import subprocess
import sys
from pathlib import Path

import torch
from torch import nn

import xform as xf


class Block(nn.Module):
    """A residual MLP block: never split across devices (``no_split``)."""

    def __init__(self, dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.up = nn.Linear(dim, 4 * dim)
        self.down = nn.Linear(4 * dim, dim)

    def forward(self, x):
        return x + self.down(torch.relu(self.up(self.norm(x))))


class LM(nn.Module):
    def __init__(self, vocab: int, dim: int, layers: int):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.blocks = nn.Sequential(*[Block(dim) for _ in range(layers)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab, bias=False)
        self.head.weight = self.embed.weight  # tied: stored once, loaded once

    def forward(self, tokens):
        return self.head(self.norm(self.blocks(self.embed(tokens))))


def sizes(model_mb: int) -> dict:
    dim = 1024 if model_mb >= 100 else 256
    block = 8 * dim * dim * 4  # up and down, fp32
    return {"vocab": 1024, "dim": dim, "layers": max(2, round(model_mb * 2**20 / block))}


def peak_mb() -> float:
    """Peak resident memory of this process (VmHWM: unlike ru_maxrss, not inherited from
    the parent that started it)."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def save(config: dict, directory: Path) -> None:
    """In a child process: a random model, saved sharded, with its output on a fixed input."""
    torch.manual_seed(0)
    model = LM(**config)
    xf.save_sharded(model, directory / "checkpoint", max_shard_size="50MB")
    with torch.no_grad():
        torch.save(model(torch.arange(32).reshape(2, 16)), directory / "expected.pt")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model-mb", type=int, default=400)
    ap.add_argument("--budget", default="100MB", help="the CPU budget (max_memory['cpu'])")
    ap.add_argument("--dir", default="big_model_inference", help="checkpoint and offload directory")
    ap.add_argument("--save-only", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args()
    config, directory = sizes(a.model_mb), Path(a.dir)
    if a.save_only:
        return save(config, directory)
    bare = peak_mb()
    if not (directory / "expected.pt").exists():
        subprocess.run([sys.executable, __file__, "--model-mb", str(a.model_mb), "--dir", a.dir, "--save-only"], check=True)

    model = xf.init_empty(lambda: LM(**config))  # meta tensors: no memory, no random init
    dm = xf.device_map(model, max_memory={"cpu": a.budget, "disk": None}, no_split=["Block"])
    xf.load_weights(model, directory / "checkpoint", device_map=dm, offload_dir=directory / "offload")
    xf.dispatch(model, dm, offload_dir=directory / "offload")
    print(dm)
    with torch.no_grad():
        y = model(torch.arange(32).reshape(2, 16))
    size = sum(p.numel() * 4 for p in set(model.parameters())) / 2**20
    print(f"model: {size:.0f} MiB, cpu budget: {a.budget}")
    print(f"equal to the in-memory model: {torch.equal(y, torch.load(directory / 'expected.pt'))}")
    print(f"peak resident memory: {peak_mb():.0f} MiB ({peak_mb() - bare:.0f} MiB above this process after "
          f"`import torch, xform`: {bare:.0f} MiB)")


if __name__ == "__main__":
    main()
