{{/*
Network: the egress rules of the NetworkPolicies (networkpolicy.yaml, networkpolicy-autoscaler.yaml), each
for one reason: the object store, the Kubernetes API server, a platform preset. docs/kubernetes.md (Security)
says what each allows and why.
*/}}

{{/* Link-local addresses: the cloud metadata endpoint (169.254.169.254) and the node-local agents. No
ipBlock of the chart reaches them but a preset's rule naming one address. */}}
{{- define "ray-detect.linkLocalCIDR" -}}169.254.0.0/16{{- end }}

{{/* Addresses that are not public (RFC 1918, shared 100.64/10, link-local): no AWS endpoint is in them. */}}
{{- define "ray-detect.nonPublicCIDRs" -}}
{{- list "10.0.0.0/8" "100.64.0.0/10" "172.16.0.0/12" "192.168.0.0/16" (include "ray-detect.linkLocalCIDR" .) | toJson }}
{{- end }}

{{/* An IPv4 address as one number. */}}
{{- define "ray-detect.ipv4Number" -}}
{{- $octets := splitList "." . }}
{{- add (mul (atoi (index $octets 0)) 16777216) (mul (atoi (index $octets 1)) 65536) (mul (atoi (index $octets 2)) 256) (atoi (index $octets 3)) }}
{{- end }}

{{/*
"true" when IPv4 CIDR .inner lies strictly inside .outer (a longer prefix in the same block), else "": the
API server accepts an ipBlock's `except` entry only then, so only such entries are written.
*/}}
{{- define "ray-detect.cidrStrictlyWithin" -}}
{{- $outer := splitList "/" .outer }}
{{- $inner := splitList "/" .inner }}
{{- $outerBits := atoi (index $outer 1) }}
{{- if gt (atoi (index $inner 1)) $outerBits }}
{{- $blockSize := 1 }}
{{- range until (sub 32 $outerBits | int) }}{{ $blockSize = mul $blockSize 2 }}{{ end }}
{{- $outerBlock := div (include "ray-detect.ipv4Number" (index $outer 0) | atoi) $blockSize }}
{{- $innerBlock := div (include "ray-detect.ipv4Number" (index $inner 0) | atoi) $blockSize }}
{{- if eq $outerBlock $innerBlock }}true{{ end }}
{{- end }}
{{- end }}

{{/*
`to` peers: one ipBlock per CIDR of .cidrs, each excepting those of .except that lie inside it.
Call with (dict "cidrs" (list ...) "except" (list ...)).
*/}}
{{- define "ray-detect.ipBlockPeers" -}}
{{- $except := .except | uniq }}
{{- range $cidr := .cidrs }}
{{- $inside := list }}
{{- range $excepted := $except }}
{{- if include "ray-detect.cidrStrictlyWithin" (dict "outer" $cidr "inner" $excepted) }}
{{- $inside = append $inside $excepted }}
{{- end }}
{{- end }}
- ipBlock:
    cidr: {{ $cidr }}
    {{- with $inside }}
    except:
      {{- toYaml . | nindent 6 }}
    {{- end }}
{{- end }}
{{- end }}

{{/*
The object store's egress rule. With s3.endpointUrl: its port (443 for https, 80 for http when it names
none), to networkPolicy.objectStore.cidrs, else to the endpoint's address when it is an IPv4 address, else
anywhere; link-local and networkPolicy.clusterCIDRs excepted. Without it (AWS S3): TCP 443 to public addresses.
*/}}
{{- define "ray-detect.objectStoreEgress" -}}
{{- $np := .Values.networkPolicy }}
{{- $endpoint := .Values.s3.endpointUrl }}
{{- $port := 443 }}
{{- $cidrs := list "0.0.0.0/0" }}
{{- $except := concat (list (include "ray-detect.linkLocalCIDR" .)) $np.clusterCIDRs }}
{{- if $endpoint }}
{{- $url := urlParse $endpoint }}
{{- $host := regexReplaceAll ":[0-9]+$" $url.host "" }}
{{- $named := regexFind ":[0-9]+$" $url.host | trimPrefix ":" }}
{{- $port = $named | default (ternary "443" "80" (eq $url.scheme "https")) | atoi }}
{{- if regexMatch "^[0-9]{1,3}([.][0-9]{1,3}){3}$" $host }}
{{- $cidrs = list (printf "%s/32" $host) }}
{{- end }}
{{- else }}
{{- $except = concat (include "ray-detect.nonPublicCIDRs" . | fromJsonArray) $np.clusterCIDRs }}
{{- end }}
{{- $cidrs = $np.objectStore.cidrs | default $cidrs }}
# The object store (s3.endpointUrl, else AWS S3 on public addresses).
- to:
    {{- include "ray-detect.ipBlockPeers" (dict "cidrs" $cidrs "except" $except) | trim | nindent 4 }}
  ports:
    - protocol: TCP
      port: {{ $port }}
{{- end }}

{{/*
The egress rules of one platform preset (networkPolicy.presets): exactly the addresses and ports that
platform's pods need. Call with (dict "ctx" $ "preset" "<name>").
*/}}
{{- define "ray-detect.presetEgress" -}}
{{- $np := .ctx.Values.networkPolicy }}
{{- if eq .preset "eks-pod-identity" }}
# eks-pod-identity: the EKS Pod Identity Agent on each node, which hands out the pods' AWS credentials.
- to:
    - ipBlock:
        cidr: 169.254.170.23/32
  ports:
    - protocol: TCP
      port: 80
{{- else if eq .preset "gke-workload-identity" }}
# gke-workload-identity: the GKE metadata server, which hands out the pods' Google credentials. Pods dial
# 169.254.169.254:80; on the iptables dataplane the node redirects that to 169.254.169.252:988 before the
# policy sees it, so both addresses and both ports are allowed.
- to:
    - ipBlock:
        cidr: 169.254.169.254/32
    - ipBlock:
        cidr: 169.254.169.252/32
  ports:
    - protocol: TCP
      port: 80
    - protocol: TCP
      port: 988
{{- else if eq .preset "node-local-dns" }}
# node-local-dns: NodeLocal DNSCache, the DNS cache on each node's link-local address.
- to:
    - ipBlock:
        cidr: {{ $np.nodeLocalDNSAddress }}/32
  ports:
    - protocol: UDP
      port: 53
    - protocol: TCP
      port: 53
{{- else if eq .preset "openshift-dns" }}
# openshift-dns: OpenShift's DNS pods, which listen on 5353 behind the dns-default Service's 53.
- to:
    - namespaceSelector:
        matchLabels:
          kubernetes.io/metadata.name: openshift-dns
  ports:
    - protocol: UDP
      port: 5353
    - protocol: TCP
      port: 5353
{{- else }}
{{- fail (printf "networkPolicy.presets: unknown preset %q (eks-pod-identity, gke-workload-identity, node-local-dns, openshift-dns)" .preset) }}
{{- end }}
{{- end }}
