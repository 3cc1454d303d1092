"""Keyframe selection (motion / rotation / time / blur) and the bounded store (eviction, ids, save/load)."""

import math
import threading

import numpy as np
import pytest

from lerf_ros.core.frames.frame import Frame
from lerf_ros.core.frames.keyframes import KeyframeConfig, KeyframeSelector, KeyframeStore, blur_metric
from lerf_ros.core.frames.transforms import make_transform
from lerf_ros.sim.scene import SyntheticRoom, default_intrinsics, look_at_pose

INTR = default_intrinsics()
SEC = 1_000_000_000


@pytest.fixture(scope="module")
def sharp():
    """A sharp (72, 96, 3) render of the synthetic room."""
    room = SyntheticRoom(0)
    return room.render(look_at_pose([1.5, 0.0, 1.2], [0.0, 0.0, 0.35]), INTR)[0]


def box_blur(image, k=5):
    p = k // 2
    x = np.pad(image.astype(np.float64), ((p, p), (p, p), (0, 0)), mode="edge")
    windows = np.lib.stride_tricks.sliding_window_view(x, (k, k), axis=(0, 1))
    return np.rint(windows.mean(axis=(-1, -2))).astype(np.uint8)


def rot_z(deg):
    a = math.radians(deg)
    return np.array([[math.cos(a), -math.sin(a), 0], [math.sin(a), math.cos(a), 0], [0, 0, 1.0]])


def frame(image, x=0.0, yaw_deg=0.0, t_s=0.0, depth=None):
    return Frame(image, INTR, make_transform(rot_z(yaw_deg), [x, 0.0, 1.0]), round(t_s * SEC), depth)


def test_translation_rotation_and_interval(sharp):
    sel = KeyframeSelector(KeyframeConfig(blur_threshold=0.0))
    steps = [  # (x, yaw, t) -> expected reason, each relative to the last *accepted* frame
        ((0.0, 0.0, 0.0), "first"),
        ((0.06, 0.0, 0.1), "redundant"),
        ((0.12, 0.0, 0.2), "moved"),  # 0.12 m from the first keyframe
        ((0.18, 0.0, 0.3), "redundant"),  # only 0.06 m from the last keyframe
        ((0.12, 9.0, 0.4), "redundant"),  # 9 deg < 10 deg
        ((0.12, 10.5, 0.5), "turned"),
        ((0.13, 5.0, 0.6), "redundant"),  # 5.5 deg and 1 cm from the last keyframe
        ((0.12, 10.5, 5.4), "redundant"),  # 4.9 s since the last keyframe (t = 0.5 s)
        ((0.12, 10.5, 5.5), "interval"),
        ((0.12, 10.5, 3.0), "redundant"),  # out of order: no time passed
    ]
    for (x, yaw, t), reason in steps:
        d = sel.consider(frame(sharp, x, yaw, t))
        assert (d.accept, d.reason) == (reason in ("first", "moved", "turned", "interval"), reason), (
            x,
            yaw,
            t,
        )
    d = sel.consider(frame(sharp, 0.12, 10.5, 6.0))
    assert d.translation_m == pytest.approx(0.0) and d.elapsed_s == pytest.approx(0.5)
    d = sel.consider(frame(sharp, 0.12, 20.6, 6.0))
    assert d.reason == "turned" and d.rotation_deg == pytest.approx(10.1)
    sel.reset()
    assert sel.consider(frame(sharp, 0.12, 20.6, 6.0)).reason == "first"


def test_blur_metric_by_hand():
    img = np.zeros((3, 4, 3), np.uint8)
    img[1, 1] = 255  # luma 1.0: Laplacian -4 at (1, 1) and +1 at (1, 2) -> variance 6.25
    assert blur_metric(img) == pytest.approx(6.25)
    assert blur_metric(np.full((5, 5, 3), 77, np.uint8)) == 0.0
    with pytest.raises(ValueError, match="H, W >= 3"):
        blur_metric(np.zeros((2, 8, 3), np.uint8))


def test_blurred_frame_rejected_sharp_accepted(sharp):
    blurred = box_blur(sharp)
    assert blur_metric(sharp) > 10 * blur_metric(blurred)
    sel = KeyframeSelector()  # default threshold
    d = sel.consider(frame(blurred))
    assert (d.accept, d.reason) == (False, "blurred") and d.blur < KeyframeConfig().blur_threshold
    d = sel.consider(frame(sharp))  # the blurred one did not become the reference
    assert (d.accept, d.reason) == (True, "first") and d.blur > KeyframeConfig().blur_threshold
    assert sel.consider(frame(blurred, x=0.5)).reason == "blurred"
    assert sel.consider(frame(sharp, x=0.5)).reason == "moved"
    # 0 disables the test.
    assert KeyframeSelector(KeyframeConfig(blur_threshold=0.0)).consider(frame(blurred)).accept


