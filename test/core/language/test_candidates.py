"""Candidate points from hand-made keyframes: voxel merge, view counts, depth consistency, rendered
depth fallback and the cache key."""

import numpy as np
import pytest
import torch

from lerf_ros.core.frames.camera import CameraIntrinsics
from lerf_ros.core.frames.frame import Frame
from lerf_ros.core.language import candidates as cand
from lerf_ros.core.presets import CandidateConfig

W, H = 20, 10
INTR = CameraIntrinsics(W, H, fx=10.0, fy=10.0, cx=9.5, cy=4.5)
CFG = CandidateConfig(pixel_stride=1, voxel_m=0.1, depth_tol_rel=0.05)


def _kf(x: float, depth: float | None, colour=(200, 10, 10)) -> Frame:
    """Camera at (x, 0, 0) looking along world +z (identity rotation); flat depth or none."""
    T = np.eye(4)
    T[0, 3] = x
    img = np.zeros((H, W, 3), np.uint8)
    img[:] = colour
    d = None if depth is None else np.full((H, W), depth, np.float32)
    return Frame(img, INTR, T, 0, d)


def test_voxel_merge_means_positions_and_colours():
    pts = np.array([[0.01, 0.01, 0.01], [0.05, 0.03, 0.09], [0.55, 0.0, 0.0]])
    rgb = np.array([[0, 0, 0], [100, 50, 255], [7, 7, 7]], np.uint8)
    c, col = cand.voxel_merge(pts, rgb, 0.1)
    order = np.argsort(c[:, 0])
    np.testing.assert_allclose(c[order], [[0.03, 0.02, 0.05], [0.55, 0.0, 0.0]])
    np.testing.assert_array_equal(col[order], [[50, 25, 128], [7, 7, 7]])


def test_lift_depth_wall_at_two_metres():
    pts, rgb = cand.lift_depth(_kf(0.3, 2.0), 1, with_rgb=True)
    assert pts.shape == (W * H, 3) and rgb.shape == (W * H, 3)
    np.testing.assert_allclose(pts[:, 2], 2.0)
    # pixel u spans (u - cx) / fx * z = +-1.9 m around the camera's x
    np.testing.assert_allclose([pts[:, 0].min(), pts[:, 0].max()], [0.3 - 1.9, 0.3 + 1.9])


def test_view_counts_overlap_and_occlusion():
    a, b = _kf(0.0, 2.0), _kf(1.0, 2.0)
    cs = cand.compute_candidates([a, b], CFG, "k", render=None)
    x = cs.points[:, 0]
    # a sees x in [-1.9, 1.9], b sees [-0.9, 2.9] on the wall: overlap 2 views, the rest 1 (a point
    # within half a pixel (0.1 m) of an image edge may round either way)
    both, one = (x > -0.8) & (x < 1.8), (x < -1.0) | (x > 2.0)
    assert both.sum() > 0 and one.sum() > 0
    assert np.all(cs.views[both] == 2) and np.all(cs.views[one] == 1)
    assert cs.views.sum() > cs.points.shape[0]
    # a third keyframe at x = 0 whose depth shows an occluder at 1 m: the wall points it covers are
    # not "seen" by it (|2 - 1| > 0.05 * 1 + voxel), so the counts do not change
    occ = _kf(0.0, 1.0)
    grids = [k.depth_m for k in (a, b, occ)]
    np.testing.assert_array_equal(cand.view_counts(cs.points, [a, b, occ], grids, 1, CFG), cs.views)
    # the same keyframe with the wall's depth does count
    grids[2] = np.full((H, W), 2.0, np.float32)
    assert cand.view_counts(cs.points, [a, b, occ], grids, 1, CFG).sum() > cs.views.sum()


class _WallModel:
    """Renders a wall at world z = 2: ray distance t = 2 / d_z (cameras at z = 0)."""

    def eval(self):
        return self

    def __call__(self, o, d):
        return {"depth": (2.0 - o[:, 2]) / d[:, 2]}


