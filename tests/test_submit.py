"""`ray-detect submit`: the RayJob it builds, and its create/wait path against a stand-in API server.

There is no Kubernetes API server on the machines these tests run on, so create and wait talk to a small
HTTP server on 127.0.0.1 (an ephemeral port, in a thread) that plays the part of one for the two calls the
command makes: POST .../rayjobs and GET .../rayjobs/<name>. It records every request (method, path,
Authorization header, JSON body) and answers from a script: an error status for the POST, or a list of
RayJob statuses that successive GETs step through. The kubernetes client is configured from a kubeconfig
file pointing at that server, as it would be for a real cluster.
"""

from __future__ import annotations

import errno
import io
import json
import os
import shlex
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Optional

import pytest
import yaml

from app import submit
from app.exit_codes import ExitCode
from tests.support import k8s_validation as kv
from tests.support.credential_forms import CREDENTIAL_FORMS, FORM_IDS, SECRET, refusal
from tests.support.ports import free_port

MANIFEST = kv.K8S_DIR / "rayjob.yaml"
TOKEN = "stand-in-token"
GENERATED_SUFFIX = "x7k2p"
COLLECTION = "/apis/ray.io/v1/namespaces/{namespace}/rayjobs"
OVERRIDES = ["data.path=s3://my-bucket/images", "output.path=s3://my-bucket/detections/run-2", "inference=gpu"]


# ---------------------------------------------------------------------------------------------------
# The stand-in API server
# ---------------------------------------------------------------------------------------------------


@dataclass
class Script:
    """What the stand-in answers: an error for the POST (status, Status body), else 201 and then one
    status per GET (the last repeats)."""

    create_error: Optional[tuple[int, dict[str, Any]]] = None
    statuses: list[dict[str, Any]] = field(default_factory=list)
    requests: list[dict[str, Any]] = field(default_factory=list)
    stored: dict[str, dict[str, Any]] = field(default_factory=dict)
    gets: int = 0


def status_body(code: int, reason: str, message: str, details: Optional[dict] = None) -> dict[str, Any]:
    """A metav1.Status as the API server sends with an error."""
    return {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure", "message": message,
            "reason": reason, "details": details or {}, "code": code}


class StandInApi(BaseHTTPRequestHandler):
    script: Script  # set on a subclass per test

    def log_message(self, *args):  # keep pytest's output clean
        pass

    def _reply(self, code: int, body: dict[str, Any]) -> None:
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _record(self) -> Optional[dict[str, Any]]:
        length = int(self.headers.get("Content-Length") or 0)
        body = json.loads(self.rfile.read(length)) if length else None
        self.script.requests.append(
            {"method": self.command, "path": self.path, "authorization": self.headers.get("Authorization"),
             "body": body}
        )
        return body

    def do_POST(self):
        body = self._record()
        if self.script.create_error:
            code, error = self.script.create_error
            return self._reply(code, error)
        stored = json.loads(json.dumps(body))
        metadata = stored["metadata"]
        metadata["name"] = metadata.pop("generateName", "") + GENERATED_SUFFIX if "name" not in metadata else metadata["name"]
        metadata.update(uid="0b7d6a1e-0000-4000-8000-000000000001", resourceVersion="1")
        self.script.stored[metadata["name"]] = stored
        self._reply(201, stored)

    def do_GET(self):
        self._record()
        name = self.path.rsplit("/", 1)[-1]
        if name not in self.script.stored:
            return self._reply(404, status_body(404, "NotFound", f'rayjobs.ray.io "{name}" not found',
                                                {"name": name, "group": "ray.io", "kind": "rayjobs"}))
        statuses = self.script.statuses or [{}]
        status = statuses[min(self.script.gets, len(statuses) - 1)]
        self.script.gets += 1
        self._reply(200, {**self.script.stored[name], "status": status})


@pytest.fixture(scope="module")
def crd_schemas() -> dict:
    return kv.load_crd_schemas()


def write_kubeconfig(path, server: str):
    """A kubeconfig whose one context points at `server` with a bearer token."""
    path.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "stand-in",
        "clusters": [{"name": "stand-in", "cluster": {"server": server}}],
        "users": [{"name": "tester", "user": {"token": TOKEN}}],
        "contexts": [{"name": "stand-in", "context": {"cluster": "stand-in", "user": "tester"}}],
    }))
    return path


