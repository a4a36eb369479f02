"""Models and a subprocess runner for tests/test_inference.py and bench/offload.py.

``TinyLM`` has what big-model inference must get right: an output head tied to the
embedding (owners in different subtrees, stored once), residual blocks that must not be
split, a persistent buffer (in the checkpoint) and a non-persistent one (computed in
``__init__``, in no checkpoint).

Run as a script, it is the subprocess of the memory test and the benchmark: it builds
``TinyLM`` empty, loads it with a CPU budget (disk for the rest) and prints one JSON line
with the baseline and peak resident memory (``ru_maxrss``) and the output's checksum.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time

import torch
from torch import nn


class Block(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.up = nn.Linear(dim, hidden)
        self.down = nn.Linear(hidden, dim)

    def forward(self, x):
        return x + self.down(torch.relu(self.up(self.norm(x))))


class TinyLM(nn.Module):
    def __init__(self, vocab: int = 64, dim: int = 16, hidden: int = 32, layers: int = 3, tie: bool = True):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.blocks = nn.ModuleList(Block(dim, hidden) for _ in range(layers))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab, bias=False)
        if tie:
            self.head.weight = self.embed.weight  # tied, as GPT-2's lm_head and wte
        self.register_buffer("temperature", torch.tensor(0.5))
        self.register_buffer("positions", torch.arange(4096.0) / 4096, persistent=False)

    def forward(self, tokens):
        x = self.embed(tokens) + self.positions[: tokens.shape[-1], None].to(self.embed.weight.dtype)
        for b in self.blocks:
            x = b(x)
        return self.head(self.norm(x)) / self.temperature


def big_config(mb: int) -> dict:
    """A TinyLM of about ``mb`` MB in fp32: 32 MB blocks (16 MB for mb < 200), tied 8 MB embedding."""
    dim, hidden = (1024, 4096) if mb >= 200 else (512, 4096)
    block = 2 * dim * hidden * 4
    vocab = 2048
    return {"vocab": vocab, "dim": dim, "hidden": hidden, "layers": max(2, round((mb << 20) / block))}


def make(config: dict, seed: int = 0) -> TinyLM:
    torch.manual_seed(seed)
    return TinyLM(**config)


def tokens(config: dict, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, config["vocab"], (2, 16), generator=torch.Generator().manual_seed(seed))


def build(engine: str, config: dict, checkpoint: str, offload: str, cpu: str):
    """The model of ``config`` loaded from ``checkpoint`` by ``engine``, and its placement.

    ``xform``: init_empty, device_map (``cpu`` budget, then disk), load_weights, dispatch.
    ``accelerate``: init_empty_weights, infer_auto_device_map with the same budgets and
    no_split, load_checkpoint_and_dispatch with offload_folder. ``memory``: the whole
    model loaded in memory (the reference)."""
    import xform as xf

    if engine == "memory":
        return xf.load_weights(xf.init_empty(lambda: TinyLM(**config), buffers=False), checkpoint), "in memory"
    if engine == "xform":
        model = xf.init_empty(lambda: TinyLM(**config), buffers=False)
        dm = xf.device_map(model, max_memory={"cpu": cpu, "disk": None}, no_split=["Block"])
        xf.load_weights(model, checkpoint, device_map=dm, offload_dir=offload)
        xf.dispatch(model, dm, offload_dir=offload)
        return model, str(dm)
    from accelerate import infer_auto_device_map, init_empty_weights, load_checkpoint_and_dispatch

    with init_empty_weights():
        model = TinyLM(**config)
    dm = infer_auto_device_map(model, max_memory={"cpu": cpu, "disk": "1000GB"}, no_split_module_classes=["Block"])
    model = load_checkpoint_and_dispatch(model, checkpoint, device_map=dm, offload_folder=offload,
                                         no_split_module_classes=["Block"])
    return model, json.dumps(dm)


def warm_up(directory: str, engines=("xform",)) -> None:
    """Every code path of the run once, on a tiny model: the lazy imports and kernel set-up
    torch does on first use (meta tensors' decompositions alone are ~70 MB) land in the
    warm baseline, not in what the big model's run is charged."""
    import xform as xf

    config = {"vocab": 64, "dim": 16, "hidden": 32, "layers": 3, "tie": False}
    xf.save_sharded(make(config), f"{directory}/ckpt", max_shard_size="4KB")
    for e in engines:
        model, _ = build(e, config, f"{directory}/ckpt", f"{directory}/off-{e}", "40KB")
        with torch.no_grad():
            model(tokens(config))


def rss_peak() -> int:
    """This process's peak resident set, in bytes: ``VmHWM`` (per address space, so a
    child does not inherit its parent's peak, as ``ru_maxrss`` does across fork and exec)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kilobytes on Linux


def main(argv=None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--engine", choices=["xform", "accelerate", "memory"], default="xform")
    ap.add_argument("--config", required=True)
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--offload", required=True)
    ap.add_argument("--cpu", default="100MB")
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--out")
    ap.add_argument("--warm", default="xform", help="engines to warm up on a tiny model before the baseline")
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    import xform as xf

    config = json.loads(a.config)
    x = tokens(config)
    bare = rss_peak()
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        warm_up(d, a.warm.split(","))
    baseline = rss_peak()
    t0 = time.perf_counter()
    model, placement = build(a.engine, config, a.checkpoint, a.offload, a.cpu)
    load_s = time.perf_counter() - t0
    times = []
    with torch.no_grad():
        for _ in range(a.repeat):
            t0 = time.perf_counter()
            y = model(x)
            times.append(time.perf_counter() - t0)
    out = {"engine": a.engine, "bare": bare, "baseline": baseline, "peak": rss_peak(), "load_s": load_s, "forward_s": times,
           "sum": float(y.double().sum()), "placement": placement}
    if a.out:
        torch.save(y, a.out)
    print(json.dumps(out))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
