"""Table outputs (app.output.tables): runs into a Delta Lake table (deltalake) and an Apache Iceberg table
(pyiceberg, SQL catalogs on SQLite and on a PostgreSQL server started here on loopback), on local disk and on
moto's S3 server. For each: one row per input holding the model's detections, commits carrying the run's id
and lease generation, a table moved by another writer mid-run stopping the run, the rerun finishing with
exactly one row per input, a second writer refused, a schema that differs refused before any work, and the
report reading the table. All real libraries and servers; nothing mocked."""

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pytest

from app.config import ConfigError, compose_config
from app.output import tables
from app.output.dataset import locate
from app.output.lease import LeaseLost, OutputInUse, OutputLease
from app.pipeline import run
from app.result_schema import RESULT_SCHEMA
from tests.support.images import write_images
from tests.support.models import FAST_MODEL, assert_detections, model_detections
from tests.support.s3_faults import moto_process

IMAGES = 12
# Calls of at most 4 images (batch 1), each committed on its own: several commits a run.
COMMITS = ["output.rows_per_file=4", "output.commit_interval_s=0", "inference.batch_size=1"]


@pytest.fixture
def iceberg_catalog(monkeypatch, tmp_path):
    """A pyiceberg SQL catalog on SQLite named "tests", configured as users do: PYICEBERG_CATALOG__* variables."""
    for key, value in {"TYPE": "sql", "URI": f"sqlite:///{tmp_path}/catalog.db", "WAREHOUSE": f"file://{tmp_path}/warehouse"}.items():
        monkeypatch.setenv(f"PYICEBERG_CATALOG__TESTS__{key}", value)
    return "tests"


def output_overrides(kind: str, tmp_path: Path, catalog: str = "tests") -> list[str]:
    if kind == "delta":
        return ["output=delta", f"output.path={tmp_path / 'table'}"]
    return ["output=iceberg", f"output.catalog={catalog}", "output.table=detections.run", f"output.path={tmp_path / 'run'}"]


def table_rows(output) -> pa.Table:
    """Every row of the table, read with the format's own library."""
    if isinstance(output.table, tables.DeltaTable):
        return pa.table(output.table.open().to_pyarrow_table())
    return output.table.open().scan().to_arrow()


def commit_metadata(output) -> list[dict]:
    """Each commit's metadata, oldest first: Delta's commitInfo, Iceberg's snapshot summaries."""
    if isinstance(output.table, tables.DeltaTable):
        return [entry for entry in reversed(output.table.open().history()) if entry["operation"] == "WRITE"]
    return [dict(snapshot.summary.additional_properties) for snapshot in output.table.open().snapshots()]


def deleting_one_row_after_the_first_commit(output):
    """An on_rows callback: once the table has rows, another writer deletes one of them (a new version)."""
    deleted = []

    def on_rows(rows):
        if deleted or not output.table.data_files():
            return
        path = table_rows(output).column("path")[0].as_py()
        if isinstance(output.table, tables.DeltaTable):
            output.table.open().delete(f"path = '{path}'")
        else:
            from pyiceberg.expressions import EqualTo

            output.table.open().delete(EqualTo("path", path))
        deleted.append(path)

    return on_rows, deleted


