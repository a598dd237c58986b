"""What the chart's NetworkPolicies allow, asked of tests/support/netpol.py rather than read off the YAML.

The evaluator's own tests come first, on small hand-written policies. Then the chart, rendered by a real helm
(v3 and v4), with its pods' labels taken from the same render, answers a table of questions: may the head
(a worker, the submitter) reach DNS, the object store, the API server, the metadata endpoint, another pod,
a preset's address? Each table lists every probe's exact answer for each pod.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.support import k8s_validation as kv
from tests.support.netpol import Address, Evaluator, InvalidPolicy, Pod, ip_block_matches, selector_matches

RELEASE, NAMESPACE = "detect", "ray-detect"
PROD_VALUES = kv.CHART_DIR / "examples" / "values-gpu-prod.yaml"

# ---------------------------------------------------------------------------------------------------
# The evaluator, on hand-written policies
# ---------------------------------------------------------------------------------------------------


def policy(name: str, spec: dict, namespace: str = "shop") -> dict:
    return {"kind": "NetworkPolicy", "metadata": {"name": name, "namespace": namespace}, "spec": spec}


WEB = Pod("shop", {"app": "web", "tier": "front"}, ip="10.1.0.5", named_ports={"http": 8080})
DB = Pod("shop", {"app": "db"}, ip="10.1.0.6", named_ports={"pg": 5432})
LOGS = Pod("logging", {"app": "collector"}, ip="10.2.0.9")


def test_a_pod_no_policy_selects_is_unrestricted_and_a_selected_one_only_gets_what_a_rule_allows():
    only_db_egress = policy("web-out", {"podSelector": {"matchLabels": {"app": "web"}}, "policyTypes": ["Egress"],
                                        "egress": [{"to": [{"podSelector": {"matchLabels": {"app": "db"}}}]}]})
    cluster = Evaluator([only_db_egress])
    assert cluster.allows(WEB, DB, 5432) is True
    assert cluster.allows(WEB, LOGS, 5432) is False
    assert cluster.allows(WEB, Address("8.8.8.8"), 53, "UDP") is False
    assert cluster.allows(DB, Address("8.8.8.8"), 53, "UDP") is True  # not selected
    # The same policy in another namespace selects nobody here.
    assert Evaluator([{**only_db_egress, "metadata": {"name": "x", "namespace": "other"}}]).allows(
        WEB, LOGS, 5432) is True


def test_policy_types_default_to_ingress_plus_egress_when_there_is_an_egress_section():
    ingress_only = policy("in", {"podSelector": {}, "ingress": []})
    assert Evaluator.policy_types(ingress_only) == ["Ingress"]
    assert Evaluator([ingress_only]).egress_allows(WEB, LOGS, 80) is True
    assert Evaluator([ingress_only]).ingress_allows(LOGS, WEB, 80) is False  # isolated, no rule
    with_egress = policy("both", {"podSelector": {}, "egress": []})
    assert Evaluator.policy_types(with_egress) == ["Ingress", "Egress"]
    assert Evaluator([with_egress]).egress_allows(WEB, LOGS, 80) is False  # an empty egress list denies all


def test_policies_add_up_and_pod_to_pod_needs_the_destinations_ingress_too():
    to_db = policy("to-db", {"podSelector": {}, "policyTypes": ["Egress"],
                             "egress": [{"to": [{"podSelector": {"matchLabels": {"app": "db"}}}]}]})
    to_logs = policy("to-logs", {"podSelector": {}, "policyTypes": ["Egress"],
                                 "egress": [{"to": [{"namespaceSelector": {}}], "ports": [{"port": 514}]}]})
    both = Evaluator([to_db, to_logs])
    assert [both.allows(WEB, DB, 5432), both.allows(WEB, LOGS, 514), both.allows(WEB, LOGS, 515)] == [True, True, False]
    db_closed = policy("db-in", {"podSelector": {"matchLabels": {"app": "db"}}, "policyTypes": ["Ingress"],
                                 "ingress": [{"from": [{"podSelector": {"matchLabels": {"tier": "back"}}}]}]})
    closed = Evaluator([to_db, db_closed])
    assert closed.egress_allows(WEB, DB, 5432) is True
    assert closed.allows(WEB, DB, 5432) is False


def test_peers_pod_namespace_both_and_ip_blocks():
    cluster = Evaluator([], {"logging": {"team": "ops"}})
    pods_here = {"podSelector": {"matchLabels": {"app": "collector"}}}
    ops_namespaces = {"namespaceSelector": {"matchLabels": {"team": "ops"}}}
    ops_collectors = {**ops_namespaces, **pods_here}
    ops_web = {**ops_namespaces, "podSelector": {"matchLabels": {"app": "web"}}}
    answers = [
        cluster.peer_matches(pods_here, "shop", LOGS),  # a podSelector alone: the policy's own namespace
        cluster.peer_matches(pods_here, "logging", LOGS),
        cluster.peer_matches(ops_namespaces, "shop", LOGS),  # a namespaceSelector alone: any pod there
        cluster.peer_matches(ops_collectors, "shop", LOGS),  # both: the matching pods of matching namespaces
        cluster.peer_matches(ops_web, "shop", LOGS),
        cluster.peer_matches({"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "logging"}}},
                             "shop", LOGS),  # every namespace carries its name as a label
        cluster.peer_matches({"ipBlock": {"cidr": "10.2.0.0/16"}}, "shop", LOGS),  # a pod's IP, when known
        cluster.peer_matches({"ipBlock": {"cidr": "10.2.0.0/16"}}, "shop", Pod("logging", {"app": "collector"})),
        cluster.peer_matches(pods_here, "shop", Address("10.2.0.9")),  # selectors never match a bare address
    ]
    assert answers == [False, True, True, True, False, True, True, False, False]
    with pytest.raises(InvalidPolicy, match="must name an ipBlock or pod/namespace selectors"):
        cluster.peer_matches({"ipBlock": {"cidr": "10.0.0.0/8"}, **pods_here}, "shop", LOGS)
    with pytest.raises(InvalidPolicy, match="must name an ipBlock or pod/namespace selectors"):
        cluster.peer_matches({}, "shop", LOGS)


def test_ip_block_cidr_minus_excepts_and_excepts_must_lie_strictly_inside():
    block = {"cidr": "0.0.0.0/0", "except": ["10.0.0.0/8", "169.254.0.0/16"]}
    probes = ["52.216.8.1", "10.9.9.9", "169.254.169.254", "169.253.255.255", "::1"]
    assert [ip_block_matches(block, ip) for ip in probes] == [True, False, False, True, False]
    assert ip_block_matches({"cidr": "10.0.0.7/8"}, "10.200.0.1") is True  # host bits masked, as the API does
    with pytest.raises(InvalidPolicy, match=r"except 169.254.0.0/16 must be a strict subset of cidr 10.0.0.0/8"):
        ip_block_matches({"cidr": "10.0.0.0/8", "except": ["169.254.0.0/16"]}, "10.0.0.1")
    with pytest.raises(InvalidPolicy, match=r"except 10.0.0.0/8 must be a strict subset of cidr 10.0.0.0/8"):
        ip_block_matches({"cidr": "10.0.0.0/8", "except": ["10.0.0.0/8"]}, "10.0.0.1")


def test_ports_protocol_defaults_to_tcp_end_port_ranges_and_named_ports():
    rule_ports = [{"port": 53, "protocol": "UDP"}, {"port": 8000, "endPort": 8010}, {"port": "pg"}]
    egress = policy("ports", {"podSelector": {}, "policyTypes": ["Egress"], "egress": [{"ports": rule_ports}]})
    cluster = Evaluator([egress])
    answers = [
        cluster.egress_allows(WEB, LOGS, 53, "UDP"),
        cluster.egress_allows(WEB, LOGS, 53, "TCP"),
        cluster.egress_allows(WEB, LOGS, 8000), cluster.egress_allows(WEB, LOGS, 8010),
        cluster.egress_allows(WEB, LOGS, 8011), cluster.egress_allows(WEB, LOGS, 8005, "UDP"),
        cluster.egress_allows(WEB, DB, 5432),  # "pg" is DB's port 5432
        cluster.egress_allows(WEB, LOGS, 5432),  # LOGS has no port named pg
        cluster.egress_allows(WEB, Address("10.1.0.6"), 5432),  # nor has a bare address
    ]
    assert answers == [True, False, True, True, False, False, True, False, False]
    all_udp = Evaluator([policy("udp", {"podSelector": {}, "policyTypes": ["Egress"],
                                         "egress": [{"ports": [{"protocol": "UDP"}]}]})])
    assert [all_udp.egress_allows(WEB, LOGS, 9, "UDP"), all_udp.egress_allows(WEB, LOGS, 9)] == [True, False]


def test_label_selectors_match_labels_and_expressions():
    labels = {"app": "web", "tier": "front"}
    cases = [
        ({}, True),
        ({"matchLabels": {"app": "web"}}, True),
        ({"matchLabels": {"app": "web", "tier": "back"}}, False),
        ({"matchExpressions": [{"key": "tier", "operator": "In", "values": ["front", "edge"]}]}, True),
        ({"matchExpressions": [{"key": "tier", "operator": "NotIn", "values": ["front"]}]}, False),
        ({"matchExpressions": [{"key": "zone", "operator": "NotIn", "values": ["a"]}]}, True),
        ({"matchExpressions": [{"key": "app", "operator": "Exists"}]}, True),
        ({"matchExpressions": [{"key": "app", "operator": "DoesNotExist"}]}, False),
        ({"matchLabels": {"app": "web"}, "matchExpressions": [{"key": "zone", "operator": "Exists"}]}, False),
    ]
    assert [selector_matches(selector, labels) for selector, _ in cases] == [expected for _, expected in cases]


# ---------------------------------------------------------------------------------------------------
# The chart's policies
# ---------------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def _render_cached(helm: Path, values_files: tuple[str, ...], sets: tuple[str, ...]) -> str:
    return json.dumps(kv.render(helm, values_files, sets, release=RELEASE, namespace=NAMESPACE))


def render(helm: Path, sets: tuple[str, ...] = (), values_files: tuple[str, ...] = ()) -> list[dict[str, Any]]:
    return json.loads(_render_cached(helm, values_files, sets))


def release_pods(objects: list[dict]) -> dict[str, Pod]:
    """The release's pods by role (head, cpu-workers, gpu-workers, submitter), labelled as the render labels them."""
    pods = {}
    for index, (where, template) in enumerate(t for obj in objects for t in kv.pod_templates(obj)):
        role = where.rsplit(" ", 1)[1]
        pods[role] = Pod(NAMESPACE, template["metadata"]["labels"], ip=f"10.244.1.{10 + index}")
    return pods


