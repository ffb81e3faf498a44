{{/* Names: the usual Helm scheme, truncated to the 63 characters of a DNS label. */}}
{{- define "lmfleet.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "lmfleet.fullname" -}}
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

{{/* KubeRay derives pod and Service names (<name>-head-svc, <name>-<group>-worker-xxxxx)
from the RayCluster's name, so it is kept shorter. */}}
{{- define "lmfleet.rayClusterName" -}}
{{- include "lmfleet.fullname" . | trunc 40 | trimSuffix "-" }}
{{- end }}

{{- define "lmfleet.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Standard labels; call with (dict "ctx" $ "component" "router"). */}}
{{- define "lmfleet.labels" -}}
helm.sh/chart: {{ include "lmfleet.chart" .ctx }}
{{ include "lmfleet.selectorLabels" . }}
app.kubernetes.io/version: {{ .ctx.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .ctx.Release.Service }}
app.kubernetes.io/part-of: lmfleet
{{- end }}

{{- define "lmfleet.selectorLabels" -}}
app.kubernetes.io/name: {{ include "lmfleet.name" .ctx }}
app.kubernetes.io/instance: {{ .ctx.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{- define "lmfleet.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "lmfleet.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "lmfleet.image" -}}
{{- $suffix := ternary "cuda" "cpu" .Values.gpu.enabled }}
{{- $tag := .Values.image.tag | default (printf "%s-%s" .Chart.AppVersion $suffix) }}
{{- printf "%s:%s" .Values.image.repository $tag }}
{{- end }}

{{/* The Redis URL given to the routers and the controller (never with a password in it:
the password travels as LMFLEET_REDIS_PASSWORD from a Secret). */}}
{{- define "lmfleet.redisUrl" -}}
{{- if .Values.redis.enabled }}
{{- printf "redis://%s-redis:6379/0" (include "lmfleet.fullname" .) }}
{{- else if .Values.externalRedis.url }}
{{- .Values.externalRedis.url }}
{{- else }}
{{- fail "set redis.enabled=true or externalRedis.url: the routers and the controller share state through Redis" }}
{{- end }}
{{- end }}

{{- define "lmfleet.workerTokenSecretName" -}}
{{- .Values.workerToken.existingSecret | default (printf "%s-worker-token" (include "lmfleet.fullname" .)) }}
{{- end }}

{{/* The router -> worker token (worker/auth.py reads $LMFLEET_WORKER_TOKEN): routers and
the controller send it; the controller hands it to the replicas it starts. */}}
{{- define "lmfleet.workerTokenEnv" -}}
{{- if or .Values.workerToken.value .Values.workerToken.existingSecret }}
- name: LMFLEET_WORKER_TOKEN
  valueFrom:
    secretKeyRef:
      name: {{ include "lmfleet.workerTokenSecretName" . }}
      key: {{ .Values.workerToken.existingSecretKey }}
{{- end }}
{{- end }}

{{/* The controller's secrets, by reference (KubeRay head and the plain Deployment). */}}
{{- define "lmfleet.controllerEnv" -}}
{{- include "lmfleet.redisPasswordEnv" . }}
{{- include "lmfleet.workerTokenEnv" . }}
{{- end }}

{{- define "lmfleet.apiKeySecretName" -}}
{{- .Values.apiKey.existingSecret | default (printf "%s-api-key" (include "lmfleet.fullname" .)) }}
{{- end }}

{{/* The models with everything derived from them, as a YAML list (read back with
fromYamlArray): min/max replicas, world = tp x pp, whether the engine runs on a GPU
(device cuda*, as cluster/fleet_config.py decides), Ray CPUs per replica, worker group. */}}
{{- define "lmfleet.models" -}}
{{- $out := list }}
{{- range $i, $m := .Values.models }}
{{- $engine := deepCopy ($m.engine | default dict) }}
{{- if not (hasKey $engine "device") }}
{{- $_ := set $engine "device" (ternary "cuda" "cpu" $.Values.gpu.enabled) }}
{{- end }}
{{- /* `default` would turn a minReplicas of 0 into 1: keys are tested instead. */}}
{{- $min := 1 }}
{{- if hasKey $m "replicas" }}{{ $min = int $m.replicas }}
{{- else if hasKey $m "minReplicas" }}{{ $min = int $m.minReplicas }}{{ end }}
{{- $max := $min }}
{{- if hasKey $m "replicas" }}{{ $max = int $m.replicas }}
{{- else if hasKey $m "maxReplicas" }}{{ $max = int $m.maxReplicas }}{{ end }}
{{- if gt $min $max }}
{{- fail (printf "models[%d] (%s): minReplicas %d > maxReplicas %d" $i $m.name $min $max) }}
{{- end }}
{{- $tp := int ($m.tp | default 1) }}
{{- $pp := int ($m.pp | default 1) }}
{{- $world := mul $tp $pp }}
{{- $cpusPerRank := $m.cpusPerRank | default 1 }}
{{- $useGpu := hasPrefix "cuda" (toString $engine.device) }}
{{- $clean := regexReplaceAll "[^a-z0-9-]+" (lower $m.name) "-" | trunc 40 | trimAll "-" | default "model" }}
{{- $entry := dict "name" $m.name "path" ($m.path | default "default") "fixed" (hasKey $m "replicas")
      "min" $min "max" $max "tp" $tp "pp" $pp "world" $world "cpusPerRank" $cpusPerRank
      "scheduler" ($m.scheduler | default "fcfs") "engine" $engine
      "autoscaling" ($m.autoscaling | default dict) "useGpu" $useGpu
      "rayCpus" (int (ceil (mulf $world $cpusPerRank)))
      "group" (printf "%s-%d" $clean $i) "workerResources" ($m.workerResources | default dict) }}
{{- $out = append $out $entry }}
{{- end }}
{{- toYaml $out }}
{{- end }}

{{/* The fleet YAML the controller reads (--config). */}}
{{- define "lmfleet.fleetYaml" -}}
{{- $models := list }}
{{- range (include "lmfleet.models" . | fromYamlArray) }}
{{- $m := dict "name" .name "path" .path "tp" .tp "pp" .pp "cpus_per_rank" .cpusPerRank
      "scheduler" .scheduler "engine" .engine }}
{{- if .fixed }}
{{- $_ := set $m "replicas" .min }}
{{- else }}
{{- $_ := set $m "min_replicas" .min }}
{{- $_ := set $m "max_replicas" .max }}
{{- end }}
{{- if .autoscaling }}
{{- $_ := set $m "autoscaling" .autoscaling }}
{{- end }}
{{- $models = append $models $m }}
{{- end }}
{{- $fleet := dict "cluster" .Values.cluster "models" $models }}
{{- if .Values.fleet.controller.config }}
{{- $_ := set $fleet "controller" .Values.fleet.controller.config }}
{{- end }}
{{- toYaml $fleet }}
{{- end }}

{{/* Environment shared by the routers and the controller: secrets by reference only. */}}
{{- define "lmfleet.redisPasswordEnv" -}}
{{- if and (not .Values.redis.enabled) .Values.externalRedis.existingSecret }}
- name: LMFLEET_REDIS_PASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ .Values.externalRedis.existingSecret }}
      key: {{ .Values.externalRedis.existingSecretPasswordKey }}
{{- end }}
{{- end }}

{{/* The routers' secrets, by reference: the router reads its key from $LMFLEET_API_KEY
(router/auth.py), so it shows neither in the pod spec nor in the process list. */}}
{{- define "lmfleet.routerEnv" -}}
{{- if or .Values.apiKey.value .Values.apiKey.existingSecret }}
- name: LMFLEET_API_KEY
  valueFrom:
    secretKeyRef:
      name: {{ include "lmfleet.apiKeySecretName" . }}
      key: {{ .Values.apiKey.existingSecretKey }}
{{- end }}
{{- include "lmfleet.redisPasswordEnv" . }}
{{- include "lmfleet.workerTokenEnv" . }}
{{- end }}

{{/* `lmfleet controller` arguments, shared by the KubeRay head and the plain Deployment. */}}
{{- define "lmfleet.controllerArgs" -}}
- controller
- --config
- /etc/lmfleet/fleet.yaml
- --redis
- {{ include "lmfleet.redisUrl" . | quote }}
- --cluster
- {{ .Values.cluster | quote }}
- --metrics-port
- {{ .Values.fleet.controller.metricsPort | quote }}
- --metrics-host
- 0.0.0.0
- --start-timeout
- {{ .Values.fleet.controller.startTimeout | quote }}
- --log-level
- {{ .Values.fleet.controller.logLevel | quote }}
{{- end }}

{{/* Volumes for the model storage and the fleet config; mounts to match. */}}
{{- define "lmfleet.modelVolume" -}}
{{- $s := .Values.modelStorage }}
{{- if eq $s.type "pvc" }}
- name: models
  persistentVolumeClaim:
    claimName: {{ required "modelStorage.pvc.claimName is required with type pvc" $s.pvc.claimName }}
    readOnly: true
{{- else if eq $s.type "hostPath" }}
- name: models
  hostPath:
    path: {{ required "modelStorage.hostPath.path is required with type hostPath" $s.hostPath.path }}
    type: {{ $s.hostPath.type }}
{{- else if eq $s.type "volume" }}
- name: models
  {{- required "modelStorage.volume is required with type volume" $s.volume | toYaml | nindent 2 }}
{{- end }}
{{- end }}

{{- define "lmfleet.modelMount" -}}
{{- if ne .Values.modelStorage.type "none" }}
- name: models
  mountPath: {{ .Values.modelStorage.mountPath }}
  readOnly: true
{{- end }}
{{- end }}

{{- define "lmfleet.shmVolume" -}}
- name: dshm
  emptyDir:
    medium: Memory
    sizeLimit: {{ .Values.fleet.workers.shmSize }}
{{- end }}
