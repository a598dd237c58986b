{{/*
Ray pods: the image of a group, the environment and volumes of every Ray container, and the pod
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

