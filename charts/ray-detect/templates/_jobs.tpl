{{/*
Jobs: the entrypoint that runs the app and the RayJob spec (a RayCronJob's jobTemplate is the same).
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
output.skip_if_in_use=true: a scheduled run that finds the previous one still going ends at once, successfully;
with job.actorsPerGpu other than 1, inference.actors_per_gpu=<it>, unless an override sets it; with
table.format, output=<it> (and for iceberg output.catalog and output.table), unless an override sets them.
*/}}
{{- define "ray-detect.entrypoint" -}}
{{- $overrides := .Values.job.overrides }}
{{- $set := list }}
{{- range $override := $overrides }}
{{- $set = append $set (regexReplaceAll "=.*" $override "") }}
{{- /* A credential in an override's value (data.path, output.path, model.weights...) fails the render,
naming the key (the schema makes every override key=value, or a key alone) but not the value. */}}
{{- if contains "=" $override }}
{{- $key := regexReplaceAll "(?s)=.*$" $override "" | trimAll "+~" }}
{{- include "ray-detect.refuseCredentials" (dict "where" (printf "job.overrides: %s" $key) "value" (regexReplaceAll "(?s)^[^=]*=" $override "")) }}
{{- end }}
{{- end }}
{{- if and .Values.monitoring.podMonitor.enabled (not (has "metrics.run" $set)) }}
{{- $overrides = prepend $overrides (printf "metrics.run=%s" .Values.job.runName) }}
{{- end }}
{{- if and .Values.job.schedule.cron (not (has "output.skip_if_in_use" $set)) }}
{{- $overrides = append $overrides "output.skip_if_in_use=true" }}
{{- end }}
{{- $actorsPerGpu := include "ray-detect.actorsPerGpu" . | atoi }}
{{- if and (ne $actorsPerGpu 1) (not (has "inference.actors_per_gpu" $set)) }}
{{- $overrides = append $overrides (printf "inference.actors_per_gpu=%d" $actorsPerGpu) }}
{{- end }}
{{- with .Values.table.format }}
{{- if not (has "output" $set) }}
{{- $overrides = append $overrides (printf "output=%s" .) }}
{{- end }}
{{- if eq . "iceberg" }}
{{- if not $.Values.table.iceberg.table }}
{{- fail "table.format=iceberg needs table.iceberg.table: NAMESPACE.TABLE" }}
{{- end }}
{{- if not (has "output.catalog" $set) }}
{{- $overrides = append $overrides (printf "output.catalog=%s" $.Values.table.iceberg.catalog) }}
{{- end }}
{{- if not (has "output.table" $set) }}
{{- $overrides = append $overrides (printf "output.table=%s" $.Values.table.iceberg.table) }}
{{- end }}
{{- end }}
{{- end }}
{{- $words := list "python" "-m" "app" }}
{{- range $overrides }}
{{- $words = append $words (include "ray-detect.shellQuote" .) }}
{{- end }}
{{- join " " $words }}
{{- end }}

