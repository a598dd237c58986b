"""One run at a time on an output.path: numbered leases, and a fence against a run that lost its lease.

A run's lease is a file `_lease/<generation>.json` in output.path (generation: 10 digits, counting up from
1), holding its owner, host, process, heartbeat, whether it was released, and `limits`. The highest
generation is the current lease. A run takes the lease by creating the next generation's file with a
write that fails when the file exists: an exclusive create on local disks, `If-None-Match: *` on S3
(through boto3, which reads the same credentials and AWS_ENDPOINT_URL as pyarrow); stores without such a
write get a check, a write and a read-back, which two runs starting within a second can both pass. That
create is the only place where runs compete: of two runs that want generation g+1 one creates it, the
other finds it there and looks again. Afterwards only its holder writes a lease file (its heartbeats,
every heartbeat_s seconds, and its release); nobody deletes or overwrites another run's lease.

- The latest lease is released: the next run takes generation g+1.
- It is live (heartbeat younger than timeout_s, holder alive): the run waits up to wait_s for it to go
  stale, else raises OutputInUse. An empty or unreadable lease file (a run killed while creating it, a
  full disk) is judged by its modification time instead of its heartbeat.
- It is stale (a run that died; at once when its process is gone from this machine, or is this process
  and its run has ended): the run takes over with generation g+1, fencing g off first. A lease whose
  release failed (release() only logs it) goes stale this way.

The fence. Committed files are named after their generation (`part-g<generation>-<seq>.parquet`, writer.py).
A run that takes over a generation g that was not released lists g's committed files and records in its
own lease `limits[g]` = the highest seq found + 1 (with every limit of the leases before). A file of g
with a seq at or above the limit is not part of the dataset (dataset.committed_files, which every reader
uses): so a run that lost its lease, with a file between its last check and its move into place, adds
nothing even when the move lands after the takeover. Such files are deleted by the holder when it takes
the lease and when it releases it, for readers that know nothing of the fence.

A run notices it lost its lease when a higher generation's file exists: its heartbeat thread stops, and
the writer checks before each commit (verify). Heartbeats are wall-clock times of the machines
involved, which must agree to well within timeout_s (NTP does).
"""

import logging
import os
import re
import socket
import threading
import time
from typing import Optional

import pyarrow.fs as pafs

from app.background import BackgroundLoop
from app.output.dataset import (
    LEASE_DIR,
    json_bytes,
    latest_readable_lease,
    lease_files,
    lease_limits,
    lease_path,
    part_files,
    read_json,
    read_lease,
    sorted_part_files,
    write_json,
)
from app.storage import Location

log = logging.getLogger(__name__)

# The owners of the leases this process holds now. A lease that names this process and an owner not in here
# was left by a run of this process that could not release it (a full disk): as good as a dead process's.
HELD: set[str] = set()


class OutputInUse(Exception):
    """output.path holds the live lease of another run; the message is one line."""


class LeaseLost(Exception):
    """Another run took this run's lease over (its heartbeats stopped for longer than the timeout)."""


