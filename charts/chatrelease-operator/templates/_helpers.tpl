{{/* Names and labels shared by every template. */}}

{{- define "chatrelease-operator.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* The release's full name; "<release>-chatrelease-operator", or the release name when it already says so. */}}
{{- define "chatrelease-operator.fullname" -}}
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

{{- define "chatrelease-operator.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* What selects the operator's pods; never changes between upgrades (Deployment selectors are immutable). */}}
{{- define "chatrelease-operator.selectorLabels" -}}
app.kubernetes.io/name: {{ include "chatrelease-operator.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "chatrelease-operator.labels" -}}
helm.sh/chart: {{ include "chatrelease-operator.chart" . }}
{{ include "chatrelease-operator.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/component: operator
app.kubernetes.io/part-of: chatrelease
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- define "chatrelease-operator.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "chatrelease-operator.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "chatrelease-operator.leaseNamespace" -}}
{{- default .Release.Namespace .Values.leaderElection.namespace }}
{{- end }}

{{- define "chatrelease-operator.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}
{{- end }}

{{/* One Lease per release, so two installs in one namespace elect their leaders apart. */}}
{{- define "chatrelease-operator.leaseName" -}}
{{- include "chatrelease-operator.fullname" . }}
{{- end }}
