"""numpy <-> PointCloud2 / MarkerArray / TrainingStatus conversions, on hand-built messages (no
rclpy.init)."""

import math
import struct
from types import SimpleNamespace

import numpy as np
import pytest
from sensor_msgs.msg import PointCloud2, PointField
from std_msgs.msg import Header
from visualization_msgs.msg import Marker

from lerf_ros.core.training.convergence import ConvergenceSignals
from lerf_ros.ros import messages


def _header():
    return Header(frame_id="map")


def test_rgb_packing_matches_rviz_layout():
    packed = messages.pack_rgb(np.array([[255, 0, 0], [0, 128, 1]], np.uint8))
    bits = packed.view("<u4")
    assert bits.tolist() == [0x00FF0000, 0x00008001]
    assert messages.unpack_rgb(packed).tolist() == [[255, 0, 0], [0, 128, 1]]


def test_cloud_round_trip_and_layout():
    rng = np.random.default_rng(0)
    xyz = rng.normal(size=(7, 3)).astype(np.float32)
    rel = rng.uniform(size=7).astype(np.float32)
    rgb = rng.integers(0, 256, size=(7, 3)).astype(np.uint8)
    msg = messages.cloud_to_msg(xyz, rel, rgb, _header())
    assert [f.name for f in msg.fields] == ["x", "y", "z", "relevancy", "rgb"]
    assert [f.offset for f in msg.fields] == [0, 4, 8, 12, 16]
    assert all(f.datatype == PointField.FLOAT32 and f.count == 1 for f in msg.fields)
    assert (msg.height, msg.width, msg.point_step, msg.row_step) == (1, 7, 20, 140)
    assert len(msg.data) == 140
    # Point 3's bytes, decoded by hand.
    x, y, z, r, c = struct.unpack_from("<5f", bytes(msg.data), 3 * 20)
    assert (x, y, z, r) == (xyz[3, 0], xyz[3, 1], xyz[3, 2], rel[3])
    r8, g8, b8 = (int(v) for v in rgb[3])
    assert struct.unpack("<I", struct.pack("<f", c))[0] == (r8 << 16) | (g8 << 8) | b8
    xyz2, rel2, rgb2 = messages.msg_to_cloud(msg)
    np.testing.assert_array_equal(xyz2, xyz)
    np.testing.assert_array_equal(rel2, rel)
    np.testing.assert_array_equal(rgb2, rgb)


def test_decoder_reads_foreign_layout_with_padding_and_order():
    # rgb first, padding to 32 bytes per point, two rows with row padding: what another driver might send.
    msg = PointCloud2(height=2, width=2, point_step=32, row_step=72, is_bigendian=False)
    names_offsets = [("rgb", 0), ("x", 8), ("y", 12), ("z", 16), ("relevancy", 24)]
    msg.fields = [PointField(name=n, offset=o, datatype=PointField.FLOAT32, count=1)
                  for n, o in names_offsets]
    data = bytearray(144)
    for i in range(4):
        row, col = divmod(i, 2)
        base = row * 72 + col * 32
        struct.pack_into("<I", data, base, 0x000A0B0C + i)
        struct.pack_into("<3f", data, base + 8, i, 10 + i, 20 + i)
        struct.pack_into("<f", data, base + 24, 0.25 * i)
    msg.data = bytes(data)
    xyz, rel, rgb = messages.msg_to_cloud(msg)
    assert xyz.tolist() == [[i, 10 + i, 20 + i] for i in range(4)]
    assert rel.tolist() == [0.0, 0.25, 0.5, 0.75]
    assert rgb[:, 2].tolist() == [0x0C, 0x0D, 0x0E, 0x0F]


def test_decoder_rejects_bad_layouts():
    good = messages.cloud_to_msg(np.zeros((2, 3)), np.zeros(2), np.zeros((2, 3)), _header())
    missing = messages.cloud_to_msg(np.zeros((2, 3)), np.zeros(2), np.zeros((2, 3)), _header())
    missing.fields = missing.fields[:4]
    with pytest.raises(ValueError, match="lacks field 'rgb'"):
        messages.msg_to_cloud(missing)
    short = messages.cloud_to_msg(np.zeros((2, 3)), np.zeros(2), np.zeros((2, 3)), _header())
    short.data = bytes(good.data)[:-4]
    with pytest.raises(ValueError, match="bytes"):
        messages.msg_to_cloud(short)
    with pytest.raises(ValueError, match="disagree"):
        messages.cloud_to_msg(np.zeros((2, 3)), np.zeros(3), np.zeros((2, 3)), _header())


