import weakref

import pytest
import torch

from xform.toolbox.batch_size import find_executable_batch_size, is_out_of_memory



def test_halves_on_out_of_memory_until_it_fits():
    tried = []

    @find_executable_batch_size(starting_batch_size=64)
    def train(batch_size, lr, *, steps):
        tried.append(batch_size)
        if batch_size > 8:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 4.00 GiB")
        return batch_size, lr, steps

    assert train(0.1, steps=3) == (8, 0.1, 3)
    assert tried == [64, 32, 16, 8]
    assert train.__name__ == "train"


def test_a_real_cpu_allocation_failure_counts_as_out_of_memory():
    tried = []

    @find_executable_batch_size(starting_batch_size=16)
    def alloc(batch_size):
        tried.append(batch_size)
        # 2**46 bytes per sample above 4: no machine has that
        x = torch.empty(batch_size * (2**46 if batch_size > 4 else 1024), dtype=torch.uint8)
        return x.numel()

    assert alloc() == 4 * 1024 and tried == [16, 8, 4]


def test_the_failed_attempt_is_freed_before_the_retry():
    refs = []

    @find_executable_batch_size(starting_batch_size=4)
    def train(batch_size):
        activations = torch.zeros(1000)
        if not refs:
            refs.append(weakref.ref(activations))
            raise RuntimeError("CUDA out of memory. Tried to allocate 20.00 MiB")
        return refs[0]() is None

    assert train() is True


def test_other_errors_propagate_at_once():
    calls = []

    @find_executable_batch_size(starting_batch_size=32)
    def train(batch_size):
        calls.append(batch_size)
        raise RuntimeError("mat1 and mat2 shapes cannot be multiplied")

    with pytest.raises(RuntimeError, match="shapes cannot be multiplied"):
        train()
    assert calls == [32]


def test_clear_error_at_zero():
    tried = []

    @find_executable_batch_size(starting_batch_size=5)
    def train(batch_size):
        tried.append(batch_size)
        raise torch.OutOfMemoryError("CUDA out of memory")

    with pytest.raises(RuntimeError, match="train ran out of memory at every batch size from 5 down to 1") as info:
        train()
    assert tried == [5, 2, 1]
    assert isinstance(info.value.__cause__, torch.OutOfMemoryError)


def test_bare_decorator_and_misuse():
    @find_executable_batch_size
    def first(batch_size):
        return batch_size

    assert first() == 128
    with pytest.raises(TypeError, match="do not pass batch_size= to .*first; the decorator chooses it"):
        first(batch_size=4)
    with pytest.raises(TypeError, match="must take the batch size as its first positional argument"):
        find_executable_batch_size(lambda *, batch_size: None)
    with pytest.raises(ValueError, match="starting_batch_size must be an int >= 1, got 0"):
        find_executable_batch_size(starting_batch_size=0)


def test_is_out_of_memory():
    assert is_out_of_memory(torch.OutOfMemoryError("x"))
    assert is_out_of_memory(RuntimeError("CUDA out of memory. Tried to allocate 2 GiB"))
    assert is_out_of_memory(RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 8 bytes"))
    assert is_out_of_memory(MemoryError())
    assert not is_out_of_memory(RuntimeError("expected scalar type Float"))
    assert not is_out_of_memory(ValueError("out of memory"))

