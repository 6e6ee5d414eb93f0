{{/* The Ray pods' container and volumes, shared by the head and the worker group. */}}
{{- define "loraserve.rayContainer" -}}
{{- $w := .root.Values.workers -}}
image: {{ include "loraserve.image" .root }}
imagePullPolicy: {{ .root.Values.image.pullPolicy }}
securityContext:
  {{- include "loraserve.containerSecurityContext" .root | nindent 2 }}
env:
  # The Serve config's args carry every other setting; secrets only reach pods as env vars. The
  # head gets them too: Serve builds the application (serving.application) wherever it likes.
  {{- include "loraserve.secretEnv" (dict "root" .root "component" "ray") | nindent 2 }}
  - name: HF_HOME
    value: /data/huggingface
  {{- with $w.extraEnv }}
  {{- toYaml . | nindent 2 }}
  {{- end }}
volumeMounts:
  {{- include "loraserve.rayWritableMounts" . | nindent 2 }}
  - name: weights-cache
    mountPath: /data
{{- end -}}
{{/*
What Ray writes beside /data, the root filesystem being read-only: its sessions, logs and sockets
(/tmp/ray: KubeRay mounts the same volume into the autoscaler), other temporary files (/tmp), and
the caches libraries keep under $HOME (~/.cache, ~/.config).
*/}}
{{- define "loraserve.rayWritableMounts" -}}
- name: ray-tmp
  mountPath: /tmp/ray
- name: tmp
  mountPath: /tmp
- name: home
  mountPath: /home/ray
{{- end -}}
{{- define "loraserve.rayVolumes" -}}
{{- $c := .Values.workers.weightsCache -}}
- name: weights-cache
  {{- if eq $c.type "hostPath" }}
  hostPath:
    path: {{ $c.hostPath }}
    type: Directory
  {{- else }}
  emptyDir:
    sizeLimit: {{ $c.sizeLimit }}
  {{- end }}
- name: ray-tmp
  emptyDir: {}
- name: tmp
  emptyDir: {}
- name: home
  emptyDir: {}
{{- end -}}