def test_eviction_keeps_bound_and_drops_most_redundant(sharp):
    store = KeyframeStore(KeyframeConfig(max_keyframes=4))
    for x in (0.0, 1.0, 1.03, 3.0):
        assert store.add(frame(sharp, x))[1] == []
    # id 1 (x = 1.0) and id 2 (x = 1.03) are 3 cm apart; id 1's second neighbour (x = 0, 1.0 m)
    # is closer than id 2's (1.03 m), so id 1 is the more redundant of the pair.
    kf_id, evicted = store.add(frame(sharp, 5.0))
    assert (kf_id, evicted, store.ids(), len(store)) == (4, [1], [0, 2, 3, 4], 4)
    # A frame almost on top of the newest: the older of the two goes, never the newest.
    kf_id, evicted = store.add(frame(sharp, 5.001))
    assert (kf_id, evicted, store.ids()) == (5, [4], [0, 2, 3, 5])
    # Ids are stable: each id still maps to the frame it was given.
    assert [store.get(i).T_world_cam[0, 3] for i in store.ids()] == [0.0, 1.03, 3.0, 5.001]
    with pytest.raises(KeyError, match="4"):
        store.get(4)


def test_redundancy_distance_weights_rotation(sharp):
    store = KeyframeStore(KeyframeConfig(min_translation_m=0.1, min_rotation_deg=10.0))
    store.add(frame(sharp, 0.0, 0.0))
    store.add(frame(sharp, 0.3, 90.0))
    # 0.3 m + (pi / 2 rad) * (0.1 m / radians(10 deg)) = 0.3 + 0.9
    assert store.redundancy_distances()[0, 1] == pytest.approx(1.2)


def test_store_copies_and_validates(sharp):
    store = KeyframeStore()
    img = sharp.copy()
    kf_id, _ = store.add(frame(img))
    img[:] = 0  # the caller reusing its buffer must not change the keyframe
    assert store.get(kf_id).image.max() > 0
    bad = Frame(sharp, INTR, np.diag([1.0, 1.0, 2.0, 1.0]), 0)
    with pytest.raises(ValueError, match="T_world_cam"):
        store.add(bad)
    with pytest.raises(ValueError, match="T_world_cam"):
        KeyframeSelector().consider(bad)
    with pytest.raises(ValueError, match="camera must be a string"):
        store.add(Frame(sharp, INTR, np.eye(4), 0, camera=3))
    assert store.ids() == [0] and store.to_arrays()["next_id"] == 1  # failed adds changed nothing


def test_selector_judges_each_camera_against_its_own_last_keyframe(sharp):
    sel = KeyframeSelector(KeyframeConfig(blur_threshold=0.0))
    head = [(0.0, "first"), (0.05, "redundant"), (0.12, "moved")]
    wrist = [(2.0, "first"), (2.05, "redundant"), (2.08, "redundant"), (2.15, "moved")]
    got = []
    # Interleaved as two cameras arrive: against one shared reference every frame would be 2 m away.
    for i in range(4):
        for name, steps in (("head", head), ("wrist", wrist)):
            if i < len(steps):
                f = Frame(sharp, INTR, make_transform(np.eye(3), [steps[i][0], 0.0, 1.0]), i * SEC // 10,
                          camera=name)
                got.append((name, sel.consider(f).reason))
    assert got == [("head", "first"), ("wrist", "first"), ("head", "redundant"), ("wrist", "redundant"),
                   ("head", "moved"), ("wrist", "redundant"), ("wrist", "moved")]
    sel.reset()
    assert sel.consider(frame(sharp, 0.01)).reason == "first"


def test_store_holds_cameras_of_different_sizes_and_round_trips(sharp):
    config = KeyframeConfig(max_keyframes=4)
    store = KeyframeStore(config)
    small_intr = default_intrinsics(40, 30, 90.0)
    small = np.ascontiguousarray(sharp[:30, :40])
    depth_small = np.linspace(0.5, 3.0, 30 * 40, dtype=np.float32).reshape(30, 40)
    store.add(frame(sharp, 0.0))
    store.add(Frame(small, small_intr, make_transform(np.eye(3), [1.0, 0.0, 1.0]), SEC, depth_small, "wrist"))
    store.add(frame(sharp, 2.0, depth=np.full((72, 96), 2.0, np.float32)))
    arrays = store.to_arrays()
    # padded to the largest keyframe; each row's own size is in its intrinsics
    assert arrays["images"].shape == (3, 72, 96, 3) and arrays["depth_m"].shape == (3, 72, 96)
    assert arrays["intrinsics"][:, :2].tolist() == [[96, 72], [40, 30], [96, 72]]
    assert arrays["cameras"].tolist() == ["", "wrist", ""]
    assert np.all(arrays["images"][1, 30:] == 0) and np.all(arrays["images"][1, :, 40:] == 0)
    loaded = KeyframeStore.from_arrays(config, arrays)
    for kf_id in store.ids():
        a, b = store.get(kf_id), loaded.get(kf_id)
        assert (a.image.shape, a.camera, a.intrinsics) == (b.image.shape, b.camera, b.intrinsics)
        np.testing.assert_array_equal(a.image, b.image)
        if a.depth_m is not None:
            np.testing.assert_array_equal(a.depth_m, b.depth_m)
    assert loaded.get(1).image.shape == (30, 40, 3) and loaded.get(1).depth_m.shape == (30, 40)
    # A map saved before keyframes named their camera has no "cameras" array: all the default camera.
    old = KeyframeStore.from_arrays(config, {k: v for k, v in arrays.items() if k != "cameras"})
    assert [f.camera for f in old.frames()] == ["", "", ""]
    # A keyframe claiming more pixels than the arrays hold is refused, naming it.
    too_big = arrays["intrinsics"].copy()
    too_big[1, :2] = (120, 30)
    with pytest.raises(ValueError, match="saved keyframe 1"):
        KeyframeStore.from_arrays(config, {**arrays, "intrinsics": too_big})


