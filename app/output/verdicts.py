"""Which result rows the driver commits: the verdicts on the inputs, and the faults that are not verdicts.

Rows reach the driver from the detector stage; `Verdicts.add` decides, batch by batch, what the writer
commits:

- A row of kind TRANSIENT (storage kept failing for a reason that may pass) is set aside, never
  committed: a rerun reads its file again. Set aside in data.transient_runs runs in a row, it is committed
  as KEPT_FAILING instead, so that an output always finishes. `left()` is the true list of the inputs
  without a row for that reason (_transient.parquet), with the runs each has failed in.
- A row of kind REFUSED (storage refused the read or found nothing) is held back. Storage refuses one
  file for the file's own reasons (deleted, private) and every file for the run's (a revoked or expired
  credential, a bucket policy, a deleted bucket); a probe tells which: the metadata of the file this run
  read fine last, or, before any, of the refused file's bucket (locally, of the folder listed). Refused too: the run stops with
  StorageRefused and commits none of the held rows (a rerun with access restored reads them). Read fine:
  the held rows are committed as UNREADABLE, with storage's message. The probe runs once
  REFUSALS_BEFORE_PROBE rows are held, and when the rows end.
- A row for a key that already has one from this run (an input listed twice) is dropped and counted.

The probe runs on the driver with the driver's credentials, which are the workers' in a RayJob (the same
Secret or service account on every pod).
"""

from typing import Optional

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from app.output.dataset import TRANSIENT_NAME, committed_files, parquet_bytes, replace_file, rows_filesystem
from app.output.resume import PathSet
from app.output.writer import ResultWriter
from app.result_schema import KEPT_FAILING, REFUSED, RESULT_SCHEMA, TRANSIENT, UNREADABLE, row_keys
from app.retry import AWS_ERROR, error_text, is_refused, with_retries
from app.storage import Location

# Refused reads held back before the probe decides whose fault they are: the run stops after about this
# many refusals once storage refuses it, and a file refused alone waits at most this long for its row.
REFUSALS_BEFORE_PROBE = 10
# Tries of the probe when it fails for a reason that may pass.
PROBE_ATTEMPTS = 5


class StorageRefused(Exception):
    """Storage refuses the run, not one file (access denied to every file, a credential it rejects, a
    missing bucket); the message is one line naming the cause."""


# TRANSIENT_NAME's rows: an input without a row because storage kept failing for reasons that may
# pass (its key, app.result_schema.row_keys: a video's frame has its own), the last error, and the runs in a
# row that left it so.
TRANSIENT_SCHEMA = pa.schema([("path", pa.string()), ("error", pa.string()), ("runs", pa.int32())])


def record_transient(output: Location, left: pa.Table) -> None:
    """List the inputs a run left unread (TRANSIENT_SCHEMA) in TRANSIENT_NAME, or remove the list when none are."""
    path = output.join(TRANSIENT_NAME)
    if left.num_rows:
        replace_file(output.filesystem, path, parquet_bytes(left))
    elif output.filesystem.get_file_info(path).type != pafs.FileType.NotFound:
        output.filesystem.delete_file(path)


def read_transient(output: Location) -> pa.Table:
    """TRANSIENT_NAME's rows, of inputs that still have no committed row (a run that stopped before
    recording its list may have committed some); a list from before its `runs` column counts one run."""
    path = output.join(TRANSIENT_NAME)
    if output.filesystem.get_file_info(path).type == pafs.FileType.NotFound:
        return TRANSIENT_SCHEMA.empty_table()
    left = pq.read_table(path, filesystem=output.filesystem)
    if "runs" not in left.column_names:
        left = left.append_column("runs", pa.array([1] * left.num_rows, pa.int32()))
    left = left.select(TRANSIENT_SCHEMA.names).cast(TRANSIENT_SCHEMA)
    files = committed_files(output)
    if not files or not left.num_rows:
        return left
    rows = pads.dataset(files, schema=RESULT_SCHEMA, filesystem=rows_filesystem(output), format="parquet")
    paths = pc.unique(pa.array([key.rsplit("#frame=", 1)[0] for key in left["path"].to_pylist()], pa.string()))
    done = row_keys(rows.to_table(columns=["path", "frame_index"], filter=pc.field("path").isin(paths)))
    return left.filter(pc.invert(pc.is_in(left["path"], pa.array(done, pa.string()))))


