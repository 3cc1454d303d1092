"""Volume-rendering weights and rendered quantities against hand-computed values."""

import math

import pytest
import torch

from lerf_ros.core.training.renderer import (
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


def test_opaque_sample_after_thin_ones_float32():
    # tau = (3, 1e9): in float32 (3 + 1e9) - 1e9 == 0, so an inclusive ``cumsum(tau) - tau`` makes the
    # opaque sample's transmittance 1 and the ray's weights sum to 1.95 (the demo-bag divergence: the
    # forward value stops responding to the first density, whose gradient then grows it without bound).
    densities = torch.tensor([[1.0, 1e9]], dtype=torch.float32, requires_grad=True)
    w = render_weights(densities, torch.tensor([[3.0, 1.0]]))
    torch.testing.assert_close(w, torch.tensor([[1 - math.exp(-3.0), math.exp(-3.0)]]))
    assert render_accumulation(w).item() <= 1.0
    # and the transmittance still responds to the thin sample: d w_1 / d sigma_0 = -delta_0 * w_1
    (g,) = torch.autograd.grad(w[0, 1], densities)
    assert g[0, 0].item() == pytest.approx(-3.0 * math.exp(-3.0), rel=1e-5)


def test_overflowing_densities_stay_finite():
    # An inf density (an exp overflow), a zero-length interval and optical depths whose sum overflows:
    # finite weights and gradients, no NaN from inf - inf.
    densities = torch.tensor([[0.5, float("inf"), 3e38, 1.0], [3e38, 3e38, 3e38, 3e38]], requires_grad=True)
    deltas = torch.tensor([[1.0, 1.0, 10.0, 1.0], [1.0, 0.0, 2.0, 1.0]])
    w = render_weights(densities, deltas)
    assert torch.isfinite(w).all() and (render_accumulation(w) <= 1.0 + 1e-6).all()
    torch.testing.assert_close(w[0], torch.tensor([1 - math.exp(-0.5), math.exp(-0.5), 0.0, 0.0]))
    w.sum().backward()
    assert torch.isfinite(densities.grad).all()


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
