"""Test-wide settings.

DDS must stay on loopback: every test process (and every child process it starts, which inherits
os.environ) uses localhost-only discovery and a random domain, set here before rclpy is imported.
CUDA-only tests are skipped in this one place when no GPU is present.
"""

import os
import random
import sys
from pathlib import Path

os.environ["ROS_AUTOMATIC_DISCOVERY_RANGE"] = "LOCALHOST"
os.environ["ROS_LOCALHOST_ONLY"] = "1"
# A domain per test session keeps parallel runs (other checkouts, CI) from seeing each other.
os.environ.setdefault("ROS_DOMAIN_ID", str(random.SystemRandom().randint(1, 101)))
os.environ.setdefault("OMP_NUM_THREADS", "2")

import pytest

# Test doubles (encoders with controlled statistics) are plugins selected by module name.
sys.path.insert(0, str(Path(__file__).resolve().parent / "doubles"))


def _cuda_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


def pytest_collection_modifyitems(config, items):
    if _cuda_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU; none on this machine")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)
