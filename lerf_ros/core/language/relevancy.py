"""LERF relevancy of embeddings against a query and negatives, and the search over language scales.

Relevancy (Kerr et al. 2023, eq. 3): for an embedding φ, query q and negatives c_k,

    r(φ) = min_k  exp(τ φ·q) / (exp(τ φ·q) + exp(τ φ·c_k))  =  min_k  sigmoid(τ (φ·q − φ·c_k))

The sigmoid form is the same pairwise softmax without exp overflow at any τ. A relevancy of 0.5
means "as close to the query as to the closest negative"; the canonical negatives ("object",
"things", "stuff", "texture") push generic embeddings to ≤ 0.5.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

CANONICAL_NEGATIVES: tuple[str, ...] = ("object", "things", "stuff", "texture")


def negative_texts(extra: Sequence[str] = ()) -> tuple[str, ...]:
    """Canonical negatives followed by the caller's extra ones (stripped, empty and duplicates dropped)."""
    out = list(CANONICAL_NEGATIVES)
    for text in extra:
        if not isinstance(text, str):
            raise ValueError(f"negative must be a string, got {text!r}")
        t = text.strip()
        if t and t not in out:
            out.append(t)
    return tuple(out)


def relevancy(embeds: Tensor, query: Tensor, negatives: Tensor, temperature: float = 10.0,
              closest: Tensor | None = None) -> Tensor:
    """Relevancy of N embeddings to one query.

    embeds:    (N, D) unit embeddings (rendered or evaluated at points)
    query:     (D,) unit text embedding
    negatives: (K, D) unit text embeddings, K ≥ 1 (canonical + caller negatives)
    closest:   (N,) the embeddings' highest similarity to any of the negatives when already known
               (`closest_negative`, e.g. kept for an idle map's points): only the query's is computed
    Returns (N,) float32 in (0, 1).
    """
    if embeds.ndim != 2:
        raise ValueError(f"embeds must be (N, D), got shape {tuple(embeds.shape)}")
    d = embeds.shape[1]
    if query.shape != (d,):
        raise ValueError(f"query must be ({d},) to match embeds, got shape {tuple(query.shape)}")
    if negatives.ndim != 2 or negatives.shape[1] != d or negatives.shape[0] < 1:
        raise ValueError(f"negatives must be (K>=1, {d}), got shape {tuple(negatives.shape)}")
    if not (temperature > 0):
        raise ValueError(f"temperature must be > 0, got {temperature}")
    e = embeds.float()
    if closest is None:
        closest = closest_negative(e, negatives)
    elif tuple(closest.shape) != (e.shape[0],):
        raise ValueError(f"closest must be ({e.shape[0]},), got shape {tuple(closest.shape)}")
    # sigmoid is increasing: the min over negatives is the sigmoid at the closest negative (one per point)
    return torch.sigmoid(temperature * (e @ query.to(e) - closest.to(e)))


def closest_negative(embeds: Tensor, negatives: Tensor) -> Tensor:
    """(N,) float32: each of the (N, D) embeddings' highest similarity to any of the (K, D) negatives (the
    query-independent half of `relevancy`). The (K, N) products run along rows, so the max over the
    negatives runs down contiguous rows (a max along a short last dimension is several times slower on
    the CPU)."""
    e = embeds.float()
    return (negatives.to(e) @ e.T).amax(dim=0)


def _robust_max(values: Tensor, top_k: int) -> Tensor:
    """Mean of the top_k largest entries along the last dim ((S, N) -> (S,)); top_k=1 is the max."""
    k = max(1, min(int(top_k), values.shape[-1]))
    return values.topk(k, dim=-1).values.mean(dim=-1)


def scale_search(
    embed_at_scale: Callable[[float], Tensor],
    query: Tensor,
    negatives: Tensor,
    scales_m: Tensor | Sequence[float],
    temperature: float = 10.0,
    top_k: int = 1,
    closest_at_scale: Callable[[float], Tensor | None] | None = None,
) -> tuple[int, Tensor, Tensor]:
    """Evaluate relevancy at every language scale and pick the best one (LERF: highest relevancy).

    embed_at_scale: scale in metres -> (N, D) unit embeddings of the same N points / pixels
    query: (D,); negatives: (K, D); scales_m: (S,) metres, S ≥ 1
    top_k: a scale's score is the mean of its top_k point relevancies (1 = the max, as in LERF;
           larger values keep one noisy point from choosing the scale)
    closest_at_scale: scale in metres -> (N,) `closest_negative` of that scale's embeddings when known
           (None: computed here); asked after embed_at_scale for the same scale
    Returns (best_scale_idx, relevancy (N,) at that scale, table (S, N) of all relevancies).
    """
    scales = torch.as_tensor(scales_m, dtype=torch.float32).reshape(-1)
    if scales.numel() == 0:
        raise ValueError("scales_m is empty")
    if not torch.isfinite(scales).all() or (scales <= 0).any():
        raise ValueError(f"scales_m must be finite and > 0, got {scales.tolist()}")
    rows = [relevancy(embed_at_scale(float(s)), query, negatives, temperature,
                      closest=None if closest_at_scale is None else closest_at_scale(float(s)))
            for s in scales]
    n = rows[0].shape[0]
    for s, r in zip(scales.tolist(), rows, strict=True):
        if r.shape[0] != n:
            raise ValueError(f"embed_at_scale({s}) returned {r.shape[0]} embeddings, expected {n}")
    table = torch.stack(rows)  # (S, N)
    if n == 0:
        return 0, table[0], table
    best = int(_robust_max(table, top_k).argmax())
    return best, table[best], table
