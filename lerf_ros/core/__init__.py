"""ROS-free core of lerf_ros: torch + numpy only. Nothing below this package imports rclpy."""
