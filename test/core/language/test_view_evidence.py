"""Multi-view placement of an answer (`view_evidence.refine_fn`): keyframes of the demo room with the
demo colour encoder; the depth grids are the rendered truth, the starting guess is wrong along a ray."""

import dataclasses
import functools

import numpy as np
import pytest
import torch

from lerf_ros.core.encoders import DEMO_CLIP, load_encoder
from lerf_ros.core.language import candidates, view_evidence
from lerf_ros.core.language.candidates import CandidateSet
from lerf_ros.core.language.pyramid import ClipPyramid
from lerf_ros.core.language.relevancy import CANONICAL_NEGATIVES, relevancy
from lerf_ros.core.presets import make_preset
from lerf_ros.sim.scene import SyntheticRoom, default_intrinsics, look_at_pose, make_frames

CFG = make_preset("tiny")
GROW = 0.05
AROUND = (120, 150, 180, 210, 240, 270)  # the scene's view azimuths, degrees


@functools.cache
def _looking_at_the_red_box(distance_m: float | tuple[float, ...], degrees: tuple[float, ...],
                            size_m: float | None = None):
    """Keyframes of the demo room looking at its red box from ``distance_m`` (horizontally, 0.9 m above it;
    one for all, or one per view) at each azimuth, with their pyramids and their true depth as the
    candidates' grids (made once per
    arguments: the module's tests read them, none changes them). ``size_m``: the box shrunk to a cube of
    that side, resting on the floor where the box stands (None: the demo's 40 cm box)."""
    room = SyntheticRoom(0)
    obj = next(o for o in room.objects if o.name == "red box")
    if size_m is not None:
        centre = np.array([obj.center[0], obj.center[1], size_m / 2.0])
        half = np.full(3, size_m / 2.0)
        obj = dataclasses.replace(obj, center=centre, size=2.0 * half, box_min=centre - half,
                                  box_max=centre + half)
        room.objects = tuple(obj if o.name == "red box" else o for o in room.objects)
    dists = distance_m if isinstance(distance_m, tuple) else (distance_m,) * len(degrees)
    eyes = [obj.center + np.array([r * np.cos(a), r * np.sin(a), 0.9])
            for r, a in zip(dists, np.radians(degrees), strict=True)]
    frames = make_frames(room, [look_at_pose(e, obj.center) for e in eyes], default_intrinsics(96, 72))
    enc = load_encoder(DEMO_CLIP)
    pyr = ClipPyramid(enc, CFG.pyramid, "cpu")
    for i, f in enumerate(frames):
        pyr.add(i, f.image)
    stride = CFG.candidates.pixel_stride
    cset = CandidateSet(np.zeros((0, 3)), np.zeros((0, 3), np.uint8), np.zeros(0, np.int64), "test",
                        grid_ids=np.arange(len(frames)),
                        grids=np.stack([f.depth_m[::stride, ::stride] for f in frames]))
    return room, obj, eyes, frames, enc, pyr, cset


@pytest.fixture(scope="module")
def scene():
    room, obj, eyes, frames, enc, pyr, cset = _looking_at_the_red_box(1.4, AROUND)
    # RGB-only keyframes: the grids stand for rendered depth (here the truth).
    rgb_only = [(i, dataclasses.replace(f, depth_m=None)) for i, f in enumerate(frames)]
    return room, obj, eyes, enc, pyr, cset, rgb_only


def _fn(scene, text, radius=0.4, window_m=0.3, min_views=3, kfs=None, box=None):
    """`refine_fn` on the scene's RGB-only keyframes (or ``kfs``); ``window_m`` 0: the hull alone."""
    _, _, _, enc, pyr, cset, scene_kfs = scene
    emb = enc.encode_texts([text, *CANONICAL_NEGATIVES]).float()
    return view_evidence.refine_fn(cset, scene_kfs if kfs is None else kfs, pyr, CFG.candidates, emb[0],
                                   emb[1:], CFG.query.temperature, radius, 0.03, min_views=min_views, box=box,
                                   window_m=window_m)


def _inside(obj, p):
    return bool(np.all(p >= obj.box_min - GROW) and np.all(p <= obj.box_max + GROW))


def test_an_answer_placed_too_deep_along_a_ray_moves_back_into_the_object(scene):
    _, obj, eyes, *_ = scene
    ray = obj.center - eyes[2]
    start = obj.center + 0.3 * ray / np.linalg.norm(ray)  # 30 cm behind the box centre along one view
    assert not _inside(obj, start)
    out = _fn(scene, "red box")(start, 0.1)
    assert out is not None
    assert _inside(obj, out), (out, obj.center)
    assert np.linalg.norm(out - obj.center) < 0.5 * np.linalg.norm(start - obj.center)


def test_with_triangulation_off_the_hull_moves_a_deep_answer_back_into_the_object(scene):
    _, obj, eyes, *_ = scene
    ray = obj.center - eyes[2]
    start = obj.center + 0.3 * ray / np.linalg.norm(ray)
    out = _fn(scene, "red box", window_m=0.0)(start, 0.1)
    assert out is not None and _inside(obj, out), (out, obj.center)


def test_where_the_rays_give_nothing_the_hull_is_not_asked(scene):
    """One view: no triangulation (it needs two rays). The hull alone would place the answer from that view
    (min_views 1); with triangulation on, the cluster's centre stands (None): over the quality benchmark's
    138 maps the hull fallback never moved an answer into its object's box, and moved one object out (in
    two conditions)."""
    _, obj, *_, kfs = scene
    start = obj.center + np.array([0.0, 0.0, 0.25])
    assert _fn(scene, "red box", window_m=0.0, min_views=1, kfs=kfs[2:3])(start, 0.1) is not None
    assert _fn(scene, "red box", window_m=0.3, min_views=1, kfs=kfs[2:3])(start, 0.1) is None


@pytest.mark.parametrize("window_m", [0.3, 0.0])  # triangulation, the hull alone
def test_a_concept_no_view_supports_is_not_moved(scene, window_m):
    _, obj, *_ = scene
    assert _fn(scene, "purple torus", window_m=window_m)(obj.center + 0.2, 0.1) is None


@pytest.mark.parametrize("window_m", [0.3, 0.0])
def test_no_views_reach_the_region(scene, window_m):
    _, obj, *_ = scene
    far = obj.center + np.array([0.0, 0.0, 30.0])  # far above every camera's field of view
    assert _fn(scene, "red box", window_m=window_m)(far, 0.1) is None


def test_the_box_clips_the_search(scene):
    _, obj, *_ = scene
    start = obj.center + 0.2
    # the hull searches only inside the box: with the object's far half (+x) in it, the answer lies there
    lo = np.array([obj.center[0] + 0.1, obj.box_min[1] - 0.5, obj.box_min[2] - 0.5])
    out = _fn(scene, "red box", window_m=0.0, box=(lo, obj.box_max + 0.5))(start, 0.1)
    assert out is not None and np.all(out >= lo - 1e-9), out
    # the rays meet at the object's centre, outside that box: refused
    assert _fn(scene, "red box", box=(lo, obj.box_max + 0.5))(start, 0.1) is None
    assert _inside(obj, _fn(scene, "red box")(start, 0.1))


def test_pyramid_cell_relevancy_matches_the_relevancy_of_sampled_embeddings_at_crop_centres(scene):
    """`sample_cells` of crop relevancies == relevancy of `sample` where a crop centre and a level are hit."""
    _, _, _, enc, pyr, *_ = scene
    emb = enc.encode_texts(["red box", *CANONICAL_NEGATIVES]).float()
    lv = pyr.levels(72, 96)[1]
    frac = torch.tensor([CFG.pyramid.tile_fracs[1]] * 3)
    uv = torch.tensor([[lv.centre0[0] + j * lv.stride_px, lv.centre0[1] + i * lv.stride_px]
                       for i, j in ((0, 0), (1, 2), (lv.ny - 1, lv.nx - 1))], dtype=torch.float32)
    def cell_fn(g):
        return relevancy(torch.nn.functional.normalize(g, dim=1), emb[0], emb[1:])

    for kf in (0, 2):
        values = pyr.cell_values(kf, cell_fn)
        got = pyr.sample_cells(kf, values, uv, frac)
        want = relevancy(pyr.sample(torch.full((3,), kf), uv, frac), emb[0], emb[1:])
        torch.testing.assert_close(got, want, atol=2e-3, rtol=0)


