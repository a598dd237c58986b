"""A small evaluator of Kubernetes NetworkPolicies: may this pod reach that address or pod, on this port?

It answers from rendered NetworkPolicy objects alone, with the semantics of networking.k8s.io/v1
(https://kubernetes.io/docs/concepts/services-networking/network-policies/):

- a policy selects the pods of its own namespace that match its podSelector (empty: all of them);
- policyTypes, when absent, is Ingress, plus Egress when the policy has an egress section;
- a pod that no policy selects for a direction is unrestricted in that direction; a selected pod may send
  (receive) what any one rule of any selecting policy allows; the policies add up, none subtracts;
- a rule with no `to`/`from` matches every peer, a rule with no `ports` every port and protocol;
- a peer is a podSelector (pods of the policy's namespace), a namespaceSelector (all pods of the matching
  namespaces), both (the matching pods of the matching namespaces), or an ipBlock (its cidr minus its excepts);
- a port is a number or a container port's name, with an optional endPort; the protocol defaults to TCP.

Traffic from a pod to a pod is allowed when the source's egress and the destination's ingress both allow it.
An ipBlock matches a pod's IP too, where the query gives one (Calico does this; Cilium does not): the stricter
reading for a test that expects a denial. Service addresses are not translated: ask about the endpoint.
What the API server would refuse (an except outside its cidr, a peer naming no or two kinds) raises
InvalidPolicy, so a chart cannot render a policy the cluster would reject and still pass.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

NAMESPACE_NAME_LABEL = "kubernetes.io/metadata.name"  # every namespace carries it (Kubernetes >= 1.21)


class InvalidPolicy(ValueError):
    """A NetworkPolicy the API server would refuse."""


@dataclass(frozen=True)
class Pod:
    """A pod as policies see it: namespace, labels, and optionally its IP and named container ports."""

    namespace: str
    labels: Mapping[str, str]
    ip: str | None = None
    named_ports: Mapping[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class Address:
    """An address outside any pod (a node, a link-local agent, an external service)."""

    ip: str


Endpoint = Pod | Address


def selector_matches(selector: Mapping[str, Any] | None, labels: Mapping[str, str]) -> bool:
    """A LabelSelector: every matchLabels pair and every matchExpressions requirement holds."""
    selector = selector or {}
    if any(labels.get(key) != value for key, value in (selector.get("matchLabels") or {}).items()):
        return False
    for expression in selector.get("matchExpressions") or []:
        key, operator, values = expression["key"], expression["operator"], expression.get("values") or []
        if operator == "In":
            holds = key in labels and labels[key] in values
        elif operator == "NotIn":
            holds = key not in labels or labels[key] not in values
        elif operator == "Exists":
            holds = key in labels
        elif operator == "DoesNotExist":
            holds = key not in labels
        else:
            raise InvalidPolicy(f"unknown selector operator {operator!r}")
        if not holds:
            return False
    return True


def _network(cidr: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    try:
        return ipaddress.ip_network(cidr, strict=False)  # the API server masks host bits, as ParseCIDR does
    except ValueError as error:
        raise InvalidPolicy(f"ipBlock: {error}") from None


def ip_block_matches(block: Mapping[str, Any], ip: str) -> bool:
    """An ipBlock matches an address inside its cidr and outside each except, each a strict subset of the cidr."""
    cidr = _network(block["cidr"])
    excepts = [_network(e) for e in block.get("except") or []]
    for excepted in excepts:
        if excepted.version != cidr.version or not excepted.subnet_of(cidr) or excepted.prefixlen <= cidr.prefixlen:
            raise InvalidPolicy(f"ipBlock: except {excepted} must be a strict subset of cidr {cidr}")
    address = ipaddress.ip_address(ip)
    return address in cidr and not any(address in excepted for excepted in excepts)


class Evaluator:
    """The NetworkPolicies of a cluster (any namespaces) and its namespaces' labels."""

    def __init__(self, policies: Iterable[Mapping[str, Any]],
                 namespace_labels: Mapping[str, Mapping[str, str]] | None = None):
        self.policies = [p for p in policies if p.get("kind") == "NetworkPolicy"]
        self.namespace_labels = namespace_labels or {}

    def labels_of_namespace(self, namespace: str) -> dict[str, str]:
        return {NAMESPACE_NAME_LABEL: namespace, **self.namespace_labels.get(namespace, {})}

    # -- which policies apply ------------------------------------------------------------------------

    @staticmethod
    def policy_types(policy: Mapping[str, Any]) -> list[str]:
        spec = policy["spec"]
        if "policyTypes" in spec:
            return list(spec["policyTypes"])
        return ["Ingress"] + (["Egress"] if "egress" in spec else [])

    def selecting(self, pod: Pod, direction: str) -> list[Mapping[str, Any]]:
        """The policies that select `pod` for `direction` ("Ingress" or "Egress")."""
        return [
            p for p in self.policies
            if p["metadata"].get("namespace", "default") == pod.namespace
            and direction in self.policy_types(p)
            and selector_matches(p["spec"].get("podSelector"), pod.labels)
        ]

    # -- peers and ports -----------------------------------------------------------------------------

    def peer_matches(self, peer: Mapping[str, Any], policy_namespace: str, other: Endpoint) -> bool:
        kinds = [k for k in ("podSelector", "namespaceSelector", "ipBlock") if k in peer]
        if not kinds or ("ipBlock" in kinds and len(kinds) > 1):
            raise InvalidPolicy(f"peer {dict(peer)} must name an ipBlock or pod/namespace selectors")
        if "ipBlock" in peer:
            return other.ip is not None and ip_block_matches(peer["ipBlock"], other.ip)
        if not isinstance(other, Pod):
            return False
        if "namespaceSelector" in peer:
            in_namespace = selector_matches(peer["namespaceSelector"], self.labels_of_namespace(other.namespace))
        else:
            in_namespace = other.namespace == policy_namespace
        return in_namespace and selector_matches(peer.get("podSelector"), other.labels)

    @staticmethod
    def port_matches(rule_port: Mapping[str, Any], port: int, protocol: str, destination: Endpoint) -> bool:
        if rule_port.get("protocol", "TCP") != protocol:
            return False
        if "port" not in rule_port:
            return True  # every port of the protocol
        wanted = rule_port["port"]
        if isinstance(wanted, str):
            if "endPort" in rule_port:
                raise InvalidPolicy("endPort needs a numeric port")
            return isinstance(destination, Pod) and destination.named_ports.get(wanted) == port
        end = rule_port.get("endPort", wanted)
        if end < wanted:
            raise InvalidPolicy(f"endPort {end} is below port {wanted}")
        return wanted <= port <= end

    def rule_allows(self, rule: Mapping[str, Any], peers_key: str, policy_namespace: str, other: Endpoint,
                    port: int, protocol: str, destination: Endpoint) -> bool:
        peers = rule.get(peers_key) or []
        ports = rule.get("ports") or []
        peer_ok = not peers or any(self.peer_matches(p, policy_namespace, other) for p in peers)
        port_ok = not ports or any(self.port_matches(p, port, protocol, destination) for p in ports)
        return peer_ok and port_ok

    # -- the questions -------------------------------------------------------------------------------

    def egress_allows(self, source: Pod, destination: Endpoint, port: int, protocol: str = "TCP") -> bool:
        """May `source` send to `destination`:port/protocol, as far as the source's egress policies go?"""
        policies = self.selecting(source, "Egress")
        return not policies or any(
            self.rule_allows(rule, "to", p["metadata"].get("namespace", "default"), destination, port, protocol,
                             destination)
            for p in policies for rule in p["spec"].get("egress") or []
        )

    def ingress_allows(self, source: Endpoint, destination: Pod, port: int, protocol: str = "TCP") -> bool:
        """May `destination` receive from `source` on port/protocol, as far as its ingress policies go?"""
        policies = self.selecting(destination, "Ingress")
        return not policies or any(
            self.rule_allows(rule, "from", p["metadata"].get("namespace", "default"), source, port, protocol,
                             destination)
            for p in policies for rule in p["spec"].get("ingress") or []
        )

    def allows(self, source: Pod, destination: Endpoint, port: int, protocol: str = "TCP") -> bool:
        """May `source` reach `destination`:port/protocol? Its egress, and a pod destination's ingress."""
        allowed = self.egress_allows(source, destination, port, protocol)
        if isinstance(destination, Pod):
            allowed = allowed and self.ingress_allows(source, destination, port, protocol)
        return allowed
