{{/*
The RayCluster: its worker groups, the cluster maxima the head is told, and the RayCluster spec.
*/}}

{{/*
Worker groups
Each key of workerGroups is one worker group, all rendered alike: what makes a GPU group (gpusPerWorker,
nodeSelector, tolerations) is in its values, never in its key, so a new group is a values change only.
*/}}

{{/*
A group's groupName and its pods' component label: "<key>-workers". Keys have at most 55 characters (the
schema), so it fits a label value. Call with the key.
*/}}
{{- define "ray-detect.workerGroupName" -}}
{{- printf "%s-workers" . }}
{{- end }}

{{/*
A group's container resources, as YAML, with gpusPerWorker (when set) as the nvidia.com/gpu limit and
request, so overriding resources cannot lose the GPUs. Call with (dict "group" .Values.workerGroups.gpu).
*/}}
{{- define "ray-detect.workerResources" -}}
{{- $resources := deepCopy (.group.resources | default dict) }}
{{- with .group.gpusPerWorker }}
{{- $_ := set $resources "limits" (merge (dict "nvidia.com/gpu" .) ($resources.limits | default dict)) }}
{{- $_ := set $resources "requests" (merge (dict "nvidia.com/gpu" .) ($resources.requests | default dict)) }}
{{- end }}
{{- toYaml $resources }}
{{- end }}

{{/*
The items of workerGroupSpecs: one per enabled group, in the order of their keys (Helm ranges over a map
sorted by key). Empty when no group is enabled.
*/}}
{{- define "ray-detect.workerGroupSpecs" -}}
{{- range $key, $g := .Values.workerGroups }}
{{- if $g.enabled }}
{{- /* Fail early, naming the group, on replica counts KubeRay would reject or silently clamp. */}}
{{- if or (lt (int $g.replicas) (int $g.minReplicas)) (gt (int $g.replicas) (int $g.maxReplicas)) }}
{{- fail (printf "workerGroups.%s: replicas (%d) must be between minReplicas (%d) and maxReplicas (%d)" $key (int $g.replicas) (int $g.minReplicas) (int $g.maxReplicas)) }}
{{- end }}
{{- $groupName := include "ray-detect.workerGroupName" $key }}
{{- $resources := include "ray-detect.workerResources" (dict "group" $g) | fromYaml }}
{{- $disk := include "ray-detect.podDisk" (dict "ctx" $ "key" (printf "workerGroups.%s" $key) "group" $g) | fromYaml }}
- groupName: {{ $groupName }}
  replicas: {{ $g.replicas }}
  minReplicas: {{ $g.minReplicas }}
  maxReplicas: {{ $g.maxReplicas }}
  rayStartParams:
    {{- include "ray-detect.rayStartParams" (dict "chart" dict "group" $g "disk" $disk) | nindent 4 }}
  template:
    {{- include "ray-detect.rayPodTemplate" (dict "ctx" $ "group" $g "component" $groupName "container" "ray-worker" "head" false "resources" $resources "disk" $disk) | nindent 4 }}
{{- end }}
{{- end }}
{{- end }}

{{/*
Cluster maxima
Open-source Ray tells a job what the cluster has now, not what the autoscaler may add later, and a GPU group
that starts at zero pods shows no GPU at all. So the chart works out the most GPUs and CPUs the worker groups
can reach and hands them to the head (where a RayJob's driver runs) as RAY_DETECT_MAX_GPUS and
RAY_DETECT_MAX_CPUS. Counts follow what KubeRay gives `ray start` and what Ray's autoscaler assumes.
*/}}

{{/*
The most pods a worker group can have: maxReplicas when the autoscaler may add pods, else replicas.
Call with (dict "ctx" $ "group" .Values.workerGroups.gpu).
*/}}
{{- define "ray-detect.maxPods" -}}
{{- if .ctx.Values.autoscaling.enabled }}
{{- int .group.maxReplicas }}
{{- else }}
{{- int .group.replicas }}
{{- end }}
{{- end }}

{{/*
The GPUs one pod of a group offers Ray: the num-gpus ray start parameter when set, else the nvidia.com/gpu
limit of its container (gpusPerWorker, or one set in resources), which KubeRay turns into num-gpus, else 0.
Call with (dict "name" "workerGroups.gpu" "group" .Values.workerGroups.gpu).
*/}}
{{- define "ray-detect.gpusPerPod" -}}
{{- $params := .group.rayStartParams | default dict }}
{{- if hasKey $params "num-gpus" }}
{{- include "ray-detect.wholeNumber" (dict "key" (printf "%s.rayStartParams.num-gpus" .name) "value" (get $params "num-gpus")) }}
{{- else }}
{{- $limit := include "ray-detect.workerResources" . | fromYaml | dig "limits" "nvidia.com/gpu" 0 }}
{{- include "ray-detect.wholeNumber" (dict "key" (printf "%s.resources.limits.nvidia.com/gpu" .name) "value" $limit) }}
{{- end }}
{{- end }}

