{{/* Chart name, truncated to the 63 characters of a DNS label. */}}
{{- define "ctrl.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Release-scoped full name for resources without an explicit name. */}}
{{- define "ctrl.fullname" -}}
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

{{- define "ctrl.selectorLabels" -}}
app.kubernetes.io/name: {{ include "ctrl.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "ctrl.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "ctrl.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: ctrl-pipeline
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* The project image: repository@digest when a digest is set, else repository:tag. */}}
{{- define "ctrl.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (required "image.tag or image.digest is required" .Values.image.tag) }}
{{- end }}
{{- end }}

{{/* Pod-level security: non-root (the image's UID 1000), RuntimeDefault seccomp. */}}
{{- define "ctrl.podSecurityContext" -}}
runAsNonRoot: true
runAsUser: 1000
runAsGroup: 1000
fsGroup: 1000
seccompProfile:
  type: RuntimeDefault
{{- end }}

{{/* Container-level security: read-only root filesystem, no privilege escalation, every capability dropped. */}}
{{- define "ctrl.containerSecurityContext" -}}
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
runAsNonRoot: true
capabilities:
  drop: ["ALL"]
{{- end }}

{{/* A Secret reference of .Values.secrets by key, failing clearly when it has no name. Args: (list $ key what) */}}
{{- define "ctrl.secretEnv" -}}
{{- $root := index . 0 }}{{- $key := index . 1 }}{{- $what := index . 2 }}
{{- $ref := index $root.Values.secrets $key | default dict }}
{{- if not $ref }}
{{- fail (printf "%s: secrets.%s is not defined" $what $key) }}
{{- end }}
{{- if not $ref.name }}
{{- fail (printf "secrets.%s.name: missing Secret name (used by %s)" $key $what) }}
{{- end }}
{{- range $env, $secretKey := $ref.env }}
- name: {{ $env }}
  valueFrom:
    secretKeyRef:
      name: {{ $ref.name }}
      key: {{ $secretKey }}
      optional: {{ $ref.optional | default false }}
{{- end }}
{{- end }}
