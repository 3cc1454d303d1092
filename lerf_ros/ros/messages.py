"""Core results -> ROS messages (replies, status, the RViz cloud and markers), and back where tests and
tools need it.

Query replies (``lerf_ros/srv/Query``): ``query_result_code`` maps the engine's ``QueryResult`` to the
reply's ``result`` constant from the result's fields (never from its message text); ``fill_query_response``
and ``fill_refusal`` write a whole reply, so every path leaves every field well-defined (``location`` NaN
unless found, ``targets`` empty unless found, an empty cloud that still declares its fields).

PointCloud2 layout (the one Query.srv documents and RViz reads with no plugin): unorganised (height 1),
little-endian, fields x, y, z (metres, world frame), relevancy (0..1) and rgb, all FLOAT32 at offsets
0, 4, 8, 12, 16, point_step 20. ``rgb`` is 0x00RRGGBB in a uint32 reinterpreted as float32.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
from builtin_interfaces.msg import Time
from geometry_msgs.msg import Point, Vector3
from sensor_msgs.msg import PointCloud2, PointField
from std_msgs.msg import Header
from visualization_msgs.msg import Marker, MarkerArray

CLOUD_FIELDS = ("x", "y", "z", "relevancy", "rgb")
POINT_STEP = 4 * len(CLOUD_FIELDS)
_CLOUD_DTYPE = np.dtype({"names": list(CLOUD_FIELDS), "formats": ["<f4"] * 5,
                         "offsets": [0, 4, 8, 12, 16], "itemsize": POINT_STEP})

#: TrainingStatus.state values by name (same numbers as the .msg constants).
STATES = {"waiting": 0, "training": 1, "paused": 2, "ready": 3, "error": 4}
#: Query.Response.result values by name (same numbers as the .srv constants; 0 is never sent).
RESULTS = {"found": 1, "not_found": 2, "not_ready": 3, "invalid_request": 4, "error": 5}


def stamp_from_ns(stamp_ns: int) -> Time:
    return Time(sec=int(stamp_ns // 1_000_000_000), nanosec=int(stamp_ns % 1_000_000_000))


def stamp_to_ns(stamp: Time) -> int:
    return int(stamp.sec) * 1_000_000_000 + int(stamp.nanosec)


def pack_rgb(rgb: np.ndarray) -> np.ndarray:
    """(N, 3) uint8 -> (N,) float32 whose bits are 0x00RRGGBB."""
    rgb = np.asarray(rgb, dtype=np.uint32).reshape(-1, 3)
    packed = (rgb[:, 0] << 16) | (rgb[:, 1] << 8) | rgb[:, 2]
    return packed.astype("<u4").view("<f4")


def unpack_rgb(packed: np.ndarray) -> np.ndarray:
    """(N,) float32 0x00RRGGBB bits -> (N, 3) uint8."""
    bits = np.asarray(packed, dtype="<f4").view("<u4")
    return np.stack([(bits >> 16) & 0xFF, (bits >> 8) & 0xFF, bits & 0xFF], axis=1).astype(np.uint8)


def cloud_to_msg(xyz: np.ndarray, relevancy: np.ndarray, rgb: np.ndarray, header: Header) -> PointCloud2:
    """(N, 3) float32 world-frame metres, (N,) relevancy, (N, 3) uint8 -> PointCloud2 (height 1)."""
    xyz = np.asarray(xyz, dtype=np.float32).reshape(-1, 3)
    n = xyz.shape[0]
    relevancy = np.asarray(relevancy, dtype=np.float32).reshape(-1)
    rgb = np.asarray(rgb, dtype=np.uint8).reshape(-1, 3)
    if relevancy.shape[0] != n or rgb.shape[0] != n:
        raise ValueError(
            f"cloud arrays disagree: xyz {xyz.shape}, relevancy {relevancy.shape}, rgb {rgb.shape}")
    points = np.zeros(n, dtype=_CLOUD_DTYPE)
    points["x"], points["y"], points["z"] = xyz[:, 0], xyz[:, 1], xyz[:, 2]
    points["relevancy"] = relevancy
    points["rgb"] = pack_rgb(rgb)
    msg = PointCloud2()
    msg.header = header
    msg.height, msg.width = 1, n
    msg.fields = [PointField(name=name, offset=4 * i, datatype=PointField.FLOAT32, count=1)
                  for i, name in enumerate(CLOUD_FIELDS)]
    msg.is_bigendian = False
    msg.point_step = POINT_STEP
    msg.row_step = POINT_STEP * n
    msg.is_dense = bool(np.isfinite(xyz).all())
    msg.data = points.tobytes()
    return msg


def empty_cloud(header: Header) -> PointCloud2:
    return cloud_to_msg(np.zeros((0, 3)), np.zeros(0), np.zeros((0, 3)), header)


def msg_to_cloud(msg: PointCloud2) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Decode a PointCloud2 with FLOAT32 fields x, y, z, relevancy, rgb at any offsets / point_step.

    Returns xyz (N, 3) float32, relevancy (N,) float32, rgb (N, 3) uint8. Raises ValueError on a layout
    it cannot read (missing field, non-float32 field, data length not matching the header).
    """
    offsets = {}
    for field in msg.fields:
        offsets[field.name] = field
    for name in CLOUD_FIELDS:
        if name not in offsets:
            raise ValueError(f"PointCloud2 lacks field {name!r}; has {sorted(offsets)}")
        if offsets[name].datatype != PointField.FLOAT32:
            raise ValueError(
                f"PointCloud2 field {name!r} has datatype {offsets[name].datatype}, need FLOAT32")
    n = int(msg.width) * int(msg.height)
    if int(msg.row_step) * int(msg.height) != len(msg.data) or int(msg.point_step) * int(msg.width) > int(
            msg.row_step):
        raise ValueError(f"PointCloud2 data is {len(msg.data)} bytes, header says {msg.height} rows x "
                         f"{msg.row_step} bytes with point_step {msg.point_step} x width {msg.width}")
    endian = ">" if msg.is_bigendian else "<"
    dtype = np.dtype({"names": list(CLOUD_FIELDS), "formats": [endian + "f4"] * 5,
                      "offsets": [offsets[name].offset for name in CLOUD_FIELDS],
                      "itemsize": int(msg.point_step)})
    raw = np.frombuffer(bytes(msg.data), dtype=np.uint8).reshape(int(msg.height), int(msg.row_step))
    rows = raw[:, : int(msg.point_step) * int(msg.width)].copy()
    points = rows.view(dtype).reshape(n)
    xyz = np.stack([points["x"], points["y"], points["z"]], axis=1).astype(np.float32)
    rgb_bits = points["rgb"].astype("<f4")
    return xyz, points["relevancy"].astype(np.float32), unpack_rgb(rgb_bits)


