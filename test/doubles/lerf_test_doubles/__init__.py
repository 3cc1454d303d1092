"""Test doubles for lerf_ros (never part of the product): encoders with known, controllable statistics.

Put ``test/doubles`` on ``sys.path`` (test/conftest.py and the benchmarks do) and select them like any
encoder plugin, e.g. ``"lerf_test_doubles.cliplike:cliplike_encoder"``.
"""
