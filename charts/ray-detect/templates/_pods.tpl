{{/*
Ray pods: the image of a group, the environment, disk and volumes of every container, and the pod
template of the head and of each worker group.
*/}}

{{/*
The image reference of a group: its own image fields when set, else the shared image's. A digest wins over
a tag; the shared tag defaults to the chart's appVersion. Call with (dict "ctx" $ "image" .Values.head.image).
*/}}
{{- define "ray-detect.image" -}}
{{- $shared := .ctx.Values.image }}
{{- $own := .image | default dict }}
{{- $repository := $own.repository | default $shared.repository }}
{{- if $own.digest }}
{{- printf "%s@%s" $repository $own.digest }}
{{- else if $own.tag }}
{{- printf "%s:%s" $repository $own.tag }}
{{- else if and $shared.digest (not $own.repository) }}
{{- printf "%s@%s" $repository $shared.digest }}
{{- else }}
{{- printf "%s:%s" $repository ($shared.tag | default .ctx.Chart.AppVersion) }}
{{- end }}
{{- end }}

{{/*
Environment
*/}}

{{/*
What every container the chart defines gets (Ray's containers and the job submitter): no usage telemetry;
HOME on the /tmp emptyDir, since the root filesystem is read-only; and, with rayAuth.enabled,
RAY_AUTH_MODE=token. With that, Ray refuses to start a node, and `ray job submit` to submit, without the
cluster's token: KubeRay 1.5.1 and newer add it as RAY_AUTH_TOKEN (they keep this RAY_AUTH_MODE), and an
older operator, which drops authOptions, leaves a cluster that does not start rather than one anybody
on the network may use.
*/}}
{{- define "ray-detect.baseEnv" -}}
- name: RAY_USAGE_STATS_ENABLED
  value: "0"
- name: HOME
  value: /tmp
{{- if .Values.rayAuth.enabled }}
- name: RAY_AUTH_MODE
  value: token
{{- end }}
{{- end }}

{{/*
Environment shared by every Ray container (head and workers, where the job's driver and tasks run): the
base environment, S3 credentials from the referenced Secret only, the optional endpoint and region, and with
table.format=iceberg the catalog's properties as pyiceberg reads them from the environment (credential
properties from the referenced Secret only).
*/}}
{{- define "ray-detect.rayEnv" -}}
{{ include "ray-detect.baseEnv" . }}
{{- with .Values.s3.credentialsSecret }}
- name: AWS_ACCESS_KEY_ID
  valueFrom:
    secretKeyRef:
      name: {{ . }}
      key: {{ $.Values.s3.accessKeyIdKey }}
- name: AWS_SECRET_ACCESS_KEY
  valueFrom:
    secretKeyRef:
      name: {{ . }}
      key: {{ $.Values.s3.secretAccessKeyKey }}
{{- end }}
{{- with .Values.s3.endpointUrl }}
{{- include "ray-detect.refuseCredentials" (dict "where" "s3.endpointUrl" "value" .) }}
- name: AWS_ENDPOINT_URL
  value: {{ . | quote }}
{{- end }}
{{- with .Values.s3.region }}
- name: AWS_REGION
  value: {{ . | quote }}
- name: AWS_DEFAULT_REGION
  value: {{ . | quote }}
{{- end }}
{{- if eq .Values.table.format "iceberg" }}
{{- $iceberg := .Values.table.iceberg }}
{{- range $property := keys $iceberg.properties | sortAlpha }}
{{- $value := get $iceberg.properties $property | toString }}
{{- include "ray-detect.refuseCredentials" (dict "where" (printf "table.iceberg.properties.%s" $property) "value" $value) }}
- name: {{ include "ray-detect.icebergVariable" (dict "catalog" $iceberg.catalog "property" $property) }}
  value: {{ $value | quote }}
{{- end }}
{{- range $property := $iceberg.credentialKeys }}
{{- if not $iceberg.credentialsSecret }}
{{- fail "table.iceberg.credentialKeys name keys of table.iceberg.credentialsSecret, which is empty" }}
{{- end }}
- name: {{ include "ray-detect.icebergVariable" (dict "catalog" $iceberg.catalog "property" $property) }}
  valueFrom:
    secretKeyRef:
      name: {{ $iceberg.credentialsSecret }}
      key: {{ $property }}
{{- end }}
{{- end }}
{{- end }}

