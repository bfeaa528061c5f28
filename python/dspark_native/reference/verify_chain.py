"""Reference of ``verify_chain``: chain verification with lossless rejection sampling."""

from __future__ import annotations

import torch

from .sampling import (
    RNG_ACCEPT_COIN,
    RNG_SAMPLE,
    draft_distribution,
    first_argmax,
    inverse_cdf,
    per_request_values,
    philox_uniform,
    target_probs,
)

__all__ = ["verify_chain_reference"]


def verify_chain_reference(
    target_logits: torch.Tensor,
    cu_target_rows: torch.Tensor,
    draft_tokens: torch.Tensor,
    *,
    draft_logits: torch.Tensor | None = None,
    draft_probs: torch.Tensor | None = None,
    temperature=0.0,
    top_k=None,
    top_p=None,
    seed=None,
    offset=None,
    max_drafts: int | None = None,
    return_accept_prob: bool = False,
):
    """Reference of :func:`dspark_native.ops.verify_chain` (same arguments, same outputs)."""
    cu = [int(x) for x in cu_target_rows.tolist()]
    R = len(cu) - 1
    V = target_logits.shape[1]

    def per(x, default):
        return per_request_values(x, R, default)

    temps, tks, tps = per(temperature, 0.0), per(top_k, 0), per(top_p, 1.0)
    seeds, offs = per(seed, 0), per(offset, 0)
    if max_drafts is None:
        max_drafts = max([cu[r + 1] - cu[r] - 1 for r in range(R)] + [0])
    kind = "logits" if draft_logits is not None else "probs" if draft_probs is not None else "one_hot"
    draft = draft_logits if draft_logits is not None else draft_probs
    drafts = draft_tokens.tolist()
    tokens = torch.full((R, max_drafts + 1), -1, dtype=torch.int64)
    accepted = torch.zeros(R, dtype=torch.int64)
    accept_prob = torch.zeros(len(drafts) if return_accept_prob else 0, dtype=torch.float32)
    for r in range(R):
        base, l_r = cu[r], cu[r + 1] - cu[r] - 1
        if l_r < 0 or l_r > max_drafts:
            raise ValueError(f"verify_chain_reference: request {r} has {l_r} drafts, expected 0..{max_drafts}")
        dbase = base - r
        t = float(temps[r])
        greedy = not (t > 0)
        k_eff = int(tks[r]) if 0 < int(tks[r]) < V else 0
        p_eff = float(tps[r])
        p_eff = 1.0 if not (p_eff < 1.0) else max(p_eff, 0.0)
        accepting, n_acc = True, 0
        for k in range(l_r + 1):
            need_prob = return_accept_prob and k < l_r
            if not accepting and not need_prob:
                break
            row = target_logits[base + k]
            d = drafts[dbase + k] if k < l_r else -1
            if greedy:
                am = first_argmax(row)
                if need_prob:
                    accept_prob[dbase + k] = 1.0 if (am >= 0 and d == am) else 0.0
                if not accepting:
                    continue
                if am < 0:
                    accepting = False
                elif k < l_r and d == am:
                    tokens[r, k] = d
                    n_acc += 1
                else:
                    tokens[r, k] = am
                    accepting = False
                continue
            p = target_probs(row, t, k_eff, p_eff)
            if p is None:
                if need_prob:
                    accept_prob[dbase + k] = 0.0
                accepting = False
                continue
            if k == l_r:
                tokens[r, k] = inverse_cdf(p, philox_uniform(seeds[r], offs[r], k, RNG_SAMPLE))
                break
            q = draft_distribution(draft[dbase + k] if draft is not None else None, kind, d, V, t)
            if need_prob:
                accept_prob[dbase + k] = float(torch.minimum(p, q).sum())
            if not accepting:
                continue
            in_range = 0 <= d < V
            p_d = p[d].item() if in_range else 0.0
            q_d = q[d].item() if in_range else 0.0
            coin = philox_uniform(seeds[r], offs[r], k, RNG_ACCEPT_COIN)
            if in_range and coin * q_d < p_d:
                tokens[r, k] = d
                n_acc += 1
                continue
            res = torch.clamp(p - q, min=0.0)
            u = philox_uniform(seeds[r], offs[r], k, RNG_SAMPLE)
            tokens[r, k] = inverse_cdf(res if res.sum() > 0 else p, u)
            accepting = False
        accepted[r] = n_acc
    return tokens, accepted, accept_prob