def test_empty_cloud_has_fields_and_no_points():
    msg = messages.empty_cloud(_header())
    assert msg.width == 0 and len(msg.fields) == 5 and len(msg.data) == 0
    xyz, rel, rgb = messages.msg_to_cloud(msg)
    assert xyz.shape == (0, 3) and rel.shape == (0,) and rgb.shape == (0, 3)


def _target_msg(xyz, scale, relevancy):
    from geometry_msgs.msg import Point
    from lerf_ros.msg import Target

    return Target(location=Point(x=xyz[0], y=xyz[1], z=xyz[2]), scale=scale, relevancy=relevancy)


def test_answer_markers_clear_the_last_answer_then_show_each_target():
    targets = [_target_msg((1.0, -2.0, 0.5), 0.3, 0.8), _target_msg((0.0, 1.0, 0.2), 0.2, 0.7)]
    array = messages.answer_markers("red box", targets, _header())
    clear, sphere, label, sphere2, label2 = array.markers
    # DELETEALL first: RViz drops every marker of the previous answer (it may have had more targets).
    assert clear.action == Marker.DELETEALL and clear.ns == messages.MARKER_NS
    assert all(m.header.frame_id == "map" and m.ns == messages.MARKER_NS for m in array.markers)
    assert sphere.type == Marker.SPHERE and sphere.action == Marker.ADD
    assert (sphere.pose.position.x, sphere.pose.position.y, sphere.pose.position.z) == (1.0, -2.0, 0.5)
    assert sphere.scale.x == pytest.approx(0.3)
    assert [m.id for m in array.markers[1:]] == [0, 1, 2, 3]
    assert label.type == Marker.TEXT_VIEW_FACING and label.text == "red box (0.80)"
    assert label.pose.position.z == pytest.approx(0.5 + 0.15 + 0.1)
    assert label2.text == "red box #2 (0.70)" and sphere2.pose.position.y == 1.0
    assert sphere.color.a > sphere2.color.a  # the best target stands out

    # Tiny and huge scales are clamped so the marker stays visible and does not swallow the room.
    def diameter(scale_m):
        return messages.answer_markers("x", [_target_msg((0.0, 0.0, 0.0), scale_m, 0.1)],
                                       _header()).markers[1].scale.x

    assert diameter(1e-4) == pytest.approx(0.05)
    assert diameter(7.0) == pytest.approx(1.0)
    assert diameter(float("nan")) == pytest.approx(0.1)


def test_answer_markers_without_targets_only_clear():
    array = messages.answer_markers("nothing", [], _header())
    assert [m.action for m in array.markers] == [Marker.DELETEALL]


def test_stamp_conversion():
    stamp = messages.stamp_from_ns(12_345_000_000_123)
    assert (stamp.sec, stamp.nanosec) == (12345, 123)
    assert messages.stamp_to_ns(stamp) == 12_345_000_000_123


