"""Deterministic synthetic room: named primitives with ground-truth boxes, an exact ray caster,
camera trajectories and the robot / TF decomposition of those trajectories.

World frame REP-103 (x forward, y left, z up), metres, floor at z = 0; the room spans
x, y in [-2, 2] and z in [0, 2.5]. Cameras use the ROS optical convention (z forward, x right,
y down) and CameraInfo pixel centres (pixel (u, v) is centred at u, v). Everything is numpy
float64 and a pure function of the seed, so tests, the ROS players, the bag tools and the
benchmarks all see the same pixels.

Colours are deliberately gentle: walls and floor are low-saturation greys with +-10 % smooth
texture (enough parallax cues, easy for a small NeRF), objects are flat saturated colours with
Lambert shading that keeps them within 50-100 % of their base colour, so a colour-name encoder
can recognise them from any side.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..core.frames.camera import CameraIntrinsics
from ..core.frames.frame import Frame
from ..core.frames.transforms import invert_transform, make_transform, validate_rigid

#: Room extent: x, y in [-half, half], z in [0, height], metres.
ROOM_HALF_M = 2.0
ROOM_HEIGHT_M = 2.5
#: Unit vector towards the light (up and slightly forward-left); fixed so shading is deterministic.
LIGHT_DIR = np.array([0.3, 0.5, 1.0]) / np.linalg.norm([0.3, 0.5, 1.0])
#: Shade = AMBIENT + (1 - AMBIENT) * max(0, n.l): brightness stays within [50 %, 100 %] of the base colour.
AMBIENT = 0.5
#: Amplitude of the wall / floor texture (relative brightness).
TEXTURE_AMPLITUDE = 0.10
_EPS = 1e-9

# name, shape, colour name, base RGB, size (x, y, z) metres.
_OBJECT_SPECS = (
    ("red box", "box", "red", (200, 30, 30), (0.40, 0.40, 0.40)),
    ("green sphere", "sphere", "green", (30, 160, 40), (0.40, 0.40, 0.40)),
    ("blue cylinder", "cylinder", "blue", (30, 60, 200), (0.30, 0.30, 0.50)),
    ("yellow box", "box", "yellow", (220, 200, 30), (0.45, 0.30, 0.30)),
    ("cyan sphere", "sphere", "cyan", (30, 190, 200), (0.30, 0.30, 0.30)),
    ("magenta cylinder", "cylinder", "magenta", (190, 40, 170), (0.40, 0.40, 0.35)),
)
# Room faces in the order x-, x+, y-, y+, floor, ceiling: base RGB (off-white walls, grey floor).
_FACE_RGB = np.array(
    [[205, 200, 192], [196, 198, 202], [200, 202, 196], [204, 198, 196], [118, 114, 110], [218, 218, 214]],
    dtype=np.float64,
)


@dataclass(frozen=True, eq=False)
class SceneObject:
    """A primitive resting on the floor.

    center, size: (3,) float64 world frame, metres; size is the full extent (x, y, z) and, for
    spheres and cylinders, 2 * radius in x and y. box_min, box_max: (3,) axis-aligned ground truth.
    """

    name: str
    shape: str  # "box" | "sphere" | "cylinder" (vertical axis, capped)
    colour_name: str
    rgb: tuple[int, int, int]
    center: np.ndarray
    size: np.ndarray
    box_min: np.ndarray
    box_max: np.ndarray

    @property
    def radius_m(self) -> float:
        return float(self.size[0]) / 2.0


def _make_object(spec, xy) -> SceneObject:
    name, shape, colour, rgb, size = spec
    size = np.asarray(size, dtype=np.float64)
    center = np.array([xy[0], xy[1], size[2] / 2.0])
    return SceneObject(name, shape, colour, rgb, center, size, center - size / 2.0, center + size / 2.0)


def _layout(seed: int) -> list[np.ndarray]:
    """Object centres (x, y) on a ring around the room centre; seed 0 is the canonical layout."""
    if seed == 0:
        angles = np.radians(30.0 + 60.0 * np.arange(6))
        radii = np.array([0.75, 1.0, 0.75, 1.0, 0.75, 1.0])
        return list(np.stack([radii * np.cos(angles), radii * np.sin(angles)], axis=1))
    rng = np.random.default_rng([seed, 1])
    half_diag = np.array([np.hypot(s[4][0], s[4][1]) / 2.0 for s in _OBJECT_SPECS])
    for _ in range(1000):
        angles = rng.uniform(0, 2 * np.pi) + np.radians(60.0 * rng.permutation(6) + rng.uniform(-12, 12, 6))
        radii = rng.uniform(0.6, 1.05, 6)
        xy = np.stack([radii * np.cos(angles), radii * np.sin(angles)], axis=1)
        gaps = np.linalg.norm(xy[:, None] - xy[None], axis=2) - (half_diag[:, None] + half_diag[None])
        np.fill_diagonal(gaps, np.inf)
        if gaps.min() > 0.10:  # footprints 10 cm apart: no overlap, no touching
            return list(xy)
    raise RuntimeError(f"no non-overlapping layout found for seed {seed}")  # pragma: no cover


class SyntheticRoom:
    """A 4 m x 4 m x 2.5 m room with six named primitives; ``render`` is an exact ray caster.

    seed: varies wall / floor texture phases and (for seed != 0) object placement.
    """

    absent_names = ("orange cone", "purple torus")

    def __init__(self, seed: int = 0):
        self.seed = int(seed)
        self.objects: tuple[SceneObject, ...] = tuple(
            _make_object(spec, xy) for spec, xy in zip(_OBJECT_SPECS, _layout(self.seed), strict=True)
        )
        rng = np.random.default_rng([self.seed, 2])
        # Per face: 3 sinusoids with frequencies 0.6-2.2 cycles/m along each texture axis, random phases.
        self._tex_freq = rng.uniform(0.6, 2.2, (6, 3, 2)) * rng.choice([-1.0, 1.0], (6, 3, 2))
        self._tex_phase = rng.uniform(0.0, 2 * np.pi, (6, 3))

    @property
    def bounds(self) -> np.ndarray:
        """(2, 3) float64: room min and max corners, world frame, metres."""
        return np.array([[-ROOM_HALF_M, -ROOM_HALF_M, 0.0], [ROOM_HALF_M, ROOM_HALF_M, ROOM_HEIGHT_M]])

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(o.name for o in self.objects)

    def object(self, name: str) -> SceneObject:
        for o in self.objects:
            if o.name == name:
                return o
        raise ValueError(f"no object named {name!r}; objects: {list(self.names)}")

    # ------------------------------------------------------------------ ray casting
    def trace(self, T_world_cam, intr: CameraIntrinsics):
        """Cast one ray per pixel centre (``trace_scene`` over this room's box and objects).

        Returns depth_m (H, W) float64 along the optical axis, surface (H, W) int (0-5 room faces
        x-, x+, y-, y+, floor, ceiling; 6 + k object k), points (H, W, 3) world, normals (H, W, 3).
        depth is 0 where the camera is outside the room and nothing is hit.
        """
        return trace_scene(self.bounds, self.objects, T_world_cam, intr)

    def render(self, T_world_cam, intr: CameraIntrinsics) -> tuple[np.ndarray, np.ndarray]:
        """(4, 4) camera pose (optical) + intrinsics -> rgb (H, W, 3) uint8, depth_m (H, W) float32."""
        depth, surface, points, normals = self.trace(T_world_cam, intr)
        base = np.zeros(points.shape, dtype=np.float64)
        room = surface < 6
        base[room] = _FACE_RGB[surface[room]] * self._texture(surface[room], points[room])[:, None]
        for k, obj in enumerate(self.objects):
            base[surface == 6 + k] = obj.rgb
        shade = AMBIENT + (1.0 - AMBIENT) * np.clip(normals @ LIGHT_DIR, 0.0, None)
        rgb = np.clip(np.rint(base * shade[..., None]), 0, 255).astype(np.uint8)
        rgb[depth <= 0] = 0
        return rgb, depth.astype(np.float32)

    def render_labels(self, T_world_cam, intr: CameraIntrinsics) -> np.ndarray:
        """(H, W) int64: index into ``objects`` of the visible object, -1 for walls, floor, ceiling."""
        surface = self.trace(T_world_cam, intr)[1]
        return np.where(surface >= 6, surface - 6, -1)

    def _texture(self, face: np.ndarray, p: np.ndarray) -> np.ndarray:
        """Brightness factor 1 +- TEXTURE_AMPLITUDE, smooth in the face's two in-plane axes (N,)."""
        # In-plane coordinates: x walls use (y, z), y walls (x, z), floor / ceiling (x, y).
        ab_index = np.array([[1, 2], [1, 2], [0, 2], [0, 2], [0, 1], [0, 1]])[face]
        ab = np.take_along_axis(p, ab_index, axis=1)
        f, ph = self._tex_freq[face], self._tex_phase[face]
        waves = np.sin(2 * np.pi * np.einsum("nkc,nc->nk", f, ab) + ph)
        return 1.0 + TEXTURE_AMPLITUDE * waves.mean(axis=1)


def trace_scene(bounds, primitives, T_world_cam, intr: CameraIntrinsics):
    """Cast one ray per pixel centre into an axis-aligned room ``bounds`` (2, 3) holding ``primitives``
    (objects with shape, center, radius_m, box_min, box_max; see ``_intersect``).

    Returns depth_m (H, W) float64 along the optical axis, surface (H, W) int (0-5 room faces
    x-, x+, y-, y+, floor, ceiling; 6 + k primitive k), points (H, W, 3) world, normals (H, W, 3).
    depth is 0 where the camera is outside the room and nothing is hit.
    """
    T = validate_rigid(T_world_cam, "T_world_cam")
    intr.validate()
    h, w = int(intr.height), int(intr.width)
    v, u = np.mgrid[0:h, 0:w].astype(np.float64)
    # Unnormalised directions with z_cam = 1: the ray parameter t is the optical-axis depth.
    d_cam = np.stack([(u - intr.cx) / intr.fx, (v - intr.cy) / intr.fy, np.ones_like(u)], -1).reshape(
        -1, 3
    )
    d = d_cam @ T[:3, :3].T
    o = T[:3, 3]
    d_safe = np.where(np.abs(d) < 1e-12, 1e-12, d)
    inv_d = 1.0 / d_safe
    lo, hi = np.asarray(bounds, dtype=np.float64)
    with np.errstate(invalid="ignore", over="ignore"):
        t_axis = np.where(d_safe > 0, (hi - o) * inv_d, (lo - o) * inv_d)  # room exit per axis
        axis = np.argmin(t_axis, axis=1)
        t_best = t_axis[np.arange(len(d)), axis]
        surface = 2 * axis + (d_safe[np.arange(len(d)), axis] > 0)
        normal = np.zeros_like(d)
        normal[np.arange(len(d)), axis] = np.where(d_safe[np.arange(len(d)), axis] > 0, -1.0, 1.0)
        for k, obj in enumerate(primitives):
            t_k, n_k = _intersect(obj, o, d, inv_d)
            closer = t_k < t_best
            t_best = np.where(closer, t_k, t_best)
            surface = np.where(closer, 6 + k, surface)
            normal[closer] = n_k[closer]
    valid = np.isfinite(t_best) & (t_best > _EPS)
    t_best = np.where(valid, t_best, 0.0)
    points = o + t_best[:, None] * d
    return (t_best.reshape(h, w), surface.reshape(h, w), points.reshape(h, w, 3), normal.reshape(h, w, 3))


def _intersect(obj: SceneObject, o: np.ndarray, d: np.ndarray, inv_d: np.ndarray):
    """Nearest hit t (N,) (inf where missed) and outward normal (N, 3) of rays o + t d with obj."""
    n = np.zeros_like(d)
    if obj.shape == "box":
        t1, t2 = (obj.box_min - o) * inv_d, (obj.box_max - o) * inv_d
        t_min, t_max = np.minimum(t1, t2), np.maximum(t1, t2)
        axis = np.argmax(t_min, axis=1)
        t_near, t_far = t_min.max(axis=1), t_max.min(axis=1)
        hit = (t_near <= t_far) & (t_near > _EPS)
        rows = np.arange(len(d))
        n[rows, axis] = -np.sign(d[rows, axis])
        return np.where(hit, t_near, np.inf), n
    c, r = obj.center, obj.radius_m
    if obj.shape == "sphere":
        oc = o - c
        a, b, cc = np.einsum("ij,ij->i", d, d), d @ oc, oc @ oc - r * r
        disc = b * b - a * cc
        t = (-b - np.sqrt(np.maximum(disc, 0.0))) / a
        hit = (disc >= 0) & (t > _EPS)
        return np.where(hit, t, np.inf), (o + t[:, None] * d - c) / r
    if obj.shape == "cylinder":
        oc = o[:2] - c[:2]
        a = d[:, 0] ** 2 + d[:, 1] ** 2
        b, cc = d[:, :2] @ oc, oc @ oc - r * r
        disc = b * b - a * cc
        t_side = (-b - np.sqrt(np.maximum(disc, 0.0))) / np.maximum(a, 1e-300)
        z_side = o[2] + t_side * d[:, 2]
        side = (disc >= 0) & (a > 1e-12) & (t_side > _EPS)
        side &= (z_side >= obj.box_min[2]) & (z_side <= obj.box_max[2])
        t_side = np.where(side, t_side, np.inf)
        t_cap, cap_nz = np.full(len(d), np.inf), np.zeros(len(d))
        for z_cap, nz in ((obj.box_min[2], -1.0), (obj.box_max[2], 1.0)):
            t = (z_cap - o[2]) * inv_d[:, 2]
            q = o[:2] + t[:, None] * d[:, :2] - c[:2]
            ok = (t > _EPS) & (np.einsum("ij,ij->i", q, q) <= r * r) & (t < t_cap)
            t_cap, cap_nz = np.where(ok, t, t_cap), np.where(ok, nz, cap_nz)
        use_side = t_side <= t_cap
        p = o + np.where(use_side, t_side, 0.0)[:, None] * d
        n[:, :2] = np.where(use_side[:, None], (p[:, :2] - c[:2]) / r, 0.0)
        n[:, 2] = np.where(use_side, 0.0, cap_nz)
        return np.minimum(t_side, t_cap), n
    raise ValueError(f"unknown shape {obj.shape!r}")


# ---------------------------------------------------------------------- cameras and trajectories
def default_intrinsics(width: int = 96, height: int = 72, hfov_deg: float = 75.0) -> CameraIntrinsics:
    """Square-pixel pinhole with the principal point at the image centre ((W - 1) / 2, (H - 1) / 2)."""
    if width <= 0 or height <= 0:
        raise ValueError(f"image size must be positive, got {width}x{height}")
    if not 1.0 <= hfov_deg <= 170.0:
        raise ValueError(f"hfov_deg must be in [1, 170], got {hfov_deg}")
    f = (width / 2.0) / np.tan(np.radians(hfov_deg) / 2.0)
    return CameraIntrinsics(
        int(width), int(height), float(f), float(f), (width - 1) / 2.0, (height - 1) / 2.0
    )


def look_at_pose(eye, target) -> np.ndarray:
    """(4, 4) T_world_cam (optical: z towards target, x right, y down) with the world z axis up."""
    eye, target = np.asarray(eye, dtype=np.float64), np.asarray(target, dtype=np.float64)
    z = target - eye
    if np.linalg.norm(z) < 1e-9 or np.linalg.norm(np.cross(z, [0.0, 0.0, 1.0])) < 1e-9 * np.linalg.norm(z):
        raise ValueError(
            f"look_at_pose needs a target away from eye and not straight up/down: {eye} -> {target}"
        )
    z /= np.linalg.norm(z)
    x = np.cross(z, [0.0, 0.0, 1.0])
    x /= np.linalg.norm(x)
    return make_transform(np.stack([x, np.cross(z, x), z], axis=1), eye)


def orbit_trajectory(
    room: SyntheticRoom,
    n: int,
    height_m: float = 1.2,
    radius_m: float = 1.5,
    look_at=(0.0, 0.0, 0.35),
    seed: int = 0,
) -> list[np.ndarray]:
    """A robot walking one loop around the room centre, looking inwards with a mild pitch down.

    Radius, height and gaze wander smoothly (+-8 cm, +-4 cm, +-15 cm) so views are not all
    co-planar; ``seed`` varies the start angle and the wander. Returns n (4, 4) T_world_cam.
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    hi = room.bounds[1]
    if radius_m <= 0 or radius_m + 0.1 > hi[0] or not 0.1 < height_m < hi[2] - 0.1:
        raise ValueError(f"orbit (radius {radius_m} m, height {height_m} m) does not fit inside the room")
    rng = np.random.default_rng([seed, 3])
    start, wphase = rng.uniform(0, 2 * np.pi), rng.uniform(0, 2 * np.pi, 4)
    target0 = np.asarray(look_at, dtype=np.float64)
    poses = []
    for i in range(n):
        a = start + 2 * np.pi * i / n
        r = radius_m + 0.08 * np.sin(3 * a + wphase[0])
        eye = np.array(
            [
                target0[0] + r * np.cos(a),
                target0[1] + r * np.sin(a),
                height_m + 0.04 * np.sin(2 * a + wphase[1]),
            ]
        )
        gaze = target0 + 0.15 * np.array([np.sin(2 * a + wphase[2]), np.cos(3 * a + wphase[3]), 0.0])
        poses.append(look_at_pose(eye, gaze))
    return poses


def heldout_poses(room: SyntheticRoom, n: int = 6, seed: int = 0) -> list[np.ndarray]:
    """n (4, 4) T_world_cam off the training loop (radius 1.25 m instead of 1.5, 1.0 m high instead
    of 1.2, other start angle and wander): novel views for PSNR, still looking at the objects."""
    return orbit_trajectory(room, n, height_m=1.0, radius_m=1.25, look_at=(0.0, 0.0, 0.3), seed=seed + 1000)


def make_frames(
    room: SyntheticRoom, poses, intr: CameraIntrinsics, t0_ns: int = 0, dt_ns: int = 100_000_000
) -> list[Frame]:
    """Render each pose into a Frame (image, intrinsics, pose, stamp t0 + i dt, depth)."""
    frames = []
    for i, T in enumerate(poses):
        rgb, depth = room.render(T, intr)
        frames.append(Frame(rgb, intr, np.array(T, dtype=np.float64), int(t0_ns + i * dt_ns), depth))
    return frames


# ---------------------------------------------------------------------- robot rig and TF chain
#: Rotation of camera_color_optical_frame in camera_link (REP-103 link -> optical axes).
R_LINK_OPTICAL = np.array([[0.0, 0.0, 1.0], [-1.0, 0.0, 0.0], [0.0, -1.0, 0.0]])


@dataclass(frozen=True, eq=False)
class CameraRig:
    """Static chain base_link -> camera_link -> camera_color_optical_frame, (4, 4) each."""

    T_base_link: np.ndarray  # camera_link in base_link
    T_link_optical: np.ndarray  # optical frame in camera_link
    base_frame: str = "base_link"
    link_frame: str = "camera_link"
    optical_frame: str = "camera_color_optical_frame"

    @property
    def T_base_optical(self) -> np.ndarray:
        return self.T_base_link @ self.T_link_optical


def camera_rig(height_m: float = 1.2, forward_m: float = 0.1, pitch_down_deg: float = 30.0) -> CameraRig:
    """Camera ``forward_m`` ahead of base_link at ``height_m``, pitched down; camera_link x forward."""
    p = np.radians(pitch_down_deg)
    # Positive rotation about y tips the x axis down (REP-103).
    R_pitch = np.array([[np.cos(p), 0.0, np.sin(p)], [0.0, 1.0, 0.0], [-np.sin(p), 0.0, np.cos(p)]])
    return CameraRig(
        make_transform(R_pitch, [forward_m, 0.0, height_m]), make_transform(R_LINK_OPTICAL, np.zeros(3))
    )


@dataclass(frozen=True, eq=False)
class RobotPath:
    """Per pose: T_map_odom (N, 4, 4) slow localisation drift, T_odom_base (N, 4, 4) the moving robot.

    T_map_odom[i] @ T_odom_base[i] @ rig.T_base_optical == camera pose i.
    """

    T_map_odom: np.ndarray
    T_odom_base: np.ndarray


def robot_path(poses, rig: CameraRig, drift_m: float = 0.05, drift_yaw_deg: float = 2.0) -> RobotPath:
    """Split camera poses into map->odom (drift growing linearly from 0 to drift_m / drift_yaw_deg
    over the path, like odometry error corrected by localisation) and odom->base_link."""
    poses = [validate_rigid(T, f"poses[{i}]") for i, T in enumerate(poses)]
    T_optical_base = invert_transform(rig.T_base_optical)
    n = len(poses)
    map_odom, odom_base = np.zeros((n, 4, 4)), np.zeros((n, 4, 4))
    for i, T in enumerate(poses):
        s = i / max(n - 1, 1)
        yaw = np.radians(drift_yaw_deg) * s
        R = np.array([[np.cos(yaw), -np.sin(yaw), 0.0], [np.sin(yaw), np.cos(yaw), 0.0], [0.0, 0.0, 1.0]])
        map_odom[i] = make_transform(R, [drift_m * s, -0.5 * drift_m * s, 0.0])
        odom_base[i] = invert_transform(map_odom[i]) @ T @ T_optical_base
    return RobotPath(map_odom, odom_base)
