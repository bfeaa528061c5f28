"""Statistical helpers for the sampling tests (no scipy dependency).

Every statistical test in this suite draws with fixed seeds and checks a chi-square goodness of fit
at a stated per-test false-alarm rate ALPHA = 1e-3: a correct sampler fails a given test with
probability 1e-3 over seeds, and since seeds are fixed the outcome is reproducible.
"""

from __future__ import annotations

import math

import torch

ALPHA = 1e-3
_Z = {1e-3: 3.090232306167813, 1e-4: 3.719016485455709}


def chi2_critical(dof: int, alpha: float = ALPHA) -> float:
    """Upper alpha quantile of chi-square(dof), Wilson-Hilferty approximation (rel. error < 1% for dof >= 1)."""
    z = _Z[alpha]
    k = float(dof)
    return k * (1.0 - 2.0 / (9.0 * k) + z * math.sqrt(2.0 / (9.0 * k))) ** 3


def chi2_gof(counts: torch.Tensor, probs: torch.Tensor, min_expected: float = 5.0):
    """Chi-square goodness of fit of observed `counts` [K] to `probs` [K].

    Cells with expected count below `min_expected` are pooled into one cell. An observation in a
    cell of probability 0 is an immediate failure (returned as an infinite statistic).
    Returns (statistic, critical value at ALPHA, dof).
    """
    counts = counts.double().flatten()
    probs = probs.double().flatten()
    n = counts.sum().item()
    if bool(((probs <= 0) & (counts > 0)).any()):
        return math.inf, 0.0, 1
    expected = probs * n
    big = expected >= min_expected
    obs_cells = list(counts[big].tolist())
    exp_cells = list(expected[big].tolist())
    small_exp = expected[~big].sum().item()
    if small_exp > 0:
        obs_cells.append(counts[~big].sum().item())
        exp_cells.append(small_exp)
    if len(obs_cells) < 2:
        return 0.0, math.inf, 0
    stat = sum((o - e) ** 2 / e for o, e in zip(obs_cells, exp_cells, strict=True) if e > 0)
    dof = len(obs_cells) - 1
    return stat, chi2_critical(dof), dof


def assert_matches_distribution(samples: torch.Tensor, probs: torch.Tensor, what: str = "") -> None:
    """Chi-square test (false-alarm rate ALPHA) that integer `samples` follow `probs` [K]."""
    counts = torch.bincount(samples.flatten().long(), minlength=probs.numel()).double()
    assert counts.numel() == probs.numel(), f"{what}: sample values outside 0..{probs.numel() - 1}"
    stat, crit, dof = chi2_gof(counts, probs)
    assert stat <= crit, (
        f"{what}: chi2 = {stat:.2f} > {crit:.2f} (dof {dof}, alpha {ALPHA}); counts "
        f"{counts.tolist()} expected {(probs * counts.sum()).tolist()}"
    )
