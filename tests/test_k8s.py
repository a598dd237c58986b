"""k8s/: every kustomization rendered with `kubectl kustomize --enable-helm`, the kubectl RayJob manifest and
the Argo CD Applications, validated strictly against the KubeRay CRDs and the restricted Pod Security
Standard, and compared with the chart so that neither is a second hand-written copy: the kustomizations
equal the chart's render, and k8s/rayjob.yaml is what scripts/render-k8s.sh renders from the chart.

kubectl and helm v3 come from PATH or .tools/ (scripts/get-k8s-tools.sh); kustomize needs helm v3, since
it runs `helm version -c`, which Helm v4 removed.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from hydra import compose, initialize_config_module

from tests.support import k8s_validation as kv

pytestmark = pytest.mark.slow  # kubectl kustomize --enable-helm renders

K8S = kv.K8S_DIR
RAYJOB = K8S / "rayjob.yaml"
RENDER_SCRIPT = kv.REPO_ROOT / "scripts" / "render-k8s.sh"
ENVIRONMENTS = {"dev": "ray-detect-dev", "prod": "ray-detect"}  # overlay -> namespace
CLUSTER = "detect-ray-detect"  # the chart's RayCluster for release "detect"


@pytest.fixture(scope="module")
def crd_schemas() -> dict:
    return kv.load_crd_schemas()


@pytest.fixture(scope="module")
def helm3() -> Path:
    return kv.find_helm_binaries()[3]


@pytest.fixture(scope="module")
def rendered(helm3) -> dict[str, list[dict]]:
    """Objects of every kustomization, keyed by folder relative to k8s/ ("base", "overlays/dev")."""
    kubectl = kv.find_kubectl()
    return {d.relative_to(K8S).as_posix(): kv.kustomize_build(d, kubectl, helm3) for d in kv.kustomization_dirs()}


def only(objects: list[dict], kind: str) -> dict:
    matches = [o for o in objects if o["kind"] == kind]
    assert len(matches) == 1, f"expected one {kind}, got {len(matches)}"
    return matches[0]


def release_policy(objects: list[dict]) -> dict:
    """The NetworkPolicy of every pod of the release (the other one is the head's, for the API server)."""
    matches = [o for o in objects if o["kind"] == "NetworkPolicy" and o["metadata"]["name"] == CLUSTER]
    assert len(matches) == 1, f"expected one NetworkPolicy/{CLUSTER}, got {len(matches)}"
    return matches[0]


def kustomization(folder: str) -> dict:
    return yaml.safe_load((K8S / folder / "kustomization.yaml").read_text())


def groups(cluster: dict) -> dict[str, dict]:
    return {g["groupName"]: g for g in cluster["spec"].get("workerGroupSpecs", [])}


def head_maxima(cluster: dict) -> dict[str, str]:
    """The RAY_DETECT_MAX_* variables the chart sets on the head (where a RayJob's driver runs)."""
    env = cluster["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["env"]
    return {e["name"]: e["value"] for e in env if e["name"].startswith("RAY_DETECT_MAX_")}


# ---------------------------------------------------------------------------------------------------
# Kustomizations
# ---------------------------------------------------------------------------------------------------


def test_every_kustomization_renders(rendered):
    assert {folder: [o["kind"] for o in objs] for folder, objs in rendered.items()} == {
        "base": ["ServiceAccount", "PodDisruptionBudget", "NetworkPolicy", "NetworkPolicy", "RayCluster"],
        "overlays/dev": ["ServiceAccount", "PodDisruptionBudget", "NetworkPolicy", "NetworkPolicy", "RayCluster"],
        "overlays/prod": ["ServiceAccount", "PodDisruptionBudget", "NetworkPolicy", "NetworkPolicy", "RayCluster"],
    }
    for folder, objects in rendered.items():
        namespace = ENVIRONMENTS.get(folder.rsplit("/", 1)[-1], "ray-detect")
        assert {o["metadata"]["namespace"] for o in objects} == {namespace}, folder
        assert only(objects, "RayCluster")["metadata"]["name"] == CLUSTER


def test_rendered_kuberay_objects_validate_strictly_and_pods_are_restricted(rendered, crd_schemas):
    templates = {}
    for folder, objects in rendered.items():
        cluster = only(objects, "RayCluster")
        assert kv.strict_errors(cluster, crd_schemas) == [], folder
        assert kv.object_errors(cluster, crd_schemas) == [], folder
        templates[folder] = [where.rsplit(" ", 1)[-1] for where, _ in kv.pod_templates(cluster)]
        assert kv.autoscaler_violations(cluster) == [] and cluster["spec"]["enableInTreeAutoscaling"] is True
    assert templates == {
        "base": ["head", "cpu-workers", "gpu-workers"],
        "overlays/dev": ["head", "cpu-workers"],
        "overlays/prod": ["head", "cpu-workers", "gpu-workers"],
    }


def test_kustomizations_declare_kind_namespace_and_labels_not_commonlabels():
    for folder in ["base", "overlays/dev", "overlays/prod"]:
        k = kustomization(folder)
        assert (k["apiVersion"], k["kind"]) == ("kustomize.config.k8s.io/v1beta1", "Kustomization")
        assert "commonLabels" not in k
        assert k["namespace"] == k["helmCharts"][0]["namespace"]
    for env in ENVIRONMENTS:
        assert kustomization(f"overlays/{env}")["labels"] == [{"pairs": {"ray-detect/environment": env}}]


def test_overlays_name_the_same_chart_and_release_as_the_base_with_the_base_values_first():
    base = kustomization("base")
    assert base["helmGlobals"] == {"chartHome": "../../charts"}
    assert base["helmCharts"] == [
        {"name": "ray-detect", "releaseName": "detect", "namespace": "ray-detect", "valuesFile": "values.yaml"}
    ]
    for env, namespace in ENVIRONMENTS.items():
        overlay = kustomization(f"overlays/{env}")
        assert overlay["helmGlobals"] == {"chartHome": "../../../charts"}
        assert overlay["helmCharts"] == [
            {**base["helmCharts"][0], "namespace": namespace, "valuesFile": "../../base/values.yaml",
             "additionalValuesFiles": ["values.yaml"]}
        ]
        assert (K8S / "overlays" / env / overlay["helmGlobals"]["chartHome"] / "ray-detect").resolve() == kv.CHART_DIR


@pytest.mark.parametrize("folder", ["base", "overlays/dev", "overlays/prod"])
def test_kustomize_output_is_exactly_the_charts_render(rendered, helm3, folder):
    """The chart is the single source of truth: a render is `helm template` with the same values files,
    plus the overlay's environment label and nothing else."""
    values = [K8S / "base" / "values.yaml"] + ([K8S / folder / "values.yaml"] if folder != "base" else [])
    namespace = ENVIRONMENTS.get(folder.rsplit("/", 1)[-1], "ray-detect")
    expected = kv.render(helm3, values, release="detect", namespace=namespace)
    env = folder.rsplit("/", 1)[-1]
    if env in ENVIRONMENTS:
        for obj in expected:
            obj["metadata"]["labels"]["ray-detect/environment"] = env
    key = lambda o: (o["kind"], o["metadata"]["name"])  # noqa: E731
    assert sorted(rendered[folder], key=key) == sorted(expected, key=key)


def test_base_is_a_long_lived_cluster_behind_a_network_policy(rendered):
    objects = rendered["base"]
    assert not [o for o in objects if o["kind"] == "RayJob"]
    policy = release_policy(objects)["spec"]
    assert policy["podSelector"] == {"matchLabels": {"app.kubernetes.io/name": "ray-detect",
                                                      "app.kubernetes.io/instance": "detect"}}


def test_dev_is_cpu_only_and_small(rendered):
    cluster = only(rendered["overlays/dev"], "RayCluster")
    assert "nvidia.com/gpu" not in json.dumps(cluster)
    cpu = groups(cluster)["cpu-workers"]
    assert (cpu["replicas"], cpu["minReplicas"], cpu["maxReplicas"]) == (1, 0, 2)
    # Disk: /tmp/ray = spill (shmSize) + 2Gi of logs, + 1Gi of /tmp + 512Mi of the container's log.
    small = {"cpu": "2", "memory": "4Gi", "ephemeral-storage": "4608Mi"}
    assert cpu["template"]["spec"]["containers"][0]["resources"] == {"requests": small, "limits": small}
    head = cluster["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["resources"]
    head_size = {"cpu": "1", "memory": "2Gi", "ephemeral-storage": "4Gi"}  # 512Mi of spill
    assert head == {"requests": head_size, "limits": head_size}
    # No GPU group; at most 2 CPU workers of 2 CPUs.
    assert head_maxima(cluster) == {"RAY_DETECT_MAX_GPUS": "0", "RAY_DETECT_MAX_CPUS": "4"}
    for obj in rendered["overlays/dev"]:
        assert obj["metadata"]["labels"]["ray-detect/environment"] == "dev"


def test_prod_runs_gpu_workers_on_gpu_nodes_with_s3_keys_from_a_secret(rendered):
    cluster = only(rendered["overlays/prod"], "RayCluster")
    by_name = groups(cluster)
    gpu = by_name["gpu-workers"]
    # The GPU group starts from zero; the autoscaler grows it to 8 for a run and removes idle pods.
    assert cluster["spec"]["enableInTreeAutoscaling"] is True
    assert (gpu["replicas"], gpu["minReplicas"], gpu["maxReplicas"], by_name["cpu-workers"]["maxReplicas"]) == (
        0, 0, 8, 8
    )
    # 8 GPU pods x 1 GPU; 8 CPU pods x 4 CPUs + 8 GPU pods x 4 CPUs.
    assert head_maxima(cluster) == {"RAY_DETECT_MAX_GPUS": "8", "RAY_DETECT_MAX_CPUS": "64"}
    spec = gpu["template"]["spec"]
    assert spec["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    resources = spec["containers"][0]["resources"]
    assert resources["limits"]["nvidia.com/gpu"] == resources["requests"]["nvidia.com/gpu"] == 1
    env = {e["name"]: e.get("valueFrom") for e in spec["containers"][0]["env"]}
    assert env["AWS_ACCESS_KEY_ID"] == {"secretKeyRef": {"name": "ray-detect-s3", "key": "AWS_ACCESS_KEY_ID"}}


def test_prod_pins_its_image_by_a_well_formed_placeholder_digest_the_docs_say_to_replace(rendered):
    """Every prod pod runs the image by digest (sha256 and 64 lowercase hex digits: what a registry prints and
    what Kubernetes accepts); the digest is a placeholder, and docs/runs.md says to replace it with yours."""
    digest = yaml.safe_load((K8S / "overlays" / "prod" / "values.yaml").read_text())["image"]["digest"]
    assert re.fullmatch(r"sha256:[0-9a-f]{64}", digest), digest
    images = {c["image"] for where, t in kv.pod_templates(only(rendered["overlays/prod"], "RayCluster"))
              for c in t["spec"]["containers"]}
    assert images == {f"ghcr.io/ray-detect/ray-detect@{digest}"}
    assert "@" not in json.dumps([c["image"] for _, t in kv.pod_templates(only(rendered["overlays/dev"], "RayCluster"))
                                  for c in t["spec"]["containers"]])
    runs = " ".join((kv.REPO_ROOT / "docs" / "runs.md").read_text().split())
    assert f"`image.digest` in `k8s/overlays/prod/values.yaml` is a placeholder (`{digest[:15]}...`), to be replaced" in runs


def test_every_environments_head_is_guaranteed_and_kept_through_drains(rendered):
    for folder, objects in rendered.items():
        cluster = only(objects, "RayCluster")
        head = cluster["spec"]["headGroupSpec"]["template"]
        resources = head["spec"]["containers"][0]["resources"]
        assert {k: resources["requests"][k] for k in ("cpu", "memory")} == {
            k: resources["limits"][k] for k in ("cpu", "memory")}, folder
        autoscaler = cluster["spec"]["autoscalerOptions"]["resources"]
        assert {k: autoscaler["requests"][k] for k in ("cpu", "memory")} == {
            k: autoscaler["limits"][k] for k in ("cpu", "memory")}, folder
        assert head["metadata"]["annotations"]["karpenter.sh/do-not-disrupt"] == "true"
        assert only(objects, "PodDisruptionBudget")["spec"]["maxUnavailable"] == 0


def test_argocd_is_told_the_build_options_the_tests_build_with():
    """Argo CD has no build options per Application (docs/runs.md says why), so the docs and both
    Applications name the same global kustomize.buildOptions, those the tests render with."""
    options = "--enable-helm --load-restrictor LoadRestrictionsNone"  # what kv.kustomize_text passes kubectl
    runs = (kv.REPO_ROOT / "docs" / "runs.md").read_text()
    assert f'''-p '{{"data":{{"kustomize.buildOptions":"{options}"}}}}\'''' in runs
    for env in ENVIRONMENTS:
        app = (K8S / "argocd" / f"ray-detect-{env}.yaml").read_text()
        assert f'kustomize.buildOptions in the argocd-cm\n# ConfigMap must hold "{options}"' in app, env
        assert "kustomize" not in yaml.safe_load(app)["spec"]["source"]  # no per-Application kustomize settings


# ---------------------------------------------------------------------------------------------------
# The kubectl RayJob
# ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def rayjob() -> dict:
    docs = [doc for doc in yaml.safe_load_all(RAYJOB.read_text()) if doc]
    assert len(docs) == 1
    return docs[0]


def test_rayjob_validates_strictly_and_its_submitter_is_restricted(rayjob, crd_schemas):
    assert kv.strict_errors(rayjob, crd_schemas) == []
    assert kv.object_errors(rayjob, crd_schemas) == []
    assert [kv.restricted_violations(t) for _, t in kv.pod_templates({**rayjob, "metadata": {"name": "x"}})] == [[]]


def test_rayjob_deletes_itself_requires_the_ray_token_and_writes_only_bounded_emptydirs(rayjob):
    """The kubectl RayJob (and `ray-detect submit`'s) carries the chart's deletion rules (on the shared
    cluster: the RayJob itself only), a submitter that needs Ray's token, and a read-only root filesystem."""
    rules = [(r["policy"], r["condition"]) for r in rayjob["spec"]["deletionStrategy"]["deletionRules"]]
    assert rules == [("DeleteSelf", {"jobStatus": "SUCCEEDED", "ttlSeconds": 86400}),
                     ("DeleteSelf", {"jobStatus": "FAILED", "ttlSeconds": 604800}),
                     ("DeleteSelf", {"jobDeploymentStatus": "Failed", "ttlSeconds": 604800})]
    pod = rayjob["spec"]["submitterPodTemplate"]["spec"]
    container = pod["containers"][0]
    assert {"name": "RAY_AUTH_MODE", "value": "token"} in container["env"]
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert container["resources"]["limits"]["ephemeral-storage"] == container["resources"]["requests"]["ephemeral-storage"]
    assert [v["emptyDir"]["sizeLimit"] for v in pod["volumes"]] == ["1Gi", "1Gi", "64Mi"]


def test_rayjob_gets_a_new_name_per_run_and_no_namespace(rayjob):
    metadata = rayjob["metadata"]
    assert metadata["generateName"] == "ray-detect-run-" and "name" not in metadata
    assert "namespace" not in metadata  # `kubectl -n <namespace> create -f` picks it
    # KubeRay refuses RayJob names over 47 characters; generateName adds 5.
    assert len(metadata["generateName"]) + 5 <= 47


@pytest.mark.parametrize("major", [3, 4], ids=["helm3", "helm4"])
def test_rayjob_is_the_charts_render_and_up_to_date(major, tmp_path):
    """k8s/rayjob.yaml is generated from the chart (job.standalone): the committed file must be byte for byte
    what scripts/render-k8s.sh writes now, with either helm."""
    env = {**os.environ, "HELM": str(kv.find_helm_binaries()[major])}
    written = tmp_path / "rayjob.yaml"
    proc = subprocess.run(["bash", str(RENDER_SCRIPT), str(written)], capture_output=True, text=True, timeout=60,
                          env=env)
    assert proc.returncode == 0, proc.stderr
    assert written.read_text() == RAYJOB.read_text(), (
        "k8s/rayjob.yaml is out of date with the chart: regenerate it with `bash scripts/render-k8s.sh`"
    )
    printed = subprocess.run(["bash", str(RENDER_SCRIPT), "-"], capture_output=True, text=True, timeout=60, env=env)
    assert (printed.returncode, printed.stdout) == (0, written.read_text())
    assert RAYJOB.read_text().startswith("# Generated by scripts/render-k8s.sh from charts/ray-detect: edit the "
                                         "chart, not this file, then run\n#   bash scripts/render-k8s.sh\n")


def test_rayjob_runs_on_the_rendered_cluster(rayjob, rendered):
    assert rayjob["spec"]["clusterSelector"] == {"ray.io/cluster": CLUSTER}
    assert "rayClusterSpec" not in rayjob["spec"]  # no second copy of the cluster
    assert {only(objs, "RayCluster")["metadata"]["name"] for objs in rendered.values()} == {CLUSTER}
    account = only(rendered["base"], "ServiceAccount")["metadata"]["name"]
    assert rayjob["spec"]["submitterPodTemplate"]["spec"]["serviceAccountName"] == account


def test_rayjob_submitter_is_inside_the_network_policy(rayjob, rendered):
    labels = rayjob["spec"]["submitterPodTemplate"]["metadata"]["labels"]
    for folder, objects in rendered.items():
        selector = release_policy(objects)["spec"]["podSelector"]["matchLabels"]
        assert selector.items() <= labels.items(), folder


def test_rayjob_overrides_compose_against_the_app_config(rayjob):
    words = shlex.split(rayjob["spec"]["entrypoint"])
    assert words[:3] == ["python", "-m", "app"]
    with initialize_config_module(config_module="app.conf", version_base=None):
        cfg = compose(config_name="config", overrides=words[3:])
    assert cfg.output.path == "s3://my-bucket/ray-detect/voc_animals"
    assert cfg.data.path == "s3://anonymous@air-example-data/AnimalDetection/JPEGImages"


# ---------------------------------------------------------------------------------------------------
# Argo CD
# ---------------------------------------------------------------------------------------------------


PROJECT = yaml.safe_load((K8S / "argocd" / "project.yaml").read_text())
APP_VERSION = yaml.safe_load((kv.CHART_DIR / "Chart.yaml").read_text())["appVersion"]


def test_argocd_project_allows_this_repository_and_the_environments_only():
    """Not Argo CD's `default` project, which allows any repository, namespace and kind."""
    assert (PROJECT["kind"], PROJECT["metadata"]["name"], PROJECT["metadata"]["namespace"]) == ("AppProject", "ray-detect", "argocd")
    spec = PROJECT["spec"]
    assert spec["sourceRepos"] == ["https://github.com/ray-detect/ray-detect.git"]
    assert spec["destinations"] == [{"server": "https://kubernetes.default.svc", "namespace": ns} for ns in sorted(ENVIRONMENTS.values())]
    assert spec["clusterResourceWhitelist"] == [{"group": "", "kind": "Namespace"}]
    assert spec["namespaceResourceWhitelist"] == [
        {"group": "", "kind": "ServiceAccount"}, {"group": "networking.k8s.io", "kind": "NetworkPolicy"},
        {"group": "policy", "kind": "PodDisruptionBudget"}, {"group": "ray.io", "kind": "RayCluster"}]


@pytest.mark.parametrize("env", list(ENVIRONMENTS))
def test_argocd_application_syncs_its_overlay(env, rendered):
    app = yaml.safe_load((K8S / "argocd" / f"ray-detect-{env}.yaml").read_text())
    assert (app["apiVersion"], app["kind"]) == ("argoproj.io/v1alpha1", "Application")
    assert app["metadata"] == {"name": f"ray-detect-{env}", "namespace": "argocd",
                               "finalizers": ["resources-finalizer.argocd.argoproj.io"]}
    spec = app["spec"]
    # prod deploys what a release tagged (the app's version, v<appVersion>), never a moving branch; dev follows main.
    revision = {"dev": "main", "prod": f"v{APP_VERSION}"}[env]
    assert spec["source"] == {"repoURL": "https://github.com/ray-detect/ray-detect.git", "targetRevision": revision,
                              "path": f"k8s/overlays/{env}"}
    assert spec["destination"] == {"server": "https://kubernetes.default.svc", "namespace": ENVIRONMENTS[env]}
    sync = spec["syncPolicy"]
    assert sync["automated"] == {"prune": True, "selfHeal": True}
    assert sync["syncOptions"] == ["CreateNamespace=true", "RespectIgnoreDifferences=true"]
    assert sync["managedNamespaceMetadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"
    # The autoscaler's replica changes must not be reverted by selfHeal.
    assert spec["ignoreDifferences"] == [{"group": "ray.io", "kind": "RayCluster", "jqPathExpressions": [
        ".spec.workerGroupSpecs[].replicas", ".spec.workerGroupSpecs[].scaleStrategy"]}]
    assert spec["project"] == "ray-detect"
    in_repo = {f"k8s/{folder}": objs for folder, objs in rendered.items()}
    assert kv.application_errors(app, in_repo, PROJECT) == []


# ---------------------------------------------------------------------------------------------------
# The validate script, and that the checks catch what they should
# ---------------------------------------------------------------------------------------------------


def test_validate_script_renders_and_checks_everything():
    proc = subprocess.run(["bash", str(kv.REPO_ROOT / "scripts" / "validate-k8s.sh")], capture_output=True,
                          text=True, timeout=120, env={**os.environ, "PYTHON": sys.executable})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.splitlines() == [
        "k8s/base: ServiceAccount, PodDisruptionBudget, NetworkPolicy, NetworkPolicy, RayCluster",
        "k8s/overlays/dev: ServiceAccount, PodDisruptionBudget, NetworkPolicy, NetworkPolicy, RayCluster",
        "k8s/overlays/prod: ServiceAccount, PodDisruptionBudget, NetworkPolicy, NetworkPolicy, RayCluster",
        "k8s/rayjob.yaml: RayJob",
        "k8s/argocd/project.yaml: AppProject ray-detect",
        "k8s/argocd/ray-detect-dev.yaml: Application -> k8s/overlays/dev",
        "k8s/argocd/ray-detect-prod.yaml: Application -> k8s/overlays/prod",
        "k8s: valid",
    ]


def test_checks_report_typos_unrestricted_pods_and_stray_applications(rayjob, crd_schemas, rendered):
    broken = json.loads(json.dumps(rayjob))
    broken["spec"]["clusterSelectors"] = broken["spec"].pop("clusterSelector")
    assert kv.object_errors(broken, crd_schemas) == [
        "RayJob/ray-detect-run-: .spec: Additional properties are not allowed ('clusterSelectors' was unexpected)"
    ]
    unsafe = json.loads(json.dumps(rayjob))
    pod = unsafe["spec"]["submitterPodTemplate"]["spec"]
    pod["hostNetwork"] = True
    pod["volumes"].append({"name": "docker", "hostPath": {"path": "/var/run/docker.sock"}})
    container = pod["containers"][0]["securityContext"]
    container.update(allowPrivilegeEscalation=True, capabilities={"add": ["SYS_ADMIN"]}, runAsUser=0)
    del pod["securityContext"]["seccompProfile"]  # the container's own still counts...
    assert kv.restricted_violations({"spec": {**pod, "volumes": [], "hostNetwork": False}})[-1] == (
        "containers[ray-job-submitter]: runAsUser is 0"
    )
    del container["seccompProfile"]  # ...until it is gone too
    assert kv.object_errors(unsafe, crd_schemas) == [
        "RayJob/ray-detect-run- submitter: pod: hostNetwork",
        "RayJob/ray-detect-run- submitter: pod: volume docker is of type hostPath",
        "RayJob/ray-detect-run- submitter: containers[ray-job-submitter]: allowPrivilegeEscalation must be false",
        "RayJob/ray-detect-run- submitter: containers[ray-job-submitter]: capabilities must drop ALL",
        "RayJob/ray-detect-run- submitter: containers[ray-job-submitter]: capabilities added: SYS_ADMIN",
        "RayJob/ray-detect-run- submitter: containers[ray-job-submitter]: runAsUser is 0",
        "RayJob/ray-detect-run- submitter: containers[ray-job-submitter]: seccompProfile.type must be RuntimeDefault "
        "or Localhost, not None",
    ]
    in_repo = {f"k8s/{folder}": objs for folder, objs in rendered.items()}
    stray = {"metadata": {"name": "x"}, "spec": {"source": {"path": "k8s/overlays/staging"}}}
    assert kv.application_errors(stray, in_repo, PROJECT) == [
        "Application/x: source.path 'k8s/overlays/staging' is not one of "
        "['k8s/base', 'k8s/overlays/dev', 'k8s/overlays/prod']"
    ]
    lax = {"metadata": {"name": "y"}, "spec": {"project": "default",
                                               "source": {"path": "k8s/overlays/dev", "repoURL": "https://example.com/fork.git"},
                                               "destination": {"server": "https://kubernetes.default.svc", "namespace": "default"},
                                               "syncPolicy": {"automated": {"prune": True}}}}
    narrow = {**PROJECT, "spec": {**PROJECT["spec"], "namespaceResourceWhitelist": [{"group": "ray.io", "kind": "RayCluster"}]}}
    assert kv.application_errors(lax, in_repo, narrow) == [
        "Application/y: destination.namespace differs from the overlay's namespaces ['ray-detect-dev']",
        "Application/y: project must be 'ray-detect', not 'default'",
        "Application/y: the project does not allow repoURL 'https://example.com/fork.git'",
        "Application/y: the project does not allow destination 'default'",
        "Application/y: the project does not allow kind ServiceAccount (group '')",
        "Application/y: the project does not allow kind NetworkPolicy (group 'networking.k8s.io')",
        "Application/y: the project does not allow kind PodDisruptionBudget (group 'policy')",
        "Application/y: syncPolicy.automated must be {prune: true, selfHeal: true}",
        "Application/y: syncOptions lack CreateNamespace=true",
    ]