@pytest.mark.parametrize(
    ("key", "value"),
    [("min_translation_m", 0.0), ("min_rotation_deg", -1.0), ("max_interval_s", math.inf),
     ("blur_threshold", -1e-4), ("max_keyframes", 1), ("max_keyframes", 2.5)],
)  # fmt: skip
def test_config_rejects_bad_values(key, value):
    with pytest.raises(ValueError, match=key):
        KeyframeConfig(**{key: value})


def test_to_from_arrays_round_trip(sharp):
    config = KeyframeConfig(max_keyframes=3)
    store = KeyframeStore(config)
    depth = np.full(sharp.shape[:2], 2.5, np.float32)
    for i, x in enumerate((0.0, 1.0, 1.01, 2.0)):
        store.add(frame(sharp, x, t_s=i, depth=depth if i % 2 else None))
    arrays = store.to_arrays()
    assert arrays["images"].shape == (3, 72, 96, 3) and arrays["intrinsics"].shape == (3, 6)
    loaded = KeyframeStore.from_arrays(config, arrays)
    assert loaded.ids() == store.ids()
    for kf_id in store.ids():
        a, b = store.get(kf_id), loaded.get(kf_id)
        np.testing.assert_array_equal(a.image, b.image)
        np.testing.assert_array_equal(a.T_world_cam, b.T_world_cam)
        assert (a.stamp_ns, a.intrinsics) == (b.stamp_ns, b.intrinsics)
        assert (a.depth_m is None) == (b.depth_m is None)
        if a.depth_m is not None:
            np.testing.assert_array_equal(a.depth_m, b.depth_m)
    assert loaded.add(frame(sharp, 3.0))[0] == store.add(frame(sharp, 3.0))[0] == 4
    empty = KeyframeStore.from_arrays(config, KeyframeStore(config).to_arrays())
    assert len(empty) == 0 and empty.add(frame(sharp))[0] == 0


def test_from_arrays_rejects_bad_state(sharp):
    config = KeyframeConfig(max_keyframes=3)
    store = KeyframeStore(config)
    for x in (0.0, 1.0):
        store.add(frame(sharp, x))
    good = store.to_arrays()
    with pytest.raises(ValueError, match="stamps_ns"):
        KeyframeStore.from_arrays(config, {k: v for k, v in good.items() if k != "stamps_ns"})
    with pytest.raises(ValueError, match="T_world_cam"):
        KeyframeStore.from_arrays(config, {**good, "T_world_cam": good["T_world_cam"][:1]})
    with pytest.raises(ValueError, match="ids"):
        KeyframeStore.from_arrays(config, {**good, "ids": np.array([1, 1])})
    with pytest.raises(ValueError, match="max_keyframes"):
        KeyframeStore.from_arrays(KeyframeConfig(max_keyframes=2), {**good, **_three(good)})
    nan_pose = good["T_world_cam"].copy()
    nan_pose[1, 0, 3] = np.nan
    with pytest.raises(ValueError, match="saved keyframe 1"):
        KeyframeStore.from_arrays(config, {**good, "T_world_cam": nan_pose})


def _three(good):
    """The two-keyframe state with the first keyframe duplicated as a third."""
    out = {k: np.concatenate([good[k], good[k][:1]]) for k in good if k not in ("ids", "next_id")}
    return {**out, "ids": np.array([0, 1, 2]), "next_id": np.array(3)}


def test_concurrent_adds_keep_bound_and_unique_ids(sharp):
    store = KeyframeStore(KeyframeConfig(max_keyframes=20))
    got = []

    def worker(offset):
        for i in range(50):
            got.append(store.add(frame(sharp, offset + 0.01 * i))[0])

    threads = [threading.Thread(target=worker, args=(10.0 * k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(store) == 20 and sorted(got) == list(range(200))
    assert store.ids() == sorted(store.ids()) and store.to_arrays()["next_id"] == 200
