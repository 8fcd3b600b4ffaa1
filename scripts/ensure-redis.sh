#!/usr/bin/env bash
# Makes sure redis-server is on PATH: installs Debian's package when it is missing and we may.
set -euo pipefail
if command -v redis-server >/dev/null 2>&1; then
  exit 0
fi
echo "redis-server not found; installing Debian's redis-server package" >&2
SUDO=""
if [ "$(id -u)" -ne 0 ]; then
  if command -v sudo >/dev/null 2>&1; then SUDO="sudo"; else
    echo "error: redis-server is missing and this user cannot install it; run: sudo apt-get install redis-server" >&2
    exit 1
  fi
fi
if ! command -v apt-get >/dev/null 2>&1; then
  echo "error: redis-server is missing and apt-get is not available; install redis-server (>= 6) and put it on PATH" >&2
  exit 1
fi
$SUDO apt-get update -qq
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends redis-server >/dev/null
# Debian's package starts a system-wide server on 6379; refitd never uses it, so leave it alone.
command -v redis-server >/dev/null
