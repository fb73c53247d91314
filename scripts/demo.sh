#!/usr/bin/env bash
# bufshare demo: one live producer process shares its frames with three consumer processes
# (recorder, "inference", encoder) over one UNIX socket, without copying the frames.
#
#   scripts/demo.sh                       # videotestsrc, 10 seconds
#   scripts/demo.sh --duration 30         # or DURATION=30 scripts/demo.sh
#   scripts/demo.sh /dev/video0           # a V4L2 camera instead (or DEVICE=/dev/video0)
#
# Environment: DURATION (seconds, default 10), DEVICE (V4L2 capture device), OUT (output directory,
# default: a new directory under /tmp). Needs Debian 12 with Rust; installs missing packages with
# scripts/install-deps.sh and builds the plugin with cargo first.
set -euo pipefail

usage() {
  sed -n '2,11s/^# \{0,1\}//p' "${BASH_SOURCE[0]}"
}

die() {
  echo "demo.sh: error: $*" >&2
  exit 1
}

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"

duration=${DURATION:-10}
device=${DEVICE:-}
while [[ $# -gt 0 ]]; do
  case $1 in
    --duration)
      [[ $# -ge 2 ]] || die "--duration needs a number of seconds"
      duration=$2
      shift 2
      ;;
    --duration=*)
      duration=${1#--duration=}
      shift
      ;;
    -h | --help)
      usage
      exit 0
      ;;
    -*) die "unknown option '$1' (try --help)" ;;
    *)
      [[ -z ${device_arg:-} ]] || die "only one device may be given"
      device_arg=$1
      device=$1
      shift
      ;;
  esac
done

[[ $duration =~ ^[0-9]+$ && $duration -gt 0 ]] || die "duration must be a whole number of seconds > 0, got '$duration'"
if [[ -n $device ]]; then
  [[ -e $device ]] || die "camera device '$device' does not exist (list devices with: ls /dev/video*)"
  [[ -c $device ]] || die "'$device' is not a character device; expected a V4L2 capture device such as /dev/video0"
  v4l2_name=$(basename "$(readlink -f "$device")")
  [[ ! -d /sys/class/video4linux || -e /sys/class/video4linux/$v4l2_name ]] ||
    die "'$device' is not a V4L2 device (no /sys/class/video4linux/$v4l2_name)"
  [[ -r $device && -w $device ]] || die "no read/write access to '$device' (are you in the 'video' group?)"
fi

if [[ -n ${OUT:-} ]]; then
  mkdir -p "$OUT"
  out=$(cd "$OUT" && pwd)
else
  out=$(mktemp -d /tmp/bufshare-demo.XXXXXX)
