"""The ROS 2 adapter: thin nodes over the core (``lerf_ros.core``), their parameters and messages."""
