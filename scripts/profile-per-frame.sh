#!/usr/bin/env bash
# Per-frame cost of one side of a link, counted rather than timed, so that it
# holds on a busy machine: instructions (callgrind), syscalls (strace) and
# context switches (/proc/PID/status), per frame, in steady state.
#
#   scripts/profile-per-frame.sh consumer|producer [--transport bufshare|shm]
#       [--consumers N] [--size WxH] [--fps F] [--frames A,B]
#       [--src-props "frame-ring=false ..."]   (extra bufsharesrc properties)
#
# The profiled process runs twice, for A and for B frames (default 120 and
# 720); every figure is (count at B - count at A) / (B - A), so start-up and
# shutdown cancel out. The other side runs normally (plugin from
# target/release, or $GST_PLUGIN_PATH). Needs valgrind, strace and GNU time.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROLE=${1:?usage: $0 consumer|producer [options]}; shift
TRANSPORT=bufshare CONSUMERS=1 SIZE=320x240 FPS=60 FRAMES=120,720 SRC_PROPS=
while [ $# -gt 0 ]; do
  case $1 in
    --transport) TRANSPORT=$2; shift 2;;
    --consumers) CONSUMERS=$2; shift 2;;
    --size) SIZE=$2; shift 2;;
    --fps) FPS=$2; shift 2;;
    --frames) FRAMES=$2; shift 2;;
    --src-props) SRC_PROPS=$2; shift 2;;
    *) echo "unknown option $1" >&2; exit 2;;
  esac
done
A=${FRAMES%,*} B=${FRAMES#*,}
W=${SIZE%x*} H=${SIZE#*x}
export GST_PLUGIN_PATH=${GST_PLUGIN_PATH:-$PWD/target/release}
TMP=$(mktemp -d); trap 'kill $(jobs -p) 2>/dev/null; rm -rf "$TMP"' EXIT
# A registry of its own, filled now: a plugin scan inside one of the runs
# would count as frames' cost.
export GST_REGISTRY=$TMP/registry.bin
gst-inspect-1.0 >/dev/null 2>&1
SOCK=$TMP/link.sock
CAPS="video/x-raw,format=NV12,width=$W,height=$H,framerate=$FPS/1"
SRC="videotestsrc is-live=true pattern=solid-color"
producer() { # $1: extra videotestsrc args
  case $TRANSPORT in
    bufshare) echo "$SRC $1 ! $CAPS ! bufsharesink socket=$SOCK";;
    shm) echo "$SRC $1 ! $CAPS ! shmsink socket-path=$SOCK wait-for-connection=false shm-size=$((W * H * 3 / 2 * 20)) sync=true";;
  esac
}
consumer() { # $1: extra source args
  case $TRANSPORT in
    bufshare) echo "bufsharesrc socket=$SOCK $SRC_PROPS $1 ! fakesink sync=false";;
    shm) echo "shmsrc socket-path=$SOCK is-live=true $1 ! $CAPS ! fakesink sync=false";;
  esac
}
wait_socket() { for _ in $(seq 300); do [ -S "$SOCK" ] && return 0; sleep 0.1; done; echo "no socket" >&2; exit 1; }

# Runs the profiled side for N frames under the command prefix $2..., the
# other side normally.
under() {
  local n=$1 pids=() target; shift
  rm -f "$SOCK"
  if [ "$ROLE" = producer ]; then
    # shellcheck disable=SC2046
    "$@" gst-launch-1.0 -q $(producer "num-buffers=$n") >/dev/null 2>>"$TMP/log" &
    target=$!
    wait_socket
    for _ in $(seq "$CONSUMERS"); do
      # shellcheck disable=SC2046
      gst-launch-1.0 -q $(consumer "") >/dev/null 2>&1 & pids+=($!)
    done
    wait "$target" || true
  else
    # shellcheck disable=SC2046
    gst-launch-1.0 -q $(producer "") >/dev/null 2>&1 & pids+=($!)
    wait_socket
    for _ in $(seq $((CONSUMERS - 1))); do
      # shellcheck disable=SC2046
      gst-launch-1.0 -q $(consumer "") >/dev/null 2>&1 & pids+=($!)
    done
    # shellcheck disable=SC2046
    "$@" gst-launch-1.0 -q $(consumer "num-buffers=$n") >/dev/null 2>>"$TMP/log" || true
  fi
  kill "${pids[@]}" 2>/dev/null || true
  wait "${pids[@]}" 2>/dev/null || true
}

# One run of each tool for N frames: prints "instructions syscalls switches
# page-faults".
run() {
  local n=$1
  under "$n" valgrind --tool=callgrind --callgrind-out-file="$TMP/cg.$n"
  local ir; ir=$(grep -h '^summary:' "$TMP"/cg."$n"* | awk '{s += $2} END {print s}')
  under "$n" strace -f -c -o "$TMP/syscalls.$n"
  local sc; sc=$(awk '$NF == "total" {print $4}' "$TMP/syscalls.$n")
  under "$n" /usr/bin/time -o "$TMP/time.$n" -f "%w %c %R"
  local cs pf; read -r cs pf < <(tail -n 1 "$TMP/time.$n" | awk '{print $1 + $2, $3}')
  echo "$ir $sc $cs $pf"
}
read -r IR_A SC_A CS_A PF_A < <(run "$A")
read -r IR_B SC_B CS_B PF_B < <(run "$B")
FR=$((B - A))
echo "$TRANSPORT $ROLE, $CONSUMERS consumer(s), ${W}x${H} at $FPS fps, frames $A and $B:"
awk -v a="$IR_A" -v b="$IR_B" -v f="$FR" 'BEGIN {printf "  instructions per frame: %.1fk\n", (b - a) / f / 1000}'
awk -v a="$SC_A" -v b="$SC_B" -v f="$FR" 'BEGIN {printf "  syscalls per frame:     %.2f\n", (b - a) / f}'
awk -v a="$CS_A" -v b="$CS_B" -v f="$FR" 'BEGIN {printf "  context switches per frame (voluntary + involuntary): %.2f\n", (b - a) / f}'
awk -v a="$PF_A" -v b="$PF_B" -v f="$FR" 'BEGIN {printf "  page faults per frame (minor): %.2f\n", (b - a) / f}'
echo "  syscalls per frame by name (calls at $B minus at $A, / $FR):"
calls() { awk 'NR > 2 && $NF != "total" && $1 !~ /^-/ {print $NF, $4}' "$1" | sort; }
join -a2 -e0 -o 0,1.2,2.2 <(calls "$TMP/syscalls.$A") <(calls "$TMP/syscalls.$B") |
  awk -v f="$FR" '{d = ($3 - $2) / f; if (d >= 0.05) printf "    %-16s %.2f\n", $1, d}'
