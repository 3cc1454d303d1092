"""Losses against hand-computed values."""

import math

import pytest
import torch

from lerf_ros.core.training.losses import clip_loss, depth_loss, dino_loss, distortion_loss, interlevel_loss


def test_distortion_two_samples_hand_computed():
    edges = torch.tensor([[0.0, 0.2, 0.6]])
    w = torch.tensor([[0.5, 0.25]])
    # mids 0.1, 0.4: inter = 2 * 0.5 * 0.25 * 0.3 = 0.075; intra = (0.25 * 0.2 + 0.0625 * 0.4) / 3 = 0.025.
    assert distortion_loss(edges, w).item() == pytest.approx(0.1)


def test_interlevel_zero_when_proposal_bounds_and_positive_otherwise():
    c = torch.tensor([[0.0, 0.25, 0.5, 0.75, 1.0]])
    w = torch.tensor([[0.1, 0.8, 0.0, 0.0]])
    # A coarse proposal whose first bin [0, 0.55] holds 0.9 bounds both fine bins in it. (Edges are
    # not made to coincide: a fine bin touching a proposal edge also counts the next proposal bin.)
    cp = torch.tensor([[0.0, 0.55, 1.0]])
    assert interlevel_loss(c, w, [cp], [torch.tensor([[0.9, 0.0]])]).item() == pytest.approx(0.0)
    # Proposal mass in the wrong place: w - outer = (0.1, 0.8, 0, 0) -> 0.1^2/0.1 + 0.8^2/0.8 = 0.9.
    wp = torch.tensor([[0.0, 0.9]], requires_grad=True)
    loss = interlevel_loss(c, w, [cp], [wp])
    assert loss.item() == pytest.approx(0.9, rel=1e-5)
    loss.backward()
    assert wp.grad[0, 0] < 0  # raising the first proposal bin lowers the loss


def test_depth_loss_terms():
    t_edges = torch.tensor([[0.0, 1.0, 2.0, 3.0]]).expand(2, 4)
    w = torch.tensor([[0.2, 0.8, 0.0], [0.0, 1.0, 0.0]])
    pred = torch.tensor([1.7, 1.5])
    target = torch.tensor([2.0, float("nan")])
    # Ray 0: |1.7 - 2| / 2 = 0.15; margin max(0.1, 0.05) = 0.1: only bin 0 ends before 1.9 -> + 0.2.
    assert depth_loss(pred, w, t_edges, target).item() == pytest.approx(0.35)
    assert depth_loss(pred, w, t_edges, torch.full((2,), float("nan"))).item() == 0.0


def test_clip_and_dino_losses():
    a = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    b = torch.tensor([[math.cos(0.3), math.sin(0.3)], [float("nan"), 0.0]])
    # Small differences: Huber = 0.5 |a - b|^2 = 1 - cos(0.3), averaged over the one valid ray.
    assert clip_loss(a, b).item() == pytest.approx(1 - math.cos(0.3), rel=1e-5)
    assert dino_loss(a, torch.tensor([[0.0, 0.0], [0.0, 3.0]])).item() == pytest.approx((1 + 4) / 2)
