{{- define "el.name" -}}
{{- .Values.nameOverride | default .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "el.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := include "el.name" . -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "el.selectorLabels" -}}
app.kubernetes.io/name: {{ include "el.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "el.labels" -}}
{{ include "el.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{/* log4Net.level onto the listener's log filter. */}}
{{- define "el.logLevel" -}}
{{- $level := lower (toString .Values.log4Net.level) -}}
{{- $map := dict "all" "trace" "trace" "trace" "debug" "debug" "info" "info" "warn" "warn" "warning" "warn" "error" "error" "fatal" "error" "off" "off" -}}
{{- get $map $level | default "info" -}}
{{- end -}}

{{- define "el.secretKeyName" -}}
{{- .Values.secretKey.existingSecret | default (printf "%s-secret-key" (include "el.fullname" .)) -}}
{{- end -}}

{{- define "el.apiTokenName" -}}
{{- .Values.apiToken.existingSecret | default (printf "%s-api-token" (include "el.fullname" .)) -}}
{{- end -}}

{{/* The listener's URL as Creatio should be given it. */}}
{{- define "el.serviceUri" -}}
{{- if and .Values.ingress.enabled .Values.ApiUrl -}}
{{- printf "%s://%s%s%s/api/listeners" (ternary "https" "http" (gt (len .Values.ingress.tls) 0)) .Values.ApiUrl (trimSuffix "/" .Values.ingress.path) (include "el.tokenSegment" .) -}}
{{- else if eq .Values.service.type "NodePort" -}}
{{- printf "http://<node address>:%v%s/api/listeners" (.Values.service.nodePort | default "<node port>") (include "el.tokenSegment" .) -}}
{{- else -}}
{{- printf "http://%s.%s.svc.cluster.local:%v%s/api/listeners" (include "el.fullname" .) .Release.Namespace .Values.service.port (include "el.tokenSegment" .) -}}
{{- end -}}
{{- end -}}

{{- define "el.tokenSegment" -}}
{{- if .Values.apiToken.enabled -}}/<token>{{- end -}}
{{- end -}}
