{{/*
Chart name, possibly overridden.
*/}}
{{- define "confab.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Full resource name: <release>-<chart>, or the release name when it already
contains the chart name. Kubernetes names are at most 63 characters.
*/}}
{{- define "confab.fullname" -}}
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

{{/*
Chart name and version for the helm.sh/chart label.
*/}}
{{- define "confab.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Labels on every resource.
*/}}
{{- define "confab.labels" -}}
helm.sh/chart: {{ include "confab.chart" . }}
{{ include "confab.selectorLabels" . }}
app.kubernetes.io/version: {{ .Values.image.tag | default .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{/*
Labels that select the pods; they must not change between upgrades.
*/}}
{{- define "confab.selectorLabels" -}}
app.kubernetes.io/name: {{ include "confab.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/*
Image reference; the tag defaults to the chart's appVersion.
*/}}
{{- define "confab.image" -}}
{{- printf "%s:%s" .Values.image.repository (.Values.image.tag | default .Chart.AppVersion | toString) }}
{{- end }}

{{/*
Name of the Secret that holds the JWT secret: the user's existingSecret, or
the one this chart creates from auth.jwtSecret.
*/}}
{{- define "confab.secretName" -}}
{{- if .Values.auth.existingSecret }}
{{- .Values.auth.existingSecret }}
{{- else }}
{{- include "confab.fullname" . }}
{{- end }}
{{- end }}

{{/*
Key of the JWT secret inside that Secret.
*/}}
{{- define "confab.secretKey" -}}
{{- if .Values.auth.existingSecret }}
{{- required "auth.existingSecretKey must name the key in auth.existingSecret that holds the JWT secret" .Values.auth.existingSecretKey }}
{{- else }}
{{- print "jwt-secret" }}
{{- end }}
{{- end }}

{{/*
True (non-empty) when the server gets a JWT secret from a Secret.
*/}}
{{- define "confab.hasSecret" -}}
{{- if or .Values.auth.jwtSecret .Values.auth.existingSecret (and .Values.auth.generateSecret (not .Values.auth.insecureDevMode)) }}true{{ end }}
{{- end }}

{{/*
Whether the chart creates the Secret: from auth.jwtSecret, or generated
(auth.generateSecret) when neither a value nor an existing Secret is given.
*/}}
{{- define "confab.createsSecret" -}}
{{- if and (include "confab.hasSecret" .) (not .Values.auth.existingSecret) }}true{{ end }}
{{- end }}

{{/*
Refuses to render an unauthenticated server unless dev mode was asked for,
and refuses settings the server would reject at start.
*/}}
{{- define "confab.validateAuth" -}}
{{- $auth := .Values.auth }}
{{- if and $auth.jwtSecret $auth.existingSecret }}
{{- fail "confab: set only one of auth.jwtSecret and auth.existingSecret" }}
{{- end }}
{{- if and $auth.insecureDevMode (or $auth.jwtSecret $auth.existingSecret) }}
{{- fail "confab: auth.insecureDevMode=true turns authentication off and cannot be combined with auth.jwtSecret or auth.existingSecret; remove one of them" }}
{{- end }}
{{- if and (not $auth.insecureDevMode) (not (or $auth.jwtSecret $auth.existingSecret $auth.generateSecret)) }}
{{- fail "confab: a JWT secret is required. Set auth.jwtSecret (at least 16 bytes; the chart stores it in a Secret), auth.existingSecret (and auth.existingSecretKey) naming a Secret you created, or auth.generateSecret=true to let the chart generate one. Only for a throwaway test cluster, set auth.insecureDevMode=true to let anyone who reaches the server join any room." }}
{{- end }}
{{- if and $auth.jwtSecret (lt (len (toString $auth.jwtSecret)) 16) }}
{{- fail "confab: auth.jwtSecret must be at least 16 bytes (the server refuses shorter secrets)" }}
{{- end }}
{{- end }}

{{/*
Name of the UDP Service for the media port.
*/}}
{{- define "confab.mediaServiceName" -}}
{{- printf "%s-media" (include "confab.fullname" . | trunc 57 | trimSuffix "-") }}
{{- end }}

{{/*
True (non-empty) when the chart creates the UDP Service for the media port.
*/}}
{{- define "confab.mediaService" -}}
{{- if and (not .Values.hostNetwork) .Values.media.service.enabled }}true{{ end }}
{{- end }}

{{/*
Refuses media and mode settings the server would reject at start, or that
would leave the media port unreachable.
*/}}
{{- define "confab.validateMedia" -}}
{{- $media := .Values.media }}
{{- $port := $media.port | int }}
{{- if or (lt $port 1) (gt $port 65535) }}
{{- fail (printf "confab: media.port must be a UDP port from 1 to 65535 (got %v); the pod needs a fixed port that browsers can reach" $media.port) }}
{{- end }}
{{- $publicIP := $media.publicIP | default "" | toString }}
{{- if $publicIP }}
{{- if not (or (regexMatch "^[0-9]{1,3}(\\.[0-9]{1,3}){3}$" $publicIP) (and (contains ":" $publicIP) (regexMatch "^[0-9A-Fa-f:.]+$" $publicIP))) }}
{{- fail (printf "confab: media.publicIP must be an IPv4 or IPv6 address, not a host name (got %q); it is put into the ICE candidates browsers connect to" $publicIP) }}
{{- end }}
{{- if has $publicIP (list "0.0.0.0" "::") }}
{{- fail (printf "confab: media.publicIP %q is not an address browsers can reach; set the node's or load balancer's IP" $publicIP) }}
{{- end }}
{{- end }}
{{- $bind := $media.bind | default "" | toString }}
{{- if $bind }}
{{- if not (or (regexMatch "^[0-9]{1,3}(\\.[0-9]{1,3}){3}$" $bind) (and (contains ":" $bind) (regexMatch "^[0-9A-Fa-f:.]+$" $bind))) }}
{{- fail (printf "confab: media.bind must be an IPv4 or IPv6 address (got %q)" $bind) }}
{{- end }}
{{- end }}
{{- if and (not .Values.hostNetwork) (not $publicIP) }}
{{- fail "confab: media.publicIP is required when hostNetwork is false. The server announces it in its ICE candidates as the address where browsers reach UDP port media.port, and refuses to start without it: set the address of the node that runs the pod (media.service.type=NodePort), of the load balancer (media.service.type=LoadBalancer), or a pod address browsers can route to. Or set hostNetwork=true to use the node's own address." }}
{{- end }}
{{- if and .Values.hostNetwork $media.service.enabled }}
{{- fail "confab: media.service.enabled needs hostNetwork=false; with hostNetwork=true media.port is already a port of the node" }}
{{- end }}
{{- if include "confab.mediaService" . }}
{{- $type := $media.service.type | default "" | toString }}
{{- if not (has $type (list "NodePort" "LoadBalancer")) }}
{{- fail (printf "confab: media.service.type must be NodePort or LoadBalancer (got %q)" $type) }}
{{- end }}
{{- if eq $type "NodePort" }}
{{- $range := $media.service.nodePortRange | default "30000-32767" | toString }}
{{- if not (regexMatch "^[0-9]+-[0-9]+$" $range) }}
{{- fail (printf "confab: media.service.nodePortRange must look like \"30000-32767\" (got %q)" $range) }}
{{- end }}
{{- $bounds := splitList "-" $range }}
{{- if or (lt $port (first $bounds | int)) (gt $port (last $bounds | int)) }}
{{- fail (printf "confab: with media.service.type=NodePort the node port is media.port itself (the server announces its own port to browsers), so media.port (%d) must lie in the cluster's NodePort range %s, e.g. --set media.port=31882; if your cluster's range differs, set media.service.nodePortRange" $port $range) }}
{{- end }}
{{- end }}
{{- end }}
{{- if lt (.Values.server.maxParticipants | int) 2 }}
{{- fail "confab: server.maxParticipants must be at least 2" }}
{{- end }}
{{- if lt (.Values.sfu.threshold | int) 3 }}
{{- fail "confab: sfu.threshold must be at least 3 (the server refuses less); set sfu.neverP2P=true to route every room, pairs included, through the server" }}
{{- end }}
{{- end }}

{{- define "confab.validateTurn" -}}
{{- $turn := .Values.turn }}
{{- if and $turn.external (not $turn.existingSecret) }}
{{- fail "confab: turn.external needs turn.existingSecret: the external TURN servers check the credentials confab hands out with that shared secret (coturn: use-auth-secret, static-auth-secret)" }}
{{- end }}
{{- if and $turn.enabled .Values.hostNetwork }}
{{- $port := $turn.port | int }}
{{- if or (lt $port 1) (gt $port 65535) }}
{{- fail (printf "confab: turn.port must be a UDP port from 1 to 65535 (got %v)" $turn.port) }}
{{- end }}
{{- if not (regexMatch "^[0-9]+-[0-9]+$" ($turn.relayPorts | toString)) }}
{{- fail (printf "confab: turn.relayPorts must look like \"49152-65535\" (got %q)" ($turn.relayPorts | toString)) }}
{{- end }}
{{- end }}
{{- end }}

{{/*
The pod's terminationGracePeriodSeconds: the drain deadline plus a margin, so
that Kubernetes never kills a drain before the server ends it itself.
*/}}
{{- define "confab.terminationGracePeriodSeconds" -}}
{{- add (.Values.drain.timeoutSeconds | int64) (.Values.drain.graceMarginSeconds | int64) }}
{{- end }}

{{/*
The address of the separate metrics listener, empty when /metrics stays on
the HTTP port.
*/}}
{{- define "confab.metricsListen" -}}
{{- if not (kindIs "invalid" .Values.metrics.port) }}
{{- printf "%s:%d" .Values.server.listenHost (.Values.metrics.port | int) }}
{{- end }}
{{- end }}

{{/*
Name of the container (and Service) port that serves /metrics.
*/}}
{{- define "confab.metricsPortName" -}}
{{- if include "confab.metricsListen" . }}metrics{{ else }}http{{ end }}
{{- end }}

{{/*
True (non-empty) when the embedded TURN server runs.
*/}}
{{- define "confab.turnEnabled" -}}
{{- if and .Values.turn.enabled .Values.hostNetwork }}true{{ end }}
{{- end }}

{{/*
The container's CONFAB_* environment, as a YAML list (the server's settings;
every flag of `confab serve` has such a variable). Kept in one place so that
the config file check below knows which settings the chart already sets.
*/}}
{{- define "confab.env" -}}
- name: CONFAB_LISTEN
  value: {{ printf "%s:%d" .Values.server.listenHost (.Values.server.port | int) | quote }}
{{- with include "confab.metricsListen" . }}
- name: CONFAB_METRICS_LISTEN
  value: {{ . | quote }}
{{- end }}
- name: CONFAB_DRAIN_TIMEOUT_SECS
  value: {{ .Values.drain.timeoutSeconds | int64 | quote }}
{{- if include "confab.hasSecret" . }}
- name: CONFAB_JWT_SECRET
  valueFrom:
    secretKeyRef:
      name: {{ include "confab.secretName" . | quote }}
      key: {{ include "confab.secretKey" . | quote }}
{{- else }}
- name: CONFAB_INSECURE
  value: "true"
{{- end }}
{{- with .Values.config }}
- name: CONFAB_CONFIG
  value: /etc/confab/confab.toml
{{- end }}
{{- with .Values.server.iceServers }}
- name: CONFAB_ICE_SERVERS
  value: {{ join "," . | quote }}
{{- end }}
- name: CONFAB_EMPTY_ROOM_SECS
  value: {{ .Values.server.emptyRoomSecs | int64 | quote }}
- name: CONFAB_MAX_PARTICIPANTS
  value: {{ .Values.server.maxParticipants | int64 | quote }}
- name: CONFAB_MAX_CONNECTIONS
  value: {{ .Values.server.maxConnections | int64 | quote }}
{{- if or .Values.server.trustForwardedFor .Values.ingress.enabled }}
- name: CONFAB_TRUST_FORWARDED_FOR
  value: "true"
{{- end }}
- name: CONFAB_MEDIA_PORT
  value: {{ .Values.media.port | int64 | quote }}
{{- with .Values.media.bind }}
- name: CONFAB_MEDIA_BIND
  value: {{ . | toString | quote }}
{{- end }}
{{- /* The address browsers reach the media port at, put into the SFU's ICE candidates. */}}
- name: CONFAB_PUBLIC_IP
{{- if .Values.media.publicIP }}
  value: {{ .Values.media.publicIP | toString | quote }}
{{- else }}
{{- /* hostNetwork (validateMedia refuses the rest): the node's IP. */}}
  valueFrom:
    fieldRef:
      fieldPath: status.hostIP
{{- end }}
- name: CONFAB_SFU_THRESHOLD
  value: {{ .Values.sfu.threshold | int64 | quote }}
- name: CONFAB_P2P_RETURN_DELAY_MS
  value: {{ .Values.sfu.p2pReturnDelayMs | int64 | quote }}
- name: CONFAB_SWITCH_TIMEOUT_MS
  value: {{ .Values.sfu.switchTimeoutMs | int64 | quote }}
{{- if .Values.sfu.neverP2P }}
- name: CONFAB_NEVER_P2P
  value: "true"
{{- end }}
{{- with .Values.sfu.neverP2PRooms }}
- name: CONFAB_NEVER_P2P_ROOMS
  value: {{ join "," . | quote }}
{{- end }}
{{- if .Values.sfu.srtpGcmOnly }}
- name: CONFAB_SRTP_GCM_ONLY
  value: "true"
{{- end }}
{{- if include "confab.turnEnabled" . }}
- name: CONFAB_TURN_PORT
  value: {{ .Values.turn.port | int64 | quote }}
- name: CONFAB_TURN_RELAY_PORTS
  value: {{ .Values.turn.relayPorts | toString | quote }}
- name: CONFAB_TURN_USER_QUOTA
  value: {{ .Values.turn.userQuota | int64 | quote }}
- name: CONFAB_TURN_TOTAL_QUOTA
  value: {{ .Values.turn.totalQuota | int64 | quote }}
{{- else }}
- name: CONFAB_NO_TURN
  value: "true"
{{- end }}
- name: CONFAB_TURN_CREDENTIAL_TTL_SECS
  value: {{ .Values.turn.credentialTtlSecs | int64 | quote }}
{{- with .Values.turn.existingSecret }}
- name: CONFAB_TURN_SECRET
  valueFrom:
    secretKeyRef:
      name: {{ . | quote }}
      key: {{ $.Values.turn.existingSecretKey | quote }}
{{- end }}
{{- with .Values.turn.external }}
- name: CONFAB_TURN_EXTERNAL
  value: {{ join "," . | quote }}
{{- end }}
- name: CONFAB_LOG
  value: {{ .Values.server.log | quote }}
- name: CONFAB_LOG_FORMAT
  value: {{ .Values.server.logFormat | quote }}
{{- end }}

{{/*
One TOML value: integers stay integers (Helm reads every YAML number as a
float), strings and lists of strings as JSON, which TOML accepts as written.
*/}}
{{- define "confab.tomlValue" -}}
{{- $v := . }}
{{- if kindIs "bool" $v }}{{ $v }}
{{- else if or (kindIs "float64" $v) (kindIs "float32" $v) }}
{{- if eq ($v | int64 | float64) ($v | float64) }}{{ $v | int64 }}{{ else }}{{ $v }}{{ end }}
{{- else if or (kindIs "int" $v) (kindIs "int64" $v) }}{{ $v }}
{{- else if kindIs "slice" $v }}[{{ range $i, $e := $v }}{{ if $i }}, {{ end }}{{ include "confab.tomlValue" $e }}{{ end }}]
{{- else }}{{ $v | toString | toJson }}
{{- end }}
{{- end }}

{{/*
The config file: `key = value` lines, keys as written (kebab-case flag names).
*/}}
{{- define "confab.configToml" -}}
# confab serve --config; keys are the long flag names.
{{- range $k, $v := .Values.config }}
{{ $k }} = {{ include "confab.tomlValue" $v }}
{{- end }}
{{- end }}

{{/*
Refuses config file keys that would be ignored (the chart sets them as
CONFAB_* variables, which take precedence over the file) or that are secrets.
*/}}
{{- define "confab.validateConfig" -}}
{{- $set := dict }}
{{- range (include "confab.env" . | fromYamlArray) }}
{{- $_ := set $set .name true }}
{{- end }}
{{- $renamed := dict "ice-server" "CONFAB_ICE_SERVERS" "never-p2p-room" "CONFAB_NEVER_P2P_ROOMS" }}
{{- range $key, $_ := .Values.config }}
{{- if has $key (list "jwt-secret" "turn-secret" "turn-external-secret") }}
{{- fail (printf "confab: config.%s is a secret and a ConfigMap is not: use auth.existingSecret (jwt-secret) or turn.existingSecret (turn-secret)" $key) }}
{{- end }}
{{- if eq $key "config" }}
{{- fail "confab: config.config makes no sense: the chart passes this file as --config" }}
{{- end }}
{{- $var := get $renamed $key | default (printf "CONFAB_%s" ($key | upper | replace "-" "_")) }}
{{- if hasKey $set $var }}
{{- fail (printf "confab: config.%s would be ignored: the chart already sets %s from its values, and variables take precedence over the config file. Set it through the chart's value for it (values.yaml names the variable of each) instead." $key $var) }}
{{- end }}
{{- end }}
{{- end }}

{{/*
Refuses port and drain settings that clash.
*/}}
{{- define "confab.validatePorts" -}}
{{- $http := .Values.server.port | int }}
{{- $media := .Values.media.port | int }}
{{- with include "confab.metricsListen" $ }}
{{- $metrics := $.Values.metrics.port | int }}
{{- if eq $metrics $http }}
{{- fail (printf "confab: metrics.port (%d) must differ from server.port; leave it null to serve /metrics on server.port" $metrics) }}
{{- end }}
{{- end }}
{{- if and (include "confab.turnEnabled" .) (eq (.Values.turn.port | int) $media) }}
{{- fail (printf "confab: turn.port and media.port are both UDP port %d; give them different ports" $media) }}
{{- end }}
{{- if and (eq .Values.kind "DaemonSet") (eq .Values.updateStrategy.type "Recreate") }}
{{- fail "confab: updateStrategy.type Recreate is for a Deployment; a DaemonSet takes RollingUpdate or OnDelete" }}
{{- end }}
{{- if and (eq .Values.kind "Deployment") (eq .Values.updateStrategy.type "OnDelete") }}
{{- fail "confab: updateStrategy.type OnDelete is for a DaemonSet; a Deployment takes RollingUpdate or Recreate" }}
{{- end }}
{{- end }}