fi
[[ $out != *[[:space:]]* ]] || die "the output directory must not contain spaces: '$out'"
sock=$out/bufshare.sock
if [[ ${#sock} -gt 100 ]]; then
  # sockaddr_un holds at most 107 bytes of path
  sock=$(mktemp -u /tmp/bufshare-demo-XXXXXX.sock)
fi

# ---------------------------------------------------------------------------------------------
echo "==> Checking Debian packages (scripts/install-deps.sh)"
"$root/scripts/install-deps.sh"

echo "==> Building the plugin (cargo build --release -p gst-plugin-bufshare)"
cargo build --release -p gst-plugin-bufshare

target_dir=${CARGO_TARGET_DIR:-$root/target}
[[ $target_dir = /* ]] || target_dir=$root/$target_dir
plugin_dir=$target_dir/release
[[ -f $plugin_dir/libgstbufshare.so ]] || die "build finished but $plugin_dir/libgstbufshare.so is missing"
export GST_PLUGIN_PATH=$plugin_dir${GST_PLUGIN_PATH:+:$GST_PLUGIN_PATH}
gst-inspect-1.0 bufsharesink >/dev/null 2>&1 ||
  die "GStreamer cannot load bufsharesink from $plugin_dir (try: GST_PLUGIN_PATH=$plugin_dir gst-inspect-1.0 bufsharesink)"

# ---------------------------------------------------------------------------------------------
names=()         # start order
declare -A pid   # name -> pid
declare -A rc    # name -> exit status once reaped
declare -A note  # name -> why it counts as failed, if it does

# Children get their own session (setsid) so a Ctrl-C in the terminal reaches only this script;
# the trap then stops them in order, consumers first, with exactly one SIGINT each (gst-launch-1.0
# -e turns it into EOS so the muxers finalize their files; it watches for the first SIGINT only).
launcher=()
command -v setsid >/dev/null 2>&1 && launcher=(setsid)

start() {
  local name=$1
  shift
  "${launcher[@]}" gst-launch-1.0 "$@" >"$out/$name.log" 2>&1 </dev/null &
  pid[$name]=$!
  names+=("$name")
  printf '    %-9s pid %-7s gst-launch-1.0 %s\n' "$name" "${pid[$name]}" "$*"
}

alive() {
  kill -0 "${pid[$1]}" 2>/dev/null
}

reap() {
  local name=$1 status=0
  [[ -z ${rc[$name]:-} ]] || return 0
  wait "${pid[$name]}" 2>/dev/null || status=$?
  rc[$name]=$status
  if [[ $status -ne 0 && -z ${note[$name]:-} ]]; then
    note[$name]="exited with status $status"
  fi
}

# stop NAME...: one SIGINT each (gst-launch -e sends EOS so muxers finalize), wait up to 20 s,
# then escalate to SIGTERM and SIGKILL, which counts as a failure.
stop() {
  local name deadline
  for name in "$@"; do
    if alive "$name"; then
      kill -INT "${pid[$name]}" 2>/dev/null || true
    elif [[ -z ${rc[$name]:-} && -z ${note[$name]:-} ]]; then
      note[$name]="exited before it was stopped"
    fi
  done
  deadline=$((SECONDS + 20))
  for name in "$@"; do
    while alive "$name" && [[ $SECONDS -lt $deadline ]]; do
      sleep 0.2
    done
    if alive "$name"; then
      note[$name]="did not stop within 20 s of SIGINT; killed"
      kill -TERM "${pid[$name]}" 2>/dev/null || true
      sleep 1
      kill -KILL "${pid[$name]}" 2>/dev/null || true
    fi
    reap "$name"
  done
}

consumers=()
stop_all() {
  [[ ${#names[@]} -gt 0 ]] || return 0
  if [[ ${#consumers[@]} -gt 0 ]]; then
    echo "==> Stopping consumers with SIGINT (EOS, so the files are finalized)"
    stop "${consumers[@]}"
  fi
  if [[ -n ${pid[producer]:-} ]]; then
    echo "==> Stopping the producer"
    stop producer
  fi
}

on_signal() {
  trap - INT TERM
  echo
  echo "demo.sh: interrupted; stopping the pipelines (logs in $out)"
  stop_all
  [[ ${#names[@]} -eq 0 ]] || summary
  exit 130
}

on_exit() {
  local name
  for name in "${names[@]}"; do
    if alive "$name"; then
      kill -TERM "${pid[$name]}" 2>/dev/null || true
    fi
  done
  if [[ $sock != "$out"/* ]]; then
    rm -f "$sock"
  fi
}

# summary: which processes failed, the files written with sizes and (gst-discoverer-1.0) durations.
# Sets failed=1 when a process failed or a file is missing or not playable.
failed=0
summary() {
  local name f path info disc dur codec have_discoverer=0
  echo
  echo "==> Summary"
  echo "  processes:"
  for name in "${names[@]}"; do
    if [[ -n ${note[$name]:-} ]]; then
      failed=1
      printf '    %-9s FAILED: %s (log %s)\n' "$name" "${note[$name]}" "$out/$name.log"
    else
      printf '    %-9s ok\n' "$name"
    fi
  done

  echo "  inference (224x224 RGB, fpsdisplaysink): $(inference_fps)"

  command -v gst-discoverer-1.0 >/dev/null 2>&1 && have_discoverer=1
  echo "  files in $out:"
  for f in recording.avi encoded.mp4; do
    path=$out/$f
    if [[ ! -s $path ]]; then
      failed=1
      printf '    %-14s MISSING or empty\n' "$f"
      continue
    fi
    info=""
    if [[ $have_discoverer -eq 1 ]]; then
      # gst-discoverer-1.0 exits 0 even when it fails: judge by its output.
      disc=$(gst-discoverer-1.0 "$path" 2>&1 || true)
      dur=$(printf '%s\n' "$disc" | sed -n 's/^ *Duration: *//p' | head -n 1)
      if [[ $disc == *"error was encountered"* || -z $dur || $disc != *"video #"* ]]; then
        failed=1
        info="NOT PLAYABLE: $(printf '%s\n' "$disc" | grep -v '^$' | tail -n 2 | tr '\n' ' ' || true)"
      else
        codec=$(printf '%s\n' "$disc" | sed -n 's/^ *video #[0-9]*: *//p' | head -n 1)
        info="duration $dur, $codec"
      fi
    fi
    printf '    %-14s %10s  %s\n' "$f" "$(size_of "$path")" "$info"
  done
  for name in "${names[@]}"; do
    printf '    %-14s %10s\n' "$name.log" "$(size_of "$out/$name.log")"
  done
  if [[ $have_discoverer -eq 0 ]]; then
    echo "  (install gstreamer1.0-plugins-base-apps for gst-discoverer-1.0 to check the files)"
  fi
}

trap on_signal INT TERM
trap on_exit EXIT

# ---------------------------------------------------------------------------------------------
echo "==> Output directory: $out (logs: $out/<process>.log)"
echo "==> Starting the producer (socket $sock)"
if [[ -n $device ]]; then
  start producer -e v4l2src device="$device" ! videoconvert ! video/x-raw,format=NV12 \
    ! bufsharesink socket="$sock"
else
  start producer -e videotestsrc is-live=true pattern=ball \
    ! video/x-raw,format=NV12,width=1280,height=720,framerate=30/1 \
    ! bufsharesink socket="$sock"
fi

# Wait for the producer to serve the socket (the first run scans the GStreamer registry).
deadline=$((SECONDS + 30))
until [[ -S $sock ]]; do
  if ! alive producer; then
    reap producer
    echo "demo.sh: the producer exited before serving $sock; its log:" >&2
    tail -n 20 "$out/producer.log" >&2
    exit 1
  fi
  [[ $SECONDS -lt $deadline ]] || die "the producer did not create $sock within 30 s (log: $out/producer.log)"
  sleep 0.1
done

echo "==> Starting three consumer processes"
# timeout: how long each consumer's start may wait for the producer's handshake and caps (a camera
# can take a moment to negotiate); the default is 1000 ms.
start recorder -e bufsharesrc socket="$sock" timeout=5000 \
  ! videoconvert ! jpegenc ! avimux ! filesink location="$out/recording.avi"
consumers+=(recorder)
start inference -v bufsharesrc socket="$sock" timeout=5000 \
  ! videoscale ! video/x-raw,width=224,height=224 ! videoconvert ! video/x-raw,format=RGB \
  ! fpsdisplaysink video-sink=fakesink text-overlay=false
consumers+=(inference)
start encoder -e bufsharesrc socket="$sock" timeout=5000 \
  ! videoconvert ! x264enc tune=zerolatency speed-preset=ultrafast ! h264parse ! mp4mux \
  ! filesink location="$out/encoded.mp4"
consumers+=(encoder)

size_of() {
  local bytes
  bytes=$(stat -c %s "$1" 2>/dev/null || echo 0)
  if [[ $bytes -ge 1048576 ]]; then
    awk -v b="$bytes" 'BEGIN { printf "%.1f MiB", b / 1048576 }'
  elif [[ $bytes -ge 1024 ]]; then
    awk -v b="$bytes" 'BEGIN { printf "%.0f KiB", b / 1024 }'
  else
    echo "$bytes B"
  fi
}

inference_fps() {
  # fpsdisplaysink -v: "... last-message = rendered: 60, dropped: 0, current: 30.01, average: 29.98"
  local line
  line=$(grep -a 'last-message = ' "$out/inference.log" 2>/dev/null | tail -n 1 || true)
  if [[ -n $line ]]; then
    echo "${line##*last-message = }"
  else
    echo "waiting for frames"
  fi
}

echo "==> Running for $duration s (Ctrl-C stops early)"
start_time=$SECONDS
died=""
while [[ $((SECONDS - start_time)) -lt $duration ]]; do
  sleep 1
  for name in "${names[@]}"; do
    if ! alive "$name"; then
      died=$name
      break 2
    fi
  done
  elapsed=$((SECONDS - start_time))
  if [[ $((elapsed % 2)) -eq 0 || $elapsed -ge $duration ]]; then
    printf '    [%3ds] inference: %s | recording.avi %s | encoded.mp4 %s\n' "$elapsed" \
      "$(inference_fps)" "$(size_of "$out/recording.avi")" "$(size_of "$out/encoded.mp4")"
  fi
done
if [[ -n $died ]]; then
  note[$died]="exited early, after $((SECONDS - start_time)) s"
  echo "demo.sh: $died exited early; last lines of its log:" >&2
  tail -n 10 "$out/$died.log" >&2
fi

stop_all
trap - INT TERM

summary
if [[ $failed -ne 0 ]]; then
  echo "==> Demo FAILED (see the logs above)"
  exit 1
fi
echo "==> Demo OK"
