{{/*
Names
*/}}

{{/* The chart name, or nameOverride. */}}
{{- define "ray-detect.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
The release-qualified name, truncated to 63 characters (a DNS label).
A release named like the chart is not repeated: release "ray-detect" gives "ray-detect", not "ray-detect-ray-detect".
*/}}
{{- define "ray-detect.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{/* "name-version" for the helm.sh/chart label. */}}
{{- define "ray-detect.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
The RayCluster's name. KubeRay refuses names over 53 characters, since it appends "-serve-svc" and the like.
*/}}
{{- define "ray-detect.clusterName" -}}
{{- include "ray-detect.fullname" . | trunc 53 | trimSuffix "-" }}
{{- end }}

{{/*
The RayJob's name: "<fullname>-<job.runName>". KubeRay refuses RayJob names over 47 characters (it appends
a 6-character suffix to name the RayCluster it creates), so the fullname part is shortened to fit.
*/}}
{{- define "ray-detect.jobName" -}}
{{- $run := .Values.job.runName }}
{{- $prefix := include "ray-detect.fullname" . | trunc (int (sub 46 (len $run))) | trimSuffix "-" }}
{{- printf "%s-%s" $prefix $run }}
{{- end }}

{{/* The ServiceAccount every pod of the release runs as: never the namespace's "default" by omission. */}}
{{- define "ray-detect.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "ray-detect.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- required "serviceAccount.name must name an existing ServiceAccount when serviceAccount.create=false (the pods would run as the namespace's default account)" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/*
The autoscaler's Kubernetes token. No container of the release gets the kubelet's automounted token: the
head pod carries this projected volume (a short-lived token of the release's ServiceAccount, which
KubeRay's Role lets patch pods and RayClusters, with the cluster's CA and the namespace, the files the
kubelet would mount), and only the autoscaler sidecar mounts it, through autoscalerOptions.volumeMounts,
at the path Ray's autoscaler reads (again every minute, so the rotated token is picked up). The ray-head
container (driver, dashboard, Jobs API) cannot read it.
*/}}
{{- define "ray-detect.autoscalerTokenVolume" -}}
- name: autoscaler-token
  projected:
    sources:
      - serviceAccountToken:
          path: token
          expirationSeconds: 3607
      - configMap:
          name: kube-root-ca.crt
          items:
            - key: ca.crt
              path: ca.crt
      - downwardAPI:
          items:
            - path: namespace
              fieldRef:
                fieldPath: metadata.namespace
{{- end }}

{{/*
Labels. Call with (dict "ctx" $ "component" "head"), adding "standalone" true for an object that kubectl,
not Helm, creates: it then lacks the labels that say Helm manages it.
*/}}

{{/* Labels that select the release's pods: stable across upgrades. */}}
{{- define "ray-detect.selectorLabels" -}}
app.kubernetes.io/name: {{ include "ray-detect.name" .ctx }}
app.kubernetes.io/instance: {{ .ctx.Release.Name }}
{{- with .component }}
app.kubernetes.io/component: {{ . }}
{{- end }}
{{- end }}

{{/* The full label set of every object and pod template. */}}
{{- define "ray-detect.labels" -}}
{{- if not .standalone -}}
helm.sh/chart: {{ include "ray-detect.chart" .ctx }}
{{ end -}}
{{ include "ray-detect.selectorLabels" . }}
app.kubernetes.io/version: {{ .ctx.Chart.AppVersion | quote }}
{{- if not .standalone }}
app.kubernetes.io/managed-by: {{ .ctx.Release.Service }}
{{- end }}
app.kubernetes.io/part-of: ray-detect
{{- end }}

{{/*
Images
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
Security
*/}}

{{/* Pod-level securityContext: Pod Security Standards "restricted". */}}
{{- define "ray-detect.podSecurityContext" -}}
runAsNonRoot: true
runAsUser: {{ .Values.securityContext.runAsUser }}
runAsGroup: {{ .Values.securityContext.runAsGroup }}
fsGroup: {{ .Values.securityContext.fsGroup }}
seccompProfile:
  type: RuntimeDefault
{{- end }}

{{/* Container-level securityContext: Pod Security Standards "restricted". */}}
{{- define "ray-detect.containerSecurityContext" -}}
allowPrivilegeEscalation: false
privileged: false
capabilities:
  drop:
    - ALL
runAsNonRoot: true
runAsUser: {{ .Values.securityContext.runAsUser }}
runAsGroup: {{ .Values.securityContext.runAsGroup }}
readOnlyRootFilesystem: {{ .Values.securityContext.readOnlyRootFilesystem }}
seccompProfile:
  type: RuntimeDefault
{{- end }}

{{/*
Ray pods
*/}}

{{/*
Environment shared by every Ray container (head and workers, where the job's driver and tasks run):
S3 credentials from the referenced Secret only, the optional endpoint and region, no usage telemetry.
*/}}
{{- define "ray-detect.rayEnv" -}}
- name: RAY_USAGE_STATS_ENABLED
  value: "0"
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
- name: AWS_ENDPOINT_URL
  value: {{ . | quote }}
{{- end }}
{{- with .Values.s3.region }}
- name: AWS_REGION
  value: {{ . | quote }}
- name: AWS_DEFAULT_REGION
  value: {{ . | quote }}
{{- end }}
{{- end }}

{{/*
Volumes every pod template mounts: an emptyDir for Ray's session files under /tmp/ray (the root filesystem
stays clean and read-only-able), and a memory-backed /dev/shm for Ray's object store, sized per group.
Call with (dict "shmSize" "2Gi").
*/}}
{{- define "ray-detect.baseVolumes" -}}
- name: ray-tmp
  emptyDir: {}
- name: dshm
  emptyDir:
    medium: Memory
    sizeLimit: {{ .shmSize }}
{{- end }}

{{- define "ray-detect.baseVolumeMounts" -}}
- name: ray-tmp
  mountPath: /tmp/ray
- name: dshm
  mountPath: /dev/shm
{{- end }}

{{/*
A Ray pod template (head or worker group).
Call with (dict "ctx" $ "group" .Values.head "component" "head" "container" "ray-head" "head" true
"resources" <container resources> "shmSize" <size of /dev/shm>).
*/}}
{{- define "ray-detect.rayPodTemplate" -}}
{{- $ctx := .ctx }}
{{- $group := .group }}
{{- $values := $ctx.Values -}}
metadata:
  labels:
    {{- include "ray-detect.labels" (dict "ctx" $ctx "component" .component) | nindent 4 }}
  {{- with $group.podAnnotations }}
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
  {{- with $values.priorityClassName }}
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
      env:
        {{- include "ray-detect.rayEnv" $ctx | nindent 8 }}
        {{- if .head }}
        {{- /* The job's driver runs on the head: tell it how far the cluster can grow. */}}
        {{- with include "ray-detect.clusterMaximaEnv" $ctx }}
        {{- . | nindent 8 }}
        {{- end }}
        {{- end }}
        {{- with $group.env }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
      {{- with $group.envFrom }}
      envFrom:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      resources:
        {{- toYaml .resources | nindent 8 }}
      securityContext:
        {{- include "ray-detect.containerSecurityContext" $ctx | nindent 8 }}
      volumeMounts:
        {{- include "ray-detect.baseVolumeMounts" . | nindent 8 }}
        {{- with $group.volumeMounts }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
  volumes:
    {{- include "ray-detect.baseVolumes" . | nindent 4 }}
    {{- if and .head $values.autoscaling.enabled }}
    {{- include "ray-detect.autoscalerTokenVolume" . | nindent 4 }}
    {{- end }}
    {{- with $group.volumes }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
{{- end }}

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
- groupName: {{ $groupName }}
  replicas: {{ $g.replicas }}
  minReplicas: {{ $g.minReplicas }}
  maxReplicas: {{ $g.maxReplicas }}
  rayStartParams:
    {{- toYaml ($g.rayStartParams | default dict) | nindent 4 }}
  template:
    {{- include "ray-detect.rayPodTemplate" (dict "ctx" $ "group" $g "component" $groupName "container" "ray-worker" "head" false "resources" $resources "shmSize" $g.shmSize) | nindent 4 }}
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
The head's RAY_DETECT_MAX_GPUS and RAY_DETECT_MAX_CPUS, as strings. An entry of the same name in head.env
wins: the chart leaves its own out (two entries of one name would be invalid), so a user can pin a figure.
*/}}
{{- define "ray-detect.clusterMaximaEnv" -}}
{{- $userNames := list }}
{{- range .Values.head.env }}
{{- $userNames = append $userNames .name }}
{{- end }}
{{- $env := list }}
{{- if not (has "RAY_DETECT_MAX_GPUS" $userNames) }}
{{- $env = append $env (dict "name" "RAY_DETECT_MAX_GPUS" "value" (include "ray-detect.maxGpus" .)) }}
{{- end }}
{{- $maxCpus := include "ray-detect.maxCpus" . }}
{{- if and $maxCpus (not (has "RAY_DETECT_MAX_CPUS" $userNames)) }}
{{- $env = append $env (dict "name" "RAY_DETECT_MAX_CPUS" "value" $maxCpus) }}
{{- end }}
{{- with $env }}
{{- toYaml . }}
{{- end }}
{{- end }}

{{/*
The RayCluster spec, shared by the stand-alone RayCluster and a RayJob's own rayClusterSpec.
*/}}
{{- define "ray-detect.rayClusterSpec" -}}
{{- $values := .Values -}}
rayVersion: {{ $values.rayVersion | quote }}
enableInTreeAutoscaling: {{ $values.autoscaling.enabled }}
{{- if $values.autoscaling.enabled }}
autoscalerOptions:
  upscalingMode: {{ $values.autoscaling.upscalingMode }}
  idleTimeoutSeconds: {{ $values.autoscaling.idleTimeoutSeconds }}
  imagePullPolicy: {{ $values.image.pullPolicy }}
  resources:
    {{- toYaml $values.autoscaling.resources | nindent 4 }}
  {{- /* KubeRay injects the autoscaler as a sidecar of the head: it must be restricted-compliant too. */}}
  securityContext:
    {{- include "ray-detect.containerSecurityContext" . | nindent 4 }}
  # The only Kubernetes token of the release's pods (ray-detect.autoscalerTokenVolume).
  volumeMounts:
    - name: autoscaler-token
      mountPath: /var/run/secrets/kubernetes.io/serviceaccount
      readOnly: true
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
  rayStartParams:
    dashboard-host: "0.0.0.0"
    num-gpus: "0"
    {{- if not $values.head.schedulable }}
    # No tasks or actors on the head: it keeps its CPU and memory for the GCS, dashboard and driver.
    num-cpus: "0"
    {{- end }}
    {{- with $values.head.rayStartParams }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
  template:
    {{- include "ray-detect.rayPodTemplate" (dict "ctx" . "group" $values.head "component" "head" "container" "ray-head" "head" true "resources" $values.head.resources "shmSize" $values.head.shmSize) | nindent 4 }}
{{- with include "ray-detect.workerGroupSpecs" . }}
workerGroupSpecs:
  {{- trim . | nindent 2 }}
{{- end }}
{{- end }}

{{/*
Jobs
*/}}

{{/*
Quote one word for the POSIX shell that runs the entrypoint: wrap in single quotes, and write each single
quote inside as '\'' (close, escaped quote, reopen).
*/}}
{{- define "ray-detect.shellQuote" -}}
{{- printf "'%s'" (replace "'" "'\\''" .) }}
{{- end }}

{{/*
"python -m app 'override' ...": the RayJob's entrypoint. With the PodMonitor on, the chart adds
metrics.run=<job.runName> (the run label of the app's metrics) unless an override sets it; for a schedule,
output.skip_if_in_use=true: a scheduled run that finds the previous one still going ends at once, successfully.
*/}}
{{- define "ray-detect.entrypoint" -}}
{{- $overrides := .Values.job.overrides }}
{{- $set := list }}
{{- range $overrides }}
{{- $set = append $set (regexReplaceAll "=.*" . "") }}
{{- end }}
{{- if and .Values.monitoring.podMonitor.enabled (not (has "metrics.run" $set)) }}
{{- $overrides = prepend $overrides (printf "metrics.run=%s" .Values.job.runName) }}
{{- end }}
{{- if and .Values.job.schedule.cron (not (has "output.skip_if_in_use" $set)) }}
{{- $overrides = append $overrides "output.skip_if_in_use=true" }}
{{- end }}
{{- $words := list "python" "-m" "app" }}
{{- range $overrides }}
{{- $words = append $words (include "ray-detect.shellQuote" .) }}
{{- end }}
{{- join " " $words }}
{{- end }}

{{/*
The RayJob's spec: the app's entrypoint on the chart's RayCluster (job.cluster=shared) or on one of its own
(dedicated). A RayCronJob's jobTemplate is the same spec. With job.queueName, created suspended for Kueue.
*/}}
{{- define "ray-detect.rayJobSpec" -}}
{{- $job := .Values.job }}
{{- $labels := include "ray-detect.labels" (dict "ctx" . "component" "job" "standalone" $job.standalone) }}
{{- if and $job.queueName (ne $job.cluster "dedicated") }}
{{- fail "job.queueName needs job.cluster=dedicated: Kueue admits a RayJob together with the cluster it creates, not a job on a shared RayCluster" }}
{{- end -}}
entrypoint: {{ include "ray-detect.entrypoint" . | quote }}
{{- if $job.queueName }}
# Kueue admits the job: it is created suspended, and Kueue starts it once its queue has room.
suspend: true
{{- end }}
# A Kubernetes Job runs `ray job submit` against the head's dashboard and follows the logs.
submissionMode: K8sJobMode
{{- if eq $job.cluster "dedicated" }}
# The RayJob creates its own RayCluster from this spec and removes it when the job ends.
shutdownAfterJobFinishes: {{ $job.shutdownAfterJobFinishes }}
{{- if $job.shutdownAfterJobFinishes }}
ttlSecondsAfterFinished: {{ $job.ttlSecondsAfterFinished }}
{{- end }}
rayClusterSpec:
  {{- include "ray-detect.rayClusterSpec" . | nindent 2 }}
{{- else }}
# Runs on the chart's long-lived RayCluster, which outlives the job.
clusterSelector:
  ray.io/cluster: {{ include "ray-detect.clusterName" . }}
{{- end }}
{{- with $job.activeDeadlineSeconds }}
activeDeadlineSeconds: {{ . }}
{{- end }}
backoffLimit: {{ $job.backoffLimit }}
submitterPodTemplate:
  metadata:
    labels:
      {{- $labels | nindent 6 }}
  spec:
    restartPolicy: Never
    serviceAccountName: {{ include "ray-detect.serviceAccountName" . }}
    # The submitter only talks to the Ray dashboard, never to the Kubernetes API.
    automountServiceAccountToken: false
    securityContext:
      {{- include "ray-detect.podSecurityContext" . | nindent 6 }}
    {{- with .Values.imagePullSecrets }}
    imagePullSecrets:
      {{- toYaml . | nindent 6 }}
    {{- end }}
    {{- with .Values.priorityClassName }}
    priorityClassName: {{ . }}
    {{- end }}
    {{- with $job.submitter.nodeSelector }}
    nodeSelector:
      {{- toYaml . | nindent 6 }}
    {{- end }}
    {{- with $job.submitter.tolerations }}
    tolerations:
      {{- toYaml . | nindent 6 }}
    {{- end }}
    {{- with $job.submitter.affinity }}
    affinity:
      {{- toYaml . | nindent 6 }}
    {{- end }}
    containers:
      # KubeRay fills in the `ray job submit` command and the dashboard address (and the Ray token).
      - name: ray-job-submitter
        image: {{ include "ray-detect.image" (dict "ctx" . "image" .Values.head.image) }}
        imagePullPolicy: {{ .Values.image.pullPolicy }}
        env:
          - name: RAY_USAGE_STATS_ENABLED
            value: "0"
        resources:
          {{- toYaml $job.submitter.resources | nindent 10 }}
        securityContext:
          {{- include "ray-detect.containerSecurityContext" . | nindent 10 }}
        volumeMounts:
          {{- include "ray-detect.baseVolumeMounts" . | nindent 10 }}
    volumes:
      {{- include "ray-detect.baseVolumes" $job.submitter | nindent 6 }}
{{- end }}