# What the probes reach: a DNS pod, addresses outside the cluster, link-local agents, another tenant's pod.
KUBE_DNS = Pod("kube-system", {"k8s-app": "kube-dns"}, ip="10.244.0.10")
OPENSHIFT_DNS = Pod("openshift-dns", {"dns.operator.openshift.io/daemonset-dns": "default"}, ip="10.128.0.5")
OTHER_POD = Pod("shop", {"app": "web"}, ip="10.244.3.7")
S3 = Address("52.216.8.1")  # an AWS S3 address
PUBLIC_HOST = Address("203.0.113.9")
MINIO = Address("10.20.0.5")
KUBEADM_API = Address("172.18.0.2")  # a kubeadm control-plane node, port 6443
EKS_API = Address("10.0.12.7")  # an API server endpoint in the VPC, port 443
METADATA = Address("169.254.169.254")

PROBES: dict[str, tuple[Pod | Address, int, str]] = {
    "kube-dns 53/UDP": (KUBE_DNS, 53, "UDP"),
    "kube-dns 53/TCP": (KUBE_DNS, 53, "TCP"),
    "S3 443": (S3, 443, "TCP"),
    "S3 80": (S3, 80, "TCP"),
    "public host 9000": (PUBLIC_HOST, 9000, "TCP"),
    "MinIO 9000": (MINIO, 9000, "TCP"),
    "API server 6443": (KUBEADM_API, 6443, "TCP"),
    "API server 443": (EKS_API, 443, "TCP"),
    "other pod 443": (OTHER_POD, 443, "TCP"),
    "other pod 8080": (OTHER_POD, 8080, "TCP"),
    "metadata 80": (METADATA, 80, "TCP"),
    "metadata 443": (METADATA, 443, "TCP"),
    "metadata 988": (METADATA, 988, "TCP"),
    "metadata 9000": (METADATA, 9000, "TCP"),
    "GKE metadata server 988": (Address("169.254.169.252"), 988, "TCP"),
    "EKS Pod Identity agent 80": (Address("169.254.170.23"), 80, "TCP"),
    "EKS Pod Identity agent 443": (Address("169.254.170.23"), 443, "TCP"),
    "NodeLocal DNS 53/UDP": (Address("169.254.20.10"), 53, "UDP"),
    "NodeLocal DNS 53/TCP": (Address("169.254.20.10"), 53, "TCP"),
    "OpenShift DNS 5353/UDP": (OPENSHIFT_DNS, 5353, "UDP"),
    "OpenShift DNS 5353/TCP": (OPENSHIFT_DNS, 5353, "TCP"),
    "database 5432": (Address("192.0.2.10"), 5432, "TCP"),
}


