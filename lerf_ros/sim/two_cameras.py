"""Two cameras of one mobile manipulator in the demo room (`scene.SyntheticRoom(0)`), for the multi-camera
tests: a head camera that sweeps the room's +x half and never sees the yellow box, and a wrist camera of
another image size, aspect and field of view that circles the yellow box. An answer at the yellow box can
only come from the wrist camera's keyframes, posed with its own intrinsics.

Poses are functions of a phase ``s`` in [0, 1] along each camera's path (T_world_cam, ROS optical), so a
publisher can move the cameras continuously and a test can take n evenly spaced views.
"""

from __future__ import annotations

import numpy as np

from .scene import SyntheticRoom, default_intrinsics, look_at_pose

#: Head camera: 96 x 72 (4:3), 75 deg horizontal field of view.
HEAD_INTRINSICS = default_intrinsics(96, 72)
#: Wrist camera: 80 x 45 (16:9), 87 deg (a close-range wrist camera's wide view).
WRIST_INTRINSICS = default_intrinsics(80, 45, 87.0)
#: The object only the wrist camera sees; objects the head camera sees (and the wrist camera does not).
WRIST_ONLY = "yellow box"
HEAD_ONLY = ("green sphere",)


def head_pose(s: float) -> np.ndarray:
    """(4, 4) T_world_cam of the head camera at phase ``s``: from (-0.4, -0.6) to (0.05, 0.75) at 1.3 m,
    looking at the +x wall's foot, with the yellow box (x = -0.87) always behind it."""
    s = float(np.clip(s, 0.0, 1.0))
    eye = np.array([-0.4 + 0.45 * s, -0.6 + 1.35 * s, 1.3])
    target = np.array([1.0, -0.6 + 1.8 * s, 0.2])
    return look_at_pose(eye, target)


def wrist_pose(room: SyntheticRoom, s: float) -> np.ndarray:
    """(4, 4) T_world_cam of the wrist camera at phase ``s``: 0.75 m out and 0.45 m above the yellow box's
    centre, swinging from 150 to 190 deg around it, looking at it."""
    s = float(np.clip(s, 0.0, 1.0))
    centre = room.object(WRIST_ONLY).center
    a = np.radians(150.0 + 40.0 * s)
    return look_at_pose(centre + np.array([0.75 * np.cos(a), 0.75 * np.sin(a), 0.45]), centre)


def phases(n: int) -> np.ndarray:
    """n evenly spaced phases in [0, 1] (n >= 1)."""
    return np.linspace(0.0, 1.0, n) if n > 1 else np.zeros(1)
