"""``PadCollate``: a ``collate_fn`` for variable-length token sequences (re-exported by ``xform.data``)."""

from __future__ import annotations

from typing import Any

import torch
import torch.utils.data

__all__ = ["PadCollate"]


class PadCollate:
    """A ``collate_fn`` for examples whose sequence fields vary in length.

    The fields named in ``pad`` (lists or 1-d tensors of tokens) are right-padded with
    their pad value to the longest one in the batch (rounded up to ``multiple_of``) and
    stacked into a ``[batch, length]`` long tensor; the other fields are collated as
    ``torch.utils.data.default_collate`` does. Pad labels with the value the loss
    ignores, and count the real tokens for an ``xf.Mean`` loss:

    .. code-block:: python

        collate = xf.PadCollate(pad={"input_ids": 0, "labels": -100})
        loader = xf.DataLoader(hf_dataset, batch_size=8, collate_fn=collate)
        ...
        mask = batch["labels"] != -100
        loss = xf.Mean(F.cross_entropy(logits[mask], batch["labels"][mask], reduction="sum"), mask.sum())

    A frozen value: picklable, so worker processes can use it.

    Example:
        >>> import xform as xf
        >>> xf.PadCollate(pad={"ids": 0})([{"ids": [1, 2, 3]}, {"ids": [4]}])["ids"].tolist()
        [[1, 2, 3], [4, 0, 0]]
    """

    __slots__ = ("pad", "multiple_of")

    def __init__(self, *, pad: dict[str, int | float], multiple_of: int = 1):
        if not isinstance(pad, dict) or not all(isinstance(k, str) for k in pad):
            raise TypeError(f"xf.PadCollate: pad must be a dict of field name to pad value, got {type(pad).__name__}")
        if isinstance(multiple_of, bool) or not isinstance(multiple_of, int) or multiple_of < 1:
            raise ValueError(f"xf.PadCollate: multiple_of must be a positive int, got {multiple_of!r}")
        object.__setattr__(self, "pad", dict(pad))
        object.__setattr__(self, "multiple_of", multiple_of)

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError(f"xf.PadCollate is immutable: cannot assign to field {name!r}")

    def __getstate__(self) -> tuple[dict[str, Any], int]:
        return self.pad, self.multiple_of

    def __setstate__(self, state: tuple[dict[str, Any], int]) -> None:
        object.__setattr__(self, "pad", state[0])
        object.__setattr__(self, "multiple_of", state[1])

    def __eq__(self, other: object) -> bool:
        return isinstance(other, PadCollate) and (self.pad, self.multiple_of) == (other.pad, other.multiple_of)

    def __hash__(self) -> int:
        return hash((tuple(sorted(self.pad.items())), self.multiple_of))

    def __repr__(self) -> str:
        return f"PadCollate(pad={self.pad!r}, multiple_of={self.multiple_of})"

    def __call__(self, examples: list[Any]) -> dict[str, Any]:
        if not examples or not all(isinstance(e, dict) for e in examples):
            got = type(examples[0]).__name__ if examples else "an empty batch"
            raise TypeError(f"xf.PadCollate: examples must be dicts of fields, got {got}")
        for name in self.pad:
            if name not in examples[0]:
                raise ValueError(
                    f"xf.PadCollate: an example has no field {name!r} (it has {sorted(examples[0])}); "
                    "name the sequence fields in pad="
                )
        out: dict[str, Any] = {}
        for name, value in self.pad.items():
            seqs = [torch.as_tensor(e[name], dtype=torch.long) for e in examples]
            longest = max(len(s) for s in seqs)
            length = -(-longest // self.multiple_of) * self.multiple_of
            batch = torch.full((len(seqs), length), value, dtype=torch.long)
            for i, s in enumerate(seqs):
                batch[i, : len(s)] = s
            out[name] = batch
        rest = [{k: v for k, v in e.items() if k not in self.pad} for e in examples]
        if rest[0]:
            out.update(torch.utils.data.default_collate(rest))
        return out
