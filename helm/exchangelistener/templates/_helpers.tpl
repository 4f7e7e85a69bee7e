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

{{/* A memory quantity in whole Mi, or 0 where it is not written as a whole number of bytes,
     Ki, Mi, Gi, k, M or G (then no check is made). */}}
{{- define "el.mebibytes" -}}
{{- $q := toString . -}}
{{- if not (regexMatch "^[0-9]+(Ki|Mi|Gi|k|M|G)?$" $q) -}}0
{{- else if hasSuffix "Gi" $q -}}{{ mul (trimSuffix "Gi" $q | int64) 1024 }}
{{- else if hasSuffix "Mi" $q -}}{{ trimSuffix "Mi" $q | int64 }}
{{- else if hasSuffix "Ki" $q -}}{{ div (trimSuffix "Ki" $q | int64) 1024 }}
{{- else if hasSuffix "G" $q -}}{{ div (mul (trimSuffix "G" $q | int64) 1000000000) 1048576 }}
{{- else if hasSuffix "M" $q -}}{{ div (mul (trimSuffix "M" $q | int64) 1000000) 1048576 }}
{{- else if hasSuffix "k" $q -}}{{ div (mul (trimSuffix "k" $q | int64) 1000) 1048576 }}
{{- else -}}{{ div ($q | int64) 1048576 }}
{{- end -}}
{{- end -}}

{{/* The memory (Mi) a replica holding this many mailboxes may take: 64 Mi and 56 KiB each. */}}
{{- define "el.neededMebibytes" -}}
{{- add 64 (div (add (mul (int .) 56) 1023) 1024) -}}
{{- end -}}

{{/* How many mailboxes fit in this many Mi. */}}
{{- define "el.mailboxesWithin" -}}
{{- max 0 (div (mul (sub (int .) 64) 1024) 56) -}}
{{- end -}}

{{/* listenAddress and a port as the listener takes them: an IPv6 address in brackets. */}}
{{- define "el.listen" -}}
{{- $address := index . 0 -}}
{{- if contains ":" $address -}}[{{ $address }}]:{{ index . 1 }}{{- else -}}{{ $address }}:{{ index . 1 }}{{- end -}}
{{- end -}}

{{/* The Creatio hosts mail may be posted to, comma-separated; empty for any. */}}
{{- define "el.creatioHosts" -}}
{{- if .Values.creatio.hosts -}}
{{- join "," .Values.creatio.hosts -}}
{{- else if and .Values.creatio.hostsFromApiUrl .Values.ApiUrl -}}
{{- regexReplaceAll ":[0-9]+$" .Values.ApiUrl "" -}}
{{- end -}}
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
