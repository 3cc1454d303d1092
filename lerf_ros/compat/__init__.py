"""Substitutes and adapters for ROS pieces a machine may lack (tf2_ros, cv_bridge)."""
