"""`python -m app [overrides...]`: run the batch job with Hydra-composed configuration."""

import logging
import sys

import hydra

import app.conf  # noqa: F401  (registers the typed config schema)
from app.output.lease import LeaseLost, OutputInUse
from app.pipeline import ConfigError, DeviceUnavailable, Summary, TooManyErrors, run

log = logging.getLogger(__name__)


def print_summary(summary: Summary) -> None:
    errors = ", ".join(f"{kind}={count}" for kind, count in summary.errors_by_kind.items()) or "none"
    print(
        f"ray-detect: {summary.inputs} images ({summary.ok} ok, {summary.errors} errors: {errors}), "
        f"{summary.detections} detections; {summary.processed} processed by this run in "
        f"{summary.wall_seconds:.1f} s ({summary.images_per_second:.2f} images/s)\n"
        f"ray-detect: results in {summary.output_path} (manifest: {summary.output_path}/_manifest.json)"
    )
    if summary.detector_actors:
        devices = ", ".join(f"{device} x{count}" for device, count in summary.detector_devices.items())
        print(f"ray-detect: detector actors used: {summary.detector_actors}, on {summary.detector_nodes} node(s), "
              f"holding {summary.detector_gpus:g} GPU(s); devices: {devices}")
    for warning in summary.warnings:
        log.warning(warning)


@hydra.main(config_path="conf", config_name="config", version_base=None)
def main(cfg) -> None:
    try:
        print_summary(run(cfg))
    except ConfigError as error:
        print(f"ray-detect: config error: {error}", file=sys.stderr)
        sys.exit(2)
    except (OutputInUse, LeaseLost) as error:
        print(f"ray-detect: output in use: {error}", file=sys.stderr)
        sys.exit(5)
    except DeviceUnavailable as error:
        print(f"ray-detect: GPU unusable: {error}", file=sys.stderr)
        sys.exit(4)
    except TooManyErrors as error:
        print_summary(error.summary)
        print(f"ray-detect: failed: {error}", file=sys.stderr)
        sys.exit(3)


if __name__ == "__main__":
    main()
