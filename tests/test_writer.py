"""Committing result rows (app.output.writer.ResultWriter) in-process: files of rows_per_file rows, and
the rows of the last commit_interval_s committed once the interval has passed and rows arrive; and which
files count (app.output.dataset.committed_files)."""

import json
import types

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from app.output import writer
from app.output.dataset import LEASE_DIR, committed_files, part_name, sorted_part_files
from app.result_schema import RESULT_SCHEMA
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
    results = ResultWriter(resolve(str(out)), 7, rows_per_file=10, commit_interval_s=60)
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
    assert sorted(path.name for path in out.iterdir()) == [f"part-g0000000007-{n:06d}.parquet" for n in range(4)]
    assert [part_name(7, n) for n in range(4)] == [path.name for path in sorted(out.iterdir())]


def test_committed_files_are_those_under_their_generations_limit(tmp_path):
    """The latest readable lease says which files count: generation 1 was taken over after 2 files, 2 after 1;
    files of the current generation 3 and files named before generations (generation 0) all count. A lease
    file being created (empty) is passed over for the one before it."""
    names = ["part-old-000000.parquet", *(part_name(1, n) for n in range(3)), part_name(2, 0), part_name(2, 1), part_name(3, 0)]
    for name in names:
        pq.write_table(rows(0), tmp_path / name)
    output = resolve(str(tmp_path))
    assert [path.rsplit("/", 1)[1] for path in committed_files(output)] == sorted(names)  # no lease: all count
    (tmp_path / LEASE_DIR).mkdir()
    (tmp_path / LEASE_DIR / "0000000003.json").write_text(json.dumps({"owner": "c", "limits": {"1": 2, "2": 1}}))
    (tmp_path / LEASE_DIR / "0000000004.json").write_text("")
    committed, fenced = sorted_part_files(output)
    assert [path.rsplit("/", 1)[1] for path in committed] == [
        "part-g0000000001-000000.parquet", "part-g0000000001-000001.parquet", "part-g0000000002-000000.parquet",
        "part-g0000000003-000000.parquet", "part-old-000000.parquet",
    ]
    assert [path.rsplit("/", 1)[1] for path in fenced] == ["part-g0000000001-000002.parquet", "part-g0000000002-000001.parquet"]
    assert committed_files(output) == committed
