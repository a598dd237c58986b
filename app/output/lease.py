"""One run at a time on an output.path: a lease file with an owner and a heartbeat.

A run creates `_lease.json` in output.path before it touches anything there, with a write that fails
when the file exists: an exclusive create on local disks, `If-None-Match: *` on S3 (through boto3, which
reads the same credentials and AWS_ENDPOINT_URL as pyarrow). Other stores have no such write: there the
lease is checked, written and read back, which two runs starting within a second of each other can both
pass. While the run goes on, a thread rewrites the heartbeat every heartbeat_s seconds; a lease whose
heartbeat is older than timeout_s belongs to a run that died, and the next run takes it over (at once
when the holder ran on the same machine and its process is gone). A run that
finds its lease taken over stops before committing another file (the writer reads the lease before each
commit). A run may wait (wait_s) for a lease
to go stale instead of giving up at once: what a job retried after its driver died elsewhere needs. Heartbeats are wall-clock times of the
machines involved, which must agree to well within timeout_s (NTP does).
"""

import contextlib
import logging
import os
import socket
import threading
import time
from typing import Optional

import pyarrow.fs as pafs

from app.background import BackgroundLoop
from app.output.dataset import LEASE_NAME, json_bytes, read_json, write_json
from app.storage import Location

log = logging.getLogger(__name__)


class OutputInUse(Exception):
    """output.path holds the live lease of another run; the message is one line."""


class LeaseLost(Exception):
    """Another run took this run's lease over (its heartbeats stopped for longer than the timeout)."""


class OutputLease:
    """The lease of one run (`owner`) on output.path; a context manager that acquires and releases it."""

    def __init__(self, output: Location, owner: str, timeout_s: float, heartbeat_s: float, wait_s: float = 0.0):
        self.output, self.owner = output, owner
        self.timeout_s, self.heartbeat_s, self.wait_s = timeout_s, heartbeat_s, wait_s
        self.path = output.join(LEASE_NAME)
        self.lost: Optional[str] = None
        self.heartbeats = 0  # renewals so far
        self.heartbeating = BackgroundLoop("output-lease", self._beat)

    def document(self) -> dict:
        return {"owner": self.owner, "host": socket.gethostname(), "pid": os.getpid(), "heartbeat": time.time()}

    def acquire(self) -> None:
        """Take the lease, or raise OutputInUse naming the live run that holds it, after waiting up to
        wait_s seconds for that lease to go stale."""
        self.output.filesystem.create_dir(self.output.path, recursive=True)
        give_up = time.monotonic() + self.wait_s
        while not create_exclusive(self.output, self.path, self.document()):
            holder = read_json(self.output.filesystem, self.path)
            if holder is None:
                continue  # released meanwhile
            age = time.time() - float(holder.get("heartbeat", 0))
            description = f"run {holder.get('owner')} on {holder.get('host')} (pid {holder.get('pid')})"
            if age >= self.timeout_s or died_here(holder):
                log.warning("taking over output.path from %s, silent for %.0f s", description, age)
                with contextlib.suppress(FileNotFoundError):
                    self.output.filesystem.delete_file(self.path)
                continue
            stale_in = self.timeout_s - age
            if time.monotonic() + stale_in > give_up:
                raise OutputInUse(
                    f"output.path {self.output.uri(self.output.path)} is in use by {description}, whose last heartbeat "
                    f"was {age:.0f} s ago; a lease is stale after output.lease_timeout_s={self.timeout_s:g}"
                )
            log.info("output.path is held by %s, silent for %.0f s: waiting for its lease to go stale", description, age)
            time.sleep(min(self.heartbeat_s, stale_in))
        self.heartbeating.start()

    def _beat(self, stopping: threading.Event) -> None:
        while not stopping.wait(self.heartbeat_s):
            try:
                holder = read_json(self.output.filesystem, self.path) or {}
                if holder.get("owner") != self.owner:
                    self.lost = f"run {holder.get('owner')} on {holder.get('host')} took output.path over"
                    return
                write_json(self.output.filesystem, self.path, self.document())
                self.heartbeats += 1
            except (OSError, ValueError) as error:  # a store's hiccup: the next heartbeat tries again
                log.warning("could not renew the lease on output.path: %s", error)

    def check(self) -> None:
        """Raise LeaseLost when the heartbeat thread found the lease taken over by another run."""
        if self.lost:
            raise LeaseLost(self.lost)

    def verify(self) -> None:
        """Raise LeaseLost unless the lease file still names this run. The writer calls it before each
        commit, so that a run whose lease was taken over commits nothing more, without waiting for its
        next heartbeat to notice; a read that fails leaves the judgement to the heartbeats."""
        self.check()
        try:
            holder = read_json(self.output.filesystem, self.path) or {}
        except (OSError, ValueError) as error:
            log.warning("could not read the lease on output.path before a commit: %s", error)
            return
        if holder.get("owner") != self.owner:
            self.lost = f"run {holder.get('owner')} on {holder.get('host')} took output.path over"
            raise LeaseLost(self.lost)

    def release(self) -> None:
        self.heartbeating.stop()
        holder = read_json(self.output.filesystem, self.path) or {}
        if holder.get("owner") == self.owner:
            self.output.filesystem.delete_file(self.path)

    def __enter__(self) -> "OutputLease":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def died_here(holder: dict) -> bool:
    """Whether the lease's holder ran on this machine and its process is gone (a driver killed here)."""
    if holder.get("host") != socket.gethostname():
        return False
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
            if error.response.get("Error", {}).get("Code") in ("PreconditionFailed", "ConditionalRequestConflict"):
                return False
            raise
        return True
    # No conditional write: check, write, and read back.
    if output.filesystem.get_file_info(path).type != pafs.FileType.NotFound:
        return False
    write_json(output.filesystem, path, document)
    return (read_json(output.filesystem, path) or {}).get("owner") == document["owner"]
