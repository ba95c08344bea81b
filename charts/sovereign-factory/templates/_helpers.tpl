{{/*
Names are fixed per site (factory-<site>-<component>) rather than per release: step pods built by
pipelines/runtime/kubernetes.py (SiteObjects) refer to these objects by name.
*/}}
{{- define "sovereign-factory.prefix" -}}
factory-{{ .Values.site }}
{{- end -}}

{{- define "sovereign-factory.name" -}}
{{ include "sovereign-factory.prefix" .root }}-{{ .component }}
{{- end -}}

{{- define "sovereign-factory.stepServiceAccount" -}}
{{ .Values.step.serviceAccountName }}-{{ .Values.site }}
{{- end -}}

{{- define "sovereign-factory.keysSecret" -}}
{{ .Values.siteKeys.existingSecret | default (printf "%s-keys" (include "sovereign-factory.prefix" .)) }}
{{- end -}}

{{- define "sovereign-factory.mlflowDbSecret" -}}
{{ .Values.mlflow.database.existingSecret | default (printf "%s-mlflow-db" (include "sovereign-factory.prefix" .)) }}
{{- end -}}

{{/* Selector labels of one component: {"root": ., "component": "opa"} */}}
{{- define "sovereign-factory.selectorLabels" -}}
app.kubernetes.io/name: sovereign-factory
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
sovereign-factory/site: {{ .root.Values.site }}
{{- end -}}

{{- define "sovereign-factory.labels" -}}
{{ include "sovereign-factory.selectorLabels" . }}
app.kubernetes.io/part-of: sovereign-factory
app.kubernetes.io/version: {{ .root.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .root.Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .root.Chart.Name .root.Chart.Version }}
{{- with .root.Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/* Labels of step pods, as set by pipelines/runtime/kubernetes.py. */}}
{{- define "sovereign-factory.stepPodLabels" -}}
app.kubernetes.io/part-of: sovereign-factory
app.kubernetes.io/component: step
sovereign-factory/site: {{ .Values.site }}
{{- end -}}

{{/* Hardened container security context shared by every container of the chart. */}}
{{- define "sovereign-factory.containerSecurityContext" -}}
runAsNonRoot: true
readOnlyRootFilesystem: true
allowPrivilegeEscalation: false
privileged: false
capabilities:
  drop: [ALL]
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{- define "sovereign-factory.podSecurityContext" -}}
runAsNonRoot: true
runAsUser: {{ .uid }}
runAsGroup: {{ .uid }}
fsGroup: {{ .uid }}
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{/*
Policy files for the OPA ConfigMap as a dict path -> content: values opa.policies when given, else
the Rego and JSON files of files/policies/, a link to the repository's policies/ (so a checkout
renders as it is, and `helm package` stores the files themselves). Test files (*_test.rego) are
never deployed.
*/}}
{{- define "sovereign-factory.policyFiles" -}}
{{- $files := dict -}}
{{- if .Values.opa.policies -}}
{{- $files = .Values.opa.policies -}}
{{- else -}}
{{- range $path, $content := .Files.Glob "files/policies/**.{rego,json}" -}}
{{- $files = set $files (trimPrefix "files/policies/" $path) (toString $content) -}}
{{- end -}}
{{- end -}}
{{- $kept := dict -}}
{{- range $path, $content := $files -}}
{{- if not (hasSuffix "_test.rego" $path) -}}
{{- $kept = set $kept $path $content -}}
{{- end -}}
{{- end -}}
{{- if not $kept -}}
{{- fail "opa: no policies to deploy: files/policies (a link to the repository's policies/) holds no Rego or JSON file and opa.policies is empty" -}}
{{- end -}}
{{- toJson $kept -}}
{{- end -}}

{{/* ConfigMap keys cannot contain "/": a/b.rego is stored as a__b.rego and mounted back at a/b.rego. */}}
{{- define "sovereign-factory.policyKey" -}}
{{ replace "/" "__" . }}
{{- end -}}

{{/*
The policy bundle's revision, computed as `pipelines.policy.bundle` computes a site's pin:
sha256 over the lines "<path>\0<sha256 of the file>\n" sorted by path. OPA reports it with
every decision and a site's gate denies any other revision.
*/}}
{{- define "sovereign-factory.bundleRevision" -}}
{{- $lines := "" -}}
{{- range $path, $content := include "sovereign-factory.policyFiles" . | fromJson -}}
{{- $lines = printf "%s%s\x00%s\n" $lines $path (sha256sum $content) -}}
{{- end -}}
sha256:{{ sha256sum $lines }}
{{- end -}}

{{- define "sovereign-factory.inboxAirflowSecret" -}}
{{ .Values.inbox.airflow.existingSecret | default (printf "%s-inbox-airflow" (include "sovereign-factory.prefix" .)) }}
{{- end -}}

{{/*
The partners of values, checked (none is this site, none twice, no range that admits every address)
and returned as JSON: a list of {site, cidrs, inboxUrl, inboxCidrs, inboxPort, env} where inboxCidrs
defaults to cidrs, inboxPort is the port of inboxUrl (443 when it names none) and env is
FACTORY_PARTNER_INBOX_<SITE>. Every template that uses partners goes through here.
*/}}
{{- define "sovereign-factory.partners" -}}
{{- $seen := dict -}}
{{- $partners := list -}}
{{- range .Values.partners -}}
{{- if eq .site $.Values.site -}}
{{- fail (printf "partners: %s is this release's own site; list the other sites" .site) -}}
{{- end -}}
{{- if hasKey $seen .site -}}
{{- fail (printf "partners: %s is listed twice" .site) -}}
{{- end -}}
{{- $_ := set $seen .site true -}}
{{- $inboxCidrs := .inboxCidrs | default .cidrs -}}
{{- range concat .cidrs $inboxCidrs -}}
{{- if hasSuffix "/0" . -}}
{{- fail (printf "partners: %s admits every address; give the partner's own ranges" .) -}}
{{- end -}}
{{- end -}}
{{- $port := 443 -}}
{{- with .inboxUrl -}}
{{- with regexFind ":[0-9]+$" (urlParse .).host -}}
{{- $port = trimPrefix ":" . | atoi -}}
{{- end -}}
{{- end -}}
{{- $partners = append $partners (dict
      "site" .site "cidrs" .cidrs "inboxUrl" (.inboxUrl | default "") "inboxCidrs" $inboxCidrs
      "inboxPort" $port "env" (printf "FACTORY_PARTNER_INBOX_%s" (upper .site))) -}}
{{- end -}}
{{- toJson $partners -}}
{{- end -}}
