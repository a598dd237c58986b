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