@pytest.mark.parametrize("kind", ["delta", "iceberg"])
def test_a_table_moved_by_another_writer_stops_the_run_and_the_rerun_leaves_one_row_per_input(kind, local_ray, tmp_path, request):
    if kind == "iceberg":
        request.getfixturevalue("iceberg_catalog")
    paths = write_images(tmp_path / "in", IMAGES)
    cfg = compose_config([*FAST_MODEL, *COMMITS, f"data.path={tmp_path / 'in'}", *output_overrides(kind, tmp_path)])
    output = locate(cfg.output)
    if kind == "iceberg":
        output.table.prepare(False, output.uri(output.path))  # made by the run otherwise; here first, for the callback

    on_rows, deleted = deleting_one_row_after_the_first_commit(output)
    with pytest.raises(LeaseLost, match=rf"^another writer committed to {output.table.name} while this run wrote it \("):
        run(cfg, on_rows=on_rows)
    first = table_rows(output).column("path").to_pylist()
    assert len(deleted) == 1 and deleted[0] not in first and len(first) == len(set(first)) and len(first) < IMAGES

    summary = run(cfg)
    rows = table_rows(output)
    assert (summary.inputs, summary.ok, summary.processed) == (IMAGES, IMAGES, IMAGES - len(first))
    assert sorted(rows.column("path").to_pylist()) == sorted(str(path) for path in paths)
    assert rows.schema.names == RESULT_SCHEMA.names
    assert_detections({row["path"]: row for row in rows.to_pylist()}, model_detections(cfg, paths))
    # Each of the runs' commits names its run and lease generation: the first run's (generation 1) and the
    # rerun's (generation 2, another run id).
    ours = [(entry[tables.RUN_ID_KEY], entry[tables.GENERATION_KEY]) for entry in commit_metadata(output)
            if tables.RUN_ID_KEY in entry]
    assert [generation for _, generation in ours] == sorted(generation for _, generation in ours)
    assert {generation for _, generation in ours} == {"1", "2"} and len({run_id for run_id, _ in ours}) == 2
    assert summary.output_path == output.table.name

    again = run(cfg)  # nothing left: no detector actor
    assert (again.inputs, again.processed, again.detector_actors) == (IMAGES, 0, 0)
    assert table_rows(output).num_rows == IMAGES

    from app import report

    report.main([str(tmp_path / ("table" if kind == "delta" else "run")), "--out", str(tmp_path / "report")])
    assert f'<dd id="images">{IMAGES}</dd>' in (tmp_path / "report" / "index.html").read_text()


@pytest.mark.parametrize("kind", ["delta", "iceberg"])
def test_a_second_writer_is_refused_and_a_table_of_another_schema_is_refused_before_any_work(kind, tmp_path, request):
    if kind == "iceberg":
        request.getfixturevalue("iceberg_catalog")
    write_images(tmp_path / "in", 2)
    cfg = compose_config([*FAST_MODEL, f"data.path={tmp_path / 'in'}", *output_overrides(kind, tmp_path)])
    output = locate(cfg.output)
    with OutputLease(output, "first-writer", timeout_s=60, heartbeat_s=30):
        with pytest.raises(OutputInUse):
            run(cfg)

    other = pa.schema([("path", pa.string()), ("score", pa.float64())])
    if kind == "delta":
        from deltalake import write_deltalake

        shutil.rmtree(tmp_path / "table")
        write_deltalake(str(tmp_path / "table"), other.empty_table())
        name = str(tmp_path / "table")
    else:
        catalog = output.table.load_catalog()
        catalog.create_namespace_if_not_exists("detections")
        catalog.create_table("detections.run", schema=other)
        name = "tests.detections.run"
    with pytest.raises(ConfigError) as refused:
        run(cfg)
    assert str(refused.value) == (f"output table {name} does not have the result schema (column 2 is score double, not "
                                  f"width int32); choose another table, or drop this one to have the run create it")


def test_an_iceberg_table_is_written_through_one_run_folder(iceberg_catalog, tmp_path):
    """A second run folder's lease could not keep two writers apart: a run through another output.path
    than the one the table was made through is refused before any work."""
    write_images(tmp_path / "in", 1)
    cfg = compose_config([*FAST_MODEL, f"data.path={tmp_path / 'in'}", *output_overrides("iceberg", tmp_path)])
    first = locate(cfg.output)
    made = first.table.prepare(False, first.uri(first.path))
    assert made.open().properties[tables.RUN_FOLDER_KEY] == str(tmp_path / "run")
    other = compose_config([*FAST_MODEL, f"data.path={tmp_path / 'in'}", *output_overrides("iceberg", tmp_path),
                            f"output.path={tmp_path / 'elsewhere'}"])
    with pytest.raises(ConfigError) as refused:
        run(other)
    assert str(refused.value) == (f"output table tests.detections.run is written through the run folder {tmp_path / 'run'}, "
                                  f"not output.path={tmp_path / 'elsewhere'}: one run folder per table keeps one writer at "
                                  f"a time; set output.path={tmp_path / 'run'}")


