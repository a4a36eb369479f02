"""Tokens per second and MFU (model FLOPs utilization) of a Llama-style model trained by
xform: bf16 eager, bf16 compiled, fp8 eager, fp8 compiled.

The model is ``transformers``' ``LlamaForCausalLM`` over a ``LlamaConfig`` built here
(nothing downloads). On ``--device cuda`` it is Llama-3.2-1B's shape (hidden 2048, 16
layers, 32 heads / 8 key-value heads, MLP 8192, vocabulary 128256, tied embeddings: 1.24B
parameters), the 1B-class config that fits one H200 (141 GB) with fp32 master weights,
AdamW state and the activations of ``--batch 4 --seq 2048``; ``--preset 3b`` takes
Llama-3.2-3B's shape. ``--quick``: a tiny config on the CPU, three variants (bf16-eager,
fp8-eager, fp8-compiled with the ``aot_eager`` backend), about 20 s of CPU time, most of it
tracing: it checks that the script runs; its figures mean nothing.

The step: next-token cross-entropy (the model's own ``labels=`` loss), AdamW (fused on
cuda, foreach on cpu), ``xf.mixed_precision`` with float32 master weights:

- ``bf16``: the policy ``params=float32,compute=bfloat16,output=bfloat16`` (autocast;
  the logits stay bf16, no float32 copy of a batch x seq x vocab tensor);
- ``fp8``: the same with ``fp8=Float8()``: torchao float8 training, tensorwise dynamic
  scaling, of every Linear the filter keeps (multiples of 16, >= 2**20 weights, not tied:
  the tied ``lm_head`` stays bf16);
- ``eager``: the step as it is; ``compiled``: ``xf.jit(step)`` (the whole step, update
  included, in one graph) when ``xf.jit`` exists, else ``torch.compile`` of the model's
  forward (``module.compile()``); if ``xf.jit`` fails on this model, the script says why
  and falls back to ``torch.compile``.

FLOPs per token (printed with its terms): ``6 * N + 12 * L * H * Q * T`` (PaLM,
appendix B; torchtitan's count), where ``N`` counts the weights of every matmul (all
Linear layers, the lm_head included, the embedding lookup excluded), ``L`` layers, ``H``
heads of ``Q`` features, ``T`` the sequence length: the attention scores and their
weighted sum, forward and backward, without discounting the causal mask. MFU = tokens/s
x FLOPs per token / peak. Peak: ``--peak-tflops`` (default on cuda: 989 TFLOP/s, the
dense bf16 peak of an H100/H200 SXM; fp8 rows are divided by the same bf16 peak, so their
MFU says how much faster than bf16's ceiling they run); none on cpu unless given.

Method: each variant builds its own model (same seed: the same weights) and state, warms
up (``--warmup`` steps; compilation happens there and its time is printed), then runs
``--rounds`` rounds of ``--steps`` steps, each timed with a device sync at both ends. On
cuda the variants run one after another (four 1B states with their AdamW moments and one
step's activations do not fit at once), each freed before the next, its peak memory
printed; on cpu they run in interleaved rounds, the order rotating (``--[no-]sequential``
chooses). Printed per variant: seconds per step, median
with quartiles over rounds [q1, q3], tokens/s, MFU, the last loss, and the speedup over
bf16 eager with its quartiles (ratios of round medians on cuda; paired per round on cpu).
A variant that runs out of memory or fails is reported as such and the others still run.

Run on an H200: ``.venv/bin/python bench/mfu.py --device cuda`` (about 3-5 minutes, most
of it compiling). ``--variants bf16-eager,fp8-compiled`` picks some.
"""

from __future__ import annotations

import argparse
import gc
import sys
import time
import traceback
from typing import Any, Callable

import torch

import xform as xf
from xform.transforms.fp8 import Float8
from _common import quartiles  # bench/ is the script's directory

