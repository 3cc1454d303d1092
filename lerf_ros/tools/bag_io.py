"""Read posed frames from rosbag2 recordings (mcap or sqlite3) without ROS, via ``rosbags``.

The pose lookup copies the trainer node: every /tf and /tf_static message goes into the ROS-free
``TfBuffer`` first (a pose at an image stamp needs TF published after it), then each image's
``T_world_cam = lookup_matrix(world_frame, image.header.frame_id, image.header.stamp)`` with tf2
interpolation. Images and depth are converted by ``lerf_ros.compat.image`` (the node's converters),
CameraInfo by ``camera_info_to_intrinsics``. Dropped images are counted per reason, with the node's
reason names ("no_transform", "bad_encoding", "no_camera_info", "invalid_frame").

User errors (missing bag, missing topics, a TF tree that never links world and camera frame, a
corrupt or truncated file) raise ``BagError`` with a message that names the problem.
"""

from __future__ import annotations

import sqlite3
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..compat.image import compressed_to_rgb, depth_to_metres, image_to_rgb
from ..compat.tf_buffer import (
    ConnectivityException,
    InvalidArgumentException,
    LookupException,
    TfBuffer,
    TransformException,
)
from ..core.frames.camera import DISTORTION_MODELS, CameraIntrinsics
from ..core.frames.frame import Frame

IMAGE_TYPES = ("sensor_msgs/msg/Image", "sensor_msgs/msg/CompressedImage")
CAMERA_INFO_TYPE = "sensor_msgs/msg/CameraInfo"
TF_TYPE = "tf2_msgs/msg/TFMessage"


class BagError(ValueError):
    """A bag that cannot be used: the message says why (missing topic, TF tree, corrupt file)."""


@dataclass(frozen=True)
class BagTopics:
    """Topic names; defaults are the trainer node's parameter defaults. ``depth`` '' = no depth."""

    image: str = "/camera/color/image_raw"
    camera_info: str = "/camera/color/camera_info"
    depth: str = ""
    tf: str = "/tf"
    tf_static: str = "/tf_static"


@dataclass
class BagReadStats:
    """Counts while reading: images seen, frames yielded, frames with depth, drops by reason."""

    images: int = 0
    frames: int = 0
    with_depth: int = 0
    dropped: Counter = field(default_factory=Counter)


def stamp_to_ns(stamp) -> int:
    """builtin_interfaces/Time (sec, nanosec) -> integer nanoseconds."""
    return int(stamp.sec) * 1_000_000_000 + int(stamp.nanosec)


def camera_info_to_intrinsics(msg) -> CameraIntrinsics:
    """sensor_msgs/CameraInfo (any object with its field names) -> CameraIntrinsics (pixels).

    K is the row-major 3x3 camera matrix; D is passed through for plumb_bob / rational_polynomial
    (undistortion happens in the engine at ingest); an empty model or all-zero D means "none".
    Raises ValueError naming the bad value.
    """
    k = np.asarray(msg.k, dtype=np.float64).reshape(-1)
    if k.shape != (9,):
        raise ValueError(f"CameraInfo.k must have 9 elements, got {k.shape[0]}")
    model = str(msg.distortion_model or "").strip()
    d = tuple(float(x) for x in np.asarray(msg.d, dtype=np.float64).reshape(-1))
    if model in ("", "none") or not any(d):
        model, d = "none", ()
    elif model not in DISTORTION_MODELS:
        raise ValueError(
            f"CameraInfo.distortion_model {model!r} is not supported; supported: {sorted(DISTORTION_MODELS)}"
        )
    intr = CameraIntrinsics(int(msg.width), int(msg.height), float(k[0]), float(k[4]), float(k[2]),
                            float(k[5]), model, d)
    return intr.validate()


def open_reader(path):
    """An opened ``rosbags.highlevel.AnyReader`` for a rosbag2 directory (or a file inside one).

    Raises BagError for a missing path, a directory that is not a bag, or a corrupt file.
    """
    from rosbags.highlevel import AnyReader, AnyReaderError
    from rosbags.typesys import Stores, get_typestore

    path = Path(path).expanduser()
    if not path.exists():
        raise BagError(f"bag not found: {path}")
    if path.is_file() and (path.parent / "metadata.yaml").exists():
        path = path.parent  # a .mcap / .db3 inside a bag directory: open the directory
    if path.is_dir() and not (path / "metadata.yaml").exists():
        raise BagError(f"{path} is not a rosbag2 directory (no metadata.yaml)")
    try:
        # Bags recorded without embedded definitions (older sqlite3) are read with Jazzy's types.
        reader = AnyReader([path], default_typestore=get_typestore(Stores.ROS2_JAZZY))
        reader.open()
    except (AnyReaderError, sqlite3.DatabaseError, OSError, KeyError, ValueError, EOFError) as exc:
        raise BagError(
            f"cannot open bag {path}: {type(exc).__name__}: {exc} (corrupt or truncated?)"
        ) from exc
    return reader


