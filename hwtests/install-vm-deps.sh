#!/usr/bin/env bash
# Installs what hwtests/run-vm.sh needs to boot the virtual board: qemu-system-x86 (Debian) and
# virtme-ng (PyPI, provides vng). Only what is missing is installed.
#
# Usage: hwtests/install-vm-deps.sh
set -euo pipefail

sudo=()
if [[ $(id -u) -ne 0 ]] && command -v sudo >/dev/null 2>&1; then sudo=(sudo); fi

apt_missing=()
command -v qemu-system-x86_64 >/dev/null 2>&1 || apt_missing+=(qemu-system-x86)
python3 -m pip --version >/dev/null 2>&1 || apt_missing+=(python3-pip)
if [[ ${#apt_missing[@]} -gt 0 ]]; then
  echo "install-vm-deps.sh: installing ${apt_missing[*]}"
  "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update -qq </dev/null
  "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive \
    apt-get install -y -qq --no-install-recommends "${apt_missing[@]}" </dev/null >/dev/null
fi

if ! command -v vng >/dev/null 2>&1; then
  echo "install-vm-deps.sh: installing virtme-ng (pip)"
  # Debian's own python3 refuses system-wide pip installs (PEP 668) unless told otherwise.
  python3 -m pip install -q virtme-ng </dev/null ||
    python3 -m pip install -q --break-system-packages virtme-ng </dev/null
  hash -r
fi
command -v vng >/dev/null 2>&1 || {
  echo "install-vm-deps.sh: vng is not on PATH after installing virtme-ng" >&2
  exit 1
}