class OutputLease:
    """The lease of one run (`owner`) on output.path; a context manager that acquires and releases it.
    `generation` is the lease's number once acquired, which the writer names its files after."""

    def __init__(self, output: Location, owner: str, timeout_s: float, heartbeat_s: float, wait_s: float = 0.0):
        self.output, self.owner = output, owner
        self.timeout_s, self.heartbeat_s, self.wait_s = timeout_s, heartbeat_s, wait_s
        self.generation = 0
        self.limits: dict[int, int] = {}
        self.lost: Optional[str] = None
        self.heartbeats = 0  # renewals so far
        self.heartbeating = BackgroundLoop("output-lease", self._beat)

    @property
    def path(self) -> str:
        return lease_path(self.output, self.generation)

    def document(self, released: bool = False) -> dict:
        return {"owner": self.owner, "host": socket.gethostname(), "pid": os.getpid(), "heartbeat": time.time(),
                "generation": self.generation, "released": released,
                "limits": {str(generation): limit for generation, limit in sorted(self.limits.items())}}

    def acquire(self) -> None:
        """Take the next generation of the lease, or raise OutputInUse naming the live run that holds the
        latest one, after waiting up to wait_s seconds for that lease to go stale."""
        HELD.add(self.owner)  # before its lease file exists, which names this process
        try:
            self._take()
        except BaseException:
            HELD.discard(self.owner)
            self.generation, self.limits = 0, {}  # none held: nothing for release() to write
            raise
        self.discard_fenced()
        self.heartbeating.start()

    def _take(self) -> None:
        self.output.filesystem.create_dir(self.output.join(LEASE_DIR), recursive=True)
        give_up = time.monotonic() + self.wait_s
        while True:
            files = lease_files(self.output)
            latest = max(files, default=0)
            if not latest:  # a new output, or one whose _lease/ was deleted: never reuse its files' generations
                latest = max((generation for generation, _ in part_files(self.output).values()), default=0)
                files = {}
            holder = read_lease(self.output, latest) if files else None
            if not files or (holder is not None and holder.get("released")):
                limits = lease_limits(holder)  # those of the leases before: no fence needed
            else:
                description, age = describe(holder, files[latest])
                if age >= self.timeout_s or died_here(holder or {}):
                    log.warning("taking over output.path from %s, silent for %.0f s", description, age)
                    limits = fence(self.output, files, latest)
                else:
                    stale_in = self.timeout_s - age
                    if time.monotonic() + stale_in > give_up:
                        raise OutputInUse(
                            f"output.path {self.output.uri(self.output.path)} is in use by {description}, whose last "
                            f"heartbeat was {age:.0f} s ago; a lease is stale after output.lease_timeout_s={self.timeout_s:g}"
                        )
                    log.info("output.path is held by %s, silent for %.0f s: waiting for its lease to go stale", description, age)
                    time.sleep(min(self.heartbeat_s, stale_in))
                    continue
            self.generation, self.limits = latest + 1, limits
            if create_exclusive(self.output, self.path, self.document()):
                return  # else another run took this generation first: look again

    def _beat(self, stopping: threading.Event) -> None:
        while not stopping.wait(self.heartbeat_s):
            try:
                taken = self.taken_over()
                if taken:
                    self.lost = taken
                    return
                write_json(self.output.filesystem, self.path, self.document())
                self.heartbeats += 1
            except (OSError, ValueError) as error:  # a store's hiccup: the next heartbeat tries again
                log.warning("could not renew the lease on output.path: %s", error)

    def taken_over(self) -> Optional[str]:
        """Who took output.path over, once the next generation's lease file exists; else None. (Generations
        are created one after another, so the next one's name is the one to look at.)"""
        following = self.generation + 1
        if self.output.filesystem.get_file_info(lease_path(self.output, following)).type == pafs.FileType.NotFound:
            return None
        try:
            holder = read_lease(self.output, following)
        except OSError:
            holder = None
        if holder is None:
            return f"another run took output.path over (lease generation {following})"
        return f"run {holder.get('owner')} on {holder.get('host')} took output.path over"

    def check(self) -> None:
        """Raise LeaseLost when the heartbeat thread found the lease taken over by another run."""
        if self.lost:
            raise LeaseLost(self.lost)

    def verify(self) -> None:
        """Raise LeaseLost once a later generation's lease exists. The writer calls it before each commit,
        so that a run whose lease was taken over commits nothing more, without waiting for its next
        heartbeat to notice (a file moved in after the takeover anyway is fenced off); a look that fails
        leaves the judgement to the heartbeats."""
        self.check()
        try:
            taken = self.taken_over()
        except OSError as error:
            log.warning("could not read the lease on output.path before a commit: %s", error)
            return
        if taken:
            self.lost = taken
            raise LeaseLost(taken)

    def discard_fenced(self) -> None:
        """Delete the files of generations taken over that the dataset does not count (a run's moves that
        landed after its lease was taken over), for readers that know nothing of the fence. Best effort:
        this app's readers leave them out anyway."""
        if not self.limits:
            return
        try:
            for path in sorted_part_files(self.output)[1]:
                log.warning("deleting %s: committed after its run's lease was taken over", path)
                self.output.filesystem.delete_file(path)
        except OSError as error:
            log.warning("could not delete the files committed after a lease was taken over: %s", error)

    def release(self) -> None:
        """Stop the heartbeats and mark the lease released, so that the next run needs no fence. Never
        raises: cleanup must not change how the run ends. A lease that could not be marked goes stale and
        is taken over (with a fence) once output.lease_timeout_s has passed."""
        try:
            self.heartbeating.stop()
            if self.generation and not self.lost and not self.taken_over():
                self.discard_fenced()
                write_json(self.output.filesystem, self.path, self.document(released=True))
        except Exception as error:  # logged: the run's own outcome stands
            log.warning("could not release the lease on output.path (%s: %s); the next run takes it over once it "
                        "is stale, after output.lease_timeout_s=%g s", type(error).__name__, error, self.timeout_s)
        finally:
            HELD.discard(self.owner)

    def __enter__(self) -> "OutputLease":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def describe(holder: Optional[dict], info: pafs.FileInfo) -> tuple[str, float]:
    """Who holds a live-looking lease, and how many seconds ago it was renewed. An unreadable lease file is
    as old as its modification time (one the store does not give counts as long ago)."""
    if holder is not None:
        return (f"run {holder.get('owner')} on {holder.get('host')} (pid {holder.get('pid')})",
                time.time() - float(holder.get("heartbeat", 0)))
    written = info.mtime.timestamp() if info.mtime is not None else 0.0
    return f"an unreadable lease ({LEASE_DIR}/{info.base_name})", time.time() - written


