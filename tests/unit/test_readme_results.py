"""Every number of the README's results block comes from the committed results files: the block
is what benchmarks/readme_results.py renders from them (#38)."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit
ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))


def test_the_readme_results_blocks_are_rendered_from_the_results_files():
    import readme_results

    text = (ROOT / "README.md").read_text()
    for name in readme_results.BLOCKS:
        assert readme_results.readme_block(text, name) == readme_results.RENDER[name](), \
            f"README.md's {name} block is stale: python benchmarks/readme_results.py --write"


def test_an_interval_across_zero_is_no_measurable_difference():
    import readme_results

    assert readme_results._say({"mean": -2.0, "ci95": [-5.0, 1.0]}).endswith("no measurable difference")
    assert readme_results._say({"mean": -2.0, "ci95": [-3.0, -1.0]}).endswith("lower")
    assert readme_results._say({"mean": 2.0, "ci95": [1.0, 3.0]}).endswith("higher")
