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

{{/* An image reference, (dict "root" . "image" .Values.images.app): repository@digest when a digest is
given (exactly that build on every node), else repository:tag (tag "" = the chart's appVersion). */}}
{{- define "doppel.image" -}}
{{- if .image.digest -}}
{{- printf "%s@%s" .image.repository .image.digest -}}
{{- else -}}
{{- printf "%s:%s" .image.repository (.image.tag | default .root.Chart.AppVersion) -}}
{{- end -}}
{{- end -}}

{{/* The doppel image (operator and bot), the train worker image and the CPU worker image (scrape, cleanup). */}}
{{- define "doppel.appImage" -}}
{{- include "doppel.image" (dict "root" . "image" .Values.images.app) -}}
{{- end -}}
{{- define "doppel.workerImage" -}}
{{- include "doppel.image" (dict "root" . "image" .Values.images.worker) -}}
{{- end -}}
{{- define "doppel.workerCpuImage" -}}
{{- include "doppel.image" (dict "root" . "image" .Values.images.workerCpu) -}}
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

{{/* Security settings of every container (Pod Security "restricted"): non-root, no privilege escalation,
no capabilities, RuntimeDefault seccomp; a read-only root filesystem unless (dict "writableRoot" true). */}}
{{- define "doppel.containerSecurity" -}}
allowPrivilegeEscalation: false
readOnlyRootFilesystem: {{ not (and (kindIs "map" .) .writableRoot) }}
runAsNonRoot: true
capabilities:
  drop: ["ALL"]
seccompProfile: {type: RuntimeDefault}
{{- end -}}

{{/* A pod's securityContext, (dict "root" . "values" .Values.bot.podSecurityContext "volume" false): the
top-level podSecurityContext, storage.fsGroup for pods that mount the shared volume, then the component's. */}}
{{- define "doppel.podSecurityContext" -}}
{{- $context := deepCopy .root.Values.podSecurityContext -}}
{{- if and .volume (ne .root.Values.storage.fsGroup nil) -}}
{{- $_ := set $context "fsGroup" (int .root.Values.storage.fsGroup) -}}
{{- $_ := set $context "fsGroupChangePolicy" "OnRootMismatch" -}}
{{- end -}}
{{- toYaml (mustMergeOverwrite $context (deepCopy (.values | default dict))) -}}
{{- end -}}

{{/* NO_PROXY: the cluster's own names (API server, Services, pods by IP are reached directly), then proxy.noProxy. */}}
{{- define "doppel.noProxy" -}}
{{- $hosts := list "localhost" "127.0.0.1" "::1" ".svc" ".svc.cluster.local" ".cluster.local" "kubernetes.default.svc" (include "doppel.componentName" (dict "root" . "component" "vllm")) -}}
{{- with .Values.proxy.noProxy }}{{ $hosts = append $hosts . }}{{ end -}}
{{- join "," $hosts -}}
{{- end -}}

{{/* Environment entries of a container, (dict "root" . "values" .Values.bot): the proxy variables when the
component's useProxy is on and a proxy is set (upper and lower case: libraries read either), then its
extraEnv. A list, as YAML; empty when there is nothing to add. */}}
{{- define "doppel.extraEnv" -}}
{{- $env := list -}}
{{- $proxy := .root.Values.proxy -}}
{{- if and .values.useProxy (or $proxy.httpProxy $proxy.httpsProxy) -}}
{{- $noProxy := include "doppel.noProxy" .root -}}
{{- range $name, $value := dict "HTTP_PROXY" $proxy.httpProxy "HTTPS_PROXY" $proxy.httpsProxy "NO_PROXY" $noProxy -}}
{{- if $value -}}
{{- $env = append $env (dict "name" $name "value" $value) -}}
{{- $env = append $env (dict "name" (lower $name) "value" $value) -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- $env = concat $env (.values.extraEnv | default list) -}}
{{- if $env }}{{ toYaml $env }}{{ end -}}
{{- end -}}

{{/* Names of images.pullSecrets, comma-separated (the operator passes them on to the Job pods). */}}
{{- define "doppel.pullSecretNames" -}}
{{- $names := list -}}
{{- range .Values.images.pullSecrets -}}
{{- $names = append $names (.name | default .) -}}
{{- end -}}
{{- join "," $names -}}
{{- end -}}
