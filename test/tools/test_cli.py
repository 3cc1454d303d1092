"""lerf-ros end to end: demo-bag -> train -> query localises the room's objects; info; error exits.

One map is trained per module (tiny preset, CPU) and shared by the query tests.
"""

import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from lerf_ros.sim.scene import SyntheticRoom
from lerf_ros.tools.cli import main
from lerf_ros.tools.ply import read_ply

FRAMES = 40
STEPS = 150
DEPTH = "/camera/depth/image_rect_raw"
MARGIN_M = 0.05  # the engine test's criterion: inside the ground-truth box grown by 5 cm


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    bag, out = root / "bag", root / "map"
    assert main(["demo-bag", str(bag), "--frames", str(FRAMES)]) == 0
    assert main(["train", str(bag), "--out", str(out), "--preset", "tiny", "--depth-topic", DEPTH,
                 "--steps", str(STEPS), "--device", "cpu", "--no-progress"]) == 0
    return root, bag, out


def query_json(capsys, map_dir, text, *extra):
    rc, out, err = run_cli(capsys, "query", map_dir, text, "--json", *extra)
    assert rc == 0, err
    return json.loads(out)


@pytest.mark.slow
def test_trained_map_localises_objects(trained, capsys):
    _, _, map_dir = trained
    room = SyntheticRoom(0)
    inside = 0
    for obj in room.objects:
        ans = query_json(capsys, map_dir, obj.name)
        if ans["found"] and ans["location"] is not None:
            p = np.array([ans["location"][k] for k in "xyz"])
            inside += bool(np.all(p >= obj.box_min - MARGIN_M) and np.all(p <= obj.box_max + MARGIN_M))
        assert ans["location"] is None or ans["location"]["frame_id"] == "map"
    assert inside >= 5, f"only {inside}/6 objects localised"
    for name in room.absent_names:
        assert query_json(capsys, map_dir, name)["found"] is False


@pytest.mark.slow
def test_json_matches_printed_answer_and_files(trained, capsys, tmp_path):
    _, _, map_dir = trained
    ply, png = tmp_path / "red.ply", tmp_path / "red.png"
    ans = query_json(capsys, map_dir, "red box", "--ply", ply, "--png", png)
    assert set(ans) == {"found", "message", "location", "relevancy", "confidence", "competitor", "scale",
                        "model_step", "source", "cloud_points", "targets"}
    assert ans["model_step"] == STEPS and ans["source"] == "field" and 0.0 <= ans["confidence"] <= 1.0
    assert len(ans["targets"]) == int(ans["found"])
    if ans["found"]:
        t = ans["targets"][0]
        assert t["location"] == ans["location"] and t["confidence"] == ans["confidence"]
        assert all(t["extent"][a] >= 0 for a in "xyz") and t["point_count"] > 0
    rc, text, _ = run_cli(capsys, "query", map_dir, "red box")
    assert rc == 0
    fields = dict(line.split(":", 1) for line in text.splitlines() if ":" in line)
    assert fields["found"].strip().startswith("yes" if ans["found"] else "no")
    assert float(fields["relevancy"]) == pytest.approx(ans["relevancy"], abs=5e-4)
    assert float(fields["confidence"].split()[0]) == pytest.approx(ans["confidence"], abs=5e-3)
    assert float(fields["scale"].split()[0]) == pytest.approx(ans["scale"], abs=5e-4)
    loc = ans["location"]
    assert f"x={loc['x']:.3f} y={loc['y']:.3f} z={loc['z']:.3f} m in frame 'map'" in fields["location"]
    assert int(fields["cloud"].split()[0]) == ans["cloud_points"]
    # PLY holds the answer's cloud: as many points, relevancy above the threshold, near the target.
    cloud = read_ply(ply)
    assert cloud.xyz.shape == (ans["cloud_points"], 3) and cloud.frame_id == "map"
    if ans["cloud_points"]:
        centre = np.array([loc["x"], loc["y"], loc["z"]])
        assert np.median(np.linalg.norm(cloud.xyz - centre, axis=1)) < 0.5
    with Image.open(png) as im:
        assert im.format == "PNG" and im.size == (1280, 480)


