"""The parameter table and its mapping onto the core configs: overrides and rejections.

The mapping is pure (no rclpy.init); one test declares the table on a real node to check that rclpy's
own range check and ours agree and that the error names the parameter.
"""

import math
from pathlib import Path

import pytest

from lerf_ros.core.presets import make_preset
from lerf_ros.ros import params
from lerf_ros.ros.params import ParameterError, resolve


def test_defaults_reproduce_the_preset_exactly():
    for preset in ("tiny", "lite", "default"):
        resolved = resolve({"preset": preset})
        assert resolved.engine == make_preset(preset), preset
        assert resolved.values["max_keyframes"] == make_preset(preset).keyframes.max_keyframes
    resolved = resolve()
    assert resolved.device == "auto"
    assert resolved.trainer.world_frame == "map"
    # Relative, so a pushed namespace moves them (/robot1/camera/color/image_raw).
    assert resolved.trainer.image_topic == "camera/color/image_raw"
    assert resolved.trainer.camera_info_topic == "camera/color/camera_info"
    assert resolved.query.threshold == make_preset("default").query.threshold


def test_the_default_is_the_robot_preset_with_openclip_and_dino():
    # With no parameters at all (ros2 launch without arguments, lerf-ros train without --preset) the
    # engine uses the real encoders; only an explicit preset=tiny selects the demo colour encoders.
    from lerf_ros.core.encoders import DEFAULT_CLIP, DEFAULT_DINO, DEMO_CLIP, DEMO_DENSE

    resolved = resolve()
    assert resolved.values["preset"] == "default" and params.SPECS["preset"].default == "default"
    assert resolved.engine == make_preset("default")
    engine = resolved.engine
    assert (engine.clip_encoder.target, engine.dino_encoder.target) == (DEFAULT_CLIP, DEFAULT_DINO)
    tiny = resolve({"preset": "tiny"}).engine
    assert (tiny.clip_encoder.target, tiny.dino_encoder.target) == (DEMO_CLIP, DEMO_DENSE)
    assert "demo" in params.SPECS["preset"].description


def test_every_spec_is_well_formed():
    names = [spec.name for spec in params.PARAMETERS]
    assert len(names) == len(set(names))
    defaults = params.preset_defaults("tiny")
    for spec in params.PARAMETERS:
        assert spec.description.strip(), spec.name
        assert spec.nodes and spec.nodes <= params.BOTH, spec.name
        assert (spec.default is params.PRESET) == (spec.preset_field is not None), spec.name
        # Every default passes its own validation.
        params.check_value(spec, defaults[spec.name])


def test_overrides_land_in_the_core_configs():
    r = resolve({
        "preset": "tiny",
        "keyframe_min_translation_m": 0.3, "keyframe_min_rotation_deg": 20,  # int accepted for a double
        "keyframe_max_interval_s": 2.5, "keyframe_blur_threshold": 0.0, "max_keyframes": 17,
        "min_keyframes": 4, "max_image_side": 128, "query_threshold": 0.61, "device": "cpu",
        "world_frame": "odom", "tf_timeout_s": 0.5, "queue_size": 3, "max_steps": 500,
        "clip_encoder": "lerf_ros.core.encoders.demo:colour_name_encoder",
    })
    kf = r.engine.keyframes
    assert (kf.min_translation_m, kf.min_rotation_deg, kf.max_interval_s) == (0.3, 20.0, 2.5)
    assert isinstance(kf.min_rotation_deg, float)
    assert (kf.blur_threshold, kf.max_keyframes) == (0.0, 17)
    assert (r.engine.ingest.min_keyframes, r.engine.ingest.max_image_side) == (4, 128)
    assert r.engine.query.threshold == 0.61 and r.query.threshold == 0.61
    assert r.engine.clip_encoder.target == "lerf_ros.core.encoders.demo:colour_name_encoder"
    assert r.engine.clip_encoder.kwargs == ()
    assert r.device == "cpu"
    assert (r.trainer.world_frame, r.query.world_frame) == ("odom", "odom")
    assert (r.trainer.tf_timeout_s, r.trainer.queue_size, r.trainer.max_steps) == (0.5, 3, 500)
    # Untouched sections stay the preset's.
    base = make_preset("tiny")
    assert r.engine.model == base.model and r.engine.trainer == base.trainer
    assert r.engine.dino_encoder == base.dino_encoder


def test_checkpoint_becomes_an_encoder_kwarg():
    r = resolve({"preset": "lite", "clip_checkpoint": "/models/clip.bin",
                 "dino_checkpoint": "/models/dino.pth"})
    assert dict(r.engine.clip_encoder.kwargs)["checkpoint_path"] == "/models/clip.bin"
    assert r.engine.clip_encoder.target == make_preset("lite").clip_encoder.target
    assert dict(r.engine.dino_encoder.kwargs)["checkpoint_path"] == "/models/dino.pth"
    assert r.engine.dino_encoder.target == make_preset("lite").dino_encoder.target


