{{/*
Names and labels: the release's object names, its ServiceAccount and the label sets of every object
and pod template.
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

