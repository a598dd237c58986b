"""Committing result rows: whole Parquet files, staged and then moved into output.path (dataset.py)."""

import contextlib
import time
from typing import Callable

import pyarrow as pa

from app.output.dataset import STAGING_DIR, parquet_bytes, part_name, write_whole
from app.output.lease import LeaseLost
from app.output.tables import GENERATION_KEY, RUN_ID_KEY, TableMoved
from app.result_schema import RESULT_SCHEMA
from app.storage import Location


class ResultWriter:
    """Commits result rows as Parquet files of up to rows_per_file rows; rows that arrive
    commit_interval_s seconds or more after the last commit are committed with the ones pending, so a
    crash loses only rows of the last interval (the check runs when rows arrive: nothing is committed
    while none do). Files are named after the run's lease generation (`part-g<generation>-<seq>`), which
    is how readers tell a zombie's late file from the dataset (dataset.committed_files).
    `before_commit` is called before each file is written: the run's lease check."""

    def __init__(self, output: Location, generation: int, rows_per_file: int, commit_interval_s: float,
                 before_commit: Callable[[], None] = lambda: None):
        self.output, self.generation, self.before_commit = output, generation, before_commit
        self.rows_per_file, self.commit_interval_s = rows_per_file, commit_interval_s
        self.pending: list[pa.Table] = []
        self.pending_rows = 0
        self.sequence = 0
        self.last_commit = time.monotonic()
        self.staging = output.join(STAGING_DIR, f"g{generation:010d}")
        self.staged = False  # whether the staging folder is there: made for the first file, gone at close

    def add(self, rows: pa.Table) -> None:
        self.pending.append(rows)
        self.pending_rows += rows.num_rows
        if self.pending_rows >= self.rows_per_file:
            table = pa.concat_tables(self.pending)
            full = table.num_rows - table.num_rows % self.rows_per_file
            for start in range(0, full, self.rows_per_file):
                self.write_file(table.slice(start, self.rows_per_file))
            self.pending, self.pending_rows = [table.slice(full)], table.num_rows - full
        if time.monotonic() - self.last_commit >= self.commit_interval_s:
            self.commit()

    def commit(self) -> None:
        """Commit the pending rows now."""
        if self.pending_rows:
            self.write_file(pa.concat_tables(self.pending))
        self.pending, self.pending_rows = [], 0

    def write_file(self, rows: pa.Table) -> None:
        """Write rows under _staging/, then move the whole file into the dataset in one step. A full disk
        leaves nothing behind and raises OutputFull (dataset.write_whole)."""
        self.before_commit()
        if not self.staged:
            self.output.filesystem.create_dir(self.staging, recursive=True)
            self.staged = True
        name = part_name(self.generation, self.sequence)
        staged = f"{self.staging}/{name}"
        write_whole(self.output.filesystem, staged, parquet_bytes(rows.cast(RESULT_SCHEMA)))
        self.output.filesystem.move(staged, self.output.join(name))
        self.sequence += 1
        self.last_commit = time.monotonic()

    def last_commit_time(self) -> float:
        """Unix time of the last commit (of the writer's start before the first)."""
        return time.time() - (time.monotonic() - self.last_commit)

    def close(self) -> None:
        """Commit the pending rows and remove the staging folder; the writer may commit more after."""
        self.commit()
        if self.staged:
            self.before_commit()  # staging is only its holder's to delete: not a run whose lease was taken over
            self.output.filesystem.delete_dir(self.output.join(STAGING_DIR))
            self.staged = False


class TableWriter(ResultWriter):
    """A ResultWriter for a table output (app.output.tables): each file's rows are one table commit, made from
    the version of the table this run left, with the run's id (`owner`) and lease generation in its commit
    metadata. A commit that finds the table moved by another writer stops the run as a lost lease does."""

    def __init__(self, output: Location, generation: int, owner: str, rows_per_file: int, commit_interval_s: float,
                 before_commit: Callable[[], None] = lambda: None):
        super().__init__(output, generation, rows_per_file, commit_interval_s, before_commit)
        self.table = output.table
        self.metadata = {RUN_ID_KEY: owner, GENERATION_KEY: str(generation)}
        self.expected = self.table.version()

    def write_file(self, rows: pa.Table) -> None:
        self.before_commit()
        with self.fenced():
            self.expected = self.table.append(rows.cast(RESULT_SCHEMA), self.expected, self.metadata)
        self.sequence += 1
        self.last_commit = time.monotonic()

    def delete_rows(self, error_kinds: list[str]) -> int:
        """Delete the committed rows of these error kinds (data.retry_errors) in one commit; their number."""
        self.before_commit()
        with self.fenced():
            removed, self.expected = self.table.delete_rows(error_kinds, self.expected)
        return removed

    @contextlib.contextmanager
    def fenced(self):
        """A commit that finds the table moved by another writer stops the run as a lost lease does."""
        try:
            yield
        except TableMoved as error:
            raise LeaseLost(f"another writer committed to {self.table.name} while this run wrote it ({error}); the rows "
                            f"this run committed are kept: rerun once it is the table's only writer") from error

    def close(self) -> None:
        self.commit()


def writer_for(output: Location, generation: int, owner: str, rows_per_file: int, commit_interval_s: float,
               before_commit: Callable[[], None]) -> ResultWriter:
    """The writer of the output's rows: Parquet files, or commits to its table."""
    if output.table is not None:
        return TableWriter(output, generation, owner, rows_per_file, commit_interval_s, before_commit)
    return ResultWriter(output, generation, rows_per_file, commit_interval_s, before_commit)