@pytest.fixture()
def stand_in(tmp_path):
    """(script, kubeconfig path): a stand-in API server on loopback and a kubeconfig that points at it."""
    script = Script()
    handler = type("Handler", (StandInApi,), {"script": script})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield script, write_kubeconfig(tmp_path / "kubeconfig", f"http://127.0.0.1:{server.server_port}")
    server.shutdown()
    server.server_close()


def run_submit(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    code = submit.main(list(argv), out=out, err=err)
    return code, out.getvalue(), err.getvalue()


def expected_job(namespace: str = "ray-detect", overrides=OVERRIDES) -> dict[str, Any]:
    """k8s/rayjob.yaml with only the namespace and the entrypoint's overrides changed."""
    manifest = yaml.safe_load(MANIFEST.read_text())
    manifest["metadata"]["namespace"] = namespace
    manifest["spec"]["entrypoint"] = "python -m app " + " ".join(f"'{o}'" for o in overrides)
    return manifest


# ---------------------------------------------------------------------------------------------------
# Building the RayJob (--dry-run)
# ---------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_dry_run_prints_the_manifest_with_the_overrides_and_validates_against_the_crd(crd_schemas):
    code, out, err = run_submit("--dry-run", "-n", "ray-detect-dev", *OVERRIDES)
    assert (code, err) == (0, "")
    job = yaml.safe_load(out)
    assert job == expected_job("ray-detect-dev")
    assert list(job["metadata"]) == ["generateName", "namespace", "labels"]
    assert job["spec"]["entrypoint"] == (
        "python -m app 'data.path=s3://my-bucket/images' 'output.path=s3://my-bucket/detections/run-2' 'inference=gpu'"
    )
    assert kv.strict_errors(job, crd_schemas) == []
    assert kv.object_errors(job, crd_schemas) == []  # strict and restricted pods


def test_dry_run_without_overrides_keeps_the_manifests_entrypoint():
    code, out, _ = run_submit("--dry-run")
    manifest = yaml.safe_load(MANIFEST.read_text())
    assert code == 0
    assert yaml.safe_load(out)["spec"]["entrypoint"] == manifest["spec"]["entrypoint"]


@pytest.mark.slow
def test_name_cluster_and_image_options(crd_schemas):
    code, out, _ = run_submit("--dry-run", "--name", "nightly-1", "--cluster", "other-cluster",
                              "--image", "registry.example/ray-detect:0.1.0-rc1", "model.score_threshold=0.7")
    job = yaml.safe_load(out)
    assert code == 0
    assert job["metadata"]["name"] == "nightly-1" and "generateName" not in job["metadata"]
    assert job["spec"]["clusterSelector"] == {"ray.io/cluster": "other-cluster"}
    assert [c["image"] for c in job["spec"]["submitterPodTemplate"]["spec"]["containers"]] == [
        "registry.example/ray-detect:0.1.0-rc1"
    ]
    assert kv.strict_errors(job, crd_schemas) == []


def test_overrides_are_quoted_for_the_shell():
    overrides = ["data.path=s3://b/my photos/*.jpg", "output.path=s3://b/$HOME"]
    job = submit.build_rayjob(submit.load_manifest(), overrides)
    assert job["spec"]["entrypoint"] == "python -m app 'data.path=s3://b/my photos/*.jpg' 'output.path=s3://b/$HOME'"
    assert shlex.split(job["spec"]["entrypoint"])[3:] == overrides
    assert submit.shell_quote("it's") == "'it'\\''s'"
    assert shlex.split(submit.shell_quote("it's")) == ["it's"]


@pytest.mark.parametrize(
    "override, line",
    [
        ("model.nope=1", "ray-detect submit: config error: Could not override 'model.nope'.\n"),
        ("model=resnet9", "ray-detect submit: config error: In 'config': Could not find 'model/resnet9'\n"),
    ],
)
def test_bad_overrides_fail_before_any_request(stand_in, override, line):
    script, kubeconfig = stand_in
    code, out, err = run_submit("--kubeconfig", str(kubeconfig), override)
    assert (code, out, err) == (2, "", line)
    assert script.requests == []


@pytest.mark.parametrize("uri, form", CREDENTIAL_FORMS, ids=FORM_IDS)
def test_an_override_holding_credentials_is_refused_before_anything_is_printed(uri, form):
    """--dry-run prints nothing, and the secret is in neither output: the RayJob, and so the cluster's
    etcd and anyone who may read RayJobs, would have held it."""
    code, out, err = run_submit("--dry-run", "data.path=s3://my-bucket/images", f"model.weights={uri}")
    assert (code, out, err) == (2, "", f"ray-detect submit: config error: {refusal('model.weights', form)}\n")
    assert SECRET not in out + err


def test_credentials_are_refused_before_any_request_even_without_the_config_check(stand_in):
    script, kubeconfig = stand_in
    uri = CREDENTIAL_FORMS[2][0]
    code, out, err = run_submit("--kubeconfig", str(kubeconfig), "--skip-config-check", f"+data.manifest={uri}")
    assert (code, out) == (2, "")
    assert err == f"ray-detect submit: config error: {refusal('data.manifest', 'user:password@ in its URI')}\n"
    assert script.requests == []


def test_credentials_in_the_manifests_own_entrypoint_are_refused(tmp_path):
    """Without overrides the manifest's entrypoint is the job's: it is checked the same way."""
    other = yaml.safe_load(MANIFEST.read_text())
    other["spec"]["entrypoint"] = f"python -m app 'data.path={CREDENTIAL_FORMS[5][0]}' output.path=s3://b/out"
    path = tmp_path / "signed.yaml"
    path.write_text(yaml.safe_dump(other))
    code, out, err = run_submit("--dry-run", "--manifest", str(path))
    assert (code, out) == (2, "")
    assert err == f"ray-detect submit: config error: {refusal('data.path', 'X-Amz-Signature= in its query string')}\n"
    assert SECRET not in err


def test_an_override_that_is_no_key_is_named_by_its_position():
    code, out, err = run_submit("--dry-run", "inference=gpu", CREDENTIAL_FORMS[0][0])
    assert (code, out) == (2, "")
    assert err == f"ray-detect submit: config error: {refusal('override 2', 'user:password@ in its URI')}\n"


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--timeout", "soon"], "argument --timeout: invalid float value: 'soon'"),
        (["--namespace"], "argument -n/--namespace: expected one argument"),
        (["--wiat"], "unrecognized arguments: --wiat"),
    ],
)
def test_bad_arguments_are_one_line(argv, message, capsys):
    with pytest.raises(SystemExit) as stop:
        run_submit(*argv)
    assert stop.value.code == ExitCode.USAGE == 2
    assert capsys.readouterr() == ("", f"ray-detect submit: error: {message}\n")


