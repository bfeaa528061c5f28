"""Reference of ``verify_tree``: token-tree verification (greedy / lossless multi-draft sampling
with one-hot drafts). Mirrors csrc/include/dspark/verify_tree.h line by line."""

from __future__ import annotations

import torch

from .sampling import first_argmax, inverse_cdf, per_request_values, philox_uniform, target_probs

__all__ = ["verify_tree_reference", "RNG_TREE_COIN", "RNG_TREE_SAMPLE"]

RNG_TREE_COIN, RNG_TREE_SAMPLE = 16, 17


def _check_tree(r: int, par: list, max_depth: int) -> None:
    depth = [0] * len(par)
    for i, p in enumerate(par):
        ok = (p == -1) if i == 0 else (0 <= p < i)
        if not ok:
            raise ValueError(
                f"verify_tree: parents of request {r}, node {i} is {p}; expected "
                + ("-1 for the root" if i == 0 else "0 <= parent < node index (no cycles)")
            )
        if i > 0:
            depth[i] = depth[p] + 1
            if depth[i] > max_depth:
                raise ValueError(
                    f"verify_tree: parents of request {r} make node {i} deeper than max_depth = {max_depth}"
                )


def verify_tree_reference(
    target_logits: torch.Tensor,
    cu_nodes: torch.Tensor,
    parents: torch.Tensor,
    tokens: torch.Tensor,
    *,
    temperature=0.0,
    top_k=None,
    top_p=None,
    seed=None,
    offset=None,
    max_nodes: int | None = None,
    max_depth: int | None = None,
):
    """Reference of :func:`dspark_native.ops.verify_tree` (same arguments; returns
    (path, num_accepted, tokens))."""
    cu = [int(x) for x in cu_nodes.tolist()]
    R = len(cu) - 1
    V = target_logits.shape[1]

    def per(x, default):
        return per_request_values(x, R, default)

    temps, tks, tps = per(temperature, 0.0), per(top_k, 0), per(top_p, 1.0)
    seeds, offs = per(seed, 0), per(offset, 0)
    if max_nodes is None:
        max_nodes = max([cu[r + 1] - cu[r] for r in range(R)] + [1])
    if max_depth is None:
        max_depth = max_nodes - 1
    W = max_depth + 1
    par_all, tok_all = parents.tolist(), tokens.tolist()
    if R > 0 and cu[0] != 0:
        raise ValueError("verify_tree: cu_nodes[0] must be 0")
    for r in range(R):
        n = cu[r + 1] - cu[r]
        if not 1 <= n <= max_nodes:
            raise ValueError(f"verify_tree: request {r} has {n} nodes (cu_nodes), expected 1..{max_nodes} (max_nodes)")
        _check_tree(r, par_all[cu[r] : cu[r + 1]], max_depth)
    out_path = torch.full((R, W), -1, dtype=torch.int64)
    out_tok = torch.full((R, W), -1, dtype=torch.int64)
    out_acc = torch.zeros(R, dtype=torch.int64)
    for r in range(R):
        base, n = cu[r], cu[r + 1] - cu[r]
        par, tok = par_all[base : base + n], tok_all[base : base + n]
        children = [[] for _ in range(n)]
        for i in range(1, n):
            children[par[i]].append(i)  # increasing index order
        t = float(temps[r])
        greedy = not (t > 0)
        k_eff = int(tks[r]) if 0 < int(tks[r]) < V else 0
        p_eff = float(tps[r])
        p_eff = 1.0 if not (p_eff < 1.0) else max(p_eff, 0.0)
        x, k = 0, 0
        out_path[r, 0] = 0
        while True:
            row = target_logits[base + x]
            if greedy:
                am = first_argmax(row)
                if am < 0:
                    break
                nxt = next((c for c in children[x] if tok[c] == am), -1)
                out_tok[r, k] = am
                if nxt < 0:
                    break
                x, k = nxt, k + 1
                out_path[r, k] = x
                continue
            p = target_probs(row, t, k_eff, p_eff)
            if p is None:
                break
            masked = p.clone()
            removed = set()
            rem = 1.0
            nxt = -1
            for c in children[x]:
                d = tok[c]
                if not 0 <= d < V or d in removed:
                    continue
                w = p[d].item()
                coin = philox_uniform(seeds[r], offs[r], c, RNG_TREE_COIN)
                if w > 0 and coin * rem < w:
                    nxt = c
                    break
                removed.add(d)
                rem -= w
                masked[d] = 0.0
            if nxt >= 0:
                out_tok[r, k] = tok[nxt]
                x, k = nxt, k + 1
                out_path[r, k] = x
                continue
            u = philox_uniform(seeds[r], offs[r], x, RNG_TREE_SAMPLE)
            use_masked = bool(removed) and rem > 0 and bool((masked > 0).any())
            out_tok[r, k] = inverse_cdf(masked if use_masked else p, u)
            break
        out_acc[r] = k
    return out_path, out_acc, out_tok
