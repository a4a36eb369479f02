"""``Mean``: a sum over a count, pooled exactly."""

import pytest
import torch

import xform as xf


def test_value_and_conversions():
    m = xf.Mean(torch.tensor(6.0), 4)
    assert torch.equal(m.value, torch.tensor(1.5))
    assert float(m) == 1.5 and m.item() == 1.5
    assert repr(m) == "Mean(1.5, total=6, count=4)"


def test_a_number_total_becomes_a_tensor():
    m = xf.Mean(3, torch.tensor(2))
    assert isinstance(m.total, torch.Tensor) and m.total.dtype == torch.get_default_dtype()
    assert float(m) == 1.5


def test_pooling_is_the_mean_over_all_items_not_the_mean_of_means():
    groups = [torch.tensor([1.0, 2.0, 3.0, 4.0]), torch.tensor([10.0])]
    pooled = sum((xf.Mean(g.sum(), len(g)) for g in groups[1:]), xf.Mean(groups[0].sum(), len(groups[0])))
    assert float(pooled) == pytest.approx(torch.cat(groups).mean().item())
    mean_of_means = sum(g.mean().item() for g in groups) / len(groups)
    assert float(pooled) != pytest.approx(mean_of_means)
    assert pooled.count == 5


def test_pooling_with_tensor_counts_and_zero_counts():
    a = xf.Mean(torch.tensor(0.0), torch.tensor(0))
    b = xf.Mean(torch.tensor(3.0), torch.tensor(2))
    assert float(a + b) == 1.5 and int((a + b).count) == 2


def test_adding_something_else_is_refused():
    with pytest.raises(TypeError):
        xf.Mean(torch.tensor(1.0), 1) + 1.0


@pytest.mark.parametrize("count", ["3", None, True, [3]])
def test_the_count_must_be_a_number_or_tensor(count):
    with pytest.raises(TypeError, match=r"xf.Mean: count must be a number or a tensor, got .*; pass the number of items"):
        xf.Mean(torch.tensor(1.0), count)


def test_mean_is_immutable():
    m = xf.Mean(torch.tensor(1.0), 1)
    with pytest.raises(AttributeError, match="xf.Mean is immutable: cannot assign to field 'total'"):
        m.total = torch.tensor(2.0)


def test_detach():
    total = torch.tensor(2.0, requires_grad=True) * 3
    count = torch.tensor(4.0, requires_grad=True) + 0
    d = xf.Mean(total, count).detach()
    assert not d.total.requires_grad and not d.count.requires_grad and float(d) == 1.5


def test_mean_is_a_pytree():
    m = xf.Mean(torch.tensor(6.0), 3)
    assert xf.tree.flatten_with_path({"loss": m})[0][0] == "loss['total']"
    doubled = xf.tree.map(lambda t: t * 2, m)
    assert isinstance(doubled, xf.Mean) and float(doubled.total) == 12.0 and doubled.count == 6