def test_missing_manifest_is_one_line(tmp_path):
    code, _, err = run_submit("--dry-run", "--manifest", str(tmp_path / "nope.yaml"))
    assert code == 2
    assert err == f"ray-detect submit: cannot read the RayJob manifest {tmp_path / 'nope.yaml'}: No such file or directory\n"


def test_the_package_ships_k8s_rayjob_yaml_byte_for_byte():
    """submit reads the RayJob from the package's own copy (package data, so an installed package needs no
    checkout); k8s/rayjob.yaml, rendered from the chart, is the one source that copy must equal."""
    shipped = kv.REPO_ROOT / "app" / "manifests" / "rayjob.yaml"
    assert submit.DEFAULT_MANIFEST == shipped
    assert shipped.read_bytes() == MANIFEST.read_bytes(), (
        "app/manifests/rayjob.yaml differs from k8s/rayjob.yaml: write both again with "
        "`bash scripts/render-k8s.sh`"
    )


def test_another_manifest_is_used_as_given(tmp_path):
    """--manifest: a RayJob from another file, with the overrides applied to it."""
    other = yaml.safe_load(MANIFEST.read_text())
    other["metadata"]["generateName"] = "nightly-"
    path = tmp_path / "nightly.yaml"
    path.write_text(yaml.safe_dump(other))
    code, out, err = run_submit("--dry-run", "--manifest", str(path), *OVERRIDES)
    assert (code, err) == (0, "")
    assert yaml.safe_load(out) == {**expected_job(), "metadata": {**expected_job()["metadata"], "generateName": "nightly-"}}


# ---------------------------------------------------------------------------------------------------
# Create and wait, against the stand-in
# ---------------------------------------------------------------------------------------------------


def test_create_posts_the_dry_run_object(stand_in):
    script, kubeconfig = stand_in
    code, out, err = run_submit("--kubeconfig", str(kubeconfig), *OVERRIDES)
    name = f"ray-detect-run-{GENERATED_SUFFIX}"
    assert (code, err) == (0, "")
    assert out == (
        f"ray-detect submit: credentials: kubeconfig {kubeconfig}, context stand-in (user tester)\n"
        f"ray-detect submit: created rayjob ray-detect/{name}\n"
        f"ray-detect submit: follow it with: kubectl -n ray-detect get rayjob {name} -w\n"
    )
    assert len(script.requests) == 1
    request = script.requests[0]
    assert (request["method"], request["path"]) == ("POST", COLLECTION.format(namespace="ray-detect"))
    assert request["authorization"] == f"Bearer {TOKEN}"
    _, dry_run, _ = run_submit("--dry-run", *OVERRIDES)
    assert request["body"] == yaml.safe_load(dry_run) == expected_job()