{{/*
The environment variable pyiceberg reads a catalog's property from: PYICEBERG_CATALOG__<CATALOG>__<PROPERTY>,
a dot of the property written "__" and a dash "_" (s3.secret-access-key: S3__SECRET_ACCESS_KEY).
*/}}
{{- define "ray-detect.icebergVariable" -}}
PYICEBERG_CATALOG__{{ upper .catalog }}__{{ .property | replace "." "__" | replace "-" "_" | upper }}
{{- end }}

{{/*
A container's env as YAML: the chart's entries, less those whose name an entry of the user's list has, then
the user's (two entries of one name would be invalid, so the user's wins).
Call with (dict "chart" <list of EnvVar> "user" <list of EnvVar>).
*/}}
{{- define "ray-detect.mergeEnv" -}}
{{- $userNames := list }}
{{- range .user }}
{{- $userNames = append $userNames .name }}
{{- end }}
{{- $env := list }}
{{- range .chart }}
{{- if not (has .name $userNames) }}
{{- $env = append $env . }}
{{- end }}
{{- end }}
{{- toYaml (concat $env (.user | default list)) }}
{{- end }}

{{/*
Disk
Every emptyDir has a sizeLimit and every container requests, and is limited to, the ephemeral storage of what
it writes, so the kubelet evicts a pod that writes more instead of letting it fill the node's disk. The
sizes are added up in MiB; docs/kubernetes.md (Disk) explains the sum.
*/}}

{{/*
A size in bytes, a Kubernetes quantity ("2Gi", "512Mi", "1G", 1073741824), as a whole number of bytes
(rounded up). Fails naming the key on anything else. Call with (dict "key" "head.shmSize" "quantity" "1Gi").
*/}}
{{- define "ray-detect.bytes" -}}
{{- $text := ternary (printf "%.0f" .quantity) (toString .quantity) (kindIs "float64" .quantity) }}
{{- if not (regexMatch "^[0-9]+([.][0-9]+)?(Ki|Mi|Gi|Ti|Pi|Ei|k|M|G|T|P|E)?$" $text) }}
{{- fail (printf "%s: cannot read %q as a size in bytes; write it as 512Mi, 2Gi or 1G" .key $text) }}
{{- end }}
{{- $suffix := regexFind "[A-Za-z]+$" $text }}
{{- $factors := dict "" 1.0 "Ki" 1024.0 "Mi" 1048576.0 "Gi" 1073741824.0 "Ti" 1099511627776.0 "Pi" 1125899906842624.0 "Ei" 1152921504606846976.0 "k" 1e3 "M" 1e6 "G" 1e9 "T" 1e12 "P" 1e15 "E" 1e18 }}
{{- printf "%.0f" (ceil (mulf (float64 (trimSuffix $suffix $text)) (get $factors $suffix))) }}
{{- end }}

{{/* A size in whole MiB, rounded up. Call as ray-detect.bytes. */}}
{{- define "ray-detect.mebibytes" -}}
{{- printf "%.0f" (ceil (divf (include "ray-detect.bytes" . | float64) 1048576)) }}
{{- end }}

{{/* A number of MiB as a quantity: "3Gi" when it is whole GiB, else "4608Mi". */}}
{{- define "ray-detect.mebibyteQuantity" -}}
{{- $mib := int . }}
{{- if eq (mod $mib 1024) 0 }}
{{- printf "%dGi" (div $mib 1024) }}
{{- else }}
{{- printf "%dMi" $mib }}
{{- end }}
{{- end }}

