"""Randomised rooms from a seed: the benchmark's rooms, deliberately unlike the demo room.

``random_room(seed)`` draws a rectangular room 3-8 m across (x and y independently), 2.4-3 m high,
with textured low-saturation walls and floor (wood, tiles or concrete), an achromatic table, and
5-10 target objects of several shapes: boxes, spheres, cylinders, flat 3 cm "mats" and "discs",
at least one small object (radius 4-6 cm) on the table, one against a wall that a taller object
partly hides, objects on the open floor. Object colours are saturated hues at the demo colour
encoder's prototypes (``CHROMATIC``) or black; the colour word is part of the name. Every room has a
look-alike pair (hue neighbours on the ``CHROMATIC`` circle), may repeat a colour concept once with
another shape, and names at least two absent objects: a hue neighbour of a present colour and an
unrelated colour.

Lighting is white: ambient plus Lambert shading from one or two point lights under the ceiling with
distance falloff, so brightness varies across the room while every surface stays within
[ambient, 100 %] of its base colour (ambient >= 0.45) and hues do not change.

The layout is re-drawn until a robot can drive a loop past every object (``drive.plan_loop`` with the
draws ``drive_through`` makes first). Everything is a pure function of the seed
(``numpy.random.default_rng([seed, k])``); rendering
reuses the demo room's exact ray caster (``scene.trace_scene``). Colour names and hue neighbours:
``lerf_ros.sim.palette`` (re-exported here).
"""

from __future__ import annotations

import colorsys
from dataclasses import dataclass, field, replace

import numpy as np

from ..core.frames.camera import CameraIntrinsics
from .drive import DriveConfig, plan_loop
from .palette import BLACK, HUES, adjacent_colours, colour_word, hue_rgb
from .scene import SceneObject, trace_scene

#: Height of flat objects (mats, discs), metres.
FLAT_HEIGHT_M = 0.03
#: Absent objects' nouns (not a shape any room draws, so no absent name can match a present object).
_ABSENT_NOUNS = ("cone", "torus", "mug", "bottle", "pyramid")
#: Flat objects are named by what they look like.
_FLAT_NOUN = {"box": "mat", "cylinder": "disc"}
# Roles every room has (in this order), then extra roles for rooms with more than five objects.
_BASE_ROLES = ("small", "flat", "hidden", "front", "floor")
_EXTRA_ROLES = ("floor", "wall", "table", "flat", "floor")
_FLOOR_TYPES = ("wood", "tiles", "concrete")
__all__ = ["BLACK", "FLAT_HEIGHT_M", "HUES", "Light", "Room", "RoomObject", "adjacent_colours", "colour_word",
           "hue_rgb", "random_room"]


@dataclass(frozen=True, eq=False)
class RoomObject(SceneObject):
    """A target object: ``SceneObject`` (shape is the primitive: box, sphere, cylinder) plus where it is.

    placement: "floor", "table" (on the table top), "wall" (within 3 cm of a wall).
    hidden_behind: name of the taller object between it and the room centre ("" = none).
    instance: 1, or 2 for the second object of a repeated colour concept (always another shape).
    """

    placement: str = "floor"
    hidden_behind: str = ""
    instance: int = 1

    @property
    def footprint(self) -> np.ndarray:
        """(4,) xmin, ymin, xmax, ymax world frame, metres."""
        return np.r_[self.box_min[:2], self.box_max[:2]]


@dataclass(frozen=True)
class Light:
    """White point light: position (3,) world frame, metres; intensity (unitless, ~1 = full at 0 m)."""

    position: np.ndarray
    intensity: float