def test_wait_follows_the_status_until_success(stand_in):
    script, kubeconfig = stand_in
    script.statuses = [
        {},
        {"jobDeploymentStatus": "Initializing"},
        {"jobDeploymentStatus": "Initializing"},
        {"jobDeploymentStatus": "Running", "jobStatus": "PENDING"},
        {"jobDeploymentStatus": "Running", "jobStatus": "RUNNING"},
        {"jobDeploymentStatus": "Running", "jobStatus": "RUNNING"},
        {"jobDeploymentStatus": "Complete", "jobStatus": "SUCCEEDED"},
    ]
    code, out, err = run_submit("--kubeconfig", str(kubeconfig), "-n", "team-a", "--wait", "--poll-interval", "0.01",
                                *OVERRIDES)
    job = f"team-a/ray-detect-run-{GENERATED_SUFFIX}"
    assert (code, err) == (0, "")
    assert out.splitlines()[1:] == [
        f"ray-detect submit: created rayjob {job}",
        f"ray-detect submit: {job}: Initializing",
        f"ray-detect submit: {job}: Running (job PENDING)",
        f"ray-detect submit: {job}: Running (job RUNNING)",
        f"ray-detect submit: {job}: Complete (job SUCCEEDED)",
        f"ray-detect submit: rayjob {job} succeeded",
    ]
    gets = [r for r in script.requests if r["method"] == "GET"]
    assert len(gets) == 7
    assert {r["path"] for r in gets} == {COLLECTION.format(namespace="team-a") + f"/ray-detect-run-{GENERATED_SUFFIX}"}
    assert {r["authorization"] for r in script.requests} == {f"Bearer {TOKEN}"}


@pytest.mark.parametrize(
    "final, line",
    [
        (
            {"jobDeploymentStatus": "Complete", "jobStatus": "FAILED", "message": "Job entrypoint command failed with exit code 2"},
            "failed: job FAILED: Job entrypoint command failed with exit code 2",
        ),
        ({"jobDeploymentStatus": "Complete", "jobStatus": "STOPPED"}, "failed: job STOPPED"),
        (
            {"jobDeploymentStatus": "Failed", "reason": "DeadlineExceeded",
             "message": "The RayJob has passed the activeDeadlineSeconds."},
            "failed: DeadlineExceeded: The RayJob has passed the activeDeadlineSeconds.",
        ),
    ],
    ids=["job-failed", "job-stopped", "deadline"],
)
def test_wait_exits_7_when_the_job_fails(stand_in, final, line):
    script, kubeconfig = stand_in
    script.statuses = [{"jobDeploymentStatus": "Running", "jobStatus": "RUNNING"}, final]
    code, out, err = run_submit("--kubeconfig", str(kubeconfig), "--name", "run-9", "--wait", "--poll-interval",
                                "0.01", *OVERRIDES)
    assert code == ExitCode.JOB_FAILED == 7
    assert out.splitlines()[1:3] == [
        "ray-detect submit: created rayjob ray-detect/run-9",
        "ray-detect submit: ray-detect/run-9: Running (job RUNNING)",
    ]
    assert err == f"ray-detect submit: rayjob ray-detect/run-9 {line}\n"
    assert script.requests[0]["body"]["metadata"]["name"] == "run-9"


def test_wait_gives_up_after_the_timeout_with_exit_8(stand_in):
    script, kubeconfig = stand_in
    script.statuses = [{"jobDeploymentStatus": "Running", "jobStatus": "RUNNING"}]
    code, _, err = run_submit("--kubeconfig", str(kubeconfig), "--name", "run-9", "--wait", "--timeout", "0.2",
                              "--poll-interval", "0.05", *OVERRIDES)
    assert code == ExitCode.WAIT_TIMEOUT == 8
    assert err == (
        "ray-detect submit: gave up waiting after 0.2 s; rayjob ray-detect/run-9 is still Running and goes on "
        "(kubectl -n ray-detect get rayjob run-9 -w)\n"
    )


