"""The nodes' parameters, declared once: name, type, default, description, bounds.

``PARAMETERS`` is the single table. ``declare_and_resolve`` turns it into ``ParameterDescriptor``s on a
node; ``resolve`` maps plain values (from a node, a YAML file or a test) onto the core's frozen configs
with ``dataclasses.replace`` on the chosen preset. Everything except ``descriptor`` /
``declare_and_resolve`` is ROS-free, so the mapping is tested without ``rclpy.init()``.

Numeric defaults marked ``PRESET`` come from the chosen preset (``make_preset(preset)``): the node declares
``preset`` first, then the rest with the preset's values as their defaults, so ``ros2 param describe``
shows the value actually in use.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lerf_ros.core.presets import make_preset

#: Marks a default taken from the preset's config (see the module docstring).
PRESET = object()

TRAINER = "trainer"
QUERY = "query"
BOTH = frozenset({TRAINER, QUERY})

#: Node names; the YAML keys them (or ``/**`` for both) and tests address them.
TRAINER_NODE_NAME = "lerf_trainer"
QUERY_NODE_NAME = "lerf_query"


class ParameterError(ValueError):
    """A parameter value that stops start-up; the message names the parameter."""

    def __init__(self, name: str, value: Any, reason: str):
        super().__init__(f"parameter '{name}' = {value!r}: {reason}")
        self.name = name
        self.value = value


@dataclass(frozen=True)
class ParamSpec:
    """One parameter: ``default`` fixes the type (bool, int, float or str) unless it is ``PRESET``."""

    name: str
    type: type
    default: Any
    description: str
    nodes: frozenset = BOTH
    range: tuple[float, float] | None = None  # inclusive
    choices: tuple[str, ...] = ()
    read_only: bool = True
    preset_field: str | None = None  # "section.field" in EngineConfig for PRESET defaults
    item_type: type = float  # element type of a ``list`` parameter: float ([x, y, z]) or str (names)


_ENCODER_RE = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")
_FRAME_RE = re.compile(r"^[A-Za-z0-9_/.\-]+$")
#: A ROS name (relative, or absolute with a leading '/'): tokens of letters, digits and '_' that do not start
#: with a digit, separated by single '/', no trailing '/' (ROS 2's topic name rules, without '~' and '{}').
_ROS_NAME_RE = re.compile(r"^/?[A-Za-z_][A-Za-z0-9_]*(/[A-Za-z_][A-Za-z0-9_]*)*$")
#: Most cameras one trainer subscribes to (each costs an image, CameraInfo and depth subscription).
MAX_CAMERAS = 16

PARAMETERS: tuple[ParamSpec, ...] = (
    # The default is the robot's configuration: OpenCLIP + DINO, which need their weights on this machine
    # (start-up fails naming the paths searched). Only tests and the CPU demo ask for 'tiny' (demo encoders).
    ParamSpec("preset", str, "default",
              "Core config preset: default (GPU, OpenCLIP ViT-B/16 + DINO ViT-S/16; needs their weights), "
              "lite (smaller GPU grids, same encoders), tiny (CPU tests and the demo: colour-name demo "
              "encoders, not language).",
              choices=("tiny", "lite", "default")),
    ParamSpec("device", str, "auto", "Torch device: auto picks cuda when torch.cuda.is_available().",
              choices=("auto", "cuda", "cpu")),
    ParamSpec("autostart", bool, True,
              "Lifecycle: true = the node configures and activates itself at start-up; false = it stays "
              "unconfigured until a lifecycle manager (nav2 lifecycle_manager, ros2 lifecycle set) "
              "changes its state."),
    ParamSpec("world_frame", str, "map",
              "Fixed frame of poses, the map, the cloud and the markers (a loaded map answers in the frame "
              "it recorded)."),
    # Relative names: a pushed namespace (launch argument `namespace`) moves them with the node's own.
    ParamSpec("image_topic", str, "camera/color/image_raw",
              "RGB image topic (base name; '/compressed' is appended for image_transport=compressed).",
              nodes=frozenset({TRAINER})),
    ParamSpec("camera_info_topic", str, "camera/color/camera_info", "CameraInfo of the RGB image.",
              nodes=frozenset({TRAINER})),
    ParamSpec("image_transport", str, "raw", "raw: sensor_msgs/Image; compressed: CompressedImage.",
              nodes=frozenset({TRAINER}), choices=("raw", "compressed")),
    ParamSpec("depth_topic", str, "", "Registered depth image (same stamps as the RGB); '' = no depth.",
              nodes=frozenset({TRAINER})),
    ParamSpec("cameras", list, None,
              "Camera namespaces, e.g. [head_camera, wrist_camera], all trained into one map, each with its "
              "own image size and intrinsics: each namespace NS gives NS/color/image_raw (+ '/compressed' "
              "for image_transport=compressed), NS/color/camera_info and, used once it publishes, the "
              "registered depth NS/aligned_depth_to_color/image_raw; unset = the one camera of "
              "image_topic, camera_info_topic and depth_topic.",
              nodes=frozenset({TRAINER}), item_type=str),
    ParamSpec("depth_wait_s", float, 0.1,
              "How long the ingest thread waits for the depth image of a colour frame's stamp, s; after "
              "it the frame is used without depth and counted in TrainingStatus.frames_without_depth "
              "(not a drop).",
              nodes=frozenset({TRAINER}), range=(0.0, 2.0)),
    ParamSpec("depth_stamp_tolerance_s", float, 0.02,
              "Largest |depth stamp - colour stamp| that still pairs them, s (registered depth: same stamp).",
              nodes=frozenset({TRAINER}), range=(0.0, 1.0)),
    ParamSpec("tf_timeout_s", float, 0.2, "How long the ingest thread waits for T_world_cam at a stamp, s.",
              nodes=frozenset({TRAINER}), range=(0.0, 10.0)),
    ParamSpec("queue_size", int, 8, "Bounded ingest queue; when full the oldest frame is dropped.",
              nodes=frozenset({TRAINER}), range=(1, 1000)),
    ParamSpec("max_frame_rate_hz", float, 10.0,
              "Images are converted at most this often (by header stamp); the rest are skipped before "
              "conversion and counted as 'skipped_rate' (not drops). 0 = every image.",
              nodes=frozenset({TRAINER}), range=(0.0, 1000.0)),
    ParamSpec("skip_static_frames", bool, True,
              "Skip an image before conversion when TF's camera pose at its stamp (if TF already has it) "
              "moved less than half the keyframe thresholds since the last image taken ('skipped_static', "
              "not a drop).",
              nodes=frozenset({TRAINER})),
    ParamSpec("torch_threads", int, 0,
              "CPU threads for torch (training, queries); 0 = one less than the CPU cores (at least 1) "
              "where a trainer runs, so the executor and the ingest thread keep a core, and all cores for "
              "the query node alone on a map (nothing trains there); with 0, a positive OMP_NUM_THREADS in "
              "the environment caps that choice.",
              nodes=BOTH, range=(0, 1024)),
    ParamSpec("min_keyframes", int, PRESET, "Keyframes (with language targets) before training starts.",
              nodes=frozenset({TRAINER}), range=(1, 10000), preset_field="ingest.min_keyframes"),
    ParamSpec("max_image_side", int, PRESET, "Keyframes larger than this (px) are downsized; 0 = off.",
              nodes=frozenset({TRAINER}), range=(0, 16384), preset_field="ingest.max_image_side"),
    ParamSpec("max_steps", int, 0, "Training step budget; after it the trainer reports 'ready' (0 = none).",
              nodes=frozenset({TRAINER}), range=(0, 1_000_000_000)),
    ParamSpec("steps_per_tick", int, 10, "Training steps per worker tick (pause / stop checked between).",
              nodes=frozenset({TRAINER}), range=(1, 10000)),
    ParamSpec("max_keyframes", int, PRESET,
              "Memory bound of the keyframe store; when full, the most redundant keyframe (pose closest to "
              "another keyframe's) is evicted, not the oldest, and never the newest.",
              nodes=frozenset({TRAINER}), range=(2, 100000), preset_field="keyframes.max_keyframes"),
    ParamSpec("keyframe_min_translation_m", float, PRESET, "Camera motion that makes a new keyframe, m.",
              nodes=frozenset({TRAINER}), range=(1e-3, 100.0), preset_field="keyframes.min_translation_m"),
    ParamSpec("keyframe_min_rotation_deg", float, PRESET, "Camera rotation that makes a new keyframe, deg.",
              nodes=frozenset({TRAINER}), range=(1e-2, 180.0), preset_field="keyframes.min_rotation_deg"),
    ParamSpec("keyframe_max_interval_s", float, PRESET, "Time after which a frame is a keyframe anyway, s.",
              nodes=frozenset({TRAINER}), range=(1e-2, 3600.0), preset_field="keyframes.max_interval_s"),
    ParamSpec("keyframe_blur_threshold", float, PRESET,
              "Frames whose sharpness score is below this are rejected as blurred (0 = off).",
              nodes=frozenset({TRAINER}), range=(0.0, 1.0e6), preset_field="keyframes.blur_threshold"),
    ParamSpec("clip_encoder", str, "", "Vision-language encoder 'package.module:factory'; '' = preset's."),
    ParamSpec("dino_encoder", str, "", "Dense encoder 'package.module:factory'; '' = preset's."),
    ParamSpec("clip_checkpoint", str, "",
              "Local CLIP weights file for the OpenCLIP encoder; '' = search the OpenCLIP / Hugging Face "
              "caches."),
    ParamSpec("dino_checkpoint", str, "",
              "Local DINO weights file for the DINO encoder; '' = search the torch / Hugging Face caches."),
    ParamSpec("query_threshold", float, PRESET,
              "Confidence (0-1) a target needs to count as found when a request's threshold is <= 0.",
              range=(0.01, 0.99), read_only=False, preset_field="query.threshold"),
    ParamSpec("candidate_voxel_m", float, PRESET,
              "Voxel size of the candidate surface points a query scores, m (query cost ~ 1 / voxel^2).",
              nodes=frozenset({TRAINER}), range=(0.005, 1.0), preset_field="candidates.voxel_m"),
    ParamSpec("candidate_pixel_stride", int, PRESET, "Keyframe pixel stride when lifting candidate points.",
              nodes=frozenset({TRAINER}), range=(1, 64), preset_field="candidates.pixel_stride"),
    ParamSpec("vocabulary_file", str, "",
              "Absolute path of a text file with one competing phrase per line (object and attribute words "
              "that a query's peak is checked against for existence; '#' comments); '' = built-in list."),
    ParamSpec("scene_box_min", list, None,
              "Scene box min corner [x, y, z] in world_frame, m; unset = derived from what the cameras see "
              "(measured depth, else frusta cut at the ground plane z = 0 or scene_max_range_m).",
              nodes=frozenset({TRAINER})),
    ParamSpec("scene_box_max", list, None,
              "Scene box max corner [x, y, z] in world_frame, m (set together with scene_box_min).",
              nodes=frozenset({TRAINER})),
    ParamSpec("scene_max_range_m", float, PRESET,
              "Without depth: how far the cameras are assumed to see when deriving the scene box, m.",
              nodes=frozenset({TRAINER}), range=(0.1, 1000.0), preset_field="scene.max_range_m"),
    ParamSpec("max_query_chars", int, 1000, "Longer query texts are refused (found=false).",
              nodes=frozenset({QUERY}), range=(1, 100000)),
    ParamSpec("status_rate_hz", float, 2.0, "Rate of TrainingStatus on lerf/status, Hz.",
              nodes=frozenset({TRAINER}), range=(0.1, 100.0)),
    ParamSpec("journal_dir", str, "",
              "Crash-safe recording: directory (absolute, or '~/...' for the node user's home) where every "
              "accepted keyframe, its features and a periodic model checkpoint are written as they happen; "
              "on start the node resumes what it holds ('' = off).",
              nodes=frozenset({TRAINER})),
    ParamSpec("journal_interval_s", float, 30.0,
              "Training time between model + optimiser checkpoints in journal_dir, s: at most this much "
              "training is lost in a crash (keyframes are never lost).",
              nodes=frozenset({TRAINER}), range=(0.1, 86400.0)),
    ParamSpec("journal_max_mb", float, 2048.0,
              "Disk bound of journal_dir, MiB: beyond it the most redundant keyframes are evicted, as for "
              "max_keyframes (the status reports the bytes used).",
              nodes=frozenset({TRAINER}), range=(1.0, 1.0e7)),
    ParamSpec("map_path", str, "",
              "Query node: absolute map directory to answer from with no trainer ('' = live model); its "
              "answers are in the frame the map recorded.",
              nodes=frozenset({QUERY})),
)

SPECS: dict[str, ParamSpec] = {spec.name: spec for spec in PARAMETERS}

#: Parameters every rclpy node declares itself (name -> type): a params file may set them, and the
#: start-up check types them instead of calling them unknown.
ROS_PARAMETERS: dict[str, type] = {"use_sim_time": bool, "start_type_description_service": bool}


@dataclass(frozen=True)
class TrainerSettings:
    """Node-side settings of the trainer (the core's part lives in ``EngineConfig``)."""

    world_frame: str
    image_topic: str
    camera_info_topic: str
    image_transport: str
    depth_topic: str
    cameras: tuple[str, ...] | None  # camera namespaces; None = the one camera of the topic parameters
    depth_wait_s: float
    depth_stamp_tolerance_s: float
    tf_timeout_s: float
    queue_size: int
    max_frame_rate_hz: float
    skip_static_frames: bool
    torch_threads: int
    max_steps: int
    steps_per_tick: int
    status_rate_hz: float


@dataclass(frozen=True)
class QuerySettings:
    world_frame: str
    map_path: str
    threshold: float
    max_query_chars: int
    torch_threads: int


@dataclass(frozen=True)
class ResolvedParams:
    """Everything the nodes need, validated: the core config, the device and node settings."""

    engine: Any  # lerf_ros.core.presets.EngineConfig
    device: str
    trainer: TrainerSettings
    query: QuerySettings
    values: Mapping[str, Any]  # every parameter's effective value, by name
    journal: Any = None  # lerf_ros.core.journal.JournalConfig (journal_dir expanded), None = off


def _get_path(obj: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


def preset_defaults(preset: str) -> dict[str, Any]:
    """Every parameter's default with ``PRESET`` entries read from ``make_preset(preset)``."""
    check_value(SPECS["preset"], preset)
    config = make_preset(preset)
    out = {}
    for spec in PARAMETERS:
        out[spec.name] = spec.type(_get_path(config, spec.preset_field)) if spec.default is PRESET \
            else spec.default
    out["preset"] = preset
    return out


def check_value(spec: ParamSpec, value: Any) -> Any:
    """Return ``value`` coerced to ``spec.type`` (int -> float only); raise ParameterError otherwise."""
    if spec.type is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if spec.type is list:
        return _check_names(spec, value) if spec.item_type is str else _check_point(spec, value)
    if not isinstance(value, spec.type) or (spec.type is int and isinstance(value, bool)):
        raise ParameterError(spec.name, value, f"expected {spec.type.__name__}, got {type(value).__name__}")
    if spec.type is float and not math.isfinite(value):
        raise ParameterError(spec.name, value, "must be finite")
    if spec.range is not None and not spec.range[0] <= value <= spec.range[1]:
        raise ParameterError(spec.name, value, f"out of range [{spec.range[0]}, {spec.range[1]}]")
    if spec.choices and value not in spec.choices:
        raise ParameterError(spec.name, value, f"must be one of {list(spec.choices)}")
    return value


def _check_point(spec: ParamSpec, value: Any) -> tuple[float, float, float] | None:
    """An optional [x, y, z] of finite numbers (None or [] = unset)."""
    if value is None or (isinstance(value, (list, tuple)) and len(value) == 0):
        return None
    ok = isinstance(value, (list, tuple)) and len(value) == 3 and all(
        isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in value)
    if not ok:
        raise ParameterError(spec.name, value, "expected [x, y, z] of 3 finite numbers (or unset)")
    return tuple(float(v) for v in value)


def _check_names(spec: ParamSpec, value: Any) -> tuple[str, ...] | None:
    """An optional list of distinct ROS names (None or [] = unset); ParameterError naming the bad one."""
    if value is None or (isinstance(value, (list, tuple)) and len(value) == 0):
        return None
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
        raise ParameterError(spec.name, value, "expected a list of strings, e.g. [head_camera, wrist_camera]")
    for name in value:
        if not _ROS_NAME_RE.match(name):
            raise ParameterError(spec.name, list(value),
                                 f"{name!r} is not a ROS namespace (names of letters, digits and '_' not "
                                 f"starting with a digit, separated by single '/')")
    dup = sorted({n for n in value if list(value).count(n) > 1})
    if dup:
        raise ParameterError(spec.name, list(value), f"{dup[0]!r} is listed twice")
    if len(value) > MAX_CAMERAS:
        raise ParameterError(spec.name, list(value), f"more than {MAX_CAMERAS} cameras")
    return tuple(value)


def _check_semantics(values: Mapping[str, Any]) -> None:
    for name in ("clip_encoder", "dino_encoder"):
        if values[name] and not _ENCODER_RE.match(values[name]):
            raise ParameterError(name, values[name], "expected 'package.module:factory'")
    if not _FRAME_RE.match(values["world_frame"]):
        raise ParameterError("world_frame", values["world_frame"], "must be a non-empty frame id")
    if values["world_frame"].startswith("/"):
        # tf2 strips one '/' from published frame ids but rejects lookups of one (InvalidArgumentException).
        raise ParameterError("world_frame", values["world_frame"],
                             "must not start with '/': tf2 frame ids never do (e.g. 'map')")
    for name in ("image_topic", "camera_info_topic"):
        if not values[name]:
            raise ParameterError(name, values[name], "must not be empty")
    lo, hi = values["scene_box_min"], values["scene_box_max"]
    if (lo is None) != (hi is None):
        name = "scene_box_max" if hi is None else "scene_box_min"
        raise ParameterError(name, values[name], "set scene_box_min and scene_box_max together")
    if lo is not None and not all(h > m for m, h in zip(lo, hi, strict=True)):
        raise ParameterError("scene_box_max", list(hi), f"must exceed scene_box_min {list(lo)} on every axis")
    for name in ("map_path", "clip_checkpoint", "dino_checkpoint", "vocabulary_file"):
        if values[name] and not values[name].startswith("/"):
            # Relative paths would depend on the working directory of whoever started the node.
            raise ParameterError(name, values[name], "must be an absolute path")
    journal = values["journal_dir"]
    if journal and not journal.startswith(("/", "~/")):
        raise ParameterError("journal_dir", journal, "must be an absolute path or start with '~/'")
    if journal and values["map_path"] and Path(journal_path(journal)) == Path(values["map_path"]):
        raise ParameterError("journal_dir", journal, "must not be the map_path directory")


def journal_path(value: str) -> str:
    """``journal_dir`` as an absolute path: a leading '~' is the home of the user running the node (the
    robot config writes ``~/.ros/lerf_journal``, beside ROS's own logs)."""
    return os.path.expanduser(value)


def read_vocabulary(path: str) -> tuple[str, ...]:
    """Phrases of a vocabulary file: one per line, blank lines and '#' comments skipped; ParameterError
    naming the path when it cannot be read or holds no phrase."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise ParameterError("vocabulary_file", path, f"cannot be read: {exc}") from exc
    phrases = tuple(p for p in dict.fromkeys(ln.split("#", 1)[0].strip() for ln in lines) if p)
    if not phrases:
        raise ParameterError("vocabulary_file", path, "holds no phrase (one per line, '#' comments)")
    return phrases


def _encoder_spec(current: Any, target: str, checkpoint: str) -> Any:
    """The preset's EncoderSpec, or ``target`` with no kwargs; ``checkpoint`` adds the weights-file kwarg."""
    kwargs = current.kwargs_dict() if not target else {}
    if checkpoint:
        kwargs["checkpoint_path"] = checkpoint  # the OpenCLIP and DINO factories' weights-file argument
    return type(current).from_string(target or current.target, kwargs)


def resolve(overrides: Mapping[str, Any] | None = None) -> ResolvedParams:
    """Validate ``overrides`` (name -> value; missing names take their defaults) and build the configs.

    Raises ParameterError naming the first bad parameter, or an unknown name.
    """
    overrides = dict(overrides or {})
    unknown = sorted(set(overrides) - set(SPECS))
    if unknown:
        raise ParameterError(unknown[0], overrides[unknown[0]], f"unknown parameter; known: {sorted(SPECS)}")
    preset = check_value(SPECS["preset"], overrides.get("preset", SPECS["preset"].default))
    values = preset_defaults(preset)
    for name, value in overrides.items():
        values[name] = check_value(SPECS[name], value)
    _check_semantics(values)
    if values["min_keyframes"] > values["max_keyframes"]:
        raise ParameterError("min_keyframes", values["min_keyframes"],
                             f"exceeds max_keyframes = {values['max_keyframes']}")

    base = make_preset(preset)
    keyframes = dataclasses.replace(
        base.keyframes,
        min_translation_m=values["keyframe_min_translation_m"],
        min_rotation_deg=values["keyframe_min_rotation_deg"],
        max_interval_s=values["keyframe_max_interval_s"],
        blur_threshold=values["keyframe_blur_threshold"],
        max_keyframes=values["max_keyframes"],
    )
    ingest = dataclasses.replace(base.ingest, min_keyframes=values["min_keyframes"],
                                 max_image_side=values["max_image_side"])
    candidates = dataclasses.replace(base.candidates, voxel_m=values["candidate_voxel_m"],
                                     pixel_stride=values["candidate_pixel_stride"])
    scene = dataclasses.replace(base.scene, box_min=values["scene_box_min"], box_max=values["scene_box_max"],
                                max_range_m=values["scene_max_range_m"])
    query_cfg = dataclasses.replace(base.query, threshold=values["query_threshold"])
    if values["vocabulary_file"]:
        query_cfg = dataclasses.replace(query_cfg, vocabulary=read_vocabulary(values["vocabulary_file"]))
    engine = dataclasses.replace(
        base,
        scene=scene,
        keyframes=keyframes,
        ingest=ingest,
        candidates=candidates,
        query=query_cfg,
        clip_encoder=_encoder_spec(base.clip_encoder, values["clip_encoder"], values["clip_checkpoint"]),
        dino_encoder=_encoder_spec(base.dino_encoder, values["dino_encoder"], values["dino_checkpoint"]),
    )
    trainer = TrainerSettings(**{f.name: values[f.name] for f in dataclasses.fields(TrainerSettings)})
    query = QuerySettings(values["world_frame"], values["map_path"], values["query_threshold"],
                          values["max_query_chars"], values["torch_threads"])
    journal = None
    if values["journal_dir"]:
        from lerf_ros.core.journal import JournalConfig

        journal = JournalConfig(journal_path(values["journal_dir"]), values["journal_interval_s"],
                                values["journal_max_mb"])
    return ResolvedParams(engine, values["device"], trainer, query, dict(values), journal)


# --- rclpy side -------------------------------------------------------------------------------------


def descriptor(spec: ParamSpec):
    """The spec as an ``rcl_interfaces/ParameterDescriptor`` (type, description, range, read_only)."""
    from rcl_interfaces.msg import FloatingPointRange, IntegerRange, ParameterDescriptor, ParameterType

    ptype = {bool: ParameterType.PARAMETER_BOOL, int: ParameterType.PARAMETER_INTEGER,
             float: ParameterType.PARAMETER_DOUBLE, str: ParameterType.PARAMETER_STRING,
             list: ParameterType.PARAMETER_STRING_ARRAY if spec.item_type is str
             else ParameterType.PARAMETER_DOUBLE_ARRAY}[spec.type]
    text = spec.description + (f" One of {list(spec.choices)}." if spec.choices else "")
    desc = ParameterDescriptor(name=spec.name, type=ptype, description=text, read_only=spec.read_only)
    if spec.choices:
        desc.additional_constraints = "one of: " + ", ".join(spec.choices)
    if spec.range is not None and spec.type is float:
        desc.floating_point_range = [FloatingPointRange(
            from_value=float(spec.range[0]), to_value=float(spec.range[1]), step=0.0)]
    elif spec.range is not None and spec.type is int:
        desc.integer_range = [IntegerRange(
            from_value=int(spec.range[0]), to_value=int(spec.range[1]), step=0)]
    return desc


def declare_and_resolve(node, role: str) -> ResolvedParams:
    """Declare ``role``'s parameters on ``node`` and return them resolved; raise ParameterError.

    ``preset`` is declared first so the other defaults can come from it. rclpy's own range check
    (InvalidParameterValueException) is turned into a ParameterError naming the parameter.
    """
    from rclpy.exceptions import InvalidParameterTypeException, InvalidParameterValueException

    def declare(spec: ParamSpec, default: Any) -> Any:
        if spec.type is list and default is None:  # an unset array parameter is declared by its type
            from rclpy.parameter import Parameter

            default = Parameter.Type.STRING_ARRAY if spec.item_type is str else Parameter.Type.DOUBLE_ARRAY
        try:
            value = node.declare_parameter(spec.name, default, descriptor(spec)).value
            return list(value) if spec.type is list and value is not None else value
        except InvalidParameterValueException as exc:
            raise ParameterError(spec.name, getattr(exc, "value", None), str(exc)) from exc
        except InvalidParameterTypeException as exc:
            raise ParameterError(spec.name, None, str(exc)) from exc

    preset = declare(SPECS["preset"], SPECS["preset"].default)
    defaults = preset_defaults(check_value(SPECS["preset"], preset))
    values = {"preset": preset}
    for spec in PARAMETERS:
        if spec.name != "preset" and role in spec.nodes:
            values[spec.name] = declare(spec, defaults[spec.name])
    return resolve(values)
