{{/*
Names. The default name is a literal, not .Chart.Name, so that the named templates below
compute the same ConfigMap and ServiceAccount names when a parent chart calls them.
*/}}
{{- define "connection-sidecar.name" -}}
{{- default "connection-sidecar" .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "connection-sidecar.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := include "connection-sidecar.name" . -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "connection-sidecar.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "connection-sidecar.selectorLabels" -}}
app.kubernetes.io/name: {{ include "connection-sidecar.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "connection-sidecar.labels" -}}
helm.sh/chart: {{ include "connection-sidecar.chart" . }}
{{ include "connection-sidecar.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{- define "connection-sidecar.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "connection-sidecar.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/* The status port (probes, metrics), read from config.status.address. */}}
{{- define "connection-sidecar.statusPort" -}}
{{- regexFind "[0-9]+$" (dig "status" "address" "0.0.0.0:15020" .Values.config) -}}
{{- end -}}

{{/* The admin URL for `sidecar drain`: loopback, from config.admin.address. */}}
{{- define "connection-sidecar.adminURL" -}}
{{- printf "http://%s" (dig "admin" "address" "127.0.0.1:15000" .Values.config) -}}
{{- end -}}

{{/*
Namespaces, other than the release's, that a `discovery: {type: kubernetes}` cluster of the
config watches: each gets a Role for EndpointSlices. A JSON list.
*/}}
{{- define "connection-sidecar.discoveryNamespaces" -}}
{{- $namespaces := list -}}
{{- range $cluster := (.Values.config.clusters | default list) -}}
{{- $discovery := $cluster.discovery | default dict -}}
{{- $ns := $discovery.namespace | default "" -}}
{{- if and (eq ($discovery.type | default "") "kubernetes") $ns (ne $ns $.Release.Namespace) (not (contains "${" $ns)) -}}
{{- $namespaces = append $namespaces $ns -}}
{{- end -}}
{{- end -}}
{{- $namespaces | uniq | sortAlpha | toJson -}}
{{- end -}}

{{/*
connection-sidecar.podAnnotations: the checksum that rolls pods when the config changes
(when rollOnConfigChange). The sidecar also hot-reloads its config file, so a pod keeps
working if this is off; the checksum only makes a change visible as a rollout.
*/}}
{{- define "connection-sidecar.podAnnotations" -}}
{{- if .Values.rollOnConfigChange -}}
checksum/config: {{ toYaml .Values.config | sha256sum }}
{{- end -}}
{{- end -}}

{{/*
connection-sidecar.container: the sidecar container, for this chart's Deployment and for
other charts' pods. Its context is this chart's template context. A parent chart that has
this chart as the dependency `connection-sidecar` (named templates are shared with parents)
passes the subchart's own context from `.Subcharts` (Helm 4; recent Helm 3 too):

  {{- $sidecar := index .Subcharts "connection-sidecar" }}
  spec:
    serviceAccountName: {{ include "connection-sidecar.serviceAccountName" $sidecar }}
    terminationGracePeriodSeconds: {{ $sidecar.Values.terminationGracePeriodSeconds }}
    initContainers:   # nativeSidecar: true (Kubernetes 1.29+); else first in `containers`
      {{- include "connection-sidecar.container" $sidecar | nindent 6 }}
    volumes:
      {{- include "connection-sidecar.volumes" $sidecar | nindent 6 }}

plus the pod annotations of "connection-sidecar.podAnnotations". With an older Helm, pass
(dict "Values" (index .Values "connection-sidecar") "Release" .Release) and set image.tag.
The ConfigMap, ServiceAccount, RBAC and monitors come from this chart's own templates (set
app.enabled: false there to drop the example app).

Native (nativeSidecar: true): `restartPolicy: Always` makes it a sidecar init container; the
kubelet starts the app only after the startup probe passes, and stops the sidecar only after
the app has exited. Classic: a postStart hook (`sidecar wait-ready`) blocks the start of the
containers after it until the sidecar is ready, which is why it must come first.
Stop, both modes: preStop `sidecar drain` waits for in-flight work, up to the grace period
minus 5 s, so the kubelet's SIGTERM finds nothing left to lose.

`sidecar inject` and the injection webhook build this same container in Python
(sidecar/inject/pod.py: sidecar_container). tests/inject/test_chart_parity.py renders this
template for many values and requires the two to be equal, key for key: change both.
*/}}
{{- define "connection-sidecar.container" -}}
{{- $v := .Values -}}
{{- $chart := (hasKey . "Chart") | ternary (get . "Chart") dict -}}
{{- $tag := $v.image.tag | default $chart.AppVersion | required "image.tag: set it (no chart appVersion in this context)" -}}
{{- $port := include "connection-sidecar.statusPort" . | atoi -}}
{{- $admin := include "connection-sidecar.adminURL" . -}}
{{- $probes := $v.probes -}}
- name: connection-sidecar
  image: "{{ $v.image.repository }}:{{ $tag }}"
  imagePullPolicy: {{ $v.image.pullPolicy }}
  {{- if $v.nativeSidecar }}
  restartPolicy: Always
  {{- end }}
  command: ["sidecar"]
  args: ["run", "--config", "/etc/sidecar/config.yaml"]
  env:
    - name: POD_NAME
      valueFrom:
        fieldRef:
          fieldPath: metadata.name
    - name: POD_NAMESPACE
      valueFrom:
        fieldRef:
          fieldPath: metadata.namespace
    {{- with $v.extraEnv }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
  ports:
    - name: status
      containerPort: {{ $port }}
      protocol: TCP
  startupProbe:
    httpGet:
      path: /readyz
      port: {{ $port }}
    {{- toYaml $probes.startup | nindent 4 }}
  livenessProbe:
    httpGet:
      path: /healthz
      port: {{ $port }}
    {{- toYaml $probes.liveness | nindent 4 }}
  readinessProbe:
    httpGet:
      path: /readyz
      port: {{ $port }}
    {{- toYaml $probes.readiness | nindent 4 }}
  lifecycle:
    {{- if not $v.nativeSidecar }}
    postStart:
      exec:
        command:
          - sidecar
          - wait-ready
          - --url
          - {{ printf "http://127.0.0.1:%d/readyz" $port | quote }}
          - --timeout
          - {{ mul ($probes.startup.periodSeconds | default 1) ($probes.startup.failureThreshold | default 60) | quote }}
    {{- end }}
    preStop:
      exec:
        command:
          - sidecar
          - drain
          - --admin
          - {{ $admin | quote }}
          - --timeout
          - {{ sub (int $v.terminationGracePeriodSeconds) 5 | quote }}
  {{- with $v.resources }}
  resources:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  securityContext:
    {{- toYaml $v.securityContext | nindent 4 }}
  volumeMounts:
    # The directory, not a subPath: kubelet swaps a directory mount's files when the
    # ConfigMap changes (a subPath never updates), and the sidecar hot-reloads the file.
    - name: connection-sidecar-config
      mountPath: /etc/sidecar
      readOnly: true
    - name: connection-sidecar-tmp
      mountPath: /tmp
{{- end -}}

{{/* connection-sidecar.volumes: the volumes the container above mounts. Same context. */}}
{{- define "connection-sidecar.volumes" -}}
- name: connection-sidecar-config
  configMap:
    name: {{ include "connection-sidecar.fullname" . }}
- name: connection-sidecar-tmp
  emptyDir:
    sizeLimit: {{ .Values.tmpSizeLimit }}
{{- end -}}

{{/* The injection webhook's name (Deployment, Service, Secret, ConfigMap, PDB). */}}
{{- define "connection-sidecar.injectorName" -}}
{{- printf "%s-injector" (include "connection-sidecar.fullname" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Not the app's selector labels plus one: then the app's selectors (its Deployment, the
status Service, the monitors) would select the injector's pods too. */}}
{{- define "connection-sidecar.injectorSelectorLabels" -}}
app.kubernetes.io/name: {{ printf "%s-injector" (include "connection-sidecar.name" .) | trunc 63 | trimSuffix "-" }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: injector
{{- end -}}

{{/*
connection-sidecar.injectorValues: what the webhook injects, as the chart's own values (the
webhook reads them with `--values`, so that an injected container is the one
"connection-sidecar.container" renders for these values: tests/inject/test_chart_parity.py).
*/}}
{{- define "connection-sidecar.injectorValues" -}}
image:
  repository: {{ .Values.image.repository }}
  tag: {{ .Values.image.tag | default .Chart.AppVersion | quote }}
  pullPolicy: {{ .Values.image.pullPolicy }}
nativeSidecar: {{ .Values.nativeSidecar }}
tmpSizeLimit: {{ .Values.tmpSizeLimit | quote }}
resources:
  {{- toYaml .Values.resources | nindent 2 }}
probes:
  {{- toYaml .Values.probes | nindent 2 }}
securityContext:
  {{- toYaml .Values.securityContext | nindent 2 }}
extraEnv:
  {{- toYaml .Values.extraEnv | nindent 2 }}
{{- end -}}