def fence(output: Location, files: dict[int, pafs.FileInfo], latest: int) -> dict[int, int]:
    """The limits of the lease that takes over generation `latest`, which was not released: those of the
    latest readable lease up to it, and for each generation from there on not known to be released, one
    above the highest seq of its committed files (0 when it has none)."""
    start, document = latest_readable_lease(output, [generation for generation in files if generation <= latest])
    limits = lease_limits(document)
    ends: dict[int, int] = {}
    for generation, sequence in part_files(output).values():
        ends[generation] = max(ends.get(generation, 0), sequence + 1)
    first = start + 1 if document is not None and document.get("released") else max(start, 1)
    limits.update({generation: ends.get(generation, 0) for generation in range(first, latest + 1)})
    return limits


def died_here(holder: dict) -> bool:
    """Whether the lease's holder ran on this machine and its process is gone (a driver killed here), or it
    is this process and its run has ended."""
    if holder.get("host") != socket.gethostname():
        return False
    if holder.get("pid") == os.getpid():
        return holder.get("owner") not in HELD
    try:
        os.kill(int(holder.get("pid", 0)), 0)
    except ProcessLookupError:
        return True
    except (OSError, ValueError):
        return False
    return False


def create_exclusive(output: Location, path: str, document: dict) -> bool:
    """Write document at path unless a file is there; return whether it was written."""
    body = json_bytes(document)
    if isinstance(output.filesystem, pafs.LocalFileSystem):
        try:
            descriptor = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(descriptor, "wb") as file:
            file.write(body)
        return True
    if isinstance(output.filesystem, pafs.S3FileSystem):
        import boto3
        import botocore.config
        import botocore.exceptions

        from app.storage import BOTO3_RETRIES

        bucket, _, key = path.partition("/")
        client = boto3.client("s3", config=botocore.config.Config(retries=BOTO3_RETRIES))
        try:
            client.put_object(Bucket=bucket, Key=key, Body=body, IfNoneMatch="*")
        except botocore.exceptions.ClientError as error:
            code = error.response.get("Error", {}).get("Code", "")
            if code in ("PreconditionFailed", "ConditionalRequestConflict"):
                return False
            # As pyarrow says it, so that app.retry tells a refusal (AccessDenied, ...) from other faults.
            status = error.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            raise OSError(f"AWS Error {re.sub(r'(?<!^)(?=[A-Z])', '_', code).upper()} (HTTP status {status}) during "
                          f"PutObject operation: {error.response.get('Error', {}).get('Message', '')}") from error
        return True
    # No conditional write: check, write, and read back.
    if output.filesystem.get_file_info(path).type != pafs.FileType.NotFound:
        return False
    write_json(output.filesystem, path, document)
    try:
        written = read_json(output.filesystem, path)
    except ValueError:  # another run's write, half done
        return False
    return isinstance(written, dict) and written.get("owner") == document["owner"]
