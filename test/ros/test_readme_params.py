"""The README's parameter table lists exactly the declared parameters, with their node and type."""

import re
from pathlib import Path

from lerf_ros.ros.params import PARAMETERS, PRESET, TRAINER

README = Path(__file__).resolve().parents[2] / "README.md"


def _table_rows() -> dict[str, list[str]]:
    text = README.read_text()
    block = text[text.index("<!-- params-table -->"):text.index("<!-- /params-table -->")]
    rows = {}
    for line in block.splitlines():
        m = re.match(r"\| `([a-z_]+)` \|", line)
        if m:
            rows[m.group(1)] = [c.strip() for c in line.strip("|").split(" | ")]
    return rows


def test_readme_lists_every_declared_parameter_once():
    rows = _table_rows()
    declared = [s.name for s in PARAMETERS]
    assert sorted(rows) == sorted(declared)


def test_readme_rows_match_node_and_type():
    rows = _table_rows()
    for spec in PARAMETERS:
        node = "both" if len(spec.nodes) == 2 else ("trainer" if TRAINER in spec.nodes else "query")
        assert rows[spec.name][1:3] == [node, spec.type.__name__], spec.name


def test_readme_defaults_are_the_declared_defaults():
    # The safe defaults (preset 'default': OpenCLIP + DINO) are what a robot user reads here first.
    rows = _table_rows()
    for spec in PARAMETERS:
        want = {PRESET: "preset", None: "unset"}.get(spec.default, f"`{spec.default!r}`")
        assert rows[spec.name][3] == want, spec.name
