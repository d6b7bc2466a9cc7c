#!/usr/bin/env bash
# Checks the Kubernetes manifests under deploy/k8s (see deploy/README.md):
#   1. renders every overlay with `kubectl kustomize`;
#   2. validates the rendered objects against the Kubernetes OpenAPI schemas (strict: unknown
#      fields fail) with kubernetes-validate, for the oldest and newest versions we support;
#      its schemas ship inside the package, so this runs offline once it is installed;
#   3. runs checkov's Kubernetes policies on the rendered manifests (skipped, with a notice,
#      when checkov cannot be installed; SKIP_CHECKOV=1 skips it on purpose).
# Tools are installed once into target/k8s-venv and target/checkov-venv (pinned versions).
# The structural rules (probes, resources, security context) are also a Rust test:
# tests/tests/manifests.rs.
set -euo pipefail
cd "$(dirname "$0")/.."

KUBERNETES_VALIDATE_VERSION=1.37.0
CHECKOV_VERSION=3.3.30
# Oldest and newest Kubernetes the manifests are validated against (1.30: the first with
# the PodDisruptionBudget unhealthyPodEvictionPolicy field on by default, GA in 1.31).
K8S_VERSIONS=(1.30.0 1.37.0)
OVERLAYS=(cpu gpu)

say() { echo "check-manifests: $*" >&2; }

command -v kubectl >/dev/null || { say "kubectl not found (needed for kubectl kustomize)"; exit 2; }
command -v python3 >/dev/null || { say "python3 not found"; exit 2; }
# Debian's python3 needs python3-venv for `python3 -m venv`: installed with apt-get when
# missing, as the other scripts do for their tools.
if ! python3 -c 'import ensurepip' 2>/dev/null; then
  command -v apt-get >/dev/null || { say "python3 -m venv is unavailable and apt-get not found: install python3-venv"; exit 2; }
  sudo=""; [ "$(id -u)" -ne 0 ] && sudo="sudo"
  say "installing python3-venv with apt-get"
  $sudo apt-get update -q >&2 && $sudo apt-get install -y -q python3-venv >&2
fi

venv() { # venv DIR PACKAGE==VERSION: creates DIR with that version unless it is there
  local dir=$1 name=${2%%==*} version=${2##*==}
  if [ "$("$dir/bin/python" -m pip show "$name" 2>/dev/null | awk '/^Version:/ {print $2}')" != "$version" ]; then
    say "installing $2 into $dir"
    python3 -m venv "$dir" && "$dir/bin/python" -m pip install -q --disable-pip-version-check "$2"
  fi
}

out=target/k8s-rendered
rm -rf "$out" && mkdir -p "$out"
for overlay in "${OVERLAYS[@]}"; do
  say "kubectl kustomize deploy/k8s/overlays/$overlay"
  kubectl kustomize "deploy/k8s/overlays/$overlay" > "$out/$overlay.yaml"
done
say "kubectl kustomize deploy/k8s/components/external-etcd example (overlays/cpu + component)"
example=$(mktemp -d)
trap 'rm -rf "$example"' EXIT
cp -r deploy/k8s "$example/k8s"
mkdir -p "$example/k8s/overlays/external-etcd"
cat > "$example/k8s/overlays/external-etcd/kustomization.yaml" <<'YAML'
apiVersion: kustomize.config.k8s.io/v1beta1
kind: Kustomization
resources:
  - ../cpu
components:
  - ../../components/external-etcd
YAML
kubectl kustomize "$example/k8s/overlays/external-etcd" > "$out/external-etcd.yaml"
if grep -q "kind: StatefulSet" "$out/external-etcd.yaml"; then
  say "components/external-etcd left the etcd StatefulSet in"; exit 1
fi

venv target/k8s-venv "kubernetes-validate==$KUBERNETES_VALIDATE_VERSION"
for v in "${K8S_VERSIONS[@]}"; do
  say "kubernetes-validate --strict -k $v"
  target/k8s-venv/bin/kubernetes-validate --strict --quiet -k "$v" "$out"/*.yaml
done

if [ "${SKIP_CHECKOV:-0}" = 1 ]; then
  say "checkov skipped (SKIP_CHECKOV=1)"
elif ! venv target/checkov-venv "checkov==$CHECKOV_VERSION"; then
  say "checkov could not be installed: its checks are SKIPPED"
else
  # Skipped checks, each not applicable here:
  #   CKV_K8S_43 (image by digest): the manifests pin release tags; the digest is only known
  #     once an image is pushed to your registry (set it with `kustomize edit set image`).
  #   CKV_K8S_15 (imagePullPolicy Always): tags are immutable releases; IfNotPresent avoids
  #     a registry round trip on every worker restart.
  say "checkov $CHECKOV_VERSION (kubernetes framework)"
  target/checkov-venv/bin/checkov --quiet --compact --skip-download --framework kubernetes \
    --skip-check CKV_K8S_43,CKV_K8S_15 -d "$out"
fi
say "OK: ${OVERLAYS[*]} rendered, schema-valid for ${K8S_VERSIONS[*]}"
