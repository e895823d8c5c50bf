{{/* Names ---------------------------------------------------------------- */}}

{{- define "csi-vduse.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 40 | trimSuffix "-" -}}
{{- end -}}

{{- define "csi-vduse.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 40 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "csi-vduse.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (printf "%s-node" (include "csi-vduse.fullname" .)) .Values.serviceAccount.name -}}
{{- else -}}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "csi-vduse.controllerServiceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (printf "%s-controller" (include "csi-vduse.fullname" .)) .Values.serviceAccount.controllerName -}}
{{- else -}}
{{- required "serviceAccount.controllerName is required when serviceAccount.create is false" .Values.serviceAccount.controllerName -}}
{{- end -}}
{{- end -}}

{{/* Labels --------------------------------------------------------------- */}}

{{- define "csi-vduse.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
app.kubernetes.io/name: {{ include "csi-vduse.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: csi-vduse
{{- end -}}

{{- define "csi-vduse.selectorLabels" -}}
app.kubernetes.io/name: {{ include "csi-vduse.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: node
{{- end -}}

{{- define "csi-vduse.controllerSelectorLabels" -}}
app.kubernetes.io/name: {{ include "csi-vduse.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: controller
{{- end -}}

{{/* Images: (list <image values> <default tag>) -> repository:tag or repository@digest */}}
{{- define "csi-vduse.image" -}}
{{- $image := index . 0 -}}
{{- $defaultTag := index . 1 -}}
{{- if $image.digest -}}
{{- printf "%s@%s" $image.repository $image.digest -}}
{{- else -}}
{{- printf "%s:%s" $image.repository (default $defaultTag $image.tag) -}}
{{- end -}}
{{- end -}}

{{/* Paths ---------------------------------------------------------------- */}}

{{/* The CSI socket's directory on the host: kubelet finds the driver there. */}}
{{- define "csi-vduse.socketDir" -}}
{{- printf "%s/plugins/%s" .Values.kubeletDir .Values.driverName -}}
{{- end -}}

{{/* The CSI socket as the kubelet sees it (the plugin's --kubelet-endpoint). */}}
{{- define "csi-vduse.kubeletSocket" -}}
{{- printf "%s/csi.sock" (include "csi-vduse.socketDir" .) -}}
{{- end -}}

{{/* The same socket inside the pod: socket-dir is mounted at /csi in every container. */}}
{{- define "csi-vduse.podSocket" -}}
/csi/csi.sock
{{- end -}}

{{/* Security context of the sidecars: unprivileged, every capability dropped. They run as
uid 0 only because the plugin creates the CSI socket with mode 0600 owned by root. */}}
{{- define "csi-vduse.sidecarSecurityContext" -}}
runAsUser: 0
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
capabilities:
  drop:
    - ALL
seccompProfile:
  type: RuntimeDefault
{{- end -}}
