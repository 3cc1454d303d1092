"""Start lerf_node (trainer + query node in one process, sharing the model) with config/lerf.yaml.

    ros2 launch lerf_ros lerf.launch.py image_topic:=/rgb/image_raw device:=cuda \
        clip_checkpoint:=/models/open_clip_pytorch_model.bin \
        dino_checkpoint:=/models/dino_deitsmall16_pretrain.pth

Every launch argument is a node parameter; its default is the value in config/lerf.yaml, so leaving an
argument out keeps the YAML's value: the `default` preset (OpenCLIP + DINO from local weights; without
them start-up fails and names the paths searched, it never falls back to the demo colour encoder).
Without ros2 launch, the same configuration starts with
``python -m lerf_ros.compat.launcher --params config/lerf.yaml --set name:=value``.
"""

import os

import yaml
from ament_index_python.packages import get_package_share_directory
from launch.actions import DeclareLaunchArgument
from launch.substitutions import LaunchConfiguration
from launch_ros.actions import Node
from launch_ros.parameter_descriptions import ParameterValue

from launch import LaunchDescription

#: Same names as lerf_ros.compat.launcher.LAUNCH_ARGUMENTS (a test keeps them equal).
LAUNCH_ARGUMENTS = ("image_topic", "camera_info_topic", "depth_topic", "world_frame", "preset", "device",
                    "clip_encoder", "dino_encoder", "clip_checkpoint", "dino_checkpoint",
                    "map_path")


def _yaml_defaults(path):
    """Parameter values in the params YAML: the /** entry, then each node's own (both nodes together)."""
    with open(path, encoding="utf-8") as f:
        data = yaml.safe_load(f) or {}
    values = {}
    for key in sorted(data, key=lambda k: k != "/**"):
        values.update((data[key] or {}).get("ros__parameters", {}) or {})
    return values


def generate_launch_description():
    params_file = os.path.join(get_package_share_directory("lerf_ros"), "config", "lerf.yaml")
    defaults = _yaml_defaults(params_file)
    arguments = [
        DeclareLaunchArgument(name, default_value=str(defaults.get(name, "")),
                              description=f"node parameter '{name}' (default from config/lerf.yaml)")
        for name in LAUNCH_ARGUMENTS
    ]
    # Launch arguments come after the YAML, so they override it; no `name=` here because it would rename
    # both nodes of the process to one name.
    # All of them are string parameters: value_type=str keeps "" and "0" from being re-typed by YAML.
    overrides = {name: ParameterValue(LaunchConfiguration(name), value_type=str) for name in LAUNCH_ARGUMENTS}
    node = Node(
        package="lerf_ros",
        executable="lerf_node",
        output="screen",
        emulate_tty=True,
        parameters=[params_file, overrides],
    )
    return LaunchDescription([*arguments, node])
