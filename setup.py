"""pip install path of the lerf_ros Python package (no-ROS venv, see scripts/setup.sh).

On a robot the package is built by CMakeLists.txt with colcon instead; the console scripts below are the same
executables CMakeLists.txt installs into lib/lerf_ros (test/foundation/test_interfaces.py keeps both in sync).
The generated interfaces (lerf_ros.msg / lerf_ros.srv) are not part of this distribution: CMake builds them.
"""

from setuptools import find_packages, setup

CONSOLE_SCRIPTS = [
    "lerf-ros = lerf_ros.tools.cli:main",
    "lerf_trainer_node = lerf_ros.ros.main:trainer_main",
    "lerf_query_node = lerf_ros.ros.main:query_main",
    "lerf_node = lerf_ros.ros.main:main",
]

setup(
    name="lerf_ros",
    version="0.1.0",
    description="Online LERF language fields for ROS 2: train while moving, answer 3D language queries",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=find_packages(include=["lerf_ros", "lerf_ros.*"]),
    # torch, open_clip and the ROS 2 wheels are pinned in requirements.txt (installed by scripts/setup.sh).
    install_requires=["numpy"],
    entry_points={"console_scripts": CONSOLE_SCRIPTS},
)
