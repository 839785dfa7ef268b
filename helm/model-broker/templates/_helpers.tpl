{{/* Names and labels. */}}
{{- define "model-broker.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "model-broker.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 40 | trimSuffix "-" }}
{{- else if contains (include "model-broker.name" .) .Release.Name }}
{{- .Release.Name | trunc 40 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name (include "model-broker.name" .) | trunc 40 | trimSuffix "-" }}
{{- end }}
{{- end }}

{{- define "model-broker.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
{{ include "model-broker.selectorLabels" . }}
{{- end }}

{{/* Selector labels of one component: call with (dict "root" $ "component" "broker"). */}}
{{- define "model-broker.componentLabels" -}}
app.kubernetes.io/name: {{ include "model-broker.name" .root }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{- define "model-broker.selectorLabels" -}}
app.kubernetes.io/name: {{ include "model-broker.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "model-broker.image" -}}
{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}
{{- end }}

{{- define "model-broker.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "model-broker.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* The headless Service Envoy resolves: every broker pod, every worker port. */}}
{{- define "model-broker.brokerHost" -}}
{{ include "model-broker.fullname" . }}-broker.{{ .Release.Namespace }}.svc.{{ .Values.clusterDomain }}
{{- end }}

{{/* The control plane's Service: every Envoy and broker pod connects to this one pod. */}}
{{- define "model-broker.controlPlaneHost" -}}
{{ include "model-broker.fullname" . }}-control-plane.{{ .Release.Namespace }}.svc.{{ .Values.clusterDomain }}
{{- end }}

{{/* The Secret holding the control plane's admin token (key `token`): yours, or the one the chart generates. */}}
{{- define "model-broker.adminTokenSecret" -}}
{{- .Values.controlPlane.adminToken.existingSecret | default (printf "%s-admin-token" (include "model-broker.fullname" .)) }}
{{- end }}

{{- define "model-broker.adminTokenEnv" -}}
- name: MODEL_BROKER_ADMIN_TOKEN
  valueFrom:
    secretKeyRef:
      name: {{ include "model-broker.adminTokenSecret" . }}
      key: token
{{- end }}

{{/* Where the Envoy pod mounts the listener's TLS Secret and the JWKS ConfigMap (no other pod does). */}}
{{- define "model-broker.tlsDir" -}}
/etc/model-broker-tls
{{- end }}

{{- define "model-broker.jwksDir" -}}
/etc/model-broker-jwks
{{- end }}

{{/* The control plane's volume: live weights, and its events and shadow logs beside them. */}}
{{- define "model-broker.stateDir" -}}
/var/lib/model-broker
{{- end }}

{{/* Which feature store: Feast's Redis as registry.feature_store.feast declares it, the bundled
Redis, an external one (one Redis or a Redis Cluster), or the embedded JSON document. */}}
{{- define "model-broker.featureStore" -}}
{{- $store := omit (deepCopy .Values.registry.feature_store) "redis" "embedded" }}
{{- if .Values.registry.feature_store.feast }}
{{- else if .Values.redis.enabled }}
{{- $_ := set $store "redis" (dict "url" (printf "redis://%s-redis:6379/0" (include "model-broker.fullname" .))) }}
{{- else if .Values.externalRedis.url }}
{{- $_ := set $store "redis" (dict "url" .Values.externalRedis.url "redis_type" (.Values.externalRedis.redisType | default "redis")) }}
{{- else }}
{{- $_ := set $store "embedded" (dict "path" "features.json") }}
{{- end }}
{{- toYaml $store }}
{{- end }}

{{- define "model-broker.embedded" -}}
{{- and (not .Values.registry.feature_store.feast) (not .Values.redis.enabled) (not .Values.externalRedis.url) }}
{{- end }}

{{/*
The registry the pods load: the values' registry with what the chart decides set
(listener and admin of Envoy, the broker's bind address and port, the control
plane's ports and state file, the feature store). With modelSource=resources
this is the reconciler's base: models come from Model resources.
*/}}
{{- define "model-broker.registry" -}}
{{- $reg := omit (deepCopy .Values.registry) "listener" "admin" "feature_store" "metrics" "control_plane" "audit" }}
{{- $_ := set $reg "metrics" (dict "address" "0.0.0.0" "port" (int .Values.broker.metricsPort)) }}
{{- $listener := dict "address" "0.0.0.0" "port" (int .Values.envoy.port) }}
{{- with .Values.envoy.tls.secretName }}
{{- $tls := include "model-broker.tlsDir" $ }}
{{- $_ := set $listener "tls" (dict "certificate_chain" (printf "%s/tls.crt" $tls) "private_key" (printf "%s/tls.key" $tls)) }}
{{- end }}
{{- $_ := set $reg "listener" $listener }}
{{- $plane := dict "address" "0.0.0.0" "port" (int .Values.controlPlane.port) "admin_port" (int .Values.controlPlane.adminPort) "feedback_port" (int .Values.controlPlane.feedbackPort) }}
{{- $_ := set $plane "state_file" (printf "%s/rollout-state.json" (include "model-broker.stateDir" .)) }}
{{- $_ := set $reg "control_plane" $plane }}
{{- /* A JWKS file can only come from the ConfigMap the Envoy pod mounts: say so now, not as a crash-looping init container. */}}
{{- $jwks := printf "%s/" (include "model-broker.jwksDir" .) }}
{{- range $i, $consumer := .Values.registry.consumers }}
{{- $file := dig "jwt" "jwks_file" "" $consumer }}
{{- if and $file (or (not $.Values.envoy.jwksConfigMap) (not (hasPrefix $jwks $file))) }}
{{- fail (printf "registry.consumers[%d].jwt.jwks_file: set envoy.jwksConfigMap and name one of its keys as %s<key> (got %q)" $i $jwks $file) }}
{{- end }}
{{- end }}
{{- $_ := set $reg "admin" (dict "address" "127.0.0.1" "port" (int .Values.envoy.adminPort)) }}
{{- $broker := deepCopy (default (dict) .Values.registry.broker) }}
{{- $_ := set $broker "address" "0.0.0.0" }}
{{- $_ := set $broker "port" (int .Values.broker.port) }}
{{- $_ := set $broker "http_port" (int .Values.broker.httpPort) }}
{{- $_ := set $broker "workers" (int .Values.broker.workers) }}
{{- $_ := set $reg "broker" $broker }}
{{- $_ := set $reg "feature_store" (include "model-broker.featureStore" . | fromYaml) }}
{{- with .Values.registry.audit }}
{{- /* Per-pod JSONL files would scatter the trail over pods that come and go: AWS only here. */}}
{{- if not (dig "sink" "aws" "" .) }}
{{- fail "registry.audit.sink: on Kubernetes use the aws sink (S3 + DynamoDB); the local sink writes inside one pod" }}
{{- end }}
{{- $audit := deepCopy . }}
{{- $spool := deepCopy (default (dict) $audit.spool) }}
{{- $_ := set $spool "dir" (include "model-broker.spoolDir" $) }}
{{- $_ := set $audit "spool" $spool }}
{{- $_ := set $reg "audit" $audit }}
{{- end }}
{{- if eq .Values.modelSource "resources" }}
{{- $_ := set $reg "models" (list) }}
{{- end }}
{{- toYaml $reg }}
{{- end }}

{{/* The broker's audit spool: every record lands here before its response is released. */}}
{{- define "model-broker.spoolDir" -}}
/var/spool/model-broker
{{- end }}

{{/* `envoy-config` as the Envoy pod runs it: once before Envoy starts, then `--watch`ing beside it. */}}
{{- define "model-broker.envoyConfigArgs" -}}
- envoy-config
- --config
- /etc/model-broker/registry.yaml
- --broker-host
- {{ include "model-broker.brokerHost" . }}
- --control-plane-host
- {{ include "model-broker.controlPlaneHost" . }}
- --stats-port
- {{ .Values.envoy.statsPort | quote }}
- --xds-dir
- /etc/envoy
{{- end }}

{{- define "model-broker.envoyConfigMounts" -}}
- {name: registry, mountPath: /etc/model-broker, readOnly: true}
- {name: envoy-config, mountPath: /etc/envoy}
# envoy-config runs the pod's Envoy once on a probe config (is the http_service fast path open?).
- {name: tmp, mountPath: /tmp}
{{- with (include "model-broker.envoyFileMounts" .) }}
{{ . | trim }}
{{- end }}
{{- end }}

{{/*
Rolls the pods only for what they cannot follow live: the registry without the
sections broker, control plane and Envoy's watcher reload from the mounted file
(extproc/registry/load.py LIVE_SECTIONS).
*/}}
{{- define "model-broker.restartChecksum" -}}
{{- omit (include "model-broker.registry" . | fromYaml) "registry_version" "entities" "models" "ensembles" | toYaml | sha256sum }}
{{- end }}

{{/* ConfigMap the pods read registry.yaml from: the chart's, or the reconciler's. */}}
{{- define "model-broker.registryConfigMap" -}}
{{ include "model-broker.fullname" . }}-registry
{{- end }}

{{/* The registry (and embedded features) as one directory, /etc/model-broker. */}}
{{- define "model-broker.registryVolume" -}}
- name: registry
  projected:
    sources:
      - configMap:
          name: {{ include "model-broker.registryConfigMap" . }}
          items: [{key: registry.yaml, path: registry.yaml}]
      {{- if eq (include "model-broker.embedded" .) "true" }}
      - configMap:
          name: {{ include "model-broker.fullname" . }}-features
          items: [{key: features.json, path: features.json}]
      {{- end }}
- name: tmp
  emptyDir: {}
{{- end }}

{{/*
The listener's certificate and the JWT consumers' key sets: only Envoy reads them, so
only the Envoy pod mounts them (the private key is in no other pod).
*/}}
{{- define "model-broker.envoyFileMounts" -}}
{{- if .Values.envoy.tls.secretName }}
- {name: tls, mountPath: {{ include "model-broker.tlsDir" . }}, readOnly: true}
{{- end }}
{{- if .Values.envoy.jwksConfigMap }}
- {name: jwks, mountPath: {{ include "model-broker.jwksDir" . }}, readOnly: true}
{{- end }}
{{- end }}

{{- define "model-broker.podSecurityContext" -}}
runAsNonRoot: true
runAsUser: {{ .Values.securityContext.runAsUser }}
runAsGroup: {{ .Values.securityContext.runAsUser }}
fsGroup: {{ .Values.securityContext.runAsUser }}
seccompProfile:
  type: RuntimeDefault
{{- end }}

{{- define "model-broker.containerSecurityContext" -}}
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
runAsNonRoot: true
capabilities:
  drop: [ALL]
{{- end }}

{{/* AWS credentials: IRSA needs nothing here (the ServiceAccount carries the role); a Secret is injected as env. */}}
{{- define "model-broker.awsEnv" -}}
{{- if .Values.aws.region }}
- name: AWS_REGION
  value: {{ .Values.aws.region | quote }}
{{- end }}
{{- end }}

{{- define "model-broker.awsEnvFrom" -}}
{{- if .Values.aws.existingSecret }}
- secretRef:
    name: {{ .Values.aws.existingSecret }}
{{- end }}
{{- end }}

{{- define "model-broker.scheduling" -}}
{{- with .Values.nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .Values.tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .Values.affinity }}
affinity:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .Values.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end }}
