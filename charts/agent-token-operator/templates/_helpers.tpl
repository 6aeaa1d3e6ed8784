{{- define "ato.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "ato.serviceAccountName" -}}
{{- default (include "ato.fullname" .) .Values.serviceAccount.name -}}
{{- end -}}

{{- define "ato.selectorLabels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "ato.labels" -}}
{{ include "ato.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{/* Rules on namespaced objects: a ClusterRole's in cluster-wide mode, one Role's per watched namespace otherwise. */}}
{{- define "ato.namespacedRules" -}}
- apiGroups: [agenttoken.dev]
  resources: [agenttokens]
  verbs: [get, list, watch, patch]
- apiGroups: [agenttoken.dev]
  resources: [agenttokens/status]
  verbs: [patch]
# patch: the jwt issuer records the JWKS ConfigMap it created (its UID and
# the key ids it published) in an annotation on the issuer.
- apiGroups: [agenttoken.dev]
  resources: [tokenissuers]
  verbs: [get, list, watch, patch]
- apiGroups: [agenttoken.dev]
  resources: [tokenissuers/status]
  verbs: [patch]
# The token Secrets and token-binding Secrets (watched by label, metadata only).
- apiGroups: [""]
  resources: [secrets]
  verbs: [get, list, watch, create, patch, delete]
# TokenRequest only: whether the ServiceAccount exists is its answer (no
# read of ServiceAccounts before a mint).
- apiGroups: [""]
  resources: [serviceaccounts/token]
  verbs: [create]
# Revocation drills: whether the API server still accepts a drilled
# serviceAccount token (the token under test, nothing else).
- apiGroups: [authentication.k8s.io]
  resources: [tokenreviews]
  verbs: [create]
# jwt issuer: the JWKS ConfigMap it publishes (watched by name, so a
# mint does not read it).
- apiGroups: [""]
  resources: [configmaps]
  verbs: [get, list, watch, create, patch]
# Consumers: known from a watch (list, watch: the operator's workload index),
# restarted by a pod-template annotation (patch). get shows nothing list does not.
- apiGroups: [apps]
  resources: [deployments, statefulsets, daemonsets]
  verbs: [get, list, watch, patch]
- apiGroups: [events.k8s.io]
  resources: [events]
  verbs: [create, patch]
{{- if or .Values.usage.auditWebhook.enabled .Values.usage.vaultAudit.enabled }}
# Usage: a token's use from a new address is expected when a Pod with that
# address (a status.podIP field selector) uses the Secret; before a token is
# called Unused, no Pod, Job or CronJob of the namespace may use its Secret
# (listed at most every 30 s per namespace, only then).
- apiGroups: [""]
  resources: [pods]
  verbs: [list]
- apiGroups: [batch]
  resources: [jobs, cronjobs]
  verbs: [list]
{{- end }}
{{- if .Values.consumers.signal }}
- apiGroups: [""]
  resources: [pods]
  # patch: the revision annotation that makes the kubelet refresh the volume.
  verbs: [list, patch]
- apiGroups: [""]
  resources: [pods/exec]
  # create: exec over SPDY and (with newer API servers) over WebSocket; get: WebSocket on older ones.
  verbs: [create, get]
{{- end }}
{{- end -}}

{{/* Whether the usage HTTPS listener runs (audit webhook or introspection). */}}
{{- define "ato.usageHttps" -}}
{{- if or .Values.usage.auditWebhook.enabled .Values.usage.introspection.enabled }}true{{ end -}}
{{- end }}

{{/* Whether any usage port is open. */}}
{{- define "ato.usagePorts" -}}
{{- if or (include "ato.usageHttps" .) .Values.usage.vaultAudit.enabled }}true{{ end -}}
{{- end }}