def test_preset_changes_the_preset_backed_defaults():
    tiny, lite = params.preset_defaults("tiny"), params.preset_defaults("lite")
    for spec in params.PARAMETERS:
        if spec.preset_field:
            section, field = spec.preset_field.split(".")
            assert lite[spec.name] == getattr(getattr(make_preset("lite"), section), field)
            assert tiny[spec.name] == getattr(getattr(make_preset("tiny"), section), field)


@pytest.mark.parametrize(
    ("name", "value", "needle"),
    [
        ("preset", "huge", "one of"),
        ("device", "tpu", "one of"),
        ("image_transport", "theora", "one of"),
        ("tf_timeout_s", -1.0, "out of range"),
        ("tf_timeout_s", math.nan, "finite"),
        ("tf_timeout_s", "fast", "expected float"),
        ("queue_size", 0, "out of range"),
        ("depth_wait_s", -0.1, "out of range"),
        ("depth_wait_s", 5.0, "out of range"),
        ("depth_stamp_tolerance_s", math.inf, "finite"),
        ("queue_size", True, "expected int"),
        ("queue_size", 2.5, "expected int"),
        ("max_keyframes", 1, "out of range"),
        ("keyframe_min_translation_m", 0.0, "out of range"),
        ("query_threshold", 1.5, "out of range"),
        ("status_rate_hz", 0.0, "out of range"),
        ("clip_encoder", "open_clip", "package.module:factory"),
        ("dino_encoder", "a.b:c d", "package.module:factory"),
        ("world_frame", "", "frame id"),
        ("world_frame", "/map", "must not start with '/'"),  # tf2 rejects such lookups
        ("image_topic", "", "must not be empty"),
        ("map_path", "maps/lab", "absolute"),
        ("clip_checkpoint", "clip.bin", "absolute"),
        ("dino_checkpoint", "dino.pth", "absolute"),
        ("journal_dir", "journal", "absolute path or start with '~/'"),
        ("journal_dir", "~robot/journal", "absolute path or start with '~/'"),
        ("journal_interval_s", 0.0, "out of range"),
        ("journal_interval_s", -5.0, "out of range"),
        ("journal_interval_s", math.nan, "finite"),
        ("journal_max_mb", 0.0, "out of range"),
        ("journal_max_mb", "big", "expected float"),
        ("no_such_parameter", 1, "unknown parameter"),
    ],
)
def test_invalid_values_name_the_parameter(name, value, needle):
    with pytest.raises(ParameterError, match=needle) as info:
        resolve({name: value})
    assert info.value.name == name
    assert f"'{name}'" in str(info.value)
    assert isinstance(info.value, ValueError)


def test_cross_parameter_check():
    with pytest.raises(ParameterError, match="exceeds max_keyframes") as info:
        resolve({"min_keyframes": 20, "max_keyframes": 10})
    assert info.value.name == "min_keyframes"


def test_descriptor_carries_type_range_and_read_only():
    from rcl_interfaces.msg import ParameterType

    d = params.descriptor(params.SPECS["tf_timeout_s"])
    assert d.type == ParameterType.PARAMETER_DOUBLE and d.read_only
    assert (d.floating_point_range[0].from_value, d.floating_point_range[0].to_value) == (0.0, 10.0)
    d = params.descriptor(params.SPECS["queue_size"])
    assert d.type == ParameterType.PARAMETER_INTEGER
    assert (d.integer_range[0].from_value, d.integer_range[0].to_value) == (1, 1000)
    d = params.descriptor(params.SPECS["preset"])
    assert d.type == ParameterType.PARAMETER_STRING and "tiny, lite, default" in d.additional_constraints
    assert not params.descriptor(params.SPECS["query_threshold"]).read_only


def test_declare_on_a_node_applies_overrides_and_rejects_bad_ones():
    import rclpy
    from rclpy.node import Node
    from rclpy.parameter import Parameter

    rclpy.init()
    try:
        node = Node("params_probe", parameter_overrides=[
            Parameter("preset", value="lite"), Parameter("queue_size", value=5),
            Parameter("keyframe_min_translation_m", value=0.25)])
        r = params.declare_and_resolve(node, params.TRAINER)
        assert r.values["preset"] == "lite" and r.trainer.queue_size == 5
        assert r.engine.keyframes.min_translation_m == 0.25
        # Preset-backed defaults are declared with the preset's value, visible to `ros2 param get`.
        assert node.get_parameter("max_keyframes").value == make_preset("lite").keyframes.max_keyframes
        assert not node.has_parameter("map_path")  # a query-node parameter
        node.destroy_node()

        bad = Node("params_probe_bad", parameter_overrides=[Parameter("tf_timeout_s", value=99.0)])
        with pytest.raises(ParameterError) as info:
            params.declare_and_resolve(bad, params.TRAINER)
        assert info.value.name == "tf_timeout_s"
        bad.destroy_node()

        bad = Node("params_probe_bad2", parameter_overrides=[Parameter("device", value="tpu")])
        with pytest.raises(ParameterError, match="'device'"):
            params.declare_and_resolve(bad, params.QUERY)
        bad.destroy_node()
    finally:
        rclpy.try_shutdown()