def allowed(objects: list[dict], role: str) -> set[str]:
    """The probes the pod of `role` may reach."""
    cluster = Evaluator(objects)
    source = release_pods(objects)[role]
    return {name for name, (target, port, protocol) in PROBES.items() if cluster.allows(source, target, port, protocol)}


DNS = {"kube-dns 53/UDP", "kube-dns 53/TCP"}
# The API server rule's default 0.0.0.0/0 (link-local excepted) reaches any 443 but link-local ones: the other
# pod's by its IP, and S3's. Narrowing networkPolicy.apiServer.cidrs (scenario "narrowed") ends that.
API_SERVER_ANYWHERE = {"API server 6443", "API server 443", "other pod 443", "S3 443"}
PRESET_ADDS = {
    "eks-pod-identity": {"EKS Pod Identity agent 80"},
    "gke-workload-identity": {"metadata 80", "metadata 988", "GKE metadata server 988"},
    "node-local-dns": {"NodeLocal DNS 53/UDP", "NodeLocal DNS 53/TCP"},
    "openshift-dns": {"OpenShift DNS 5353/UDP", "OpenShift DNS 5353/TCP"},
}
ROLES = ["head", "cpu-workers", "gpu-workers", "submitter"]

# (--set items, values files) -> role -> the probes it may reach; every other probe is denied.
SCENARIOS: dict[str, tuple[tuple[str, ...], tuple[str, ...], dict[str, set[str]]]] = {
    "default": ((), (), {
        "head": DNS | {"S3 443"} | API_SERVER_ANYWHERE,
        "cpu-workers": DNS | {"S3 443"}, "gpu-workers": DNS | {"S3 443"}, "submitter": DNS | {"S3 443"}}),
    "narrowed": (("networkPolicy.apiServer.cidrs={172.18.0.2/32}", "networkPolicy.clusterCIDRs={10.244.0.0/16}"), (), {
        "head": DNS | {"S3 443", "API server 6443"},
        "cpu-workers": DNS | {"S3 443"}, "gpu-workers": DNS | {"S3 443"}, "submitter": DNS | {"S3 443"}}),
    "no-autoscaler": (("autoscaling.enabled=false",), (), {role: DNS | {"S3 443"} for role in ROLES}),
    "endpoint-ip-and-port": (("s3.endpointUrl=http://10.20.0.5:9000",), (), {
        "head": DNS | {"MinIO 9000"} | API_SERVER_ANYWHERE,
        **{role: DNS | {"MinIO 9000"} for role in ROLES[1:]}}),
    "endpoint-name-and-port": (("s3.endpointUrl=https://minio.example.com:9000",), (), {
        "head": DNS | {"MinIO 9000", "public host 9000"} | API_SERVER_ANYWHERE,
        **{role: DNS | {"MinIO 9000", "public host 9000"} for role in ROLES[1:]}}),
    # https without a port: 443, anywhere but link-local and the cluster's ranges (the other pod, the EKS API).
    "endpoint-https-cluster-cidrs": (("s3.endpointUrl=https://s3.example.com",
                                      "networkPolicy.clusterCIDRs={10.244.0.0/16}"), (), {
        "head": DNS | {"S3 443", "API server 443", "API server 6443"},
        **{role: DNS | {"S3 443", "API server 443"} for role in ROLES[1:]}}),
    # http without a port: 80, to the ranges given (no autoscaler here, so the head gets no API server).
    "endpoint-http-object-store-cidrs": (("s3.endpointUrl=http://minio.internal",
                                          "networkPolicy.objectStore.cidrs={52.216.0.0/16}",
                                          "autoscaling.enabled=false"), (), {
        role: DNS | {"S3 80"} for role in ROLES}),
    "extra-egress-by-set": (("networkPolicy.extraEgress[0].to[0].ipBlock.cidr=192.0.2.10/32",
                             "networkPolicy.extraEgress[0].ports[0].port=5432"), (), {
        "head": DNS | {"S3 443", "database 5432"} | API_SERVER_ANYWHERE,
        **{role: DNS | {"S3 443", "database 5432"} for role in ROLES[1:]}}),
    # The production example: a RayJob with its own cluster, whose head gets the API server as well.
    "gpu-prod": ((), (str(PROD_VALUES),), {
        "head": DNS | {"S3 443"} | API_SERVER_ANYWHERE,
        **{role: DNS | {"S3 443"} for role in ROLES[1:]}}),
}
for _preset, _adds in PRESET_ADDS.items():
    SCENARIOS[f"preset-{_preset}"] = ((f"networkPolicy.presets={{{_preset}}}",), (), {
        "head": DNS | {"S3 443"} | API_SERVER_ANYWHERE | _adds,
        **{role: DNS | {"S3 443"} | _adds for role in ROLES[1:]}})


