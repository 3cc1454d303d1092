"""Random rooms: determinism, the issue's constraints on size, objects, colours, absent names, lighting."""

import colorsys

import numpy as np
import pytest

from lerf_ros.core.encoders.demo import CHROMATIC
from lerf_ros.sim.rooms import BLACK, FLAT_HEIGHT_M, HUES, adjacent_colours, colour_word, random_room
from lerf_ros.sim.scene import default_intrinsics, look_at_pose

SEEDS = range(12)
HUE_DEG = dict(CHROMATIC)


@pytest.fixture(scope="module")
def rooms():
    return {seed: random_room(seed) for seed in SEEDS}


def _hsv(rgb):
    return np.array(colorsys.rgb_to_hsv(*(np.asarray(rgb, dtype=np.float64) / 255.0)))


def _hue_diff(a_deg, b_deg):
    return abs((a_deg - b_deg + 180.0) % 360.0 - 180.0)


def test_adjacent_colours_on_the_hue_circle():
    assert adjacent_colours("red") == ("pink", "orange")
    assert adjacent_colours("pink box") == ("magenta", "red")  # wraps around the circle
    assert adjacent_colours("the purple sphere") == ("blue", "magenta")
    assert adjacent_colours("black cylinder") == () and adjacent_colours("table") == ()
    assert colour_word("a Yellow mat") == "yellow" and colour_word("table") == ""
    assert adjacent_colours("yellow") == ("orange", "green")
    for name in HUES:  # symmetric, two each, and within 65 degrees on the hue circle
        assert len(adjacent_colours(name)) == 2
        for other in adjacent_colours(name):
            assert name in adjacent_colours(other) and _hue_diff(HUE_DEG[name], HUE_DEG[other]) <= 65


def test_same_seed_same_pixels_other_seed_other_room():
    a, b, c = random_room(5), random_room(5), random_room(6)
    intr = default_intrinsics(64, 48)
    centre = a.bounds.mean(axis=0)
    T = look_at_pose([centre[0], centre[1], 1.2], [a.bounds[1, 0] - 0.2, centre[1], 0.4])
    rgb_a, depth_a = a.render(T, intr)
    rgb_b, depth_b = b.render(T, intr)
    np.testing.assert_array_equal(rgb_a, rgb_b)
    np.testing.assert_array_equal(depth_a, depth_b)
    np.testing.assert_array_equal(a.render_labels(T, intr), b.render_labels(T, intr))
    assert a.names == b.names and a.absent_names == b.absent_names
    assert a.names != c.names or not np.allclose(a.bounds, c.bounds)


def test_room_size_objects_and_placements(rooms):
    for seed, room in rooms.items():
        size = room.bounds[1] - room.bounds[0]
        assert 3.0 <= size[0] <= 8.0 and 3.0 <= size[1] <= 8.0 and 2.4 <= size[2] <= 3.0, seed
        assert 5 <= len(room.objects) <= 10, seed
        assert len(set(room.names)) == len(room.names) and "table" not in room.names
        lo, hi = room.bounds
        top_z = room.table_box[1, 2]
        small = [o for o in room.objects if o.shape in ("sphere", "cylinder") and 0.04 <= o.radius_m <= 0.06]
        flat = [o for o in room.objects if o.size[2] == pytest.approx(FLAT_HEIGHT_M) and o.box_min[2] == 0]
        on_table = [o for o in room.objects if o.box_min[2] == pytest.approx(top_z)
                    and np.all(o.box_min[:2] >= room.table_box[0, :2])
                    and np.all(o.box_max[:2] <= room.table_box[1, :2])]
        wall_gap = np.minimum(np.array([o.box_min[:2] - lo[:2] for o in room.objects]),
                              np.array([hi[:2] - o.box_max[:2] for o in room.objects])).min(axis=1)
        assert small and flat and on_table, (seed, room.names)
        assert wall_gap.min() <= 0.03 and wall_gap.min() >= 0.0, seed
        assert {o.placement for o in on_table} == {"table"}
        assert any(o.placement == "floor" and o.box_min[2] == 0 and o not in flat for o in room.objects)
        assert any(o in on_table for o in small), seed  # the small one sits on the table
        for o in room.objects:  # inside the room, resting on the floor or the table top
            assert np.all(o.box_min >= lo - 1e-9) and np.all(o.box_max <= hi + 1e-9)
            assert o.box_min[2] in (0.0, pytest.approx(top_z)), (seed, o.name)
        # No two objects on the same support overlap; floor objects clear the table.
        for i, a in enumerate(room.objects):
            for b in room.objects[i + 1:]:
                if (a.placement == "table") == (b.placement == "table"):
                    overlap = np.minimum(a.box_max, b.box_max) - np.maximum(a.box_min, b.box_min)
                    assert overlap[:2].min() < 0, (seed, a.name, b.name)


def test_partly_hidden_object_is_hidden_by_its_neighbour(rooms):
    for seed, room in list(rooms.items())[:4]:
        hidden = [o for o in room.objects if o.hidden_behind]
        assert hidden, seed
        back = hidden[0]
        front = room.object(back.hidden_behind)
        assert front.size[2] > back.size[2] and back.placement == "wall"
        # From the room centre at camera height, looking at the hidden object: removing the front
        # object reveals more of it, and some of it is still visible with the front in place.
        centre = room.bounds.mean(axis=0)
        T = look_at_pose([centre[0], centre[1], 0.9], back.center)
        intr = default_intrinsics(160, 120, 75.0)
        k = room.names.index(back.name)
        with_front = (room.render_labels(T, intr) == k).sum()
        alone = room.without(front.name)
        without = (alone.render_labels(T, intr) == alone.names.index(back.name)).sum()
        assert without > with_front, (seed, back.name, front.name, with_front, without)


