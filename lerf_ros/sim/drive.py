"""A robot driving through a room: path, pan-tilt camera rig, TF tree and camera stamps.

The base follows a smooth closed loop (``plan_loop``) through waypoints on the free floor: one
0.7-1.3 m from each object (or group of objects), more where those leave a gap, alternately 0.6-1.2 m
from a wall and further inside; visited in the order of their bearing from the room centre, so the
loop weaves in and out and its heading keeps changing. It keeps 0.45 m from the walls and 0.3 m from
anything standing on the floor (detours are inserted around obstacles in the way).
The camera sits 0.8-1.5 m high, tilted 15-45 degrees down, on a pan joint that sweeps about a bias
towards the inside of the loop. TF tree (frames as a real robot names them)::

    map -> odom                      /tf, localisation (drift growing over the drive), 5-10 Hz
    odom -> base_link                /tf, odometry, 30-50 Hz
    base_link -> camera_pan_link     /tf, revolute pan joint at the odometry rate, 5 ms after odometry
    camera_pan_link -> camera_link   /tf_static, tilt
    camera_link -> camera_color_optical_frame   /tf_static

Images at 5-15 Hz with +-3 ms capture jitter, so no image stamp coincides with a TF stamp and a
reader must interpolate. Every target object must be seen (``render_labels``) in at least
``min_views`` frames from directions at least ``min_span_deg`` apart, else the path (and the rig)
is re-drawn; all of it is a pure function of the seed.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..core.frames.camera import CameraIntrinsics
from ..core.frames.transforms import invert_transform, make_transform
from .recording import Recording, TfSeries
from .scene import R_LINK_OPTICAL, default_intrinsics

BASE_FRAME, PAN_FRAME, LINK_FRAME = "base_link", "camera_pan_link", "camera_link"
OPTICAL_FRAME = "camera_color_optical_frame"
#: Clearances of the base path: from walls (waypoints / whole path) and from obstacles, metres.
WAYPOINT_WALL_M = (0.6, 1.2)
PATH_WALL_M = 0.45
PATH_OBSTACLE_M = 0.3


@dataclass(frozen=True)
class DriveConfig:
    """Image size (hfov drawn 70-80 degrees per seed); visibility check: each target object in at least
    ``min_views`` frames with ``min_pixels`` labelled pixels (checked at 1 / ``check_stride`` resolution),
    seen from camera positions whose bearings from the object span at least ``min_span_deg``;
    ``duration_s`` None = drawn 20-40 s per seed; ``start_time_s``: epoch of the first image."""

    width: int = 160
    height: int = 120
    min_views: int = 3
    min_span_deg: float = 20.0
    min_pixels: int = 12
    check_stride: int = 2
    duration_s: float | None = None
    max_attempts: int = 40
    start_time_s: float = 1_700_000_000.0

    def validate(self) -> DriveConfig:
        if self.width < 8 or self.height < 8:
            raise ValueError(f"image size must be at least 8x8, got {self.width}x{self.height}")
        if self.min_views < 0 or self.min_pixels < 1 or self.check_stride < 1 or self.max_attempts < 1:
            raise ValueError(f"bad visibility check settings: {self}")
        if self.duration_s is not None and not 1.0 <= self.duration_s <= 600.0:
            raise ValueError(f"duration_s must be in [1, 600] s, got {self.duration_s}")
        return self


@dataclass(frozen=True, eq=False)
class Drive:
    """One drive through a room: the recording (TF series + image stamps), ground-truth camera poses
    ``T_world_cam`` (N, 4, 4) at the image stamps, the base path (M, 2) and what was drawn."""

    recording: Recording
    T_world_cam: np.ndarray
    path_xy: np.ndarray
    camera_height_m: float
    tilt_down_deg: float
    pan_bias_deg: float
    pan_amplitude_deg: float
    image_rate_hz: float
    odom_rate_hz: float
    map_rate_hz: float
    duration_s: float
    views: dict  # object name -> frames in which it is seen
    view_span_deg: dict  # object name -> angle spanned by the directions it is seen from
    attempt: int

    @property
    def intrinsics(self) -> CameraIntrinsics:
        return self.recording.intrinsics

    def pan_deg(self) -> np.ndarray:
        """(K,) pan joint angle at its stamps, degrees (from the published base_link -> pan link TF)."""
        series = next(s for s in self.recording.tf if s.child == PAN_FRAME)
        return np.degrees(np.arctan2(series.T[:, 1, 0], series.T[:, 0, 0]))


def drive_through(room, seed: int | None = None, config: DriveConfig = DriveConfig()) -> Drive:
    """Draw a drive through ``room`` (``Room`` or ``SyntheticRoom``-like: bounds, objects, render_labels,
    optional floor_footprints); ``seed`` defaults to ``room.seed``. Raises RuntimeError when no path
    shows every object ``min_views`` times from directions ``min_span_deg`` apart within
    ``max_attempts`` deterministic re-draws."""
    config.validate()
    seed = int(room.seed if seed is None else seed)
    obstacles = getattr(room, "floor_footprints", None)
    if obstacles is None:
        obstacles = np.array([np.r_[o.box_min[:2], o.box_max[:2]] for o in room.objects])
    worst = None
    for attempt in range(config.max_attempts):
        prng = np.random.default_rng([seed, 11, attempt])  # the path's own stream (see random_room)
        path = plan_loop(prng, room.bounds, obstacles, [o.center[:2] for o in room.objects])
        if path is None:
            continue
        # Camera rig and rates are re-drawn with the path: a low, steep camera may never see a table top.
        rig = _draw_rig(np.random.default_rng([seed, 10, attempt]))
        intr = default_intrinsics(config.width, config.height, rig["hfov"])
        recording, duration = _record(prng, path, intr, rig, config)
        poses = recording.camera_poses()
        views, spans = _views(room, poses, intr, config)
        short = [n for n in views if views[n] < config.min_views or spans[n] < config.min_span_deg]
        if not short:
            return Drive(recording, poses, path, rig["height"], rig["tilt"], rig["pan_bias"],
                         rig["pan_amp"], rig["image_rate"], rig["odom_rate"], rig["map_rate"], duration,
                         views, spans, attempt)
        if worst is None or len(short) < len(worst):
            worst = {n: (views[n], spans[n]) for n in short}
    raise RuntimeError(f"room seed {seed}: no path within {config.max_attempts} attempts shows every object "
                       f"in >= {config.min_views} frames from directions >= {config.min_span_deg} degrees "
                       f"apart; fewest misses (frames, degrees): {worst}")


def _draw_rig(rng) -> dict:
    """Camera (hfov, height, tilt, pan sweep), rates, speed and odometry drift of one drive."""
    return {
        "hfov": rng.uniform(70.0, 80.0), "height": rng.uniform(0.8, 1.5), "tilt": rng.uniform(15.0, 45.0),
        "forward": rng.uniform(0.05, 0.15), "pan_amp": rng.uniform(20.0, 25.0),
        "pan_bias": rng.uniform(5.0, 20.0), "pan_period": rng.uniform(6.0, 12.0),
        "pan_phase": rng.uniform(0, 2 * np.pi),
        "image_rate": float(np.round(rng.uniform(5.0, 15.0) * 2) / 2),
        "odom_rate": float(rng.choice([30.0, 40.0, 50.0])), "map_rate": float(rng.choice([5.0, 10.0])),
        "speed": rng.uniform(0.3, 0.6),  # m/s; one loop, 20-40 s (config.duration_s overrides)
        "drift_xy": rng.uniform(0.02, 0.08) * _unit(rng.uniform(0, 2 * np.pi)),
        "drift_yaw": np.radians(rng.uniform(0.5, 3.0)) * rng.choice([-1.0, 1.0]),
    }


def _unit(angle: float) -> np.ndarray:
    return np.array([np.cos(angle), np.sin(angle)])


def _distances(points: np.ndarray, footprints: np.ndarray) -> np.ndarray:
    """(M, K) distance from each point (M, 2) to each footprint (K, 4) xmin, ymin, xmax, ymax (0 inside)."""
    d = np.maximum(footprints[None, :, :2] - points[:, None], points[:, None] - footprints[None, :, 2:])
    return np.linalg.norm(np.maximum(d, 0.0), axis=2)


def _clearance(points: np.ndarray, footprints: np.ndarray) -> np.ndarray:
    """(M,) distance from each point (M, 2) to the nearest footprint (K, 4)."""
    if len(footprints) == 0:
        return np.full(len(points), np.inf)
    return _distances(points, footprints).min(axis=1)


def plan_loop(rng, bounds, obstacles, targets=(), samples_per_segment: int = 40) -> np.ndarray | None:
    """A closed Catmull-Rom loop (M, 2) in the room ``bounds`` (2, 3) around ``obstacles`` (K, 4) xmin,
    ymin, xmax, ymax that passes 0.7-1.3 m from every one of ``targets`` (T, 2) (objects; those closer
    than 1 m together count as one), with further waypoints alternately 0.6-1.2 m from a wall and inside
    the room where the targets leave a gap. Waypoints are visited in the order of their bearing from the
    room centre. None when the draws give no loop that keeps PATH_WALL_M from walls and PATH_OBSTACLE_M
    from obstacles."""
    lo, hi = bounds[0, :2], bounds[1, :2]
    centre, half = (lo + hi) / 2, (hi - lo) / 2
    need = PATH_OBSTACLE_M + 0.15

    def free(p):
        inside = np.all((p >= lo + WAYPOINT_WALL_M[0]) & (p <= hi - WAYPOINT_WALL_M[0]))
        return bool(inside and _clearance(p[None], obstacles)[0] >= need)

    waypoints = []
    for c in _merge_close(np.asarray(targets, dtype=np.float64).reshape(-1, 2), 1.0):
        toward = centre - c
        base = np.arctan2(toward[1], toward[0]) if np.linalg.norm(toward) > 0.3 else rng.uniform(0, 2 * np.pi)
        for _ in range(40):
            p = c + rng.uniform(0.7, 1.3) * _unit(base + np.radians(rng.uniform(-70.0, 70.0)))
            if free(p):
                waypoints.append(p)
                break
    k = int(np.clip(round(2 * (hi - lo).sum() / 2.5), 5, 10))
    start = rng.uniform(0, 2 * np.pi)
    bearing = [np.arctan2(*(p - centre)[::-1]) for p in waypoints]
    for i in range(k):
        sector = start + 2 * np.pi * np.array([i - 0.5, i + 0.5]) / k
        if any(np.mod(b - sector[0], 2 * np.pi) < sector[1] - sector[0] for b in bearing):
            continue
        # 40 draws in the sector's band (even: 0.6-1.2 m from a wall, odd: inside), then 40 anywhere in it.
        for j in range(80):
            u = _unit(start + 2 * np.pi * (i + rng.uniform(-0.3, 0.3)) / k)
            # Distance along u from the centre to the rectangle inset by w metres: min over the axes.
            near_wall, far_wall = (float(np.min((half - w) / np.maximum(np.abs(u), 1e-9)))
                                   for w in WAYPOINT_WALL_M)
            if j >= 40:
                r = rng.uniform(0.1, 1.0) * near_wall
            elif i % 2 == 0:
                r = rng.uniform(far_wall, near_wall)
            else:
                r = rng.uniform(0.3, 0.7) * near_wall
            p = centre + max(r, 0.0) * u
            if _clearance(p[None], obstacles)[0] >= need:
                waypoints.append(p)
                break
    if len(waypoints) < 4:
        return None
    waypoints.sort(key=lambda p: np.arctan2(*(p - centre)[::-1]))
    waypoints = [p for i, p in enumerate(waypoints) if i == 0 or np.linalg.norm(p - waypoints[i - 1]) > 0.4]
    if rng.random() < 0.5:
        waypoints.reverse()
    waypoints = _detour(waypoints, obstacles, lo + PATH_WALL_M + 0.1, hi - PATH_WALL_M - 0.1)
    if waypoints is None:
        return None
    loop = _catmull_rom_closed(waypoints, samples_per_segment)
    inside = np.all((loop >= lo + PATH_WALL_M) & (loop <= hi - PATH_WALL_M))
    if not inside or _clearance(loop, obstacles).min() < PATH_OBSTACLE_M:
        return None
    return loop


def _merge_close(points: np.ndarray, radius: float) -> list[np.ndarray]:
    """Greedy clusters of points (N, 2) closer than radius (to a cluster's first point): their means."""
    clusters: list[list[np.ndarray]] = []
    for p in points:
        for c in clusters:
            if np.linalg.norm(p - c[0]) < radius:
                c.append(p)
                break
        else:
            clusters.append([p])
    return [np.mean(c, axis=0) for c in clusters]


def _detour(waypoints, obstacles, lo, hi, max_inserts: int = 24) -> np.ndarray | None:
    """Insert waypoints where the closed polygon's straight legs pass an obstacle closer than
    PATH_OBSTACLE_M + 0.15: around the cluster of obstacles there (footprints closer than a robot's
    width merged into one box), at the nearest free point just outside it within lo..hi.
    Returns (K', 2) or None when no detour point is free."""
    need = PATH_OBSTACLE_M + 0.15
    wp = [np.asarray(p, dtype=np.float64) for p in waypoints]
    t = np.linspace(0.0, 1.0, 60)[:, None]
    for _ in range(max_inserts + 1):
        for i in range(len(wp)):
            a, b = wp[i], wp[(i + 1) % len(wp)]
            leg = a + t * (b - a)
            clear = _clearance(leg, obstacles)
            if clear.min() < need:
                break
        else:
            return np.array(wp)
        p = leg[int(np.argmin(clear))]
        blob = obstacles[int(np.argmin(_distances(p[None], obstacles)[0]))]
        while True:  # grow the blob by every footprint a robot could not pass between
            members = obstacles[_box_gaps(blob, obstacles) < 2 * need]
            grown = np.r_[members[:, :2].min(0), members[:, 2:].max(0)]
            if np.allclose(grown, blob):
                break
            blob = grown
        box = np.r_[blob[:2] - need - 0.1, blob[2:] + need + 0.1]
        x, y = np.clip(p, box[:2], box[2:])
        candidates = [np.array([box[0], y]), np.array([box[2], y]), np.array([x, box[1]]),
                      np.array([x, box[3]]), box[[0, 1]], box[[2, 1]], box[[0, 3]], box[[2, 3]]]
        free = [c for c in candidates
                if np.all((c >= lo) & (c <= hi)) and _clearance(c[None], obstacles)[0] >= need]
        if not free:
            return None
        wp.insert(i + 1, min(free, key=lambda c: np.linalg.norm(c - p)))
    return None


def _box_gaps(box: np.ndarray, footprints: np.ndarray) -> np.ndarray:
    """(K,) distance between box (4,) and each footprint (K, 4); 0 when they overlap."""
    d = np.maximum(footprints[:, :2] - box[2:], box[:2] - footprints[:, 2:])
    return np.linalg.norm(np.maximum(d, 0.0), axis=1)


def _catmull_rom_closed(points: np.ndarray, n: int) -> np.ndarray:
    """Centripetal Catmull-Rom through the closed polygon points (K, 2): (K * n + 1, 2), first = last."""
    k = len(points)
    out = []
    for i in range(k):
        p0, p1, p2, p3 = (points[(i + j) % k] for j in (-1, 0, 1, 2))
        t0 = 0.0
        t1 = t0 + np.linalg.norm(p1 - p0) ** 0.5 + 1e-9
        t2 = t1 + np.linalg.norm(p2 - p1) ** 0.5 + 1e-9
        t3 = t2 + np.linalg.norm(p3 - p2) ** 0.5 + 1e-9
        t = np.linspace(t1, t2, n, endpoint=False)[:, None]
        a1 = (t1 - t) / (t1 - t0) * p0 + (t - t0) / (t1 - t0) * p1
        a2 = (t2 - t) / (t2 - t1) * p1 + (t - t1) / (t2 - t1) * p2
        a3 = (t3 - t) / (t3 - t2) * p2 + (t - t2) / (t3 - t2) * p3
        b1 = (t2 - t) / (t2 - t0) * a1 + (t - t0) / (t2 - t0) * a2
        b2 = (t3 - t) / (t3 - t1) * a2 + (t - t1) / (t3 - t1) * a3
        out.append((t2 - t) / (t2 - t1) * b1 + (t - t1) / (t2 - t1) * b2)
    out.append(points[:1])
    return np.concatenate(out)


def _wrap(angle):
    """Angle(s) wrapped into [-pi, pi)."""
    return np.mod(np.asarray(angle) + np.pi, 2 * np.pi) - np.pi


def _rz(yaw) -> np.ndarray:
    c, s = np.cos(yaw), np.sin(yaw)
    return np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])