PEAK_BF16_H100_H200 = 989e12  # dense bf16 FLOP/s of an H100/H200 SXM (no sparsity)
VARIANTS = ("bf16-eager", "bf16-compiled", "fp8-eager", "fp8-compiled")
QUICK = ("bf16-eager", "fp8-eager", "fp8-compiled")  # bf16-compiled takes the same path as fp8-compiled
PRESETS: dict[str, dict[str, Any]] = {
    # Llama-3.2-1B's shape
    "1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
               num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True, rope_theta=500000.0),
    # Llama-3.2-3B's shape
    "3b": dict(hidden_size=3072, intermediate_size=8192, num_hidden_layers=28, num_attention_heads=24,
               num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True, rope_theta=500000.0),
    # --quick: every Linear but the tied head is aligned, so fp8 has layers to convert
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=256, tie_word_embeddings=True),
}


def llama(preset: str, seq: int, device: str) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(**PRESETS[preset], max_position_embeddings=max(seq, 128))
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    with torch.device(device):
        return LlamaForCausalLM(cfg)


def flops_per_token(model: torch.nn.Module, seq: int) -> tuple[float, str]:
    """``6 * N + 12 * L * H * Q * T`` and the line that prints it with its terms."""
    cfg = model.config
    n = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    layers, heads = cfg.num_hidden_layers, cfg.num_attention_heads
    q = cfg.hidden_size // heads
    attention = 12 * layers * heads * q * seq
    total = 6 * n + attention
    line = (
        f"FLOPs/token = 6*N + 12*L*H*Q*T = 6*{n:,} + 12*{layers}*{heads}*{q}*{seq} = {6 * n:.4g} + {attention:.4g} "
        f"= {total:.4g}  (N: weights of every Linear, lm_head included, embedding lookup excluded)"
    )
    return float(total), line


def loss_step(state, batch):
    def loss_fn(params):
        out = xf.apply(state, params, input_ids=batch["input_ids"], labels=batch["input_ids"])
        return out.loss.float()

    loss, grads = xf.value_and_grad(loss_fn)(state.params)
    return state.apply_gradients(grads), {"loss": loss}


POLICY = "params=float32,compute=bfloat16,output=bfloat16"


class Runner:
    """One variant: its state, its (maybe compiled) step, its timings."""

    def __init__(self, name: str, args: argparse.Namespace, batch: dict[str, torch.Tensor]):
        self.name, self.args, self.batch = name, args, batch
        self.times: list[float] = []
        self.error: str | None = None
        self.how = "eager"
        self.loss = float("nan")
        precision, mode = name.split("-")
        self.fp8 = Float8(min_params=args.fp8_min_params) if precision == "fp8" else None
        self._fresh()
        if mode == "compiled":
            self._compile()

    def _fresh(self) -> None:
        """A new model (seed 0: the same weights in every variant), state and step."""
        self.state = self.step = None  # free the old ones first
        gc.collect()
        step = xf.mixed_precision(loss_step, POLICY, fp8=self.fp8)
        model = llama(self.args.preset, self.args.seq, self.args.device)
        opt = dict(fused=True) if self.args.device == "cuda" else dict(foreach=True)
        state = step.init(xf.TrainState.create(model, optimizer=torch.optim.AdamW, lr=1e-4, **opt))
        self.fp8_layers = sum(type(m).__name__ == "Float8Linear" for m in state.module.modules())
        self.state, self.step = state, step

    def _compile(self) -> None:
        jit = getattr(xf, "jit", None)
        backend = self.args.backend
        if jit is not None and not self.args.no_jit:
            self.step, self.how = jit(self.step, backend=backend), f"xf.jit({backend})"
            return
        self._compile_model("xf.jit absent" if jit is None else "--no-jit")

    def _compile_model(self, why: str) -> None:
        self.state.module.compile(backend=self.args.backend)
        self.how = f"module.compile({self.args.backend}) [{why}]"

    def run(self, steps: int) -> float:
        sync(self.args.device)
        t0 = time.perf_counter()
        for _ in range(steps):
            self.state, metrics = self.step(self.state, self.batch)
        self.loss = float(metrics["loss"])  # the sync
        sync(self.args.device)
        return (time.perf_counter() - t0) / steps

    def warm_up(self) -> float:
        t0 = time.perf_counter()
        try:
            self.run(self.args.warmup)
        except Exception as e:  # noqa: BLE001 - xf.jit on a model it cannot trace: fall back, say why
            if not self.how.startswith("xf.jit"):
                raise
            why = f"xf.jit failed: {type(e).__name__}: {str(e).splitlines()[0][:160]}"
            print(f"  {self.name}: {why}; falling back to torch.compile of the model", flush=True)
            self._fresh()  # the failed trace may have consumed the state
            self._compile_model(why)
            self.run(self.args.warmup)
        return time.perf_counter() - t0

    def free(self) -> None:
        self.state = self.step = None  # type: ignore[assignment]
        gc.collect()
        if self.args.device == "cuda":
            torch.cuda.empty_cache()


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()



