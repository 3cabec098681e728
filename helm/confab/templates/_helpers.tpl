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
{{- if or .Values.auth.jwtSecret .Values.auth.existingSecret }}true{{ end }}
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
{{- if and (not $auth.insecureDevMode) (not (or $auth.jwtSecret $auth.existingSecret)) }}
{{- fail "confab: a JWT secret is required. Set auth.jwtSecret (at least 16 bytes; the chart stores it in a Secret) or auth.existingSecret (and auth.existingSecretKey) naming a Secret you created. Only for a throwaway test cluster, set auth.insecureDevMode=true to let anyone who reaches the server join any room." }}
{{- end }}
{{- if and $auth.jwtSecret (lt (len (toString $auth.jwtSecret)) 16) }}
{{- fail "confab: auth.jwtSecret must be at least 16 bytes (the server refuses shorter secrets)" }}
{{- end }}
{{- end }}