def test_an_iceberg_catalog_that_is_not_configured_is_a_config_error(tmp_path):
    write_images(tmp_path / "in", 1)
    cfg = compose_config([*FAST_MODEL, f"data.path={tmp_path / 'in'}", "output=iceberg", "output.catalog=nowhere",
                          f"output.path={tmp_path / 'run'}"])
    with pytest.raises(ConfigError, match=r"^output.catalog='nowhere' is not configured for pyiceberg: define it in "):
        run(cfg)
    with pytest.raises(ConfigError, match=r"^output=iceberg needs output.catalog .* and output.table as NAMESPACE.TABLE"):
        run(compose_config([f"data.path={tmp_path / 'in'}", "output=iceberg", "output.table=flat"]))
    assert not (tmp_path / "run").exists()  # refused before the run took a lease


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="session")
def postgresql():
    """A PostgreSQL server on loopback, run by the unprivileged postgres user when the tests run as root (it
    refuses root), from Debian's postgresql package (scripts/test.sh installs it where it is missing)."""
    bin_dirs = sorted(Path("/usr/lib/postgresql").glob("*/bin"))
    assert bin_dirs, "PostgreSQL is not installed (Debian's postgresql package; scripts/test.sh installs it)"
    folder = Path(tempfile.mkdtemp(prefix="ray-detect-pg-"))
    as_user = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    if as_user:
        shutil.chown(folder, "postgres")
    port = free_port()
    subprocess.run([*as_user, str(bin_dirs[-1] / "initdb"), "-D", str(folder / "data"), "-A", "trust", "-U", "postgres"],
                   check=True, capture_output=True, timeout=120)
    subprocess.run([*as_user, str(bin_dirs[-1] / "pg_ctl"), "-D", str(folder / "data"), "-w", "-l", str(folder / "log"),
                    "-o", f"-p {port} -h 127.0.0.1 -k {folder}", "start"], check=True, capture_output=True, timeout=120)
    yield f"postgresql+psycopg2://postgres@127.0.0.1:{port}/postgres"
    subprocess.run([*as_user, str(bin_dirs[-1] / "pg_ctl"), "-D", str(folder / "data"), "-m", "immediate", "stop"],
                   capture_output=True, timeout=60)
    shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture
def s3_server(monkeypatch):
    """moto's S3 server on loopback (its own process) with the bucket "lake", reached through the standard AWS
    settings (and plain HTTP allowed for deltalake)."""
    with moto_process("lake") as (port, _):
        endpoint = f"http://127.0.0.1:{port}"
        for key, value in {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test",
                           "AWS_DEFAULT_REGION": "us-east-1", "AWS_REGION": "us-east-1", "AWS_ALLOW_HTTP": "true"}.items():
            monkeypatch.setenv(key, value)
        yield endpoint