@pytest.mark.slow
@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_each_pod_reaches_exactly_the_listed_probes(helm, scenario):
    sets, values_files, expected = SCENARIOS[scenario]
    objects = render(helm, sets, values_files)
    assert sorted(release_pods(objects)) == sorted(expected)
    assert {role: allowed(objects, role) for role in expected} == expected


@pytest.mark.slow
def test_every_preset_at_once_adds_the_union_and_nothing_else(helm):
    objects = render(helm, ("networkPolicy.presets={" + ",".join(PRESET_ADDS) + "}",))
    every_preset = set().union(*PRESET_ADDS.values())
    assert allowed(objects, "cpu-workers") == DNS | {"S3 443"} | every_preset
    assert allowed(objects, "head") == DNS | {"S3 443"} | API_SERVER_ANYWHERE | every_preset


@pytest.mark.slow
def test_release_pods_reach_each_other_and_outsiders_reach_only_the_dashboard(helm):
    objects = render(helm)
    cluster = Evaluator(objects)
    pods = release_pods(objects)
    pairs = {(a, b): cluster.allows(pods[a], pods[b], 6379) for a in ROLES for b in ROLES if a != b}
    assert pairs == {pair: True for pair in pairs} and len(pairs) == 12
    operator = Pod("kuberay-system", {"app.kubernetes.io/name": "kuberay-operator"}, ip="10.244.2.3")
    assert [cluster.allows(operator, pods["head"], 8265), cluster.allows(operator, pods["head"], 6379),
            cluster.allows(OTHER_POD, pods["head"], 8265), cluster.allows(OTHER_POD, pods["cpu-workers"], 10001)
            ] == [True, False, False, False]