@pytest.mark.parametrize(
    "code, error, line",
    [
        (401, status_body(401, "Unauthorized", "Unauthorized"),
         "the Kubernetes API rejected the credentials (401 Unauthorized): log in again or check the kubeconfig"),
        (403, status_body(403, "Forbidden", 'rayjobs.ray.io is forbidden: User "tester" cannot create resource '
                          '"rayjobs" in API group "ray.io" in the namespace "ray-detect"'),
         'not allowed (403 Forbidden): rayjobs.ray.io is forbidden: User "tester" cannot create resource "rayjobs" '
         'in API group "ray.io" in the namespace "ray-detect"'),
        (409, status_body(409, "AlreadyExists", 'rayjobs.ray.io "run-9" already exists',
                          {"name": "run-9", "group": "ray.io", "kind": "rayjobs"}),
         "rayjob ray-detect/run-9 already exists (409 AlreadyExists): choose another --name, or leave it out"),
        (404, status_body(404, "NotFound", "the server could not find the requested resource"),
         "the cluster has no rayjobs.ray.io/v1 resource (404 NotFound): install the KubeRay operator and its CRDs first"),
        (404, status_body(404, "NotFound", 'namespaces "ray-detect" not found', {"name": "ray-detect", "kind": "namespaces"}),
         "namespace ray-detect does not exist (404 NotFound): create it or pass --namespace"),
    ],
    ids=["401", "403", "409", "crd-missing", "namespace-missing"],
)
def test_api_errors_are_one_line_with_exit_6(stand_in, code, error, line):
    script, kubeconfig = stand_in
    script.create_error = (code, error)
    exit_code, out, err = run_submit("--kubeconfig", str(kubeconfig), "--name", "run-9", "--wait", *OVERRIDES)
    credentials = f"ray-detect submit: credentials: kubeconfig {kubeconfig}, context stand-in (user tester)\n"
    assert (exit_code, out, err) == (ExitCode.KUBERNETES, credentials, f"ray-detect submit: {line}\n")
    assert exit_code == 6
    assert [r["method"] for r in script.requests] == ["POST"]


def test_unreachable_api_server_is_one_line(tmp_path):
    port = free_port()  # nothing listens there: the connection is refused
    kubeconfig = write_kubeconfig(tmp_path / "kubeconfig", f"http://127.0.0.1:{port}")
    code, out, err = run_submit("--kubeconfig", str(kubeconfig), *OVERRIDES)
    assert (code, out) == (ExitCode.KUBERNETES, f"ray-detect submit: credentials: kubeconfig {kubeconfig}, context stand-in (user tester)\n")
    # After the app's words, urllib3's (through the kubernetes client).
    assert err == (
        f"ray-detect submit: cannot reach the Kubernetes API at http://127.0.0.1:{port}: HTTPConnection(host='127.0.0.1', "
        f"port={port}): Failed to establish a new connection: [Errno {errno.ECONNREFUSED}] {os.strerror(errno.ECONNREFUSED)}\n"
    )


def test_without_a_kubeconfig_it_says_it_uses_the_pods_service_account(tmp_path, monkeypatch):
    """No kubeconfig where the client looks: in a pod, the service account's token. There is no pod here:
    the client's in-cluster files and environment are stood in for (a token file, a CA file, an API
    address where nothing listens), so the request fails after the credentials are named."""
    from kubernetes.config import incluster_config, kube_config

    (tmp_path / "token").write_text(TOKEN)
    (tmp_path / "ca.crt").write_text("a CA bundle, never read: nothing listens at the address")
    monkeypatch.setattr(kube_config, "KUBE_CONFIG_DEFAULT_LOCATION", str(tmp_path / "absent"))
    monkeypatch.setattr(incluster_config, "SERVICE_TOKEN_FILENAME", str(tmp_path / "token"))
    monkeypatch.setattr(incluster_config, "SERVICE_CERT_FILENAME", str(tmp_path / "ca.crt"))
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "127.0.0.1")
    monkeypatch.setenv("KUBERNETES_SERVICE_PORT", "1")
    code, out, err = run_submit(*OVERRIDES)
    assert code == ExitCode.KUBERNETES
    assert out == f"ray-detect submit: credentials: this pod's service account (in-cluster; no kubeconfig at {tmp_path / 'absent'})\n"
    assert err.startswith("ray-detect submit: cannot reach the Kubernetes API at https://127.0.0.1:1: ")


def test_a_missing_kubeconfig_is_one_line(tmp_path):
    code, out, err = run_submit("--kubeconfig", str(tmp_path / "absent"), *OVERRIDES)
    assert (code, out) == (ExitCode.KUBERNETES, "")
    assert err == "ray-detect submit: cannot load the kubeconfig: Invalid kube-config file. No configuration found.\n"
