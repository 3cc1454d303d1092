"""3D query with toy embedding fields (nerfacc style): blobs with known embeddings, a perfect field and
one with CLIP-like margins (target ~0.66, look-alike ~0.58, background ~0.5 with noise)."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lerf_ros.core.language import query as query_module
from lerf_ros.core.language.query import MAX_RESULTS_LIMIT, QueryConfig, cluster_labels, locate

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
    assert (res.cloud_relevancy >= 0.5).all()
    # one target, its surface centre and its extent: the blob's bounding box (radius 0.1)
    (t,) = res.targets
    assert t.point_count == 400 and t.confidence == pytest.approx(res.confidence) and res.confidence > 0.99
    np.testing.assert_allclose(t.extent_m, 0.2, atol=0.02)
    assert np.all(t.box_min <= RED_C.numpy()) and np.all(t.box_max >= RED_C.numpy())


def test_finds_blue_and_scale_follows_the_field():
    pts, rgb, views = _scene()
    res = locate(pts, rgb, views, lambda p, s: toy_field(p, s, best_scale=0.8), BLUE, NEGS, CFG)
    assert res.found and res.scale_m == 0.8
    assert np.linalg.norm(res.location_world - BLUE_C.numpy()) < 0.03


def test_absent_query_not_found_with_reason():
    pts, rgb, views = _scene()
    res = locate(pts, rgb, views, toy_field, GREEN, NEGS, CFG)
    assert not res.found and res.location_world is None and res.targets == ()
    assert res.relevancy < 0.5 and "not found" in res.message and res.confidence < 0.01
    assert res.cloud_xyz.shape == (0, 3) and res.cloud_rgb.shape == (0, 3)


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
    assert not res2.found and "not found" in res2.message and res2.confidence < 0.01
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


def test_cluster_labels_are_the_components_of_touching_cells():
    """Against a breadth-first search over the cells (touching: every coordinate within one cell)."""
    g = torch.Generator().manual_seed(4)
    p = torch.rand(400, 3, generator=g) * torch.tensor([1.0, 1.0, 0.2]) - 0.5
    cells = torch.floor(p.double() / 0.04).long().tolist()
    by_cell: dict = {}
    for i, c in enumerate(cells):
        by_cell.setdefault(tuple(c), []).append(i)
    ref, n = [-1] * len(cells), 0
    for start in by_cell:
        if ref[by_cell[start][0]] >= 0:
            continue
        todo = [start]
        while todo:
            c = todo.pop()
            if ref[by_cell[c][0]] >= 0:
                continue
            for i in by_cell[c]:
                ref[i] = n
            todo += [d for d in by_cell if max(abs(a - b) for a, b in zip(c, d, strict=True)) <= 1]
        n += 1
    labels = cluster_labels(p, 0.04).tolist()
    assert 10 < n < 300  # several components, most of several points
    pairs = {(a, b) for a, b in zip(labels, ref, strict=True)}
    assert len(pairs) == n == len(set(labels))  # the same partition


def test_bad_inputs_raise():
    pts, rgb, views = _scene()
    with pytest.raises(ValueError, match="differ"):
        locate(pts, rgb[:-1], views, toy_field, RED, NEGS, CFG)
    with pytest.raises(ValueError, match="text_embed"):
        locate(pts, rgb, views, toy_field, torch.zeros(3), NEGS, CFG)
    with pytest.raises(ValueError, match="embed_fn"):
        locate(pts, rgb, views, lambda p, s: torch.zeros(p.shape[0], 5), RED, NEGS, CFG)
    for thr in (1.5, -0.1, float("nan")):
        with pytest.raises(ValueError, match="threshold"):
            locate(pts, rgb, views, toy_field, RED, NEGS, CFG, threshold=thr)
    for k in (0, MAX_RESULTS_LIMIT + 1, 1.5, True):
        with pytest.raises(ValueError, match="max_results"):
            locate(pts, rgb, views, toy_field, RED, NEGS, CFG, max_results=k)
    with pytest.raises(ValueError, match="scale_range"):
        locate(pts, rgb, views, toy_field, RED, NEGS, CFG, scale_range=np.ones((3, 2)))
    bad = pts.clone()
    bad[0, 0] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        locate(bad, rgb, views, toy_field, RED, NEGS, CFG)
    with pytest.raises(ValueError, match="scales_m"):
        QueryConfig(scales_m=()).validate()
    assert len(QueryConfig().scales_m) == 30


# ---------------------------------------------------------------------------------------------------------
# CLIP-like margins. Axes: 0 red, 1 orange, 2 blue, 3 generic, 4..7 private directions of the negatives.
D = 8
LIKE_NAMES = ("red", "orange", "blue")
K_TEXT = math.sqrt(1 - 0.25)


def like_text(name):
    e = torch.zeros(D)
    e[LIKE_NAMES.index(name)] = K_TEXT
    e[3] = 0.5
    return e


GEN = F.one_hot(torch.tensor(3), D).float()
LIKE_NEGS = torch.stack([F.one_hot(torch.tensor(4 + i), D).float() * K_TEXT + 0.5 * GEN for i in range(4)])
ORANGE_C = torch.tensor([1.0, 0.0, 0.5])  # at the blue blob's place in _scene()
BETA, RHO = 0.0775, 0.49  # pure crop ~0.66 for its own colour, ~0.58 for the related one (red <-> orange)


def like_field(points, scale_m, present=("red", "orange"), fake_at_large_scale=False):
    """A CLIP-like field: embeddings dominated by the generic direction, small colour components, and
    deterministic noise (std ~0.005 in relevancy). fake_at_large_scale: at scales >= 1 m the orange blob
    reads red strongly (what a field extrapolates at a scale it was never trained at)."""
    e = torch.zeros(points.shape[0], D)
    e[:, 3] = 1.0
    w = math.exp(-(math.log(scale_m / 0.2) ** 2))
    if "red" in present:
        in_red = ((points - RED_C).norm(dim=1) < 0.12).float()
        e[:, 0] += BETA * w * in_red
        e[:, 1] += BETA * RHO * w * in_red
    if "orange" in present:
        in_or = ((points - ORANGE_C).norm(dim=1) < 0.17).float()
        e[:, 1] += BETA * w * in_or
        e[:, 0] += BETA * RHO * w * in_or
        if fake_at_large_scale and scale_m >= 1.0:
            e[:, 0] += 4 * BETA * in_or
    g = torch.Generator().manual_seed(int(scale_m * 1000))
    noise = torch.randn(points.shape[0], 3, generator=g)
    e[:, :3] += 0.002 * noise + 0.0015 * torch.sin(points * 37.0)
    return F.normalize(e, dim=1)


def _like_locate(query, field=like_field, **kw):
    pts, rgb, views = _scene()
    names = ["red", "orange", "blue", "chair"]
    chair = torch.tensor([0, 0, 0, 0.5, 0, 0, 0, K_TEXT])
    comps = torch.stack([like_text(n) if n in LIKE_NAMES else chair for n in names])
    kw.setdefault("competitor_embeds", comps)
    kw.setdefault("competitor_names", names)
    return locate(pts, rgb, views, field, like_text(query), LIKE_NEGS, CFG, query_text=query, **kw)


def test_cliplike_margins_pick_the_named_object_not_its_look_alike():
    for query, centre in (("red", RED_C), ("orange", ORANGE_C)):
        res = _like_locate(query)
        assert res.found, res.message
        assert np.linalg.norm(res.location_world - centre.numpy()) < 0.03, (query, res.location_world)
        assert 0.6 < res.relevancy < 0.7 and res.confidence > 0.5


def test_look_alike_absent_is_rejected_because_a_competing_phrase_explains_the_peak():
    only_red = lambda p, s: like_field(p, s, present=("red",))  # noqa: E731
    res = _like_locate("orange", field=only_red)
    assert not res.found and res.competitor == "red", res.message
    assert 0.55 < res.relevancy < 0.62  # the look-alike scores like a related concept does
    # without competing phrases the same peak would have been taken for an orange object
    naive = _like_locate("orange", field=only_red, competitor_embeds=None, competitor_names=())
    assert naive.found and naive.confidence > res.confidence + 0.4
    # an unrelated absent name stands out nowhere
    assert not _like_locate("blue").found


def test_scales_a_point_was_never_trained_at_are_not_searched():
    fake = lambda p, s: like_field(p, s, fake_at_large_scale=True)  # noqa: E731
    pts, _, _ = _scene()
    wrong = _like_locate("red", field=fake)
    assert np.linalg.norm(wrong.location_world - ORANGE_C.numpy()) < 0.05  # fooled by the 1.6 m scale
    # every point was seen from 1-2 m with tiles of 0.05-0.2 of the image height: trained at <= 0.4 m
    rng = np.tile([[0.05, 0.4]], (pts.shape[0], 1))
    right = _like_locate("red", field=fake, scale_range=rng)
    assert right.found and np.linalg.norm(right.location_world - RED_C.numpy()) < 0.03
    assert right.scale_m <= 0.4 * CFG.scale_slack


TWIN_C = torch.tensor([0.0, -0.8, 0.2])


def _two_reds_scene():
    """The toy scene with a second, weaker red sphere at TWIN_C: (points, rgb, views, field)."""
    pts, rgb, views = _scene()
    twin = _sphere(TWIN_C, 0.1, 400, 5)
    pts2 = torch.cat([pts, twin])
    rgb2 = torch.cat([rgb, torch.full((400, 3), 200, dtype=torch.uint8)])
    views2 = torch.cat([views, torch.full((400,), 5)])

    def two_reds(p, s):
        e = toy_field(p, s)
        in_twin = ((p - TWIN_C).norm(dim=1) < 0.12).unsqueeze(1)
        return torch.where(in_twin, F.normalize(GENERIC + 1.5 * RED, dim=0).expand_as(e), e)

    return pts2, rgb2, views2, two_reds


def test_several_instances_best_first():
    pts2, rgb2, views2, two_reds = _two_reds_scene()
    twin_c = TWIN_C
    one = locate(pts2, rgb2, views2, two_reds, RED, NEGS, CFG)
    both = locate(pts2, rgb2, views2, two_reds, RED, NEGS, CFG, max_results=2)
    assert len(one.targets) == 1 and len(both.targets) == 2
    first, second = both.targets
    assert np.linalg.norm(first.location_world - RED_C.numpy()) < 0.03  # the stronger one first
    assert np.linalg.norm(second.location_world - twin_c.numpy()) < 0.03
    assert first.relevancy > second.relevancy and second.point_count == 400
    assert np.allclose(one.location_world, first.location_world)


def test_confidences_that_publish_equal_are_ordered_by_relevancy(monkeypatch):
    """Messages carry float32: a confidence of 1 - 1e-9 is published as 1.0. Targets whose published
    confidences tie come in relevancy order, as a caller reading the numbers expects (the stronger red's
    confidence is lowered by 1e-9; ordered by the float64 value, the weaker one would come first)."""
    pts2, rgb2, views2, two_reds = _two_reds_scene()
    bound = query_module._bound

    def nearly_one_for_the_stronger(score, med, spread, ex):
        b, z = bound(score, med, spread, ex)
        return (b - 1e-9 if score > 0.97 and b > 1 - 1e-6 else b), z  # red 0.99, twin 0.94

    monkeypatch.setattr(query_module, "_bound", nearly_one_for_the_stronger)
    both = locate(pts2, rgb2, views2, two_reds, RED, NEGS, CFG, max_results=2)
    assert [t.confidence < 1.0 for t in both.targets] == [True, False]  # the patch reached the stronger
    assert [np.float32(t.confidence) for t in both.targets] == [1.0, 1.0]
    assert both.targets[0].relevancy > both.targets[1].relevancy
    assert np.linalg.norm(both.targets[0].location_world - RED_C.numpy()) < 0.03
    one = locate(pts2, rgb2, views2, two_reds, RED, NEGS, CFG)  # the tie is weighed for one result too
    assert np.allclose(one.location_world, both.targets[0].location_world)


def test_evidence_is_weighed_only_for_clusters_that_can_change_the_answer():
    """Two red blobs, both found: for one result the view evidence of the weaker one cannot change the
    answer and is not computed; for two results it is."""
    pts, rgb, views = _scene()
    twin_c = torch.tensor([0.0, -0.8, 0.2])
    pts2 = torch.cat([pts, _sphere(twin_c, 0.1, 400, 5)])
    rgb2 = torch.cat([rgb, torch.full((400, 3), 200, dtype=torch.uint8)])
    views2 = torch.cat([views, torch.full((400,), 5)])
    calls = []

    def two_reds(p, s):  # the twin is weakly red: confidence 0.9995 against the first one's 1.0
        e = toy_field(p, s)
        in_twin = ((p - twin_c).norm(dim=1) < 0.12).unsqueeze(1)
        return torch.where(in_twin, F.normalize(GENERIC + 1.05 * RED, dim=0).expand_as(e), e)

    def view_fn(p, s):  # the views agree with the field
        calls.append(p.shape[0])
        return two_reds(p, s), torch.arange(p.shape[0]) % 3

    both = locate(pts2, rgb2, views2, two_reds, RED, NEGS, CFG, view_fn=view_fn, max_results=2)
    assert len(both.targets) == 2 and len(calls) == 2
    calls.clear()
    one = locate(pts2, rgb2, views2, two_reds, RED, NEGS, CFG, view_fn=view_fn)
    assert len(one.targets) == 1 and len(calls) == 1
    np.testing.assert_allclose(one.location_world, both.targets[0].location_world)
    # nothing found (the views halve both confidences, below a 0.6 threshold): the twin's bound (0.9995)
    # beats the first one's weighed confidence (0.5), so it is weighed too, and the best rejected is reported
    calls.clear()

    def disagree(p, s):
        calls.append(p.shape[0])
        return GENERIC.expand(p.shape[0], 4), torch.arange(p.shape[0]) % 3

    none = locate(pts2, rgb2, views2, two_reds, RED, NEGS, CFG, threshold=0.6, view_fn=disagree)
    assert not none.found and len(calls) == 2
    assert none.confidence == pytest.approx(0.5, abs=1e-3)
    assert none.relevancy == pytest.approx(0.989, abs=1e-3)


def test_views_that_do_not_support_a_field_peak_lower_its_confidence():
    def agree(p, s):
        return like_field(p, s), torch.arange(p.shape[0]) % 3

    def disagree(p, s):
        return F.normalize(torch.tensor([0, 0, 0, 1.0, 0, 0, 0, 0]), dim=0).expand(p.shape[0], D), \
            torch.arange(p.shape[0]) % 3

    yes = _like_locate("red", view_fn=agree)
    no = _like_locate("red", view_fn=disagree)
    assert yes.targets[0].view_support == 1.0 and yes.found
    assert no.confidence < 0.6 * yes.confidence
    assert not math.isfinite(_like_locate("red").targets[0].view_support)  # no view_fn: no view evidence


def test_one_object_larger_than_the_growth_radius_gives_one_target_and_its_halo_none():
    """A 1.2 m red bench (far longer than 1.5 x its scale) with two relevancy peaks along it, and a weak red
    halo on the floor just beside it: "all the red things" must be the bench once, not three targets."""
    x = torch.linspace(-0.6, 0.6, 121)
    bench = torch.stack([x, torch.zeros_like(x), torch.full_like(x, 0.4)], dim=1)
    bench = torch.cat([bench + torch.tensor([0.0, dy, 0.0]) for dy in (-0.02, 0.0, 0.02)])
    u = torch.linspace(-1.0, 1.0, 41)
    floor = torch.stack(torch.meshgrid(u, u, indexing="ij"), dim=-1).reshape(-1, 2)
    floor = torch.cat([floor, torch.zeros(floor.shape[0], 1)], dim=1)
    pts = torch.cat([bench, floor])
    rgb = torch.full((pts.shape[0], 3), 100, dtype=torch.uint8)
    views = torch.full((pts.shape[0],), 5)
    halo_c = torch.tensor([0.05, 0.0, 0.0])  # on the floor, 0.4 m under the bench's middle

    def field(p, s):
        on_bench = (p[:, 2] > 0.3).float()
        # two peaks along the bench (at x = -0.4 and +0.4), a sag between them well above the floor
        w = 1.2 + 0.8 * torch.exp(-((p[:, 0].abs() - 0.4) / 0.1) ** 2)
        halo = 0.9 * ((p - halo_c).norm(dim=1) < 0.1).float()
        e = GENERIC + (on_bench * w + halo).unsqueeze(1) * RED
        return F.normalize(e, dim=1)

    cfg = QueryConfig(voxel_m=0.0, cluster_radius_m=0.05, scales_m=(0.1, 0.2))
    r = locate(pts, rgb, views, field, RED, NEGS, cfg, max_results=5)
    assert r.found and len(r.targets) == 1, [t.location_world for t in r.targets]
    t = r.targets[0]
    assert t.location_world[2] == pytest.approx(0.4, abs=1e-4) and abs(t.location_world[0]) > 0.2
    # a second bench 1 m away is another instance, still reported
    twin = bench + torch.tensor([0.0, 0.9, 0.0])
    pts2 = torch.cat([pts, twin])
    r2 = locate(pts2, torch.full((pts2.shape[0], 3), 100, dtype=torch.uint8),
                torch.full((pts2.shape[0],), 5), field, RED, NEGS, cfg, max_results=5)
    assert len(r2.targets) == 2
    assert sorted(round(float(t.location_world[1]), 1) for t in r2.targets) == [0.0, 0.9]
    # refine_fn is asked once per found target with that target's own cluster points
    calls = []

    def refine(location, scale_m, points):
        calls.append((location.copy(), points.copy()))

    r3 = locate(pts2, torch.full((pts2.shape[0], 3), 100, dtype=torch.uint8), torch.full((pts2.shape[0],), 5),
                field, RED, NEGS, cfg, max_results=5, refine_fn=refine)
    assert len(calls) == len(r3.targets) == 2
    for (location, points), t in zip(calls, r3.targets, strict=True):
        np.testing.assert_allclose(location, t.location_world)
        np.testing.assert_allclose([points.min(axis=0), points.max(axis=0)], [t.box_min, t.box_max],
                                   atol=1e-6)
        assert points.shape == (t.point_count, 3)


def test_refine_fn_moves_found_targets_and_their_boxes_but_not_rejected_ones():
    pts, rgb, views = _scene()
    calls = []

    def refine(location, scale_m, points):
        calls.append((location.copy(), scale_m, points.copy()))
        return location + np.array([0.0, 0.0, 0.1])

    base = locate(pts, rgb, views, toy_field, RED, NEGS, CFG)
    res = locate(pts, rgb, views, toy_field, RED, NEGS, CFG, refine_fn=refine)
    (t0,), (t,) = base.targets, res.targets
    up = np.array([0.0, 0.0, 0.1])
    np.testing.assert_allclose(res.location_world, t0.location_world + up)
    np.testing.assert_allclose(t.location_world, res.location_world)
    np.testing.assert_allclose([t.box_min, t.box_max], [t0.box_min + up, t0.box_max + up])
    np.testing.assert_allclose(t.extent_m, t0.extent_m)
    assert len(calls) == 1 and calls[0][1] == t0.scale_m
    np.testing.assert_allclose(np.ptp(calls[0][2], axis=0), t0.extent_m, atol=1e-6)  # the cluster's points
    assert calls[0][2].shape == (t0.point_count, 3)
    # None (the views cannot place it) keeps the cluster's centre; a rejected query is never refined
    kept = locate(pts, rgb, views, toy_field, RED, NEGS, CFG, refine_fn=lambda p, s, e: None)
    np.testing.assert_allclose(kept.location_world, t0.location_world)
    calls.clear()
    absent = locate(pts, rgb, views, toy_field, GREEN, NEGS, CFG, refine_fn=refine)
    assert not absent.found and calls == []


def test_a_caller_that_uses_only_found_answers_scores_nothing_that_cannot_be_found():
    """``report_rejected=False`` (the engine's views pass, used only when it finds something): the same
    found answer; a threshold no cluster's confidence bound reaches scores no cluster (no view evidence,
    no member embeddings) and names no rejected candidate. With the default the best rejected one is
    scored and reported."""
    calls = []

    def agree(p, s):
        calls.append(p.shape[0])
        return like_field(p, s), torch.arange(p.shape[0]) % 3

    full = _like_locate("red", view_fn=agree)
    lean = _like_locate("red", view_fn=agree, report_rejected=False)
    assert full.found and lean.found
    np.testing.assert_allclose(lean.location_world, full.location_world)
    assert lean.confidence == full.confidence and lean.competitor == full.competitor
    # the cluster's confidence before its evidence (no competing phrases, no views) is its bound
    bound = _like_locate("red", competitor_embeds=None, competitor_names=()).confidence
    assert 0.5 < bound < 1.0
    calls.clear()
    rejected = _like_locate("red", view_fn=agree, threshold=1.0)
    assert not rejected.found and calls and rejected.confidence > 0.0 and rejected.competitor
    calls.clear()
    skipped = _like_locate("red", view_fn=agree, threshold=1.0, report_rejected=False)
    assert not skipped.found and calls == [] and skipped.confidence == 0.0 and not skipped.targets


def test_a_cluster_too_small_to_reach_the_threshold_is_not_scored_for_a_found_only_caller():
    """A two-point red speck on a floor: the highest relevancy could reach the threshold, the speck's
    top-5 score (two members, padded) cannot. By default it is scored and reported as the best rejected
    candidate; with ``report_rejected=False`` it is not scored (no view evidence) and nothing is reported."""
    u = torch.linspace(-1.0, 1.0, 41)
    floor = torch.stack(torch.meshgrid(u, u, indexing="ij"), dim=-1).reshape(-1, 2)
    floor = torch.cat([floor, torch.zeros(floor.shape[0], 1)], dim=1)
    speck_c = torch.tensor([0.32, 0.32, 0.01])
    pts = torch.cat([floor, speck_c + torch.tensor([[0.0, 0.0, 0.0], [0.01, 0.0, 0.0]])])
    rgb = torch.full((pts.shape[0], 3), 100, dtype=torch.uint8)
    views = torch.full((pts.shape[0],), 5)

    def field(p, s):
        on = ((p - speck_c).norm(dim=1) < 0.02).float().unsqueeze(1)
        return F.normalize(GENERIC + 2 * on * RED, dim=1)

    calls = []

    def view_fn(p, s):
        calls.append(p.shape[0])
        return field(p, s), torch.arange(p.shape[0]) % 3

    full = locate(pts, rgb, views, field, RED, NEGS, CFG, view_fn=view_fn)
    assert not full.found and calls and 0.3 < full.relevancy < 0.45  # 2 x 0.989 / 5
    calls.clear()
    lean = locate(pts, rgb, views, field, RED, NEGS, CFG, view_fn=view_fn, report_rejected=False)
    assert not lean.found and calls == [] and "no candidate can reach" in lean.message, lean.message


def test_locate_reads_what_an_embed_fn_keeps_for_the_scale_search(monkeypatch):
    """An embed_fn's ``closest`` (each point's closest negative per scale) is what the scale search uses, and
    its ``verified`` embeddings are not checked for finiteness again."""
    from lerf_ros.core.language import query as query_mod

    pts, rgb, views = _scene()
    assert locate(pts, rgb, views, toy_field, RED, NEGS, CFG).found

    def kept(p, s):
        return toy_field(p, s)

    kept.closest = lambda p, s, negs: torch.full((p.shape[0],), 2.0)  # closer than any text can be
    assert not locate(pts, rgb, views, kept, RED, NEGS, CFG).found  # it was used: nothing stands out
    checks = []
    real = query_mod._all_finite
    monkeypatch.setattr(query_mod, "_all_finite", lambda t: checks.append(t.shape[0]) or real(t))
    locate(pts, rgb, views, toy_field, RED, NEGS, CFG)
    unchecked = len(checks)
    checks.clear()
    toy_field_verified = lambda p, s: toy_field(p, s)  # noqa: E731
    toy_field_verified.verified = lambda p, s: True
    locate(pts, rgb, views, toy_field_verified, RED, NEGS, CFG)
    assert len(checks) == unchecked - len(CFG.scales_m)  # the scale search's embeddings were not summed


def test_clusters_seeded_down_to_a_floor_are_the_first_clusters_of_the_full_search():
    """The clustering's ``floor`` stops seeding below a relevancy: the clusters before it are the same as
    without it (a later seed cannot change an earlier cluster)."""
    from lerf_ros.core.language.query import _clusters

    pts, _, _ = _scene()
    twin_c = torch.tensor([0.0, -0.8, 0.2])
    pts = torch.cat([pts, _sphere(twin_c, 0.1, 400, 5)])
    near = lambda c, r: ((pts - c).norm(dim=1) < r).float()  # noqa: E731
    rel = 0.5 + 0.3 * near(RED_C, 0.12) + 0.2 * near(twin_c, 0.12) + 0.1 * near(BLUE_C, 0.17)
    rel = rel + 0.002 * torch.sin(pts * 37.0).sum(dim=1)
    scale = torch.full((pts.shape[0],), 0.2)
    med = float(rel.median())
    args = (pts, rel, med, 0.01, scale, 0.05, CFG, 5)
    every = _clusters(*args)
    assert len(every) == 3 and [c.score for c in every] == sorted((c.score for c in every), reverse=True)
    for floor, n in ((0.65, 2), (0.75, 1), (0.9, 0)):
        some = _clusters(*args, floor)
        assert len(some) == n
        for a, b in zip(some, every, strict=False):
            assert a.peak == b.peak and torch.equal(a.members, b.members)