{{/*
The disk of a pod, in MiB, as YAML: rayTmp (the /tmp/ray emptyDir), scratch (the /tmp emptyDir),
containerLog (a container's own log and root filesystem), and container: the ephemeral-storage of its main
container, which holds both emptyDirs (sidecars request their containerLog only). For a Ray pod (the head, a
worker group): rayTmp is the group's spillSize (else its shmSize, the most its object store holds) plus
ephemeralStorage.rayLogs, and objectStoreBytes is 95% of its /dev/shm, Ray's own margin, so the object store
lives in /dev/shm and never on disk. For the submitter ("submitter" true), which runs no Ray node, /tmp/ray is
scratch-sized. Call with (dict "ctx" $ "key" "head" "group" .Values.head), or (dict "ctx" $ "submitter" true).
*/}}
{{- define "ray-detect.podDisk" -}}
{{- $storage := .ctx.Values.ephemeralStorage }}
{{- $scratch := include "ray-detect.mebibytes" (dict "key" "ephemeralStorage.scratch" "quantity" $storage.scratch) | atoi }}
{{- $containerLog := include "ray-detect.mebibytes" (dict "key" "ephemeralStorage.containerLog" "quantity" $storage.containerLog) | atoi }}
{{- $rayTmp := $scratch }}
{{- if not .submitter }}
{{- $shmKey := printf "%s.shmSize" .key }}
{{- $spill := include "ray-detect.mebibytes" (dict "key" $shmKey "quantity" .group.shmSize) | atoi }}
{{- if .group.spillSize }}
{{- $spill = include "ray-detect.mebibytes" (dict "key" (printf "%s.spillSize" .key) "quantity" .group.spillSize) | atoi }}
{{- end }}
{{- $rayTmp = add $spill (include "ray-detect.mebibytes" (dict "key" "ephemeralStorage.rayLogs" "quantity" $storage.rayLogs) | atoi) }}
objectStoreBytes: {{ printf "%.0f" (floor (mulf (include "ray-detect.bytes" (dict "key" $shmKey "quantity" .group.shmSize) | float64) 0.95)) | quote }}
{{- end }}
rayTmp: {{ $rayTmp }}
scratch: {{ $scratch }}
containerLog: {{ $containerLog }}
container: {{ add $rayTmp $scratch $containerLog }}
{{- end }}

{{/*
Container resources with an ephemeral-storage request and limit of `mib` MiB added, unless the resources
name ephemeral-storage already. Call with (dict "resources" .Values.head.resources "mib" 4608).
*/}}
{{- define "ray-detect.withEphemeralStorage" -}}
{{- $resources := deepCopy (.resources | default dict) }}
{{- $size := include "ray-detect.mebibyteQuantity" .mib }}
{{- range $kind := list "requests" "limits" }}
{{- $_ := set $resources $kind (merge (get $resources $kind | default dict) (dict "ephemeral-storage" $size)) }}
{{- end }}
{{- toYaml $resources }}
{{- end }}

{{/*
The emptyDirs of every pod, each with its sizeLimit: /tmp (scratch, HOME), /tmp/ray (Ray's temp dir: logs
and spilled objects) and a memory-backed /dev/shm (Ray's object store). Call with
(dict "disk" <ray-detect.podDisk> "shmSize" "2Gi").
*/}}
{{- define "ray-detect.baseVolumes" -}}
- name: tmp
  emptyDir:
    sizeLimit: {{ include "ray-detect.mebibyteQuantity" .disk.scratch }}
- name: ray-tmp
  emptyDir:
    sizeLimit: {{ include "ray-detect.mebibyteQuantity" .disk.rayTmp }}
- name: dshm
  emptyDir:
    medium: Memory
    sizeLimit: {{ .shmSize }}
{{- end }}

{{/* /tmp before /tmp/ray, which lies inside it. */}}
{{- define "ray-detect.baseVolumeMounts" -}}
- name: tmp
  mountPath: /tmp
- name: ray-tmp
  mountPath: /tmp/ray
- name: dshm
  mountPath: /dev/shm
{{- end }}

{{/*
The `ray start` parameters of a group: the chart's, then the group's own (which win). The object store is
sized to fit /dev/shm (Ray's default, 30% of the memory limit, would not, and Ray would then put it on disk
under /tmp/ray), and Ray spills into /tmp/ray/spill, inside the bounded /tmp/ray emptyDir.
Call with (dict "chart" <dict of parameters> "group" <the group's values> "disk" <ray-detect.podDisk>).
*/}}
{{- define "ray-detect.rayStartParams" -}}
{{- $params := merge (dict "object-store-memory" .disk.objectStoreBytes "object-spilling-directory" "/tmp/ray/spill") .chart }}
{{- toYaml (merge (deepCopy (.group.rayStartParams | default dict)) $params) }}
{{- end }}

