"""Relevancy point clouds as binary little-endian PLY files.

Vertex layout (one element, in this order): ``x y z`` float32 (world frame, metres),
``relevancy`` float32 (LERF relevancy, 0..1), ``red green blue`` uchar. Any PLY viewer
(MeshLab, CloudCompare, Open3D) shows the colours; the relevancy property keeps the number.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

#: On-disk vertex record, little-endian, no padding.
VERTEX_DTYPE = np.dtype(
    [
        ("x", "<f4"), ("y", "<f4"), ("z", "<f4"),
        ("relevancy", "<f4"),
        ("red", "u1"), ("green", "u1"), ("blue", "u1"),
    ]
)
_PLY_TYPES = {"float": "<f4", "float32": "<f4", "uchar": "u1", "uint8": "u1"}


@dataclass(frozen=True)
class PlyCloud:
    """xyz (N, 3) float32 metres, relevancy (N,) float32, rgb (N, 3) uint8."""

    xyz: np.ndarray
    relevancy: np.ndarray
    rgb: np.ndarray
    frame_id: str = ""


def write_ply(path, xyz, relevancy, rgb, frame_id: str = "") -> Path:
    """Write N points to ``path``; ``frame_id`` goes into a header comment. Returns the path."""
    xyz = np.asarray(xyz, dtype=np.float32).reshape(-1, 3) if np.size(xyz) else np.zeros((0, 3), np.float32)
    n = xyz.shape[0]
    relevancy = np.asarray(relevancy, dtype=np.float32).reshape(-1)
    rgb = np.asarray(rgb).reshape(-1, 3) if np.size(rgb) else np.zeros((0, 3), np.uint8)
    if relevancy.shape[0] != n or rgb.shape[0] != n:
        raise ValueError(
            f"point count mismatch: xyz {n}, relevancy {relevancy.shape[0]}, rgb {rgb.shape[0]}"
        )
    if rgb.dtype != np.uint8:
        raise ValueError(f"rgb must be uint8, got {rgb.dtype}")
    if "\n" in frame_id:
        raise ValueError(f"frame_id must be one line, got {frame_id!r}")
    record = np.empty(n, dtype=VERTEX_DTYPE)
    record["x"], record["y"], record["z"] = xyz[:, 0], xyz[:, 1], xyz[:, 2]
    record["relevancy"] = relevancy
    record["red"], record["green"], record["blue"] = rgb[:, 0], rgb[:, 1], rgb[:, 2]
    header = ["ply", "format binary_little_endian 1.0", "comment lerf_ros relevancy cloud"]
    if frame_id:
        header.append(f"comment frame_id {frame_id}")
    header += [
        f"element vertex {n}",
        "property float x", "property float y", "property float z",
        "property float relevancy",
        "property uchar red", "property uchar green", "property uchar blue",
        "end_header",
    ]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        f.write(("\n".join(header) + "\n").encode("ascii"))
        f.write(record.tobytes())
    return path


def read_ply(path) -> PlyCloud:
    """Read a PLY written by ``write_ply`` (or any binary LE PLY with the same vertex properties)."""
    path = Path(path)
    data = path.read_bytes()
    end = data.find(b"end_header\n")
    if not data.startswith(b"ply\n") or end < 0:
        raise ValueError(f"{path} is not a PLY file (no 'ply' magic or 'end_header')")
    header = data[: end].decode("ascii", errors="replace").splitlines()
    body = data[end + len(b"end_header\n"):]
    n = None
    fields: list[tuple[str, str]] = []
    frame_id = ""
    for line in header:
        parts = line.split()
        if not parts:
            continue
        if parts[0] == "format" and parts[1] != "binary_little_endian":
            raise ValueError(f"{path}: unsupported PLY format {parts[1]!r}")
        if parts[0] == "comment" and len(parts) >= 3 and parts[1] == "frame_id":
            frame_id = parts[2]
        elif parts[0] == "element":
            if parts[1] != "vertex":
                raise ValueError(f"{path}: unsupported PLY element {parts[1]!r}")
            n = int(parts[2])
        elif parts[0] == "property":
            if parts[1] not in _PLY_TYPES:
                raise ValueError(f"{path}: unsupported PLY property type {parts[1]!r}")
            fields.append((parts[2], _PLY_TYPES[parts[1]]))
    if n is None:
        raise ValueError(f"{path}: PLY header has no vertex element")
    dtype = np.dtype(fields)
    if len(body) < n * dtype.itemsize:
        raise ValueError(f"{path}: truncated, {len(body)} bytes for {n} vertices of {dtype.itemsize}")
    record = np.frombuffer(body, dtype=dtype, count=n)
    names = set(dtype.names or ())
    missing = {"x", "y", "z", "relevancy", "red", "green", "blue"} - names
    if missing:
        raise ValueError(f"{path}: PLY lacks vertex properties {sorted(missing)}")
    xyz = np.stack([record["x"], record["y"], record["z"]], axis=1).astype(np.float32)
    rgb = np.stack([record["red"], record["green"], record["blue"]], axis=1).astype(np.uint8)
    return PlyCloud(xyz, record["relevancy"].astype(np.float32), rgb, frame_id)