{{/*
The CPUs one pod of a group offers Ray: the num-cpus ray start parameter when set, else the container's CPU
limit, else its CPU request, rounded up to whole CPUs (KubeRay and Ray's autoscaler both round up: 500m
is 1 CPU). Empty when none is set: Ray then counts the node's CPUs, which the chart cannot know.
Call with (dict "name" "workerGroups.cpu" "group" .Values.workerGroups.cpu).
*/}}
{{- define "ray-detect.cpusPerPod" -}}
{{- $params := .group.rayStartParams | default dict }}
{{- $resources := .group.resources | default dict }}
{{- $limit := dig "limits" "cpu" "" $resources }}
{{- $request := dig "requests" "cpu" "" $resources }}
{{- if hasKey $params "num-cpus" }}
{{- include "ray-detect.wholeNumber" (dict "key" (printf "%s.rayStartParams.num-cpus" .name) "value" (get $params "num-cpus")) }}
{{- else if $limit }}
{{- include "ray-detect.wholeCpus" (dict "key" (printf "%s.resources.limits.cpu" .name) "quantity" $limit) }}
{{- else if $request }}
{{- include "ray-detect.wholeCpus" (dict "key" (printf "%s.resources.requests.cpu" .name) "quantity" $request) }}
{{- end }}
{{- end }}

{{/*
A count of CPUs or GPUs (num-cpus, num-gpus, a GPU limit) as an integer. Ray's autoscaler reads such counts
with int(), so anything else would break the cluster anyway: fail here, naming the key.
Call with (dict "key" "workerGroups.cpu.rayStartParams.num-cpus" "value" "4").
*/}}
{{- define "ray-detect.wholeNumber" -}}
{{- $text := toString .value }}
{{- if not (regexMatch "^[0-9]+$" $text) }}
{{- fail (printf "%s must be a whole number, not %q" .key $text) }}
{{- end }}
{{- atoi $text }}
{{- end }}

{{/*
A Kubernetes CPU quantity ("4", 4, "2.5", "500m") rounded up to whole CPUs. Other suffixes ("1k", "2Ki")
are rejected rather than guessed. Call with (dict "key" "workerGroups.cpu.resources.limits.cpu" "quantity" "500m").
*/}}
{{- define "ray-detect.wholeCpus" -}}
{{- $text := toString .quantity }}
{{- if not (regexMatch "^([0-9]+|[0-9]*[.][0-9]+)m?$" $text) }}
{{- fail (printf "%s: cannot count the CPUs in %q; write CPUs (2, 0.5) or millicores (500m)" .key $text) }}
{{- end }}
{{- $cpus := float64 (trimSuffix "m" $text) }}
{{- if hasSuffix "m" $text }}
{{- $cpus = divf $cpus 1000 }}
{{- end }}
{{- ceil $cpus | int }}
{{- end }}

{{/*
The most GPUs the enabled worker groups can offer Ray together: the sum of max pods x GPUs per pod.
*/}}
{{- define "ray-detect.maxGpus" -}}
{{- $total := 0 }}
{{- range $name, $group := .Values.workerGroups }}
{{- if $group.enabled }}
{{- $pods := include "ray-detect.maxPods" (dict "ctx" $ "group" $group) | atoi }}
{{- $gpus := include "ray-detect.gpusPerPod" (dict "name" (printf "workerGroups.%s" $name) "group" $group) | atoi }}
{{- $total = add $total (mul $pods $gpus) }}
{{- end }}
{{- end }}
{{- $total }}
{{- end }}

{{/*
The most CPUs the cluster can offer Ray: the enabled worker groups' max pods x CPUs per pod, plus the head's
CPUs when work may run there (head.schedulable). Empty when a counted group's CPUs are unknown (no num-cpus,
no CPU limit or request): a wrong figure would be worse than none.
*/}}
{{- define "ray-detect.maxCpus" -}}
{{- $total := 0 }}
{{- $known := true }}
{{- range $name, $group := .Values.workerGroups }}
{{- if $group.enabled }}
{{- $cpus := include "ray-detect.cpusPerPod" (dict "name" (printf "workerGroups.%s" $name) "group" $group) }}
{{- if eq $cpus "" }}
{{- $known = false }}
{{- else }}
{{- $pods := include "ray-detect.maxPods" (dict "ctx" $ "group" $group) | atoi }}
{{- $total = add $total (mul $pods (atoi $cpus)) }}
{{- end }}
{{- end }}
{{- end }}
{{- if .Values.head.schedulable }}
{{- $cpus := include "ray-detect.cpusPerPod" (dict "name" "head" "group" .Values.head) }}
{{- if eq $cpus "" }}
{{- $known = false }}
{{- else }}
{{- $total = add $total (atoi $cpus) }}
{{- end }}
{{- end }}
{{- if $known }}
{{- $total }}
{{- end }}
{{- end }}