@pytest.mark.slow
def test_info_reports_the_map(trained, capsys):
    _, _, map_dir = trained
    rc, out, _ = run_cli(capsys, "info", map_dir, "--json")
    info = json.loads(out)
    assert rc == 0 and info["steps"] == STEPS and info["keyframes"] >= 3
    assert info["world_frame"] == "map" and info["size_bytes"] > 10_000
    lo, hi = np.array(info["bounds"])
    room = SyntheticRoom(0)
    assert np.all(lo <= room.objects[0].box_min) and np.all(hi >= room.objects[0].box_max)
    assert "colour" in json.dumps(info["encoders"])
    rc, out, _ = run_cli(capsys, "info", map_dir)
    assert rc == 0 and f"steps:      {STEPS}" in out and "MiB on disk" in out


@pytest.mark.slow
def test_steps_n_means_exactly_n_and_the_reason_is_recorded(trained):
    _, _, map_dir = trained
    info = json.loads((map_dir / "training_info.json").read_text())
    assert info["steps"] == STEPS and info["stop_reason"] == "steps"
    conv = info["convergence"]
    assert conv["step"] == STEPS and conv["usable"] is False and 0 < conv["progress"] < 1
    assert conv["note"].startswith("converging: ") and info["nonfinite_steps"] == 0


@pytest.mark.slow
def test_without_steps_training_stops_when_the_map_is_usable(trained, capsys, tmp_path):
    _, bag, _ = trained
    rc, out, err = run_cli(capsys, "train", bag, "--out", tmp_path / "m", "--preset", "tiny",
                           "--depth-topic", DEPTH, "--device", "cpu", "--no-progress")
    assert rc == 0, err
    info = json.loads((tmp_path / "m" / "training_info.json").read_text())
    assert info["stop_reason"] == "usable" and info["convergence"]["usable"] is True
    assert info["steps"] < 3000  # the tiny preset's cap
    assert info["convergence"]["psnr_db"] > 25 and info["convergence"]["depth_disagreement"] < 0.05
    assert "stopped: the map is usable; map usable (progress 1.00): usable: held-out PSNR" in out


def test_missing_topic_exits_nonzero_with_message(tmp_path, capsys):
    bag = tmp_path / "bag"
    assert main(["demo-bag", str(bag), "--frames", "3", "--no-depth"]) == 0
    capsys.readouterr()
    rc, _, err = run_cli(capsys, "train", bag, "--out", tmp_path / "m", "--preset", "tiny",
                         "--depth-topic", DEPTH, "--no-progress")
    assert rc == 1 and "depth topic '/camera/depth/image_rect_raw' not in the bag" in err
    assert "/camera/color/image_raw" in err and "Traceback" not in err
    rc, _, err = run_cli(capsys, "train", bag, "--out", tmp_path / "m", "--preset", "tiny",
                         "--world-frame", "world", "--no-progress")
    assert rc == 1 and "never connects world frame 'world'" in err


