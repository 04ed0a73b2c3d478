#!/usr/bin/env bash
# Installs the programs the end-to-end tests drive besides cargo: curl (through the SOCKS5
# and HTTP CONNECT inbounds) and nginx (a real TLS-terminating reverse proxy in front of a
# wss:// leg). Debian/Ubuntu packages; needs root (or sudo). Idempotent.
set -euo pipefail
missing=()
command -v curl >/dev/null 2>&1 || missing+=(curl)
[ -x /usr/sbin/nginx ] || command -v nginx >/dev/null 2>&1 || missing+=(nginx)
[ ${#missing[@]} -eq 0 ] && exit 0
sudo=""
[ "$(id -u)" -eq 0 ] || sudo="sudo"
export DEBIAN_FRONTEND=noninteractive
$sudo apt-get update -qq
$sudo apt-get install -y -qq --no-install-recommends "${missing[@]}"
# The package may start a system nginx on port 80; the tests run their own.
$sudo systemctl disable --now nginx >/dev/null 2>&1 || $sudo service nginx stop >/dev/null 2>&1 || true