def _record(rng, path, intr, rig, config):
    """Stamps and TF series of one loop along the closed ``path`` at constant speed: (Recording,
    duration s). The duration is length / speed clipped to 20-40 s, or ``config.duration_s``."""
    seg = np.linalg.norm(np.diff(path, axis=0), axis=1)
    arc = np.r_[0.0, np.cumsum(seg)]
    length = arc[-1]
    tangent = np.diff(path, axis=0)
    # Heading: the segment directions, unwrapped, extended by one segment at both ends across the closure.
    yaw_seg = np.unwrap(np.arctan2(tangent[:, 1], tangent[:, 0]))
    closing = yaw_seg[-1] + _wrap(yaw_seg[0] - yaw_seg[-1]) - yaw_seg[0]  # +-2 pi for a simple loop
    arc_mid = (arc[:-1] + arc[1:]) / 2
    arc_ext = np.r_[arc_mid[-1] - length, arc_mid, arc_mid[0] + length]
    yaw_ext = np.r_[yaw_seg[-1] - closing, yaw_seg, yaw_seg[0] + closing]
    turn = np.sign(closing)  # +1: counter-clockwise loop, the inside is to the left
    if config.duration_s is not None:
        duration = float(config.duration_s)
    else:
        duration = float(np.clip(length / rig["speed"], 20.0, 40.0))
    speed = length / duration

    t0 = round(config.start_time_s * 1e9)
    n_img = int(duration * rig["image_rate"])
    img_stamps = (t0 + np.round(np.arange(n_img) * 1e9 / rig["image_rate"]).astype(np.int64)
                  + rng.integers(-3_000_000, 3_000_000, n_img))
    odom_dt = round(1e9 / rig["odom_rate"])
    tf_start = int(img_stamps[0]) - 200_000_000 + 3_700_000
    n_odom = int((int(img_stamps[-1]) + 200_000_000 - tf_start) // odom_dt) + 1
    odom_stamps = tf_start + np.arange(n_odom, dtype=np.int64) * odom_dt

    def base_pose(stamps):
        t = (stamps - t0) / 1e9
        s = np.mod(speed * t, length)
        xy = np.stack([np.interp(s, arc, path[:, 0]), np.interp(s, arc, path[:, 1])], axis=1)
        yaw = np.interp(s, arc_ext, yaw_ext)
        frac = np.clip(t / duration, 0.0, 1.0)
        T_map_base = np.stack([make_transform(_rz(a), [x, y, 0.0])
                               for (x, y), a in zip(xy, yaw, strict=True)])
        T_map_odom = np.stack([make_transform(_rz(rig["drift_yaw"] * f), [*(rig["drift_xy"] * f), 0.0])
                               for f in frac])
        return T_map_base, T_map_odom

    T_map_base, T_map_odom = base_pose(odom_stamps)
    T_odom_base = np.stack([invert_transform(a) @ b for a, b in zip(T_map_odom, T_map_base, strict=True)])
    pan_stamps = odom_stamps + 5_000_000
    t_pan = (pan_stamps - t0) / 1e9
    sweep = np.sin(2 * np.pi * t_pan / rig["pan_period"] + rig["pan_phase"])
    pan = np.radians(turn * rig["pan_bias"] + rig["pan_amp"] * sweep)
    mount = [rig["forward"], 0.0, rig["height"] - 0.05]
    T_base_pan = np.stack([make_transform(_rz(a), mount) for a in pan])
    tilt = np.radians(rig["tilt"])
    # Positive rotation about y tips the x axis down (REP-103).
    c, s = np.cos(tilt), np.sin(tilt)
    R_tilt = np.array([[c, 0.0, s], [0.0, 1.0, 0.0], [-s, 0.0, c]])
    T_pan_link = make_transform(R_tilt, [0.03, 0.0, 0.05])
    T_link_optical = make_transform(R_LINK_OPTICAL, np.zeros(3))
    map_every = max(1, round(rig["odom_rate"] / rig["map_rate"]))
    map_idx = list(range(0, n_odom, map_every))
    if map_idx[-1] != n_odom - 1:
        map_idx.append(n_odom - 1)  # localisation must cover the last image too
    start = np.array([tf_start], dtype=np.int64)
    tf = (
        TfSeries(PAN_FRAME, LINK_FRAME, start, T_pan_link[None], static=True),
        TfSeries(LINK_FRAME, OPTICAL_FRAME, start, T_link_optical[None], static=True),
        TfSeries("odom", BASE_FRAME, odom_stamps, T_odom_base, log_delay_ns=1_000_000),
        TfSeries(BASE_FRAME, PAN_FRAME, pan_stamps, T_base_pan, log_delay_ns=1_500_000),
        TfSeries("map", "odom", odom_stamps[map_idx] + 1_300_000, T_map_odom[map_idx],
                 log_delay_ns=2_000_000),
    )
    return Recording(img_stamps, intr, tf, "map", OPTICAL_FRAME), duration


def _views(room, poses: np.ndarray, intr: CameraIntrinsics, config: DriveConfig) -> tuple[dict, dict]:
    """Per object name: frames in which it covers at least ``min_pixels`` (checked at 1 / check_stride
    resolution), and the angle (degrees) spanned by the directions it is seen from in those frames."""
    s = config.check_stride
    small = CameraIntrinsics(intr.width // s, intr.height // s, intr.fx / s, intr.fy / s,
                             (intr.cx + 0.5) / s - 0.5, (intr.cy + 0.5) / s - 0.5)
    seen = np.zeros((len(poses), len(room.objects)), dtype=bool)
    for i, T in enumerate(poses):
        labels = room.render_labels(T, small)
        seen[i] = np.bincount(labels[labels >= 0], minlength=len(room.objects)) * s * s >= config.min_pixels
    views, spans = {}, {}
    for k, o in enumerate(room.objects):
        offsets = poses[seen[:, k], :2, 3] - o.center[:2]
        views[o.name] = int(seen[:, k].sum())
        spans[o.name] = round(_angular_span_deg(np.arctan2(offsets[:, 1], offsets[:, 0])), 1)
    return views, spans


def _angular_span_deg(angles: np.ndarray) -> float:
    """Smallest arc (degrees) holding every angle (radians); 0 for fewer than two."""
    if len(angles) < 2:
        return 0.0
    a = np.sort(np.mod(angles, 2 * np.pi))
    return float(np.degrees(2 * np.pi - np.diff(np.r_[a, a[0] + 2 * np.pi]).max()))