{{/*
The RayJob's deletionStrategy (KubeRay 1.7's deletionRules): with a cluster of its own that shuts down
(dedicated, job.shutdownAfterJobFinishes), delete that cluster job.ttlSecondsAfterFinished after the job
ended; and delete the RayJob itself (with its submitter Job and pod) job.deleteSucceededAfterSeconds after it
succeeded, job.deleteFailedAfterSeconds after it failed or could not run (a deadline passed, the submitter
failed: jobDeploymentStatus Failed). KubeRay applies no rule to a job on an existing cluster (clusterSelector):
the rules are there for an operator that will, and the chart refuses a schedule there (raycronjob.yaml).
*/}}
{{- define "ray-detect.deletionStrategy" -}}
{{- $job := .Values.job }}
{{- $ended := list (dict "jobStatus" "SUCCEEDED") (dict "jobStatus" "FAILED") (dict "jobDeploymentStatus" "Failed") }}
{{- $selfTtls := list (int $job.deleteSucceededAfterSeconds) (int $job.deleteFailedAfterSeconds) (int $job.deleteFailedAfterSeconds) }}
{{- $rules := list }}
{{- if and (eq $job.cluster "dedicated") $job.shutdownAfterJobFinishes }}
{{- $ttl := int $job.ttlSecondsAfterFinished }}
{{- if gt $ttl (min $job.deleteSucceededAfterSeconds $job.deleteFailedAfterSeconds | int) }}
{{- fail (printf "job.ttlSecondsAfterFinished (%d) must not exceed job.deleteSucceededAfterSeconds (%d) or job.deleteFailedAfterSeconds (%d): KubeRay deletes a RayJob's cluster no later than the RayJob" $ttl (int $job.deleteSucceededAfterSeconds) (int $job.deleteFailedAfterSeconds)) }}
{{- end }}
{{- range $ended }}
{{- $rules = append $rules (dict "policy" "DeleteCluster" "condition" (merge (dict "ttlSeconds" $ttl) .)) }}
{{- end }}
{{- end }}
{{- range $i, $condition := $ended }}
{{- $rules = append $rules (dict "policy" "DeleteSelf" "condition" (merge (dict "ttlSeconds" (index $selfTtls $i)) $condition)) }}
{{- end -}}
deletionRules:
  {{- toYaml $rules | nindent 2 }}
{{- end }}

{{/*
The RayJob's spec: the app's entrypoint on the chart's RayCluster (job.cluster=shared) or on one of its own
(dedicated). A RayCronJob's jobTemplate is the same spec. With job.queueName, created suspended for Kueue.
*/}}
{{- define "ray-detect.rayJobSpec" -}}
{{- $job := .Values.job }}
{{- $disk := include "ray-detect.podDisk" (dict "ctx" . "submitter" true) | fromYaml }}
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
# When KubeRay deletes the job's cluster and the RayJob itself (ray-detect.deletionStrategy).
deletionStrategy:
  {{- include "ray-detect.deletionStrategy" . | nindent 2 }}
{{- if eq $job.cluster "dedicated" }}
# The RayJob creates its own RayCluster from this spec.
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
          {{- include "ray-detect.baseEnv" . | nindent 10 }}
        resources:
          {{- include "ray-detect.withEphemeralStorage" (dict "resources" $job.submitter.resources "mib" $disk.container) | nindent 10 }}
        securityContext:
          {{- include "ray-detect.containerSecurityContext" . | nindent 10 }}
        volumeMounts:
          {{- include "ray-detect.baseVolumeMounts" . | nindent 10 }}
    volumes:
      {{- include "ray-detect.baseVolumes" (dict "disk" $disk "shmSize" $job.submitter.shmSize) | nindent 6 }}
{{- end }}

{{/*
job.actorsPerGpu as a number, checked: a whole number, at least 1, and each enabled group with GPUs has a CPU
per actor (an actor takes one; more are left to decode), so that no actor waits for a CPU that never comes.
*/}}
{{- define "ray-detect.actorsPerGpu" -}}
{{- $actors := include "ray-detect.wholeNumber" (dict "key" "job.actorsPerGpu" "value" .Values.job.actorsPerGpu) | atoi }}
{{- if lt $actors 1 }}
{{- fail (printf "job.actorsPerGpu must be at least 1, not %d" $actors) }}
{{- end }}
{{- range $name, $group := .Values.workerGroups }}
{{- if $group.enabled }}
{{- $gpus := include "ray-detect.gpusPerPod" (dict "name" (printf "workerGroups.%s" $name) "group" $group) | atoi }}
{{- $cpus := include "ray-detect.cpusPerPod" (dict "name" (printf "workerGroups.%s" $name) "group" $group) }}
{{- if and (gt $gpus 0) $cpus (lt (atoi $cpus) (mul $gpus $actors)) }}
{{- fail (printf "job.actorsPerGpu=%d needs %d CPUs in each pod of workerGroups.%s (a CPU per detector actor, %d GPUs), which has %s" $actors (mul $gpus $actors) $name $gpus $cpus) }}
{{- end }}
{{- end }}
{{- end }}
{{- $actors }}
{{- end }}
