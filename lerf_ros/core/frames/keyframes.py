"""Keyframe selection and the bounded keyframe store, shared by the trainer node and the bag tool.

Selection (``KeyframeSelector``): a frame becomes a keyframe when, relative to the last keyframe,
the camera moved at least ``min_translation_m`` ("moved"), turned at least ``min_rotation_deg``
("turned"), or ``max_interval_s`` passed ("interval"); the very first frame is "first". Anything
else is "redundant". A frame that would be accepted is rejected as "blurred" when its sharpness is
below ``blur_threshold``; the blur test runs only then, so redundant frames cost no image work.
With several cameras (``Frame.camera``: a head and a wrist camera) each camera is judged against its own
last keyframe: judged against the other camera's, every frame would have "moved" and been kept.

Blur metric: variance of the 4-neighbour Laplacian [[0, 1, 0], [1, -4, 1], [0, 1, 0]] of the grey
image (ITU-R 601 luma of RGB scaled to [0, 1]) over interior pixels. It is computed at the image's
own resolution, so it falls as resolution grows for the same blur (our 96 x 72 synthetic frames
score ~6e-3 sharp and ~2e-4 after a 5 x 5 box blur; ~9e-4 vs ~3e-5 at 640 x 480). The default
2e-4 (about 13 in 8-bit units) is permissive: it drops only frames smeared over several pixels.
Known limitation of this metric: a view of a textureless wall also scores low and is rejected.

Store (``KeyframeStore``): keyframes keyed by ids that are never reused, at most ``max_keyframes``,
of any image size and intrinsics (several cameras feed one map).
When full, it evicts the most redundant keyframe: the one whose pose is closest to another
keyframe's, with distance = translation (m) + rotation (rad) * min_translation_m /
radians(min_rotation_deg), so a turn by the rotation threshold weighs as much as a move by the
translation threshold. Ties go to the one with the closer second neighbour, then to the older.
The newest keyframe is never evicted. Why not drop the oldest: a robot that patrols keeps
revisiting places, and FIFO would forget the rooms it saw first (and the objects in them), while
redundancy eviction thins densely covered places and keeps the map's coverage.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass

import numpy as np

from .camera import CameraIntrinsics
from .frame import Frame

#: RGB -> luma weights (ITU-R BT.601), for the blur metric.
_LUMA = np.array([0.299, 0.587, 0.114])


@dataclass(frozen=True)
class KeyframeConfig:
    """Thresholds for keyframe selection and the store's memory bound.

    blur_threshold: minimum variance of the Laplacian of the [0, 1] grey image; 0 disables.
    """

    min_translation_m: float = 0.10
    min_rotation_deg: float = 10.0
    max_interval_s: float = 5.0
    blur_threshold: float = 2e-4
    max_keyframes: int = 200

    def __post_init__(self):
        for key in ("min_translation_m", "min_rotation_deg", "max_interval_s"):
            value = getattr(self, key)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise ValueError(f"KeyframeConfig.{key} must be a finite number > 0, got {value!r}")
        b = self.blur_threshold
        if not (isinstance(b, (int, float)) and math.isfinite(b) and b >= 0):
            raise ValueError(f"KeyframeConfig.blur_threshold must be a finite number >= 0, got {b!r}")
        m = self.max_keyframes
        if isinstance(m, bool) or not isinstance(m, int) or m < 2:
            raise ValueError(f"KeyframeConfig.max_keyframes must be an integer >= 2, got {m!r}")

    @property
    def rotation_weight_m_per_rad(self) -> float:
        """Metres that one radian of rotation counts as in the redundancy distance."""
        return self.min_translation_m / math.radians(self.min_rotation_deg)


@dataclass(frozen=True)
class Decision:
    """Outcome of ``KeyframeSelector.consider``.

    reason: "first" | "moved" | "turned" | "interval" (accepted), "blurred" | "redundant" (rejected).
    translation_m, rotation_deg, elapsed_s: motion since the last keyframe (0 for the first frame).
    blur: the blur metric when it was computed, else None.
    """

    accept: bool
    reason: str
    translation_m: float = 0.0
    rotation_deg: float = 0.0
    elapsed_s: float = 0.0
    blur: float | None = None


def blur_metric(image: np.ndarray) -> float:
    """Variance of the Laplacian of the grey image in [0, 1]; image (H, W, 3) uint8, H, W >= 3."""
    if image.ndim != 3 or image.shape[0] < 3 or image.shape[1] < 3:
        raise ValueError(f"blur metric needs an (H, W, 3) image with H, W >= 3, got {image.shape}")
    g = image.astype(np.float64) @ (_LUMA / 255.0)
    lap = g[:-2, 1:-1] + g[2:, 1:-1] + g[1:-1, :-2] + g[1:-1, 2:] - 4.0 * g[1:-1, 1:-1]
    return float(lap.var())


def _rotation_rad(R_a: np.ndarray, R_b: np.ndarray) -> np.ndarray:
    """Angles (radians) of R_a^T R_b for stacks R_a (..., 3, 3), R_b (..., 3, 3), broadcast."""
    trace = np.einsum("...ij,...ij->...", R_a, R_b)
    return np.arccos(np.clip((trace - 1.0) / 2.0, -1.0, 1.0))


class KeyframeSelector:
    """Decides, frame by frame, which frames become keyframes (see module docstring)."""

    def __init__(self, config: KeyframeConfig | None = None):
        self.config = config or KeyframeConfig()
        self._lock = threading.Lock()
        # camera -> ((4, 4) pose, stamp ns) of its last accepted frame
        self._last: dict[str, tuple[np.ndarray, int]] = {}

    @property
    def _last_T(self) -> np.ndarray | None:
        """(4, 4) pose of the last keyframe of the default camera ("") or None."""
        last = self._last.get("")
        return None if last is None else last[0]

    def reset(self) -> None:
        """Forget the last keyframes: the next frame of every camera is "first"."""
        with self._lock:
            self._last.clear()

    def consider(self, frame: Frame) -> Decision:
        """Validate ``frame`` (ValueError), decide, and on acceptance make it the reference keyframe."""
        frame.validate()
        cfg = self.config
        T = np.asarray(frame.T_world_cam, dtype=np.float64)
        with self._lock:
            last = self._last.get(frame.camera)
            if last is None:
                reason, moved, turned, elapsed = "first", 0.0, 0.0, 0.0
            else:
                last_T, last_stamp_ns = last
                moved = float(np.linalg.norm(T[:3, 3] - last_T[:3, 3]))
                turned = math.degrees(float(_rotation_rad(last_T[:3, :3], T[:3, :3])))
                # A stamp older than the last keyframe (out-of-order delivery) counts as no time passed.
                elapsed = max(0, int(frame.stamp_ns) - last_stamp_ns) * 1e-9
                if moved >= cfg.min_translation_m:
                    reason = "moved"
                elif turned >= cfg.min_rotation_deg:
                    reason = "turned"
                elif elapsed >= cfg.max_interval_s:
                    reason = "interval"
                else:
                    return Decision(False, "redundant", moved, turned, elapsed)
            blur = None
            if cfg.blur_threshold > 0:
                blur = blur_metric(frame.image)
                if blur < cfg.blur_threshold:
                    return Decision(False, "blurred", moved, turned, elapsed, blur)
            self._last[frame.camera] = (T.copy(), int(frame.stamp_ns))
            return Decision(True, reason, moved, turned, elapsed, blur)


class KeyframeStore:
    """Bounded, thread-safe keyframe storage with stable integer ids (0, 1, 2, ... never reused).

    Keyframes may differ in image size and intrinsics (one map from several cameras); frames must be
    undistorted (pinhole, as after ingest), since the saved arrays keep only fx, fy, cx, cy.
    """

    def __init__(self, config: KeyframeConfig | None = None):
        self.config = config or KeyframeConfig()
        self._lock = threading.RLock()
        self._frames: dict[int, Frame] = {}
        self._next_id = 0

    def __len__(self) -> int:
        with self._lock:
            return len(self._frames)

    def __contains__(self, kf_id: int) -> bool:
        with self._lock:
            return kf_id in self._frames

    def ids(self) -> list[int]:
        """Ids of the held keyframes, ascending (= insertion order)."""
        with self._lock:
            return list(self._frames)

    def get(self, kf_id: int) -> Frame:
        with self._lock:
            if kf_id not in self._frames:
                raise KeyError(f"no keyframe with id {kf_id}; held: {len(self._frames)} keyframes")
            return self._frames[kf_id]

    def frames(self) -> list[Frame]:
        with self._lock:
            return list(self._frames.values())

    def add(self, frame: Frame) -> tuple[int, list[int]]:
        """Store a copy of ``frame``; return (its id, ids evicted to keep the bound)."""
        frame.validate()
        if frame.intrinsics.is_distorted:
            raise ValueError(
                f"keyframes must be undistorted, got distortion model {frame.intrinsics.distortion_model!r}"
            )
        with self._lock:
            depth = None if frame.depth_m is None else np.array(frame.depth_m, dtype=np.float32)
            # Copies: ROS callbacks may reuse their buffers after handing a frame over.
            stored = Frame(
                np.array(frame.image),
                frame.intrinsics,
                np.array(frame.T_world_cam, dtype=np.float64),
                int(frame.stamp_ns),
                depth,
                frame.camera,
            )
            kf_id = self._next_id
            self._next_id += 1
            self._frames[kf_id] = stored
            evicted = []
            while len(self._frames) > self.config.max_keyframes:
                victim = self._most_redundant()
                del self._frames[victim]
                evicted.append(victim)
            return kf_id, evicted

    def remove(self, kf_id: int) -> None:
        """Forget keyframe ``kf_id`` (e.g. one whose language features could not be computed); its id is
        not reused. KeyError when it is not held."""
        with self._lock:
            if kf_id not in self._frames:
                raise KeyError(f"no keyframe with id {kf_id}; held: {len(self._frames)} keyframes")
            del self._frames[kf_id]

    def evict_redundant(self) -> int:
        """Evict the keyframe ``add`` would evict when full (the most redundant, never the newest), to meet a
        bound other than ``max_keyframes`` (the journal's disk limit); return its id. ValueError when fewer
        than 2 keyframes are held."""
        with self._lock:
            if len(self._frames) < 2:
                raise ValueError(f"cannot evict from {len(self._frames)} keyframes: the newest is kept")
            victim = self._most_redundant()
            del self._frames[victim]
            return victim

    def redundancy_distances(self) -> np.ndarray:
        """(N, N) pose distances between held keyframes (ids() order), diagonal inf."""
        with self._lock:
            poses = np.stack([f.T_world_cam for f in self._frames.values()])
        t, R = poses[:, :3, 3], poses[:, :3, :3]
        dist = np.linalg.norm(t[:, None] - t[None], axis=2)
        dist += self.config.rotation_weight_m_per_rad * _rotation_rad(R[:, None], R[None])
        np.fill_diagonal(dist, np.inf)
        return dist

    def _most_redundant(self) -> int:
        ids = list(self._frames)
        dist = np.sort(self.redundancy_distances(), axis=1)[:, :2]
        dist[-1] = np.inf  # never the newest: it is the robot's current view
        # lexsort: last key primary -> nearest neighbour, then second neighbour, then age (index).
        order = np.lexsort((np.arange(len(ids)), dist[:, 1], dist[:, 0]))
        return ids[int(order[0])]

    # ------------------------------------------------------------------ save / load
    def to_arrays(self) -> dict[str, np.ndarray]:
        """State as arrays (N keyframes, ids order): ids (N,) int64, images (N, H, W, 3) uint8,
        T_world_cam (N, 4, 4) float64, stamps_ns (N,) int64, intrinsics (N, 6) float64
        (width, height, fx, fy, cx, cy), depth_m (N, H, W) float32 (0 where absent), has_depth (N,)
        bool, next_id () int64, cameras (N,) str. Keyframes of different sizes are padded with zeros to
        the largest (H, W); keyframe i is ``images[i, :height_i, :width_i]`` (`pad_keyframe_arrays`)."""
        with self._lock:
            ids, frames = list(self._frames), list(self._frames.values())
            next_id = self._next_id
        intr = [f.intrinsics for f in frames]
        return pad_keyframe_arrays({
            "ids": np.array(ids, dtype=np.int64),
            "images": [f.image for f in frames],
            "T_world_cam": np.array([f.T_world_cam for f in frames], dtype=np.float64).reshape(-1, 4, 4),
            "stamps_ns": np.array([f.stamp_ns for f in frames], dtype=np.int64),
            "intrinsics": np.array(
                [[i.width, i.height, i.fx, i.fy, i.cx, i.cy] for i in intr], dtype=np.float64
            ).reshape(-1, 6),
            "depth_m": [np.zeros(f.image.shape[:2], np.float32) if f.depth_m is None else f.depth_m
                        for f in frames],
            "has_depth": np.array([f.depth_m is not None for f in frames], dtype=bool),
            "next_id": np.array(next_id, dtype=np.int64),
            "cameras": np.array([f.camera for f in frames], dtype=str),
        })

    @classmethod
    def from_arrays(cls, config: KeyframeConfig, arrays) -> KeyframeStore:
        """Rebuild a store saved by ``to_arrays``; ValueError naming the bad entry, nothing half-loaded."""
        missing = [k for k in _ARRAY_KEYS if k not in arrays]
        if missing:
            raise ValueError(f"keyframe arrays lack {missing}")
        a = {k: np.asarray(arrays[k]) for k in _ARRAY_KEYS}
        n = len(a["ids"])
        images = a["images"]
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[0] != n or images.shape[3] != 3:
            raise ValueError(
                f"keyframe images must be ({n}, H, W, 3) uint8, got {images.dtype} {images.shape}"
            )
        h, w = images.shape[1:3]
        expected = {
            "T_world_cam": (n, 4, 4), "stamps_ns": (n,), "intrinsics": (n, 6), "depth_m": (n, h, w),
            "has_depth": (n,), "next_id": (),
        }  # fmt: skip
        for key, shape in expected.items():
            if a[key].shape != shape:
                raise ValueError(f"keyframe array {key!r} must have shape {shape}, got {a[key].shape}")
        ids = a["ids"].astype(np.int64)
        if n and (np.any(np.diff(ids) <= 0) or ids[0] < 0 or int(a["next_id"]) <= ids[-1]):
            raise ValueError(f"keyframe ids must be ascending, >= 0 and below next_id: {ids.tolist()}")
        if n > config.max_keyframes:
            raise ValueError(
                f"saved store holds {n} keyframes, more than max_keyframes={config.max_keyframes}"
            )
        cameras = np.asarray(arrays["cameras"]) if "cameras" in arrays else np.full(n, "")
        if cameras.shape != (n,) or cameras.dtype.kind not in "US":
            raise ValueError(f"keyframe array 'cameras' must be ({n},) strings, got {cameras.dtype} "
                             f"{cameras.shape}")
        store = cls(config)
        for i in range(n):
            wi, hi, fx, fy, cx, cy = a["intrinsics"][i].tolist()
            intr = CameraIntrinsics(int(wi), int(hi), fx, fy, cx, cy)
            # A keyframe smaller than the largest was padded (`pad_keyframe_arrays`): its own size is the
            # intrinsics'; one claiming more than the arrays hold is left to ``validate`` to refuse.
            rows, cols = (slice(0, int(hi)), slice(0, int(wi))) if 0 < wi <= w and 0 < hi <= h \
                else (slice(None), slice(None))
            depth = a["depth_m"][i, rows, cols].astype(np.float32) if bool(a["has_depth"][i]) else None
            frame = Frame(images[i, rows, cols].copy(), intr, a["T_world_cam"][i].astype(np.float64),
                          int(a["stamps_ns"][i]), depth, str(cameras[i]))  # fmt: skip
            try:
                frame.validate()
            except ValueError as exc:
                raise ValueError(f"saved keyframe {int(ids[i])}: {exc}") from exc
            store._frames[int(ids[i])] = frame
        store._next_id = int(a["next_id"])
        return store


_ARRAY_KEYS = ("ids", "images", "T_world_cam", "stamps_ns", "intrinsics", "depth_m", "has_depth", "next_id")


def pad_keyframe_arrays(arrays: dict) -> dict[str, np.ndarray]:
    """``arrays`` with "images" and "depth_m" given as lists of per-keyframe (h_i, w_i, 3) uint8 and
    (h_i, w_i) float32 arrays (or already stacked) stacked into (N, H, W, 3) / (N, H, W), zero-padded at the
    bottom and right to the largest H and W. Same-size keyframes stack exactly as before (no padding); the
    intrinsics rows keep each keyframe's own (width, height), which ``KeyframeStore.from_arrays`` crops to.
    """
    out = dict(arrays)
    images, depths = list(arrays["images"]), list(arrays["depth_m"])
    h = max((im.shape[0] for im in images), default=0)
    w = max((im.shape[1] for im in images), default=0)
    out["images"] = np.zeros((len(images), h, w, 3), np.uint8)
    out["depth_m"] = np.zeros((len(depths), h, w), np.float32)
    for i, (im, d) in enumerate(zip(images, depths, strict=True)):
        out["images"][i, :im.shape[0], :im.shape[1]] = im
        out["depth_m"][i, :d.shape[0], :d.shape[1]] = d
    return out
