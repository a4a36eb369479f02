"""A character-level language model trained with xform on a text shipped in the repo.

Lines have different lengths; padding is labelled -100 and the loss is returned as
``xf.Mean(sum over tokens, number of real tokens)``, so ``accumulate`` normalizes by the
token count of the whole batch and equals the full-batch step exactly, however unevenly
the real tokens fall into micro-batches.

    .venv/bin/python examples/char_lm.py --steps 60 --ckpt-dir runs/lm
    .venv/bin/python examples/char_lm.py --steps 120 --ckpt-dir runs/lm   # resumes
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch.nn.functional as F

import xform as xf

TEXT = Path(__file__).with_name("data") / "lighthouse.txt"
PAD = -100


class CharDataset:
    """Each line of the text is one example: input ids and next-character labels."""

    def __init__(self, path: Path = TEXT):
        lines = [line for line in path.read_text().splitlines() if line]
        self.vocab = sorted({c for line in lines for c in line} | {"\n"})
        self.index = {c: i for i, c in enumerate(self.vocab)}
        self.lines = [[self.index[c] for c in line + "\n"] for line in lines]
        self.max_len = max(map(len, self.lines))

    def __len__(self) -> int:
        return len(self.lines)

    def __getitem__(self, i: int):
        ids = self.lines[i]
        x = torch.zeros(self.max_len - 1, dtype=torch.long)
        y = torch.full((self.max_len - 1,), PAD, dtype=torch.long)
        x[: len(ids) - 1] = torch.tensor(ids[:-1])
        y[: len(ids) - 1] = torch.tensor(ids[1:])
        return {"x": x, "y": y}


class TinyTransformer(torch.nn.Module):
    def __init__(self, vocab: int, max_len: int, dim: int = 64, heads: int = 4, layers: int = 2):
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, dim)
        self.pos = torch.nn.Parameter(torch.randn(max_len, dim) * 0.02)
        layer = torch.nn.TransformerEncoderLayer(dim, heads, 4 * dim, dropout=0.1, batch_first=True)
        self.blocks = torch.nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = torch.nn.Linear(dim, vocab)

    def forward(self, x):
        t = x.shape[1]
        mask = torch.nn.Transformer.generate_square_subsequent_mask(t, device=x.device)
        h = self.blocks(self.embed(x) + self.pos[:t], mask=mask, is_causal=True)
        return self.head(h)


def step(state: xf.TrainState, batch):
    def loss_fn(params):
        logits = xf.apply(state, params, batch["x"])
        total = F.cross_entropy(logits.flatten(0, 1), batch["y"].flatten(), ignore_index=PAD, reduction="sum")
        return xf.Mean(total, (batch["y"] != PAD).sum())

    loss, grads = xf.value_and_grad(loss_fn)(state.params)
    return state.apply_gradients(grads), {"loss": loss, "tokens": (batch["y"] != PAD).sum()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--accumulate", type=int, default=2)
    parser.add_argument("--precision", default="bf16")
    parser.add_argument("--ckpt-dir", default="runs/char_lm")
    args = parser.parse_args()

    data = CharDataset()
    train_step = xf.accumulate(xf.mixed_precision(step, args.precision), args.accumulate)
    init = getattr(train_step, "init", lambda s: s)
    model = TinyTransformer(len(data.vocab), data.max_len)
    state = init(xf.TrainState.create(model, optimizer=torch.optim.AdamW, lr=3e-3, seed=1, max_grad_norm=1.0))
    manager = xf.CheckpointManager(args.ckpt_dir, keep=2)
    if (restored := manager.restore(like=state)) is not None:
        state = restored
        print(f"resumed from {manager.latest()} at step {state.step}")
    loader = xf.DataLoader(data, batch_size=args.batch_size, shuffle=True, drop_last=True)
    state = loader.attach(state)  # a resume with another global batch size is refused

    while state.step < args.steps:
        for batch in loader.iterate(state):
            state, metrics = train_step(state, batch)
            if state.step % 10 == 0:
                print(f"step {state.step:4d}  loss/token {float(metrics['loss']):.4f}  tokens {int(metrics['tokens'])}")
            if state.step >= args.steps:
                break
    manager.save(state)
    print(f"done: step {state.step}, checkpoint {manager.latest()}")


if __name__ == "__main__":
    main()
