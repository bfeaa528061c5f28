"""Token-tree helpers for the target's verify forward (pure PyTorch, any device).

Encoding used by :func:`dspark_native.ops.verify_tree`: a request's tree is a list of n nodes with
LOCAL parent indices, ``parents[0] = -1`` (the root: the anchor token) and ``0 <= parents[i] < i``
(parents before children; children are tried in increasing index). A ragged batch concatenates the
trees and gives offsets ``cu_nodes`` [R + 1]. The verify forward then needs, per node:

* its position: ``base_length[r] + depth(i)`` (:func:`tree_positions`);
* the tree attention mask: node i attends to node j of the block iff j is an ancestor of i or i
  itself (:func:`tree_attention_mask`, dense bool), or the same as packed ancestor bit words
  (:func:`tree_ancestor_bits`, int64 words, bit ``j % 64`` of word ``j // 64``), or just the parent
  pointers (the ``parents`` tensor itself, the most compact form);
  the cached prefix (positions < base_length) is visible to every node.

:func:`from_first_child_next_sibling` converts the first-child / next-sibling encoding used by
other engines. All functions are vectorised (no host loop) except that converter and
:func:`validate_tree`, which run on the host.
"""

from __future__ import annotations

import torch

__all__ = [
    "global_parents",
    "tree_depths",
    "tree_positions",
    "tree_attention_mask",
    "tree_ancestor_bits",
    "from_first_child_next_sibling",
    "validate_tree",
]


def global_parents(cu_nodes: torch.Tensor, parents: torch.Tensor) -> torch.Tensor:
    """[N] int64 parent as a GLOBAL node index (roots point to themselves)."""
    N = parents.numel()
    req = torch.repeat_interleave(
        torch.arange(cu_nodes.numel() - 1, device=parents.device), (cu_nodes[1:] - cu_nodes[:-1]), output_size=N
    )
    start = cu_nodes[:-1][req]
    me = torch.arange(N, device=parents.device)
    return torch.where(parents >= 0, parents + start, me)


def tree_depths(parents: torch.Tensor, cu_nodes: torch.Tensor | None = None) -> torch.Tensor:
    """[N] int64 depth of each node (root 0), by pointer jumping (log2(max depth) gathers).

    ``parents`` is one tree's [n] local parents, or a ragged batch with ``cu_nodes``."""
    if cu_nodes is None:
        cu_nodes = torch.tensor([0, parents.numel()], device=parents.device)
    anc = global_parents(cu_nodes, parents)
    depth = (parents >= 0).long()
    n = max(parents.numel(), 1)
    for _ in range(max(1, (n - 1).bit_length())):
        depth = depth + torch.where(anc != torch.arange(anc.numel(), device=anc.device), depth[anc], 0)
        anc = anc[anc]
    return depth


def tree_positions(cu_nodes: torch.Tensor, parents: torch.Tensor, base_lengths: torch.Tensor) -> torch.Tensor:
    """[N] int64 position ids of the verify forward: ``base_lengths[r] + depth`` (base_lengths [R]
    is the cached length of each request, i.e. the root's position)."""
    req = torch.repeat_interleave(
        torch.arange(cu_nodes.numel() - 1, device=parents.device),
        (cu_nodes[1:] - cu_nodes[:-1]),
        output_size=parents.numel(),
    )
    return base_lengths.to(torch.int64)[req] + tree_depths(parents, cu_nodes)


def tree_attention_mask(parents: torch.Tensor, cu_nodes: torch.Tensor | None = None) -> torch.Tensor:
    """Dense bool [N, N]: ``mask[i, j]`` iff node j is an ancestor of node i or i itself (block
    diagonal for a ragged batch). Built by doubling: log2(depth) gathers of [N, N]."""
    if cu_nodes is None:
        cu_nodes = torch.tensor([0, parents.numel()], device=parents.device)
    N = parents.numel()
    anc = global_parents(cu_nodes, parents)
    eye = torch.eye(N, dtype=torch.bool, device=parents.device)
    mask = eye | eye[anc]  # self and parent
    # after step s, mask holds ancestors up to distance 2^(s+1) - 1; anc jumps 2^s
    jump = anc
    for _ in range(max(1, (max(N, 1) - 1).bit_length())):
        jump = jump[jump]
        mask = mask | mask[jump]  # ancestors of the ancestor 2^(s+1) up
    return mask


