"""Offline tools: the ``lerf-ros`` command line, rosbag2 I/O, PLY and PNG output, the main-job demo."""