def test_truncated_bag_exits_nonzero(tmp_path, capsys):
    for fmt in ("mcap", "sqlite3"):
        bag = tmp_path / fmt
        assert main(["demo-bag", str(bag), "--frames", "3", "--format", fmt]) == 0
        data = next(p for p in bag.iterdir() if p.suffix in (".mcap", ".db3"))
        data.write_bytes(data.read_bytes()[: data.stat().st_size * 2 // 3])
        capsys.readouterr()
        rc, _, err = run_cli(capsys, "train", bag, "--out", tmp_path / f"m_{fmt}", "--preset", "tiny",
                             "--no-progress")
        assert rc == 1 and "corrupt or truncated" in err


def test_bad_map_and_console_entry_without_traceback(tmp_path):
    # A real process: the console entry prints one line, no traceback, exit status 1.
    proc = subprocess.run([sys.executable, "-m", "lerf_ros.tools.cli", "query", str(tmp_path / "nomap"), "x"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and "map directory not found" in proc.stderr
    assert "Traceback" not in proc.stderr
    (tmp_path / "empty").mkdir()
    proc = subprocess.run([sys.executable, "-m", "lerf_ros.tools.cli", "info", str(tmp_path / "empty")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and "invalid map" in proc.stderr and "Traceback" not in proc.stderr


def test_train_option_image_transport_compressed(tmp_path, capsys):
    bag = tmp_path / "bag"
    assert main(["demo-bag", str(bag), "--frames", "3", "--compressed", "png"]) == 0
    capsys.readouterr()
    # Without image_transport=compressed the raw topic is missing: a clear error naming what exists.
    rc, _, err = run_cli(capsys, "train", bag, "--out", tmp_path / "m", "--preset", "tiny", "--no-progress")
    assert rc == 1 and "/camera/color/image_raw/compressed" in err
    rc, _, err = run_cli(capsys, "train", bag, "--out", tmp_path / "m", "--preset", "tiny", "--no-progress",
                         "--image-transport", "compressed", "--steps", "1", "--device", "cpu")
    # 3 frames spread over one loop of the room: each is a keyframe, so one step trains a map.
    assert rc == 0, err
    info = json.loads((tmp_path / "m" / "training_info.json").read_text())
    assert info["frames"] == 3 and info["keyframes"] == 3 and info["steps"] == 1


def test_weight_files_become_absolute_encoder_checkpoints(tmp_path, monkeypatch):
    from lerf_ros.ros.params import resolve
    from lerf_ros.tools.cli import _train_params, build_parser

    monkeypatch.chdir(tmp_path)
    args = build_parser().parse_args(["train", "bag", "--out", "map", "--preset", "lite",
                                      "--clip-checkpoint", "clip.bin", "--dino-checkpoint", "w/dino.pth"])
    values = _train_params(args)
    assert values["clip_checkpoint"] == str(tmp_path / "clip.bin")
    assert values["dino_checkpoint"] == str(tmp_path / "w" / "dino.pth")
    engine = resolve(values).engine
    assert dict(engine.dino_encoder.kwargs)["checkpoint_path"] == str(tmp_path / "w" / "dino.pth")
    assert dict(engine.clip_encoder.kwargs)["checkpoint_path"] == str(tmp_path / "clip.bin")


def test_train_without_preset_uses_openclip_and_dino_and_names_missing_weights(tmp_path, capsys, monkeypatch):
    # The default preset is the robot's; with no weights on the machine it stops, listing the paths searched,
    # and never trains with the demo colour encoder.
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    for name in ("OPENCLIP_CACHE_DIR", "HF_HUB_CACHE", "HF_HOME", "TORCH_HOME"):
        monkeypatch.delenv(name, raising=False)
    rc, _, err = run_cli(capsys, "train", tmp_path / "bag", "--out", tmp_path / "m", "--no-progress")
    assert rc == 1 and "Traceback" not in err
    assert "OpenCLIP weights for ViT-B-16 (laion2b_s34b_b88k) not found; looked for:" in err
    assert str(tmp_path / "home" / ".cache" / "clip" / "laion2b_s34b_b88k.pth") in err
    assert not (tmp_path / "m").exists()


def test_query_accepts_a_journal_and_names_its_damaged_entries(tmp_path, capsys):
    # A node's journal (core/journal.py) is a map: the query answers from its model checkpoint.
    from lerf_ros.core.engine import LERFEngine
    from lerf_ros.core.journal import Journal, JournalConfig, kf_name
    from lerf_ros.core.presets import make_preset
    from lerf_ros.sim.scene import default_intrinsics, make_frames, orbit_trajectory

    room, root = SyntheticRoom(0), tmp_path / "journal"
    engine = LERFEngine(make_preset("tiny"), "cpu")
    engine.attach_journal(Journal(JournalConfig(str(root))))
    for frame in make_frames(room, orbit_trajectory(room, 8), default_intrinsics(48, 36))[:5]:
        engine.add_frame(frame)
    while engine.train_step < 3:
        engine.step(1)
    assert engine.checkpoint_journal(force=True)
    ans = query_json(capsys, root, "red box")
    assert ans["model_step"] == engine.train_step
    blob = bytearray((root / kf_name(1)).read_bytes())
    blob[-5] ^= 0xFF
    (root / kf_name(1)).write_bytes(bytes(blob))
    rc, out, err = run_cli(capsys, "query", root, "red box", "--json")
    assert rc == 0 and json.loads(out)["model_step"] == engine.train_step
    assert f"{kf_name(1)}: checksum mismatch (corrupted)" in err and err.startswith("warning: ")
