"""Drafter training losses (DSPARK.md, Training).

Shapes: N rows = (sequence, anchor, block position) flattened; g block positions; V vocabulary;
K stored target top-k. ``position`` int64 [N] is the block position k of each row (0-based),
``valid`` bool [N] masks rows whose label lies past the end of the sequence or padding.

Every term is a position-weighted mean: w_k = exp(-k / 4), normalised by the summed weight of
the valid rows, so a batch with fewer valid rows is not down-weighted.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

CE_WEIGHT, L1_WEIGHT, CONF_WEIGHT = 0.1, 0.9, 1.0


def position_weights(position: torch.Tensor, decay: float = 4.0) -> torch.Tensor:
    """w_k = exp(-k / decay): int64 [N] -> fp32 [N]."""
    return torch.exp(-position.float() / decay)


def _wmean(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return (x * w).sum() / w.sum().clamp_min(1e-12)


def l1_to_target(q: torch.Tensor, topk_ids: torch.Tensor, topk_probs: torch.Tensor) -> torch.Tensor:
    """sum_v |q_v - p_v| against a target stored as its top-K (the rest is one residual mass).

    q fp32 [N, V] draft probabilities; topk_ids int64 [N, K]; topk_probs [N, K] -> fp32 [N].
    Outside the top-K the target's mass is known only in total, so that part contributes
    |q_rest - p_rest| (exact when K = V or the target has no mass outside its top-K; a lower
    bound otherwise, off by at most 2 * p_rest).
    """
    p = topk_probs.float()
    # an id of -1 is a token the drafter cannot propose (outside a draft vocabulary): q = 0 there
    qk = q.gather(-1, topk_ids.clamp_min(0)) * (topk_ids >= 0)
    q_rest = (1.0 - qk.sum(-1)).clamp_min(0.0)
    p_rest = (1.0 - p.sum(-1)).clamp_min(0.0)
    return (qk - p).abs().sum(-1) + (q_rest - p_rest).abs()


def dspark_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    position: torch.Tensor,
    valid: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_probs: torch.Tensor,
    conf_logit: torch.Tensor | None = None,
    ce_weight: float = CE_WEIGHT,
    l1_weight: float = L1_WEIGHT,
    conf_weight: float = CONF_WEIGHT,
) -> tuple[torch.Tensor, dict[str, float]]:
    """DSpark loss: 0.1 CE(z, label) + 0.9 L1(softmax z, target) + 1.0 BCE(conf, c*).

    logits fp32 [N, V] corrected logits z = U + B(prev); labels int64 [N] (-1: no CE term, e.g.
    a token outside the draft vocabulary); conf_logit fp32 [N]
    (None: no confidence term). c* = clamp(1 - L1 / 2, 0, 1) = sum_v min(p, q), the
    acceptance probability of the draft at this position, detached. Returns the scalar loss
    and the per-term (unweighted-by-coefficient) values for logging.
    """
    w = position_weights(position) * valid.float()
    wc = w * (labels >= 0)  # a label outside a draft vocabulary has no CE term
    # One log-softmax serves CE and q (a separate softmax and its backward cost twice as much).
    logq = torch.log_softmax(logits, -1)
    ce = -logq.gather(-1, labels.clamp_min(0)[:, None]).squeeze(-1)
    q = logq.exp()
    l1 = l1_to_target(q, topk_ids, topk_probs)
    loss = ce_weight * _wmean(ce, wc) + l1_weight * _wmean(l1, w)
    out = dict(ce=float(_wmean(ce.detach(), wc)), l1=float(_wmean(l1.detach(), w)))
    if conf_logit is not None:
        target = (1.0 - l1.detach() / 2).clamp(0.0, 1.0)
        bce = F.binary_cross_entropy_with_logits(conf_logit.float(), target, reduction="none")
        loss = loss + conf_weight * _wmean(bce, w)
        out["bce"] = float(_wmean(bce.detach(), w))
    out["loss"] = float(loss.detach())
    return loss, out


def ce_loss(
    logits: torch.Tensor, labels: torch.Tensor, position: torch.Tensor, valid: torch.Tensor
) -> tuple[torch.Tensor, dict[str, float]]:
    """Position-weighted cross entropy only (DFlash and EAGLE-3): fp32 [N, V], int64 [N] x3."""
    w = position_weights(position) * valid.float() * (labels >= 0)
    ce = _wmean(F.cross_entropy(logits, labels.clamp_min(0), reduction="none"), w)
    return ce, dict(ce=float(ce.detach()), loss=float(ce.detach()))


def cosine_lr(step: int, total: int, peak: float, warmup_frac: float = 0.04, floor: float = 0.0) -> float:
    """Linear warm-up over ``warmup_frac`` of the steps, then cosine decay from ``peak`` to
    ``floor`` at ``total``."""
    warm = max(1, int(round(total * warmup_frac)))
    if step < warm:
        return peak * (step + 1) / warm
    t = min(1.0, (step - warm) / max(1, total - warm))
    return floor + 0.5 * (peak - floor) * (1 + math.cos(math.pi * t))