def test_training_status_msg():
    conv = ConvergenceSignals(step=400, psnr_db=28.5, r2=0.93, coverage=1.0, depth_disagreement=0.02,
                              depth_pairs=300, psnr_gain_db=0.1, language_slope=-0.03, usable=True,
                              progress=1.0, note="usable: held-out PSNR 28.5 dB")
    status = SimpleNamespace(step=42, keyframes=5, keyframes_pending=1, losses={"rgb": 0.5, "total": 0.7},
                             rays_per_s=1234.5, gpu_mem_allocated_mb=0.0, gpu_mem_peak_mb=0.0,
                             last_error=None, convergence=conv, nonfinite_steps=3, oom_events=2,
                             rays_per_step=64)
    msg = messages.training_status_msg(status, "training", _header(), 30, {"tf_missing": 2, "queue_full": 3},
                                       "tf_missing: no map", frames_without_depth=4,
                                       not_keyframe={"redundant": 7, "blurred": 1})
    assert msg.frames_without_depth == 4
    # Frames the keyframe selector did not keep are listed apart and are not drops.
    assert msg.frames_not_keyframe == 8
    assert list(msg.not_keyframe_reasons) == ["blurred", "redundant"]
    assert list(msg.not_keyframe_counts) == [1, 7]
    assert (msg.state, msg.state_name, msg.step) == (1, "training", 42)
    assert (msg.keyframes, msg.keyframes_pending) == (5, 1)
    assert msg.frames_received == 30 and msg.frames_dropped == 5
    assert list(msg.drop_reasons) == ["queue_full", "tf_missing"] and list(msg.drop_counts) == [3, 2]
    assert list(msg.loss_names) == ["rgb", "total"]
    assert list(msg.loss_values) == pytest.approx([0.5, 0.7])
    assert msg.rays_per_second == pytest.approx(1234.5)
    assert msg.last_error == "tf_missing: no map"
    assert msg.usable and msg.progress == 1.0 and msg.convergence == "usable: held-out PSNR 28.5 dB"
    assert (msg.heldout_psnr_db, msg.heldout_r2) == pytest.approx((28.5, 0.93))
    assert (msg.depth_disagreement, msg.language_loss_slope) == pytest.approx((0.02, -0.03))
    assert (msg.convergence_step, msg.nonfinite_steps) == (400, 3)
    assert (msg.oom_events, msg.rays_per_step) == (2, 64)
    # before the first evaluation: not usable, NaN signals, step 0
    empty = messages.training_status_msg(
        SimpleNamespace(**{**vars(status), "convergence": ConvergenceSignals()}), "waiting", _header(), 0, {})
    assert not empty.usable and empty.progress == 0.0 and empty.convergence_step == 0
    assert math.isnan(empty.heldout_psnr_db) and empty.convergence == "not evaluated yet"
    with pytest.raises(ValueError, match="unknown training state"):
        messages.training_status_msg(status, "sleeping", _header(), 0, {})


def test_training_status_names_the_encoders_and_says_when_one_is_a_demo():
    import dataclasses

    from lerf_ros.core.encoders import EncoderSpec, is_demo_encoder
    from lerf_ros.core.engine import LERFEngine
    from lerf_ros.core.presets import make_preset

    engine = LERFEngine(make_preset("tiny"), "cpu")
    msg = messages.training_status_msg(engine.status(), "waiting", _header(), 0, {})
    assert (msg.clip_encoder, msg.dino_encoder) == (engine.clip_encoder.name, engine.dino_encoder.name)
    assert msg.demo_encoders and msg.clip_encoder and msg.scene_box_source == ""
    cfg = dataclasses.replace(make_preset("tiny"),
                              clip_encoder=EncoderSpec("lerf_test_doubles.cliplike:cliplike_encoder"))
    mixed = LERFEngine(cfg, "cpu")
    assert not is_demo_encoder(mixed.clip_encoder) and is_demo_encoder(mixed.dino_encoder)
    assert messages.training_status_msg(mixed.status(), "waiting", _header(), 0, {}).demo_encoders


# --------------------------------------------------------------------------- Query replies

def _target(centre, half, confidence, relevancy=0.9):
    from lerf_ros.core.language.query import Target

    centre = np.asarray(centre, dtype=np.float64)
    return Target(location_world=centre + 0.01, box_min=centre - half, box_max=centre + half,
                  relevancy=relevancy, confidence=confidence, point_count=40, scale_m=0.25,
                  view_support=float("nan"), competitor="pink", competitor_relevancy=0.52, z_score=9.0)


def _result(found, targets=(), source="field", model_step=300, relevancy=0.8, confidence=0.7):
    from lerf_ros.core.language.query import QueryResult

    xyz = np.array([[0.5, 0.5, 0.2], [0.6, 0.5, 0.2]], np.float32)
    return QueryResult(found=found, message="summary", relevancy=relevancy, scale_m=0.25,
                       location_world=targets[0].location_world if found else None, cloud_xyz=xyz,
                       cloud_relevancy=np.array([0.7, 0.9], np.float32),
                       cloud_rgb=np.full((2, 3), 200, np.uint8), model_step=model_step,
                       confidence=confidence, targets=tuple(targets), source=source)