{{/*
The head's RAY_DETECT_MAX_GPUS and RAY_DETECT_MAX_CPUS, as a YAML list of EnvVar with string values. An
entry of the same name in head.env wins (ray-detect.mergeEnv), so a user can pin a figure.
*/}}
{{- define "ray-detect.clusterMaximaEnv" -}}
{{- $env := list (dict "name" "RAY_DETECT_MAX_GPUS" "value" (include "ray-detect.maxGpus" .)) }}
{{- with include "ray-detect.maxCpus" . }}
{{- $env = append $env (dict "name" "RAY_DETECT_MAX_CPUS" "value" .) }}
{{- end }}
{{- toYaml $env }}
{{- end }}

{{/*
The RayCluster spec, shared by the stand-alone RayCluster and a RayJob's own rayClusterSpec.
*/}}
{{- define "ray-detect.rayClusterSpec" -}}
{{- $values := .Values -}}
{{- $headDisk := include "ray-detect.podDisk" (dict "ctx" . "key" "head" "group" $values.head) | fromYaml -}}
rayVersion: {{ $values.rayVersion | quote }}
enableInTreeAutoscaling: {{ $values.autoscaling.enabled }}
{{- if $values.autoscaling.enabled }}
autoscalerOptions:
  upscalingMode: {{ $values.autoscaling.upscalingMode }}
  idleTimeoutSeconds: {{ $values.autoscaling.idleTimeoutSeconds }}
  imagePullPolicy: {{ $values.image.pullPolicy }}
  resources:
    {{- include "ray-detect.withEphemeralStorage" (dict "resources" $values.autoscaling.resources "mib" $headDisk.containerLog) | nindent 4 }}
  {{- /* KubeRay injects the autoscaler as a sidecar of the head: it must be restricted-compliant too. */}}
  securityContext:
    {{- include "ray-detect.containerSecurityContext" . | nindent 4 }}
  # HOME on the head's /tmp: the root filesystem is read-only.
  env:
    - name: HOME
      value: /tmp
    - name: RAY_USAGE_STATS_ENABLED
      value: "0"
  volumeMounts:
    # The only Kubernetes token of the release's pods (ray-detect.autoscalerTokenVolume).
    - name: autoscaler-token
      mountPath: /var/run/secrets/kubernetes.io/serviceaccount
      readOnly: true
    # The head's /tmp and /tmp/ray: the autoscaler writes its logs where the head reads them, and KubeRay,
    # finding /tmp/ray mounted, adds no emptyDir of its own (which would have no size limit).
    - name: tmp
      mountPath: /tmp
    - name: ray-tmp
      mountPath: /tmp/ray
{{- end }}
{{- if $values.rayAuth.enabled }}
{{- if semverCompare "<2.52.0-0" $values.rayVersion }}
{{- fail (printf "rayAuth.enabled needs Ray 2.52.0 or newer (rayVersion is %s): upgrade the image or set rayAuth.enabled=false" $values.rayVersion) }}
{{- end }}
authOptions:
  mode: token
  {{- with $values.rayAuth.secretName }}
  secretName: {{ . }}
  {{- end }}
{{- end }}
headGroupSpec:
  # The dashboard and GCS are reachable inside the cluster only; use kubectl port-forward from outside.
  serviceType: ClusterIP
  enableIngress: false
  {{- /* num-cpus "0" unless head.schedulable: no tasks or actors on the head, which keeps its CPU and memory
  for the GCS, dashboard and driver. */}}
  {{- $headParams := dict "dashboard-host" "0.0.0.0" "num-gpus" "0" }}
  {{- if not $values.head.schedulable }}
  {{- $_ := set $headParams "num-cpus" "0" }}
  {{- end }}
  rayStartParams:
    {{- include "ray-detect.rayStartParams" (dict "chart" $headParams "group" $values.head "disk" $headDisk) | nindent 4 }}
  template:
    {{- include "ray-detect.rayPodTemplate" (dict "ctx" . "group" $values.head "component" "head" "container" "ray-head" "head" true "resources" $values.head.resources "disk" $headDisk) | nindent 4 }}
{{- with include "ray-detect.workerGroupSpecs" . }}
workerGroupSpecs:
  {{- trim . | nindent 2 }}
{{- end }}
{{- end }}
