"""Rewriting committed files without some of their rows (app.output.rewrite), on local outputs made by
ResultWriter: duplicate rows of a path (one kept, a success before an error), error rows of chosen kinds,
a crash between a file's replacement and its deletion, and the same in Ray tasks."""

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from app.output import dataset
from app.output.rewrite import read_file, remove_rows_of_kinds, repair_duplicates
from app.output.writer import ResultWriter
from app.storage import resolve


def writer_of(out, generation: int, before_commit=lambda: None) -> ResultWriter:
    """The writer of a run holding the given lease generation, with the lease check before_commit."""
    return ResultWriter(resolve(str(out)), generation, rows_per_file=1000, commit_interval_s=3600, before_commit=before_commit)


def results(*rows: tuple) -> pa.Table:
    """Result rows (path, error_kind, num_detections): a detection count tells copies of a path apart."""
    return pa.Table.from_pylist(
        [dict(path=path, width=None if kind else 4, height=None if kind else 3, boxes=[], scores=[], labels=[],
              label_names=[], num_detections=detections, num_tiles=0 if kind else 1, error_kind=kind,
              error=f"{kind}!" if kind else None) for path, kind, detections in rows],
        schema=dataset.RESULT_SCHEMA,
    )


def committed(out, *files: list[tuple]) -> list[str]:
    """Commit each list of rows as one file of generation 1; the files' paths."""
    writer = writer_of(out, 1)
    for rows in files:
        writer.write_file(results(*rows))
    return dataset.committed_files(resolve(str(out)))


def committed_by_an_older_version(out, rows: list[tuple]) -> str:
    """A file as versions before lease generations and the num_tiles column wrote it; its path."""
    path = out / "part-0a1b2c3d4e5f-000000.parquet"
    out.mkdir(parents=True, exist_ok=True)
    pq.write_table(results(*rows).drop_columns(["num_tiles"]), path)
    return str(path)


def rows_in(out) -> list[tuple]:
    """Every committed row (path, error_kind, num_detections), sorted."""
    output = resolve(str(out))
    rows = [(row["path"], row["error_kind"], row["num_detections"])
            for path in dataset.committed_files(output) for row in read_file(output, path).to_pylist()]
    return sorted(rows, key=lambda row: (row[0], row[1] or "", row[2]))


def contents(paths: list[str]) -> dict[str, bytes]:
    return {path: open(path, "rb").read() for path in paths}


# a twice in one file (the first copy kept); b an error in one file and a success in the next (the
# success kept); c an error in both (the first kept); d, e and f once each, and the last file not touched.
DUPLICATES = [
    [("a.jpg", None, 1), ("b.jpg", "corrupt_image", 0), ("a.jpg", None, 2), ("c.jpg", "unreadable", 0)],
    [("b.jpg", None, 3), ("c.jpg", "unreadable", 1), ("d.jpg", None, 4)],
    [("e.jpg", None, 5), ("f.jpg", "not_an_image", 0)],
]
REPAIRED = [("a.jpg", None, 1), ("b.jpg", None, 3), ("c.jpg", "unreadable", 0), ("d.jpg", None, 4), ("e.jpg", None, 5),
            ("f.jpg", "not_an_image", 0)]

# error rows of several kinds: those of corrupt_image and unreadable go; a file left with none is deleted,
# one holding none of them is not touched.
ERRORS = [
    [("a.jpg", None, 1), ("b.jpg", "corrupt_image", 0), ("c.jpg", "unreadable", 0)],
    [("d.jpg", "too_large", 0), ("e.jpg", None, 2)],
    [("f.jpg", None, 3), ("g.jpg", "corrupt_image", 0)],
    [("h.jpg", "corrupt_image", 0)],
]
WITHOUT_ERRORS = [("a.jpg", None, 1), ("d.jpg", "too_large", 0), ("e.jpg", None, 2), ("f.jpg", None, 3)]


def test_repair_keeps_one_row_per_path_preferring_a_success_and_rewrites_only_files_holding_extra_rows(tmp_path):
    out = tmp_path / "out"
    first = committed_by_an_older_version(out, DUPLICATES[0])
    _, second, third = committed(out, *DUPLICATES[1:])
    untouched = contents([third])
    assert repair_duplicates(resolve(str(out)), writer_of(out, 2), in_ray=False) == 3
    assert rows_in(out) == REPAIRED
    after = dataset.committed_files(resolve(str(out)))
    kept = [row for path in after for row in read_file(resolve(str(out)), path).to_pylist() if row["path"] == "a.jpg"]
    assert kept == [{**results(DUPLICATES[0][0]).to_pylist()[0], "num_tiles": None}]  # whole, as the older version wrote it
    assert len(after) == 3 and first not in after and second not in after and contents([third]) == untouched
    assert repair_duplicates(resolve(str(out)), writer_of(out, 3), in_ray=False) == 0
    assert dataset.committed_files(resolve(str(out))) == after


class Crash(Exception):
    pass


def test_a_repair_that_crashed_between_a_replacement_and_the_deletion_converges_on_the_next(tmp_path):
    out = tmp_path / "out"
    first, second, third = committed(out, *DUPLICATES)
    checks = []

    def lease_check_then_crash():  # the second check is the one before the first old file's deletion
        checks.append(1)
        if len(checks) == 2:
            raise Crash

    with pytest.raises(Crash):
        repair_duplicates(resolve(str(out)), writer_of(out, 2, lease_check_then_crash), in_ray=False)
    files = dataset.committed_files(resolve(str(out)))
    assert first in files and len(files) == 4  # the first file and its replacement (a and c) both
    assert len(rows_in(out)) == 9 + 2
    assert repair_duplicates(resolve(str(out)), writer_of(out, 3), in_ray=False) == 5
    assert rows_in(out) == REPAIRED
    assert repair_duplicates(resolve(str(out)), writer_of(out, 4), in_ray=False) == 0


def test_removing_rows_of_kinds_rewrites_the_files_holding_them_and_nothing_else(tmp_path):
    out = tmp_path / "out"
    files = committed(out, *ERRORS)
    untouched = contents([files[1]])
    assert remove_rows_of_kinds(resolve(str(out)), writer_of(out, 2), ["corrupt_image", "unreadable"], in_ray=False) == 4
    assert rows_in(out) == WITHOUT_ERRORS
    after = dataset.committed_files(resolve(str(out)))
    assert len(after) == 3 and files[1] in after and contents([files[1]]) == untouched
    assert not {files[0], files[2], files[3]} & set(after)
    assert remove_rows_of_kinds(resolve(str(out)), writer_of(out, 3), ["corrupt_image", "unreadable"], in_ray=False) == 0
    assert remove_rows_of_kinds(resolve(str(out)), writer_of(out, 3), [], in_ray=False) == 0
    assert dataset.committed_files(resolve(str(out))) == after


def test_both_scan_in_ray_tasks_when_asked(local_ray, tmp_path):
    committed(tmp_path / "dup", *DUPLICATES)
    assert repair_duplicates(resolve(str(tmp_path / "dup")), writer_of(tmp_path / "dup", 2), in_ray=True) == 3
    assert rows_in(tmp_path / "dup") == REPAIRED
    committed(tmp_path / "err", *ERRORS)
    assert remove_rows_of_kinds(resolve(str(tmp_path / "err")), writer_of(tmp_path / "err", 2),
                                ["corrupt_image", "unreadable"], in_ray=True) == 4
    assert rows_in(tmp_path / "err") == WITHOUT_ERRORS
