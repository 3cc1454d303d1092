"""Simulators for tests, the demo and benchmarks: synthetic rooms with ground truth, robot trajectories.

Outside the ROS-free core: ``sim`` may import ``lerf_ros.core``, the core never imports ``sim``.
``scene`` is the demo room (six primitives on a ring, an orbiting camera); ``rooms`` draws
randomised rooms from a seed; ``drive`` the robot paths and TF trees that drive through them.
"""
