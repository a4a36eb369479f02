"""The one table of dtype names: what ``mixed_precision`` policies, the memory estimate
and the CLI accept."""

from __future__ import annotations

import torch

__all__ = ["DTYPES", "PRECISIONS", "parse_dtype", "dtype_name"]

# Every spelling accepted for a floating dtype, lower case.
DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32, "fp32": torch.float32, "f32": torch.float32, "float": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "f16": torch.float16, "half": torch.float16,
}

# The precisions a launch or an estimate names: short name -> compute dtype.
PRECISIONS: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def parse_dtype(api: str, name: str) -> torch.dtype:
    """The dtype called ``name`` (any spelling in ``DTYPES``).

    Example:
        >>> parse_dtype("mixed_precision", "BF16")
        torch.bfloat16
        >>> parse_dtype("mixed_precision", "fp8")
        Traceback (most recent call last):
        ...
        ValueError: mixed_precision: unknown dtype 'fp8'; use one of float32, bfloat16, float16
    """
    if not isinstance(name, str):
        raise TypeError(f"{api}: a dtype name must be a string, got {name!r}")
    try:
        return DTYPES[name.strip().lower()]
    except KeyError:
        raise ValueError(f"{api}: unknown dtype {name!r}; use one of float32, bfloat16, float16") from None


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` -> ``"bfloat16"``."""
    return str(dtype).removeprefix("torch.")