@pytest.mark.slow
def test_the_metadata_endpoint_is_excepted_by_name_in_every_address_range(helm):
    """Denied not by omission but by an `except` in every ipBlock wide enough to hold it."""
    for sets in [(), ("s3.endpointUrl=https://minio.example.com:9000",), ("networkPolicy.presets={gke-workload-identity}",)]:
        blocks = [peer["ipBlock"] for obj in render(helm, sets) if obj["kind"] == "NetworkPolicy"
                  for rule in obj["spec"]["egress"] for peer in rule.get("to", []) if "ipBlock" in peer]
        wide = [b for b in blocks if ip_block_matches({"cidr": b["cidr"]}, "169.254.169.254")
                and not b["cidr"].endswith("/32")]
        assert wide and all("169.254.0.0/16" in b["except"] for b in wide), sets


@pytest.mark.slow
def test_the_head_alone_gets_the_api_server_from_a_second_policy(helm):
    objects = render(helm)
    policies = {o["metadata"]["name"]: o["spec"] for o in objects if o["kind"] == "NetworkPolicy"}
    assert sorted(policies) == ["detect-ray-detect", "detect-ray-detect-autoscaler"]
    assert policies["detect-ray-detect-autoscaler"]["podSelector"] == {"matchLabels": {
        "app.kubernetes.io/name": "ray-detect", "app.kubernetes.io/instance": RELEASE,
        "app.kubernetes.io/component": "head"}}
    assert policies["detect-ray-detect-autoscaler"]["policyTypes"] == ["Egress"]
    assert policies["detect-ray-detect-autoscaler"]["egress"] == [{
        "to": [{"ipBlock": {"cidr": "0.0.0.0/0", "except": ["169.254.0.0/16"]}}],
        "ports": [{"protocol": "TCP", "port": 443}, {"protocol": "TCP", "port": 6443}]}]
    assert [o["metadata"]["name"] for o in render(helm, ("autoscaling.enabled=false",))
            if o["kind"] == "NetworkPolicy"] == ["detect-ray-detect"]
    assert not [o for o in render(helm, ("networkPolicy.enabled=false",)) if o["kind"] == "NetworkPolicy"]


