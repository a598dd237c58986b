"""The benchmark's inputs suite at a small scale. Its own module: each case starts Ray in a fresh process,
which needs no other Ray instance up on the machine (the other bench tests share one)."""

from app import bench


def test_input_stage_suite(tmp_path):
    """The inputs suite at a small scale, each case in a fresh process with its own Ray: a tree and a
    manifest larger than the driver lists itself are streamed; the resume finds every path done."""
    results = bench.main(["inputs", "--tree-files", "25000", "--manifest-paths", "30000", "--out", ""])
    cases = results["inputs"]
    assert list(cases) == ["tree of 25000 files", "manifest of 30000 paths", "resume: 30000 paths, every one committed"]
    assert [(case["inputs"], case["todo"]) for case in cases.values()] == [(25000, 25000), (30000, 30000), (30000, 0)]
    assert all(0 < case["first_block_s"] <= case["seconds"] and case["driver_peak_above_idle_mb"] > 0 for case in cases.values())
    # The app itself on the largest manifest, stopped at its first committed file.
    assert cases["manifest of 30000 paths"]["first_result_s"] > 0
    assert [name for name, case in cases.items() if "first_result_s" in case] == ["manifest of 30000 paths"]
