#!/usr/bin/env bash
# System packages the test-suite uses for real parts: Debian's prometheus (server + promtool).
# Best effort: without root or apt the tests that need them skip with a reason.
set -u
if command -v prometheus >/dev/null 2>&1 && command -v promtool >/dev/null 2>&1; then
  exit 0
fi
if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >/dev/null 2>&1 || true
  apt-get install -y -qq --no-install-recommends prometheus >/dev/null 2>&1 || \
    echo "install_system_deps: could not install prometheus; its tests will skip" >&2
  # The Debian package starts a daemon on :9090 under systemd hosts; tests run their own.
else
  echo "install_system_deps: not root or no apt-get; prometheus tests will skip" >&2
fi
exit 0
