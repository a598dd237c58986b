"""Build the chart's Grafana dashboard (charts/ray-detect/dashboards/ray-detect.json) from the app's
metrics (app.metrics), with Grafana's own SDK (grafana-foundation-sdk): its builders are typed after
Grafana's dashboard schema, so a misspelt field fails here instead of in Grafana, and the JSON is
rebuilt, not edited. tests/test_metrics.py checks that the file is what this script writes, and runs
every query of it against a real Prometheus after a run.

    .venv/bin/python scripts/dashboard.py          # rewrite the JSON
    .venv/bin/python scripts/dashboard.py --check  # exit 1 if the JSON is not what this script writes
"""

import sys
from pathlib import Path

from grafana_foundation_sdk.builders import bargauge, dashboard, prometheus, stat, timeseries
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models.dashboard import DataSourceRef, VariableRefresh

OUTPUT = Path(__file__).resolve().parent.parent / "charts" / "ray-detect" / "dashboards" / "ray-detect.json"
DATASOURCE = DataSourceRef(type_val="prometheus", uid="${datasource}")
RUN = 'run=~"$run"'
RATE = "[$__rate_interval]"


def query(expr: str, legend: str = "") -> prometheus.Dataquery:
    target = prometheus.Dataquery().expr(expr).datasource(DATASOURCE)
    return target.legend_format(legend) if legend else target


def panel(kind, title: str, description: str, unit: str, *targets: prometheus.Dataquery, width: int = 8, height: int = 7):
    built = kind.Panel().title(title).description(description).unit(unit).datasource(DATASOURCE).span(width).height(height)
    for ref_id, target in zip("ABCDEFGH", targets):
        built = built.with_target(target.ref_id(ref_id))
    return built


def quantiles(metric: str, stage: str) -> list[prometheus.Dataquery]:
    return [query(f"histogram_quantile({q}, sum by (le) (rate({metric}_bucket{{{RUN}}}{RATE})))", f"{stage} p{int(q * 100)}")
            for q in (0.5, 0.95)]


def build() -> dashboard.Dashboard:
    done = f"max by (run) (ray_detect_images_done{{{RUN}}})"
    inputs = f"max by (run) (ray_detect_inputs{{{RUN}}})"
    images_rate = f"sum by (run) (rate(ray_detect_images_total{{{RUN}}}{RATE}))"
    actors = f"sum by (device) (ray_detect_detector_actors{{{RUN}}})"
    panels = [
        dashboard.Row("Progress"),
        panel(stat, "Progress", "Inputs with a committed row, earlier runs' included, of all inputs (of those listed so "
              "far while the listing goes on).", "percentunit", query(f"{done} / {inputs}"), width=6, height=5),
        panel(stat, "Images done", "Inputs with a committed row.", "short", query(done), width=6, height=5),
        panel(stat, "Inputs", "Inputs of the run.", "short", query(inputs), width=6, height=5),
        panel(stat, "Time left", "Inputs left over the rate of the last few minutes.", "s",
              query(f"({inputs} - {done}) / {images_rate}"), width=6, height=5),
        dashboard.Row("Rate"),
        panel(timeseries, "Images per second", "Images the run finished, by outcome.", "short",
              query(f"sum by (outcome) (rate(ray_detect_images_total{{{RUN}}}{RATE}))", "{{outcome}}")),
        panel(bargauge, "Errors by kind", "Error rows this run committed, and inputs it left for a rerun (transient).",
              "short", query(f'sum by (outcome) (ray_detect_images_total{{{RUN}, outcome!="ok"}})', "{{outcome}}")),
        panel(timeseries, "Seconds per image by stage", "Read and decode (CPU tasks); the model (the image's share of its "
              "model batch).", "s", *quantiles("ray_detect_decode_seconds", "decode"), *quantiles("ray_detect_model_seconds", "model")),
        dashboard.Row("Detector actors"),
        panel(timeseries, "Detector actors", "Detector actors alive, by device.", "short", query(actors, "{{device}}")),
        panel(timeseries, "Busy fraction of the detector actors", "Seconds in model batches per second and actor: "
              "low while inputs remain means the GPUs wait for decoding or reads.", "percentunit",
              query(f"sum by (device) (rate(ray_detect_actor_busy_seconds_total{{{RUN}}}{RATE})) / {actors}", "{{device}}")),
        panel(timeseries, "Images per model batch", "Mean images per model batch: images through the model over model batches.",
              "short", query(f"sum(rate(ray_detect_model_seconds_count{{{RUN}}}{RATE})) / sum(rate(ray_detect_batch_images_count{{{RUN}}}{RATE}))")),
        panel(timeseries, "Batch padding", "Padded pixels of a model batch over the pixels its images need, minus 1 (by "
              "bucket: Ray exports histograms by their buckets).", "percentunit",
              *[query(f"histogram_quantile({q}, sum by (le) (rate(ray_detect_batch_padding_bucket{{{RUN}}}{RATE})))", f"p{int(q * 100)}")
                for q in (0.5, 0.95)]),
        dashboard.Row("Storage and output"),
        panel(timeseries, "Time since the last commit", "Seconds since the run last committed a file of rows "
              "(output.commit_interval_s at most while rows come).", "s",
              query(f"time() - max by (run) (ray_detect_last_commit_timestamp_seconds{{{RUN}}})")),
        panel(timeseries, "Bytes read per second", "Bytes of image files read.", "Bps",
              query(f"sum by (run) (rate(ray_detect_input_bytes_total{{{RUN}}}{RATE}))")),
        panel(timeseries, "Read retries per second", "Reads tried again after throttling, a 5xx, a timeout or a reset.",
              "short", query(f"sum by (run) (rate(ray_detect_read_retries_total{{{RUN}}}{RATE}))")),
        panel(timeseries, "Lease heartbeats per minute", "Renewals of the run's lease on output.path.", "short",
              query(f"sum by (run) (rate(ray_detect_lease_heartbeats_total{{{RUN}}}{RATE})) * 60")),
    ]
    built = (dashboard.Dashboard("ray-detect").uid("ray-detect").tags(["ray-detect", "ray"]).refresh("30s").time("now-6h", "now")
             .with_variable(dashboard.DatasourceVariable("datasource").label("Data source").type("prometheus"))
             .with_variable(dashboard.QueryVariable("run").label("Run").datasource(DATASOURCE)
                            .query("label_values(ray_detect_inputs, run)").refresh(VariableRefresh.ON_TIME_RANGE_CHANGED)
                            .multi(True).include_all(True)))
    for item in panels:
        built = built.with_row(item) if isinstance(item, dashboard.Row) else built.with_panel(item)
    return built


def render() -> str:
    return JSONEncoder(sort_keys=True, indent=2).encode(build().build()) + "\n"


if __name__ == "__main__":
    text = render()
    if sys.argv[1:] == ["--check"]:
        sys.exit(0 if OUTPUT.read_text() == text else f"{OUTPUT} is not what scripts/dashboard.py writes: run it")
    OUTPUT.parent.mkdir(parents=True, exist_ok=True)
    OUTPUT.write_text(text)
