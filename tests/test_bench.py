"""The benchmark scripts run (``--quick``) and print the closing tables the README quotes.

These check that each script works and what its table holds, never a timing: the
figures of a ``--quick`` run on a shared machine mean nothing.
"""

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
NUM = r"\d+\.\d+"
SPREAD = rf"{NUM} \[{NUM}, {NUM}\]"  # median [q1, q3]


def run_quick(script: str, *args: str) -> str:
    proc = subprocess.run(
        [sys.executable, "-W", "ignore", str(ROOT / "bench" / script), "--quick", *args],
        cwd=ROOT, capture_output=True, text=True, timeout=180,
    )
    assert proc.returncode == 0, f"bench/{script} --quick failed:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


def table(out: str, title: str) -> list[str]:
    """The lines after the closing table's ``== title`` line."""
    assert f"== {title}" in out, f"no '== {title}' table in:\n{out}"
    return out.split(f"== {title}", 1)[1].splitlines()[1:]


def test_overhead_prints_both_twins_with_spread():
    """Catches: a table with one twin only, or medians without their quartiles."""
    lines = table(run_quick("overhead.py"), "overhead:")
    assert "/ backward()" in lines[0] and "/ autograd.grad" in lines[0]
    for variant in ("step", "mixed_precision(bf16)", "accumulate(2)", "accumulate(mixed_precision(bf16), 2)",
                    "accumulate(mixed_precision(bf16), 4)"):
        row = [line for line in lines if line.startswith(variant + " ")]
        assert len(row) == 1 and re.search(rf"{NUM}\s+{SPREAD}\s+{SPREAD}$", row[0]), (variant, lines)
    assert re.search(r"import torch \d.*import xform \d", "\n".join(lines))


def test_overhead_prints_added_microseconds_per_step_and_micro_batch():
    """Catches: the added-cost lines the issue asks for lost or printed for one twin only."""
    lines = table(run_quick("overhead.py"), "added microseconds")
    text = "\n".join(lines)
    for variant in ("step", "mixed_precision(bf16)", "accumulate(2)"):
        assert re.search(rf"^per step: {re.escape(variant)}\s+[+-]{NUM}\s+[+-]{NUM}$", text, re.M), (variant, text)
    assert len(re.findall(rf"^per extra micro-batch: .*\s+[+-]{NUM}\s+[+-]{NUM}$", text, re.M)) == 2, text
    assert re.search(rf"^each micro-batch \(k=4 vs k=2\): bf16\s+[+-]{NUM}\s+[+-]{NUM}$", text, re.M), text


def test_malloc_prints_both_runners_under_both_allocators():
    """Catches: a cell missing, or the 'steady' cells run without the tunables (their
    processes must get STEADY_MALLOC, which the closing line names)."""
    out = run_quick("malloc.py")
    for label in ("default", "steady"):
        for runner in ("hand", "xform"):
            assert re.search(rf"^{label}\s+{runner}\s+{SPREAD}\s+\d+$", out, re.M), (label, runner, out)
    assert "steady: GLIBC_TUNABLES=glibc.malloc.trim_threshold=" in out


def test_ddp_prints_paired_ratio_quartiles_and_collective_counts():
    """Catches: ratios without their spread; the own-CPU ratio (the low-noise one) lost; the
    per-micro-batch collective counts lost."""
    lines = table(run_quick("ddp.py"), "ddp: summary")
    text = "\n".join(lines)
    for what in ("step time", "own CPU"):
        assert re.search(rf"defaults: xform 25 MB / ddp default, {what}\s+{SPREAD} range {NUM}-{NUM}", text), text
        assert re.search(rf"same bucket size: xform 2 MB / ddp 2 MB, {what}\s+{SPREAD} range {NUM}-{NUM}", text), text
    counts = {m[1]: (int(m[2]), int(m[3]), int(m[4])) for m in re.finditer(r"^  (\w+)\s+(\d+)\s+(\d+)\s+(\d+)$", text, re.M)}
    assert set(counts) == {"replicate", "zero1", "zero2", "zero3"}, text
    for strategy in ("replicate", "zero1", "zero2"):  # they communicate on the last micro-batch only
        early, last, _ = counts[strategy]
        assert early == 0 and last > 0, (strategy, text)