{{/*
A Ray pod template (head or worker group).
Call with (dict "ctx" $ "group" .Values.head "key" "head" "component" "head" "container" "ray-head" "head" true
"resources" <container resources> "disk" <ray-detect.podDisk>).
*/}}
{{- define "ray-detect.rayPodTemplate" -}}
{{- $ctx := .ctx }}
{{- $group := .group }}
{{- $values := $ctx.Values -}}
{{- $annotations := $group.podAnnotations | default dict }}
{{- if and .head $values.head.protectFromDisruption }}
{{- /* The cluster autoscaler and Karpenter then leave the head's node alone (docs/kubernetes.md, Node drains). */}}
{{- $annotations = merge (deepCopy $annotations) (dict "cluster-autoscaler.kubernetes.io/safe-to-evict" "false" "karpenter.sh/do-not-disrupt" "true") }}
{{- end -}}
metadata:
  labels:
    {{- include "ray-detect.labels" (dict "ctx" $ctx "component" .component) | nindent 4 }}
  {{- with $annotations }}
  annotations:
    {{- toYaml . | nindent 4 }}
  {{- end }}
spec:
  serviceAccountName: {{ include "ray-detect.serviceAccountName" $ctx }}
  {{- /* Only the head's autoscaler sidecar talks to the Kubernetes API (ray-detect.autoscalerTokenVolume). */}}
  automountServiceAccountToken: false
  securityContext:
    {{- include "ray-detect.podSecurityContext" $ctx | nindent 4 }}
  {{- with $values.imagePullSecrets }}
  imagePullSecrets:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with ternary ($values.head.priorityClassName | default $values.priorityClassName) $values.priorityClassName .head }}
  priorityClassName: {{ . }}
  {{- end }}
  {{- with $group.nodeSelector }}
  nodeSelector:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with $group.tolerations }}
  tolerations:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with $group.affinity }}
  affinity:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  containers:
    - name: {{ .container }}
      image: {{ include "ray-detect.image" (dict "ctx" $ctx "image" $group.image) }}
      imagePullPolicy: {{ $values.image.pullPolicy }}
      {{- if .head }}
      ports:
        - name: gcs-server
          containerPort: 6379
          protocol: TCP
        - name: dashboard
          containerPort: 8265
          protocol: TCP
        - name: client
          containerPort: 10001
          protocol: TCP
        - name: metrics
          containerPort: 8080
          protocol: TCP
      {{- end }}
      {{- $env := include "ray-detect.rayEnv" $ctx | fromYamlArray }}
      {{- if .head }}
      {{- /* The job's driver runs on the head: tell it how far the cluster can grow. */}}
      {{- $env = concat $env (include "ray-detect.clusterMaximaEnv" $ctx | fromYamlArray) }}
      {{- end }}
      env:
        {{- include "ray-detect.mergeEnv" (dict "chart" $env "user" $group.env) | nindent 8 }}
      {{- with $group.envFrom }}
      envFrom:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      resources:
        {{- include "ray-detect.withEphemeralStorage" (dict "resources" .resources "mib" .disk.container) | nindent 8 }}
      securityContext:
        {{- include "ray-detect.containerSecurityContext" $ctx | nindent 8 }}
      volumeMounts:
        {{- include "ray-detect.baseVolumeMounts" . | nindent 8 }}
        {{- with $group.volumeMounts }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
  volumes:
    {{- include "ray-detect.baseVolumes" (dict "disk" .disk "shmSize" $group.shmSize) | nindent 4 }}
    {{- if and .head $values.autoscaling.enabled }}
    {{- include "ray-detect.autoscalerTokenVolume" $ctx | nindent 4 }}
    {{- end }}
    {{- with $group.volumes }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
{{- end }}