def test_rendered_depth_fallback_and_cache_key():
    measured, bare = _kf(0.0, 2.0), _kf(1.0, None)
    cache = cand.CandidateCache(CFG, torch.device("cpu"))
    calls = cand.render_calls()
    pts, rgb, views = cache.get(0, [0, 1], [measured, bare], 5, _WallModel())
    assert cand.render_calls() == calls + 1  # only the keyframe without depth is rendered
    np.testing.assert_allclose(pts[:, 2].numpy(), 2.0, atol=1e-4)  # rendered z agrees with the wall
    assert int(views.max()) == 2 and rgb.dtype == torch.uint8
    assert cache.get(0, [0, 1], [measured, bare], 5, _WallModel())[0] is pts  # cached
    assert cand.render_calls() == calls + 1
    cache.get(0, [0, 1], [measured, bare], 6, _WallModel())  # a query never re-renders a keyframe ...
    assert cand.render_calls() == calls + 1
    # ... the worker's refresh does, the stalest rendered keyframe first, and the next query merges it
    assert cache.refresh([0, 1], [measured, bare], 6, _WallModel(), min_age_steps=5) == 0  # 1 step old
    assert cache.refresh([0, 1], [measured, bare], 6, _WallModel()) == 1
    assert cand.render_calls() == calls + 2
    assert cache.get(0, [0, 1], [measured, bare], 6, _WallModel())[0] is not pts
    saved = cache.current
    assert cand.key_step(saved.key) == 6
    other = cand.CandidateCache(CFG, torch.device("cpu"))
    assert not other.adopt(saved, 3, [0, 1], [measured, bare], 7)  # stale step
    assert not other.adopt(saved, 3, [0, 2], [measured, bare], 6)  # other keyframe ids
    assert other.adopt(saved, 3, [0, 1], [measured, bare], 6)
    assert torch.equal(other.get(3, [0, 1], [measured, bare], 6, None)[0], cache.get(
        0, [0, 1], [measured, bare], 6, None)[0])
    assert cand.render_calls() == calls + 2
    # measured depth only: the key ignores the step
    only = [measured]
    assert cand.key_step(cand.candidate_key([0], only, 9, CFG)) == -1


def test_candidate_arrays_round_trip_and_validation():
    cs = cand.compute_candidates([_kf(0.0, 2.0)], CFG, "abc@-1", render=None)
    back = cand.CandidateSet.from_arrays(cs.to_arrays())
    assert back.key == "abc@-1" and np.array_equal(back.points, cs.points)
    bad = cs.to_arrays()
    bad["views"] = bad["views"][:-1]
    with pytest.raises(ValueError, match="do not fit"):
        cand.CandidateSet.from_arrays(bad)


def test_holes_in_measured_depth_are_filled_from_rendered_depth():
    holed = _kf(0.0, 2.0)
    holed.depth_m[:, :5] = 0.0  # a black / shiny surface: no return
    holed.depth_m[:2, :] = np.nan
    other = _kf(0.5, 2.0)
    cache = cand.CandidateCache(CFG, torch.device("cpu"))
    before = cache.get(0, [0, 1], [holed, other], 3, None)[0]  # no model yet: the holes stay empty
    x_left = 0.0 - 0.1 * (9.5 - 2.0) * 2.0  # world x of pixel column 2 at 2 m
    assert not np.any(np.isclose(before[:, 0].numpy(), x_left, atol=0.05) & (before[:, 1].numpy() > -0.5))
    assert cand.depends_on_model([holed], CFG.pixel_stride) and not cand.depends_on_model([other], 1)
    calls = cand.render_calls()
    assert cache.refresh([0, 1], [holed, other], 3, _WallModel()) == 1  # fills the holes
    assert cand.render_calls() == calls + 1
    after = cache.get(0, [0, 1], [holed, other], 3, _WallModel())[0]
    assert after.shape[0] > before.shape[0]
    np.testing.assert_allclose(after[:, 2].numpy(), 2.0, atol=1e-4)  # the rendered wall agrees
    assert cache.refresh([0, 1], [holed, other], 3, _WallModel()) == 0  # filled at this step already


