"""The documented sampling verification written out in float64 (top-k / top-p cut, residual and SpecInfer rounds,
inverse-CDF bonus): the oracle of the verification tests, sharing no code with the package."""

import math

import torch


def kept_probs(logits: list[float], temperature: float, top_k, top_p, margin: float = 1e-5):
    """float64 target distribution after top-k (logits >= the k-th largest) then top-p (smallest descending
    prefix reaching top_p, ties at either cut kept), tempered. Returns (probs, ambiguous): ``ambiguous`` when
    a descending mass lies within ``margin`` of ``top_p`` (fp32 rounding could move the cut)."""
    vocab = len(logits)
    keep = [True] * vocab
    if top_k is not None and top_k < vocab:
        kth = sorted(logits, reverse=True)[top_k - 1]
        keep = [x >= kth for x in logits]
    ambiguous = False
    if top_p is not None and top_p < 1.0:
        probs = _softmax([x if k else -math.inf for x, k in zip(logits, keep)], temperature)
        cut, mass = None, 0.0
        for i in sorted(range(vocab), key=lambda i: -logits[i]):
            if not keep[i]:
                continue
            mass += probs[i]
            cut = logits[i]
            ambiguous |= abs(mass - top_p) < margin
            if mass >= top_p:
                break
        keep = [k and x >= cut for x, k in zip(logits, keep)]
    return _softmax([x if k else -math.inf for x, k in zip(logits, keep)], temperature), ambiguous


def _softmax(logits: list[float], temperature: float) -> list[float]:
    top = max(logits)
    weights = [math.exp((x - top) / temperature) if x != -math.inf else 0.0 for x in logits]
    total = sum(weights)
    return [w / total for w in weights]


def sampling_reference(case: dict, uniforms: torch.Tensor, margin: float = 1e-5):
    """The documented lossless walk in float64 with the given uniforms ``[B, T]``. Returns (paths, bonuses,
    ambiguous, most_rejections): ``ambiguous`` when a decision lies within ``margin`` of its threshold (fp32 could go
    either way); ``most_rejections`` the most children rejected in a row at one node, over the batch.

    ``case``: ``rows`` (parent lists, one per sequence or one for all), ``tokens [B, T]``, ``logits [B, T, V]``,
    ``draft_probs [B, T, V]`` or None (deterministic drafts), ``temperature``, ``top_k``, ``top_p``, ``batch``."""
    rows, tokens, draft = case["rows"], case["tokens"].tolist(), case["draft_probs"]
    num_nodes = len(rows[0])
    paths, bonuses, ambiguous, most = [], [], False, 0
    for b in range(case["batch"]):
        parents = rows[min(b, len(rows) - 1)]
        probs = []
        for i in range(num_nodes):
            p, amb = kept_probs(case["logits"][b, i].double().tolist(), case["temperature"], case["top_k"], case["top_p"])
            probs.append(p)
            ambiguous |= amb
        u = uniforms[b].double().tolist()
        path, rejections = [0], 0
        residual = list(probs[0])
        for j in range(1, num_nodes):
            cur = path[-1]
            if parents[j] != cur:
                continue
            x = tokens[b][j]
            total = sum(residual)
            if total < margin:
                ambiguous = True
                break
            r = [w / total for w in residual]
            if draft is None:
                accept = u[j] < r[x]
                ambiguous |= abs(u[j] - r[x]) < margin
            else:
                q = draft[b, cur].double()
                q = (q / q.sum()).tolist()
                accept = u[j] * q[x] < r[x]
                ambiguous |= abs(u[j] * q[x] - r[x]) < margin and r[x] > 0
            if accept:
                path.append(j)
                residual, rejections = list(probs[j]), 0
                continue
            rejections += 1
            most = max(most, rejections)
            if draft is None:
                residual[x] = 0.0
            else:
                residual = [max(a - c, 0.0) for a, c in zip(r, q)]
        total = sum(residual)
        if total < margin:
            ambiguous = True
            bonuses.append(None)
        else:
            threshold, cdf, bonus = u[0] * total, 0.0, None
            for token, w in enumerate(residual):
                if w <= 0:
                    continue
                cdf += w
                ambiguous |= abs(cdf - threshold) < margin
                if bonus is None and cdf > threshold:
                    bonus = token
            bonuses.append(bonus)
        paths.append(path)
    return paths, bonuses, ambiguous, most