def describe_topics(reader) -> str:
    """One line per topic: name, type, count (for error messages)."""
    lines = [f"  {name}  [{info.msgtype}]  {info.msgcount} msgs"
             for name, info in sorted(reader.topics.items())]
    return "\n".join(lines) if lines else "  (no topics)"


def _connections(reader, topic: str, types: tuple[str, ...], role: str, required: bool):
    conns = [c for c in reader.connections if c.topic == topic]
    if not conns:
        if required:
            raise BagError(
                f"{role} topic {topic!r} not in the bag; topics present:\n{describe_topics(reader)}"
            )
        return []
    bad = [c.msgtype for c in conns if c.msgtype not in types]
    if bad:
        raise BagError(f"{role} topic {topic!r} has type {bad[0]}, expected one of {list(types)}")
    return conns


def _iter_messages(reader, connections, path):
    """``reader.messages`` with decode errors of a corrupt / truncated file turned into BagError."""
    try:
        for conn, log_ns, raw in reader.messages(connections=connections):
            yield conn, log_ns, reader.deserialize(raw, conn.msgtype)
    except BagError:
        raise
    except Exception as exc:  # rosbags raises assorted types for damaged chunks / pages
        raise BagError(
            f"bag {path} is corrupt or truncated: {type(exc).__name__}: {exc}"
        ) from exc