def tree_ancestor_bits(parents: torch.Tensor, cu_nodes: torch.Tensor | None = None, local: bool = True) -> torch.Tensor:
    """Packed form of :func:`tree_attention_mask`: int64 [N, ceil(W / 64)] words, bit ``j % 64`` of
    word ``j // 64`` set iff node j (a LOCAL index within the node's request when ``local``, so
    W = the largest tree; else global, W = N) is an ancestor-or-self."""
    if cu_nodes is None:
        cu_nodes = torch.tensor([0, parents.numel()], device=parents.device)
    mask = tree_attention_mask(parents, cu_nodes)
    N = parents.numel()
    if local and N > 0:
        sizes = cu_nodes[1:] - cu_nodes[:-1]
        Wd = int(sizes.max().item())
        req = torch.repeat_interleave(torch.arange(sizes.numel(), device=parents.device), sizes, output_size=N)
        start = cu_nodes[:-1][req]
        cols = start[:, None] + torch.arange(Wd, device=parents.device)[None, :]
        valid = cols < cu_nodes[1:][req][:, None]
        mask = torch.gather(mask, 1, cols.clamp(max=max(N - 1, 0))) & valid
    Wd = mask.shape[1]
    words = (Wd + 63) // 64
    pad = torch.zeros(N, words * 64, dtype=torch.bool, device=parents.device)
    pad[:, :Wd] = mask
    bits = pad.view(N, words, 64).long() << torch.arange(64, device=parents.device)
    return bits.sum(-1)  # int64 wrap-around sets bit 63 as the sign bit, as intended


def from_first_child_next_sibling(first_child, next_sibling, root: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Convert a first-child / next-sibling tree (``first_child[i]``, ``next_sibling[i]``: node ids,
    -1 = none) to this package's encoding. Nodes are renumbered in depth-first preorder (children
    keep their sibling order), which puts every parent before its children.

    Returns ``(parents [n] int64, order [n] int64)`` with ``order[new] = old`` node id (so
    ``tokens_new = tokens_old[order]``). Raises ValueError on a cycle, a shared node or an id out of
    range. Runs on the host."""
    fc = [int(x) for x in torch.as_tensor(first_child).tolist()]
    ns = [int(x) for x in torch.as_tensor(next_sibling).tolist()]
    n = len(fc)
    if len(ns) != n or not 0 <= root < max(n, 1):
        raise ValueError(
            "from_first_child_next_sibling: first_child and next_sibling must have the same length n and root < n"
        )
    new_id = [-1] * n
    parents, order = [], []
    stack = [(root, -1)]
    while stack:
        old, par_new = stack.pop()
        if not 0 <= old < n:
            raise ValueError(f"from_first_child_next_sibling: node id {old} out of range [0, {n})")
        if new_id[old] >= 0:
            raise ValueError(f"from_first_child_next_sibling: node {old} reached twice (cycle or shared child)")
        new_id[old] = len(order)
        order.append(old)
        parents.append(par_new)
        kids = []
        c = fc[old]
        while c != -1:
            if not 0 <= c < n:
                raise ValueError(f"from_first_child_next_sibling: node id {c} out of range [0, {n})")
            kids.append(c)
            if len(kids) > n:
                raise ValueError("from_first_child_next_sibling: sibling list has a cycle")
            c = ns[c]
        for c in reversed(kids):
            stack.append((c, new_id[old]))
    return torch.tensor(parents, dtype=torch.int64), torch.tensor(order, dtype=torch.int64)


def validate_tree(parents: torch.Tensor, max_nodes: int | None = None) -> None:
    """Raise ValueError unless ``parents`` [n] is a valid tree in this package's encoding."""
    par = [int(x) for x in parents.tolist()]
    if not par:
        raise ValueError("validate_tree: a tree needs at least the root")
    if max_nodes is not None and len(par) > max_nodes:
        raise ValueError(f"validate_tree: {len(par)} nodes > max_nodes = {max_nodes}")
    for i, p in enumerate(par):
        if (i == 0 and p != -1) or (i > 0 and not 0 <= p < i):
            raise ValueError(f"validate_tree: parents[{i}] = {p} (root must be -1, others 0 <= parent < index)")
