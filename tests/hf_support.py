"""Hugging Face models as test subjects: what the pool processes run (importable by
spawned workers).

The models are tiny GPT-2 and Llama configurations built in code (nothing downloads),
with dropout 0 and eager attention, so that one process on the global batch and N
processes on its slices compute the same function. A case is a plain dict (picklable):
the model, the loss, the optimizer, the strategy; ``train`` runs it on this process's
slice of each global batch and returns the full parameters (gathered from shards), the
losses and whether the model's tied weights are still one tensor.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F

import xform as xf

VOCAB, SEQ = 97, 16

# Llama tensor parallelism: attention q/k/v and MLP gate/up column-wise, o and down
# row-wise (Megatron's split; torchtitan's plan for the same modules).
LLAMA_TP_PLAN = {
    "*.self_attn.q_proj": "colwise",
    "*.self_attn.k_proj": "colwise",
    "*.self_attn.v_proj": "colwise",
    "*.self_attn.o_proj": "rowwise",
    "*.mlp.gate_proj": "colwise",
    "*.mlp.up_proj": "colwise",
    "*.mlp.down_proj": "rowwise",
}


def _quiet() -> None:
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")


def gpt2(seed: int = 0) -> torch.nn.Module:
    """GPT-2 with ``lm_head.weight`` tied to ``transformer.wte.weight`` (28 tensors, 29 names)."""
    _quiet()
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(
        n_layer=2, n_embd=32, n_head=4, vocab_size=VOCAB, n_positions=32,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0,
    )
    cfg._attn_implementation = "eager"
    torch.manual_seed(seed)
    return GPT2LMHeadModel(cfg)


def llama(seed: int = 0, *, tied: bool = False, kv_heads: int = 2) -> torch.nn.Module:
    _quiet()
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=kv_heads, vocab_size=VOCAB, max_position_embeddings=32,
        bos_token_id=0, eos_token_id=0, pad_token_id=None, tie_word_embeddings=tied,
    )
    cfg._attn_implementation = "eager"
    torch.manual_seed(seed)
    return LlamaForCausalLM(cfg)


@dataclasses.dataclass
class Output:
    """A model output with named fields (as a ``ModelOutput``; no transformers import)."""

    loss: torch.Tensor | None
    logits: torch.Tensor


class TiedLM(torch.nn.Module):
    """A tiny causal LM with two ties: the output head shares the embedding (owners in
    different subtrees, tied at the root, as in GPT-2) and ``block.a``/``block.b`` share
    one weight (tied inside ``block``: its lowest common owner is not the root)."""

    def __init__(self, width: int = 8):
        super().__init__()
        self.embed = torch.nn.Embedding(VOCAB, width)
        self.block = torch.nn.Module()
        self.block.a = torch.nn.Linear(width, width)
        self.block.b = torch.nn.Linear(width, width)
        self.block.b.weight = self.block.a.weight
        self.norm = torch.nn.LayerNorm(width)
        self.head = torch.nn.Linear(width, VOCAB, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, input_ids, labels=None):
        h = self.embed(input_ids)
        h = h + torch.tanh(self.block.b(torch.tanh(self.block.a(h))))
        logits = self.head(self.norm(h))
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), labels[:, 1:].reshape(-1))
        return Output(loss=loss, logits=logits)

    def get_input_embeddings(self):
        return self.embed

    def get_output_embeddings(self):
        return self.head


def model(case: dict[str, Any]) -> torch.nn.Module:
    if case["model"] == "gpt2":
        return gpt2(case.get("seed", 0))
    if case["model"] == "tiny":
        torch.manual_seed(case.get("seed", 0))
        return TiedLM()
    return llama(case.get("seed", 0), tied=case.get("tied", False))


def tied_pair(m: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """(input embedding weight, output projection weight) of a causal LM."""
    return m.get_input_embeddings().weight, m.get_output_embeddings().weight


def batches(case: dict[str, Any]) -> list[dict[str, torch.Tensor]]:
    """Random tokens; with ``loss="masked"`` some labels are -100 (ignored), a different
    number on each process, so the loss is a sum over a variable number of tokens."""
    g = torch.Generator().manual_seed(case.get("seed", 0) + 1)
    n = case["global_batch"]
    out = []
    for _ in range(case["steps"]):
        ids = torch.randint(0, VOCAB, (n, SEQ), generator=g)
        labels = ids.clone()
        if case["loss"] == "masked":
            labels[torch.rand(n, SEQ, generator=g) < 0.4] = -100
            labels[0, 1] = ids[0, 1]  # at least one token counts
        out.append({"input_ids": ids, "labels": labels})
    return out


def make_step(case: dict[str, Any]):
    """The loss through the model's keyword inputs and its ``ModelOutput``:
    ``"out.loss"`` is the model's own mean cross-entropy (``labels=``), ``"masked"`` is
    computed from ``out.logits`` as an ``xf.Mean`` over the tokens that count."""
    masked = case["loss"] == "masked"

    def step(state, batch):
        def loss_fn(params):
            if not masked:
                return xf.apply(state, params, input_ids=batch["input_ids"], labels=batch["labels"]).loss
            logits = xf.apply(state, params, input_ids=batch["input_ids"]).logits
            shift_logits, shift_labels = logits[:, :-1], batch["labels"][:, 1:]
            total = F.cross_entropy(shift_logits.reshape(-1, VOCAB), shift_labels.reshape(-1),
                                    ignore_index=-100, reduction="sum")
            return xf.Mean(total, (shift_labels != -100).sum())

        loss, grads = xf.value_and_grad(loss_fn)(state.params)
        return state.apply_gradients(grads), {"loss": loss}

    if case.get("k", 1) > 1:
        step = xf.accumulate(step, case["k"])
    return step


def optimizer(case: dict[str, Any]) -> dict[str, Any]:
    # Unclipped SGD with momentum: the update is linear in the gradient, so a wrong
    # normalization or a lost gradient shows in the params at its own size (AdamW would
    # divide it away and amplify rounding on near-zero gradients).
    if case.get("optimizer", "sgd") == "sgd":
        return {"optimizer": torch.optim.SGD, "lr": 0.5, "momentum": 0.9}
    return {"optimizer": torch.optim.AdamW, "lr": 1e-3}


def strategy_and_mesh(case: dict[str, Any]) -> tuple[Any, Any, int, int]:
    """(strategy, mesh, data-parallel size, data-parallel rank) on this process."""
    world, rank = dist.get_world_size(), dist.get_rank()
    name = case["strategy"]
    if name == "hsdp":
        r, s = case["mesh"]
        return "hsdp", xf.mesh(replicate=r, shard=s), world, rank
    if name in ("tp", "tp+fsdp"):
        dp = world // 2
        mesh = xf.mesh(dp=dp, tp=2)
        fsdp = name == "tp+fsdp"
        plan = xf.TensorParallel(plan=LLAMA_TP_PLAN, data_parallel="fsdp" if fsdp else None)
        return plan, mesh, (dp if fsdp else 1), (mesh["dp"].get_local_rank() if fsdp else 0)
    if name == "zero3-units":  # units chosen by the user, two of which hold one owner of the tie each
        return xf.FullyShard(units=_blocks_and_embeddings), None, world, rank
    return name, None, world, rank


def _blocks_and_embeddings(m: torch.nn.Module) -> bool:
    return type(m).__name__ in ("GPT2Block", "Embedding") or type(m).__name__ == "Linear"


def full(t: torch.Tensor) -> torch.Tensor:
    return (t.full_tensor() if hasattr(t, "full_tensor") else t).detach().clone()


def build(case: dict[str, Any]):
    """(step, state, data-parallel size, data-parallel rank) on this process."""
    step = make_step(case)
    size, rank = 1, 0
    if dist.is_initialized() and case.get("strategy"):
        strategy, mesh, size, rank = strategy_and_mesh(case)
        step = xf.shard(step, strategy, mesh=mesh)
    init = getattr(step, "init", lambda s: s)
    state = xf.TrainState.create(model(case), max_grad_norm=case.get("clip"), **optimizer(case))
    return step, init(state), size, rank


def run_steps(step, state, bs, size: int, rank: int):
    losses = []
    for b in bs:
        n = b["input_ids"].shape[0] // size
        state, metrics = step(state, {k: v[rank * n : (rank + 1) * n] for k, v in b.items()})
        loss = metrics["loss"]  # (total, count) on this process: pooled over processes by the test
        losses.append((float(loss.total), float(loss.count)) if isinstance(loss, xf.Mean) else (float(loss), 1.0))
    return state, losses


def train(case: dict[str, Any]) -> dict[str, Any]:
    """The case on this process (sharded when a process group exists)."""
    step, state, size, rank = build(case)
    state, losses = run_steps(step, state, batches(case), size, rank)
    emb, out = tied_pair(state.module)
    return {
        "params": {k: full(v) for k, v in state.params.items()},
        "losses": losses,
        "tied": emb is out,
        "inner_tied": (state.module.block.a.weight is state.module.block.b.weight) if case["model"] == "tiny" else None,
        "names": list(state.params),
        "dp": (size, rank),
    }


def phase(case: dict[str, Any], path: str | None, start: int, stop: int, load: str | None = None) -> dict[str, Any]:
    """Trains on global batches [start, stop), loading ``load`` first (checking that the
    module's tied owners are both the loaded state's tensor after training on) and
    saving to ``path`` after."""
    step, state, size, rank = build(case)
    tied_after_load = None
    if load:
        state = xf.load(load, like=state)
    state, losses = run_steps(step, state, batches(case)[start:stop], size, rank)
    if load:  # the module runs on the loaded state's tensor, through both owners
        emb, out = tied_pair(state.module)
        tied_after_load = emb is out and any(t is out for t in state.params.values())
    if path:
        xf.save(state, path)
    return {
        "params": {k: full(v) for k, v in state.params.items()},
        "losses": losses,
        "step": state.step,
        "tied_after_load": tied_after_load,
    }


def error_of(fn_name: str, *args: Any) -> str:
    """Runs one misuse on this process and returns the error message."""
    try:
        globals()[fn_name](*args)
    except Exception as e:  # noqa: BLE001
        return f"{type(e).__name__}: {e}"
    return "no error"


def tp_planning_a_tied_module(data_parallel: str | None) -> None:
    step = xf.shard(make_step({"loss": "out.loss"}), xf.TensorParallel(plan={"head": "rowwise"}, data_parallel=data_parallel),
                    mesh=xf.mesh(dp=1, tp=2))
    state = step.init(xf.TrainState.create(model({"model": "tiny"}), **optimizer({})))
    b = batches({"model": "tiny", "loss": "out.loss", "global_batch": 2, "steps": 1})[0]
    step(state, b)


def tp_splitting_a_head() -> None:
    """Llama with one key/value head (of 8 features) on a tp axis of 2: k_proj's 8 output
    features divide by 2, but only by cutting the head in half."""
    step = xf.shard(make_step({"loss": "out.loss"}), xf.TensorParallel(plan=LLAMA_TP_PLAN), mesh=xf.mesh(dp=1, tp=2))
    state = step.init(xf.TrainState.create(llama(kv_heads=1), **optimizer({})))
    step(state, batches({"loss": "out.loss", "global_batch": 2, "steps": 1})[0])