def test_colours_lookalikes_and_repeats(rooms):
    for seed, room in rooms.items():
        concepts = [o.colour_name for o in room.objects]
        for o in room.objects:
            assert o.name.split()[0] == o.colour_name
            h, s, v = _hsv(o.rgb)
            if o.colour_name == BLACK:
                assert v < 0.08, (seed, o.name, o.rgb)
            else:
                assert _hue_diff(360 * h, HUE_DEG[o.colour_name]) < 2.0 and s >= 0.6, (seed, o.name, o.rgb)
        for c in set(concepts):
            same = [o for o in room.objects if o.colour_name == c]
            assert len(same) <= 2, (seed, c)
            if len(same) == 2:  # the several-instances case: another shape, recorded
                assert same[0].shape != same[1].shape and sorted(o.instance for o in same) == [1, 2]
                assert c in room.repeated_colours
        pairs = room.lookalike_pairs
        assert pairs, seed
        for a, b in pairs:
            ia, ib = HUES.index(room.object(a).colour_name), HUES.index(room.object(b).colour_name)
            assert (ia - ib) % len(HUES) in (1, len(HUES) - 1)


def test_absent_names_are_absent_and_include_a_lookalike(rooms):
    for seed, room in rooms.items():
        present = {o.colour_name for o in room.objects}
        absent = [colour_word(n) for n in room.absent_names]
        assert len(absent) >= 2 and all(absent), seed
        assert not set(absent) & present, seed
        assert not set(room.absent_names) & set(room.names)
        lookalike = [c for c in absent if set(adjacent_colours(c)) & present]
        unrelated = [c for c in absent if not set(adjacent_colours(c)) & present]
        assert lookalike and unrelated, (seed, room.absent_names, present)


def test_walls_floor_and_table_are_achromatic_and_lighting_varies(rooms):
    for seed, room in list(rooms.items())[:6]:
        centre = room.bounds.mean(axis=0)
        intr = default_intrinsics(80, 60)
        sats, values = [], []
        for corner in ([room.bounds[0, 0], room.bounds[0, 1]], [room.bounds[1, 0], room.bounds[1, 1]]):
            T = look_at_pose([centre[0], centre[1], 1.3], [*corner, 0.5])
            rgb, _ = room.render(T, intr)
            labels = room.render_labels(T, intr)
            px = rgb[labels < 0].astype(np.float64) / 255.0
            sats.append((px.max(1) - px.min(1)) / np.maximum(px.max(1), 1e-9))
            values.append(px.max(1))
        sats, values = np.concatenate(sats), np.concatenate(values)
        assert sats.max() < 0.18, (seed, sats.max())
        assert values.min() > 0.16, (seed, values.min())  # never reads as black
        # Brightness of the floor falls off across the room (same albedo, different light).
        lo, hi = room.bounds
        xy = np.stack(np.meshgrid(np.linspace(lo[0] + 0.1, hi[0] - 0.1, 15),
                                  np.linspace(lo[1] + 0.1, hi[1] - 0.1, 15)), -1).reshape(-1, 2)
        floor = room.shade(np.c_[xy, np.zeros(len(xy))], np.tile([0.0, 0.0, 1.0], (len(xy), 1)))
        assert floor.max() / floor.min() > 1.15, seed
        assert floor.min() >= room.ambient - 1e-12 and floor.max() <= 1.0 + 1e-12


def test_object_pixels_keep_their_hue_at_45_to_100_percent(rooms):
    for seed, room in list(rooms.items())[:6]:
        intr = default_intrinsics(48, 36, 60.0)
        for k, o in enumerate(room.objects):
            if o.colour_name == BLACK:
                continue
            centre = room.bounds.mean(axis=0)
            direction = centre[:2] - o.center[:2]
            # Nearly straight down from 1 m above: nothing (not even the object hiding it) is in the way.
            eye = np.r_[o.center[:2] + 0.1 * direction / np.linalg.norm(direction), o.center[2] + 1.0]
            T = look_at_pose(eye, o.center)
            rgb, _ = room.render(T, intr)
            mask = room.render_labels(T, intr) == k
            assert mask.sum() > 3, (seed, o.name)
            base_h, _, base_v = _hsv(o.rgb)
            for pixel in rgb[mask][::5]:
                h, _, v = _hsv(pixel)
                assert _hue_diff(360 * h, 360 * base_h) < 3.0, (seed, o.name, pixel, o.rgb)
                assert 0.45 - 0.02 <= v / base_v <= 1.0 + 0.01, (seed, o.name, v / base_v)


def test_table_is_rendered_but_labelled_background(rooms):
    room = rooms[0]
    top = room.table_box
    # Looking at the table from the room centre: its pixels are traced (surfaces after the objects)
    # and labelled -1, like the walls.
    intr = default_intrinsics(80, 60)
    centre = room.bounds.mean(axis=0)
    T = look_at_pose([centre[0], centre[1], 1.6], (top[0] + top[1]) / 2)
    _, surface, _, _ = room.trace(T, intr)
    table_px = surface >= 6 + len(room.objects)
    assert table_px.sum() > 20
    assert np.all(room.render_labels(T, intr)[table_px] == -1)
    _, s, v = _hsv(room.furniture[0].rgb)
    assert s < 0.1 and 0.4 <= v <= 0.7
