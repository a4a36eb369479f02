import math

import pytest
import torch
import torch.nn.functional as F

import xform
from xform.toolbox.memory import estimate_memory, measure_activations



def mlp():
    nn = torch.nn
    return nn.Sequential(nn.Linear(12, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 3))


def tensor_bytes(tensors):
    return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))


def one_adamw_step(params, loss):
    opt = torch.optim.AdamW(params, lr=1e-3, foreach=True)
    loss.backward()
    opt.step()
    return opt


def measured(params, opt):
    return (
        tensor_bytes(params),
        tensor_bytes(p.grad for p in params),
        tensor_bytes(v for s in opt.state.values() for v in s.values()),
    )


# The formulas, written out independently of the implementation: bytes per rank of
# (params, grads, optimizer state) for Adam, per parameter, Ψ parameters on N ranks.
FORMULAS = {
    ("replicate", "fp32"): lambda P, N: (4 * P, 4 * P, 8 * P),
    ("zero1", "fp32"): lambda P, N: (4 * P, 4 * P, 8 * P / N),
    ("zero2", "fp32"): lambda P, N: (4 * P, 4 * P / N, 8 * P / N),
    ("zero3", "fp32"): lambda P, N: (4 * P / N, 4 * P / N, 8 * P / N),
    ("replicate", "bf16"): lambda P, N: (2 * P, 2 * P, 12 * P),
    ("zero1", "bf16"): lambda P, N: (2 * P, 2 * P, 12 * P / N),
    ("zero2", "bf16"): lambda P, N: (2 * P, 2 * P / N, 12 * P / N),
    ("zero3", "bf16"): lambda P, N: (2 * P / N, 2 * P / N, 12 * P / N),
}
TOTALS = {  # the standard per-parameter totals
    ("replicate", "bf16"): lambda P, N: 16 * P,
    ("zero1", "bf16"): lambda P, N: 4 * P + 12 * P / N,
    ("zero2", "bf16"): lambda P, N: 2 * P + 14 * P / N,
    ("zero3", "bf16"): lambda P, N: 16 * P / N,
    ("replicate", "fp32"): lambda P, N: 16 * P,
    ("zero1", "fp32"): lambda P, N: 8 * P + 8 * P / N,
    ("zero2", "fp32"): lambda P, N: 4 * P + 12 * P / N,
    ("zero3", "fp32"): lambda P, N: 16 * P / N,
}


@pytest.mark.parametrize("strategy,precision", sorted(FORMULAS))
@pytest.mark.parametrize("world_size", [1, 2, 8])
def test_formulas_for_a_parameter_count(strategy, precision, world_size):
    P = 8_000_000
    e = estimate_memory(P, strategy=strategy, precision=precision, world_size=world_size)
    steps = 4  # one tensor: one Adam step counter
    params, grads, opt = FORMULAS[strategy, precision](P, world_size)
    assert (e.params, e.grads, e.optimizer_state) == (params, grads, opt + steps)
    assert e.total == TOTALS[strategy, precision](P, world_size) + steps
    fp16 = estimate_memory(P, strategy=strategy, precision="fp16" if precision == "bf16" else "fp32", world_size=world_size)
    assert fp16.total == e.total


def test_uneven_shards_round_up():
    e = estimate_memory(10, strategy="zero3", precision="fp32", world_size=4)
    assert (e.params, e.grads, e.optimizer_state) == (4 * 3, 4 * 3, 8 * 3 + 4)


def test_fp32_adamw_matches_the_measured_tensors():
    torch.manual_seed(0)
    model = mlp()
    params = list(model.parameters())
    opt = one_adamw_step(params, F.mse_loss(model(torch.randn(4, 12)), torch.zeros(4, 3)))
    p, g, o = measured(params, opt)
    e = estimate_memory(model, strategy="replicate", precision="fp32", world_size=1, optimizer="adamw")
    assert (e.params, e.grads, e.optimizer_state, e.buffers) == (p, g, o, 0)
    assert e.total == p + g + o and e.num_params == sum(x.numel() for x in params)


def test_fp32_matches_an_xform_train_state():
    state = xform.TrainState.create(mlp(), optimizer=torch.optim.AdamW, lr=1e-3)

    def loss_fn(params):
        return F.mse_loss(xform.apply(state, params, torch.randn(4, 12)), torch.zeros(4, 3))

    loss, grads = xform.value_and_grad(loss_fn)(state.params)
    grad_bytes = tensor_bytes(grads.values())
    state = state.apply_gradients(grads)
    opt_bytes = tensor_bytes(v for entry in state.opt_state["state"].values() for v in entry.values())
    e = estimate_memory(state.module, strategy="replicate", precision="fp32")
    assert (e.params, e.grads, e.optimizer_state) == (tensor_bytes(state.params.values()), grad_bytes, opt_bytes)


