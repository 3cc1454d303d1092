"""Relevancy and scale search against hand-computed values."""

import math

import pytest
import torch

from lerf_ros.core.language.relevancy import (
    CANONICAL_NEGATIVES,
    closest_negative,
    negative_texts,
    relevancy,
    scale_search,
)


def _unit(*v):
    t = torch.tensor(v, dtype=torch.float32)
    return t / t.norm()


def test_relevancy_matches_hand_computed_pairwise_softmax():
    phi = torch.stack([_unit(1, 0, 0), _unit(0, 1, 0), _unit(1, 1, 0)])
    q = _unit(1, 0, 0)
    negs = torch.stack([_unit(0, 1, 0)])
    r = relevancy(phi, q, negs, temperature=10.0)
    # φ=q: exp(10)/(exp(10)+exp(0)); φ=c: exp(0)/(exp(0)+exp(10)); φ halfway: both dots 1/√2 -> 0.5
    expected = [math.exp(10) / (math.exp(10) + 1), 1 / (1 + math.exp(10)), 0.5]
    assert r.tolist() == pytest.approx(expected, abs=1e-6)


def test_extra_negative_takes_the_minimum():
    phi = _unit(1, 0, 0).reshape(1, 3)
    q = _unit(1, 0, 0)
    c1 = _unit(0, 1, 0)  # φ·c1 = 0
    c2 = _unit(0.6, 0.8, 0)  # φ·c2 = 0.6
    only_c1 = relevancy(phi, q, c1.reshape(1, 3))
    both = relevancy(phi, q, torch.stack([c1, c2]))
    assert float(only_c1) == pytest.approx(math.exp(10) / (math.exp(10) + math.exp(0)), abs=1e-6)
    assert float(both) == pytest.approx(math.exp(10) / (math.exp(10) + math.exp(6)), abs=1e-6)
    assert float(both) < float(only_c1)


def test_a_known_closest_negative_gives_the_same_relevancy_and_is_used():
    g = torch.Generator().manual_seed(0)
    phi = torch.nn.functional.normalize(torch.randn(50, 6, generator=g), dim=1)
    q = torch.nn.functional.normalize(torch.randn(6, generator=g), dim=0)
    negs = torch.nn.functional.normalize(torch.randn(3, 6, generator=g), dim=1)
    near = closest_negative(phi, negs)
    assert near.tolist() == pytest.approx((phi @ negs.T).max(dim=1).values.tolist(), abs=1e-6)
    torch.testing.assert_close(relevancy(phi, q, negs, closest=near), relevancy(phi, q, negs), atol=0, rtol=0)
    # what is passed is what is used: a closest negative of 1 gives sigmoid(tau (q.phi - 1))
    ones = torch.ones(50)
    torch.testing.assert_close(relevancy(phi, q, negs, closest=ones), torch.sigmoid(10.0 * (phi @ q - 1.0)))
    with pytest.raises(ValueError, match="closest"):
        relevancy(phi, q, negs, closest=torch.ones(49))
    # the scale search asks for it after the same scale's embeddings
    asked = []
    _, _, table = scale_search(lambda s: phi * 1.0, q, negs, [0.1, 0.2],
                               closest_at_scale=lambda s: asked.append(s) or near)
    assert asked == pytest.approx([0.1, 0.2]) and table.shape == (2, 50)
    _, _, shifted = scale_search(lambda s: phi * 1.0, q, negs, [0.1], closest_at_scale=lambda s: ones)
    torch.testing.assert_close(shifted[0], torch.sigmoid(10.0 * (phi @ q - 1.0)))  # the value is used


def test_temperature_and_stability_at_large_tau():
    phi = _unit(0.8, 0.6).reshape(1, 2)
    q, c = _unit(1, 0), _unit(0, 1)
    # φ·q − φ·c = 0.2 -> sigmoid(τ · 0.2)
    assert float(relevancy(phi, q, c.reshape(1, 2), temperature=5.0)) == pytest.approx(
        1 / (1 + math.exp(-1.0)), abs=1e-6
    )
    huge = relevancy(phi, q, c.reshape(1, 2), temperature=1e4)
    assert torch.isfinite(huge).all() and float(huge) == pytest.approx(1.0)


