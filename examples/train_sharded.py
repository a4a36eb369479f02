"""One training script from one CPU process to many: ZeRO-3, bf16, accumulation, resume.

    # 2 processes, fully sharded (ZeRO-3), bf16 compute, 4 micro-batches per step
    .venv/bin/xform launch --nproc 2 examples/train_sharded.py --steps 20 --ckpt-dir runs/sharded
    # the same file as one plain process resumes that checkpoint (resharded 2 -> 1)
    .venv/bin/python examples/train_sharded.py --steps 40 --ckpt-dir runs/sharded
    # the same script on DeepSpeed's engine (ZeRO-3 there; its checkpoint also resumes
    # as one plain process, from its consolidated fp32 params and optimizer state)
    .venv/bin/xform launch --nproc 2 examples/train_sharded.py --backend deepspeed --ckpt-dir runs/ds

The global batch is the same on any number of processes (``--global-batch``), so the
resumed run continues with exactly the next global batches.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

import xform as xf


class Block(torch.nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.norm = torch.nn.LayerNorm(dim)
        self.mlp = torch.nn.Sequential(torch.nn.Linear(dim, 4 * dim), torch.nn.GELU(), torch.nn.Linear(4 * dim, dim))

    def forward(self, x):
        return x + self.mlp(self.norm(x))


class Model(torch.nn.Module):
    def __init__(self, dim: int = 32, depth: int = 3, classes: int = 8):
        super().__init__()
        self.inp = torch.nn.Linear(16, dim)
        self.blocks = torch.nn.Sequential(*[Block(dim) for _ in range(depth)])
        self.out = torch.nn.Linear(dim, classes)

    def forward(self, x):
        return self.out(self.blocks(self.inp(x)))


def dataset(n: int = 4096, classes: int = 8):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(16, classes, generator=g)
    x = torch.randn(n, 16, generator=g)
    y = (x @ w + 0.5 * torch.randn(n, classes, generator=g)).argmax(-1)
    return [{"x": x[i], "y": y[i]} for i in range(n)]


def step(state, batch):
    def loss_fn(params):
        return F.cross_entropy(xf.apply(state, params, batch["x"]), batch["y"])

    loss, grads = xf.value_and_grad(loss_fn)(state.params)
    return state.apply_gradients(grads), {"loss": loss}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--global-batch", type=int, default=64)
    parser.add_argument("--strategy", default="zero3")
    parser.add_argument("--backend", default=None, choices=("torch", "deepspeed"),
                        help="torch (default) or deepspeed (zero1/zero2/zero3 on DeepSpeed's engine)")
    parser.add_argument("--ckpt-dir", default="runs/sharded")
    args = parser.parse_args()

    rt = xf.distributed.initialize()
    backend = args.backend if rt.world_size > 1 else None  # one plain process: no engine to run
    train_step = xf.shard(xf.accumulate(xf.mixed_precision(step, "bf16"), 4), strategy=args.strategy, backend=backend)
    state = train_step.init(xf.TrainState.create(Model(), optimizer=torch.optim.AdamW, lr=3e-3, seed=0))
    manager = xf.CheckpointManager(args.ckpt_dir, keep=2)
    if manager.latest() is not None:
        state = manager.restore(like=state)
        if rt.is_main_process:
            print(f"resumed {manager.latest()} at step {state.step} on {rt.world_size} process(es)")
    loader = xf.DataLoader(dataset(), global_batch_size=args.global_batch, shuffle=True)
    state = loader.attach(state)  # a resume with another global batch size is refused

    while state.step < args.steps:
        for batch in loader.iterate(state):
            state, metrics = train_step(state, batch)
            if state.step % 5 == 0:  # the same on every process: the collective below is matched
                loss = xf.distributed.reduce(metrics["loss"], op="mean")
                if rt.is_main_process:
                        print(f"step {state.step:3d}  loss {float(loss):.4f}  ({rt.world_size} process(es), {args.strategy}, {backend or 'torch'})")
            if state.step >= args.steps:
                break
    path = manager.save(state)
    if rt.is_main_process:
        print(f"saved {path}")
    xf.distributed.shutdown()


if __name__ == "__main__":
    main()