@pytest.mark.slow
def test_extra_egress_from_a_values_file_comes_after_the_charts_rules(helm, tmp_path):
    extra = {"to": [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "db"}}}],
             "ports": [{"protocol": "TCP", "port": 5432}]}
    values = tmp_path / "extra.yaml"
    values.write_text(yaml.safe_dump({"networkPolicy": {"extraEgress": [extra]}}))
    objects = kv.render(helm, [values], release=RELEASE, namespace=NAMESPACE)
    egress = next(o for o in objects if o["metadata"]["name"] == "detect-ray-detect")["spec"]["egress"]
    assert len(egress) == 4 and egress[3] == extra
    assert egress[:3] == next(o for o in render(helm) if o["metadata"]["name"] == "detect-ray-detect")["spec"]["egress"]
    worker = release_pods(objects)["cpu-workers"]
    assert Evaluator(objects).allows(worker, Pod("db", {"app": "postgres"}), 5432) is True
    assert allowed(objects, "cpu-workers") == DNS | {"S3 443"}


SCHEMA_FAILURE = ["Error: values don't meet the specifications of the schema(s) in the following chart(s):",
                  "ray-detect:"]
CIDR_PATTERN = ("^((25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])[.]){3}(25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])"
                "/(3[0-2]|[12]?[0-9])$")


@pytest.mark.slow
@pytest.mark.parametrize(
    "item, helm3_line, helm4_line",
    [
        ("networkPolicy.presets={eks-pod-identty}",
         '- networkPolicy.presets.0: networkPolicy.presets.0 must be one of the following: "eks-pod-identity", '
         '"gke-workload-identity", "node-local-dns", "openshift-dns"',
         "- at '/networkPolicy/presets/0': value must be one of 'eks-pod-identity', 'gke-workload-identity', "
         "'node-local-dns', 'openshift-dns'"),
        ("networkPolicy.apiServer.cidrs={10.0.0.300/32}",
         f"- networkPolicy.apiServer.cidrs.0: Does not match pattern '{CIDR_PATTERN}'",
         f"- at '/networkPolicy/apiServer/cidrs/0': '10.0.0.300/32' does not match pattern '{CIDR_PATTERN}'"),
        ("networkPolicy.clusterCIDRs={10.244.0.0}",
         f"- networkPolicy.clusterCIDRs.0: Does not match pattern '{CIDR_PATTERN}'",
         f"- at '/networkPolicy/clusterCIDRs/0': '10.244.0.0' does not match pattern '{CIDR_PATTERN}'"),
        ("networkPolicy.objectStore.cidr=10.0.0.0/8",
         "- networkPolicy.objectStore: Additional property cidr is not allowed",
         "- at '/networkPolicy/objectStore': additional properties 'cidr' not allowed"),
    ],
    ids=["preset", "api-server-cidr", "cluster-cidr", "object-store-key"],
)
def test_a_typo_in_the_network_values_fails_in_one_line(helm, item, helm3_line, helm4_line):
    with pytest.raises(kv.HelmError) as failure:
        kv.run_helm(helm, "template", RELEASE, str(kv.CHART_DIR), "--set", item)
    assert str(failure.value).splitlines() == SCHEMA_FAILURE + [helm3_line if kv.helm_major(helm) == 3 else helm4_line, ""]
