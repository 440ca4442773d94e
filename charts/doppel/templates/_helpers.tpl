{{/* Release-scoped name prefix, at most 63 characters (a DNS label). */}}
{{- define "doppel.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{/* Name of one component's objects, e.g. "<release>-doppel-operator". */}}
{{- define "doppel.componentName" -}}
{{- printf "%s-%s" (include "doppel.fullname" .root) .component | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Labels on every object; "doppel.labels" adds the instance, which component objects get from their
selector labels instead (a key twice in one mapping is invalid YAML). */}}
{{- define "doppel.commonLabels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: doppel
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
{{- end -}}

{{- define "doppel.labels" -}}
{{ include "doppel.commonLabels" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{/* Labels of a component's Deployment and pods: (dict "root" . "component" "vllm"). */}}
{{- define "doppel.componentLabels" -}}
{{ include "doppel.commonLabels" .root }}
{{ include "doppel.selectorLabels" . }}
{{- end -}}

{{/* Selector labels of one component. `vllm` uses the name the DoppelUser's default vLLM selector matches. */}}
{{- define "doppel.selectorLabels" -}}
app.kubernetes.io/name: {{ ternary "vllm" "doppel" (eq .component "vllm") }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{/* The doppel image (operator and bot) and the worker image (scrape and train Jobs). */}}
{{- define "doppel.appImage" -}}
{{- printf "%s:%s" .Values.images.app.repository (.Values.images.app.tag | default .Chart.AppVersion) -}}
{{- end -}}
{{- define "doppel.workerImage" -}}
{{- printf "%s:%s" .Values.images.worker.repository (.Values.images.worker.tag | default .Chart.AppVersion) -}}
{{- end -}}

{{- define "doppel.claimName" -}}
{{- .Values.storage.existingClaim | default (include "doppel.componentName" (dict "root" . "component" "data")) -}}
{{- end -}}

{{- define "doppel.slackSecretName" -}}
{{- .Values.slack.existingSecret | default (include "doppel.componentName" (dict "root" . "component" "slack")) -}}
{{- end -}}

{{/* The model name vLLM serves the base model under (what DoppelUser spec.baseModel.servedName must say). */}}
{{- define "doppel.servedModelName" -}}
{{- .Values.model.servedName | default .Values.model.name -}}
{{- end -}}

{{/* Pod security settings shared by the doppel containers: non-root, read-only root, no privileges. */}}
{{- define "doppel.containerSecurity" -}}
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
runAsNonRoot: true
capabilities:
  drop: ["ALL"]
{{- end -}}

{{/* Names of images.pullSecrets, comma-separated (the operator passes them on to the Job pods). */}}
{{- define "doppel.pullSecretNames" -}}
{{- $names := list -}}
{{- range .Values.images.pullSecrets -}}
{{- $names = append $names (.name | default .) -}}
{{- end -}}
{{- join "," $names -}}
{{- end -}}