def test_max_keyframes_description_matches_the_store_eviction_policy():
    from lerf_ros.core.frames import keyframes

    # The store's contract (core/frames/keyframes.py): evict the most redundant keyframe, never the newest.
    assert "evicts the most redundant keyframe" in keyframes.__doc__
    assert "newest keyframe is never evicted" in keyframes.__doc__
    text = params.SPECS["max_keyframes"].description
    assert "most redundant keyframe" in text and "never the newest" in text
    assert "oldest evicted" not in text and "not the oldest" in text
    assert params.descriptor(params.SPECS["max_keyframes"]).description == text


def test_depth_pairing_settings_reach_the_trainer():
    r = resolve()
    assert (r.trainer.depth_wait_s, r.trainer.depth_stamp_tolerance_s) == (0.1, 0.02)
    r = resolve({"depth_wait_s": 0, "depth_stamp_tolerance_s": 0.005})
    assert (r.trainer.depth_wait_s, r.trainer.depth_stamp_tolerance_s) == (0.0, 0.005)
    for name in ("depth_wait_s", "depth_stamp_tolerance_s"):
        spec = params.SPECS[name]
        assert spec.nodes == {params.TRAINER} and spec.type is float and spec.range is not None
    assert "frames_without_depth" in params.SPECS["depth_wait_s"].description


def test_scene_box_parameters_map_to_the_config_and_bad_boxes_name_the_parameter():
    p = resolve({"scene_box_min": [-1, -2.0, 0.0], "scene_box_max": [3.0, 2.0, 2.5],
                 "scene_max_range_m": 7.0})
    assert p.engine.scene.box_min == (-1.0, -2.0, 0.0) and p.engine.scene.box_max == (3.0, 2.0, 2.5)
    assert p.engine.scene.max_range_m == 7.0
    assert resolve({}).engine.scene.box_min is None
    assert resolve({"scene_box_min": []}).engine.scene.box_min is None
    bad = [
        ({"scene_box_min": [0, 0, 0], "scene_box_max": [1, 0, 1]}, "scene_box_max"),  # max == min on y
        ({"scene_box_min": [0, 0, float("nan")], "scene_box_max": [1, 1, 1]}, "scene_box_min"),
        ({"scene_box_min": [0, 0], "scene_box_max": [1, 1, 1]}, "scene_box_min"),
        ({"scene_box_min": [0, 0, 0]}, "scene_box_max"),  # one corner only
        ({"scene_max_range_m": 0.0}, "scene_max_range_m"),
    ]
    for overrides, name in bad:
        with pytest.raises(ParameterError, match=f"'{name}'"):
            resolve(overrides)


def test_vocabulary_file_replaces_the_competing_phrases_and_a_bad_one_names_its_path(tmp_path):
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("# kitchen\nmug\ncup  # a look-alike\n\nmug\nkettle\n")
    p = resolve({"vocabulary_file": str(vocab)})
    assert p.engine.query.vocabulary == ("mug", "cup", "kettle")
    empty = tmp_path / "empty.txt"
    empty.write_text("# nothing\n\n")
    for path, why in ((str(tmp_path / "missing.txt"), "cannot be read"), (str(empty), "no phrase"),
                      ("vocab.txt", "absolute")):
        with pytest.raises(ParameterError, match=f"'vocabulary_file'.*{why}"):
            resolve({"vocabulary_file": path})


def test_journal_parameters_make_the_core_journal_config(monkeypatch):
    from lerf_ros.core.journal import JournalConfig

    assert resolve().journal is None  # off unless journal_dir is set
    assert params.SPECS["journal_dir"].nodes == {params.TRAINER}
    monkeypatch.setenv("HOME", "/home/robot")
    r = resolve({"journal_dir": "~/.ros/lerf_journal", "journal_interval_s": 5, "journal_max_mb": 100.0})
    assert r.journal == JournalConfig("/home/robot/.ros/lerf_journal", 5.0, 100.0)
    assert resolve({"journal_dir": "/data/j"}).journal == JournalConfig("/data/j", 30.0, 2048.0)
    with pytest.raises(ParameterError, match="must not be the map_path directory") as info:
        resolve({"journal_dir": "/data/j/", "map_path": "/data/j"})
    assert info.value.name == "journal_dir"


def test_the_robot_config_records_a_journal():
    from lerf_ros.compat import launcher

    config = Path(__file__).resolve().parents[2] / "config" / "lerf.yaml"
    trainer = launcher.effective_params(str(config), [], params.TRAINER_NODE_NAME)
    assert trainer["journal_dir"] == "~/.ros/lerf_journal"
    journal = resolve({"journal_dir": trainer["journal_dir"]}).journal
    assert journal.dir == str(Path.home() / ".ros" / "lerf_journal")