def test_bf16_with_fp32_master_matches_that_layout_measured():
    torch.manual_seed(0)
    model = mlp().to(torch.bfloat16)  # low-precision params, and so grads
    params = list(model.parameters())
    master = [p.detach().float().requires_grad_() for p in params]  # fp32 master weights
    loss = F.mse_loss(model(torch.randn(4, 12, dtype=torch.bfloat16)), torch.zeros(4, 3, dtype=torch.bfloat16))
    loss.backward()
    for m, p in zip(master, params):
        m.grad = p.grad.float()
    opt = torch.optim.AdamW(master, lr=1e-3, foreach=True)
    opt.step()
    for m in master:
        m.grad = None  # the fp32 grads are transient
    p, g, o = measured(params, opt)
    o += tensor_bytes(master)
    e = estimate_memory(model, strategy="replicate", precision="bf16")
    assert (e.params, e.grads, e.optimizer_state) == (p, g, o)


def test_sgd_optimizers_measured():
    for optimizer, kwargs in (("sgd-momentum", {"momentum": 0.9}), ("sgd", {})):
        model = mlp()
        params = list(model.parameters())
        opt = torch.optim.SGD(params, lr=0.1, **kwargs)
        F.mse_loss(model(torch.randn(4, 12)), torch.zeros(4, 3)).backward()
        opt.step()
        e = estimate_memory(model, strategy="replicate", precision="fp32", optimizer=optimizer)
        assert e.optimizer_state == measured(params, opt)[2], optimizer


def test_frozen_parameters_and_buffers():
    model = torch.nn.Sequential(torch.nn.Linear(10, 10), torch.nn.BatchNorm1d(10), torch.nn.Linear(10, 2))
    model[0].requires_grad_(False)
    e = estimate_memory(model, strategy="replicate", precision="fp32")
    trainable = 20 + 22
    assert (e.num_params, e.trainable_params) == (110 + 20 + 22, trainable)
    assert e.params == 4 * 152 and e.grads == 4 * trainable and e.optimizer_state == 8 * trainable + 4 * 4
    assert e.buffers == tensor_bytes(model.buffers()) == 4 * 20 + 8


def test_meta_model_gives_the_same_numbers_and_allocates_nothing():
    with torch.device("meta"):
        meta = torch.nn.Linear(256, 256)
    assert meta.weight.device.type == "meta"
    real = torch.nn.Linear(256, 256)
    for strategy in ("replicate", "zero3"):
        assert estimate_memory(meta, strategy=strategy, precision="bf16", world_size=8) == estimate_memory(
            real, strategy=strategy, precision="bf16", world_size=8
        )
    assert estimate_memory(meta, strategy="replicate").params == 4 * (256 * 256 + 256)


def test_activations_measured_on_meta_match_cpu_and_hand_count():
    def build(device):
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Linear(12, 32, device=device), torch.nn.ReLU(), torch.nn.Linear(32, 3, device=device))

    B = 16
    # Linear 1 keeps its input (B x 12); ReLU keeps its output (B x 32), which Linear 2 keeps too
    # (one storage); the output (B x 3) is kept for the loss.
    expected = 4 * B * (12 + 32 + 3)
    on_meta = measure_activations(build("meta"), torch.empty(B, 12, device="meta"))
    on_cpu = measure_activations(build("cpu"), torch.randn(B, 12))
    assert on_meta == on_cpu == expected
    assert measure_activations(build("meta"), torch.empty(B, 12, device="meta"), dtype=torch.bfloat16) == expected // 2
    e = estimate_memory(build("meta"), strategy="zero3", world_size=2, activations=on_meta)
    assert e.total == e.params + e.grads + e.optimizer_state + expected


def test_errors_name_the_bad_value():
    with pytest.raises(ValueError, match="estimate_memory: unknown strategy 'zero4'; use one of replicate, zero1, zero2, zero3"):
        estimate_memory(10, strategy="zero4")
    with pytest.raises(ValueError, match="unknown precision 'fp8'"):
        estimate_memory(10, strategy="zero1", precision="fp8")
    with pytest.raises(ValueError, match="world_size must be an int >= 1, got 0"):
        estimate_memory(10, strategy="zero1", world_size=0)
    with pytest.raises(TypeError, match="expected a torch.nn.Module or a parameter count, got str"):
        estimate_memory("gpt2", strategy="zero1")
    assert math.isclose(estimate_memory(0, strategy="zero3").total, 0)

