"""Reference of ``dspark_draft``: the DSpark sequential stage and confidence head, one request and
one position at a time (the executable form of csrc/include/dspark/dspark_draft.h)."""

from __future__ import annotations

import math

import torch

from .sampling import RNG_DRAFT_SAMPLE, first_argmax, inverse_cdf, per_request_values, philox_uniform, target_probs

__all__ = ["dspark_draft_reference"]

_HEADS = {"vanilla": 0, "gated": 1, "rnn": 2}


def dspark_draft_reference(
    base_logits: torch.Tensor,
    anchor_tokens: torch.Tensor,
    markov_w1: torch.Tensor,
    markov_w2: torch.Tensor,
    *,
    hidden: torch.Tensor | None = None,
    head_type="vanilla",
    gate_weight=None,
    gate_bias=None,
    joint_weight=None,
    joint_bias=None,
    conf_weight=None,
    conf_bias=None,
    sts_temperature=None,
    temperature=0.0,
    seed=None,
    offset=None,
    draft_to_target=None,
):
    """Reference of :func:`dspark_native.ops.dspark_draft` (same arguments, same outputs:
    tokens [R, g] int64 (target token ids), logits [R, g, V] float32 over the V draft columns,
    confidence [R, g] float32 or empty)."""
    head = _HEADS[head_type] if isinstance(head_type, str) else int(head_type)
    R, g, V = base_logits.shape
    rank = markov_w1.shape[1]
    d2t = None
    v_anchor = V
    if draft_to_target is not None:
        d2t = [int(t) for t in draft_to_target.tolist()]
        v_anchor = markov_w1.shape[0]
        if len(d2t) != V:
            raise ValueError(f"dspark_draft_reference: draft_to_target must have {V} entries, got {len(d2t)}")
        bad = [t for t in d2t if not 0 <= t < v_anchor]
        if bad or len(set(d2t)) != V:
            raise ValueError("dspark_draft_reference: draft_to_target must hold distinct tokens in [0, V_target)")

    def per(x, default):
        return per_request_values(x, R, default)

    temps, seeds, offs = per(temperature, 0.0), per(seed, 0), per(offset, 0)
    anchors = anchor_tokens.tolist() if isinstance(anchor_tokens, torch.Tensor) else [int(anchor_tokens)] * R
    for r, a in enumerate(anchors):
        if not 0 <= a < v_anchor:
            raise ValueError(f"dspark_draft_reference: anchor_tokens[{r}] = {a} is outside [0, {v_anchor})")
        if not temps[r] >= 0:
            raise ValueError(f"dspark_draft_reference: temperature[{r}] = {temps[r]} must be >= 0")
    sts = [1.0] * g if sts_temperature is None else [float(t) for t in torch.as_tensor(sts_temperature).tolist()]
    for t in sts:
        if not (t > 0) or math.isinf(t):
            raise ValueError(f"dspark_draft_reference: sts_temperature must be positive finite, got {sts}")
    w1, w2 = markov_w1.float(), markov_w2.float()
    cw = None if conf_weight is None else conf_weight.float().reshape(-1)
    cb = None if conf_bias is None else conf_bias.float().reshape(-1)[0]
    tokens = torch.full((R, g), -1, dtype=torch.int64)
    logits = torch.full((R, g, V), -math.inf, dtype=torch.float32)
    conf = torch.zeros((R, g) if cw is not None else (0,), dtype=torch.float32)
    for r in range(R):
        prev = anchors[r]
        state = torch.zeros(rank)
        t = float(temps[r])
        for k in range(g):
            e = w1[prev]
            h = hidden[r, k].float() if hidden is not None else None
            if cw is not None:
                x = torch.cat([h, e]) if cw.numel() == h.numel() + rank else h
                logit = torch.dot(cw, x) + cb
                conf[r, k] = torch.sigmoid(logit / sts[k])
            if head == 0:
                v = e
            elif head == 1:
                gate = torch.sigmoid(gate_weight.float() @ torch.cat([h, e]) + gate_bias.float())
                v = gate * e
            else:
                gco = joint_weight.float() @ torch.cat([state, e, h]) + joint_bias.float()
                gt, c, o = gco[:rank], gco[rank : 2 * rank], gco[2 * rank :]
                gt = torch.sigmoid(gt)
                state = gt * state + (1 - gt) * torch.tanh(c)
                v = torch.tanh(o)
            z = base_logits[r, k].float() + w2 @ v
            logits[r, k] = z
            if not t > 0:
                d = first_argmax(z)
            else:
                p = target_probs(z, t)
                if p is None:
                    d = -1
                else:
                    u = philox_uniform(int(seeds[r]), int(offs[r]), k, RNG_DRAFT_SAMPLE)
                    d = inverse_cdf(p, u)
            if d >= 0 and d2t is not None:
                d = d2t[d]
            tokens[r, k] = d
            if d < 0:
                break  # later positions: token -1, confidence 0, logits -inf
            prev = d
    return tokens, logits, conf
