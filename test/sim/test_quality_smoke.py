"""Quality smoke test: one fixed random room, RGB-D, demo colour encoder, through bench/quality.py's code
(bag -> ``lerf-ros train`` in process -> load map -> query every object and the absent names)."""

import argparse

import pytest

SEED = 10
#: A fixed budget (lerf-ros train's own stopping rule varies 1600-3000 steps, 45-100 s here) and a fixed
#: torch seed (the engine does not seed its fields' initialisation: unseeded runs located 2/6 to 5/6).
STEPS, TORCH_SEED = 1600, 0
#: Measured (2 shared cores, ~45 s of training): 4/6 located with torch seeds 0, 1 and 2 (missed: the
#: 4.6 cm black cylinder on the table, relevancy 0.06; the purple mat at 0.39-0.48 or the partly hidden
#: cyan sphere at 0.61), 2/2 absent names rejected, no look-alike confusion, median error 0.10-0.15 m.
MIN_LOCATED = 4 / 6


@pytest.mark.slow
def test_one_room_rgbd_colour(tmp_path, quality_bench):
    import torch

    quality = quality_bench
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        room, bags, info = quality.write_bags(SEED, tmp_path, depths=(True,))
        args = argparse.Namespace(preset="tiny", device="cpu", steps=STEPS, torch_seed=TORCH_SEED)
        result = quality.train_and_query(room, bags[True], quality.Condition("rgbd-colour", True, "colour"),
                                         tmp_path, args)
    finally:
        torch.set_num_threads(threads)
    assert "error" not in result and result["steps"] == STEPS
    summary = quality.summarise(result["rows"])
    assert summary["objects"] == len(room.objects) == len(info["objects"])
    located = summary["located"] / summary["objects"]
    assert located >= MIN_LOCATED, [(r["query"], r["found"], r["location"]) for r in result["rows"]]
    assert summary["rejected"] == summary["absent"] >= 2
    assert summary["lookalike_confusions"] == 0
    assert summary["median_error_m"] < 0.25
    # Every answer is a full row: the QueryResult's fields (but the clouds) and the scoring.
    for row in result["rows"]:
        assert {"query", "found", "location", "relevancy", "message", "located", "model_step"} <= set(row)
        assert "cloud_xyz" not in row
