{{/* The release's base name: the release name, or <release>-darkcore when it lacks "darkcore". */}}
{{- define "darkcore.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 50 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 50 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "darkcore.operator" -}}
{{- printf "%s-operator" (include "darkcore.fullname" .) -}}
{{- end -}}

{{- define "darkcore.serviceAccount" -}}
{{- default (include "darkcore.operator" .) .Values.serviceAccount.name -}}
{{- end -}}

{{- define "darkcore.gatewayService" -}}
{{- printf "%s-gateway" (include "darkcore.fullname" .) -}}
{{- end -}}

{{- define "darkcore.labels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{- end -}}

{{- define "darkcore.selectorLabels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end -}}