@pytest.mark.parametrize("kind", ["delta", "iceberg"])
def test_a_table_on_s3_gets_one_row_per_input_exactly_once_over_a_killed_driver(kind, s3_server, local_ray, monkeypatch, tmp_path,
                                                                               request):
    """The table on moto's S3: Delta's commits by conditional writes; Iceberg's warehouse there, its catalog
    the shared kind teams run, pyiceberg's SQL catalog on PostgreSQL. The driver, a `python -m app` process
    of its own, is SIGKILLed after its first commit; the command run again commits the inputs without a row:
    exactly one row per input, each with the model's detections."""
    if kind == "iceberg":
        for key, value in {"TYPE": "sql", "URI": request.getfixturevalue("postgresql"), "WAREHOUSE": "s3://lake/warehouse",
                           "S3__ENDPOINT": s3_server, "S3__REGION": "us-east-1"}.items():
            monkeypatch.setenv(f"PYICEBERG_CATALOG__TESTS__{key}", value)
        target = ["output=iceberg", "output.catalog=tests", "output.table=detections.run", "output.path=s3://lake/runs/one"]
    else:
        target = ["output=delta", "output.path=s3://lake/tables/detections"]
    paths = write_images(tmp_path / "in", IMAGES)
    overrides = [*FAST_MODEL, *COMMITS, f"data.path={tmp_path / 'in'}", *target]
    output = locate(compose_config(overrides).output)
    import ray

    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address}
    log = tmp_path / "driver.log"
    with open(log, "w") as sink:
        driver = subprocess.Popen([sys.executable, "-m", "app", *overrides, "output.lease_timeout_s=5", "output.lease_heartbeat_s=1"], env=env,
                                  start_new_session=True, stdout=sink, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 300
        while not (output.table.exists() if kind == "delta" else table_exists(output)) or not output.table.data_files():
            assert driver.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.2)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(driver.pid, signal.SIGKILL)
        driver.wait()
    first = table_rows(located(output)).column("path").to_pylist()
    assert 1 <= len(first) < IMAGES and len(set(first)) == len(first)

    cfg = compose_config([*overrides, "output.lease_timeout_s=5", "output.lease_heartbeat_s=1", "output.lease_wait_s=30"])
    summary = run(cfg)
    rows = table_rows(located(output))
    assert (summary.inputs, summary.ok, summary.processed) == (IMAGES, IMAGES, IMAGES - len(first))
    assert sorted(rows.column("path").to_pylist()) == sorted(str(path) for path in paths)
    assert_detections({row["path"]: row for row in rows.to_pylist()}, model_detections(cfg, paths))
    if kind == "iceberg":
        assert output.table.load_catalog().properties["uri"].startswith("postgresql+psycopg2://")


def table_exists(output) -> bool:
    from pyiceberg.exceptions import NoSuchTableError

    try:
        output.table.open()
    except NoSuchTableError:
        return False
    return True


def located(output):
    """The location with an Iceberg table's location filled in (where its data files are)."""
    if isinstance(output.table, tables.IcebergTable):
        from dataclasses import replace

        return replace(output, table=output.table.located())
    return output


@pytest.mark.parametrize("kind", ["delta", "iceberg"])
def test_data_retry_errors_deletes_a_tables_error_rows_of_those_kinds_in_one_commit(kind, tmp_path, request):
    """What a run with data.retry_errors does first: the table writer deletes the committed rows of those
    kinds in one commit, and commits after it from the version that made."""
    from app.output.writer import TableWriter

    if kind == "iceberg":
        request.getfixturevalue("iceberg_catalog")
    cfg = compose_config([f"data.path={tmp_path}", *output_overrides(kind, tmp_path)])
    output = dataset_prepared(cfg)
    writer = TableWriter(output, 1, "run-a", rows_per_file=10, commit_interval_s=3600)
    kinds = [None, "unreadable", "corrupt_image", None, "unreadable"]
    writer.add(pa.Table.from_pylist([{"path": f"img_{i}.jpg", "error_kind": kind, "num_detections": 0}
                                     for i, kind in enumerate(kinds)], schema=RESULT_SCHEMA))
    writer.close()
    assert writer.delete_rows(["unreadable", "not_an_image"]) == 2
    writer.add(pa.Table.from_pylist([{"path": "img_1.jpg", "num_detections": 0}], schema=RESULT_SCHEMA))
    writer.close()  # from the version the delete made: not a table moved by another writer
    rows = table_rows(output)
    assert sorted(zip(rows.column("path").to_pylist(), rows.column("error_kind").to_pylist())) == [
        ("img_0.jpg", None), ("img_1.jpg", None), ("img_2.jpg", "corrupt_image"), ("img_3.jpg", None)]


def dataset_prepared(cfg):
    from app.output.dataset import prepare_table

    return prepare_table(cfg.output, locate(cfg.output))