@dataclass(frozen=True, eq=False)
class Room:
    """A randomised room (``random_room``); same rendering / label / ground-truth interface as
    ``SyntheticRoom``. ``furniture`` (the table) is rendered but is no query target: its pixels are
    labelled -1 like walls, floor and ceiling."""

    seed: int
    box: np.ndarray  # (2, 3) room min and max corners, world frame, metres
    objects: tuple[RoomObject, ...]
    furniture: tuple[SceneObject, ...]
    absent_names: tuple[str, ...]
    lights: tuple[Light, ...]
    ambient: float
    face_rgb: np.ndarray  # (6, 3) base RGB of faces x-, x+, y-, y+, floor, ceiling
    floor_type: str
    texture: dict = field(repr=False)

    @property
    def bounds(self) -> np.ndarray:
        """(2, 3) float64: room min and max corners, world frame, metres."""
        return self.box.copy()

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(o.name for o in self.objects)

    def object(self, name: str) -> RoomObject:
        for o in self.objects:
            if o.name == name:
                return o
        raise ValueError(f"no object named {name!r}; objects: {list(self.names)}")

    @property
    def table_box(self) -> np.ndarray:
        """(2, 3) ground-truth box of the whole table (top and legs)."""
        return np.stack([np.min([f.box_min for f in self.furniture], axis=0),
                         np.max([f.box_max for f in self.furniture], axis=0)])

    @property
    def lookalike_pairs(self) -> tuple[tuple[str, str], ...]:
        """Pairs of present objects whose colours are hue neighbours."""
        return tuple((a.name, b.name) for i, a in enumerate(self.objects) for b in self.objects[i + 1:]
                     if b.colour_name in adjacent_colours(a.colour_name))

    @property
    def repeated_colours(self) -> tuple[str, ...]:
        """Colour concepts with two instances (of different shapes): the several-instances case."""
        return tuple(sorted({o.colour_name for o in self.objects if o.instance == 2}))

    @property
    def floor_footprints(self) -> np.ndarray:
        """(M, 4) xmin, ymin, xmax, ymax of everything standing on the floor (objects and the table)."""
        rows = [o.footprint for o in self.objects if o.placement != "table"]
        table = self.table_box
        rows.append(np.r_[table[0, :2], table[1, :2]])
        return np.array(rows)

    def without(self, name: str) -> Room:
        """This room with object ``name`` removed (to measure what it hides)."""
        self.object(name)
        return replace(self, objects=tuple(o for o in self.objects if o.name != name))

    # ------------------------------------------------------------------ rendering
    @property
    def _primitives(self) -> tuple[SceneObject, ...]:
        return self.objects + self.furniture

    def trace(self, T_world_cam, intr: CameraIntrinsics):
        """``trace_scene`` over the room: surface 6 + k is object k, then the furniture."""
        return trace_scene(self.box, self._primitives, T_world_cam, intr)

    def render(self, T_world_cam, intr: CameraIntrinsics) -> tuple[np.ndarray, np.ndarray]:
        """(4, 4) camera pose (optical) + intrinsics -> rgb (H, W, 3) uint8, depth_m (H, W) float32."""
        depth, surface, points, normals = self.trace(T_world_cam, intr)
        table = np.concatenate([self.face_rgb, [p.rgb for p in self._primitives]]).astype(np.float64)
        base = table[surface]
        room = surface < 6
        base[room] *= self._texture(surface[room], points[room])[:, None]
        rgb = np.clip(np.rint(base * self.shade(points, normals)[..., None]), 0, 255).astype(np.uint8)
        rgb[depth <= 0] = 0
        return rgb, depth.astype(np.float32)

    def render_labels(self, T_world_cam, intr: CameraIntrinsics) -> np.ndarray:
        """(H, W) int64: index into ``objects`` of the visible object, -1 for room faces and furniture."""
        surface = self.trace(T_world_cam, intr)[1] - 6
        return np.where((surface >= 0) & (surface < len(self.objects)), surface, -1)

    def shade(self, points: np.ndarray, normals: np.ndarray) -> np.ndarray:
        """(..., 3) surface points and unit normals -> (...,) white-light factor in [ambient, 1]:
        ambient + (1 - ambient) * min(1, sum over lights of I * max(0, n.l) / (1 + (d / FALLOFF)^2))."""
        diffuse = np.zeros(points.shape[:-1])
        falloff = self.texture["falloff_m"]
        for light in self.lights:
            to_light = light.position - points
            dist = np.maximum(np.linalg.norm(to_light, axis=-1), 1e-6)
            lambert = np.clip(np.einsum("...c,...c->...", normals, to_light) / dist, 0.0, None)
            diffuse += light.intensity * lambert / (1.0 + (dist / falloff) ** 2)
        return self.ambient + (1.0 - self.ambient) * np.minimum(diffuse, 1.0)

    def _texture(self, face: np.ndarray, p: np.ndarray) -> np.ndarray:
        """Brightness factor (N,) of room faces at points p (N, 3): smooth waves on walls and ceiling,
        planks / tiles / mottling on the floor. Brightness only, so saturation stays low."""
        tex = self.texture
        ab_index = np.array([[1, 2], [1, 2], [0, 2], [0, 2], [0, 1], [0, 1]])[face]
        ab = np.take_along_axis(p, ab_index, axis=1)
        waves = np.sin(2 * np.pi * np.einsum("nkc,nc->nk", tex["freq"][face], ab) + tex["phase"][face])
        out = 1.0 + tex["amplitude"][face] * waves.mean(axis=1)
        floor = face == 4
        if self.floor_type == "wood" and floor.any():
            along, across = ab[floor, tex["plank_axis"]], ab[floor, 1 - tex["plank_axis"]]
            plank = np.floor(across / tex["plank_w"])
            out[floor] = (1.0 + 0.08 * _hash(plank, tex["hash_phase"])
                          + 0.03 * np.sin(2 * np.pi * along / tex["grain_m"] + 7.0 * plank))
            u = across / tex["plank_w"]
            seam = np.abs(u - np.round(u)) * tex["plank_w"] < 0.006
            out[floor] *= np.where(seam, 0.85, 1.0)
        elif self.floor_type == "tiles" and floor.any():
            cell = np.floor(ab[floor] / tex["tile_m"])
            out[floor] = 1.0 + 0.05 * _hash(cell[:, 0] * 131.0 + cell[:, 1], tex["hash_phase"])
            frac = np.abs(ab[floor] / tex["tile_m"] - np.round(ab[floor] / tex["tile_m"])) * tex["tile_m"]
            out[floor] *= np.where(frac.min(axis=1) < 0.005, 0.85, 1.0)
        return out


