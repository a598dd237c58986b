"""`ray-detect submit [options] [overrides...]`: run the app as a RayJob on a KubeRay cluster.

The RayJob is built from k8s/rayjob.yaml (the file `kubectl create -f` uses), so there is one manifest.
The package ships a copy of it, app/manifests/rayjob.yaml (tests/test_submit.py checks that the two are
equal byte for byte), so the command works wherever the package is installed, without a checkout. This
command only sets the namespace, the Hydra overrides of the entrypoint and, when asked, a fixed name, the
target cluster or the submitter image. The overrides are composed against the app's config first, so a
misspelt key fails here, not on the cluster; and an override holding credentials (app.credentials) is
refused before anything is printed or created, even with --skip-config-check, since the RayJob would store it.

Exit codes (app.exit_codes.ExitCode): 0 created (with --wait: the job succeeded); 2 bad arguments or
overrides; 6 a Kubernetes API or configuration error; 7 the job failed or was stopped; 8 --timeout passed
while waiting.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import shlex
import sys
import time
from pathlib import Path
from typing import Any, Optional, TextIO

import yaml

from app.cli import OverrideError, compose_overrides
from app.credentials import override_with_credentials
from app.exit_codes import CommandParser, ExitCode

GROUP, VERSION, PLURAL = "ray.io", "v1", "rayjobs"
# k8s/rayjob.yaml as the package ships it (package data), so no checkout of the repository is needed.
DEFAULT_MANIFEST = Path(__file__).resolve().parent / "manifests" / "rayjob.yaml"
DEFAULT_NAMESPACE = "ray-detect"
APP_COMMAND = ["python", "-m", "app"]
CLUSTER_LABEL = "ray.io/cluster"

# jobDeploymentStatus values after which KubeRay does nothing more for the job.
TERMINAL_DEPLOYMENT_STATUSES = ("Complete", "Failed", "ValidationFailed")

PREFIX = "ray-detect submit"


class SubmitError(Exception):
    """A failure reported as one line on stderr, with its exit code."""

    def __init__(self, message: str, exit_code: ExitCode):
        super().__init__(message)
        self.exit_code = exit_code


# ---------------------------------------------------------------------------------------------------
# Building the RayJob
# ---------------------------------------------------------------------------------------------------


def shell_quote(word: str) -> str:
    """Single-quote a word for the shell that runs the entrypoint, as the chart does ('\\'' inside)."""
    return "'" + word.replace("'", "'\\''") + "'"


def load_manifest(path: Path = DEFAULT_MANIFEST) -> dict[str, Any]:
    """The RayJob of k8s/rayjob.yaml, as the package ships it (or another file holding one RayJob)."""
    try:
        manifest = yaml.safe_load(Path(path).read_text())
    except OSError as error:
        raise SubmitError(f"cannot read the RayJob manifest {path}: {error.strerror}", ExitCode.USAGE) from error
    if not isinstance(manifest, dict) or manifest.get("kind") != "RayJob":
        raise SubmitError(f"{path} does not hold a RayJob", ExitCode.USAGE)
    return manifest


def manifest_overrides(manifest: dict[str, Any]) -> list[str]:
    """The Hydra overrides of the manifest's entrypoint (`python -m app <overrides>`)."""
    words = shlex.split(manifest["spec"]["entrypoint"])
    if words[: len(APP_COMMAND)] != APP_COMMAND:
        raise SubmitError(f"the manifest's entrypoint does not start with {' '.join(APP_COMMAND)}", ExitCode.USAGE)
    return words[len(APP_COMMAND):]


def build_rayjob(
    manifest: dict[str, Any],
    overrides: list[str],
    namespace: str = DEFAULT_NAMESPACE,
    name: Optional[str] = None,
    cluster: Optional[str] = None,
    image: Optional[str] = None,
) -> dict[str, Any]:
    """The RayJob to create: the manifest with the namespace set and, where given, the overrides (which
    replace the manifest's), a fixed name instead of generateName, the cluster and the submitter image."""
    job = copy.deepcopy(manifest)
    given = job["metadata"]
    naming = {"name": name} if name else {k: given[k] for k in ("name", "generateName") if k in given}
    rest = {k: v for k, v in given.items() if k not in ("name", "generateName", "namespace")}
    job["metadata"] = {**naming, "namespace": namespace, **rest}
    spec = job["spec"]
    if overrides:
        spec["entrypoint"] = " ".join(APP_COMMAND + [shell_quote(o) for o in overrides])
    if cluster:
        spec["clusterSelector"] = {CLUSTER_LABEL: cluster}
    if image:
        for container in spec["submitterPodTemplate"]["spec"]["containers"]:
            container["image"] = image
    return job


def refuse_credentials(overrides: list[str]) -> None:
    """SubmitError naming the first override that holds credentials (never the credential itself)."""
    refusal = override_with_credentials(overrides)
    if refusal:
        raise SubmitError(f"config error: {refusal}", ExitCode.USAGE)


def check_overrides(overrides: list[str]) -> None:
    """Compose the app's config with the overrides, as the job will; SubmitError if that fails."""
    try:
        compose_overrides(overrides)
    except OverrideError as error:
        raise SubmitError(f"config error: {error}", ExitCode.USAGE) from error


# ---------------------------------------------------------------------------------------------------
# Talking to Kubernetes
# ---------------------------------------------------------------------------------------------------


def connect(kubeconfig: Optional[str], context: Optional[str]) -> tuple[Any, str]:
    """A CustomObjectsApi, and which credentials it uses, in words: the kubeconfig's (--kubeconfig, else
    $KUBECONFIG or ~/.kube/config) context (--context, else its current one), else the in-cluster
    service account."""
    # kubernetes comes with the submit extra: imported where used, so that importing this module works
    # without it and app.cli can report it missing in one line.
    from kubernetes import client, config
    from kubernetes.config import kube_config

    path = kubeconfig or os.path.expanduser(kube_config.KUBE_CONFIG_DEFAULT_LOCATION)
    try:
        api_client = config.new_client_from_config(config_file=kubeconfig, context=context)
        contexts, current = config.list_kube_config_contexts(config_file=kubeconfig)
        chosen = next(c for c in contexts if c["name"] == (context or current["name"]))
        return client.CustomObjectsApi(api_client), (
            f"kubeconfig {path}, context {chosen['name']} (user {chosen['context'].get('user')})")
    except (config.ConfigException, OSError) as kubeconfig_error:
        if kubeconfig or context:
            raise SubmitError(
                f"cannot load the kubeconfig: {kubeconfig_error}", ExitCode.KUBERNETES
            ) from kubeconfig_error
        try:
            config.load_incluster_config()
        except config.ConfigException:
            raise SubmitError(
                f"no Kubernetes configuration: {kubeconfig_error} (set KUBECONFIG or pass --kubeconfig)",
                ExitCode.KUBERNETES,
            ) from kubeconfig_error
        return client.CustomObjectsApi(client.ApiClient()), f"this pod's service account (in-cluster; no kubeconfig at {path})"


def _status_body(error) -> dict[str, Any]:
    try:
        body = json.loads(error.body or "{}")
    except (TypeError, ValueError):
        return {}
    return body if isinstance(body, dict) else {}


def api_error_message(error, namespace: str, name: Optional[str]) -> str:
    """One line saying what an ApiException means for creating or reading a RayJob."""
    body = _status_body(error)
    message = body.get("message") or error.reason or "no message"
    where = f"{namespace}/{name}" if name else namespace
    if error.status == 401:
        return "the Kubernetes API rejected the credentials (401 Unauthorized): log in again or check the kubeconfig"
    if error.status == 403:
        return f"not allowed (403 Forbidden): {message}"
    if error.status == 409:
        return f"rayjob {where} already exists (409 AlreadyExists): choose another --name, or leave it out"
    if error.status == 404:
        if (body.get("details") or {}).get("kind") == "namespaces":
            return f"namespace {namespace} does not exist (404 NotFound): create it or pass --namespace"
        if name and (body.get("details") or {}).get("kind") == PLURAL:
            return f"rayjob {where} does not exist (404 NotFound)"
        return (
            f"the cluster has no {PLURAL}.{GROUP}/{VERSION} resource (404 NotFound): install the KubeRay operator "
            f"and its CRDs first"
        )
    return f"the Kubernetes API answered {error.status} {error.reason}: {message}"


def _call(api, namespace: str, name: Optional[str], method: str, *args):
    """Call a CustomObjectsApi method; API and connection errors become SubmitError."""
    from kubernetes.client.exceptions import ApiException
    from urllib3.exceptions import HTTPError

    try:
        return getattr(api, method)(GROUP, VERSION, namespace, PLURAL, *args)
    except ApiException as error:
        raise SubmitError(api_error_message(error, namespace, name), ExitCode.KUBERNETES) from error
    except (HTTPError, OSError) as error:
        host = api.api_client.configuration.host
        reason = getattr(error, "reason", None) or error
        raise SubmitError(f"cannot reach the Kubernetes API at {host}: {reason}", ExitCode.KUBERNETES) from error


def create(api, job: dict[str, Any]) -> dict[str, Any]:
    """Create the RayJob; return the object the API server stored (with its generated name)."""
    metadata = job["metadata"]
    return _call(api, metadata["namespace"], metadata.get("name"), "create_namespaced_custom_object", job)


def wait(
    api, namespace: str, name: str, timeout: float, poll_interval: float, out: TextIO
) -> int:
    """Poll the RayJob's status, printing each change, until KubeRay is done with it; the exit code."""
    deadline = time.monotonic() + timeout if timeout > 0 else None
    seen = None
    while True:
        status = _call(api, namespace, name, "get_namespaced_custom_object", name).get("status") or {}
        deployment, job_status = status.get("jobDeploymentStatus") or "", status.get("jobStatus") or ""
        if (deployment, job_status) != seen and deployment:
            seen = (deployment, job_status)
            print(f"{PREFIX}: {namespace}/{name}: {deployment}" + (f" (job {job_status})" if job_status else ""),
                  file=out, flush=True)
        if deployment in TERMINAL_DEPLOYMENT_STATUSES:
            if deployment == "Complete" and job_status == "SUCCEEDED":
                print(f"{PREFIX}: rayjob {namespace}/{name} succeeded", file=out, flush=True)
                return ExitCode.OK
            why = status.get("reason") or (f"job {job_status}" if job_status else deployment)
            detail = f": {status['message']}" if status.get("message") else ""
            raise SubmitError(f"rayjob {namespace}/{name} failed: {why}{detail}", ExitCode.JOB_FAILED)
        if deadline is not None and time.monotonic() >= deadline:
            raise SubmitError(
                f"gave up waiting after {timeout:g} s; rayjob {namespace}/{name} is still "
                f"{deployment or 'pending'} and goes on (kubectl -n {namespace} get rayjob {name} -w)",
                ExitCode.WAIT_TIMEOUT,
            )
        time.sleep(poll_interval)


# ---------------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------------


def parse_args(argv: Optional[list[str]]) -> argparse.Namespace:
    parser = CommandParser(
        prog=PREFIX,
        description="Run ray-detect as a RayJob on the chart's RayCluster, built from k8s/rayjob.yaml.",
        epilog="Example: ray-detect submit --wait data.path=s3://my-bucket/images output.path=s3://my-bucket/out/run-2",
    )
    parser.add_argument("overrides", nargs="*", help="Hydra overrides for `python -m app` (default: the manifest's)")
    parser.add_argument("-n", "--namespace", default=DEFAULT_NAMESPACE, help="namespace (default: %(default)s)")
    parser.add_argument("--name", help="a fixed RayJob name instead of a generated ray-detect-run-xxxxx")
    parser.add_argument("--cluster", help="RayCluster to run on (default: the manifest's, detect-ray-detect)")
    parser.add_argument("--image", help="submitter image (default: the manifest's)")
    parser.add_argument("--manifest", type=Path, default=DEFAULT_MANIFEST, help="RayJob manifest (default: k8s/rayjob.yaml, as the package ships it)")
    parser.add_argument("--kubeconfig", help="kubeconfig file (default: $KUBECONFIG or ~/.kube/config)")
    parser.add_argument("--context", help="kubeconfig context (default: the current one)")
    parser.add_argument("--dry-run", action="store_true", help="print the RayJob as YAML and create nothing")
    parser.add_argument("--wait", action="store_true", help="follow the RayJob until it succeeds or fails")
    parser.add_argument("--timeout", type=float, default=0, help="with --wait: give up after this many seconds (0: never)")
    parser.add_argument("--poll-interval", type=float, default=5.0, help="with --wait: seconds between status reads")
    parser.add_argument("--skip-config-check", action="store_true", help="do not compose the overrides locally first")
    return parser.parse_args(argv)


def run(args: argparse.Namespace, out: TextIO) -> int:
    manifest = load_manifest(args.manifest)
    overrides = args.overrides or manifest_overrides(manifest)
    refuse_credentials(overrides)
    if not args.skip_config_check:
        check_overrides(overrides)
    job = build_rayjob(manifest, args.overrides, args.namespace, args.name, args.cluster, args.image)
    if args.dry_run:
        out.write(yaml.safe_dump(job, sort_keys=False))
        return ExitCode.OK
    api, credentials = connect(args.kubeconfig, args.context)
    print(f"{PREFIX}: credentials: {credentials}", file=out, flush=True)
    created = create(api, job)
    name = created["metadata"]["name"]
    print(f"{PREFIX}: created rayjob {args.namespace}/{name}", file=out, flush=True)
    if not args.wait:
        print(f"{PREFIX}: follow it with: kubectl -n {args.namespace} get rayjob {name} -w", file=out, flush=True)
        return ExitCode.OK
    return wait(api, args.namespace, name, args.timeout, args.poll_interval, out)


def main(argv: Optional[list[str]] = None, out: Optional[TextIO] = None, err: Optional[TextIO] = None) -> int:
    """Entry point; returns the exit code (see the module docstring). Output goes to sys.stdout and
    sys.stderr as they are at the call, unless given."""
    out = sys.stdout if out is None else out
    err = sys.stderr if err is None else err
    args = parse_args(argv)
    try:
        return run(args, out)
    except SubmitError as error:
        print(f"{PREFIX}: {error}", file=err, flush=True)
        return error.exit_code


if __name__ == "__main__":
    from app import cli

    sys.exit(cli.main(["submit", *sys.argv[1:]]))
