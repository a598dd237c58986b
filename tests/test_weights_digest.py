"""The weights' bytes are the ones meant: model.checkpoint_sha256 checked by the driver before work and by
every detector actor after its read (a mismatch there stops the run), the digest the first run read
recorded in the output's settings (so that a checkpoint replaced at the same path is not resumed; that
test is in tests/test_resume.py), and torchvision's pretrained weights checked against the SHA-256 their
file name publishes, downloaded or found in TORCH_HOME. The functions the driver and the actors call,
called here, and one run on a local Ray whose actors find the checkpoint replaced. The download is a real
one, by torch.hub, from a web server on 127.0.0.1."""

import functools
import hashlib
import os
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch
from torchvision.models import get_model_weights

from app.commit import stopped
from app.detector import Detector
from app.config import ConfigError, compose_config
from app.model import (
    WEIGHTS_ERROR_MARKER,
    ModelSpec,
    WeightsError,
    build_model,
    ensure_pretrained_weights,
    load_checkpoint,
    pretrained_weights_file,
)
from app.pipeline import model_spec, run
from tests.support.images import write_images
from tests.support.models import FAST_MODEL, LIGHT_CHECKPOINT

LIGHT = "fasterrcnn_mobilenet_v3_large_320_fpn"
LIGHT_FILE = os.path.basename(get_model_weights(LIGHT).DEFAULT.url)  # ...-907ea3f9.pth: the published prefix


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture()
def checkpoint(tmp_path):
    """A small checkpoint file (torch.load reads it; no model needs it here) and its bytes."""
    path = tmp_path / "w.pt"
    torch.save({"x": torch.arange(4)}, path)
    return path, path.read_bytes()


def test_the_driver_refuses_a_checkpoint_of_another_digest(checkpoint):
    path, data = checkpoint
    wrong = "0" * 64
    with pytest.raises(ConfigError) as caught:
        model_spec(compose_config(["data.path=/in", f"model.weights={path}", f"model.checkpoint_sha256={wrong}"]))
    assert str(caught.value) == f"model.weights checkpoint {path} has the SHA-256 {sha256(data)}, not model.checkpoint_sha256={wrong}"


def test_the_driver_records_the_digest_it_read_given_or_not(checkpoint):
    path, data = checkpoint
    for digest in (sha256(data).upper(), None):
        overrides = ["data.path=/in", f"model.weights={path}"] + ([f"model.checkpoint_sha256={digest}"] if digest else [])
        assert model_spec(compose_config(overrides)).weights_sha256 == sha256(data)
    assert model_spec(compose_config(["data.path=/in", "model.weights=none"])).weights_sha256 is None


def test_an_actor_refuses_checkpoint_bytes_of_another_digest_before_torch_parses_them(checkpoint):
    """What each actor's build_model reads is checked against the digest the driver recorded: a file
    changed after the driver's check (or another node's file at that path) stops the run."""
    path, data = checkpoint
    recorded = "a" * 64
    spec = ModelSpec(name=LIGHT, weights=str(path), score_threshold=0.5, min_size=320, max_size=640, weights_sha256=recorded)
    line = (f"model.weights checkpoint {path} read by a detector actor has the SHA-256 {sha256(data)}, not {recorded} (the "
            "digest the run checked before work): it changed since, or this node reads other bytes at that path")
    with pytest.raises(WeightsError) as caught:
        build_model(spec)
    assert str(caught.value) == f"{WEIGHTS_ERROR_MARKER} {line}"
    assert torch.equal(load_checkpoint(str(path), sha256(data))["x"], torch.arange(4))
    # The driver finds the marker inside Ray's wrapping of the actor's error and stops the run with it:
    # a config error (exit code 2), never an error row.
    wrapped = RuntimeError(f"The actor died because of an error raised in its creation task\nTraceback ...\n"
                           f"app.model.WeightsError: {caught.value}")
    reason = stopped(wrapped, verdicts=None)
    assert (type(reason), str(reason)) == (ConfigError, line)


class ReplacingDetector(Detector):
    """The app's detector, in an actor that first replaces the checkpoint at model.weights: as if it changed
    after the driver checked it, or this actor's node held other bytes at that path."""

    def load_model(self, spec):
        with open(spec.weights, "wb") as file:
            file.write(b"another checkpoint")
        return super().load_model(spec)