def test_bad_shapes_and_temperature_raise():
    phi = torch.zeros(4, 3)
    with pytest.raises(ValueError, match="query"):
        relevancy(phi, torch.zeros(2), torch.zeros(1, 3))
    with pytest.raises(ValueError, match="negatives"):
        relevancy(phi, torch.zeros(3), torch.zeros(0, 3))
    with pytest.raises(ValueError, match="temperature"):
        relevancy(phi, torch.zeros(3), torch.zeros(1, 3), temperature=0.0)


def test_negative_texts_canonical_first_then_extras_deduplicated():
    assert negative_texts() == CANONICAL_NEGATIVES == ("object", "things", "stuff", "texture")
    assert negative_texts([" chair ", "stuff", "", "chair"]) == (*CANONICAL_NEGATIVES, "chair")
    with pytest.raises(ValueError):
        negative_texts([3])


def test_scale_search_picks_scale_with_highest_relevancy():
    q, c = _unit(1, 0), _unit(0, 1)
    scales = torch.tensor([0.1, 0.5, 1.0])
    # point 0 matches the query best at 0.5 m; point 1 is moderately relevant at 1.0 m
    angles = {0.1: (1.2, 1.0), 0.5: (0.1, 1.4), 1.0: (1.0, 0.6)}

    def embed(scale):
        a = torch.tensor(angles[round(scale, 3)])
        return torch.stack([a.cos(), a.sin()], dim=1)

    best, rel, table = scale_search(embed, q, c.reshape(1, 2), scales)
    assert best == 1
    assert table.shape == (3, 2)
    a = torch.tensor(angles[0.5])
    expected = torch.sigmoid(10 * (a.cos() - a.sin()))
    assert torch.allclose(rel, expected, atol=1e-6)
    assert torch.allclose(table[best], rel)


def test_scale_search_top_k_ignores_a_single_outlier():
    q, c = _unit(1, 0), _unit(0, 1)
    good, bad = _unit(1, 0.1), _unit(0.2, 1)
    # scale 0: one perfect outlier among bad points; scale 1: all points fairly good
    per_scale = [torch.stack([_unit(1, 0)] + [bad] * 4), torch.stack([good] * 5)]
    best_max, _, _ = scale_search(lambda s: per_scale[int(s) - 1], q, c.reshape(1, 2), [1.0, 2.0], top_k=1)
    best_top3, _, _ = scale_search(lambda s: per_scale[int(s) - 1], q, c.reshape(1, 2), [1.0, 2.0], top_k=3)
    assert best_max == 0 and best_top3 == 1


def test_scale_search_validates_scales_and_counts():
    q, c = _unit(1, 0), _unit(0, 1).reshape(1, 2)
    with pytest.raises(ValueError, match="scales_m"):
        scale_search(lambda s: torch.zeros(1, 2), q, c, [])
    with pytest.raises(ValueError, match="scales_m"):
        scale_search(lambda s: torch.zeros(1, 2), q, c, [0.1, -1.0])
    with pytest.raises(ValueError, match="embed_at_scale"):
        scale_search(lambda s: torch.zeros(1 if s < 0.5 else 2, 2), q, c, [0.1, 1.0])


def test_relevancy_is_the_minimum_pairwise_softmax_over_many_negatives():
    """The closest negative's sigmoid (how `relevancy` computes it) is the minimum of the K pairwise
    softmaxes of eq. 3, written out here with exp; and every phrase of a vocabulary at once
    (`query._phrase_relevancy`) is the same as one `relevancy` call per phrase."""
    from lerf_ros.core.language.query import _phrase_relevancy

    gen = torch.Generator().manual_seed(0)
    phi = torch.nn.functional.normalize(torch.randn(200, 8, generator=gen, dtype=torch.float64), dim=1)
    texts = torch.nn.functional.normalize(torch.randn(9, 8, generator=gen, dtype=torch.float64), dim=1)
    q, negs = texts[:1], texts[1:]
    tau = 10.0
    pairwise = torch.exp(tau * phi @ q.T) / (torch.exp(tau * phi @ q.T) + torch.exp(tau * phi @ negs.T))
    torch.testing.assert_close(relevancy(phi, q[0], negs, tau).double(), pairwise.min(dim=1).values,
                               atol=1e-6, rtol=0)
    phrases = torch.nn.functional.normalize(torch.randn(5, 8, generator=gen), dim=1)
    each = torch.stack([relevancy(phi.float(), p, negs[:4].float(), tau) for p in phrases])
    torch.testing.assert_close(_phrase_relevancy(phi.float(), phrases, negs[:4].float(), tau), each,
                               atol=1e-6, rtol=0)