def test_views_relevancy_is_high_on_the_named_object_and_low_elsewhere(scene):
    room, obj, _, enc, pyr, cset, kfs = scene
    other = next(o for o in room.objects if o.name == "magenta cylinder")
    emb = enc.encode_texts(["red box", *CANONICAL_NEGATIVES]).float()
    fn = view_evidence.views_relevancy_fn(cset, kfs, pyr, CFG.candidates, emb[0], emb[1:],
                                          CFG.query.temperature)
    up = np.array([0.0, 0.0, 1.0])  # the top faces every camera looks down on
    points = torch.tensor(np.stack([obj.center + up * obj.size[2] / 2, other.center + up * other.size[2] / 2,
                                    [0.0, 0.0, 30.0]]), dtype=torch.float32)
    for scale in (0.1, 0.3):
        r = fn(points, scale)
        assert r.shape == (3,) and torch.isfinite(r).all()
        assert r[0] > 0.8 and r[1] < 0.5, (scale, r)
        assert r[2] == r[:2].median()  # seen by no keyframe: the median of the others
    # the same points tensor for every scale: visibility is worked out once
    assert fn(points, 0.2).shape == (3,)


def _surface_points(cset, kfs, every=3):
    stride = CFG.candidates.pixel_stride
    pts = np.concatenate([candidates.lift_depth(kf, stride, grid=cset.grids[i]) for i, kf in kfs])
    return torch.tensor(np.concatenate([pts[::every], [[0.0, 0.0, 30.0]]]), dtype=torch.float32)