def _hash(x: np.ndarray, phase: float) -> np.ndarray:
    """Deterministic pseudo-random value in [-1, 1) per (integer-valued) x."""
    v = np.sin(x * 12.9898 + phase) * 43758.5453
    return 2.0 * (v - np.floor(v)) - 1.0


# ---------------------------------------------------------------------- the generator
def random_room(seed: int) -> Room:
    """A randomised room, a pure function of ``seed`` (module docstring). Raises RuntimeError in the
    (untested-for) case that no layout fits after many deterministic re-draws."""
    seed = int(seed)
    rng = np.random.default_rng([seed, 1])
    size_xy, height = rng.uniform(3.0, 8.0, 2), rng.uniform(2.4, 3.0)
    centre = rng.uniform(-1.0, 1.0, 2)
    box = np.array([[*(centre - size_xy / 2), 0.0], [*(centre + size_xy / 2), height]])
    face_rgb, floor_type, texture = _materials(np.random.default_rng([seed, 2]))
    lights, ambient, texture["falloff_m"] = _lights(np.random.default_rng([seed, 3]), box)
    colours, absent = _colours(np.random.default_rng([seed, 4]))
    for attempt in range(200):
        layout = _layout(np.random.default_rng([seed, 5, attempt]), box, colours)
        if layout is None:
            continue
        room = Room(seed, box, *layout, absent, lights, ambient, face_rgb, floor_type, texture)
        # The robot must be able to drive a loop through it (the same draws ``drive_through`` makes first).
        targets = [o.center[:2] for o in room.objects]
        rngs = (np.random.default_rng([seed, 11, k]) for k in range(DriveConfig.max_attempts))
        if any(plan_loop(rng, box, room.floor_footprints, targets) is not None for rng in rngs):
            return room
    raise RuntimeError(f"no object layout fits room seed {seed} ({size_xy.round(2)} m)")  # pragma: no cover


