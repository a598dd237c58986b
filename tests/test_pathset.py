"""The driver's set of paths that got their row in this run (app.output.resume.PathSet): which paths are
new, within one call and across calls and merges of its sorted runs, and its memory."""

import numpy as np
import pytest

from app.output.resume import PathSet


def test_only_the_first_occurrence_of_a_path_is_new_within_a_call_and_across_calls():
    seen = PathSet()
    assert seen.add_new(["a.jpg", "b.jpg", "a.jpg", "c.jpg", "a.jpg"]).tolist() == [True, True, False, True, False]
    assert seen.add_new(["c.jpg", "d.jpg", "d.jpg", "b.jpg"]).tolist() == [False, True, False, False]
    assert seen.add_new([]).tolist() == []
    assert seen.contains(["a.jpg", "x.jpg", "d.jpg", "A.jpg"]).tolist() == [True, False, True, False]
    assert "b.jpg" in seen and "x.jpg" not in seen
    assert len(seen) == 4


def test_paths_stay_found_across_merges_of_its_runs():
    seen = PathSet(buffer_rows=2)  # a run every two new paths, merged into the one before as they grow
    assert seen.add_new(["p0", "p1", "p0"]).tolist() == [True, True, False]
    assert seen.add_new(["p2", "p1", "p3"]).tolist() == [True, False, True]
    assert [len(run) for run in seen.runs] == [4] and len(seen.buffer) == 0  # runs of 2 and 2, merged
    assert seen.add_new(["p4"]).tolist() == [True]
    assert seen.add_new(["p5", "p4", "p0"]).tolist() == [True, False, False]
    assert [len(run) for run in seen.runs] == [6]  # 4 and 2, merged
    assert seen.add_new(["p6", "p7", "p3", "p6"]).tolist() == [True, True, False, False]
    assert [len(run) for run in seen.runs] == [6, 2]
    assert seen.add_new(["p8", "p9", "p7"]).tolist() == [True, True, False]
    assert [len(run) for run in seen.runs] == [10] and all(np.all(run[:-1] < run[1:]) for run in seen.runs)
    assert seen.contains([f"p{i}" for i in range(12)]).tolist() == [True] * 10 + [False] * 2
    assert len(seen) == 10


def test_many_calls_agree_with_a_python_set():
    rng = np.random.default_rng(7)
    seen, expected = PathSet(buffer_rows=50), set()
    for _ in range(200):
        paths = [f"s3://bucket/{n}.jpg" for n in rng.integers(0, 3000, rng.integers(0, 40))]
        new = []
        for path in paths:
            new.append(path not in expected)
            expected.add(path)
        assert seen.add_new(paths).tolist() == new
    assert len(seen) == len(expected) and len(seen.runs) <= np.log2(len(expected) / 50) + 1
    asked = [f"s3://bucket/{n}.jpg" for n in range(3100)]
    assert seen.contains(asked).tolist() == [path in expected for path in asked]


@pytest.mark.slow
def test_a_million_paths_take_16_bytes_each():
    seen = PathSet()
    for start in range(0, 1_000_000, 20_000):
        assert seen.add_new([f"s3://bucket/images/{n:09d}.jpg" for n in range(start, start + 20_000)]).all()
    assert len(seen) == 1_000_000
    assert seen.nbytes == sum(array.nbytes for array in [seen.buffer, *seen.runs]) == 16_000_000