#: Namespace of the answer markers (sphere + label per target).
MARKER_NS = "lerf_target"


def answer_markers(text: str, targets, header: Header) -> MarkerArray:
    """One answer for RViz: a DELETEALL (clears the previous answer's markers), then per target (best
    first; ``lerf_ros/msg/Target`` messages, none when nothing was found) a sphere (id 2 i) at its location
    and a text label (id 2 i + 1) above it, all in namespace ``MARKER_NS`` and ``header``'s frame.

    Sphere diameter = the target's language scale clamped to 5 cm .. 1 m, so a large object's target looks
    large; the best target is opaque green, the others paler.
    """
    clear = Marker(header=header, ns=MARKER_NS, id=0, action=Marker.DELETEALL)
    markers = [clear]
    for i, target in enumerate(targets):
        p = target.location
        scale = float(target.scale)
        diameter = float(np.clip(scale if math.isfinite(scale) else 0.1, 0.05, 1.0))
        sphere = Marker(header=header, ns=MARKER_NS, id=2 * i, type=Marker.SPHERE, action=Marker.ADD)
        sphere.pose.position = Point(x=float(p.x), y=float(p.y), z=float(p.z))
        sphere.pose.orientation.w = 1.0
        sphere.scale.x = sphere.scale.y = sphere.scale.z = diameter
        sphere.color.r, sphere.color.g, sphere.color.b, sphere.color.a = (
            (0.1, 0.9, 0.2, 0.7) if i == 0 else (0.5, 0.9, 0.6, 0.4))
        label = Marker(header=header, ns=MARKER_NS, id=2 * i + 1, type=Marker.TEXT_VIEW_FACING,
                       action=Marker.ADD)
        label.pose.position = Point(x=float(p.x), y=float(p.y), z=float(p.z) + diameter / 2 + 0.1)
        label.pose.orientation.w = 1.0
        label.scale.z = 0.1
        label.color.r = label.color.g = label.color.b = label.color.a = 1.0
        rank = "" if i == 0 else f" #{i + 1}"
        label.text = f"{text[:60]}{rank} ({float(target.relevancy):.2f})"
        markers += [sphere, label]
    return MarkerArray(markers=markers)


def query_result_code(result) -> int:
    """``RESULTS`` value of an engine ``QueryResult`` (``core.language.query``): found, not found, not ready.

    Not ready is the engine's "no model yet" answer, told apart by its fields: every answer that scored the
    map comes either from the trained field (``source == "field"``, which needs ``model_step`` > 0) or from
    the keyframes' own crop embeddings (``source == "views"``); so ``source == "field"`` at step 0 is the
    early return before any scoring.
    """
    if result.found:
        return RESULTS["found"]
    if result.source == "field" and int(result.model_step) == 0:
        return RESULTS["not_ready"]
    return RESULTS["not_found"]