def _views_relevancy_by_loop(points, scale, cset, kfs, pyr, text, negs):
    """The views' relevancy spelt out keyframe by keyframe (`visible`, `sample_cells`, weights 1 / 1e-3)."""
    pts = points.double().numpy()
    total, weight = np.zeros(len(pts)), np.zeros(len(pts))
    lo = CFG.pyramid.tile_fracs[0] / view_evidence.FRAC_SLACK
    hi = CFG.pyramid.tile_fracs[-1] * view_evidence.FRAC_SLACK
    def cell_fn(g):
        return relevancy(torch.nn.functional.normalize(g, dim=1), text, negs, CFG.query.temperature)

    for i, kf in kfs:
        seen, uv, dist = candidates.visible(pts, kf, cset.grids[i], CFG.candidates.pixel_stride,
                                            CFG.candidates)
        idx = np.nonzero(seen)[0]
        frac = scale * kf.intrinsics.fy / (kf.intrinsics.height * dist[idx])
        w = np.where((frac >= lo) & (frac <= hi), 1.0, 1e-3)
        r = pyr.sample_cells(i, pyr.cell_values(i, cell_fn), torch.from_numpy(uv[idx]).float(),
                             torch.from_numpy(frac).float()).double().numpy()
        np.add.at(total, idx, r * w)
        np.add.at(weight, idx, w)
    out = np.where(weight > 0, total / np.maximum(weight, 1e-12), np.nan)
    seen = np.sort(out[weight > 0])
    out[weight == 0] = seen[(seen.size - 1) // 2]  # torch's median: the lower middle value
    return out


def test_views_relevancy_is_the_weighted_mean_of_every_views_crop_relevancy(scene):
    """`ViewIndex` (all keyframes in one gather, blend plans per scale) gives what the keyframe-by-keyframe
    loop gives, at scales inside and outside the views' tile ranges."""
    _, _, _, enc, pyr, cset, kfs = scene
    emb = enc.encode_texts(["red box", *CANONICAL_NEGATIVES]).float()
    points = _surface_points(cset, kfs)
    fn = view_evidence.views_relevancy_fn(cset, kfs, pyr, CFG.candidates, emb[0], emb[1:],
                                          CFG.query.temperature)
    for scale in (0.03, 0.1, 0.25, 0.6, 2.0):
        want = _views_relevancy_by_loop(points, scale, cset, kfs, pyr, emb[0], emb[1:])
        got = fn(points, scale).double().numpy()
        assert got.shape == want.shape and np.isfinite(got).all()
        np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
        assert scale != 0.1 or got.max() > 0.8  # the box is among the points


def test_view_index_cache_serves_the_same_points_until_the_views_change(scene):
    _, _, _, enc, pyr, cset, kfs = scene
    emb = enc.encode_texts(["red box", "green sphere", *CANONICAL_NEGATIVES]).float()
    points = _surface_points(cset, kfs, every=5)
    cache = view_evidence.ViewIndexCache()

    def rel(text, pts, c=cset, p=pyr, frames=kfs, index_cache=cache):
        return view_evidence.views_relevancy_fn(c, frames, p, CFG.candidates, text, emb[2:],
                                                CFG.query.temperature, index_cache=index_cache)(pts, 0.1)

    a = rel(emb[0], points)
    b = rel(emb[1], points.clone())  # another query, the same points by content: the index is reused
    assert cache.hits == 1 and not torch.equal(a, b)
    torch.testing.assert_close(rel(emb[0], points), a, atol=0, rtol=0)
    assert cache.hits == 2
    rel(emb[0], points[:-1])  # other points
    rel(emb[0], points[:-1], c=dataclasses.replace(cset))  # another candidate set
    rel(emb[0], points[:-1], frames=kfs[:-1])  # a keyframe fewer
    assert cache.hits == 2
    # a keyframe's pyramid computed again from another image: not the index it was built with
    other = ClipPyramid(enc, CFG.pyramid, "cpu")
    for i, kf in kfs:
        other.add(i, kf.image if i else np.ascontiguousarray(kf.image[:, ::-1]))
    rel(emb[0], points[:-1], p=other)
    assert cache.hits == 2
    # over its budget an index is built, used and not kept
    small = view_evidence.ViewIndexCache(budget_bytes=0)
    torch.testing.assert_close(rel(emb[0], points, index_cache=small), a, atol=0, rtol=0)
    rel(emb[0], points, index_cache=small)
    assert small.hits == 0


def test_a_kept_view_index_serves_concurrent_queries(scene):
    """A kept `ViewIndex` is shared by the queries that run at once outside the engine lock (the query
    node's warm-up and a planner's first query): plans made and counted by several threads at a time
    raise nothing and are the plans one thread makes (CI once saw "dictionary changed size during
    iteration" from a query racing the warm-up)."""
    import sys
    import threading

    _, _, _, _, pyr, cset, kfs = scene
    points = _surface_points(cset, kfs, every=5)
    index = view_evidence.ViewIndex(points, cset, dict(kfs), pyr, CFG.candidates)
    scales = [float(s) for s in np.geomspace(0.02, 2.0, 240)]
    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # threads switch between nearly every bytecode: the race shows at once
    errors = []

    def work(k):
        try:
            for s in scales[k::4] + scales:
                index.plan(s)
                assert index.nbytes > 0
        except Exception as exc:  # any error here is the failure
            errors.append(exc)

    try:
        threads = [threading.Thread(target=work, args=(k,)) for k in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        sys.setswitchinterval(old)
    assert errors == []
    alone = view_evidence.ViewIndex(points, cset, dict(kfs), pyr, CFG.candidates)
    for s in scales[::40]:
        a, b = index.plan(s), alone.plan(s)
        torch.testing.assert_close(a[0].to_dense(), b[0].to_dense(), atol=0, rtol=0)
        assert torch.equal(a[1], b[1])


def test_triangulation_pins_an_answer_placed_in_front_of_the_object_along_each_view(scene):
    _, obj, eyes, enc, pyr, cset, kfs = scene
    emb = enc.encode_texts(["red box", *CANONICAL_NEGATIVES]).float()
    cells = view_evidence._CellRelevancy(pyr, emb[0], emb[1:], CFG.query.temperature)
    tri = view_evidence.triangulate_fn(cset, kfs, pyr, CFG.candidates, cells, 0.3)
    for eye in eyes:
        ray = obj.center - eye
        start = obj.center - 0.3 * ray / np.linalg.norm(ray)  # 30 cm short of the centre along this view
        out = tri(start, 0.1)
        assert out is not None
        assert np.linalg.norm(out - obj.center) < 0.04, (out, obj.center)
    assert tri(obj.center + np.array([0.0, 0.0, 30.0]), 0.1) is None  # no view reaches it
    # a concept the views do not show there: no ray, no placement
    emb = enc.encode_texts(["purple torus", *CANONICAL_NEGATIVES]).float()
    cells = view_evidence._CellRelevancy(pyr, emb[0], emb[1:], CFG.query.temperature)
    assert view_evidence.triangulate_fn(cset, kfs, pyr, CFG.candidates, cells, 0.3)(obj.center, 0.1) is None


def test_triangulation_keeps_its_first_answer_near_the_start_and_its_second_near_the_first(scene,
                                                                                        monkeypatch):
    """The first pass must land within ``reach_m`` of where the answer started (else the rays met on
    something else: None), unless it pins its depth within TRI_PIN_M and the start lies behind it as the
    cameras look (an RGB-only cluster on floaters behind its object); the re-centred second pass counts only
    within the window of the first."""
    _, obj, eyes, enc, pyr, cset, kfs = scene
    emb = enc.encode_texts(["red box", *CANONICAL_NEGATIVES]).float()
    cells = view_evidence._CellRelevancy(pyr, emb[0], emb[1:], CFG.query.temperature)
    ray = obj.center - eyes[2]
    start = obj.center - 0.3 * ray / np.linalg.norm(ray)  # short of the box along one view: rays reach it
    assert view_evidence.triangulate_fn(cset, kfs, pyr, CFG.candidates, cells, 0.3)(start, 0.1) is not None
    answers = []
    real = view_evidence.closest_point

    def scripted(rays, min_rays=2):
        real(rays, min_rays)
        return answers.pop(0)

    monkeypatch.setattr(view_evidence, "closest_point", scripted)
    tri = view_evidence.triangulate_fn(cset, kfs, pyr, CFG.candidates, cells, 0.3, reach_m=0.5)
    first = start + np.array([0.2, 0.0, 0.0])
    answers[:] = [first, first + np.array([0.0, 0.1, 0.0])]  # second within the window: it stands
    np.testing.assert_allclose(tri(start, 0.1), first + np.array([0.0, 0.1, 0.0]))
    answers[:] = [first, first + np.array([0.0, 0.4, 0.0])]  # second beyond the window: the first stands
    np.testing.assert_allclose(tri(start, 0.1), first)
    answers[:] = [start + np.array([0.6, 0.0, 0.0]), first]  # first beyond reach: no answer
    assert tri(start, 0.1) is None
    # 0.6 m from the start along the line the rays (from the views, through the box) pin least:
    along = view_evidence.loosest_line(_rays(obj.center, eyes), obj.center)[1]
    nearer, farther = start - 0.6 * along, start + 0.6 * along
    for pin, first, kept in ((0.0, nearer, True),  # tight, the start behind it: it stands
                             (0.0, farther, False),  # tight, the start in front of it: no answer
                             (1.0, nearer, False)):  # loose: no answer
        monkeypatch.setattr(view_evidence, "depth_uncertainty", lambda x, rays, pin=pin: pin)
        answers[:] = [first, first + np.array([0.0, 0.1, 0.0])]
        out = tri(start, 0.1)
        if kept:
            np.testing.assert_allclose(out, first + np.array([0.0, 0.1, 0.0]))
        else:
            assert out is None, (pin, out)


def test_a_placement_under_the_ground_plane_is_lifted_onto_it(scene):
    _, obj, eyes, enc, pyr, cset, kfs = scene
    emb = enc.encode_texts(["red box", *CANONICAL_NEGATIVES]).float()
    ray = obj.center - eyes[2]
    start = obj.center + 0.3 * ray / np.linalg.norm(ray)
    free = view_evidence.refine_fn(cset, kfs, pyr, CFG.candidates, emb[0], emb[1:], CFG.query.temperature,
                                   0.4, 0.03)(start, 0.1)
    ground = float(free[2]) + 0.05  # a ground plane above that answer
    lifted = view_evidence.refine_fn(cset, kfs, pyr, CFG.candidates, emb[0], emb[1:], CFG.query.temperature,
                                     0.4, 0.03, ground_z=ground)(start, 0.1)
    np.testing.assert_allclose(lifted, [free[0], free[1], ground])
    below = view_evidence.refine_fn(cset, kfs, pyr, CFG.candidates, emb[0], emb[1:], CFG.query.temperature,
                                    0.4, 0.03, ground_z=ground - 1.0)(start, 0.1)
    np.testing.assert_allclose(below, free)  # above the ground: unchanged


def test_a_measured_cluster_is_not_moved_farther_than_its_own_size(monkeypatch):
    """With a depth sensor a cluster with depth in every direction is the object's own surface: a placement
    farther from it than `measured_reach` (its diagonal, at least twice the scale) is refused and the
    cluster's centre stands (CLIP-like rooms: a 9 cm sphere's views peaked on a blue cylinder 0.3 m away).
    Nearer ones stand, and so does any placement for a flat cluster (a wall patch behind an object), without
    depth (clusters on floaters) or without the cluster's points."""
    _, obj, _, frames, enc, pyr, cset = _looking_at_the_red_box(1.4, AROUND)
    measured = list(enumerate(frames))
    rgb_only = [(i, dataclasses.replace(f, depth_m=None)) for i, f in measured]
    emb = enc.encode_texts(["red box", *CANONICAL_NEGATIVES]).float()
    start = obj.center + np.array([0.0, 0.0, obj.size[2] / 2])  # on the top face every camera sees
    corners = np.array([[x, y, z] for x in (0, 0.12) for y in (0, 0.08) for z in (0, 0.05)])
    blob = start + corners - corners.mean(axis=0)  # 12 x 8 x 5 cm: diagonal 0.153 m
    placed = []
    monkeypatch.setattr(view_evidence, "triangulate_fn",
                        lambda *a, **k: (lambda loc, s: placed[0]))

    def along(shift):
        return start + np.array([shift, 0.0, 0.0])

    def refine(kfs, shift, points=blob, scale=0.05):
        placed[:] = [along(shift)]
        fn = view_evidence.refine_fn(cset, kfs, pyr, CFG.candidates, emb[0], emb[1:], CFG.query.temperature,
                                     0.4, 0.03)
        return fn(start, scale, points)

    diagonal = float(np.linalg.norm([0.12, 0.08, 0.05]))
    assert view_evidence.measured_reach(blob, 0.05) == pytest.approx(diagonal)
    assert view_evidence.measured_reach(blob, 0.1) == pytest.approx(0.2)  # a few points: twice the scale
    rotation = np.linalg.qr(np.random.default_rng(0).normal(size=(3, 3)))[0]  # any orientation: the same
    assert view_evidence.measured_reach(blob @ rotation.T, 0.05) == pytest.approx(diagonal)
    np.testing.assert_allclose(refine(measured, 0.14), along(0.14))
    assert refine(measured, 0.3) is None
    np.testing.assert_allclose(refine(measured, 0.18, scale=0.1), along(0.18))
    np.testing.assert_allclose(refine(measured, 0.3, points=None), along(0.3))
    np.testing.assert_allclose(refine(rgb_only, 0.3), along(0.3))
    # a patch of a wall, tilted in the world frame, 20 cm across with 3 mm of depth noise: flat, no bound
    rng = np.random.default_rng(1)
    patch = np.column_stack([rng.uniform(-0.1, 0.1, 60), rng.uniform(-0.1, 0.1, 60),
                             rng.normal(0.0, 0.003, 60)])
    wall = start + patch @ rotation.T
    assert view_evidence.measured_reach(wall, 0.05) == np.inf
    np.testing.assert_allclose(refine(measured, 0.3, points=wall), along(0.3))
    # most of the views that hold it without depth, or just half: no bound; most with depth: the bound
    np.testing.assert_allclose(refine(measured[:2] + rgb_only[2:], 0.3), along(0.3))
    np.testing.assert_allclose(refine(measured[:3] + rgb_only[3:], 0.3), along(0.3))
    assert refine(rgb_only[:2] + measured[2:], 0.3) is None
    # the bound judges the placement after it is lifted onto the ground plane: 0.5 m under it, lifted to
    # 0.11 m from the cluster (within the bound), it stands
    placed[:] = [start + np.array([0.1, 0.0, -0.5])]
    lifted = view_evidence.refine_fn(cset, measured, pyr, CFG.candidates, emb[0], emb[1:],
                                     CFG.query.temperature, 0.4, 0.03, ground_z=float(start[2]) - 0.05)
    np.testing.assert_allclose(lifted(start, 0.05, blob), start + np.array([0.1, 0.0, -0.05]))
    # a place no keyframe's image holds: nothing says it was measured, no bound
    start = obj.center + np.array([0.0, 0.0, 30.0])
    np.testing.assert_allclose(refine(measured, 0.3, points=blob - blob.mean(axis=0) + start), along(0.3))


def test_the_reach_of_a_few_measured_points_is_their_size_at_least_twice_the_scale():
    """`measured_reach` of clusters too small to say whether they are flat (any three points lie in a
    plane): their diagonal, at least twice the scale, never unbounded; four points in a plane are flat."""
    p = np.array([1.0, 2.0, 0.5])
    x, y, z = np.eye(3) * 0.3
    assert view_evidence.measured_reach(p[None], 0.05) == pytest.approx(0.1)
    assert view_evidence.measured_reach(np.stack([p, p + x]), 0.05) == pytest.approx(0.3)
    three = np.stack([p, p + x, p + 2.0 / 3.0 * y])
    assert view_evidence.measured_reach(three, 0.05) < 0.5
    assert view_evidence.measured_reach(np.stack([p] * 5), 0.05) == pytest.approx(0.1)  # none apart
    square = np.stack([p, p + x, p + y, p + x + y])
    assert view_evidence.measured_reach(square, 0.05) == np.inf
    cube = np.concatenate([square, square + z])
    assert view_evidence.measured_reach(cube, 0.05) == pytest.approx(0.3 * np.sqrt(3.0))


def test_views_that_resolve_a_small_object_are_not_drowned_by_far_views_of_it():
    """`view_scores` of a 10 cm cube seen by three views from 0.8 m (the scale within their crops' range)
    and three from 6 m (beyond it: their smallest crop is mostly floor around the cube): the far views weigh
    1e-3, so the score is the near views' own; counted alike, the far views' low relevancy pulls it down.
    With fewer resolving views than ``min_views``, all count alike."""
    near, far = (0.8,) * 3, (6.0,) * 3
    _, obj, _, frames, enc, pyr, cset = _looking_at_the_red_box(near + far, (150, 180, 210, 160, 190, 220),
                                                                size_m=0.1)
    emb = enc.encode_texts(["red box", *CANONICAL_NEGATIVES]).float()
    cells = view_evidence._CellRelevancy(pyr, emb[0], emb[1:], CFG.query.temperature)
    kfs = list(enumerate(frames))
    centre = obj.center[None]
    assert view_evidence._reaching(centre, cset, dict(kfs), pyr, CFG.candidates)[2].tolist() == list(range(6))

    def score(views, min_views=1):
        s = view_evidence.view_scores(cset, views, pyr, CFG.candidates, cells, min_views)(centre, 0.1)
        return None if s is None else float(s[0])

    both, near_only = score(kfs), score(kfs[:3])
    assert near_only is not None and near_only > 0.8, near_only
    far_mean = float(np.mean([float(cells.sample(i, *_pixel_and_frac(kf, obj.center, 0.1))[0])
                              for i, kf in kfs[3:]]))
    assert far_mean < near_only - 0.2, (far_mean, near_only)  # the far views see mostly floor there
    values = [float(cells.sample(i, *_pixel_and_frac(kf, obj.center, 0.1))[0]) for i, kf in kfs]
    near_mean = float(np.mean(values[:3]))
    assert near_only == pytest.approx(near_mean, abs=1e-6)
    want = (sum(values[:3]) + 1e-3 * sum(values[3:])) / (3 + 3e-3)
    assert both == pytest.approx(want, abs=1e-6)
    assert both > 0.5 * (near_only + far_mean) + 0.1  # not the plain mean of all six
    # fewer views that resolve the scale than min_views (one near view's cone does not pin a place):
    # all count alike
    plain = float(np.mean(values[:2] + values[3:4]))
    assert plain > 0.5
    assert score(kfs[:2] + kfs[3:4], min_views=3) == pytest.approx(plain, abs=1e-6)


def test_may_see_never_leaves_out_a_keyframe_that_sees_part_of_the_ball(scene):
    """`_may_see` is a bound: balls around random centres, far off the optical axis and near the camera
    included, are never refused when a point sampled inside them projects into the image."""
    _, _, _, _, _, _, kfs = scene
    kf = kfs[0][1]
    k = kf.intrinsics
    rng = np.random.default_rng(4)
    eye, rot = kf.T_world_cam[:3, 3], kf.T_world_cam[:3, :3]
    checked = 0
    for _ in range(3000):
        centre_cam = rng.uniform([-4.0, -4.0, -1.0], [4.0, 4.0, 5.0])
        reach = float(rng.uniform(0.05, 1.5))
        offsets = rng.normal(size=(200, 3))
        offsets *= reach * rng.uniform(0, 1, (200, 1)) ** (1 / 3) / np.linalg.norm(offsets, axis=1,
                                                                                  keepdims=True)
        cam = centre_cam + offsets
        front = cam[:, 2] > 1e-6
        u = k.fx * cam[front, 0] / cam[front, 2] + k.cx
        v = k.fy * cam[front, 1] / cam[front, 2] + k.cy
        if np.any((u >= 0) & (u <= k.width) & (v >= 0) & (v <= k.height)):
            checked += 1
            assert view_evidence._may_see(kf, eye + rot @ centre_cam, reach), (centre_cam, reach)
    assert checked > 300
    behind = eye + rot @ np.array([0.0, 0.0, -3.0])
    assert not view_evidence._may_see(kf, behind, 1.0)


def test_a_sweep_scores_its_points_against_every_keyframe_that_sees_any_of_them(scene, monkeypatch):
    """The sweep looks only at keyframes that may see its segment (`_may_see`): some views of a segment
    from the box 3 m sideways see only part of it, and they are kept; the scores are those every keyframe
    gives, and the best point is on the box."""
    _, obj, eyes, enc, pyr, cset, kfs = scene
    emb = enc.encode_texts(["red box", *CANONICAL_NEGATIVES]).float()
    cells = view_evidence._CellRelevancy(pyr, emb[0], emb[1:], CFG.query.temperature)
    across = np.cross(obj.center - eyes[0], [0.0, 0.0, 1.0])
    across /= np.linalg.norm(across)
    real = view_evidence.view_scores
    asked = []

    def watched(*args, **kwargs):
        fn = real(*args, **kwargs)

        def score(pts, scale_m, keep=None):
            asked.append((pts, scale_m, keep))
            return fn(pts, scale_m, keep)

        score.unfiltered = fn
        return score

    monkeypatch.setattr(view_evidence, "view_scores", watched)
    out = view_evidence.sweep_fn(cset, kfs, pyr, CFG.candidates, cells, 0.03)(obj.center, across, 3.0, 0.1)
    (pts, scale_m, keep), = asked
    kept = [i for i, kf in kfs if keep(kf)]
    sees = [i for i, kf in kfs if view_evidence._reaching(pts, cset, {i: kf}, pyr, CFG.candidates)[2].size]
    sees_middle = [i for i, kf in kfs
                   if view_evidence._may_see(kf, 0.5 * (pts[0] + pts[-1]), 1e-6)]
    assert set(sees) <= set(kept) and not set(sees) <= set(sees_middle), (sees, kept, sees_middle)
    full = real(cset, kfs, pyr, CFG.candidates, cells)(pts, scale_m)
    np.testing.assert_allclose(real(cset, kfs, pyr, CFG.candidates, cells)(pts, scale_m, keep), full)
    assert out is not None and _inside(obj, out)
    np.testing.assert_allclose(out, pts[int(np.argmax(full))])


def _pixel_and_frac(kf, point, scale_m):
    """(uv (1, 2), tile fraction (1,)) where ``point`` projects into ``kf`` at language scale ``scale_m``."""
    x = np.linalg.inv(kf.T_world_cam) @ np.append(point, 1.0)
    k = kf.intrinsics
    uv = np.array([[k.fx * x[0] / x[2] + k.cx, k.fy * x[1] / x[2] + k.cy]])
    return uv, np.array([scale_m * k.fy / (k.height * float(np.linalg.norm(x[:3])))])


def _rays(point, origins, weights=None):
    weights = np.ones(len(origins)) if weights is None else weights
    out = []
    for o, w in zip(origins, weights, strict=True):
        d = point - o
        out.append((o, d / np.linalg.norm(d), float(w)))
    return out


def test_closest_point_meets_the_rays_and_drops_an_outlier():
    rng = np.random.default_rng(0)
    target = np.array([1.0, 2.0, 0.3])
    origins = [np.array([1.0 + 2.0 * np.cos(a), 2.0 + 2.0 * np.sin(a), 1.2])
               for a in np.radians([0, 20, 40, 60])]
    rays = [(o, d + rng.normal(0, 0.002, 3), w) for o, d, w in _rays(target, origins)]
    rays = [(o, d / np.linalg.norm(d), w) for o, d, w in rays]
    out = view_evidence.closest_point(rays)
    assert np.linalg.norm(out - target) < 0.02
    wrong = _rays(target + np.array([0.0, 0.0, 0.5]), [np.array([3.0, 2.0, 1.2])])  # points 0.5 m above it
    assert np.linalg.norm(view_evidence.closest_point(rays + wrong) - target) < 0.02


def test_closest_point_refuses_what_the_rays_cannot_pin():
    target = np.array([1.0, 2.0, 0.3])
    assert view_evidence.closest_point(_rays(target, [np.array([0.0, 0.0, 1.0])])) is None  # one ray
    near_parallel = [np.array([-3.0, 2.0, 1.0]), np.array([-3.0, 2.1, 1.0])]  # ~1.4 degrees apart
    assert view_evidence.closest_point(_rays(target, near_parallel)) is None
    # rays that meet only behind their cameras
    behind = [(o, -d, w) for o, d, w in _rays(target, [np.array([3.0, 2.0, 1.0]), np.array([1.0, 4.0, 1.0])])]
    assert view_evidence.closest_point(behind) is None


def test_cell_relevancy_of_several_keyframes_in_one_pass_is_each_keyframes_own(scene):
    """`_CellRelevancy.sample_many` (the triangulation's windows of every view at once) reads what
    `sample` reads keyframe by keyframe, at tile fractions across and outside the pyramid's range."""
    _, _, _, enc, pyr, _, kfs = scene
    emb = enc.encode_texts(["red box", *CANONICAL_NEGATIVES]).float()
    cells = view_evidence._CellRelevancy(pyr, emb[0], emb[1:], CFG.query.temperature)
    rng = np.random.default_rng(3)
    ids = [i for i, _ in kfs]
    pos = np.array([4, 1, 4, 5, 1, 0, 4])  # unsorted, repeated, some keyframes not read at all
    uv = rng.uniform([0, 0], [95, 71], size=(pos.size, 2))
    frac = np.array([0.02, 0.1, 0.3, 0.5, 0.9, 0.15, 2.0])
    got = cells.sample_many(ids, pos, uv, frac)
    want = torch.cat([cells.sample(ids[p], uv[j:j + 1], frac[j:j + 1]) for j, p in enumerate(pos)])
    torch.testing.assert_close(got, want, atol=1e-6, rtol=0)
    assert float(want.max() - want.min()) > 0.05  # the rows differ: a wrong row would show


def test_sightings_and_embeddings_of_some_points_read_from_the_index_match_a_fresh_projection(scene):
    """`ViewIndex.subset` (a cluster's members, without projecting them into every keyframe again) holds
    the same (keyframe, point, pixel) sightings as `sightings`, and `views_embed_fn.rows` / `view_fn.rows`
    give what the functions give for those points; with no index kept for the points they answer None."""
    _, _, _, enc, pyr, cset, kfs = scene
    emb = enc.encode_texts(["red box", *CANONICAL_NEGATIVES]).float()
    points = _surface_points(cset, kfs, every=3)
    cache = view_evidence.ViewIndexCache()
    embed = view_evidence.views_embed_fn(cset, kfs, pyr, CFG.candidates, index_cache=cache)
    views = view_evidence.view_fn(cset, kfs, pyr, CFG.candidates, index_cache=cache)
    rows = torch.tensor([7, 0, 42, 5, 19])
    assert embed.rows(points, rows, 0.1) is None and views.rows(points, rows, 0.1) is None  # nothing kept
    view_evidence.views_relevancy_fn(cset, kfs, pyr, CFG.candidates, emb[0], emb[1:], CFG.query.temperature,
                                     index_cache=cache)(points, 0.1)  # keeps the index of these points

    want = view_evidence.sightings(points[rows].double().numpy(), cset, dict(kfs), pyr, CFG.candidates)
    got = cache.peek(points, cset, dict(kfs), pyr, CFG.candidates).subset(rows)
    assert want.idx.size > rows.numel()  # several views per point
    key = lambda s: sorted(zip(s.idx.tolist(), (np.asarray(s.kf_ids)[s.pos]).tolist(),  # noqa: E731
                               np.round(s.uv, 4).tolist(), np.round(s.extent, 6).tolist(), strict=True))
    assert key(got) == key(want)
    scales = torch.tensor([0.05, 0.1, 0.3, 0.1, 0.6])
    torch.testing.assert_close(embed.rows(points, rows, scales), embed(points[rows], scales),
                               atol=1e-6, rtol=0)
    e_rows, v_rows = views.rows(points, rows, 0.1)
    e_all, v_all = views(points[rows], 0.1)
    assert sorted(v_rows.tolist()) == sorted(v_all.tolist())
    torch.testing.assert_close(e_rows.sum(0), e_all.sum(0), atol=1e-5, rtol=0)


def test_rows_asked_every_query_are_kept_per_scale_with_the_same_values(scene, monkeypatch):
    """`views_embed_fn.rows(..., keep=True)` (locate's sample for the competing phrases' medians, the same
    rows every query over the same points): each (row, scale) is computed once and kept by the index, with
    the values that computing all the rows at once from the index gives; a new set of rows replaces the
    kept one; rows with a point no keyframe sees are not kept (its embedding would depend on the others)."""
    _, _, _, enc, pyr, cset, kfs = scene
    emb = enc.encode_texts(["red box", *CANONICAL_NEGATIVES]).float()
    points = _surface_points(cset, kfs, every=3)
    points = torch.cat([points, torch.tensor([[50.0, 50.0, 50.0]])])  # seen by no keyframe
    cache = view_evidence.ViewIndexCache()
    embed = view_evidence.views_embed_fn(cset, kfs, pyr, CFG.candidates, index_cache=cache)
    view_evidence.views_relevancy_fn(cset, kfs, pyr, CFG.candidates, emb[0], emb[1:], CFG.query.temperature,
                                     index_cache=cache)(points, 0.1)  # keeps the index of these points
    index = cache.peek(points, cset, dict(kfs), pyr, CFG.candidates)
    computed = []
    real = view_evidence.observations

    def counting(pts, *a, **k):
        computed.append(pts.shape[0])
        return real(pts, *a, **k)

    monkeypatch.setattr(view_evidence, "observations", counting)
    rows = torch.tensor([7, 0, 42, 5, 19, 3])
    first = torch.tensor([0.05, 0.1, 0.3, 0.1, 0.6, 0.05])
    got = embed.rows(points, rows, first, keep=True)
    torch.testing.assert_close(got, embed.rows(points, rows, first), atol=0, rtol=0)
    assert computed[0] == 6
    computed.clear()
    second = torch.tensor([0.05, 0.3, 0.3, 0.1, 0.05, 0.6])  # rows 0, 2, 3 at a scale they had
    got = embed.rows(points, rows, second, keep=True)
    assert computed == [3]  # only the three new (row, scale) pairs
    torch.testing.assert_close(got, embed.rows(points, rows, second), atol=0, rtol=0)
    computed.clear()
    assert embed.rows(points, rows, second, keep=True).shape == (6, pyr.dim) and computed == []
    other = torch.tensor([1, 2])
    kept = embed.rows(points, other, first[:2], keep=True)
    torch.testing.assert_close(kept, embed.rows(points, other, first[:2]), atol=0, rtol=0)
    computed.clear()
    embed.rows(points, rows, second, keep=True)
    assert computed == [6]  # replaced by the other rows: computed again
    unseen = torch.tensor([4, points.shape[0] - 1])
    before = index._kept
    kept = embed.rows(points, unseen, first[:2], keep=True)
    torch.testing.assert_close(kept, embed.rows(points, unseen, first[:2]), atol=0, rtol=0)
    assert index._kept is before  # not kept


def test_an_index_whose_crops_are_too_large_to_keep_reads_them_from_the_pyramid(scene, monkeypatch):
    """Over UNIT_GRIDS_BYTES (CLIP's 512 dims) the index keeps no copy of the crops: its relevancy and the
    embeddings of its points come from the pyramid per call, the same values up to storage precision."""
    _, _, _, enc, pyr, cset, kfs = scene
    emb = enc.encode_texts(["red box", *CANONICAL_NEGATIVES]).float()
    points = _surface_points(cset, kfs, every=3)
    rows, scales = torch.tensor([7, 0, 42, 5]), torch.tensor([0.05, 0.1, 0.3, 0.6])
    got, default = {}, view_evidence.UNIT_GRIDS_BYTES
    for limit in (default, 0):
        monkeypatch.setattr(view_evidence, "UNIT_GRIDS_BYTES", limit)
        cache = view_evidence.ViewIndexCache()
        rel = view_evidence.views_relevancy_fn(cset, kfs, pyr, CFG.candidates, emb[0], emb[1:],
                                               CFG.query.temperature, index_cache=cache)(points, 0.1)
        index = cache.peek(points, cset, dict(kfs), pyr, CFG.candidates)
        embed = view_evidence.views_embed_fn(cset, kfs, pyr, CFG.candidates, index_cache=cache)
        got[limit] = (rel, embed.rows(points, rows, scales), index.unit_grids is None,
                      index.subset(rows).index is None)
    kept, fresh = got[default], got[0]
    assert not kept[2] and not kept[3] and fresh[2] and fresh[3]
    torch.testing.assert_close(fresh[0], kept[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(fresh[1], kept[1], atol=2e-3, rtol=0)


def test_sparse_sampling_of_several_keyframes_is_the_pyramids_own_sampling(scene):
    _, _, _, _, pyr, _, kfs = scene
    rng = np.random.default_rng(5)
    ids = [i for i, _ in kfs]
    pos = np.array([2, 0, 2, 5, 5, 1, 3, 2])
    uv = torch.from_numpy(rng.uniform([0, 0], [95, 71], size=(pos.size, 2))).float()
    frac = torch.tensor([0.02, 0.1, 0.3, 0.5, 0.9, 0.15, 2.0, 0.07])
    got = view_evidence.sample_sparse(pyr, ids, pos, uv, frac)
    want = pyr.sample(torch.tensor(ids)[torch.from_numpy(pos)], uv, frac)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    assert float((want @ want.T).min()) < 0.9  # the rows differ: a wrong row would show


def test_a_view_index_samples_its_sightings_as_the_pyramid_does(scene):
    """`ViewIndex.sample` reads a sighting's two levels through the corners the index holds, from its unit
    crops: the pyramid's own sampling of that keyframe, pixel and tile fraction (the pyramid stores float16
    crops, unit up to that precision)."""
    _, _, _, _, pyr, cset, kfs = scene
    assert pyr.config.dtype == "float16"
    points = _surface_points(cset, kfs)
    index = view_evidence.ViewIndex(points, cset, dict(kfs), pyr, CFG.candidates)
    o = index.idx.numel()
    rng = np.random.default_rng(3)
    rows = torch.from_numpy(rng.choice(o, size=64, replace=False))
    frac = torch.from_numpy(rng.uniform(0.01, 2.0, size=64)).float()  # in range, and clamped at both ends
    got = index.sample(rows, frac)
    kf = torch.tensor(index.kf_ids)[torch.from_numpy(index._pos[rows.numpy()]).long()]
    want = pyr.sample(kf, torch.from_numpy(index._uv[rows.numpy()]).float(), frac)
    torch.testing.assert_close(got, want, atol=2e-3, rtol=0)
    assert float((want @ want.T).min()) < 0.9  # the rows differ: a wrong row would show
    assert index.sample(rows[:0], frac[:0]).shape == (0, pyr.dim)


def test_triangulation_uses_every_view_that_holds_an_answer_placed_behind_the_object(scene):
    """An RGB-only answer often lies behind its object (where the model rendered the object's pixels):
    views whose surface lies in front of that spot still show the object there, and their rays pin it.
    With only the views that reach the spot up to their surface (the depth grids here are the truth),
    the rays come from the few views that see past the box and do not meet on it."""
    _, obj, eyes, enc, pyr, cset, kfs = scene
    emb = enc.encode_texts(["red box", *CANONICAL_NEGATIVES]).float()
    cells = view_evidence._CellRelevancy(pyr, emb[0], emb[1:], CFG.query.temperature)
    tri = view_evidence.triangulate_fn(cset, kfs, pyr, CFG.candidates, cells, 0.3, reach_m=0.69)
    ray = obj.center - eyes[2]
    start = obj.center + 0.5 * ray / np.linalg.norm(ray)  # 50 cm behind the centre along one view
    hidden = view_evidence._reaching(start[None], cset, dict(kfs), pyr, CFG.candidates)[2].size
    shown = view_evidence._reaching(start[None], cset, dict(kfs), pyr, CFG.candidates,
                                    occlusion=False)[2].size
    assert shown == len(kfs) and hidden < shown  # the box's own views do not reach the spot behind it
    out = tri(start, 0.1)
    assert out is not None and np.linalg.norm(out - obj.center) < 0.05, (out, obj.center)


@pytest.fixture(scope="module")
def near_parallel():
    """Three keyframes with measured depth looking at the red box from within 4 degrees of one direction."""
    _, obj, eyes, frames, enc, pyr, cset = _looking_at_the_red_box(1.6, (178, 180, 182))
    emb = enc.encode_texts(["red box", *CANONICAL_NEGATIVES]).float()
    cells = view_evidence._CellRelevancy(pyr, emb[0], emb[1:], CFG.query.temperature)
    return obj, eyes, list(enumerate(frames)), pyr, cset, cells


def test_near_parallel_views_with_measured_depth_place_the_answer_where_their_rays_meet_the_surface(
        near_parallel):
    """Views from nearly one direction (rays within TRI_MIN_SPREAD_DEG: depth along them undetermined)
    cannot be triangulated; with a depth sensor, each ray's point on the measured surface places the
    answer on the object; without depth the views give nothing (the answer stays where it was found)."""
    obj, _, frames, pyr, cset, cells = near_parallel
    start = obj.center + np.array([0.0, 0.15, 0.0])
    out = view_evidence.triangulate_fn(cset, frames, pyr, CFG.candidates, cells, 0.3)(start, 0.1)
    assert out is not None and _inside(obj, out), (out, obj.center)
    rgb_only = [(i, dataclasses.replace(f, depth_m=None)) for i, f in frames]
    assert view_evidence.triangulate_fn(cset, rgb_only, pyr, CFG.candidates, cells, 0.3)(start, 0.1) is None


def test_a_loosely_pinned_triangulation_gives_way_to_the_measured_surface(near_parallel, monkeypatch):
    """With measured depth, the triangulated point stands while its `depth_uncertainty` is within
    TRI_PIN_M; looser, where the rays meet the measured surface stands (on the object)."""
    obj, eyes, frames, pyr, cset, cells = near_parallel
    view = (obj.center - eyes[1]) / np.linalg.norm(obj.center - eyes[1])
    met = obj.center + 0.3 * view  # 30 cm behind the box centre along the views
    monkeypatch.setattr(view_evidence, "closest_point", lambda rays, min_rays=2: met)
    for loose, kept in ((0.5 * view_evidence.TRI_PIN_M, True), (2.0 * view_evidence.TRI_PIN_M, False)):
        monkeypatch.setattr(view_evidence, "depth_uncertainty", lambda x, rays, loose=loose: loose)
        out = view_evidence.triangulate_fn(cset, frames, pyr, CFG.candidates, cells, 0.3)(obj.center, 0.1)
        if kept:
            np.testing.assert_allclose(out, met)
        else:
            assert _inside(obj, out) and not _inside(obj, met), (out, met)


def test_depth_uncertainty_grows_as_the_rays_close_up():
    target = np.array([1.0, 2.0, 0.3])
    rng = np.random.default_rng(1)

    def rays(degrees):
        origins = [target + 2.0 * np.array([np.cos(a), np.sin(a), 0.5]) for a in np.radians(degrees)]
        out = []
        for o in origins:  # each ray aimed at its own point near the target: they miss each other by ~1 cm
            d = target + rng.normal(0, 0.01, 3) - o
            out.append((o, d / np.linalg.norm(d), 1.0))
        return out

    def uncertainty(rs):
        return view_evidence.depth_uncertainty(view_evidence.closest_point(rs), rs)

    u_wide, u_narrow = uncertainty(rays([0, 30, 60, 90])), uncertainty(rays([0, 3, 6, 9]))
    assert 0.002 < u_wide < 0.05 and u_narrow > 4 * u_wide, (u_wide, u_narrow)
    assert uncertainty(rays([0, 90, 180])) < 0.05  # opposite sides and across: pinned
    parallel = rays([0])
    assert view_evidence.depth_uncertainty(target, parallel + parallel) == np.inf


def test_the_loosest_line_is_the_direction_the_rays_pin_least_pointing_away_from_the_cameras():
    target = np.array([1.0, 2.0, 0.3])
    origins = [np.array([-1.0, 2.0, 1.3]), np.array([-1.0, 2.4, 1.3])]  # one side, ~10 degrees apart
    rays = _rays(target, origins, weights=[1.0, 3.0])
    o, d, near = view_evidence.loosest_line(rays, target)
    np.testing.assert_allclose(o, target)
    mean = rays[0][1] + 3.0 * rays[1][1]
    assert float(np.dot(d, mean / np.linalg.norm(mean))) > 0.99  # about their mean direction, away from them
    assert near == pytest.approx(min(float(np.dot(c - target, d)) for c in origins))  # farthest back
    assert near < -2.0
    # moving the point along the line changes the rays' misses least (to first order)
    a = sum(w * (np.eye(3) - np.outer(r, r)) for _, r, w in rays)
    assert float(d @ a @ d) <= min(float(v @ a @ v) for v in np.eye(3)) + 1e-12
    # views from two opposite sides: the axis they share, not their cancelling mean
    opposite = _rays(target, [target + np.array([1.4, 0.0, 0.3]), target - np.array([1.4, 0.0, -0.3])])
    d = view_evidence.loosest_line(opposite, target)[1]
    assert abs(float(d[0])) > 0.99, d
    assert view_evidence.loosest_line([], target) is None


def _along_a_view_past_the_box(scene, eye_index=2):
    """The line from one view's camera through the red box's centre, and the spot on it 0.6 m past it."""
    _, obj, eyes, *_ = scene
    d = (obj.center - eyes[eye_index]) / np.linalg.norm(obj.center - eyes[eye_index])
    return eyes[eye_index], d, obj.center + 0.6 * d


def test_a_sweep_along_a_line_through_the_object_finds_it_where_the_other_views_agree(scene):
    """Points along one view's line through the box, scored by every view that reaches them: the other views
    see the box only at its place, and past it the line runs under the floor, where no view reaches."""
    _, obj, _, enc, pyr, cset, kfs = scene
    emb = enc.encode_texts(["red box", *CANONICAL_NEGATIVES]).float()
    cells = view_evidence._CellRelevancy(pyr, emb[0], emb[1:], CFG.query.temperature)
    eye, d, past = _along_a_view_past_the_box(scene)
    assert past[2] < 0.0  # the line goes on under the floor
    sweep = view_evidence.sweep_fn(cset, kfs, pyr, CFG.candidates, cells, 0.03, ground_z=0.0)
    length = float(np.linalg.norm(past - eye)) + 1.0  # on under the floor
    out = sweep(eye, d, length, 0.1)
    assert out is not None and _inside(obj, out), (out, obj.center)
    # a ground plane above the box, or a box that leaves the object out: the sweep does not place it there
    raised = view_evidence.sweep_fn(cset, kfs, pyr, CFG.candidates, cells, 0.03,
                                    ground_z=float(obj.box_max[2]) + 0.1)(eye, d, length, 0.1)
    assert raised is None or not _inside(obj, raised), raised
    low, high = obj.box_max + np.array([0.1, -10.0, -10.0]), np.full(3, 10.0)
    clipped = view_evidence.sweep_fn(cset, kfs, pyr, CFG.candidates, cells, 0.03,
                                     box=(low, high))(eye, d, length, 0.1)
    assert clipped is None or not _inside(obj, clipped), clipped
    # a concept the views do not show: nothing
    emb = enc.encode_texts(["purple torus", *CANONICAL_NEGATIVES]).float()
    cells = view_evidence._CellRelevancy(pyr, emb[0], emb[1:], CFG.query.temperature)
    assert view_evidence.sweep_fn(cset, kfs, pyr, CFG.candidates, cells, 0.03)(eye, d, length, 0.1) is None


def _one_side_and_two_sides_rgb_only():
    """RGB-only keyframes of the red box: three from within 4 degrees of one direction and two from the
    sides; the "red box" cell relevancy; the middle one-side view's unit direction through the box."""
    _, obj, eyes, frames, enc, pyr, cset = _looking_at_the_red_box(1.4, (176, 180, 184, 90, 270))
    kfs = [(i, dataclasses.replace(f, depth_m=None)) for i, f in enumerate(frames)]
    emb = enc.encode_texts(["red box", *CANONICAL_NEGATIVES]).float()
    cells = view_evidence._CellRelevancy(pyr, emb[0], emb[1:], CFG.query.temperature)
    view = (obj.center - eyes[1]) / np.linalg.norm(obj.center - eyes[1])
    return obj, eyes, kfs, pyr, cset, cells, view


def test_a_loose_first_triangulation_past_the_object_is_replaced_by_the_views_triangulation_along_its_rays(
        monkeypatch):
    """RGB-only views: three from within 4 degrees of one direction, two from the sides. A first pass that
    meets loosely 1 m past the box along the three (as rays from one pass through an object meet on a
    floater behind it, here under the floor) is checked along the line they pin least: the side views agree
    on the box only at its place, the windows there triangulate tightly on it, and that stands. Without the
    sweep the loose point is kept; with every triangulation loose, the swept place is not trusted and the
    answer is the one without it; a tight first pass is not swept."""
    obj, _, kfs, pyr, cset, cells, view = _one_side_and_two_sides_rgb_only()
    past = obj.center + 1.0 * view
    assert past[2] < 0.0
    real = view_evidence.closest_point
    scripted = []

    def first_past_the_box(rays, min_rays=2):
        x = real(rays, min_rays)
        return scripted.pop(0) if scripted else x

    monkeypatch.setattr(view_evidence, "closest_point", first_past_the_box)
    real_sweep = view_evidence.sweep_fn(cset, kfs, pyr, CFG.candidates, cells, 0.03, ground_z=0.0)
    swept = []

    def sweep(*args):
        swept.append(real_sweep(*args))
        return swept[-1]

    def answer(with_sweep, start=past):
        scripted[:] = [past]  # the first pass meets past the box; every later one is real
        return view_evidence.triangulate_fn(cset, kfs, pyr, CFG.candidates, cells, 0.3, reach_m=0.69,
                                            sweep=sweep if with_sweep else None)(start, 0.1)

    out = answer(True)
    assert out is not None and np.linalg.norm(out - obj.center) < 0.04, (out, obj.center)
    # the swept place was triangulated again: the answer is not the swept point itself
    assert len(swept) == 1 and swept[0] is not None and np.linalg.norm(out - swept[0]) > 1e-3, (out, swept)
    without = answer(False)
    assert without is not None and not _inside(obj, without), without
    # a tight first pass (the real one, from short of the box) is not swept
    swept.clear()
    scripted.clear()
    tight = view_evidence.triangulate_fn(cset, kfs, pyr, CFG.candidates, cells, 0.3, reach_m=0.69,
                                         sweep=sweep)(obj.center - 0.2 * view, 0.1)
    assert tight is not None and _inside(obj, tight) and not swept, (tight, swept)
    monkeypatch.setattr(view_evidence, "depth_uncertainty", lambda x, rays: 2.0 * view_evidence.TRI_PIN_M)
    np.testing.assert_allclose(answer(True), answer(False))


def test_near_parallel_rgb_only_rays_through_the_object_are_followed_to_where_the_side_views_see_it():
    """Three RGB-only views within 4 degrees of one direction give the only rays around a start 1 m past
    the box along them (the side views' windows there do not hold it): their depth is undetermined, so no
    point is triangulated; followed along their line, the side views agree on the box, and the windows there
    (all five views) pin it. Without the sweep: no answer (the answer stays where it was found)."""
    _, obj, eyes, frames, enc, pyr, cset = _looking_at_the_red_box(1.6, (178, 180, 182, 90, 270))
    kfs = [(i, dataclasses.replace(f, depth_m=None)) for i, f in enumerate(frames)]
    emb = enc.encode_texts(["red box", *CANONICAL_NEGATIVES]).float()
    cells = view_evidence._CellRelevancy(pyr, emb[0], emb[1:], CFG.query.temperature)
    view = (obj.center - eyes[1]) / np.linalg.norm(obj.center - eyes[1])
    start = obj.center + 1.0 * view + np.array([0.0, 0.0, 0.3])
    sweep = view_evidence.sweep_fn(cset, kfs, pyr, CFG.candidates, cells, 0.03, ground_z=0.0)
    out = view_evidence.triangulate_fn(cset, kfs, pyr, CFG.candidates, cells, 0.3, reach_m=0.69,
                                       sweep=sweep)(start, 0.1)
    assert out is not None and np.linalg.norm(out - obj.center) < 0.04, (out, obj.center)
    assert view_evidence.triangulate_fn(cset, kfs, pyr, CFG.candidates, cells, 0.3,
                                        reach_m=0.69)(start, 0.1) is None


def test_the_sweep_runs_from_behind_the_cameras_to_past_the_loose_meeting_point_and_its_answer_stays_near_it(
        monkeypatch):
    """A loose first pass (RGB-only, three views within 4 degrees) is swept along `loosest_line` from
    SWEEP_NEAR_M past the camera farthest back along it to ``window_m`` past where the rays met; the swept
    place's re-triangulation stands only when it pins its depth and lies within ``window_m`` of that line
    (a tight point 0.5 m to the side came from windows on something else: the answer is then the one
    without the sweep)."""
    obj, eyes, kfs, pyr, cset, cells, view = _one_side_and_two_sides_rgb_only()
    past = obj.center + 0.5 * view
    side = np.cross(view, [0.0, 0.0, 1.0])
    side /= np.linalg.norm(side)
    real = view_evidence.closest_point
    scripted = []
    monkeypatch.setattr(view_evidence, "closest_point",
                        lambda rays, min_rays=2: scripted.pop(0) if scripted else real(rays, min_rays))
    monkeypatch.setattr(view_evidence, "depth_uncertainty",  # only the scripted first pass is loose
                        lambda x, rays: 2.0 * view_evidence.TRI_PIN_M if np.allclose(x, past) else 0.0)
    asked = []

    def sweep(origin, direction, length, scale_m):
        asked.append((origin, direction, length))
        return obj.center  # the place the other views agree on

    def answer(then, with_sweep=True):
        scripted[:] = [past, *then]
        return view_evidence.triangulate_fn(cset, kfs, pyr, CFG.candidates, cells, 0.3, reach_m=0.69,
                                            sweep=sweep if with_sweep else None)(past, 0.1)

    near_side = obj.center + 0.1 * side
    np.testing.assert_allclose(answer([near_side]), near_side)  # 0.1 m off the line: it stands
    (origin, d, length), = asked
    assert float(np.dot(d, view)) > 0.99  # the rays' own direction, away from the cameras
    farthest_back = min(float(np.dot(eyes[i] - past, d)) for i in (0, 1, 2))
    np.testing.assert_allclose(origin, past + (farthest_back + view_evidence.SWEEP_NEAR_M) * d, atol=1e-6)
    np.testing.assert_allclose(origin + length * d, past + 0.3 * d, atol=1e-6)  # 0.3 m past where they met
    far_side = obj.center + 0.5 * side
    np.testing.assert_allclose(answer([far_side]), answer([], with_sweep=False))


def test_near_parallel_rays_are_swept_only_while_they_stay_within_a_few_degrees(monkeypatch):
    """Rays that meet nowhere (`closest_point` None) with no agreeing measured surface are swept along their
    line only when the rays kept around their point nearest the start lie within TRI_MIN_SPREAD_DEG of one
    direction; rays farther apart that still meet nowhere give nothing (the answer stays where it was
    found). Keyframes with a depth sensor whose surface points disagree are swept the same way."""
    _, obj, eyes, frames, enc, pyr, cset = _looking_at_the_red_box(1.6, (178, 180, 182, 90, 270))
    emb = enc.encode_texts(["red box", *CANONICAL_NEGATIVES]).float()
    cells = view_evidence._CellRelevancy(pyr, emb[0], emb[1:], CFG.query.temperature)
    monkeypatch.setattr(view_evidence, "closest_point", lambda rays, min_rays=2: None)
    asked = []

    def sweep(*args):
        asked.append(args)
        return None

    def answer(kfs, start):
        asked.clear()
        return view_evidence.triangulate_fn(cset, kfs, pyr, CFG.candidates, cells, 0.3, reach_m=0.69,
                                            sweep=sweep)(start, 0.1)

    rgb_only = [(i, dataclasses.replace(f, depth_m=None)) for i, f in enumerate(frames)]
    view = (obj.center - eyes[1]) / np.linalg.norm(obj.center - eyes[1])
    beyond = obj.center + 1.0 * view + np.array([0.0, 0.0, 0.3])  # only the three near-parallel views
    assert answer(rgb_only[:3], beyond) is None and len(asked) == 1
    assert float(np.dot(asked[0][1], view)) > 0.99
    assert answer(rgb_only, obj.center) is None and asked == []  # all five views: 90 degrees apart
    monkeypatch.setattr(view_evidence, "surface_cut", lambda points, min_rays=2: None)  # disagreeing
    assert answer(list(enumerate(frames))[:3], beyond) is None and len(asked) == 1


def test_the_point_nearest_the_rays_beside_a_guess():
    target = np.array([1.0, 2.0, 0.3])
    crossing = _rays(target, [np.array([-1.0, 2.0, 1.3]), np.array([1.0, -1.0, 1.3])])
    np.testing.assert_allclose(view_evidence.nearest_on_rays(crossing, np.zeros(3)), target, atol=0.01)
    parallel = [(np.array([0.0, 0.0, 1.0]), np.array([1.0, 0.0, 0.0]), 1.0),
                (np.array([0.0, 0.02, 1.0]), np.array([1.0, 0.0, 0.0]), 1.0)]
    near = view_evidence.nearest_on_rays(parallel, np.array([3.0, 1.0, 0.0]))
    np.testing.assert_allclose(near, [3.0, 0.01, 1.0], atol=0.01)  # on the bundle, beside the guess

def test_views_from_around_the_object_keep_their_triangulated_point_with_measured_depth(scene):
    """The measured surface is the object's front face: views spread around it keep the point their rays
    meet, the same as without depth. (Here the rays' surface points lie on different faces of the 40 cm box
    and do not agree, so `surface_cut` gives nothing: this checks that disagreeing surface points never
    replace a triangulation, not the TRI_PIN_M threshold, which the scripted test above covers.)"""
    _, obj, eyes, enc, pyr, cset, rgb_only = scene
    *_, frames, _, _, _ = _looking_at_the_red_box(1.4, AROUND)  # the scene's keyframes, with their depth
    emb = enc.encode_texts(["red box", *CANONICAL_NEGATIVES]).float()
    cells = view_evidence._CellRelevancy(pyr, emb[0], emb[1:], CFG.query.temperature)
    ray = obj.center - eyes[2]
    start = obj.center - 0.3 * ray / np.linalg.norm(ray)
    with_depth = view_evidence.triangulate_fn(cset, list(enumerate(frames)), pyr, CFG.candidates, cells,
                                              0.3)(start, 0.1)
    without = view_evidence.triangulate_fn(cset, rgb_only, pyr, CFG.candidates, cells, 0.3)(start, 0.1)
    assert with_depth is not None and without is not None
    np.testing.assert_allclose(with_depth, without)
    assert np.linalg.norm(with_depth - obj.center) < 0.04


def test_a_tightly_triangulated_small_object_keeps_its_centre_over_the_measured_front_face(monkeypatch):
    """With measured depth whose surface points agree (`surface_cut` has an answer), a triangulation that
    pins the depth within TRI_PIN_M stands: views 45 degrees apart on one side of a 10 cm cube meet at its
    centre, while their rays meet the measured surface on the faces towards the cameras, ~5 cm nearer.
    (The 40 cm box seen from around does not check this: its surface points disagree, `surface_cut` gives
    nothing; the near-parallel views check the other branch, the scripted test the threshold on made-up
    numbers.) `surface_cut` and `depth_uncertainty` are only watched here, not replaced."""
    _, obj, eyes, frames, enc, pyr, cset = _looking_at_the_red_box(1.0, (135, 180, 225), size_m=0.1)
    emb = enc.encode_texts(["red box", *CANONICAL_NEGATIVES]).float()
    cells = view_evidence._CellRelevancy(pyr, emb[0], emb[1:], CFG.query.temperature)
    cuts, pins = [], []
    real_cut, real_pin = view_evidence.surface_cut, view_evidence.depth_uncertainty

    def watched_cut(points, min_rays=2):
        cuts.append(real_cut(points, min_rays))
        return cuts[-1]

    def watched_pin(x, rays):
        pins.append(real_pin(x, rays))
        return pins[-1]

    monkeypatch.setattr(view_evidence, "surface_cut", watched_cut)
    monkeypatch.setattr(view_evidence, "depth_uncertainty", watched_pin)
    ray = obj.center - eyes[1]
    start = obj.center - 0.3 * ray / np.linalg.norm(ray)  # 30 cm short of the centre along the middle view
    out = view_evidence.triangulate_fn(cset, list(enumerate(frames)), pyr, CFG.candidates, cells,
                                       0.3)(start, 0.1)
    # The case under test: both passes triangulated (depth_uncertainty is asked once per pass whose rays
    # meet) and found the measured surface points agreeing on the front of the cube, measurably off its
    # centre, nearer the cameras.
    assert len(cuts) == len(pins) == 2 and all(c is not None for c in cuts), (cuts, pins)
    cut = cuts[-1]
    assert np.linalg.norm(cut - obj.center) > 0.04 and _inside(obj, cut), (cut, obj.center)
    assert all(np.linalg.norm(cut - e) < np.linalg.norm(obj.center - e) for e in eyes)
    # The triangulated centre stands, not the surface cut; the same point the views give without depth.
    assert out is not None
    assert np.linalg.norm(out - obj.center) < 0.02, (out, obj.center, cut)
    assert np.linalg.norm(out - cut) > 0.03, (out, cut)
    rgb_only = [(i, dataclasses.replace(f, depth_m=None)) for i, f in enumerate(frames)]
    np.testing.assert_allclose(out, view_evidence.triangulate_fn(cset, rgb_only, pyr, CFG.candidates, cells,
                                                                 0.3)(start, 0.1))
    # ... because the rays pin the depth far more tightly than TRI_PIN_M.
    assert max(pins[:2]) < 0.25 * view_evidence.TRI_PIN_M, pins


def test_surface_cut_is_the_median_of_the_measured_points_without_the_outliers():
    pts = [np.array([1.0, 2.0, 0.3]), np.array([1.02, 2.0, 0.31]), None, np.array([1.0, 2.03, 0.3]),
           np.array([1.0, 2.0, 1.3])]  # one ray hit the wall behind
    np.testing.assert_allclose(view_evidence.surface_cut(pts), [1.0, 2.0, 0.3])
    assert view_evidence.surface_cut([pts[0], None]) is None  # one measured point: not enough
    assert view_evidence.surface_cut([pts[0], pts[4]]) is None  # two that disagree
    far = [np.array([3.0, 0.0, 0.0]), np.array([0.0, 3.0, 0.0]), np.array([0.0, 0.0, 3.0])]
    assert view_evidence.surface_cut(pts[:2] + far) is None  # two of five agree: fewer than half