def _materials(rng) -> tuple[np.ndarray, str, dict]:
    """Face colours (walls off-white, floor wood / tiles / concrete, ceiling white) and texture params.

    Saturations stay <= 0.15 (< 0.18: the demo colour encoder calls anything under 0.2 achromatic);
    the floor's value >= 0.5, so even at ambient light in a plank seam it is grey, never black."""
    def hsv(h, s, v):
        return np.array(colorsys.hsv_to_rgb(h, s, v)) * 255.0

    wall_h, wall_s, wall_v = rng.uniform(0, 1), rng.uniform(0.0, 0.08), rng.uniform(0.72, 0.85)
    walls = [hsv(wall_h, wall_s, wall_v * rng.uniform(0.96, 1.04)) for _ in range(4)]
    floor_type = _FLOOR_TYPES[rng.integers(len(_FLOOR_TYPES))]
    if floor_type == "wood":
        floor = hsv(rng.uniform(0.06, 0.11), rng.uniform(0.08, 0.15), rng.uniform(0.5, 0.68))
    else:
        floor = hsv(rng.uniform(0, 1), rng.uniform(0.0, 0.06), rng.uniform(0.5, 0.7))
    ceiling = hsv(wall_h, wall_s / 3, rng.uniform(0.85, 0.92))
    texture = {
        "freq": rng.uniform(0.6, 2.2, (6, 3, 2)) * rng.choice([-1.0, 1.0], (6, 3, 2)),
        "phase": rng.uniform(0.0, 2 * np.pi, (6, 3)),
        "amplitude": np.array([0.10, 0.10, 0.10, 0.10, 0.08, 0.05]),
        "plank_axis": int(rng.integers(2)),
        "plank_w": rng.uniform(0.12, 0.22),
        "grain_m": rng.uniform(0.3, 0.8),
        "tile_m": rng.uniform(0.3, 0.6),
        "hash_phase": rng.uniform(0, 100),
    }
    return np.array([*walls, floor, ceiling]), floor_type, texture


def _lights(rng, box) -> tuple[tuple[Light, ...], float, float]:
    """One or two white point lights 5-15 cm under the ceiling, ambient 0.45-0.55, falloff 2.5-4 m."""
    lights = []
    for _ in range(int(rng.integers(1, 3))):
        xy = rng.uniform(box[0, :2] + 0.5, box[1, :2] - 0.5)
        lights.append(Light(np.r_[xy, box[1, 2] - rng.uniform(0.05, 0.15)], float(rng.uniform(1.2, 1.8))))
    return tuple(lights), float(rng.uniform(0.45, 0.55)), float(rng.uniform(2.5, 4.0))


def _colours(rng) -> tuple[list[tuple[str, int]], tuple[str, ...]]:
    """Per object (colour, instance), shuffled, and the absent names.

    Three consecutive hues are left out (so an unrelated colour, neither present nor a neighbour of a
    present one, always exists); among the other six at least two neighbours are present (the
    look-alike pair) and one is absent next to a present one (the look-alike absent query)."""
    n = int(rng.integers(5, 11))
    use_black = bool(rng.random() < 0.5)
    # Distinct concepts: at most 6 hues (+ black); the rest repeat a concept with another shape.
    n_repeat = max(n - 6 - use_black, int(rng.integers(0, 2)) + (n >= 8))
    n_hues = n - n_repeat - use_black
    gap = int(rng.integers(len(HUES)))
    usable = [HUES[(gap + 3 + i) % len(HUES)] for i in range(6)]
    while True:
        present = [usable[i] for i in sorted(rng.choice(6, size=n_hues, replace=False))]
        pairs = any(b in adjacent_colours(a) for a in present for b in present)
        lookalike_absent = [c for c in HUES if c not in present and set(adjacent_colours(c)) & set(present)]
        unrelated = [c for c in HUES if c not in present and not set(adjacent_colours(c)) & set(present)]
        if pairs and lookalike_absent and unrelated:
            break
    concepts = present + [BLACK] * use_black
    repeats = [concepts[i] for i in rng.choice(len(concepts), size=n_repeat, replace=False)]
    colours = [(c, 1) for c in concepts] + [(c, 2) for c in repeats]
    colours = [colours[i] for i in rng.permutation(len(colours))]
    nouns = rng.permutation(_ABSENT_NOUNS)
    absent = (f"{rng.choice(lookalike_absent)} {nouns[0]}", f"{rng.choice(unrelated)} {nouns[1]}")
    return colours, absent