def test_memory_prints_measured_peaks_beside_state_and_formula():
    """Catches: a 'measured' figure that is the state's size again, or a profiler replay
    that lost allocations: the measured peaks must hold at least the model states the
    formula counts (params, optimizer state and the step's gradients are all alive
    before the optimizer runs), and the live bytes between steps at least the state."""
    lines = table(run_quick("memory.py"), "memory per process")
    rows = {}
    for line in lines[1:]:
        m = re.match(
            rf"(\w+)\s+2\s+({NUM})\s+({NUM})\s+({NUM})\s+({NUM})\s+\S+=\s*({NUM})\s+({NUM})\s+({NUM})"
            rf"\s+({NUM})-({NUM})\s+(-?{NUM})\s+({NUM})$",
            line,
        )
        if m:
            rows[m[1]] = [float(v) for v in m.groups()[1:]]
    assert set(rows) == {"replicate", "zero1", "zero2", "zero3"}, lines
    for strategy, row in rows.items():
        params, opt, grads, counted, formula, between, peak, low, high, in_step, ratio = row
        assert counted == pytest.approx(params + opt + grads, abs=0.02), strategy
        assert counted == pytest.approx(formula, rel=0.01), strategy  # the formula holds by construction
        assert between >= params + opt - 0.01, (strategy, between)
        assert counted - 0.01 <= low <= peak <= high, (strategy, row)
        assert in_step == pytest.approx(peak - between, abs=0.02), strategy
        assert ratio == pytest.approx(peak / formula, rel=0.01), strategy


def test_mfu_prints_the_flop_formula_and_a_row_per_variant():
    """Catches: the FLOP formula's terms lost, a variant silently missing or failed, fp8
    rows that converted no layer (the same as bf16), a ratio without its quartiles."""
    out = run_quick("mfu.py")
    assert re.search(r"FLOPs/token = 6\*N \+ 12\*L\*H\*Q\*T = 6\*[\d,]+ \+ 12\*2\*4\*16\*32 = ", out), out
    assert re.search(r"fp8-eager .* [1-9]\d* Float8Linear layers", out) and "bf16-eager " in out, out
    lines = table(out, "mfu:")
    for variant in ("bf16-eager", "fp8-eager", "fp8-compiled"):
        row = [line for line in lines if line.startswith(variant + " ")]
        assert len(row) == 1 and re.search(rf"{SPREAD}\s+\d+\s+n/a\s+{SPREAD}\s+{NUM}\s+\S", row[0]), (variant, lines)
    assert "xf.jit(aot_eager)" in "\n".join(lines) or "module.compile(aot_eager)" in "\n".join(lines), lines


def test_compile_prints_speedups_with_spread():
    """Catches: a runner missing (the compiled xform step, the hand loop, its compiled model)
    or a speedup without its quartiles."""
    out = run_quick("compile.py")
    for runner in ("hand eager", "hand compiled model", "xform eager", "xform jit"):
        row = [line for line in out.splitlines() if line.startswith(runner + " ")]
        assert len(row) == 1 and re.search(rf"{NUM} \[\s*{NUM},\s*{NUM}\]\s+{NUM} \[{NUM}, {NUM}\]", row[0]), (runner, out)


def test_deepspeed_prints_time_and_memory_ratios_per_stage():
    """Catches: a stage missing, a time ratio without its quartiles and range, a variant whose
    weights drift from the others (the same math on both engines)."""
    lines = table(run_quick("deepspeed.py"), "deepspeed:")
    for stage in ("zero1", "zero2", "zero3"):
        row = [line for line in lines if line.startswith(stage + ":")]
        assert len(row) == 1 and re.search(rf"time {SPREAD} range {NUM}-{NUM}; memory between {NUM}, peak {NUM}", row[0]), (stage, lines)


def test_offload_prints_inference_ratios_against_accelerate_and_training_rows():
    """Catches: a ratio without its spread, engines whose outputs differ, the training half
    (bench/offload_train.py) missing a variant."""
    out = run_quick("offload.py")
    text = "\n".join(table(out, "offload: inference"))
    assert re.search(rf"xform / accelerate: forward {NUM}x \[{NUM}, {NUM}\], peak memory {NUM}x \[{NUM}, {NUM}\]", text), text
    assert "DIFFERS" not in text and text.count("  equal") == 2
    lines = table(out, "offload_train:")
    for v in ("plain", 'offload(optimizer="disk")', 'offload(params="disk")', 'offload(params="disk", optimizer="disk")'):
        row = [line for line in lines if line.startswith(v + " ")]
        assert len(row) == 1 and re.search(rf"{SPREAD}\s+{SPREAD}\s+{NUM}\s+{NUM}\s+{NUM}$", row[0]), (v, lines)


def test_ddp_times_accumulation_against_no_sync_with_equal_weights():
    """Catches the --micro runners timing different work: DDP's no_sync accumulation and
    shard(accumulate) must train the same weights (the max|w-w0| column is 0 or rounding),
    so a skipped or repeated micro-batch on either side shows. (The bench's AdamW would
    hide a wrong gradient scale; the shard properties check that, with SGD.)"""
    out = run_quick("ddp.py", "--micro", "2", "--no-counts", "--dims", "lenet", "--batch", "4")
    assert "x 2 micro-batches (accumulate; DDP: no_sync)" in out, out
    rows = [line for line in out.splitlines() if line.startswith(("ddp ", "xform "))]
    assert len(rows) == 4, out
    for row in rows:  # ... max|w-w0|  [bucket sizes]
        assert float(re.search(r"(\S+)\s+\[[^\]]*\]$", row)[1]) < 1e-6, row