def test_query_result_code_from_the_results_fields():
    two = (_target([0.6, 0.4, 0.2], 0.1, 0.9), _target([-0.6, 0.4, 0.2], 0.15, 0.8))
    assert messages.query_result_code(_result(True, two)) == messages.RESULTS["found"]
    assert messages.query_result_code(_result(False)) == messages.RESULTS["not_found"]
    # The engine's "no model yet" answer: from the field's side at step 0 (no scoring happened).
    assert messages.query_result_code(_result(False, model_step=0)) == messages.RESULTS["not_ready"]
    # Keyframe views answer at step 0 (measured depth, field not trained yet): a real answer.
    assert messages.query_result_code(_result(False, source="views", model_step=0)) == \
        messages.RESULTS["not_found"]
    assert messages.query_result_code(_result(True, two, source="views", model_step=0)) == \
        messages.RESULTS["found"]


def test_query_result_code_of_a_real_engine_without_frames_is_not_ready():
    from lerf_ros.core.engine import LERFEngine
    from lerf_ros.core.presets import make_preset

    result = LERFEngine(make_preset("tiny"), "cpu").query("red box", max_results=3)
    assert messages.query_result_code(result) == messages.RESULTS["not_ready"]


def test_found_reply_carries_targets_best_first():
    from lerf_ros.srv import Query

    two = (_target([0.6, 0.4, 0.2], 0.1, 0.9), _target([-0.6, 0.4, 0.2], np.array([0.15, 0.1, 0.2]), 0.8))
    reply = messages.fill_query_response(Query.Response(), _result(True, two), _header())
    assert reply.result == Query.Response.RESULT_FOUND and reply.found and reply.message == "summary"
    assert reply.location.header.frame_id == "map"
    assert len(reply.targets) == 2
    first, second = reply.targets
    p = reply.location.point
    assert (p.x, p.y, p.z) == (first.location.x, first.location.y, first.location.z)
    assert (p.x, p.y, p.z) == tuple(two[0].location_world)
    assert (second.box_center.x, second.box_center.y, second.box_center.z) == pytest.approx((-0.6, 0.4, 0.2))
    assert (second.extent.x, second.extent.y, second.extent.z) == pytest.approx((0.3, 0.2, 0.4))
    assert (first.extent.x, first.extent.y, first.extent.z) == pytest.approx((0.2, 0.2, 0.2))
    assert (first.confidence, second.confidence) == pytest.approx((0.9, 0.8))
    assert first.point_count == 40 and first.scale == pytest.approx(0.25) and first.competitor == "pink"
    assert math.isnan(first.view_support)
    assert (reply.relevancy, reply.confidence, reply.scale) == pytest.approx((0.8, 0.7, 0.25))
    assert reply.model_step == 300
    assert reply.cloud.width == 2 and reply.cloud.header.frame_id == "map"


def test_not_found_reply_has_no_location_and_no_targets():
    from lerf_ros.srv import Query

    reply = messages.fill_query_response(Query.Response(), _result(False, relevancy=0.55, confidence=0.3),
                                         _header())
    assert reply.result == Query.Response.RESULT_NOT_FOUND and not reply.found
    p = reply.location.point
    assert math.isnan(p.x) and math.isnan(p.y) and math.isnan(p.z)
    assert reply.location.header.frame_id == "map" and len(reply.targets) == 0
    # The best rejected candidate's scores are still reported.
    assert (reply.relevancy, reply.confidence) == pytest.approx((0.55, 0.3))


@pytest.mark.parametrize("code", ["not_ready", "invalid_request", "error"])
def test_refusal_answers_nothing(code):
    from lerf_ros.srv import Query

    reply = Query.Response(found=True, relevancy=0.9, model_step=5)
    reply.targets = [messages.target_to_msg(_target([0, 0, 0], 0.1, 0.9))]
    messages.fill_refusal(reply, _header(), messages.RESULTS[code], "why")
    assert reply.result == messages.RESULTS[code] and not reply.found and reply.message == "why"
    assert np.isnan([reply.location.point.x, reply.location.point.y, reply.location.point.z]).all()
    assert len(reply.targets) == 0 and reply.relevancy == 0.0 and reply.model_step == 0
    assert reply.cloud.width == 0 and len(reply.cloud.fields) == 5


def test_refusal_refuses_answer_codes():
    from lerf_ros.srv import Query

    with pytest.raises(ValueError, match="refusal"):
        messages.fill_refusal(Query.Response(), _header(), messages.RESULTS["found"], "no")
