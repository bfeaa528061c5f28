"""``dspark_draft``: typed wrapper and fake kernel (schema and kernels: csrc/torch/dspark_draft.cpp,
csrc/core/{cpu,cuda}/dspark_draft.*; contract: csrc/include/dspark/dspark_draft.h)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import torch

from .._native import load_library
from ._util import Number, per_request, register_fake_if_built

load_library()

__all__ = ["DSparkDraftOutput", "dspark_draft", "HEAD_TYPES"]

HEAD_TYPES = {"vanilla": 0, "gated": 1, "rnn": 2}


class DSparkDraftOutput(NamedTuple):
    tokens: torch.Tensor  #: [R, g] int64 drafts d_k (-1: no distribution, see the C header)
    logits: torch.Tensor  #: [R, g, V] float32 z_k = U_k + bias, exactly what the sampler used (q)
    confidence: torch.Tensor  #: [R, g] float32 c_k (empty [0] without a confidence head)


def _head_code(head_type) -> int:
    if isinstance(head_type, str):
        if head_type not in HEAD_TYPES:
            raise ValueError(f"dspark_draft: head_type must be one of {sorted(HEAD_TYPES)}, got {head_type!r}")
        return HEAD_TYPES[head_type]
    if head_type not in (0, 1, 2):
        raise ValueError(f"dspark_draft: head_type must be 0, 1, 2 or a name, got {head_type!r}")
    return int(head_type)


def dspark_draft(
    base_logits: torch.Tensor,
    anchor_tokens: torch.Tensor,
    markov_w1: torch.Tensor,
    markov_w2: torch.Tensor,
    *,
    hidden: torch.Tensor | None = None,
    head_type: str | int = "vanilla",
    gate_weight: torch.Tensor | None = None,
    gate_bias: torch.Tensor | None = None,
    joint_weight: torch.Tensor | None = None,
    joint_bias: torch.Tensor | None = None,
    conf_weight: torch.Tensor | None = None,
    conf_bias: torch.Tensor | None = None,
    sts_temperature: Sequence[float] | torch.Tensor | None = None,
    temperature: Number | torch.Tensor = 0.0,
    seed: int | torch.Tensor | None = None,
    offset: int | torch.Tensor | None = None,
    draft_to_target: torch.Tensor | None = None,
) -> DSparkDraftOutput:
    """DSpark sequential stage (Markov head) + confidence head for a batch, fused.

    For every request, left to right over the g positions: ``z_k = U_k + bias(prev_k)``,
    ``d_k = argmax z_k`` (temperature 0) or ``d_k ~ softmax(z_k / T)`` (Philox inverse-CDF draw,
    purpose ``RNG_DRAFT_SAMPLE``, position k), ``c_k = sigmoid((w . [h_k ; W1[prev_k]] + b) / T_k)``,
    ``prev_0 = anchor``, ``prev_{k+1} = d_k``. All math in fp32.

    Args:
        base_logits: [R, g, V] float32/float16/bfloat16 backbone logits U.
        anchor_tokens: [R] int64 last committed token of each request, in [0, V).
        markov_w1: [V, r] embedding table W1 (DeepSpec ``markov_head.markov_w1.weight``).
        markov_w2: [V, r] W2 (``markov_head.markov_w2.weight``; bias b_v = W2[v] . x). Every weight
            below must have markov_w2's dtype.
        hidden: [R, g, d] backbone hidden states h (any float dtype); needed by the gated and rnn
            heads and the confidence head.
        head_type: "vanilla" | "gated" | "rnn" (or 0 / 1 / 2).
        gate_weight, gate_bias: [r, d + r], [r] gated head G on [h_k ; W1[prev]].
        joint_weight, joint_bias: [3r, 2r + d], [3r] rnn head J on [s ; W1[prev] ; h_k], rows split
            into gate | candidate | output.
        conf_weight, conf_bias: [1, d + r] (or [1, d] for a head without the Markov feature), [1].
            None: no confidences (``confidence`` is empty).
        sts_temperature: [g] per-position STS temperatures (> 0), None = 1.
        temperature: scalar or [R] float32, 0 = greedy, > 0 sampled; negative/NaN is an error on CPU.
        seed, offset: scalar or [R] int64 Philox key / counter offset (default 0).
        draft_to_target: [V] int64, the target token of each of the V draft columns (a draft
            vocabulary; distinct entries in [0, V_target)). Then ``markov_w1`` is [V_target, r],
            anchors are target tokens, and ``tokens`` are target ids while ``logits`` stay over
            the V draft columns (zero probability elsewhere). None: full vocabulary.

    Returns:
        DSparkDraftOutput(tokens [R, g] int64, logits [R, g, V] float32, confidence [R, g] float32).
        Pass ``draft_logits=logits`` (rows of the verified prefix) with the same temperature to
        :func:`dspark_native.ops.verify_chain`.
    """
    if not isinstance(base_logits, torch.Tensor) or base_logits.dim() != 3:
        raise ValueError("dspark_draft: base_logits must be a 3-D tensor [R, g, V]")
    dev = base_logits.device
    R = base_logits.shape[0]
    if isinstance(temperature, (int, float)) and not (temperature >= 0):
        raise ValueError(f"dspark_draft: temperature must be >= 0 (0 = greedy), got {temperature}")
    temp = per_request(temperature, R, torch.float32, dev, "temperature")
    sts = None
    if sts_temperature is not None:
        if not isinstance(sts_temperature, torch.Tensor):
            vals = [float(x) for x in sts_temperature]
            bad = [t for t in vals if not (t > 0) or math.isinf(t)]
            if bad:
                raise ValueError(f"dspark_draft: sts_temperature must be positive finite, got {vals}")
            sts_temperature = torch.tensor(vals, dtype=torch.float32)
        sts = sts_temperature.to(device=dev, dtype=torch.float32)
    if (seed is None) != (offset is None):
        seed = 0 if seed is None else seed
        offset = 0 if offset is None else offset
    sd = per_request(seed, R, torch.int64, dev, "seed")
    of = per_request(offset, R, torch.int64, dev, "offset")
    if isinstance(anchor_tokens, int):
        anchor_tokens = torch.full((R,), anchor_tokens, dtype=torch.int64, device=dev)
    out = torch.ops.dspark.dspark_draft(
        base_logits,
        hidden,
        anchor_tokens,
        markov_w1,
        markov_w2,
        gate_weight,
        gate_bias,
        joint_weight,
        joint_bias,
        conf_weight,
        conf_bias,
        sts,
        temp,
        sd,
        of,
        _head_code(head_type),
        draft_to_target,
    )
    return DSparkDraftOutput(*out)


@register_fake_if_built("dspark_draft")
def _dspark_draft_fake(
    base_logits,
    hidden,
    anchor_tokens,
    markov_w1,
    markov_w2,
    gate_weight,
    gate_bias,
    joint_weight,
    joint_bias,
    conf_weight,
    conf_bias,
    sts_temperature,
    temperature,
    seed,
    offset,
    head_type,
    draft_to_target=None,
):
    R, g, V = base_logits.shape
    dev = base_logits.device
    tokens = torch.empty((R, g), dtype=torch.int64, device=dev)
    logits = torch.empty((R, g, V), dtype=torch.float32, device=dev)
    conf = torch.empty((R, g) if conf_weight is not None else (0,), dtype=torch.float32, device=dev)
    return tokens, logits, conf
