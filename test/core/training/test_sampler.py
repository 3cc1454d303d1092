"""Proposal sampling: spacing map, inverse-CDF resampling, near/far and sample ordering."""

import torch

from lerf_ros.core.fields import DensityFieldConfig, HashEncodingConfig, MLPConfig, SceneBox
from lerf_ros.core.training.sampler import ProposalSampler, SamplerConfig, Spacing, sample_pdf


def test_spacing_roundtrip_linear_then_disparity():
    near, split, far = torch.tensor([0.1, 0.5]), torch.tensor([2.0, 1.0]), torch.tensor([20.0, 10.0])
    sp = Spacing(near, split, far)
    t = torch.tensor([[0.1, 1.0, 2.0, 5.0, 20.0], [0.5, 0.75, 1.0, 4.0, 10.0]])
    s = sp.t_to_s(t)
    torch.testing.assert_close(s[:, 0], torch.zeros(2))
    torch.testing.assert_close(s[:, -1], torch.ones(2))
    torch.testing.assert_close(sp.s_to_t(s), t)
    # Ray 0: g(t) = t/2 below 2 m, 2 - 2/t beyond; g(0.1) = 0.05, g(20) = 1.9. t = 1 -> (0.5 - 0.05) / 1.85.
    assert abs(s[0, 1].item() - 0.45 / 1.85) < 1e-6
    assert abs(s[0, 3].item() - (2 - 2 / 5 - 0.05) / 1.85) < 1e-6


def test_sample_pdf_concentrates_on_heavy_bin():
    edges = torch.linspace(0, 1, 11).expand(3, 11)
    w = torch.zeros(3, 10)
    w[:, 6] = 1.0
    new = sample_pdf(edges, w, 32, stratified=False, padding=0.01)
    assert new.shape == (3, 33)
    assert bool((new[:, 1:] >= new[:, :-1]).all())
    inside = ((new >= 0.6) & (new <= 0.7)).float().mean()
    # 1 / 1.1 of the mass is in [0.6, 0.7] after padding: ~91 % of the edges land there.
    assert inside > 0.85
    strat = sample_pdf(edges, w, 32, stratified=True, padding=0.01)
    assert not torch.equal(strat, new) and bool((strat[:, 1:] >= strat[:, :-1]).all())


def test_proposal_sampler_ranges_and_gradients():
    box = SceneBox((-1.0, -1.0, -1.0), (1.0, 1.0, 1.0))
    prop = DensityFieldConfig(HashEncodingConfig(2, 2, 12, 8, 16, "torch"), MLPConfig(1, 16, "none", "torch"))
    sampler = ProposalSampler(SamplerConfig((16, 12), 8, (prop, prop)), box)
    o = torch.zeros(5, 3)
    d = torch.nn.functional.normalize(torch.randn(5, 3), dim=-1)
    near, split, far = torch.full((5,), 0.1), torch.full((5,), 1.0), torch.full((5,), 10.0)
    final, props, weights = sampler(o, d, near, split, far)
    assert final.t_edges.shape == (5, 9)
    assert [p.t_edges.shape[1] for p in props] == [17, 13]
    assert [w.shape for w in weights] == [(5, 16), (5, 12)]
    for rs in [final, *props]:
        assert bool((rs.t_edges >= 0.1 - 1e-5).all() and (rs.t_edges <= 10.0 + 1e-4).all())
        assert bool((rs.deltas >= 0).all())
    torch.testing.assert_close(props[0].t_edges[:, 0], near)
    torch.testing.assert_close(props[0].t_edges[:, -1], far)
    assert not final.t_edges.requires_grad  # resampled positions carry no gradient
    weights[1].sum().backward()
    assert sampler.proposal_fields[1].grid.params.grad.abs().sum() > 0