def _point(xyz) -> Point:
    x, y, z = (float(v) for v in np.asarray(xyz, dtype=np.float64).reshape(3))
    return Point(x=x, y=y, z=z)


def target_to_msg(target):
    """Core ``Target`` (world frame, metres) -> ``lerf_ros/msg/Target``."""
    from lerf_ros.msg import Target

    box_min = np.asarray(target.box_min, dtype=np.float64).reshape(3)
    extent = np.asarray(target.box_max, dtype=np.float64).reshape(3) - box_min
    msg = Target()
    msg.location = _point(target.location_world)
    msg.box_center = _point(box_min + extent / 2.0)
    msg.extent = Vector3(x=float(extent[0]), y=float(extent[1]), z=float(extent[2]))
    msg.relevancy = float(target.relevancy)
    msg.confidence = float(target.confidence)
    msg.point_count = int(target.point_count)
    msg.scale = float(target.scale_m)
    msg.view_support = float(target.view_support)
    msg.competitor = str(target.competitor)
    return msg


def _no_location(response, header: Header) -> None:
    response.location.header = header
    response.location.point = Point(x=math.nan, y=math.nan, z=math.nan)


def fill_refusal(response, header: Header, code: int, message: str):
    """A reply that answers nothing (invalid request, not ready, error): found false, NaN location, no
    targets, zero scores, model_step 0, an empty cloud in ``header``'s frame."""
    if code not in (RESULTS["not_ready"], RESULTS["invalid_request"], RESULTS["error"]):
        raise ValueError(f"a refusal needs a not_ready, invalid_request or error code, got {code}")
    response.result = code
    response.found = False
    response.message = message
    _no_location(response, header)
    response.targets = []
    response.relevancy = response.confidence = response.scale = 0.0
    response.model_step = 0
    response.cloud = empty_cloud(header)
    return response


def fill_query_response(response, result, header: Header):
    """Write an engine ``QueryResult`` into a Query reply (``header``: world frame, time of the answer)."""
    response.result = query_result_code(result)
    response.found = response.result == RESULTS["found"]
    response.message = str(result.message)
    if response.found:
        response.location.header = header
        response.location.point = _point(result.location_world)
        response.targets = [target_to_msg(t) for t in result.targets]
    else:
        _no_location(response, header)
        response.targets = []
    response.relevancy = float(result.relevancy)
    response.confidence = float(result.confidence)
    response.scale = float(result.scale_m)
    response.model_step = int(result.model_step)
    response.cloud = cloud_to_msg(result.cloud_xyz, result.cloud_relevancy, result.cloud_rgb, header)
    return response