def test_rendered_candidates_use_the_median_depth_of_each_ray():
    from types import SimpleNamespace

    w = torch.tensor([[0.1, 0.2, 0.3, 0.4], [0.1, 0.1, 0.1, 0.1]])
    samples = SimpleNamespace(t_mid=torch.tensor([[1.0, 2.0, 3.0, 4.0]] * 2))
    out = {"weights": w, "samples": samples, "depth": (w * samples.t_mid).sum(-1)}
    t = cand._median_depth(out)
    assert float(t[0]) == 3.0  # half the opacity is reached in the third sample (expected depth: 3.0 too)
    assert torch.isnan(t[1])  # a ray less than half opaque has no surface to lift
    skewed = {"weights": torch.tensor([[0.6, 0.0, 0.0, 0.39]]), "samples": SimpleNamespace(
        t_mid=torch.tensor([[1.0, 2.0, 3.0, 9.0]])), "depth": torch.tensor([4.11])}
    assert float(cand._median_depth(skewed)[0]) == 1.0  # the surface, not the mean pulled behind it


def _turned_kf(x: float, yaw_deg: float, depth: float) -> Frame:
    """Camera at (x, 0, 0), turned by yaw about the world y axis; flat depth."""
    a = np.radians(yaw_deg)
    T = np.eye(4)
    T[:3, :3] = [[np.cos(a), 0, np.sin(a)], [0, 1, 0], [-np.sin(a), 0, np.cos(a)]]
    T[0, 3] = x
    return Frame(np.zeros((H, W, 3), np.uint8), INTR, T, 0, np.full((H, W), depth, np.float32))


@pytest.mark.parametrize("chunk", [7, 1 << 19])
def test_seen_pairs_is_the_per_keyframe_loop_of_visible_and_in_view(monkeypatch, chunk):
    """All keyframes at once, in chunks of any size: the same pairs, pixels and distances as calling
    `visible` / `in_view` keyframe by keyframe (a point behind, beside or in front of each surface)."""
    monkeypatch.setattr(cand, "PAIR_CHUNK", chunk)
    rng = np.random.default_rng(0)
    kfs = [_turned_kf(x, yaw, d) for x, yaw, d in ((0.0, 0.0, 2.0), (1.0, -20.0, 1.5), (-0.5, 15.0, 3.0))]
    grids = np.stack([k.depth_m for k in kfs])
    pts = rng.uniform([-2.0, -1.0, -0.5], [2.0, 1.0, 3.5], size=(400, 3))
    for single, test in ((lambda p, kf, g: cand.visible(p, kf, g, 1, CFG), cand.visible_test(CFG)),
                         (lambda p, kf, g: cand.in_view(p, kf, g, 1, 0.1, 0.1), cand.in_view_test(0.1, 0.1))):
        pos, idx, uv, dist = cand.seen_pairs(pts, kfs, grids, 1, test)
        want = []
        for k, kf in enumerate(kfs):
            seen, uv_k, dist_k = single(pts, kf, grids[k])
            hit = np.nonzero(seen)[0]
            want += [(k, i, *uv_k[i], dist_k[i]) for i in hit]
        got = list(zip(pos, idx, uv[:, 0], uv[:, 1], dist, strict=True))
        assert 0 < len(want) < 3 * len(pts)
        assert [g[:2] for g in got] == [w[:2] for w in want]
        np.testing.assert_allclose(np.array([g[2:] for g in got]), np.array([w[2:] for w in want]),
                                   rtol=1e-12, atol=1e-12)
    empty = cand.seen_pairs(np.zeros((0, 3)), kfs, grids, 1, cand.visible_test(CFG))
    assert all(a.shape[0] == 0 for a in empty)


def test_grids_missing_after_a_restart_are_rendered_spread_along_the_drive():
    """The first grids of a restart split the route evenly (in id order they covered only its start)."""
    first = cand.spread_order(np.zeros(96, bool))[:8]
    gaps = np.diff(np.sort(np.concatenate([[-1], first, [96]])))
    assert gaps.max() <= 16, first  # 8 picks leave no stretch of more than 16 keyframes uncovered
    have = np.zeros(96, bool)
    have[:48] = True  # the first half has grids: the second half is split, its far end before its middle
    order = cand.spread_order(have)
    assert sorted(order) == list(range(48, 96)) and order[0] == 95
    assert 65 <= order[1] <= 78, order[:4]
    # the cache's render order follows it; stale rendered grids still come after every missing one
    cache = cand.CandidateCache(CFG, torch.device("cpu"))
    for i in range(4):
        cache.put_grid(i, (np.ones((2, 2), np.float32), 1))
    todo = cache.stale(list(range(10)), 9)
    assert todo[0] == 9 and set(todo[:6]) == set(range(4, 10))
    assert todo[6:] == [0, 1, 2, 3]
