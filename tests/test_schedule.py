"""Scheduled runs as the chart's RayCronJob starts them (examples/values-platform.yaml, rendered by a real
helm): each run resumes the same output.path, so it detects only the images added since the run before."""

import shlex

import pyarrow.dataset as pads

from app.pipeline import run
from tests.support import k8s_validation as kv
from app.config import compose_config
from tests.support.images import write_images
from tests.support.models import FAST_MODEL

PLATFORM_VALUES = kv.CHART_DIR / "examples" / "values-platform.yaml"


def scheduled_overrides() -> list[str]:
    """The overrides the chart adds to a scheduled run's entrypoint (the rest name a bucket and a GPU model)."""
    helm = kv.find_helm_binaries(install=True)[4]
    cron = next(obj for obj in kv.render(helm, [PLATFORM_VALUES], []) if obj["kind"] == "RayCronJob")
    words = shlex.split(cron["spec"]["jobTemplate"]["entrypoint"])
    return [word for word in words[3:] if word.split("=", 1)[0] in ("metrics.run", "output.skip_if_in_use")]


def test_each_scheduled_run_detects_only_the_images_added_since_the_last(local_ray, tmp_path):
    overrides = scheduled_overrides()
    assert overrides == ["metrics.run=nightly", "output.skip_if_in_use=true"]
    cfg = compose_config([*overrides, *FAST_MODEL, f"data.path={tmp_path / 'bucket'}", f"output.path={tmp_path / 'out'}"])
    first_night = write_images(tmp_path / "bucket", 6)
    assert run(cfg).processed == 6
    added = [path.rename(tmp_path / "bucket" / f"new_{path.name}") for path in write_images(tmp_path / "added", 4)]
    second = run(cfg)
    assert (second.inputs, second.processed, second.ok) == (10, 4, 10)
    rows = pads.dataset(str(tmp_path / "out"), format="parquet").to_table(columns=["path"]).column("path").to_pylist()
    assert sorted(rows) == sorted(str(path) for path in first_night + added)
