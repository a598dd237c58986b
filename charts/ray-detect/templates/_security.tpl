{{/*
Security: the Pod Security Standards "restricted" securityContexts and the autoscaler's projected
Kubernetes token, the only one any container of the release gets.
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
The autoscaler's Kubernetes token. No container of the release gets the kubelet's automounted token: the
head pod carries this projected volume (a short-lived token of the release's ServiceAccount, which
KubeRay's Role lets patch pods and RayClusters, with the cluster's CA and the namespace, the files the
kubelet would mount), and only the autoscaler sidecar mounts it, through autoscalerOptions.volumeMounts,
at the path Ray's autoscaler reads (again every minute, so the rotated token is picked up). The ray-head
container (driver, dashboard, Jobs API) cannot read it. Its lifetime is autoscaling.tokenExpirationSeconds,
which the API server honours as asked, except 3607 s: the kubelet's own automounted tokens ask for exactly
that, and an API server with --service-account-extend-token-expiration (the default) makes such a token
valid for a year. The schema refuses 3607.
*/}}
{{- define "ray-detect.autoscalerTokenVolume" -}}
- name: autoscaler-token
  projected:
    sources:
      - serviceAccountToken:
          path: token
          expirationSeconds: {{ .Values.autoscaling.tokenExpirationSeconds }}
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
Credentials in values
A URI in a value (a Hydra override such as data.path=..., output.path=..., model.weights=...; s3.endpointUrl)
must hold no credential: the chart writes values into objects that many can read (the RayJob's
entrypoint, the pods' env) and the app records its overrides. The forms are those that the app refuses
(app/credentials.py, which `ray-detect run` and `ray-detect submit` use): user-info with a password,
`scheme://user:password@host` (the user may be empty, the password may hold slashes), except where the
text after ":" is a port and a path (`https://host:8080/a@b`) on a scheme whose host may have a port (not
the object stores, whose host is a bucket); and a query parameter holding a secret or a signature.
*/}}

{{/* Query parameters whose value is a secret or a signature that grants access, as in app/credentials.py. */}}
{{- define "ray-detect.secretQueryParameters" -}}
X-Amz-Signature|X-Amz-Credential|X-Amz-Security-Token|X-Goog-Signature|X-Goog-Credential|sig|client_secret|access_token|token|password
{{- end }}

{{/*
The form of the first credential a text holds, in words that do not repeat it ("user:password@ in its
URI", "X-Amz-Signature= in its query string"); empty when it holds none. Each "://" starts a URI when a
scheme ends just before it; its authority runs to the first blank, quote, "?" or "#".
*/}}
{{- define "ray-detect.credentialForm" -}}
{{- $text := toString . }}
{{- $objectStores := list "s3" "s3a" "s3n" "gs" "gcs" "abfs" "abfss" "az" "adl" }}
{{- $pieces := splitList "://" $text }}
{{- $form := "" }}
{{- range $i, $piece := $pieces }}
{{- $scheme := "" }}
{{- if and (not $form) (gt $i 0) }}
{{- $scheme = regexFind "[A-Za-z][A-Za-z0-9+.-]*$" (index $pieces (sub $i 1)) | lower }}
{{- end }}
{{- if $scheme }}
{{- $authority := regexReplaceAll "(?s)[\\s'\"?#].*$" (join "://" (slice $pieces $i)) "" }}
{{- $userInfo := regexReplaceAll "@[^@]*$" $authority "" }}
{{- if and (contains "@" $authority) (contains ":" $userInfo) (not (contains "://" $userInfo)) }}
{{- $user := regexReplaceAll ":.*$" $userInfo "" }}
{{- $secret := regexReplaceAll "^[^:]*:" $userInfo "" }}
{{- if and $secret (not (contains "/" $user)) }}
{{- /* "host:port/path@..." on a scheme with ports: the "@" is the path's. */}}
{{- $port := regexReplaceAll "^0+([0-9])" (regexReplaceAll "/.*$" $secret "") "${1}" }}
{{- $isPort := or (eq $port "") (and (regexMatch "^[0-9]{1,5}$" $port) (le (atoi $port) 65535)) }}
{{- if not (and (contains "/" $secret) (not (has $scheme $objectStores)) $isPort) }}
{{- $form = "user:password@ in its URI" }}
{{- end }}
{{- end }}
{{- end }}
{{- end }}
{{- end }}
{{- if not $form }}
{{- with regexFind (printf "(?i)[?&;](%s)=[^&#\\s]" (include "ray-detect.secretQueryParameters" .)) $text }}
{{- $form = printf "%s= in its query string" (regexReplaceAll "^[?&;]([^=]*)=.*$" . "${1}") }}
{{- end }}
{{- end }}
{{- $form }}
{{- end }}

{{/*
Fail, in one line that names where and the form but never repeats the value, when a value holds a
credential. Call with (dict "where" "s3.endpointUrl" "value" .Values.s3.endpointUrl).
*/}}
{{- define "ray-detect.refuseCredentials" -}}
{{- with include "ray-detect.credentialForm" .value }}
{{- fail (printf "%s holds credentials (%s); give them to the pods through a Secret (s3.credentialsSecret, or env valueFrom) instead" $.where .) }}
{{- end }}
{{- end }}
