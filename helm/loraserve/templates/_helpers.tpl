{{/* Names. */}}
{{- define "loraserve.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "loraserve.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "loraserve.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/*
Labels. Call with (dict "root" $ "component" "gateway").
selectorLabels never change over the release's life; podLabels add nothing that a chart or
image bump changes, so a new chart version does not rebuild the Ray cluster.
*/}}
{{- define "loraserve.selectorLabels" -}}
app.kubernetes.io/name: {{ include "loraserve.name" .root }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "loraserve.podLabels" -}}
{{ include "loraserve.selectorLabels" . }}
app.kubernetes.io/part-of: loraserve
{{- end -}}

{{- define "loraserve.labels" -}}
{{ include "loraserve.podLabels" . }}
helm.sh/chart: {{ include "loraserve.chart" .root }}
app.kubernetes.io/version: {{ .root.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .root.Release.Service }}
{{- end -}}

{{- define "loraserve.image" -}}
{{- $tag := .Values.image.tag | default (printf "%s-%s" .Chart.AppVersion .Values.image.variant) -}}
{{- printf "%s:%s" .Values.image.repository $tag -}}
{{- end -}}

{{- define "loraserve.serveServiceName" -}}
{{- printf "%s-serve" (include "loraserve.fullname" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "loraserve.s3SecretName" -}}
{{- if .Values.secrets.s3.existingSecret -}}
{{- .Values.secrets.s3.existingSecret -}}
{{- else if .Values.devMinio.enabled -}}
{{- printf "%s-minio" (include "loraserve.fullname" .) -}}
{{- end -}}
{{- end -}}

{{- define "loraserve.workerSecretName" -}}
{{- printf "%s-worker-secret" (include "loraserve.fullname" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "loraserve.webhookSecretName" -}}
{{- printf "%s-webhook-signing" (include "loraserve.fullname" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "loraserve.postgresqlSecretName" -}}
{{- if .Values.secrets.postgresql.existingSecret -}}
{{- .Values.secrets.postgresql.existingSecret -}}
{{- else if .Values.devPostgresql.enabled -}}
{{- printf "%s-postgresql" (include "loraserve.fullname" .) -}}
{{- end -}}
{{- end -}}

{{/*
Every setting this release runs with, as YAML: the operator's `settings` with the ones the chart
owns (listening addresses, ports, paths, the object store, the Serve address) on top.
*/}}
{{- define "loraserve.settings" -}}
{{- $managed := dict
  "data_dir" "/data"
  "grpc_host" "0.0.0.0"
  "grpc_port" .Values.gateway.grpcPort
  "http_host" "0.0.0.0"
  "http_port" .Values.gateway.httpPort
  "serve_grpc_host" (include "loraserve.serveServiceName" .)
  "serve_grpc_port" .Values.workers.serveGrpcPort
  "serve_http_port" .Values.workers.serveHttpPort
  "worker_metrics_port" .Values.workers.metricsPort
  "object_store" "s3"
-}}
{{- if .Values.devMinio.enabled -}}
{{- $_ := set $managed "s3_endpoint" (printf "%s-minio:9000" (include "loraserve.fullname" .)) -}}
{{- $_ := set $managed "s3_secure" false -}}
{{- end -}}
{{- if .Values.secrets.gatewayTls.existingSecret -}}
{{- $_ := set $managed "tls_cert_file" "/etc/loraserve/tls/tls.crt" -}}
{{- $_ := set $managed "tls_key_file" "/etc/loraserve/tls/tls.key" -}}
{{- if .Values.secrets.gatewayTls.clientCaKey -}}
{{- $_ := set $managed "tls_client_ca_file" (printf "/etc/loraserve/tls/%s" .Values.secrets.gatewayTls.clientCaKey) -}}
{{- end -}}
{{- end -}}
{{- toYaml (merge $managed (deepCopy .Values.settings)) -}}
{{- end -}}

{{/* A setting's value as an env var's text, as core.config parses it (no 1e+09 floats). */}}
{{- define "loraserve.envValue" -}}
{{- if kindIs "bool" . -}}
{{- ternary "true" "false" . -}}
{{- else if or (kindIs "float64" .) (kindIs "float32" .) -}}
{{- if eq (float64 .) (float64 (int64 .)) -}}{{- int64 . -}}{{- else -}}{{- . -}}{{- end -}}
{{- else -}}
{{- . -}}
{{- end -}}
{{- end -}}

{{/*
The workers' Serve config (Ray's ServeDeploySchema), as serving/serve_config.py's serve_config
renders it for the same settings (tests/chart compares the two): app name and route prefix, the
gRPC proxy with the worker servicer, the deployment's resources and autoscaling, and in `args`
the settings a replica reads. Secrets stay out: the Ray pods get them as env vars.
*/}}
{{- define "loraserve.serveConfig" -}}
{{- /* files/serve-settings.json is serving.serve_config.chart_settings(): python -m serving.serve_config */ -}}
{{- $meta := .Files.Get "files/serve-settings.json" | fromJson -}}
{{- $s := include "loraserve.settings" . | fromYaml -}}
{{- $d := merge (deepCopy $s) $meta.defaults -}}
{{- $args := dict -}}
{{- range $name, $value := $s -}}
{{- if not (has $name $meta.not_args) -}}
{{- $_ := set $args $name $value -}}
{{- end -}}
{{- end -}}
{{- $deployment := dict
  "name" $meta.deployment_name
  "ray_actor_options" (dict "num_cpus" $d.replica_num_cpus "num_gpus" $d.replica_num_gpus)
  "max_ongoing_requests" (add1 (int64 $d.max_ongoing_requests_per_replica))
-}}
{{- if eq (int64 $d.min_replicas) (int64 $d.max_replicas) -}}
{{- $_ := set $deployment "num_replicas" (int64 $d.max_replicas) -}}
{{- else -}}
{{- $_ := set $deployment "autoscaling_config" (dict
  "min_replicas" (int64 $d.min_replicas)
  "max_replicas" (int64 $d.max_replicas)
  "initial_replicas" (int64 $d.initial_replicas)
  "target_ongoing_requests" $d.target_ongoing_requests
  "upscale_delay_s" $d.upscale_delay_seconds
  "downscale_delay_s" $d.downscale_delay_seconds) -}}
{{- end -}}
{{- $app := dict
  "name" $d.serve_app_name
  "route_prefix" (printf "/%s" $d.serve_app_name)
  "import_path" $meta.import_path
  "args" $args
  "deployments" (list $deployment)
-}}
{{- toYaml (dict
  "proxy_location" "EveryNode"
  "http_options" (dict "host" "0.0.0.0" "port" .Values.workers.serveHttpPort)
  "grpc_options" (dict "port" .Values.workers.serveGrpcPort "grpc_servicer_functions" $meta.servicer_functions)
  "applications" (list $app)) -}}
{{- end -}}

{{/*
Secret env vars. Call with (dict "root" $ "component" "gateway"|"ray"). Each pod gets the secrets
it reads: the Ray pods none of serving.serve_config.GATEWAY_SECRETS (the queue's DSN, the webhook
signing key), however they are given.
*/}}
{{- define "loraserve.secretEnv" -}}
{{- $v := .root.Values -}}
{{- $gatewayOnly := (.root.Files.Get "files/serve-settings.json" | fromJson).gateway_secrets -}}
{{- $s3 := include "loraserve.s3SecretName" .root -}}
- name: LORASERVE_S3_ACCESS_KEY
  valueFrom:
    secretKeyRef:
      name: {{ $s3 }}
      key: {{ ternary $v.secrets.s3.accessKeyKey "root-user" (ne $v.secrets.s3.existingSecret "") }}
- name: LORASERVE_S3_SECRET_KEY
  valueFrom:
    secretKeyRef:
      name: {{ $s3 }}
      key: {{ ternary $v.secrets.s3.secretKeyKey "root-password" (ne $v.secrets.s3.existingSecret "") }}
{{- with $v.secrets.s3Presign.existingSecret }}
- name: LORASERVE_S3_PRESIGN_ACCESS_KEY
  valueFrom:
    secretKeyRef:
      name: {{ . }}
      key: {{ $v.secrets.s3Presign.accessKeyKey }}
- name: LORASERVE_S3_PRESIGN_SECRET_KEY
  valueFrom:
    secretKeyRef:
      name: {{ . }}
      key: {{ $v.secrets.s3Presign.secretKeyKey }}
{{- end }}
{{- if and (eq .component "gateway") (eq $v.store.type "postgresql") }}
- name: LORASERVE_STORE_URL
  valueFrom:
    secretKeyRef:
      name: {{ include "loraserve.postgresqlSecretName" .root }}
      key: {{ ternary $v.secrets.postgresql.dsnKey "dsn" (ne $v.secrets.postgresql.existingSecret "") }}
{{- end }}
{{- if not (hasKey $v.secrets.settings "worker_shared_secret") }}
- name: LORASERVE_WORKER_SHARED_SECRET
  valueFrom:
    secretKeyRef:
      name: {{ include "loraserve.workerSecretName" .root }}
      key: worker-shared-secret
{{- end }}
{{- if and (eq .component "gateway") (not (hasKey $v.secrets.settings "webhook_signing_key")) }}
- name: LORASERVE_WEBHOOK_SIGNING_KEY
  valueFrom:
    secretKeyRef:
      name: {{ include "loraserve.webhookSecretName" .root }}
      key: webhook-signing-key
{{- end }}
{{- range $name, $ref := $v.secrets.settings }}
{{- if or (eq $.component "gateway") (not (has $name $gatewayOnly)) }}
- name: LORASERVE_{{ upper $name }}
  valueFrom:
    secretKeyRef:
      name: {{ $ref.existingSecret }}
      key: {{ $ref.key }}
{{- end }}
{{- end }}
{{- if and (eq .component "ray") $v.secrets.huggingface.existingSecret }}
- name: HF_TOKEN
  valueFrom:
    secretKeyRef:
      name: {{ $v.secrets.huggingface.existingSecret }}
      key: {{ $v.secrets.huggingface.tokenKey }}
{{- end }}
{{- end -}}

{{- define "loraserve.podSecurityContext" -}}
runAsNonRoot: true
runAsUser: 1000
runAsGroup: 1000
fsGroup: 1000
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{- define "loraserve.containerSecurityContext" -}}
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
capabilities:
  drop: [ALL]
{{- end -}}
