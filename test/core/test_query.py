"""3D query with a toy embedding field (nerfacc style): blobs with known embeddings."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lerf_ros.core.query import QueryConfig, cluster_labels, locate

# Embedding axes of the toy field: 0 "red", 1 "blue", 2 "green" (absent), 3 generic.
RED, BLUE, GREEN, GENERIC = (F.one_hot(torch.tensor(i), 4).float() for i in range(4))
NEGS = GENERIC.reshape(1, 4)
RED_C = torch.tensor([0.0, 0.0, 0.5])
BLUE_C = torch.tensor([1.0, 0.0, 0.5])
CFG = QueryConfig(voxel_m=0.0, cluster_radius_m=0.05, scales_m=(0.05, 0.1, 0.2, 0.4, 0.8, 1.6))


def _sphere(centre, radius, n, seed):
    g = torch.Generator().manual_seed(seed)
    d = F.normalize(torch.randn(n, 3, generator=g), dim=1)
    return centre + radius * d


def _scene():
    """Points of a red blob, a blue blob and a floor; (N, 3) float32, (N, 3) uint8, (N,) views."""
    red = _sphere(RED_C, 0.1, 400, 0)
    blue = _sphere(BLUE_C, 0.15, 400, 1)
    u = torch.linspace(-0.5, 1.5, 40)
    floor = torch.stack(torch.meshgrid(u, u - 1.0, indexing="ij"), dim=-1).reshape(-1, 2)
    floor = torch.cat([floor, torch.zeros(floor.shape[0], 1)], dim=1)
    pts = torch.cat([red, blue, floor])
    rgb = torch.cat(
        [
            torch.tensor([[200, 30, 30]]).expand(400, 3),
            torch.tensor([[30, 60, 200]]).expand(400, 3),
            torch.full((floor.shape[0], 3), 100),
        ]
    ).to(torch.uint8)
    return pts, rgb, torch.full((pts.shape[0],), 5)


def toy_field(points, scale_m, best_scale=0.2):
    """Red / blue within each blob, generic elsewhere; colour strongest at best_scale (log-Gaussian)."""
    colour_w = math.exp(-(math.log(scale_m / best_scale) ** 2))
    in_red = ((points - RED_C).norm(dim=1) < 0.12).float().unsqueeze(1)
    in_blue = ((points - BLUE_C).norm(dim=1) < 0.17).float().unsqueeze(1)
    e = GENERIC + colour_w * (in_red * 2 * RED + in_blue * 2 * BLUE)
    return F.normalize(e, dim=1)


def test_finds_red_blob_at_its_scale_with_centroid_and_cloud():
    pts, rgb, views = _scene()
    res = locate(pts, rgb, views, toy_field, RED, NEGS, CFG)
    assert res.found and "found" in res.message
    # relevancy-weighted centroid of the blob surface ≈ the blob centre (not one surface voxel)
    assert np.linalg.norm(res.location_world - RED_C.numpy()) < 0.02
    assert res.scale_m == 0.2
    # at scale 0.2 the red embedding is (2 red + generic)/√5: relevancy sigmoid(10 (2 − 1)/√5)
    assert res.relevancy == pytest.approx(1 / (1 + math.exp(-10 / math.sqrt(5))), abs=1e-5)
    assert res.cloud_xyz.shape == (400, 3) and res.cloud_xyz.dtype == np.float32
    assert np.linalg.norm(res.cloud_xyz - RED_C.numpy(), axis=1).max() < 0.11
    assert (res.cloud_rgb == np.array([200, 30, 30], np.uint8)).all()
    assert (res.cloud_relevancy >= CFG.threshold).all()


def test_finds_blue_and_scale_follows_the_field():
    pts, rgb, views = _scene()
    res = locate(pts, rgb, views, lambda p, s: toy_field(p, s, best_scale=0.8), BLUE, NEGS, CFG)
    assert res.found and res.scale_m == 0.8
    assert np.linalg.norm(res.location_world - BLUE_C.numpy()) < 0.03


def test_absent_query_not_found_with_reason():
    pts, rgb, views = _scene()
    res = locate(pts, rgb, views, toy_field, GREEN, NEGS, CFG)
    assert not res.found and res.location_world is None
    assert res.relevancy < CFG.threshold and "threshold" in res.message
    assert res.cloud_xyz.shape == (0, 3) and res.cloud_rgb.shape == (0, 3)
    # a stricter threshold turns a found query into not found
    strict = locate(pts, rgb, views, toy_field, RED, NEGS, CFG, threshold=0.995)
    assert not strict.found and strict.relevancy < 0.995


def test_min_views_drops_points_seen_by_one_keyframe():
    pts, rgb, views = _scene()
    views[:400] = 1  # the red blob was seen once only
    res = locate(pts, rgb, views, toy_field, RED, NEGS, CFG)
    assert not res.found
    assert locate(
        pts, rgb, views, toy_field, RED, NEGS, QueryConfig(**{**CFG.__dict__, "min_views": 1})
    ).found
    none = locate(pts, rgb, torch.ones_like(views), toy_field, RED, NEGS, CFG)
    assert not none.found and "keyframes" in none.message


def test_isolated_noisy_points_neither_win_nor_count_as_found():
    pts, rgb, views = _scene()
    spike = torch.tensor([[0.5, -0.8, 0.0], [0.52, -0.8, 0.0]])  # two floor points that read "very red"

    def noisy(p, s):
        e = toy_field(p, s)
        hot = (torch.cdist(p, spike).min(dim=1).values < 1e-3).unsqueeze(1)
        return torch.where(hot, RED.expand_as(e), e)

    pts2 = torch.cat([pts, spike])
    rgb2 = torch.cat([rgb, torch.full((2, 3), 100, dtype=torch.uint8)])
    views2 = torch.cat([views, torch.full((2,), 5)])
    res = locate(pts2, rgb2, views2, noisy, RED, NEGS, CFG)
    assert res.found and np.linalg.norm(res.location_world - RED_C.numpy()) < 0.02
    # without the blob only the two spikes remain above threshold: 2 < top_k points -> not found
    only = torch.cat([torch.arange(400, pts2.shape[0])])
    res2 = locate(pts2[only], rgb2[only], views2[only], noisy, RED, NEGS, CFG)
    assert not res2.found and "cluster" in res2.message
    assert res2.relevancy == pytest.approx(2 * float(1 / (1 + math.exp(-10))) / CFG.top_k, abs=1e-4)


def test_cloud_cap_keeps_most_relevant_and_with_cloud_false():
    pts, rgb, views = _scene()
    cfg = QueryConfig(**{**CFG.__dict__, "max_cloud_points": 10})
    res = locate(pts, rgb, views, toy_field, RED, NEGS, cfg)
    assert res.cloud_xyz.shape == (10, 3) and res.found
    bare = locate(pts, rgb, views, toy_field, RED, NEGS, CFG, with_cloud=False)
    assert bare.found and bare.cloud_xyz.shape == (0, 3) and bare.cloud_relevancy.shape == (0,)
    assert np.allclose(bare.location_world, locate(pts, rgb, views, toy_field, RED, NEGS, CFG).location_world)


def test_voxel_merge_and_numpy_inputs():
    pts, rgb, views = _scene()
    cfg = QueryConfig(**{**CFG.__dict__, "voxel_m": 0.05})
    res = locate(pts.numpy(), rgb.numpy(), views.numpy(), toy_field, RED, NEGS, cfg)
    assert res.found and np.linalg.norm(res.location_world - RED_C.numpy()) < 0.03
    assert 0 < res.cloud_xyz.shape[0] < 400  # merged voxels


def test_cluster_labels_by_hand():
    p = torch.tensor([[0.0, 0, 0], [0.04, 0, 0], [0.09, 0, 0], [0.5, 0, 0], [0.52, 0.03, 0], [-0.3, 0, 0]])
    labels = cluster_labels(p, 0.05)
    assert labels[0] == labels[1] == labels[2]  # a chain of touching cells
    assert labels[3] == labels[4] and labels[3] != labels[0] and labels[5] not in (labels[0], labels[3])
    assert int(labels.max()) == 2


def test_bad_inputs_raise():
    pts, rgb, views = _scene()
    with pytest.raises(ValueError, match="differ"):
        locate(pts, rgb[:-1], views, toy_field, RED, NEGS, CFG)
    with pytest.raises(ValueError, match="text_embed"):
        locate(pts, rgb, views, toy_field, torch.zeros(3), NEGS, CFG)
    with pytest.raises(ValueError, match="embed_fn"):
        locate(pts, rgb, views, lambda p, s: torch.zeros(p.shape[0], 5), RED, NEGS, CFG)
    with pytest.raises(ValueError, match="threshold"):
        locate(pts, rgb, views, toy_field, RED, NEGS, CFG, threshold=1.5)
    bad = pts.clone()
    bad[0, 0] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        locate(bad, rgb, views, toy_field, RED, NEGS, CFG)
    with pytest.raises(ValueError, match="scales_m"):
        QueryConfig(scales_m=()).validate()
    assert len(QueryConfig().scales_m) == 30