def test_a_run_whose_actors_read_other_checkpoint_bytes_stops_with_one_line(local_ray, tmp_path):
    """The actor's refusal stops the run (a config error, exit code 2 on the command line), before any row
    is committed: never a verdict on the images."""
    write_images(tmp_path / "in", 2)
    weights = tmp_path / "w.pt"
    weights.write_bytes(LIGHT_CHECKPOINT.read_bytes())
    overrides = [*FAST_MODEL, f"model.weights={weights}", f"data.path={tmp_path / 'in'}", f"output.path={tmp_path / 'out'}"]
    with pytest.raises(ConfigError) as caught:
        run(compose_config(overrides), detector=ReplacingDetector)
    assert str(caught.value) == (
        f"model.weights checkpoint {weights} read by a detector actor has the SHA-256 {sha256(b'another checkpoint')}, not "
        f"{sha256(LIGHT_CHECKPOINT.read_bytes())} (the digest the run checked before work): it changed since, or this "
        "node reads other bytes at that path")
    assert list((tmp_path / "out").glob("part-*.parquet")) == []


@pytest.fixture()
def weights_server(tmp_path, monkeypatch):
    """The base URL of a web server on 127.0.0.1 serving tmp_path/web; TORCH_HOME an empty tmp_path/torch,
    and no proxy between."""
    (tmp_path / "web").mkdir()
    for name in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    handler = type("Quiet", (SimpleHTTPRequestHandler,), {"log_message": lambda self, *args: None})
    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(handler, directory=str(tmp_path / "web")))
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_port}"
    server.shutdown()
    server.server_close()


def test_a_downloaded_weights_file_with_the_wrong_hash_is_refused(weights_server, tmp_path):
    """The app's download (torch.hub's, with the hash prefix the file name publishes) of a file of other
    bytes under the published name: refused, and nothing is left in TORCH_HOME."""
    (tmp_path / "web" / LIGHT_FILE).write_bytes(b"not the published weights")
    url = f"{weights_server}/{LIGHT_FILE}"
    with pytest.raises(WeightsError) as caught:
        ensure_pretrained_weights(LIGHT, url)
    assert str(caught.value) == (
        f"model.weights=DEFAULT needs torchvision's pretrained weights for {LIGHT}, which are not in TORCH_HOME "
        f"({tmp_path / 'torch' / 'hub'}) and could not be downloaded from {url} (RuntimeError: invalid hash value "
        f"(expected \"907ea3f9\", got \"{sha256(b'not the published weights')}\")). Fix it in one of three ways: point "
        "model.weights at a checkpoint file (local path or URI); pre-fill TORCH_HOME with "
        f"{LIGHT_FILE} under hub/checkpoints/ (the Docker image does this at build time); or pass "
        "model.weights=none for random initialisation, whose detections are meaningless.")
    assert os.listdir(tmp_path / "torch" / "hub" / "checkpoints") == []


def test_weights_whose_hash_matches_their_name_are_downloaded_and_kept(weights_server, tmp_path):
    """The same check passes bytes whose SHA-256 starts with the name's prefix (a name made for these bytes)."""
    data = b"weights published under their digest"
    name = f"weights-{sha256(data)[:8]}.pth"
    (tmp_path / "web" / name).write_bytes(data)
    ensure_pretrained_weights(LIGHT, f"{weights_server}/{name}")
    assert open(pretrained_weights_file(LIGHT), "rb").read() == data
    ensure_pretrained_weights(LIGHT, f"{weights_server}/{name}")  # found in TORCH_HOME: checked, kept


def test_a_weights_file_in_torch_home_with_the_wrong_hash_is_refused(weights_server, tmp_path):
    """torchvision loads a file already in TORCH_HOME without checking it; the driver checks it first."""
    target = pretrained_weights_file(LIGHT)
    os.makedirs(os.path.dirname(target))
    with open(target, "wb") as file:
        file.write(b"tampered")
    with pytest.raises(WeightsError) as caught:
        ensure_pretrained_weights(LIGHT)
    assert str(caught.value) == (
        f"model.weights=DEFAULT: {target} is not torchvision's {LIGHT_FILE}: its SHA-256 does not start with 907ea3f9, "
        "as the name says; delete it (it is downloaded again) or replace it with the published file")
