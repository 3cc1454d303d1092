"""Write a simulated room as a realistic rosbag2 (mcap or sqlite3) with ``rosbags``: the demo room along
its loop (``write_demo_bag``), a random room along a drive through it (``write_random_room_bag``), or
any room + ``Recording`` (``write_recording_bag``).

Topics, like an RGB-D robot recording:
  /camera/color/image_raw        sensor_msgs/Image rgb8, ``image_rate_hz`` (5 Hz), sensor-data QoS
  /camera/color/camera_info      sensor_msgs/CameraInfo plumb_bob (zero D), one per image
  /camera/depth/image_rect_raw   sensor_msgs/Image 16UC1 millimetres, registered to colour (optional)
  /tf                            map->odom (10 Hz, localisation) and odom->base_link (40 Hz, odometry),
                                 stamps not aligned with the images
  /tf_static                     base_link->camera_link->camera_color_optical_frame, transient-local
(the random rooms' tree and rates are described in ``lerf_ros.sim.drive``)

Each image is rendered at the camera pose that tf2 interpolation yields at its stamp (map ->
camera_color_optical_frame through the recorded TF), so a reader that follows ROS semantics
recovers exactly the rendered pose.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..core.frames.camera import CameraIntrinsics
from ..core.frames.transforms import matrix_to_quat
from ..sim.recording import Recording, TfSeries
from ..sim.scene import SyntheticRoom, camera_rig, default_intrinsics, orbit_trajectory, robot_path

STORAGES = ("mcap", "sqlite3")
DEMO_TOPICS = {
    "image": "/camera/color/image_raw",
    "camera_info": "/camera/color/camera_info",
    "depth": "/camera/depth/image_rect_raw",
    "tf": "/tf",
    "tf_static": "/tf_static",
}


@dataclass(frozen=True)
class DemoBagConfig:
    """frames: colour images; rates in Hz; image size in pixels; start_time_s: epoch of the first image."""

    frames: int = 60
    storage: str = "mcap"
    image_rate_hz: float = 5.0
    odom_rate_hz: float = 40.0
    map_rate_hz: float = 10.0
    with_depth: bool = True
    depth_after_image: bool = False  # log depth 3 ms after the colour image instead of 3 ms before
    compressed: str = ""  # "" = raw rgb8 Image; "jpeg" / "png" = CompressedImage on <image topic>/compressed
    width: int = 96
    height: int = 72
    hfov_deg: float = 75.0
    seed: int = 0
    localisation: bool = True  # False: no map->odom, like a recording made without localisation running
    start_time_s: float = 1_700_000_000.0

    def validate(self) -> DemoBagConfig:
        if self.frames < 2:
            raise ValueError(f"frames must be >= 2, got {self.frames}")
        if self.compressed not in ("", "jpeg", "png"):
            raise ValueError(f"compressed must be '', 'jpeg' or 'png', got {self.compressed!r}")
        if self.storage not in STORAGES:
            raise ValueError(f"storage must be one of {STORAGES}, got {self.storage!r}")
        for name in ("image_rate_hz", "odom_rate_hz", "map_rate_hz"):
            value = getattr(self, name)
            if not np.isfinite(value) or value <= 0:
                raise ValueError(f"{name} must be > 0 Hz, got {value}")
        return self


@dataclass(frozen=True)
class DemoBag:
    """What was written: path, per-topic counts, image stamps (N,) ns and ground-truth poses (N, 4, 4)."""

    path: Path
    counts: dict[str, int]
    stamps_ns: np.ndarray
    T_world_cam: np.ndarray
    intrinsics: CameraIntrinsics
    room: object  # SyntheticRoom or a random Room: render(), objects, absent_names


def _qos(reliable: bool, transient_local: bool, depth: int):
    from rosbags.interfaces import Qos, QosDurability, QosHistory, QosLiveliness, QosReliability, QosTime

    zero = QosTime(0, 0)
    return Qos(QosHistory.KEEP_LAST, depth,
               QosReliability.RELIABLE if reliable else QosReliability.BEST_EFFORT,
               QosDurability.TRANSIENT_LOCAL if transient_local else QosDurability.VOLATILE,
               zero, zero, QosLiveliness.AUTOMATIC, zero, False)


class _Msgs:
    """Builders of rosbags message objects (Jazzy types)."""

    def __init__(self):
        from rosbags.typesys import Stores, get_typestore

        self.store = get_typestore(Stores.ROS2_JAZZY)
        self.t = self.store.types

    def header(self, stamp_ns: int, frame_id: str):
        sec, nanosec = divmod(int(stamp_ns), 1_000_000_000)
        time = self.t["builtin_interfaces/msg/Time"](sec=sec, nanosec=nanosec)
        return self.t["std_msgs/msg/Header"](stamp=time, frame_id=frame_id)

    def transform(self, stamp_ns: int, parent: str, child: str, T: np.ndarray):
        q = matrix_to_quat(T[:3, :3])
        tf = self.t["geometry_msgs/msg/Transform"](
            translation=self.t["geometry_msgs/msg/Vector3"](x=float(T[0, 3]), y=float(T[1, 3]),
                                                            z=float(T[2, 3])),
            rotation=self.t["geometry_msgs/msg/Quaternion"](x=float(q[0]), y=float(q[1]), z=float(q[2]),
                                                            w=float(q[3])),
        )
        return self.t["geometry_msgs/msg/TransformStamped"](header=self.header(stamp_ns, parent),
                                                             child_frame_id=child, transform=tf)

    def tf(self, transforms):
        return self.t["tf2_msgs/msg/TFMessage"](transforms=list(transforms))

    def image(self, stamp_ns: int, frame_id: str, data: np.ndarray, encoding: str):
        h, w = data.shape[:2]
        step = data.strides[0] if data.ndim >= 2 else w
        return self.t["sensor_msgs/msg/Image"](
            header=self.header(stamp_ns, frame_id), height=h, width=w, encoding=encoding,
            is_bigendian=0, step=int(step), data=np.ascontiguousarray(data).reshape(-1).view(np.uint8),
        )

    def compressed_image(self, stamp_ns: int, frame_id: str, rgb: np.ndarray, fmt: str):
        import io

        from PIL import Image as PILImage

        buf = io.BytesIO()
        # image_transport's format string; the stream itself is a standard colour JPEG / PNG.
        PILImage.fromarray(rgb).save(buf, format=fmt.upper(), **({"quality": 90} if fmt == "jpeg" else {}))
        return self.t["sensor_msgs/msg/CompressedImage"](
            header=self.header(stamp_ns, frame_id), format=f"rgb8; {fmt} compressed bgr8",
            data=np.frombuffer(buf.getvalue(), dtype=np.uint8),
        )

    def camera_info(self, stamp_ns: int, frame_id: str, intr: CameraIntrinsics):
        k = np.array([intr.fx, 0, intr.cx, 0, intr.fy, intr.cy, 0, 0, 1], dtype=np.float64)
        p = np.array([intr.fx, 0, intr.cx, 0, 0, intr.fy, intr.cy, 0, 0, 0, 1, 0], dtype=np.float64)
        roi = self.t["sensor_msgs/msg/RegionOfInterest"](x_offset=0, y_offset=0, height=0, width=0,
                                                          do_rectify=False)
        return self.t["sensor_msgs/msg/CameraInfo"](
            header=self.header(stamp_ns, frame_id), height=intr.height, width=intr.width,
            distortion_model="plumb_bob", d=np.zeros(5), k=k, r=np.eye(3).reshape(-1), p=p,
            binning_x=0, binning_y=0, roi=roi,
        )


def demo_recording(room: SyntheticRoom, config: DemoBagConfig = DemoBagConfig()) -> Recording:
    """The demo room's recording: one loop around the room centre (``orbit_trajectory``), images at
    ``image_rate_hz`` with a few ms of capture jitter, odometry and localisation at their own stamps."""
    config.validate()
    intr = default_intrinsics(config.width, config.height, config.hfov_deg)
    rig = camera_rig()
    rng = np.random.default_rng([config.seed, 17])

    t0 = round(config.start_time_s * 1e9)
    image_dt = round(1e9 / config.image_rate_hz)
    # Image stamps with a few ms of capture jitter, so they never coincide with TF stamps.
    stamps = t0 + np.arange(config.frames, dtype=np.int64) * image_dt + rng.integers(-3_000_000, 3_000_000,
                                                                                      config.frames)
    # Odometry spans the images with a margin; one loop of the room over the whole recording.
    odom_dt = round(1e9 / config.odom_rate_hz)
    tf_start = int(stamps[0]) - 200_000_000 + 3_700_000
    n_odom = int((int(stamps[-1]) + 200_000_000 - tf_start) // odom_dt) + 1
    odom_stamps = tf_start + np.arange(n_odom, dtype=np.int64) * odom_dt
    path = robot_path(orbit_trajectory(room, n_odom, seed=config.seed), rig)
    map_every = max(1, round(config.odom_rate_hz / config.map_rate_hz))
    map_idx = list(range(0, n_odom, map_every))
    if map_idx[-1] != n_odom - 1:
        map_idx.append(n_odom - 1)  # localisation must cover the last image too
    start = np.array([tf_start], dtype=np.int64)
    tf = [
        TfSeries(rig.base_frame, rig.link_frame, start, rig.T_base_link[None], static=True),
        TfSeries(rig.link_frame, rig.optical_frame, start, rig.T_link_optical[None], static=True),
        TfSeries("odom", rig.base_frame, odom_stamps, path.T_odom_base, log_delay_ns=1_000_000),
    ]
    if config.localisation:
        # Localisation stamps differ from odometry's.
        tf.append(TfSeries("map", "odom", odom_stamps[map_idx] + 1_300_000, path.T_map_odom[map_idx],
                           log_delay_ns=2_000_000))
    else:
        # Without localisation the images are rendered at the true pose, which no reader can recover.
        tf.append(TfSeries("map", "odom", start, path.T_map_odom[:1], static=True, published=False))
    return Recording(stamps, intr, tuple(tf), "map", rig.optical_frame)


def write_demo_bag(
    out_dir, room: SyntheticRoom | None = None, config: DemoBagConfig = DemoBagConfig()
) -> DemoBag:
    """Render ``room`` along a loop and write it as a rosbag2 directory ``out_dir`` (must not exist).

    Returns the written bag's description with the ground-truth camera poses at the image stamps.
    Raises ValueError for a bad config or an existing ``out_dir``.
    """
    config.validate()
    room = room if room is not None else SyntheticRoom(config.seed)
    if Path(out_dir).exists():
        raise ValueError(f"output bag {out_dir} exists already; choose a new path")
    return write_recording_bag(out_dir, room, demo_recording(room, config), storage=config.storage,
                               with_depth=config.with_depth, compressed=config.compressed,
                               depth_after_image=config.depth_after_image)


def write_recording_bag(out_dir, room, recording: Recording, storage: str = "mcap", with_depth: bool = True,
                        compressed: str = "", depth_after_image: bool = False) -> DemoBag:
    """Render ``room`` (anything with ``render(T_world_cam, intr)``) at the camera poses of ``recording``
    and write the recording as a rosbag2 directory ``out_dir`` (must not exist).

    Topics are ``DEMO_TOPICS``: published TF series on /tf (one message per sample, logged
    ``log_delay_ns`` after its stamp) and /tf_static (one message), per image the colour image
    (raw rgb8 or ``compressed`` "jpeg" / "png"), its CameraInfo and, ``with_depth``, 16UC1 depth in
    millimetres logged 3 ms before the image (``depth_after_image``: 3 ms after). Each image is
    rendered at the pose tf2 interpolation yields at its stamp (``Recording.camera_poses``).
    Raises ValueError for a bad option, a bad series or an existing ``out_dir``.
    """
    from rosbags.rosbag2 import StoragePlugin, Writer, WriterError

    if compressed not in ("", "jpeg", "png"):
        raise ValueError(f"compressed must be '', 'jpeg' or 'png', got {compressed!r}")
    if storage not in STORAGES:
        raise ValueError(f"storage must be one of {STORAGES}, got {storage!r}")
    out = Path(out_dir)
    if out.exists():
        raise ValueError(f"output bag {out} exists already; choose a new path")
    intr = recording.intrinsics
    m = _Msgs()
    poses = recording.camera_poses()

    records: list[tuple[int, str, object]] = []  # (log time ns, topic, message)
    statics = [s for s in recording.tf if s.static and s.published]
    if statics:
        first = min(int(s.stamps_ns[0]) for s in statics)
        records.append((first, "tf_static", m.tf([m.transform(int(s.stamps_ns[0]), s.parent, s.child, s.T[0])
                                                  for s in statics])))
    for series in recording.tf:
        if series.static or not series.published:
            continue
        for stamp, T in zip(series.stamps_ns, series.T, strict=True):
            msg = m.tf([m.transform(int(stamp), series.parent, series.child, T)])
            records.append((int(stamp) + series.log_delay_ns, "tf", msg))

    frame_id = recording.camera_frame
    for s, T in zip(recording.image_stamps_ns, poses, strict=True):
        s = int(s)
        rgb, depth_m = room.render(T, intr)
        img_msg = (m.compressed_image(s, frame_id, rgb, compressed) if compressed
                   else m.image(s, frame_id, rgb, "rgb8"))
        records.append((s + 15_000_000, "image", img_msg))
        records.append((s + 15_500_000, "camera_info", m.camera_info(s, frame_id, intr)))
        if with_depth:
            valid = np.isfinite(depth_m) & (depth_m > 0)
            mm = np.clip(np.round(np.nan_to_num(depth_m) * 1000.0), 0, 65535)
            mm = np.where(valid, mm, 0).astype("<u2")  # 0 = no return, as RealSense publishes
            # Depth is logged just before the colour image (both carry the capture stamp), so a subscriber
            # that pairs by stamp on the image's arrival finds it.
            depth_log = s + (18_000_000 if depth_after_image else 12_000_000)
            records.append((depth_log, "depth", m.image(s, frame_id, mm, "16UC1")))

    image_type = "sensor_msgs/msg/CompressedImage" if compressed else "sensor_msgs/msg/Image"
    types = {"image": image_type, "camera_info": "sensor_msgs/msg/CameraInfo",
             "depth": "sensor_msgs/msg/Image", "tf": "tf2_msgs/msg/TFMessage",
             "tf_static": "tf2_msgs/msg/TFMessage"}
    qos = {"image": _qos(False, False, 5), "depth": _qos(False, False, 5),
           "camera_info": _qos(True, False, 10), "tf": _qos(True, False, 100),
           "tf_static": _qos(True, True, 1)}
    topics = dict(DEMO_TOPICS)
    if compressed:
        topics["image"] += "/compressed"
    plugin = StoragePlugin.MCAP if storage == "mcap" else StoragePlugin.SQLITE3
    counts = dict.fromkeys((r[1] for r in records), 0)
    try:
        with Writer(out, version=9, storage_plugin=plugin) as writer:
            conns = {role: writer.add_connection(topics[role], types[role], typestore=m.store,
                                                 offered_qos_profiles=[qos[role]]) for role in counts}
            for log_ns, role, msg in sorted(records, key=lambda r: r[0]):
                writer.write(conns[role], log_ns, m.store.serialize_cdr(msg, types[role]))
                counts[role] += 1
    except WriterError as exc:
        raise ValueError(f"cannot write bag {out}: {exc}") from exc
    return DemoBag(out, {topics[k]: v for k, v in counts.items()}, np.asarray(recording.image_stamps_ns),
                   poses, intr, room)


def write_random_room_bag(out_dir, seed: int, with_depth: bool = True, storage: str = "mcap",
                          compressed: str = "", drive_config=None) -> DemoBag:
    """Draw ``random_room(seed)`` and a drive through it (``drive_through``) and write it as a rosbag2
    (the TF tree map -> odom -> base_link -> camera_pan_link -> camera_link -> optical frame)."""
    from ..sim.drive import DriveConfig, drive_through
    from ..sim.rooms import random_room

    if Path(out_dir).exists():
        raise ValueError(f"output bag {out_dir} exists already; choose a new path")
    room = random_room(seed)
    drive = drive_through(room, config=drive_config or DriveConfig())
    return write_recording_bag(out_dir, room, drive.recording, storage=storage, with_depth=with_depth,
                               compressed=compressed)
