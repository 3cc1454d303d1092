"""Start lerf_node (trainer + query node in one process, sharing the model), nav2-style.

    ros2 launch lerf_ros lerf.launch.py namespace:=robot1 use_sim_time:=true \
        params_file:=/robot/config/lerf.yaml log_level:=info device:=cuda \
        clip_checkpoint:=/models/open_clip_pytorch_model.bin \
        dino_checkpoint:=/models/dino_deitsmall16_pretrain.pth
    # a head and a wrist camera into one map (each NS/color/image_raw, NS/color/camera_info, optional depth):
    ros2 launch lerf_ros lerf.launch.py cameras:="[head_camera, wrist_camera]"

Arguments (``ros2 launch lerf_ros lerf.launch.py --show-args``): ``namespace`` (pushes both nodes and
their relative topics and services; TF stays on /tf and /tf_static), ``use_sim_time`` (true: stamps and
timers follow /clock), ``params_file`` (default: the package's config/lerf.yaml, whose `default` preset
needs OpenCLIP and DINO weights), ``log_level``, and the node parameters in
``lerf_ros.compat.launcher.LAUNCH_ARGUMENTS`` (not given: the params file's value stays; ``cameras`` as a YAML
list or comma-separated names), ``autostart`` among them: ``autostart:=false`` leaves both (lifecycle)
nodes unconfigured for a lifecycle manager (nav2's ``lifecycle_manager`` with
``node_names: [lerf_trainer, lerf_query]``).

Every argument is checked before the node starts (``lerf_ros.compat.launcher.plan_launch``): an unknown
argument, ``use_sim_time`` that is not true / false, an unknown ``log_level``, a ``params_file`` that
does not exist or is not a params YAML, or a parameter value the nodes would refuse ends ``ros2 launch``
with an error naming it. Without ros2 launch, the same arguments start the same process with
``python -m lerf_ros.compat.launcher name:=value ...``.
"""

import os
import sys
import tempfile

from ament_index_python.packages import get_package_share_directory
from launch.actions import DeclareLaunchArgument, OpaqueFunction
from launch.substitutions import LaunchConfiguration
from launch_ros.actions import Node

from launch import LaunchDescription
from lerf_ros.compat import launcher


def generate_launch_description():
    default_params = os.path.join(get_package_share_directory("lerf_ros"), "config", "lerf.yaml")
    defaults = launcher.launch_defaults(default_params)
    arguments = [DeclareLaunchArgument(name, default_value=defaults[name],
                                       description=launcher.describe(name))
                 for name in launcher.ALL_LAUNCH_ARGUMENTS]
    return LaunchDescription([*arguments, OpaqueFunction(function=_launch_setup)])


def _launch_setup(context, *args, **kwargs):
    # ros2 launch ignores arguments nobody declared (a typo would go unnoticed): refuse them when this file
    # is the one on the command line.
    launcher.parse_launch_arguments(launcher.launch_file_arguments(sys.argv, os.path.basename(__file__)))
    values = {name: LaunchConfiguration(name).perform(context) for name in launcher.ALL_LAUNCH_ARGUMENTS}
    # Raises LaunchArgumentError / ParameterError naming the argument; ros2 launch prints it, exits non-zero.
    plan = launcher.plan_launch(values, ("trainer", "query"))
    # The overrides as a second params file under every key form that addresses the nodes (see
    # lerf_ros/compat/launcher.py: a plain parameter dict would lose to node sections in params_file).
    with tempfile.NamedTemporaryFile("w", prefix="lerf_launch_", suffix=".yaml", delete=False) as f:
        f.write(launcher.overrides_yaml(plan.parameters, plan.namespace))
    # No `name=` here: it would rename both nodes of the process to one name.
    return [Node(
        package="lerf_ros",
        executable="lerf_node",
        namespace=plan.namespace,
        output="screen",
        emulate_tty=True,
        parameters=[plan.params_file, f.name],
        ros_arguments=["--log-level", plan.log_level],
    )]
