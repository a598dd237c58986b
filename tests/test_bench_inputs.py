"""The benchmark's inputs suite at a small scale. Its own module: the suite starts Ray in a fresh process,
which needs no other Ray instance up on the machine (the other bench tests share one)."""

import pytest

from app import bench
from app.listing import DRIVER_LISTING_ENTRIES

pytestmark = pytest.mark.slow  # the suite starts Ray

# Just over what the driver lists itself (app.listing.DRIVER_LISTING_ENTRIES, 20,000), so that both are
# streamed by Ray tasks; larger inputs only take longer here (the benchmark's defaults: a million files,
# ten million paths).
TREE_FILES = 20_500
MANIFEST_PATHS = 21_000


def test_input_stage_suite(tmp_path):
    """The inputs suite at a small scale, its cases in turn in a fresh process with its own Ray: a tree and
    a manifest larger than the driver lists itself are streamed; the resume finds every path done."""
    assert min(TREE_FILES, MANIFEST_PATHS) > DRIVER_LISTING_ENTRIES
    results = bench.main(["inputs", "--tree-files", str(TREE_FILES), "--manifest-paths", str(MANIFEST_PATHS), "--out", ""])
    cases = results["inputs"]
    assert list(cases) == ["tree of 20500 files", "manifest of 21000 paths", "resume: 21000 paths, every one committed"]
    assert [(case["inputs"], case["todo"]) for case in cases.values()] == [(20500, 20500), (21000, 21000), (21000, 0)]
    assert all(0 < case["first_block_s"] <= case["seconds"] and case["driver_peak_above_idle_mb"] > 0 for case in cases.values())
    # The app itself on the largest manifest, stopped at its first committed file.
    assert cases["manifest of 21000 paths"]["first_result_s"] > 0
    assert [name for name, case in cases.items() if "first_result_s" in case] == ["manifest of 21000 paths"]
