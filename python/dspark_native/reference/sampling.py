"""Reference sampling conventions shared by every op: the Philox4x32-10 counter generator, the
target distribution of a logit row (temperature, NaN, +inf, top-k/top-p tie rules), draft
distributions and the inverse-CDF draw. Mirrors csrc/include/dspark/detail/{philox,sampling}.h.
"""

from __future__ import annotations

import math

import torch

__all__ = [
    "philox4x32_10",
    "philox_uniform",
    "RNG_ACCEPT_COIN",
    "RNG_SAMPLE",
    "RNG_DRAFT_SAMPLE",
    "target_probs",
    "draft_distribution",
    "inverse_cdf",
    "first_argmax",
    "per_request_values",
]

RNG_ACCEPT_COIN, RNG_SAMPLE, RNG_DRAFT_SAMPLE = 0, 1, 2
_M32 = 0xFFFFFFFF


def philox4x32_10(counter: tuple[int, int, int, int], key: tuple[int, int]) -> tuple[int, int, int, int]:
    """Philox4x32-10 block (Salmon et al. 2011) on Python ints."""
    c0, c1, c2, c3 = (x & _M32 for x in counter)
    k0, k1 = (x & _M32 for x in key)
    for _ in range(10):
        p0 = 0xD2511F53 * c0
        p1 = 0xCD9E8D57 * c2
        c0, c1, c2, c3 = ((p1 >> 32) ^ c1 ^ k0) & _M32, p1 & _M32, ((p0 >> 32) ^ c3 ^ k1) & _M32, p0 & _M32
        k0 = (k0 + 0x9E3779B9) & _M32
        k1 = (k1 + 0xBB67AE85) & _M32
    return c0, c1, c2, c3


def philox_uniform(seed: int, offset: int, position: int, purpose: int) -> float:
    """Uniform in [0, 1) with 53 bits, exactly as ``detail::philox_uniform`` in the C++ core."""
    s, o = seed & 0xFFFFFFFFFFFFFFFF, offset & 0xFFFFFFFFFFFFFFFF
    r = philox4x32_10((o & _M32, o >> 32, position, purpose), (s & _M32, s >> 32))
    bits = ((r[0] >> 5) << 26) | (r[1] >> 6)
    return bits / 9007199254740992.0


def _scaled(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    s = logits.float() * torch.tensor(1.0 / temperature, dtype=torch.float32)
    return torch.where(torch.isnan(s), torch.full_like(s, -math.inf), s)


def _threshold(s: torch.Tensor, top_k: int, top_p: float) -> float:
    """Scaled-logit threshold of top-k then top-p (ties at the boundary kept)."""
    V = s.numel()
    thr = -math.inf
    if 0 < top_k < V:
        thr = torch.topk(s, top_k).values[-1].item()
    if top_p < 1.0:
        kept = s[s >= thr]
        if kept.numel() == 0 or not (kept.max() > -math.inf):
            return thr
        vals = torch.sort(kept, descending=True).values
        w = _weights(vals, vals[0].item()).double()
        cum = torch.cumsum(w, 0)
        need = max(top_p, 0.0) * cum[-1].item()
        idx = int(torch.searchsorted(cum, torch.tensor([need], dtype=torch.float64)).item())
        idx = min(idx, vals.numel() - 1)
        thr = max(thr, vals[idx].item())
    return thr


def _weights(s: torch.Tensor, m: float) -> torch.Tensor:
    if m == math.inf:
        return (s == math.inf).float()
    return torch.exp(s - m)


def target_probs(logits: torch.Tensor, temperature: float, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor | None:
    """The target distribution of one row [V] after temperature, top-k and top-p (float64), or
    None if the row has no finite logit."""
    s = _scaled(logits, temperature)
    thr = _threshold(s, top_k, top_p)
    kept = s >= thr
    if not bool(kept.any()):
        return None
    m = s[kept].max().item()
    if m == -math.inf:
        return None
    w = torch.where(kept, _weights(s, m), torch.zeros_like(s)).double()
    total = w.sum()
    if not total > 0:
        return None
    return w / total


def draft_distribution(row: torch.Tensor | None, kind: str, token: int, V: int, temperature: float) -> torch.Tensor:
    if kind == "one_hot":
        q = torch.zeros(V, dtype=torch.float64)
        if 0 <= token < V:
            q[token] = 1.0
        return q
    if kind == "logits":
        q = target_probs(row, temperature)
        return torch.zeros(V, dtype=torch.float64) if q is None else q
    x = row.double()
    return torch.where(x > 0, x, torch.zeros_like(x))  # NaN and negatives count as 0


def inverse_cdf(w: torch.Tensor, u: float) -> int:
    """First index whose cumulative weight exceeds u * sum (float64, index order)."""
    cum = torch.cumsum(w, 0)
    total = cum[-1].item()
    idx = int(torch.searchsorted(cum, torch.tensor([u * total], dtype=torch.float64), right=True).item())
    positive = torch.nonzero(w > 0)
    if idx >= w.numel():
        return int(positive[-1].item())
    return idx


def first_argmax(row: torch.Tensor) -> int:
    x = row.float()
    x = torch.where(torch.isnan(x), torch.full_like(x, -math.inf), x)
    if not bool((x > -math.inf).any()):
        return -1
    return int(torch.argmax(x).item())  # torch.argmax returns the first maximal index


def per_request_values(x, n: int, default) -> list:
    """A per-request argument (None, a Python scalar, a 0-d or [n] tensor) as a list of n values."""
    if x is None:
        return [default] * n
    if isinstance(x, torch.Tensor):
        return x.expand(n).tolist() if x.dim() == 0 else x.tolist()
    return [x] * n
