# Sourced by scripts/test.sh and scripts/demo.sh: DDS must never leave this machine. Localhost-only discovery
# and a random domain per run (parallel runs on one host do not see each other).
export ROS_AUTOMATIC_DISCOVERY_RANGE=LOCALHOST
export ROS_LOCALHOST_ONLY=1
export ROS_DOMAIN_ID=$(( RANDOM % 101 + 1 ))
unset _ROS_WHEELS_BOOTSTRAP_COMPLETE  # let the venv's python set its own LD_LIBRARY_PATH