def _shape_size(rng, role: str, primitive: str) -> np.ndarray:
    """Full extent (x, y, z) metres of a ``primitive`` playing ``role``."""
    if role == "small":
        r = rng.uniform(0.04, 0.06)
        return np.array([2 * r, 2 * r, 2 * r if primitive == "sphere" else rng.uniform(0.08, 0.16)])
    if role == "flat":
        if primitive == "box":
            return np.r_[rng.uniform(0.22, 0.45, 2), FLAT_HEIGHT_M]
        d = 2 * rng.uniform(0.1, 0.2)
        return np.array([d, d, FLAT_HEIGHT_M])
    scale = {"table": 0.5, "hidden": 0.8, "front": 1.0}.get(role, 1.0)
    if primitive == "box":
        size = np.r_[rng.uniform(0.2, 0.45, 2), rng.uniform(0.2, 0.5)] * scale
    elif primitive == "sphere":
        size = np.full(3, 2 * rng.uniform(0.1, 0.22) * scale)
    else:
        d = 2 * rng.uniform(0.08, 0.2) * scale
        size = np.array([d, d, rng.uniform(0.2, 0.6) * scale])
    if role == "front":
        size[2] = max(size[2], 0.4)
        size[:2] = np.maximum(size[:2], 0.3)
    return size


_ROLE_PRIMITIVES = {"small": ("sphere", "cylinder"), "flat": ("box", "cylinder"),
                    "front": ("box", "cylinder")}


def _layout(rng, box, colours) -> tuple[tuple[RoomObject, ...], tuple[SceneObject, ...]] | None:
    """Place the table and the objects; None when something does not fit (the caller re-draws)."""
    lo, hi = box[0, :2], box[1, :2]
    n = len(colours)
    roles = list(_BASE_ROLES) + [_EXTRA_ROLES[i] for i in rng.integers(len(_EXTRA_ROLES), size=n - 5)]
    # Table against a random wall, long side along it.
    wall = int(rng.integers(4))
    axis = wall // 2  # 0: an x wall (the table runs along y), 1: a y wall
    length, depth = rng.uniform(0.8, 1.3), rng.uniform(0.5, 0.8)
    top_z = rng.uniform(0.68, 0.78)
    ext = np.zeros(2)
    ext[axis], ext[1 - axis] = depth, length
    c = rng.uniform(lo + ext / 2 + 0.1, hi - ext / 2 - 0.1)
    gap = rng.uniform(0.03, 0.15)
    c[axis] = lo[axis] + gap + depth / 2 if wall % 2 == 0 else hi[axis] - gap - depth / 2
    if np.any(ext + 0.2 > hi - lo):
        return None
    furniture = _table(rng, c, ext, top_z)
    table_fp = np.r_[c - ext / 2, c + ext / 2]

    placed: list[RoomObject] = []
    first_primitive: dict[str, str] = {}
    hidden_obj: RoomObject | None = None
    for (colour, instance), role in zip(colours, roles, strict=True):
        choices = _ROLE_PRIMITIVES.get(role, ("box", "sphere", "cylinder"))
        if colour in first_primitive:
            choices = tuple(p for p in choices if p != first_primitive[colour])
        primitive = str(rng.choice(choices))
        size = _shape_size(rng, role, primitive)
        noun = _FLAT_NOUN[primitive] if role == "flat" else primitive
        z0 = top_z if role in ("small", "table") else 0.0
        for _ in range(60):
            xy = _position(rng, role, size, lo, hi, table_fp, hidden_obj)
            if xy is None:
                return None
            fp = np.r_[xy - size[:2] / 2, xy + size[:2] / 2]
            on_table = role in ("small", "table")
            others = [o.footprint for o in placed if (o.placement == "table") == on_table]
            if not on_table:
                others.append(table_fp)
            margin = 0.04 if on_table or role == "front" else 0.12
            if all(_gap(fp, other) >= margin for other in others):
                break
        else:
            return None
        centre = np.r_[xy, z0 + size[2] / 2]
        placement = "table" if on_table else ("wall" if _wall_distance(fp, lo, hi) <= 0.03 else "floor")
        obj = RoomObject(f"{colour} {noun}", primitive, colour, _object_rgb(rng, colour), centre, size,
                         centre - size / 2, centre + size / 2, placement=placement, instance=instance)
        if role == "hidden":
            hidden_obj = obj
        if role == "front":
            placed[placed.index(hidden_obj)] = replace(hidden_obj, hidden_behind=obj.name)
        placed.append(obj)
        first_primitive.setdefault(colour, primitive)
    return tuple(placed), furniture