def storage_refusal(error: BaseException) -> Optional[StorageRefused]:
    """The StorageRefused that `error` is, if storage refused the run: the probe's verdict, or a refusal
    of what the run itself reads and writes (listing, a manifest, a commit, the lease)."""
    if isinstance(error, StorageRefused):
        return error
    if isinstance(error, OSError) and is_refused(error):
        return StorageRefused(f"storage refused the run ({describe_text(str(error))}): no row was committed for "
                              f"the inputs not done; restore access and rerun")
    return None


class Verdicts:
    """The rows of one run on their way to `writer`. `source` is where the inputs are read from (for the
    probe); `left_before` the inputs earlier runs left without a row because storage kept failing
    (TRANSIENT_SCHEMA), of which those set aside again in `transient_runs` runs in a row are committed."""

    def __init__(self, writer: ResultWriter, source: Location, left_before: pa.Table, transient_runs: int):
        self.writer, self.source, self.transient_runs = writer, source, transient_runs
        self.runs_before = dict(zip(left_before["path"].to_pylist(), left_before["runs"].to_pylist()))
        self.left_before = left_before
        self.committed = PathSet()  # keys (app.result_schema.row_keys) with a row from this run
        self.set_aside: list[pa.Table] = []  # TRANSIENT_SCHEMA rows of this run
        self.held: list[pa.Table] = []
        self.held_rows = 0
        self.readable: Optional[str] = None  # a path this run read fine, without the source's prefix
        self.duplicates = 0

    def add(self, rows: pa.Table) -> pa.Table:
        """Decide on a batch of result rows: commit what is a verdict (returned), set aside or hold the
        rest. Raises StorageRefused when the probe finds storage refusing the run."""
        kinds = rows.column("error_kind")
        ok = pc.is_null(kinds)
        if pc.any(ok).as_py():  # the latest: the likeliest to be there still
            self.readable = self.relative(rows.filter(ok)["path"][-1].as_py())
        transient = pc.fill_null(pc.equal(kinds, TRANSIENT), False)
        refused = pc.fill_null(pc.equal(kinds, REFUSED), False)
        if pc.any(refused).as_py():
            self.held.append(rows.filter(refused))
            self.held_rows += self.held[-1].num_rows
        verdicts = self.transient_verdicts(rows.filter(transient))
        verdicts.append(rows.filter(pc.invert(pc.or_(transient, refused))))
        if self.held_rows >= REFUSALS_BEFORE_PROBE:
            verdicts.append(self.judge_held())
        return self.commit(pa.concat_tables(verdicts))

    def finish(self) -> Optional[pa.Table]:
        """Judge the rows still held, now that no more come; returns those committed, if any."""
        return self.commit(self.judge_held()) if self.held_rows else None

    def transient_verdicts(self, rows: pa.Table) -> list[pa.Table]:
        """Set aside the TRANSIENT rows, but those of their data.transient_runs-th run in a row, which
        become KEPT_FAILING rows (returned)."""
        if not rows.num_rows:
            return []
        keys = row_keys(rows)
        runs = pa.array([self.runs_before.get(key, 0) + 1 for key in keys], pa.int32())
        final = pc.greater_equal(runs, self.transient_runs)
        self.set_aside.append(pa.table([pa.array(keys, pa.string()), rows["error"], runs], schema=TRANSIENT_SCHEMA).filter(pc.invert(final)))
        failing = rows.filter(final)
        if not failing.num_rows:
            return []
        messages = pc.binary_join_element_wise(
            f"storage failed for reasons that may pass in {self.transient_runs} runs in a row; the last: ", failing["error"], "")
        return [with_kind(failing, KEPT_FAILING, messages)]

    def judge_held(self) -> pa.Table:
        """The held REFUSED rows as UNREADABLE rows, once the probe finds storage serving this run."""
        held = pa.concat_tables(self.held)
        self.probe(held)
        self.held, self.held_rows = [], 0
        return with_kind(held, UNREADABLE, held["error"])

    def probe(self, held: pa.Table) -> None:
        """Raise StorageRefused unless storage still serves this run: the file read fine last can be looked
        up, or before any, the refused file's bucket (the folder listed, locally)."""
        if self.readable is not None:
            target = self.readable
        elif self.source.uri_prefix:  # the refused file's bucket
            target = self.relative(held["path"][-1].as_py()).split("/", 1)[0]
        else:  # the folder listed, or for a manifest's local paths the root: a file's own folder may be gone
            target = self.source.path or "/"
        try:
            info = with_retries(lambda: self.source.filesystem.get_file_info(target), PROBE_ATTEMPTS, path=target)
            found = info.type != pafs.FileType.NotFound
            reason = "" if found else "not found"
        except OSError as error:
            found, reason = False, describe(error, target)
        if not found:
            last = held["error"][-1].as_py()
            raise StorageRefused(
                f"storage refused {held.num_rows} reads ({describe_text(last)}), and "
                f"{self.source.uri(target)}, {'read fine by this run' if self.readable else 'where they are'}, "
                f"is refused too ({reason}): no row was committed for them; restore access and rerun")

    def commit(self, rows: pa.Table) -> pa.Table:
        """Hand the rows of keys without a row from this run to the writer; returns them."""
        if not rows.num_rows:
            return rows
        new = self.committed.add_new(row_keys(rows))
        if not new.all():
            self.duplicates += int((~new).sum())
            rows = rows.filter(pa.array(new))
        self.writer.add(rows)
        return rows

    def close(self) -> None:
        """Commit the rows decided so far, and record the inputs left unread (dataset.TRANSIENT_NAME)."""
        self.writer.close()
        record_transient(self.writer.output, self.left())

    def left(self) -> pa.Table:
        """The inputs without a row because storage kept failing (TRANSIENT_SCHEMA): set aside by this run, or
        by earlier runs and not read by this one (a run that stopped early)."""
        now = pa.concat_tables([TRANSIENT_SCHEMA.empty_table(), *self.set_aside])
        before = self.left_before
        if before.num_rows:
            paths = before["path"].to_pylist()
            again = set(now["path"].to_pylist())
            committed = self.committed.contains(paths)
            before = before.filter(pa.array([path not in again and not done for path, done in zip(paths, committed)], pa.bool_()))
        return pa.concat_tables([before, now])

    def relative(self, uri: str) -> str:
        return uri[len(self.source.uri_prefix):] if self.source.uri_prefix and uri.startswith(self.source.uri_prefix) else uri


def with_kind(rows: pa.Table, kind: str, messages: pa.ChunkedArray) -> pa.Table:
    rows = rows.set_column(rows.schema.get_field_index("error_kind"), "error_kind", pa.array([kind] * rows.num_rows, pa.string()))
    return rows.set_column(rows.schema.get_field_index("error"), "error", messages)


def describe(error: OSError, path: str) -> str:
    return describe_text(error_text(error, path))


def describe_text(text: str) -> str:
    """An error's cause in a few words: the AWS SDK's code and operation, or the message's last line (a
    task's error that Ray wrapped ends with the original one)."""
    found = list(AWS_ERROR.finditer(text))  # the last: a key named before it may hold anything
    if found:
        return found[-1].group(0)
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else "no reason given"
