"""Start-up of lerf_node: safe defaults, the demo-encoder warning, ROS pieces on a machine with ROS.

The process tests start the real launcher with the shipped config/lerf.yaml (no ros2 launch here).
"""

import os
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from ros_harness import CONFIG, ROOT, launcher

import lerf_ros.compat.diagnostics as compat_diagnostics
import lerf_ros.compat.tf as compat_tf
from lerf_ros.compat import image as compat_image
from lerf_ros.ros import main as ros_main

#: Where the encoders look for weights besides $HOME: emptied so the test machine's caches cannot help.
_CACHE_VARS = ("OPENCLIP_CACHE_DIR", "HF_HUB_CACHE", "HF_HOME", "TORCH_HOME")
_ROS_VARS = ("ROS_DISTRO", "ROS_VERSION", "AMENT_PREFIX_PATH")


class Logger:
    def __init__(self):
        self.records = []

    def info(self, text):
        self.records.append(("info", text))

    def warning(self, text):
        self.records.append(("warning", text))


def _env(home: Path, **extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in _CACHE_VARS + _ROS_VARS}
    env.update(HOME=str(home), PYTHONUNBUFFERED="1", **extra)
    return env


def test_report_encoders_names_both_and_warns_only_for_demo_ones():
    import torch

    from lerf_ros.core.encoders import DEMO_CLIP, DEMO_DENSE, EncoderSpec, load_encoder

    cpu = torch.device("cpu")
    demo_clip = load_encoder(EncoderSpec(DEMO_CLIP), cpu)
    demo_dense = load_encoder(EncoderSpec(DEMO_DENSE), cpu, dense=True)
    real_like = load_encoder(EncoderSpec("lerf_test_doubles.cliplike:cliplike_encoder"), cpu)

    log = Logger()
    ros_main.report_encoders(log, SimpleNamespace(clip_encoder=demo_clip, dino_encoder=demo_dense))
    assert log.records[0] == ("info", f"encoders: CLIP {demo_clip.name!r}, DINO {demo_dense.name!r}")
    [(level, text)] = log.records[1:]
    assert level == "warning" and "DEMO encoder in use" in text
    assert demo_clip.name in text and demo_dense.name in text and "preset 'default'" in text

    log = Logger()
    ros_main.report_encoders(log, SimpleNamespace(clip_encoder=real_like, dino_encoder=demo_dense))
    warnings = [text for level, text in log.records if level == "warning"]
    assert len(warnings) == 1 and demo_dense.name in warnings[0] and real_like.name not in warnings[0]

    log = Logger()
    dino_like = SimpleNamespace(name="timm-dino:vit_small_patch16_224.dino:x")
    ros_main.report_encoders(log, SimpleNamespace(clip_encoder=real_like, dino_encoder=dino_like))
    assert [level for level, _ in log.records] == ["info"]


def test_substitutes_are_announced_as_a_warning_where_no_ros_is_installed(monkeypatch):
    for name in _ROS_VARS:
        monkeypatch.delenv(name, raising=False)
    log = Logger()
    ros_main.check_ros_pieces(log)
    [(level, text)] = log.records
    if (compat_tf.HAVE_TF2_ROS and compat_image.have_cv_bridge()
            and compat_diagnostics.HAVE_DIAGNOSTIC_UPDATER):
        assert level == "info" and "using the installed" in text
    else:
        assert level == "warning" and text.startswith("no ROS 2 install detected")


def test_with_no_arguments_start_up_fails_without_weights_naming_the_paths(tmp_path):
    # The shipped config and no overrides: the robot's `default` preset (OpenCLIP + DINO). With no weights
    # anywhere, start-up stops with exit status 2 and lists every path searched; no demo encoder fallback.
    home = tmp_path / "home"
    cmd = [sys.executable, "-m", "lerf_ros.compat.launcher", "--params", str(CONFIG), "--mode", "trainer"]
    out = subprocess.run(cmd, cwd=ROOT, env=_env(home), capture_output=True, text=True, timeout=300)
    text = out.stdout + out.stderr
    assert out.returncode == 2, text
    assert "cannot start" in text and "preset 'default'" in text, text
    assert "OpenCLIP weights for ViT-B-16 (laion2b_s34b_b88k) not found; looked for:" in text
    for path in (home / ".cache" / "huggingface" / "hub", home / ".cache" / "clip"):
        assert f"{path}/laion2b_s34b_b88k.safetensors" in text, path
    assert "set clip_checkpoint and dino_checkpoint" in text  # the node's names for checkpoint_path
    assert "demo-colour" not in text and "DEMO encoder" not in text
    assert "no ROS 2 install detected" in text  # the substitutes said so before the engine was built


def test_the_tiny_preset_starts_and_warns_that_the_demo_encoder_answers(tmp_path):
    log_path = tmp_path / "lerf_node.log"
    node = launcher(log_path, "device:=cpu", mode="trainer")  # the harness sets preset:=tiny
    try:
        deadline = time.monotonic() + 120.0
        while "DEMO encoder in use" not in node.log(20000) and time.monotonic() < deadline:
            assert node.alive, node.log()
            time.sleep(0.2)  # polling the log file; the loop ends as soon as the line is there
        text = node.log(20000)
        assert "DEMO encoder in use (demo-colour-names-v1" in text, text
        assert "encoders: CLIP 'demo-colour-names-v1" in text
    finally:
        assert node.stop() == 0, node.log()


@pytest.mark.skipif(compat_tf.HAVE_TF2_ROS and compat_image.have_cv_bridge(),
                    reason="tf2_ros and cv_bridge both import here: nothing is missing")
def test_on_a_ros_machine_missing_tf2_ros_or_cv_bridge_stops_start_up(tmp_path):
    cmd = [sys.executable, "-m", "lerf_ros.compat.launcher", "--params", str(CONFIG), "--mode", "trainer",
           "--set", "preset:=tiny"]
    env = _env(tmp_path / "home", ROS_DISTRO="jazzy", ROS_VERSION="2")
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    text = out.stdout + out.stderr
    assert out.returncode == 2, text
    assert "cannot start: ROS 2 is installed here (ROS_DISTRO=jazzy, ROS_VERSION=2)" in text
    assert "substitutes serve only machines without a ROS install" in text
    if not compat_tf.HAVE_TF2_ROS:
        assert "tf2_ros does not import" in text and "ros-jazzy-tf2-ros-py" in text
    assert "encoders:" not in text  # stopped before any engine was built