def _position(rng, role, size, lo, hi, table_fp, hidden) -> np.ndarray | None:
    """A candidate centre (x, y) for a footprint of ``size`` playing ``role``."""
    half = size[:2] / 2
    if role in ("small", "table"):
        return rng.uniform(table_fp[:2] + half + 0.04, table_fp[2:] - half - 0.04)
    if role in ("hidden", "wall"):
        wall = int(rng.integers(4))
        axis = wall // 2
        xy = rng.uniform(lo + half + 0.05, hi - half - 0.05)
        gap = rng.uniform(0.0, 0.03)
        xy[axis] = lo[axis] + half[axis] + gap if wall % 2 == 0 else hi[axis] - half[axis] - gap
        return xy
    if role == "front":
        # Between the hidden object and the room centre, 4-12 cm in front of it.
        axis = _wall_axis(hidden.footprint, lo, hi)
        inward = np.sign(((lo + hi) / 2 - hidden.center[:2])[axis])
        xy = hidden.center[:2].copy()
        xy[axis] += inward * (hidden.size[axis] / 2 + rng.uniform(0.04, 0.12) + half[axis])
        xy[1 - axis] += rng.uniform(-0.25, 0.25) * hidden.size[1 - axis]
        return xy
    return rng.uniform(lo + half + 0.15, hi - half - 0.15)


def _wall_axis(fp: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> int:
    """The axis (0: x, 1: y) of the wall nearest to footprint fp (4,)."""
    d = np.array([fp[0] - lo[0], hi[0] - fp[2], fp[1] - lo[1], hi[1] - fp[3]])
    return int(np.argmin(d)) // 2


def _wall_distance(fp: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> float:
    return float(min(fp[0] - lo[0], hi[0] - fp[2], fp[1] - lo[1], hi[1] - fp[3]))


def _gap(a: np.ndarray, b: np.ndarray) -> float:
    """Distance between two footprints (xmin, ymin, xmax, ymax); negative when they overlap."""
    d = np.maximum(a[:2] - b[2:], b[:2] - a[2:])
    return float(np.linalg.norm(np.maximum(d, 0.0))) if d.max() > 0 else float(d.max())


def _object_rgb(rng, colour: str) -> tuple[int, int, int]:
    if colour == BLACK:
        return hue_rgb(colour, 0.0, rng.uniform(0.035, 0.06))
    return hue_rgb(colour, rng.uniform(0.65, 0.9), rng.uniform(0.72, 0.95))


def _table(rng, centre_xy, ext, top_z) -> tuple[SceneObject, ...]:
    """A 4 cm top on four 5 cm legs, achromatic (saturation < 0.1, value 0.45-0.65)."""
    grey = tuple(round(255 * c) for c in colorsys.hsv_to_rgb(rng.uniform(0, 1), rng.uniform(0, 0.08),
                                                                   rng.uniform(0.45, 0.65)))

    def part(name, lo, hi):
        lo, hi = np.asarray(lo, dtype=np.float64), np.asarray(hi, dtype=np.float64)
        return SceneObject(name, "box", "grey", grey, (lo + hi) / 2, hi - lo, lo, hi)

    lo, hi = centre_xy - ext / 2, centre_xy + ext / 2
    parts = [part("table", [*lo, top_z - 0.04], [*hi, top_z])]
    for cx in (lo[0] + 0.04, hi[0] - 0.09):
        for cy in (lo[1] + 0.04, hi[1] - 0.09):
            parts.append(part("table leg", [cx, cy, 0.0], [cx + 0.05, cy + 0.05, top_z - 0.04]))
    return tuple(parts)
