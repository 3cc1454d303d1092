"""Volume-rendering weights and rendered quantities against hand-computed values."""

import math

import pytest
import torch

from lerf_ros.core.renderer import (
    render_accumulation,
    render_depth,
    render_embedding,
    render_rgb,
    render_weights,
)


def test_weights_hand_computed_three_samples():
    densities = torch.tensor([[1.0, 2.0, 0.5]], dtype=torch.float64)
    deltas = torch.tensor([[0.5, 0.25, 1.0]], dtype=torch.float64)
    # tau = (0.5, 0.5, 0.5); alpha = 1 - e^-0.5; T = (1, e^-0.5, e^-1).
    a = 1 - math.exp(-0.5)
    expected = [a, math.exp(-0.5) * a, math.exp(-1.0) * a]
    w = render_weights(densities, deltas)
    torch.testing.assert_close(w, torch.tensor([expected], dtype=torch.float64))
    assert render_accumulation(w).item() == pytest.approx(1 - math.exp(-1.5))


def test_weights_two_samples_opaque_first():
    w = render_weights(torch.tensor([[1e4, 3.0]]), torch.tensor([[1.0, 1.0]]))
    torch.testing.assert_close(w, torch.tensor([[1.0, 0.0]]))


def test_rgb_depth_background():
    w = torch.tensor([[0.2, 0.3, 0.0], [0.0, 0.0, 0.0]])
    rgb = torch.tensor([[[1.0, 0, 0], [0, 1.0, 0], [0, 0, 1.0]]]).expand(2, 3, 3)
    bg = torch.tensor([0.0, 0.0, 1.0])
    out = render_rgb(w, rgb, bg)
    torch.testing.assert_close(out, torch.tensor([[0.2, 0.3, 0.5], [0.0, 0.0, 1.0]]))
    t = torch.tensor([[1.0, 2.0, 3.0], [1.0, 2.0, 3.0]])
    # (0.2*1 + 0.3*2) / 0.5 = 1.6; empty ray -> far end.
    torch.testing.assert_close(render_depth(w, t), torch.tensor([1.6, 3.0]))


def test_embedding_renormalised():
    w = torch.tensor([[0.5, 0.5]])
    emb = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])
    torch.testing.assert_close(render_embedding(w, emb, normalize=False), torch.tensor([[0.5, 0.5]]))
    r = 1 / math.sqrt(2)
    torch.testing.assert_close(render_embedding(w, emb, normalize=True), torch.tensor([[r, r]]))


def test_shape_mismatch_raises():
    with pytest.raises(ValueError, match="densities"):
        render_weights(torch.ones(2, 3), torch.ones(2, 4))
