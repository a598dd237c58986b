"""What an output holds, counted without the driver holding its paths (app.output.resume), called in-process."""

import pyarrow as pa
import pyarrow.parquet as pq

from app.output.dataset import RESULT_SCHEMA
from app.output.resume import contains, digests, scan_output
from app.storage import resolve


def committed_file(path, rows):
    columns = {name: [row.get(name) for row in rows] for name in RESULT_SCHEMA.names}
    for name in ("boxes", "scores", "labels", "label_names"):
        columns[name] = [[] for _ in rows]
    pq.write_table(pa.table(columns, schema=RESULT_SCHEMA), path)


def test_scan_counts_rows_paths_errors_and_detections(tmp_path):
    committed_file(tmp_path / "part-a-000000.parquet", [
        dict(path="s3://b/1.jpg", num_detections=3), dict(path="s3://b/2.jpg", num_detections=0, error_kind="unreadable")])
    committed_file(tmp_path / "part-b-000000.parquet", [
        dict(path="s3://b/3.jpg", num_detections=2), dict(path="s3://b/1.jpg", num_detections=3)])  # a duplicate row
    (tmp_path / "_staging").mkdir()
    committed_file(tmp_path / "_staging" / "part-c-000000.parquet", [dict(path="s3://b/9.jpg", num_detections=1)])
    scan, index = scan_output(resolve(str(tmp_path)), in_ray=False)
    assert (scan.rows, scan.unique_paths, scan.detections, dict(scan.errors_by_kind)) == (4, 3, 8, {"unreadable": 1})
    assert list(index) == sorted(index) and len(index) == 4
    asked = digests(["s3://b/3.jpg", "s3://b/9.jpg", "s3://b/1.jpg", "3.jpg"])
    assert contains(index, asked).tolist() == [True, False, True, False]
    assert contains(index[:0], asked).tolist() == [False] * 4