class BagFrameReader:
    """Iterate ``Frame`` objects from a bag, exactly as the trainer node would build them.

    world_frame: the fixed frame of poses (node parameter ``world_frame``).
    camera_frame: '' = each image's ``header.frame_id`` (as the node does), else an override.
    depth_tolerance_s: a depth image pairs with the colour image of the nearest stamp within this.
    Use as a context manager or call ``close()``; ``stats`` fills while iterating.
    """

    def __init__(self, path, topics: BagTopics = BagTopics(), world_frame: str = "map",
                 camera_frame: str = "", depth_tolerance_s: float = 0.02):
        if not world_frame:
            raise ValueError(f"world_frame must be a frame id, got {world_frame!r}")
        if not np.isfinite(depth_tolerance_s) or depth_tolerance_s < 0:
            raise ValueError(f"depth_tolerance_s must be >= 0, got {depth_tolerance_s}")
        self.path = Path(path)
        self.topics = topics
        self.world_frame = world_frame
        self.camera_frame = camera_frame
        self.depth_tolerance_ns = round(depth_tolerance_s * 1e9)
        self.stats = BagReadStats()
        self.reader = open_reader(path)
        try:
            self._image_conns = _connections(self.reader, topics.image, IMAGE_TYPES, "image", True)
            self._info_conns = _connections(self.reader, topics.camera_info, (CAMERA_INFO_TYPE,),
                                            "camera_info", True)
            self._depth_conns = _connections(self.reader, topics.depth, ("sensor_msgs/msg/Image",),
                                             "depth", True) if topics.depth else []
            self._tf_conns = _connections(self.reader, topics.tf, (TF_TYPE,), "tf", False)
            self._tf_conns += _connections(self.reader, topics.tf_static, (TF_TYPE,), "tf_static", False)
            if not self._tf_conns:
                raise BagError(
                    f"neither {topics.tf!r} nor {topics.tf_static!r} is in the bag: no camera poses; "
                    f"topics present:\n{describe_topics(self.reader)}"
                )
            self.image_count = sum(c.msgcount for c in self._image_conns)
            self.tf, self._infos = self._load_tf_and_infos()
        except BaseException:
            self.close()
            raise

    def __enter__(self) -> BagFrameReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        if self.reader is not None and self.reader.stack is not None:
            self.reader.close()

    def _load_tf_and_infos(self) -> tuple[TfBuffer, list[tuple[int, CameraIntrinsics]]]:
        """First pass: the whole TF history into a buffer; every CameraInfo with its stamp."""
        span_s = max(self.reader.duration / 1e9, 0.0) + 10.0
        buffer = TfBuffer(cache_time_s=span_s)  # offline: keep the whole bag, no eviction
        infos: list[tuple[int, CameraIntrinsics]] = []
        bad_info: str | None = None
        static_ids = {c.id for c in self._tf_conns if c.topic == self.topics.tf_static}
        for conn, _log, msg in _iter_messages(self.reader, self._tf_conns + self._info_conns, self.path):
            if conn.msgtype == TF_TYPE:
                for ts in msg.transforms:
                    tr, q = ts.transform.translation, ts.transform.rotation
                    try:
                        buffer.set_transform(ts.header.frame_id, ts.child_frame_id, (tr.x, tr.y, tr.z),
                                             (q.x, q.y, q.z, q.w), stamp_to_ns(ts.header.stamp),
                                             static=conn.id in static_ids)
                    except ValueError:
                        self.stats.dropped["bad_transform"] += 1
            else:
                try:
                    infos.append((stamp_to_ns(msg.header.stamp), camera_info_to_intrinsics(msg)))
                except ValueError as exc:
                    bad_info = str(exc)
        if not infos:
            why = f": {bad_info}" if bad_info else " (no messages)"
            raise BagError(f"no usable CameraInfo on {self.topics.camera_info!r}{why}")
        infos.sort(key=lambda x: x[0])
        return buffer, infos

    def _intrinsics_at(self, stamp_ns: int) -> CameraIntrinsics:
        """The latest CameraInfo at or before ``stamp_ns``; the first one for earlier images."""
        best = self._infos[0][1]
        for s, intr in self._infos:
            if s > stamp_ns:
                break
            best = intr
        return best

    def check_connected(self, camera_frame: str) -> None:
        """Raise BagError when the TF tree never links ``world_frame`` and ``camera_frame``."""
        try:
            self.tf.lookup(self.world_frame, camera_frame, 0)
        except InvalidArgumentException as exc:  # e.g. "/camera": tf2 (and so the node) rejects it too
            raise BagError(f"camera frame {camera_frame!r} cannot be looked up in TF: {exc}; pass "
                           f"--camera-frame {camera_frame.lstrip('/')!r}") from exc
        except (LookupException, ConnectivityException) as exc:
            frames = self.tf.frame_names()
            roots = sorted({f for f in frames if self.tf.parent_of(f) is None})
            raise BagError(
                f"the TF tree never connects world frame {self.world_frame!r} and camera frame "
                f"{camera_frame!r}: {exc}\n  frames in /tf + /tf_static: {frames}\n  tree roots: {roots}"
            ) from exc
        except TransformException:
            pass  # connected; a stamp problem is counted per image

    def _paired(self) -> Iterator[tuple[object, object | None]]:
        """(image msg, depth msg or None) in bag order; depth joined by nearest header stamp."""
        is_image = {c.id for c in self._image_conns}
        pending: list[tuple[int, object]] = []  # images waiting for their depth, by log time
        depths: dict[int, tuple[int, object]] = {}  # header stamp -> (log time, depth msg)
        window_ns = max(self.depth_tolerance_ns, 1) * 25  # how long an image waits for depth

        def match(img):
            s = stamp_to_ns(img.header.stamp)
            near = min(depths, key=lambda d: abs(d - s), default=None)
            if near is not None and abs(near - s) <= self.depth_tolerance_ns:
                return depths.pop(near)[1]
            return None

        conns = self._image_conns + self._depth_conns
        for conn, log_ns, msg in _iter_messages(self.reader, conns, self.path):
            if not self._depth_conns:
                yield msg, None
                continue
            if conn.id in is_image:
                pending.append((log_ns, msg))
            else:
                depths[stamp_to_ns(msg.header.stamp)] = (log_ns, msg)
            while pending:
                depth = match(pending[0][1])
                if depth is None and log_ns - pending[0][0] < window_ns:
                    break
                yield pending.pop(0)[1], depth
            for s in [s for s, (lg, _) in depths.items() if log_ns - lg > 2 * window_ns]:
                del depths[s]
        for _, img in pending:
            yield img, match(img)

    def __iter__(self) -> Iterator[Frame]:
        checked: set[str] = set()
        for img, depth_msg in self._paired():
            self.stats.images += 1
            stamp = stamp_to_ns(img.header.stamp)
            cam = self.camera_frame or img.header.frame_id
            if not cam:
                self.stats.dropped["no_frame_id"] += 1
                continue
            if cam not in checked:
                self.check_connected(cam)
                checked.add(cam)
            try:
                T_world_cam = self.tf.lookup_matrix(self.world_frame, cam, stamp)
            except TransformException:
                self.stats.dropped["no_transform"] += 1
                continue
            try:
                if img.__msgtype__ == "sensor_msgs/msg/CompressedImage":
                    rgb = compressed_to_rgb(img)
                else:
                    rgb = image_to_rgb(img)
            except ValueError:
                self.stats.dropped["bad_encoding"] += 1
                continue
            depth_m = None
            if depth_msg is not None:
                try:
                    depth_m = depth_to_metres(depth_msg)
                except ValueError:
                    self.stats.dropped["bad_depth"] += 1
                if depth_m is not None and depth_m.shape != rgb.shape[:2]:
                    self.stats.dropped["depth_size_mismatch"] += 1
                    depth_m = None
            try:
                frame = Frame(rgb, self._intrinsics_at(stamp), T_world_cam, stamp, depth_m).validate()
            except ValueError:
                self.stats.dropped["invalid_frame"] += 1
                continue
            self.stats.frames += 1
            self.stats.with_depth += depth_m is not None
            yield frame


# Writing lives in its own module; re-exported so ``bag_io`` is the one place for bag I/O.
from .demo_bag import DemoBag, DemoBagConfig, write_demo_bag  # noqa: E402, F401
