"""Pytree helpers over optree, in the ``"xform"`` namespace.

Every xform value (``TrainState``, ``Mean``) is registered in that namespace, so these
helpers see through them; plain ``optree`` calls need ``namespace="xform"``.

Example:
    >>> import torch, xform as xf
    >>> xf.tree.map(lambda t: t * 2, {"a": torch.ones(2)})["a"].tolist()
    [2.0, 2.0]
"""

from __future__ import annotations

from typing import Any, Callable

import optree

NAMESPACE = "xform"

__all__ = ["NAMESPACE", "map", "leaves", "flatten", "unflatten", "flatten_with_path", "structure"]


def map(fn: Callable[..., Any], tree: Any, *rest: Any) -> Any:  # noqa: A001 - mirrors jax.tree.map
    """Applies ``fn`` to each leaf of ``tree`` (and the matching leaves of ``rest``)."""
    return optree.tree_map(fn, tree, *rest, namespace=NAMESPACE)


def leaves(tree: Any) -> list[Any]:
    """The leaves of ``tree``, in a fixed order."""
    return optree.tree_leaves(tree, namespace=NAMESPACE)


def flatten(tree: Any) -> tuple[list[Any], optree.PyTreeSpec]:
    """``(leaves, treespec)``; ``unflatten(treespec, leaves)`` rebuilds the tree."""
    return optree.tree_flatten(tree, namespace=NAMESPACE)


def unflatten(treespec: optree.PyTreeSpec, leaves: list[Any]) -> Any:
    """Rebuilds a tree from ``flatten``'s treespec and a list of leaves."""
    return optree.tree_unflatten(treespec, leaves)


def structure(tree: Any) -> optree.PyTreeSpec:
    """The treespec of ``tree``."""
    return optree.tree_structure(tree, namespace=NAMESPACE)


def flatten_with_path(tree: Any) -> list[tuple[str, Any]]:
    """``[(path, leaf), ...]`` with paths such as ``"params['fc1.weight']"``."""
    paths, leaves_, _ = optree.tree_flatten_with_path(tree, namespace=NAMESPACE)
    return [(path_str(p), leaf) for p, leaf in zip(paths, leaves_)]


def path_str(path: tuple[Any, ...]) -> str:
    """Renders an optree path as the expression that reaches the leaf from the root:
    ``params['fc1.weight']``, ``opt_state['state']['0.w']['exp_avg']``."""
    out = ""
    for i, key in enumerate(path):
        if i == 0 and isinstance(key, str) and key.isidentifier():
            out = key
        else:
            out += f"[{key!r}]"
    return out
