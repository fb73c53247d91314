#!/bin/sh
# Runs inside the virtual board (started by hwtests/run-vm.sh): runs "$@" with its output and
# exit code sent back to the host.
#
# vng wires the command's stdout/stderr and exit code through virtio-serial ports that it expects
# udev to name (/dev/virtio-ports/virtme.*). Without udev in the root filesystem (Debian containers
# have none), virtme-ng-init falls back to the kernel console, which vng discards, and vng exits
# with 255 whatever the command did. This wrapper finds the ports by their sysfs names instead.
port() {
  for p in /sys/class/virtio-ports/*; do
    if [ "$(cat "$p/name" 2>/dev/null)" = "$1" ]; then
      echo "/dev/${p##*/}"
      return 0
    fi
  done
  return 1
}

out=$(port virtme.stdout) || out=
err=$(port virtme.stderr) || err=
ret=$(port virtme.ret) || ret=
[ -n "$out" ] && exec >"$out"
[ -n "$err" ] && exec 2>"$err"

"$@"
code=$?
[ -n "$ret" ] && echo "$code" >"$ret"
exit "$code"
