"""Big-model inference from disk: xform against Accelerate, on the same model and checkpoint
(and, from ``bench/offload_train.py`` when it is there, the training half: the step of
``offload(optimizer="disk")`` against the plain step).

The model is ``tests/inference_support.TinyLM`` in fp32 (residual MLP blocks of 32 MB,
``--model-mb`` in all; untied head, as Accelerate's disk offload needs ``tie_weights``
to re-tie what xform keeps tied by itself), saved once as a sharded safetensors
checkpoint. Each run is a fresh process with one torch thread: it warms up both engines'
code paths on a tiny model (so lazy imports are charged to neither), takes its peak
resident set (``VmHWM``; ``ru_maxrss`` would carry the parent's peak over) as the baseline, then loads the model with a CPU budget
(``--cpu``, the rest on disk, blocks never split) and runs ``--repeat`` forwards of a
(2, 16) batch:

- xform: ``init_empty``, ``device_map(max_memory={"cpu": budget, "disk": None})``,
  ``load_weights(..., offload_dir=)``, ``dispatch``;
- Accelerate: ``init_empty_weights``, ``infer_auto_device_map`` with the same budgets,
  ``load_checkpoint_and_dispatch(..., offload_folder=)``.

Rounds alternate which engine goes first. Per round: load time, the median forward of
the run, and the peak above the baseline; a ratio (xform / Accelerate) is taken within
a round, then its median and quartiles over the rounds are printed. Both outputs are
checked equal. The page cache is warm after the first run (no root to drop it): the
figures are the cost of the streaming machinery, not of a cold disk.

Run: ``.venv/bin/python bench/offload.py`` (``--model-mb 400 --cpu 100MB --rounds 5
--repeat 3``; ``--quick``: a 48 MB model, 2 rounds, a few seconds per run).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from _common import quartiles  # bench/ is the script's directory

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
ENGINES = ("xform", "accelerate")



def fmt(xs: list[float], unit: str = "", scale: float = 1.0) -> str:
    lo, mid, hi = (x * scale for x in quartiles(xs))
    if unit == "x":  # ratios: two decimals, always
        return f"{mid:.2f}{unit} [{lo:.2f}, {hi:.2f}]"
    return f"{mid:.3g}{unit} [{lo:.3g}, {hi:.3g}]"


def run(engine: str, config: dict, checkpoint: Path, work: Path, cpu: str, repeat: int) -> dict:
    offload = Path(tempfile.mkdtemp(dir=work, prefix=f"off-{engine}-"))
    proc = subprocess.run(
        [sys.executable, str(ROOT / "tests" / "inference_support.py"), "--engine", engine, "--warm", ",".join(ENGINES),
         "--config", json.dumps(config), "--checkpoint", str(checkpoint), "--offload", str(offload), "--cpu", cpu,
         "--repeat", str(repeat)],
        capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)},
    )
    if proc.returncode:
        raise RuntimeError(f"bench/offload.py: the {engine} run failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def inference_rows(quick: bool, *, model_mb: int | None = None, cpu: str | None = None, rounds: int | None = None,
                   repeat: int | None = None, directory: str | None = None) -> list[str]:
    import torch

    import inference_support as s
    import xform as xf

    model_mb = model_mb or (48 if quick else 400)
    cpu = cpu or ("40MB" if quick else "100MB")
    rounds = rounds or (2 if quick else 5)
    repeat = repeat or (2 if quick else 3)
    config = {**s.big_config(model_mb), "tie": False}
    with tempfile.TemporaryDirectory(dir=directory or ".", prefix="offload-bench-") as tmp:
        work = Path(tmp)
        model = s.make(config)
        xf.save_sharded(model, work / "ckpt", max_shard_size="100MB")
        with torch.no_grad():
            want = float(model(s.tokens(config)).double().sum())
        mib = sum(p.numel() * 4 for p in model.parameters()) / 2**20
        del model
        results: dict[str, list[dict]] = {e: [] for e in ENGINES}
        for r in range(rounds):
            for e in (ENGINES if r % 2 == 0 else ENGINES[::-1]):
                results[e].append(run(e, config, work / "ckpt", work, cpu, repeat))
    rows = ["== offload: inference", f"big-model inference from disk: {mib:.0f} MiB fp32 model, cpu budget {cpu}, {rounds} rounds x {repeat} "
            "forwards, 1 thread; median [quartiles] over rounds"]
    rows.append(f"{'engine':<12} {'load s':>22} {'forward s':>22} {'peak above warm MiB':>24} {'above bare MiB':>22}  output")
    for e in ENGINES:
        rs = results[e]
        ok = all(r["sum"] == want for r in rs)
        rows.append(f"{e:<12} {fmt([r['load_s'] for r in rs]):>22} {fmt([statistics.median(r['forward_s']) for r in rs]):>22} "
                    f"{fmt([(r['peak'] - r['baseline']) / 2**20 for r in rs]):>24} {fmt([(r['peak'] - r['bare']) / 2**20 for r in rs]):>22}"
                    f"  {'equal' if ok else 'DIFFERS'}")
    pairs = list(zip(results["xform"], results["accelerate"]))
    fwd = [statistics.median(a["forward_s"]) / statistics.median(b["forward_s"]) for a, b in pairs]
    peak = [max(a["peak"] - a["baseline"], 1) / max(b["peak"] - b["baseline"], 1) for a, b in pairs]
    load = [a["load_s"] / b["load_s"] for a, b in pairs]
    rows.append(f"xform / accelerate: forward {fmt(fwd, 'x')}, peak memory {fmt(peak, 'x')}, load {fmt(load, 'x')}")
    placements = {e: results[e][0]["placement"] for e in ENGINES}
    disk = {e: placements[e].count("disk") - (1 if e == "xform" else 0) for e in ENGINES}  # xform's table has a total row
    rows.append(f"blocks on disk: xform {disk['xform']}, accelerate {disk['accelerate']}")
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="a small model, 2 rounds")
    ap.add_argument("--model-mb", type=int)
    ap.add_argument("--cpu", help="the CPU budget, e.g. 100MB")
    ap.add_argument("--rounds", type=int)
    ap.add_argument("--repeat", type=int)
    ap.add_argument("--dir", help="where the checkpoint and offload folders go (default: the current directory)")
    ap.add_argument("--no-train", action="store_true", help="skip the training half (bench/offload_train.py)")
    a = ap.parse_args()
    for row in inference_rows(a.quick, model_mb=a.model_mb, cpu=a.cpu, rounds=a.rounds, repeat=a.repeat, directory=a.dir):
        print(row, flush=True)
    train = Path(__file__).with_name("offload_train.py")
    if train.exists() and not a.no_train:
        spec = importlib.util.spec_from_file_location("offload_train", train)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        print()
        for row in module.train_rows(a.quick, directory=a.dir):
            print(row, flush=True)


if __name__ == "__main__":
    main()
