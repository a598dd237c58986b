"""Which rows the driver commits (app.output.verdicts): refused reads held until a probe says whose fault
they are, files that keep failing transiently committed after data.transient_runs runs, inputs listed
twice committed once. Real files on a local disk: a storage that stops serving the run is a folder that
is gone (as a deleted bucket is); tests/test_s3.py revokes a credential on a real S3 endpoint."""

import pyarrow as pa
import pytest

from app.output.dataset import read_committed
from app.result_schema import RESULT_SCHEMA
from app.output.verdicts import REFUSALS_BEFORE_PROBE, TRANSIENT_SCHEMA, StorageRefused, Verdicts, read_transient
from app.output.writer import ResultWriter
from app.storage import resolve


def result_rows(*rows: tuple[str, str, str]) -> pa.Table:
    """Result rows of (path, error_kind, error); a row without an error kind found no object in it."""
    columns = {name: [None] * len(rows) for name in RESULT_SCHEMA.names}
    columns["path"] = [path for path, _, _ in rows]
    columns["error_kind"] = [kind for _, kind, _ in rows]
    columns["error"] = [error for _, _, error in rows]
    columns["num_detections"] = [0 if kind is None else None for _, kind, _ in rows]
    return pa.table(columns, schema=RESULT_SCHEMA)


def verdicts_on(tmp_path, left_before=None, transient_runs=3) -> Verdicts:
    """Verdicts committing into tmp_path/out, of inputs under tmp_path/in."""
    (tmp_path / "in").mkdir(parents=True, exist_ok=True)
    output = resolve(str(tmp_path / "out"))
    writer = ResultWriter(output, 1, rows_per_file=100, commit_interval_s=3600)
    left_before = left_before if left_before is not None else TRANSIENT_SCHEMA.empty_table()
    return Verdicts(writer, resolve(str(tmp_path / "in")), left_before, transient_runs)


def committed(tmp_path) -> dict[str, tuple]:
    table = read_committed(resolve(str(tmp_path / "out")), ["path", "error_kind", "error"])
    return {row["path"]: (row["error_kind"], row["error"]) for row in table.to_pylist()}


def denied(tmp_path, i: int) -> tuple[str, str, str]:
    return str(tmp_path / "in" / f"denied_{i}.jpg"), "refused", f"[Errno 13] Permission denied: 'denied_{i}.jpg'"


def test_a_file_refused_among_readable_ones_is_committed_as_unreadable(tmp_path):
    verdicts = verdicts_on(tmp_path)
    readable = tmp_path / "in" / "ok.jpg"
    readable.write_bytes(b"jpeg")
    assert verdicts.add(result_rows(denied(tmp_path, 0))).num_rows == 0  # held
    assert verdicts.add(result_rows((str(readable), None, None))).num_rows == 1
    assert verdicts.finish().num_rows == 1  # the probe reads ok.jpg's metadata fine
    verdicts.close()
    assert committed(tmp_path) == {
        str(readable): (None, None),
        str(tmp_path / "in" / "denied_0.jpg"): ("unreadable", "[Errno 13] Permission denied: 'denied_0.jpg'"),
    }


def test_storage_refusing_the_run_stops_it_and_commits_none_of_the_refused_files(tmp_path):
    """Refused reads in a row, and the file the run read fine before is refused too (gone, as in a
    deleted bucket): the run stops at the probe, with a line naming the cause, and commits no row for them."""
    verdicts = verdicts_on(tmp_path)
    readable = tmp_path / "in" / "ok.jpg"
    readable.write_bytes(b"jpeg")
    verdicts.add(result_rows((str(readable), None, None)))
    for i in range(REFUSALS_BEFORE_PROBE - 1):
        assert verdicts.add(result_rows(denied(tmp_path, i))).num_rows == 0
    readable.unlink()
    with pytest.raises(StorageRefused) as caught:
        verdicts.add(result_rows(denied(tmp_path, REFUSALS_BEFORE_PROBE - 1)))
    assert str(caught.value) == (
        f"storage refused {REFUSALS_BEFORE_PROBE} reads ([Errno 13] Permission denied: 'denied_9.jpg'), and "
        f"{readable}, read fine by this run, is refused too (not found): no row was committed for them; restore "
        f"access and rerun")
    verdicts.close()
    assert committed(tmp_path) == {str(readable): (None, None)}


def test_before_any_file_reads_fine_the_probe_looks_up_the_folder_listed(tmp_path):
    verdicts = verdicts_on(tmp_path)
    verdicts.add(result_rows(denied(tmp_path, 0), denied(tmp_path, 1)))
    assert verdicts.finish().column("error_kind").to_pylist() == ["unreadable", "unreadable"]

    gone = verdicts_on(tmp_path / "elsewhere")
    (tmp_path / "elsewhere" / "in").rmdir()
    gone.add(result_rows(denied(tmp_path / "elsewhere", 0)))
    with pytest.raises(StorageRefused, match=rf"and {tmp_path / 'elsewhere' / 'in'}, where they are, is refused too \(not found\)"):
        gone.finish()


def test_a_file_failing_transiently_in_transient_runs_runs_in_a_row_is_committed_and_the_list_stays_true(tmp_path):
    """Earlier runs left a.jpg (2 runs), b.jpg (1 run) and c.jpg (1 run) unread. This run: a.jpg fails
    again, its third run: committed as kept_failing; d.jpg fails for the first time: set aside; b.jpg
    reads fine: committed; c.jpg is not reached (the run stopped early): still listed, its count kept."""
    path = {name: str(tmp_path / "in" / name) for name in ("a.jpg", "b.jpg", "c.jpg", "d.jpg")}
    before = pa.table([[path["a.jpg"], path["b.jpg"], path["c.jpg"]], ["503", "503", "reset"], pa.array([2, 1, 1], pa.int32())],
                      schema=TRANSIENT_SCHEMA)
    verdicts = verdicts_on(tmp_path, before)
    out = verdicts.add(result_rows((path["a.jpg"], "transient", "still failing after 5 attempts: 503"),
                                   (path["d.jpg"], "transient", "still failing after 5 attempts: reset"),
                                   (path["b.jpg"], None, None)))
    assert out.column("path").to_pylist() == [path["a.jpg"], path["b.jpg"]]
    verdicts.close()
    assert committed(tmp_path) == {
        path["a.jpg"]: ("kept_failing", "storage failed for reasons that may pass in 3 runs in a row; the last: "
                                        "still failing after 5 attempts: 503"),
        path["b.jpg"]: (None, None),
    }
    left = read_transient(resolve(str(tmp_path / "out")))
    assert sorted(left.to_pylist(), key=lambda row: row["path"]) == [
        {"path": path["c.jpg"], "error": "reset", "runs": 1},
        {"path": path["d.jpg"], "error": "still failing after 5 attempts: reset", "runs": 1},
    ]


def test_a_path_listed_twice_is_committed_once(tmp_path):
    verdicts = verdicts_on(tmp_path)
    a, b = str(tmp_path / "in" / "a.jpg"), str(tmp_path / "in" / "b.jpg")
    assert verdicts.add(result_rows((a, None, None), (a, None, None))).num_rows == 1
    assert verdicts.add(result_rows((b, None, None), (a, "corrupt_image", "x"))).num_rows == 1
    verdicts.close()
    assert (sorted(committed(tmp_path)), verdicts.duplicates) == ([a, b], 2)
