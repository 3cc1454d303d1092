"""Fixtures shared by the synthetic-room tests."""

import importlib.util
import sys
from pathlib import Path

import pytest

BENCH_QUALITY = Path(__file__).resolve().parents[2] / "bench" / "quality.py"


@pytest.fixture(scope="session")
def quality_bench():
    """bench/quality.py, loaded as a module (bench/ is not a package)."""
    spec = importlib.util.spec_from_file_location("lerf_bench_quality", BENCH_QUALITY)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve the module by name
    spec.loader.exec_module(module)
    return module
