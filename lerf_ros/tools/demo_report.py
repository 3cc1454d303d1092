"""The demo's report: ground-truth rows of the synthetic room, the score of one answer, the markdown table.

Shared by the demo driver (``tools/demo.py``) and the planner client (``tools/demo_client.py``), so neither
imports the other.
"""

from __future__ import annotations

#: An answer counts as correct when it lies inside the object's ground-truth box grown by this, metres.
BOX_MARGIN_M = 0.05


def ground_truth_rows(room) -> list[tuple[str, object | None]]:
    """(query text, SceneObject or None for absent) in table order."""
    return [(o.name, o) for o in room.objects] + [(name, None) for name in room.absent_names]


def score(obj, found: bool, location) -> dict:
    """Error against ground truth: distance to the box centre, inside box + margin, correct or not."""
    import numpy as np

    if obj is None:
        return {"present": False, "error_m": None, "in_box": None, "correct": not found}
    if location is None:
        return {"present": True, "error_m": None, "in_box": False, "correct": False}
    p = np.asarray(location, dtype=np.float64)
    inside = bool(np.all(p >= obj.box_min - BOX_MARGIN_M) and np.all(p <= obj.box_max + BOX_MARGIN_M))
    return {"present": True, "error_m": float(np.linalg.norm(p - obj.center)), "in_box": inside,
            "correct": bool(found and inside)}


def markdown_table(rows: list[dict], encoder_note: str) -> str:
    # targets: how many instances the reply listed (Query.srv max_results; the location is the best one).
    head = ("| query | in room | found | location x, y, z (m, map) | error to centre (m) | inside box+5cm "
            "| relevancy | correct | targets |\n|---|---|---|---|---|---|---|---|---|")
    lines = [head]
    for r in rows:
        loc = r["location"]
        where = "-" if loc is None else f"{loc['x']:.2f}, {loc['y']:.2f}, {loc['z']:.2f}"
        err = "-" if r["error_m"] is None else f"{r['error_m']:.3f}"
        inside = "-" if r["in_box"] is None else ("yes" if r["in_box"] else "no")
        yes = {True: "yes", False: "no"}
        targets = len(r.get("targets", []))
        lines.append(f"| {r['query']} | {yes[r['present']]} | {yes[r['found']]} | {where} | {err} | {inside} "
                     f"| {r['relevancy']:.3f} | {'yes' if r['correct'] else 'NO'} | {targets} |")
    present = [r for r in rows if r["present"]]
    absent = [r for r in rows if not r["present"]]
    lines += ["", f"present objects localised: {sum(r['correct'] for r in present)}/{len(present)}; "
              f"absent objects correctly not found: {sum(r['correct'] for r in absent)}/{len(absent)}",
              f"encoder: {encoder_note}"]
    return "\n".join(lines)
