"""bench/quality.py's streaming figures from a query-round curve (no training: hand-made curves)."""

import pytest


@pytest.fixture
def quality(quality_bench):
    return quality_bench


def _curve(*points):
    return [{"t_s": t, "step": 10 * i, "frames": i, "located": f} for i, (t, f) in enumerate(points)]


def test_mean_located_is_the_time_average_of_the_rounds(quality):
    # 0 until 10 s, 0.5 until 30 s, 1.0 from then to the cap (a run that stopped at its t90)
    assert quality.mean_located(_curve((10.0, 0.5), (30.0, 1.0)), 100.0) == pytest.approx(
        (0.5 * 20 + 1.0 * 70) / 100)
    # a round after the cap counts up to the cap only; no round at all: 0
    assert quality.mean_located(_curve((50.0, 1.0), (120.0, 0.0)), 100.0) == pytest.approx(0.5)
    assert quality.mean_located([], 100.0) == 0.0


def test_the_streaming_table_prints_the_mean_per_room_and_over_the_rooms(quality):
    rows = [{"query": "red box", "kind": "present", "found": True, "located": True, "has_lookalike": False,
             "lookalike_hit": None, "error_m": 0.02}]
    room = {"seed": 3, "size_m": [4.0, 5.0]}
    results = [{"room": room, "rows": rows, "stream": {"t90_s": 30.0, "cap_s": 100.0,
                                                       "curve": _curve((10.0, 0.5), (30.0, 1.0))}},
               {"room": room, "rows": rows, "stream": {"t90_s": None, "cap_s": 100.0,
                                                       "curve": _curve((50.0, 1.0), (100.0, 0.0))}}]
    text = quality.table(quality.Condition("rgb-cliplike", False, "cliplike"), results)
    assert "30.0; mean 0.80" in text and "(max 100 %); mean 0.50" in text
    assert "mean located over the cap 0.65 (2 rooms)" in text
