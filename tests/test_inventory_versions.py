"""S3 Inventory reports of all versions, through the manifest UDF called in-process
(app.inventory.manifest_rows): one input per live key, whichever way the report spells its flags. The
whole run on such a report: tests/test_s3.py."""

import pyarrow as pa
import pyarrow.fs as pafs
import pytest

from app import inventory, listing
from app.storage import Location

# key, version, latest, delete marker, size: the report of a versioned bucket, in no particular order.
VERSIONS = [
    ("in/a.jpg", "a1", True, False, 10),  # one version
    ("in/b.jpg", "b2", True, False, 22),  # the latest of two
    ("in/b.jpg", "b1", False, False, 21),
    ("in/c.jpg", "c1", False, False, 31),  # deleted: an older version, and a delete marker as the latest
    ("in/c.jpg", "c2", True, True, None),
    ("in/d e.png", "d1", True, False, 40),  # a name URL-encoded in CSV
    ("in/f.jpg", "f1", False, True, None),  # an older delete marker, then the key written again
    ("in/f.jpg", "f2", True, False, 60),
    ("in/notes.txt", "n1", True, False, 5),  # not an image
]
LIVE = [("bkt/in/a.jpg", 10), ("bkt/in/b.jpg", 22), ("bkt/in/d e.png", 40), ("bkt/in/f.jpg", 60)]


def report_of(fmt: str) -> inventory.Manifest:
    """A report of bucket bkt, as open_inventory makes it: images on S3 (their paths without s3://)."""
    local = pafs.LocalFileSystem()
    return inventory.Manifest(Location(local, "/reports"), [], fmt, Location(local, "", "s3://"), "",
                              url_encoded_keys=fmt == "csv")


def input_rows(batch: pa.Table, fmt: str) -> list[tuple]:
    rows = inventory.manifest_rows(batch, manifest=report_of(fmt), suffixes=listing.image_suffixes(["jpg", "png"]))
    return [(row["path"], row["size"], row["error_kind"]) for row in rows.to_pylist()]


@pytest.mark.parametrize("spell", [
    lambda flag: "true" if flag else "false",  # as AWS writes them, read as text (app.inventory.CSV_TEXT_COLUMNS)
    lambda flag: "True" if flag else "False",
    lambda flag: flag,  # as pyarrow's CSV reader types them when left to itself
], ids=["lower", "capitalised", "bool"])
def test_a_csv_report_of_all_versions_gives_one_input_per_live_key(spell):
    batch = pa.table({
        "Bucket": ["bkt"] * len(VERSIONS),
        "Key": [key.replace(" ", "+") for key, *_ in VERSIONS],
        "VersionId": [version for _, version, *_ in VERSIONS],
        "IsLatest": [spell(latest) for _, _, latest, _, _ in VERSIONS],
        "IsDeleteMarker": [spell(marker) for _, _, _, marker, _ in VERSIONS],
        "Size": [size for *_, size in VERSIONS],
    })
    assert input_rows(batch, "csv") == [(path, size, None) for path, size in LIVE]


def test_a_parquet_report_of_all_versions_gives_one_input_per_live_key():
    batch = pa.table({
        "bucket": ["bkt"] * len(VERSIONS),
        "key": [key for key, *_ in VERSIONS],
        "version_id": [version for _, version, *_ in VERSIONS],
        "is_latest": [latest for _, _, latest, _, _ in VERSIONS],
        "is_delete_marker": [marker for _, _, _, marker, _ in VERSIONS],
        "size": [size for *_, size in VERSIONS],
    })
    assert input_rows(batch, "parquet") == [(path, size, None) for path, size in LIVE]


def test_a_flag_without_a_value_drops_no_row_and_a_report_without_flags_keeps_every_row():
    batch = pa.table({"bucket": ["bkt"] * 3, "key": ["in/a.jpg", "in/b.jpg", "in/c.jpg"],
                      "is_latest": ["", None, "false"], "is_delete_marker": [None, "", "false"]})
    assert input_rows(batch, "parquet") == [("bkt/in/a.jpg", None, None), ("bkt/in/b.jpg", None, None)]
    unversioned = pa.table({"bucket": ["bkt"] * 2, "key": ["in/a.jpg", "in/a.jpg"]})
    assert input_rows(unversioned, "parquet") == [("bkt/in/a.jpg", None, None)] * 2