def make_batch(args: argparse.Namespace, vocab: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, vocab, (args.batch, args.seq), generator=g)
    return {"input_ids": ids.to(args.device)}


def build(name: str, args: argparse.Namespace, batch) -> Runner:
    t0 = time.perf_counter()
    r = Runner(name, args, batch)
    warm = r.warm_up()
    print(f"  {name:14s} built in {time.perf_counter() - t0 - warm:6.1f} s, warm-up ({args.warmup} steps, "
          f"compilation included) {warm:6.1f} s; {r.how}; {r.fp8_layers} Float8Linear layers", flush=True)
    return r


def guarded(name: str, fn: Callable[[], Any]) -> Any:
    try:
        return fn()
    except torch.OutOfMemoryError:
        print(f"  {name}: out of memory (lower --batch or --seq)", flush=True)
        return "out of memory"
    except Exception as e:  # noqa: BLE001 - one failed variant must not cost the others' figures
        traceback.print_exc()
        return f"failed: {type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--preset", choices=tuple(PRESETS), default=None, help="default: 1b on cuda, tiny on cpu")
    p.add_argument("--batch", type=int, default=None, help="sequences per step (default: 4 on cuda, 2 on cpu)")
    p.add_argument("--seq", type=int, default=None, help="tokens per sequence (default: 2048 on cuda, 64 on cpu)")
    p.add_argument("--warmup", type=int, default=None)
    p.add_argument("--rounds", type=int, default=None)
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--variants", default=None,
                   help=f"comma-separated, of {','.join(VARIANTS)} (default: all; --quick: {','.join(QUICK)})")
    p.add_argument("--backend", default=None, help="torch.compile backend (default: inductor; --quick: aot_eager)")
    p.add_argument("--no-jit", action="store_true", help="compile the model with torch.compile, not the step with xf.jit")
    p.add_argument("--fp8-min-params", type=int, default=None, help="Float8(min_params=...) (default 2**20; tiny: 0)")
    p.add_argument("--peak-tflops", type=float, default=None, help="peak bf16 TFLOP/s for MFU (default: 989 on cuda)")
    p.add_argument("--threads", type=int, default=None, help="torch threads on cpu (default: all)")
    p.add_argument("--sequential", action=argparse.BooleanOptionalAction, default=None,
                   help="variants one after another, each freed before the next (default on cuda), or interleaved")
    p.add_argument("--quick", action="store_true", help="tiny config on cpu, 2 short rounds: checks the script runs")
    args = p.parse_args(argv)
    if args.quick:
        args.device = "cpu"
    cuda = args.device == "cuda"
    if cuda and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device here; use --device cpu (or --quick)")
    defaults = dict(preset="1b" if cuda else "tiny", batch=4 if cuda else 2, seq=2048 if cuda else 64,
                    warmup=5 if cuda else 2, rounds=5 if cuda else 3, steps=10 if cuda else 3,
                    backend="aot_eager" if args.quick else "inductor")
    if args.quick:
        defaults.update(preset="tiny", batch=2, seq=32, warmup=2, rounds=2, steps=2)  # xf.jit compiles at step 2
    for k, v in defaults.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if args.fp8_min_params is None:
        args.fp8_min_params = 0 if args.preset == "tiny" else 2**20
    if args.variants is None:
        args.variants = ",".join(QUICK if args.quick else VARIANTS)
    names = [v.strip() for v in args.variants.split(",") if v.strip()]
    bad = [v for v in names if v not in VARIANTS]
    if bad or not names:
        p.error(f"--variants: unknown {bad}; choose from {','.join(VARIANTS)}")
    if args.threads:
        torch.set_num_threads(args.threads)
    peak = args.peak_tflops * 1e12 if args.peak_tflops else (PEAK_BF16_H100_H200 if cuda else None)

    probe = llama(args.preset, args.seq, "meta")
    per_token, formula = flops_per_token(probe, args.seq)
    n_params = sum(t.numel() for t in probe.parameters())
    tokens = args.batch * args.seq
    device_name = torch.cuda.get_device_name() if cuda else f"cpu, {torch.get_num_threads()} threads"
    print(f"mfu: Llama preset {args.preset} ({n_params / 1e6:,.1f}M params), batch {args.batch} x seq {args.seq} = "
          f"{tokens} tokens/step, on {device_name}; torch {torch.__version__}")
    print(f"  {formula}")
    if peak:
        src = "--peak-tflops" if args.peak_tflops else "assumed: dense bf16 peak of an H100/H200 SXM"
        print(f"  peak {peak / 1e12:.0f} TFLOP/s ({src}); fp8 rows use the same bf16 peak")
    else:
        print("  peak: unknown on cpu (pass --peak-tflops): MFU not computed")
    batch = make_batch(args, probe.config.vocab_size)
    del probe

    results: dict[str, Runner | str] = {}
    if args.sequential is None:
        args.sequential = cuda
    if args.sequential:  # one after another: four 1B states do not fit at once
        for name in names:
            r = guarded(name, lambda name=name: build(name, args, batch))
            if isinstance(r, Runner):
                out = guarded(name, lambda r=r: [r.times.append(r.run(args.steps)) for _ in range(args.rounds)])
                if isinstance(out, str):
                    r.error = out
                r.free()
            results[name] = r
            gc.collect()  # also what a failed variant left
            if cuda:
                print(f"  {name}: peak memory {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB", flush=True)
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
    else:  # interleaved rounds, the order rotating
        for name in names:
            results[name] = guarded(name, lambda name=name: build(name, args, batch))
        live = [r for r in results.values() if isinstance(r, Runner)]
        for i in range(args.rounds):
            for r in live[i % len(live):] + live[: i % len(live)]:
                if r.error is None:
                    out = guarded(r.name, lambda r=r: r.times.append(r.run(args.steps)))
                    if isinstance(out, str):
                        r.error = out

    print(f"\n== mfu: {args.preset}, {tokens} tokens/step, {args.rounds} rounds of {args.steps} steps")
    print(f"{'variant':14s} {'s/step [q1, q3]':>28s} {'tokens/s':>10s} {'MFU':>6s} {'x bf16-eager [q1, q3]':>24s} "
          f"{'loss':>7s}  compiled by")
    base = results.get("bf16-eager")
    base_times = base.times if isinstance(base, Runner) and base.times and base.error is None else None
    for name in names:
        r = results[name]
        if isinstance(r, str) or r.error or not r.times:
            print(f"{name:14s} {r if isinstance(r, str) else r.error or 'no rounds'}")
            continue
        q1, med, q3 = quartiles(r.times)
        tps = tokens / med
        mfu = f"{100 * tps * per_token / peak:5.1f}%" if peak else "   n/a"
        if base_times is None:
            ratio = "n/a"
        elif args.sequential or len(base_times) != len(r.times):  # runs one after another: ratios of medians, quartiles crossed
            bq1, b, bq3 = quartiles(base_times)
            ratio = f"{b / med:.3f} [{bq1 / q3:.3f}, {bq3 / q1:.3f}]"
        else:  # paired by round
            rq1, rm, rq3 = quartiles([b / t for b, t in zip(base_times, r.times)])
            ratio = f"{rm:.3f} [{rq1:.3f}, {rq3:.3f}]"
        print(f"{name:14s} {med:10.4f} [{q1:.4f}, {q3:.4f}] {tps:10.0f} {mfu:>6s} {ratio:>24s} {r.loss:7.3f}  {r.how}")
    failed = [n for n in names if isinstance(results[n], str) or results[n].error]
    if failed and args.quick:
        sys.exit(f"mfu --quick: variants failed: {failed}")


if __name__ == "__main__":
    main()
