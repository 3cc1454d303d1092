"""Rigid transforms and quaternions (x, y, z, w order, as in geometry_msgs).

All functions are numpy, float64, and validate their input: a non-finite or
non-unit quaternion and a non-rigid matrix raise ``ValueError`` naming the value.
"""

from __future__ import annotations

import numpy as np

#: A quaternion whose norm differs from 1 by more than this is rejected rather than renormalised.
QUAT_NORM_TOLERANCE = 1e-3
#: Tolerance on ``R^T R - I`` and ``det(R) - 1`` for a rotation to count as rigid.
RIGID_TOLERANCE = 1e-4


def validate_quaternion(q_xyzw, name: str = "quaternion") -> np.ndarray:
    """Return ``q`` (4,) float64 renormalised; raise ValueError if non-finite or not unit."""
    q = np.asarray(q_xyzw, dtype=np.float64).reshape(-1)
    if q.shape != (4,):
        raise ValueError(f"{name} must have 4 elements (x, y, z, w), got shape {q.shape}")
    if not np.all(np.isfinite(q)):
        raise ValueError(f"{name} is not finite: {q.tolist()}")
    norm = float(np.linalg.norm(q))
    if abs(norm - 1.0) > QUAT_NORM_TOLERANCE:
        raise ValueError(f"{name} is not a unit quaternion (norm {norm:.6f}): {q.tolist()}")
    return q / norm


def quat_to_matrix(q_xyzw, name: str = "quaternion") -> np.ndarray:
    """(4,) x, y, z, w -> (3, 3) rotation matrix."""
    x, y, z, w = validate_quaternion(q_xyzw, name)
    return np.array(
        [
            [1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)],
            [2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)],
            [2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)],
        ]
    )


def matrix_to_quat(R) -> np.ndarray:
    """(3, 3) rotation -> (4,) x, y, z, w with w >= 0."""
    R = np.asarray(R, dtype=np.float64)
    trace = R[0, 0] + R[1, 1] + R[2, 2]
    if trace > 0:
        s = 2.0 * np.sqrt(trace + 1.0)
        q = [(R[2, 1] - R[1, 2]) / s, (R[0, 2] - R[2, 0]) / s, (R[1, 0] - R[0, 1]) / s, 0.25 * s]
    elif R[0, 0] > R[1, 1] and R[0, 0] > R[2, 2]:
        s = 2.0 * np.sqrt(1.0 + R[0, 0] - R[1, 1] - R[2, 2])
        q = [0.25 * s, (R[0, 1] + R[1, 0]) / s, (R[0, 2] + R[2, 0]) / s, (R[2, 1] - R[1, 2]) / s]
    elif R[1, 1] > R[2, 2]:
        s = 2.0 * np.sqrt(1.0 + R[1, 1] - R[0, 0] - R[2, 2])
        q = [(R[0, 1] + R[1, 0]) / s, 0.25 * s, (R[1, 2] + R[2, 1]) / s, (R[0, 2] - R[2, 0]) / s]
    else:
        s = 2.0 * np.sqrt(1.0 + R[2, 2] - R[0, 0] - R[1, 1])
        q = [(R[0, 2] + R[2, 0]) / s, (R[1, 2] + R[2, 1]) / s, 0.25 * s, (R[1, 0] - R[0, 1]) / s]
    q = np.asarray(q)
    q /= np.linalg.norm(q)
    return -q if q[3] < 0 else q


def slerp(q0, q1, t: float) -> np.ndarray:
    """Spherical linear interpolation between unit quaternions, shortest path; t in [0, 1]."""
    q0 = validate_quaternion(q0, "q0")
    q1 = validate_quaternion(q1, "q1")
    dot = float(np.dot(q0, q1))
    if dot < 0.0:
        q1, dot = -q1, -dot
    if dot > 0.9995:  # nearly parallel: lerp is exact to float precision and avoids 0/0
        q = q0 + t * (q1 - q0)
        return q / np.linalg.norm(q)
    theta = np.arccos(np.clip(dot, -1.0, 1.0))
    s = np.sin(theta)
    return (np.sin((1 - t) * theta) * q0 + np.sin(t * theta) * q1) / s


def make_transform(R, t) -> np.ndarray:
    """(3, 3) rotation + (3,) translation -> (4, 4) homogeneous transform."""
    T = np.eye(4)
    T[:3, :3] = np.asarray(R, dtype=np.float64)
    T[:3, 3] = np.asarray(t, dtype=np.float64).reshape(3)
    return T


def transform_from_quat(t_xyz, q_xyzw, name: str = "transform") -> np.ndarray:
    """Translation (3,) + quaternion (4,) -> (4, 4); validates both."""
    t = np.asarray(t_xyz, dtype=np.float64).reshape(-1)
    if t.shape != (3,) or not np.all(np.isfinite(t)):
        raise ValueError(f"{name} translation must be 3 finite numbers, got {t.tolist()}")
    return make_transform(quat_to_matrix(q_xyzw, f"{name} rotation"), t)


def invert_transform(T) -> np.ndarray:
    """Inverse of a rigid (4, 4) transform, exact (R^T, -R^T t)."""
    T = np.asarray(T, dtype=np.float64)
    R, t = T[:3, :3], T[:3, 3]
    return make_transform(R.T, -R.T @ t)


def validate_rigid(T, name: str = "T") -> np.ndarray:
    """Return (4, 4) float64 if ``T`` is a finite rigid transform; else raise ValueError."""
    T = np.asarray(T, dtype=np.float64)
    if T.shape != (4, 4):
        raise ValueError(f"{name} must be a 4x4 matrix, got shape {T.shape}")
    if not np.all(np.isfinite(T)):
        raise ValueError(f"{name} is not finite: {T.tolist()}")
    if not np.allclose(T[3], [0, 0, 0, 1], atol=RIGID_TOLERANCE):
        raise ValueError(f"{name} last row must be [0, 0, 0, 1], got {T[3].tolist()}")
    R = T[:3, :3]
    ortho_err = float(np.abs(R.T @ R - np.eye(3)).max())
    det = float(np.linalg.det(R))
    if ortho_err > RIGID_TOLERANCE or abs(det - 1.0) > RIGID_TOLERANCE:
        raise ValueError(
            f"{name} is not rigid: |R^T R - I| = {ortho_err:.2e}, det(R) = {det:.6f}"
        )
    return T


def rotation_angle_deg(R_a, R_b) -> float:
    """Angle in degrees of the relative rotation R_a^T R_b."""
    R = np.asarray(R_a, dtype=np.float64).T @ np.asarray(R_b, dtype=np.float64)
    c = np.clip((np.trace(R) - 1.0) / 2.0, -1.0, 1.0)
    return float(np.degrees(np.arccos(c)))
