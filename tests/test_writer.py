"""Committing result rows (app.output.writer.ResultWriter) in-process: files of rows_per_file rows, and
the rows of the last commit_interval_s committed once the interval has passed and rows arrive."""

import types

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from app.output import writer
from app.output.dataset import RESULT_SCHEMA
from app.output.writer import ResultWriter
from app.storage import resolve


def rows(*numbers: int) -> pa.Table:
    """Result rows of img<n>.jpg, one per number, without detections."""
    names = [f"img{n}.jpg" for n in numbers]
    return pa.Table.from_pylist(
        [dict(path=name, width=4, height=3, boxes=[], scores=[], labels=[], label_names=[], num_detections=0,
              error_kind=None, error=None) for name in names],
        schema=RESULT_SCHEMA,
    )


class Clock:
    """Stands in for time.monotonic in app.output.writer: the test says what time it is, so that the
    interval passes without the test waiting it out."""

    def __init__(self):
        self.now = 1000.0

    def monotonic(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch):
    clock = Clock()
    monkeypatch.setattr(writer, "time", types.SimpleNamespace(monotonic=clock.monotonic))
    return clock


def committed(folder) -> list[list[str]]:
    """The paths in each committed file, file by file in name order."""
    return [pq.read_table(path).column("path").to_pylist() for path in sorted(folder.glob("part-*.parquet"))]


def test_rows_below_a_file_are_committed_once_the_interval_has_passed_and_rows_arrive(tmp_path, clock):
    out = tmp_path / "out"
    results = ResultWriter(resolve(str(out)), "run", rows_per_file=10, commit_interval_s=60)
    clock.now += 10
    results.add(rows(0, 1, 2))
    clock.now += 49.5  # 59.5 s after the start: not yet
    results.add(rows(3, 4))
    assert committed(out) == []
    clock.now += 100  # nothing arrives: nothing is committed, however long it takes
    assert committed(out) == []
    results.add(rows(5))  # the interval has passed and a row arrives: the 6 pending rows are committed
    assert committed(out) == [["img0.jpg", "img1.jpg", "img2.jpg", "img3.jpg", "img4.jpg", "img5.jpg"]]
    clock.now += 59.5
    results.add(rows(6, 7, 8, 9))
    assert len(committed(out)) == 1  # 59.5 s after that commit: not yet
    clock.now += 0.5
    results.add(rows(10))  # exactly 60 s after it
    assert committed(out)[1:] == [["img6.jpg", "img7.jpg", "img8.jpg", "img9.jpg", "img10.jpg"]]
    # A full file is committed when its rows arrive, whatever the time, and restarts the interval.
    clock.now += 1
    results.add(rows(*range(11, 23)))
    assert committed(out)[2:] == [[f"img{n}.jpg" for n in range(11, 21)]]
    clock.now += 59.5
    results.add(rows(23))
    assert len(committed(out)) == 3
    results.close()  # the rest at the end
    assert committed(out)[3:] == [["img21.jpg", "img22.jpg", "img23.jpg"]]
    assert [len(paths) for paths in committed(out)] == [6, 5, 10, 3]
    assert sorted(path.name for path in out.iterdir()) == [f"part-run-{n:06d}.parquet" for n in range(4)]