def training_status_msg(status, state_name: str, header: Header, frames_received: int,
                        drops: Mapping[str, int], last_error: str = "", frames_without_depth: int = 0,
                        not_keyframe: Mapping[str, int] | None = None, cameras: Sequence = (),
                        tf=None):
    """Engine status + node counters -> ``lerf_ros/msg/TrainingStatus``.

    ``status`` is the core's ``EngineStatus`` (step, keyframes, keyframes_pending, losses: name -> value,
    rays_per_s, gpu_mem_allocated_mb, gpu_mem_peak_mb, last_error, convergence: `ConvergenceSignals`,
    nonfinite_steps, oom_events, rays_per_step, journal_bytes, journal_skipped). ``drops`` maps a drop
    reason to its count (``frames_dropped`` is their sum); ``frames_without_depth`` counts frames
    ingested without a matching depth image (not drops); ``not_keyframe`` maps a keyframe selector reason
    ("redundant", "blurred") to the frames it did not keep (``frames_not_keyframe`` is their sum; not drops
    either); ``last_error`` (the node's, e.g. a
    frame-handling error) is used when the engine's is empty; ``cameras``: per camera
    (``ros/cameras.CameraReport``: name, frames received / dropped, keyframes, state) -> the camera_* arrays;
    ``tf``: the TF stream's ``compat.tf.TfHealth`` (since the start or the last reset) -> the tf_* fields
    (None: tf_listener "" and zeros, e.g. no listener yet).
    """
    from lerf_ros.msg import TrainingStatus

    if state_name not in STATES:
        raise ValueError(f"unknown training state {state_name!r}; known: {sorted(STATES)}")
    msg = TrainingStatus()
    msg.header = header
    msg.state = STATES[state_name]
    msg.state_name = state_name
    msg.step = int(status.step)
    msg.keyframes = int(status.keyframes)
    msg.keyframes_pending = int(status.keyframes_pending)
    msg.frames_received = int(frames_received)
    reasons = sorted(drops)
    msg.drop_reasons = reasons
    msg.drop_counts = [int(drops[r]) for r in reasons]
    msg.frames_dropped = int(sum(msg.drop_counts))
    msg.frames_without_depth = int(frames_without_depth)
    not_kept = dict(not_keyframe or {})
    msg.not_keyframe_reasons = sorted(not_kept)
    msg.not_keyframe_counts = [int(not_kept[r]) for r in msg.not_keyframe_reasons]
    msg.frames_not_keyframe = int(sum(msg.not_keyframe_counts))
    losses = dict(status.losses)
    msg.loss_names = list(losses)
    msg.loss_values = [float(v) for v in losses.values()]
    msg.rays_per_second = float(status.rays_per_s)
    msg.gpu_memory_allocated_mb = float(status.gpu_mem_allocated_mb)
    msg.gpu_memory_peak_mb = float(status.gpu_mem_peak_mb)
    msg.last_error = str(status.last_error or last_error or "")
    msg.clip_encoder = str(getattr(status, "clip_encoder", ""))
    msg.dino_encoder = str(getattr(status, "dino_encoder", ""))
    msg.demo_encoders = bool(getattr(status, "demo_encoders", False))
    msg.scene_box_source = str(getattr(status, "scene_box_source", ""))
    conv = status.convergence
    msg.usable = bool(conv.usable)
    msg.progress = float(conv.progress)
    msg.convergence = str(conv.note)
    msg.heldout_psnr_db = float(conv.psnr_db)
    msg.heldout_r2 = float(conv.r2)
    msg.depth_disagreement = float(conv.depth_disagreement)
    msg.language_loss_slope = float(conv.language_slope)
    msg.convergence_step = max(int(conv.step), 0)
    msg.nonfinite_steps = int(status.nonfinite_steps)
    msg.oom_events = int(getattr(status, "oom_events", 0))
    msg.rays_per_step = int(getattr(status, "rays_per_step", 0))
    msg.journal_bytes = int(getattr(status, "journal_bytes", 0))
    msg.journal_skipped = int(getattr(status, "journal_skipped", 0))
    if tf is not None:
        msg.tf_listener = str(tf.listener)
        msg.tf_rejected, msg.tf_loops = int(tf.rejected), int(tf.loops)
        msg.tf_jumps_back, msg.tf_parent_changes = int(tf.jumps_back), int(tf.parent_changes)
    cams = list(cameras or ())
    msg.camera_names = [str(c.name) for c in cams]
    msg.camera_frames_received = [int(c.frames_received) for c in cams]
    msg.camera_frames_dropped = [int(c.frames_dropped) for c in cams]
    msg.camera_keyframes = [int(c.keyframes) for c in cams]
    msg.camera_states = [str(c.state) for c in cams]
    return msg


def _unplaced_target(answer):
    """A ``Target`` for an answer that placed nothing: its scores, NaN geometry, no points."""
    from lerf_ros.msg import Target

    nan = math.nan
    msg = Target(relevancy=float(answer.relevancy), confidence=float(answer.confidence),
                 scale=float(answer.scale), point_count=0, view_support=nan)
    msg.location = Point(x=nan, y=nan, z=nan)
    msg.box_center = Point(x=nan, y=nan, z=nan)
    msg.extent = Vector3(x=nan, y=nan, z=nan)
    return msg


def locate_feedback(best, last, attempts: int, elapsed_s: float):
    """``lerf_ros/action/Locate`` feedback from the goal's best and latest Query replies (``ros/locate.py``'s
    ``Progress``): the best one's first target (or, not found, its scores with NaN geometry)."""
    from lerf_ros.action import Locate

    msg = Locate.Feedback()
    msg.found = bool(best.found and len(best.targets) > 0)
    msg.best_target = best.targets[0] if msg.found else _unplaced_target(best)
    msg.confidence = float(msg.best_target.confidence)
    msg.best_location.header = best.location.header
    msg.best_location.point = msg.best_target.location
    msg.model_step = int(last.model_step)
    msg.last_result = int(last.result)
    msg.attempts = int(attempts)
    msg.elapsed_s = float(elapsed_s)
    msg.message = str(last.message)
    return msg


def fill_locate_result(result, answer, attempts: int, message: str, header: Header):
    """A ``Locate.Result`` from the Query reply the goal ended on (``answer``; None when no query was asked:
    RESULT_NOT_READY, nothing located, ``header``'s frame)."""
    result.attempts = int(attempts)
    result.message = str(message)
    if answer is None:
        result.result = RESULTS["not_ready"]
        result.found = False
        _no_location(result, header)
        result.targets = []
        result.relevancy = result.confidence = result.scale = 0.0
        result.model_step = 0
        return result
    result.result = int(answer.result)
    result.found = bool(answer.found)
    result.location = answer.location
    result.targets = list(answer.targets)
    result.relevancy = float(answer.relevancy)
    result.confidence = float(answer.confidence)
    result.scale = float(answer.scale)
    result.model_step = int(answer.model_step)
    return result
