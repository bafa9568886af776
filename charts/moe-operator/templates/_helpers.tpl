{{- define "moe-operator.fullname" -}}
{{- if contains .Chart.Name .Release.Name }}{{ .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}{{ printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" }}{{ end }}
{{- end }}

{{- define "moe-operator.serviceAccountName" -}}
{{- default (include "moe-operator.fullname" .) .Values.serviceAccount.name }}
{{- end }}

{{- define "moe-operator.labels" -}}
app.kubernetes.io/name: moe-operator
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end }}

{{- define "moe-operator.selectorLabels" -}}
app.kubernetes.io/name: moe-operator
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- /* An image reference from {repository, tag, digest}: the digest wins, the tag defaults to appVersion. */}}
{{- define "moe-operator.image" -}}
{{- $img := index . 0 -}}{{- $ctx := index . 1 -}}
{{- if $img.digest -}}
{{- printf "%s@%s" $img.repository $img.digest -}}
{{- else -}}
{{- printf "%s:%s" $img.repository (default $ctx.Chart.AppVersion $img.tag) -}}
{{- end -}}
{{- end }}

{{- /* Restricted Pod Security: the container half (the pod half is in each pod spec). */}}
{{- define "moe-operator.containerSecurityContext" -}}
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
runAsNonRoot: true
capabilities: {drop: [ALL]}
seccompProfile: {type: RuntimeDefault}
{{- end }}

{{- define "moe-operator.podSecurityContext" -}}
runAsNonRoot: true
runAsUser: 65532
runAsGroup: 65532
seccompProfile: {type: RuntimeDefault}
{{- end }}
