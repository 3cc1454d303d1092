"""A small TF tree shared by the TF tests (substitute listener, parity with the tf2_ros stand-in).

map -> odom -> base_link -> camera_link -> camera_color_optical_frame; at t = 1.5 s (odom half-way between
(10, 0, 0) and (10, 4, 0), base_link half-way to (2, 0, 0) turned 45 degrees) the optical frame sits at
EXPECTED_MAP_OPT in the map.
"""

import math

import numpy as np

S = 1_000_000_000  # nanoseconds per second
OPT = "camera_color_optical_frame"
C45 = math.sqrt(0.5)
EXPECTED_MAP_OPT = np.array(
    [[C45, 0, C45, 11 + 0.1 * C45], [-C45, 0, C45, 2 + 0.1 * C45], [0, -1, 0, 0.5], [0, 0, 0, 1]]
)


def yaw_q(deg):
    """(x, y, z, w) quaternion of a rotation by ``deg`` degrees about z."""
    h = math.radians(deg) / 2
    return (0.0, 0.0, math.sin(h), math.cos(h))
