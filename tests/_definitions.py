"""The divergences written from their definitions (DESIGN.md's table, TRL's JSD endpoints), in float64 with
autograd: the tests' oracle, sharing no code with the package."""

import math

import torch

NEG_INF = float("-inf")


def reduce_rows(rows, active, reduction, normalizer):
    """``rows [N]`` float64 (0 at ignored rows) reduced as documented: mean over counted rows (1 if none)."""
    if reduction == "none":
        return rows
    if reduction == "sum":
        return rows.sum()
    if normalizer is not None:
        return rows.sum() / normalizer
    count = rows.numel() if active is None else int(active.sum())
    return rows.sum() / max(count, 1)


def kl_rows(log_a, log_b):
    """KL(a || b) per row from log-probabilities, a term being 0 where a = 0 in float64 (log a = -inf, or a finite
    -1e4 padding logit: the design's rule); no NaN in value or gradient there."""
    support = log_a.exp() > 0
    safe_a = torch.where(support, log_a, 0.0)
    safe_b = torch.where(support, log_b, 0.0)
    return torch.where(support, safe_a.exp() * (safe_a - safe_b), 0.0).sum(-1)


def log_mixture(log_a, log_b, c):
    """log(c a + (1 - c) b) for 0 <= c < 1; -inf (with a zero gradient) where a = b = 0."""
    either = (log_a > NEG_INF) | (log_b > NEG_INF)
    safe_a = torch.where(either, log_a, 0.0)
    safe_b = torch.where(either, log_b, 0.0)
    log_c = math.log(c) if c > 0 else NEG_INF
    mixed = torch.logaddexp(safe_a + log_c, safe_b + math.log1p(-c))  # exact: 1 - c drops c's digits below 1e-16
    return torch.where(either, mixed, NEG_INF)


def divergence_rows(student, teacher, divergence, beta, alpha, temperature):
    """Per-row divergence of float64 ``student`` / ``teacher`` logits, as the ``kl_div`` docstring defines it."""
    log_q = torch.log_softmax(student / temperature, dim=-1)
    log_p = torch.log_softmax(teacher / temperature, dim=-1)
    if divergence == "jsd" and beta in (0.0, 1.0):  # the documented endpoints (TRL's convention)
        divergence = "forward" if beta == 0.0 else "reverse"
    if divergence == "forward":
        return kl_rows(log_p, log_q)
    if divergence == "reverse":
        return kl_rows(log_q, log_p)
    if divergence == "jsd":
        log_m = log_mixture(log_p, log_q, beta)
        return beta * kl_rows(log_p, log_m) + (1.0 - beta) * kl_rows(log_q, log_m)
    if divergence == "skew_forward":
        return kl_rows(log_p, log_mixture(log_p, log_q, alpha))
    if divergence == "skew_reverse":
        return kl_rows(log_q, log_mixture(log_q, log_p, alpha))
    if divergence == "tvd":
        return 0.5 * (log_p.exp() - log_q.exp()).abs().sum(-1)
    raise AssertionError(divergence)