def test_an_iceberg_commit_that_meets_a_concurrent_one_is_refused_whole(iceberg_catalog, tmp_path, monkeypatch):
    """Another writer commits between the run's check of the table and its commit: Iceberg refuses the commit
    (the run set the table's commit retries to 0; pyiceberg would otherwise append on top of the other
    writer's snapshot), so none of its rows are in the table."""
    cfg = compose_config([f"data.path={tmp_path}", *output_overrides("iceberg", tmp_path)])
    table = dataset_prepared(cfg).table
    assert table.open().properties[tables.ICEBERG_RETRIES_KEY] == "0"
    expected = table.version()
    checked = table.at(expected)
    table.open().append(pa.Table.from_pylist([{"path": "theirs.jpg"}], schema=RESULT_SCHEMA))  # the other writer
    monkeypatch.setattr(tables.IcebergTable, "at", lambda self, snapshot: checked)
    with pytest.raises(tables.TableMoved, match=r"moved on from snapshot None while this run committed"):
        table.append(pa.Table.from_pylist([{"path": "ours.jpg"}], schema=RESULT_SCHEMA), expected, {})
    assert table_rows(locate(cfg.output)).column("path").to_pylist() == ["theirs.jpg"]


def test_an_iceberg_tables_rows_keep_the_digest_of_their_settings_for_a_run_folder_that_lost_its_own(iceberg_catalog, tmp_path):
    """The run folder's _settings.json is what a rerun compares; when the folder has none (lost, or new), the
    table's own record of its rows' settings refuses a run with other settings, and output.overwrite replaces
    the rows and the record."""
    from app.output.dataset import prepare_table

    cfg = compose_config([f"data.path={tmp_path}", *output_overrides("iceberg", tmp_path)])
    made = prepare_table(cfg.output, locate(cfg.output), {"model.score_threshold": 0.5})
    digest = made.table.open().properties[tables.SETTINGS_KEY]
    assert prepare_table(cfg.output, locate(cfg.output), {"model.score_threshold": 0.5}).table == made.table
    with pytest.raises(ConfigError) as refused:
        prepare_table(cfg.output, locate(cfg.output), {"model.score_threshold": 0.9})
    assert str(refused.value) == (
        f"output table tests.detections.run holds results made with other settings than this run's (its "
        f"ray-detect.settings-sha256 differs), and output.path={tmp_path / 'run'} holds no settings to say which: run with "
        f"the settings it was made with, or pass output.overwrite=true to replace its rows")
    overwrite = compose_config([f"data.path={tmp_path}", *output_overrides("iceberg", tmp_path), "output.overwrite=true"])
    prepare_table(overwrite.output, locate(overwrite.output), {"model.score_threshold": 0.9})
    assert made.table.open().properties[tables.SETTINGS_KEY] not in (digest, None)


def test_a_catalog_that_does_not_answer_stops_the_run_in_one_line(monkeypatch, tmp_path):
    """A SQL catalog on a database nobody listens for: the run stops before any work with storage's exit code
    and one line, not a traceback, and commits nothing."""
    from app import cli
    from app.output.verdicts import StorageRefused

    for key, value in {"TYPE": "sql", "URI": f"postgresql+psycopg2://nobody@127.0.0.1:{free_port()}/none",
                       "WAREHOUSE": f"file://{tmp_path}/warehouse"}.items():
        monkeypatch.setenv(f"PYICEBERG_CATALOG__DOWN__{key}", value)
    write_images(tmp_path / "in", 1)
    cfg = compose_config([*FAST_MODEL, f"data.path={tmp_path / 'in'}", *output_overrides("iceberg", tmp_path, "down")])
    with pytest.raises(StorageRefused) as refused:
        run(cfg)
    assert str(refused.value).startswith("iceberg table down.detections.run cannot be opened or created: ")
    assert "\n" not in str(refused.value) and not (tmp_path / "warehouse").exists()
    with pytest.raises(SystemExit) as stopped:
        cli.job(cfg)
    assert stopped.value.code == cli.ExitCode.STORAGE_REFUSED
