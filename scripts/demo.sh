#!/usr/bin/env bash
# bufshare demo: one live producer process shares its frames, without copying them, over one UNIX
# socket with three consumer processes: a recorder, an "inference" consumer and an RTSP relay
# (bufshare rtsp), which a real RTSP client (ffprobe) plays. Shows the tools: bufshare ls, then
# bufshare top for 5 s in a terminal (bufshare dump snapshots when stdout is not a terminal), and
# ends with a summary taken from the files, the consumers and bufshare dump.
#
#   scripts/demo.sh                       # videotestsrc, 10 seconds
#   scripts/demo.sh --duration 30         # or DURATION=30 scripts/demo.sh
#   scripts/demo.sh /dev/video0           # a V4L2 camera instead (or DEVICE=/dev/video0)
#
# Environment: DURATION (seconds, default 10), DEVICE (V4L2 capture device), OUT (output directory,
# default: a new directory under /tmp). The socket goes in a new directory under /tmp, removed at
# the end. Ctrl-C (also q in top) stops early: every process is stopped, the recording is
# finalized and the summary printed. Needs Debian 12 with Rust; installs missing packages with
# scripts/install-deps.sh and builds the plugin and the bufshare tool with cargo first.
set -euo pipefail

usage() {
  sed -n '2,16s/^# \{0,1\}//p' "${BASH_SOURCE[0]}"
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

# ---------------------------------------------------------------------------------------------
echo "==> Checking Debian packages (scripts/install-deps.sh)"
"$root/scripts/install-deps.sh"

echo "==> Building the plugin and the bufshare tool (cargo build --release -p gst-plugin-bufshare -p bufshare-cli)"
cargo build --release -p gst-plugin-bufshare -p bufshare-cli

target_dir=${CARGO_TARGET_DIR:-$root/target}
[[ $target_dir = /* ]] || target_dir=$root/$target_dir
plugin_dir=$target_dir/release
bufshare=$plugin_dir/bufshare
[[ -f $plugin_dir/libgstbufshare.so ]] || die "build finished but $plugin_dir/libgstbufshare.so is missing"
[[ -x $bufshare ]] || die "build finished but $bufshare is missing"
export GST_PLUGIN_PATH=$plugin_dir${GST_PLUGIN_PATH:+:$GST_PLUGIN_PATH}
gst-inspect-1.0 bufsharesink >/dev/null 2>&1 ||
  die "GStreamer cannot load bufsharesink from $plugin_dir (try: GST_PLUGIN_PATH=$plugin_dir gst-inspect-1.0 bufsharesink)"
command -v ffprobe >/dev/null 2>&1 || die "ffprobe (Debian package ffmpeg) is missing; run scripts/install-deps.sh"

# The producer's socket, in a directory of its own that bufshare ls and top are pointed at (a
# short path: sockaddr_un holds at most 107 bytes). Removed at exit.
sockdir=$(mktemp -d /tmp/bufshare-demo-run.XXXXXX)
sock=$sockdir/camera.sock
rtsp_path=/cam

# ---------------------------------------------------------------------------------------------
names=()         # start order
declare -A pid   # name -> pid
declare -A rc    # name -> exit status once reaped
declare -A note  # name -> why it counts as failed, if it does
declare -A sig   # name -> the signal that stops it (default INT)

# Children get their own session (setsid) so a Ctrl-C in the terminal reaches only this script;
# the trap then stops them in order, consumers first, with exactly one signal each: SIGINT for
# gst-launch-1.0 -e (it turns it into EOS so the muxer finalizes its file; it watches for the
# first SIGINT only), SIGTERM for bufshare rtsp and the RTSP client (a background process of a
# script starts with SIGINT ignored, and they do not catch it).
launcher=()
command -v setsid >/dev/null 2>&1 && launcher=(setsid)

# start NAME COMMAND...: runs COMMAND in the background, output in $out/NAME.log.
start() {
  local name=$1
  shift
  "${launcher[@]}" "$@" >"$out/$name.log" 2>&1 </dev/null &
  pid[$name]=$!
  names+=("$name")
  printf '    %-11s pid %-7s %s\n' "$name" "${pid[$name]}" "$*"
}

alive() {
  kill -0 "${pid[$1]}" 2>/dev/null
}

stopsig() {
  echo "${sig[$1]:-INT}"
}

reap() {
  local name=$1 status=0 expected
  [[ -z ${rc[$name]:-} ]] || return 0
  wait "${pid[$name]}" 2>/dev/null || status=$?
  rc[$name]=$status
  # Ended by our SIGTERM (128 + 15) is how bufshare rtsp stops.
  expected=0
  [[ $(stopsig "$name") != TERM ]] || expected=143
  if [[ $status -ne 0 && $status -ne $expected && -z ${note[$name]:-} ]]; then
    note[$name]="exited with status $status"
  fi
}

# stop NAME...: one signal each (SIGINT, or the one in sig[]), wait up to 20 s, then escalate to
# SIGTERM and SIGKILL, which counts as a failure.
stop() {
  local name deadline
  for name in "$@"; do
    if alive "$name"; then
      kill "-$(stopsig "$name")" "${pid[$name]}" 2>/dev/null || true
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
      note[$name]="did not stop within 20 s of SIG$(stopsig "$name"); killed"
      kill -TERM "${pid[$name]}" 2>/dev/null || true
      sleep 1
      kill -KILL "${pid[$name]}" 2>/dev/null || true
    fi
    reap "$name"
  done
}

consumers=()
client_stopped=0
stop_all() {
  [[ ${#names[@]} -gt 0 ]] || return 0
  if [[ -n ${pid[rtsp-client]:-} ]] && alive rtsp-client; then
    echo "==> Stopping the RTSP client"
    client_stopped=1
    stop rtsp-client
  fi
  if [[ ${#consumers[@]} -gt 0 ]]; then
    echo "==> Stopping the consumers (SIGINT: EOS, so the recording is finalized; SIGTERM: the RTSP relay)"
    stop "${consumers[@]}"
  fi
  if [[ -n ${pid[producer]:-} ]]; then
    echo "==> Stopping the producer"
    stop producer
  fi
}

# The producer's statistics in text (bufshare dump), saved in $out; this is where the summary's
# per-consumer lines come from. Taken before the consumers are stopped.
final_dump() {
  if [[ -z ${pid[producer]:-} ]] || ! alive producer; then
    return 0
  fi
  "$bufshare" dump "$sock" >"$out/dump.txt" 2>&1 || true
  "$bufshare" dump --json "$sock" >"$out/dump.json" 2>&1 || true
}

on_signal() {
  trap - INT TERM
  # After a Ctrl-C in a pipeline (demo.sh | tee log) the reader may be gone: carry on, on stderr.
  trap '' PIPE
  set +e
  { echo; } 2>/dev/null || exec 1>&2
  echo "demo.sh: interrupted; stopping every process (logs in $out)"
  stop_early
}

stop_early() {
  final_dump
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
  # The producer removes its socket when it stops; one it could not remove goes here.
  rm -f "$sock"
  rmdir "$sockdir" 2>/dev/null || true
}

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

# The consumer count in a bufshare dump of the producer (empty when it does not answer).
num_consumers() {
  "$bufshare" dump "$sock" 2>/dev/null | sed -n 's/^consumers: *//p' || true
}

# What the RTSP client got: "N frames decoded (codec WxH)", or why not.
rtsp_result() {
  local log=$out/rtsp-client.log frames codec w h
  if [[ -z ${pid[rtsp-client]:-} ]]; then
    echo "not started"
    return
  fi
  if alive rtsp-client; then
    echo "playing"
    return
  fi
  frames=$(sed -n 's/^nb_read_frames=//p' "$log" | head -n 1)
  codec=$(sed -n 's/^codec_name=//p' "$log" | head -n 1)
  w=$(sed -n 's/^width=//p' "$log" | head -n 1)
  h=$(sed -n 's/^height=//p' "$log" | head -n 1)
  if [[ $frames =~ ^[0-9]+$ && $frames -gt 0 ]]; then
    echo "$frames frames decoded ($codec ${w}x$h)"
  elif [[ $client_stopped -eq 1 ]]; then
    echo "stopped before it reported"
  else
    echo "NO frames decoded ($(grep -v '^$' "$log" | tail -n 1 || true); log $log)"
  fi
}

# summary: each process's result, what each consumer got, and the consumers as the producer saw
# them. Sets failed=1 when a process failed, the recording is missing or not playable, or the RTSP
# client decoded nothing.
failed=0
summary() {
  local name path disc dur codec frames info row p label have_discoverer=0
  echo
  echo "==> Summary (files and logs in $out)"
  echo "  processes:"
  for name in "${names[@]}"; do
    if [[ -n ${note[$name]:-} ]]; then
      failed=1
      printf '    %-11s FAILED: %s (log %s)\n' "$name" "${note[$name]}" "$out/$name.log"
    else
      printf '    %-11s ok\n' "$name"
    fi
  done

  path=$out/recording.avi
  command -v gst-discoverer-1.0 >/dev/null 2>&1 && have_discoverer=1
  if [[ ! -s $path ]]; then
    failed=1
    echo "  recorder:    $path MISSING or empty"
  else
    # Frames in the file: one MJPEG packet each (counted without decoding).
    frames=$(ffprobe -v error -select_streams v:0 -count_packets -show_entries stream=nb_read_packets \
      -of csv=p=0 "$path" 2>/dev/null | head -n 1 || true)
    info=""
    if [[ $have_discoverer -eq 1 ]]; then
      # gst-discoverer-1.0 exits 0 even when it fails: judge by its output.
      disc=$(gst-discoverer-1.0 "$path" 2>&1 || true)
      dur=$(printf '%s\n' "$disc" | sed -n 's/^ *Duration: *//p' | head -n 1)
      if [[ $disc == *"error was encountered"* || -z $dur || $disc != *"video #"* ]]; then
        failed=1
        info=", NOT PLAYABLE: $(printf '%s\n' "$disc" | grep -v '^$' | tail -n 2 | tr '\n' ' ' || true)"
      else
        codec=$(printf '%s\n' "$disc" | sed -n 's/^ *video #[0-9]*: *//p' | head -n 1)
        # 0:00:07.500000000 -> 7.5 s
        dur=$(awk -F: '{ printf "%.1f s", $1 * 3600 + $2 * 60 + $3 }' <<<"$dur")
        info=", $dur, $codec"
      fi
    fi
    echo "  recorder:    ${frames:-?} frames in $path ($(size_of "$path")$info)"
  fi
  echo "  inference:   $(inference_fps)"
  info=$(rtsp_result)
  [[ $info != NO* && $info != "not started" ]] || failed=1
  echo "  RTSP client: $info from ${rtsp_url:-the relay}"

  if [[ -s $out/dump.txt ]] && grep -q '^ *PID ' "$out/dump.txt"; then
    echo "  consumers as the producer counted them just before the stop (bufshare dump; JSON in $out/dump.json):"
    while IFS= read -r row; do
      p=$(awk '{ print $1 }' <<<"$row")
      label=""
      if [[ $p == PID ]]; then
        label=process
      else
        for name in "${!pid[@]}"; do
          [[ ${pid[$name]} != "$p" ]] || label=$name
        done
      fi
      printf '    %-10s%s\n' "${label:--}" "$row"
    done < <(sed -n '/^ *PID /,$p' "$out/dump.txt")
  elif [[ -s $out/dump.txt ]]; then
    echo "  bufshare dump: $(head -n 1 "$out/dump.txt")"
  fi
}

trap on_signal INT TERM
trap on_exit EXIT

# ---------------------------------------------------------------------------------------------
echo "==> Output directory: $out (logs: $out/<process>.log)"
echo "==> Starting the producer (socket $sock)"
if [[ -n $device ]]; then
  start producer gst-launch-1.0 -e v4l2src device="$device" ! videoconvert ! video/x-raw,format=NV12 \
    ! bufsharesink socket="$sock"
else
  start producer gst-launch-1.0 -e videotestsrc is-live=true pattern=ball \
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
start_time=$SECONDS
# timeout: how long each consumer's start may wait for the producer's handshake and caps (a camera
# can take a moment to negotiate); the default is 1000 ms.
start recorder gst-launch-1.0 -e bufsharesrc socket="$sock" timeout=5000 \
  ! videoconvert ! jpegenc ! avimux ! filesink location="$out/recording.avi"
consumers+=(recorder)
start inference gst-launch-1.0 -v bufsharesrc socket="$sock" timeout=5000 \
  ! videoscale ! video/x-raw,width=224,height=224 ! videoconvert ! video/x-raw,format=RGB \
  ! fpsdisplaysink video-sink=fakesink text-overlay=false
consumers+=(inference)
# Port 0: the kernel picks a free port; bufshare rtsp prints the URL it serves.
sig[rtsp]=TERM
start rtsp "$bufshare" rtsp --socket "$sock" --path "$rtsp_path" --port 0 --address 127.0.0.1
consumers+=(rtsp)

# any_died: the first process that is no longer running, if any.
any_died() {
  local name
  for name in "${names[@]}"; do
    [[ $name != rtsp-client ]] || continue
    if ! alive "$name"; then
      echo "$name"
      return
    fi
  done
}

died=""
fail_early() {
  note[$died]="exited early, after $((SECONDS - start_time)) s"
  echo "demo.sh: $died exited early; last lines of its log:" >&2
  tail -n 10 "$out/$died.log" >&2
  final_dump
  stop_all
  summary
  echo "==> Demo FAILED (see the logs above)"
  exit 1
}

# wait_until DESCRIPTION SECONDS COMMAND...: polls COMMAND every 0.5 s; fails the demo when a
# process dies, warns when the time is up.
wait_until() {
  local what=$1 limit=$((SECONDS + $2))
  shift 2
  until "$@"; do
    died=$(any_died)
    [[ -z $died ]] || fail_early
    if [[ $SECONDS -ge $limit ]]; then
      echo "demo.sh: warning: still $what after $2 s" >&2
      return 0
    fi
    sleep 0.5
  done
}

rtsp_url=""
rtsp_served() {
  local port
  port=$(sed -n 's|^serving rtsp://[^ ]*:\([0-9][0-9]*\)/.*|\1|p' "$out/rtsp.log" | head -n 1)
  [[ -n $port ]] || return 1
  rtsp_url=rtsp://127.0.0.1:$port$rtsp_path
}
consumers_at_least() {
  local n
  n=$(num_consumers)
  [[ -n $n && $n -ge $1 ]]
}

wait_until "waiting for the RTSP relay to listen" 15 rtsp_served
wait_until "waiting for the recorder and the inference consumer to connect" 15 consumers_at_least 2
if [[ -n $rtsp_url ]]; then
  echo "==> Playing $rtsp_url with an RTSP client (ffprobe over TCP: it decodes 3 s of the stream)"
  # The relay connects its bufsharesrc when the first client asks for the stream.
  sig[rtsp-client]=TERM
  start rtsp-client timeout 30 ffprobe -v error -rtsp_transport tcp -count_frames -read_intervals %+3 \
    -select_streams v:0 -show_entries stream=codec_name,width,height,nb_read_frames -of default=nw=1 \
    "$rtsp_url"
  wait_until "waiting for the RTSP relay to connect to the producer" 15 consumers_at_least 3
fi

echo "==> bufshare ls $sockdir"
"$bufshare" ls "$sockdir" | sed 's/^/    /' || true

# The live view: bufshare top for up to 5 s of the run when stdout is a terminal, else bufshare dump
# snapshots (top draws a full-screen view and needs a terminal).
view=$((duration - (SECONDS - start_time)))
[[ $view -le 5 ]] || view=5
if [[ $view -gt 0 && -t 1 ]]; then
  echo "==> bufshare top $sockdir for $view s (q or Ctrl-C stops the demo early)"
  saved_tty=""
  [[ ! -t 0 ]] || saved_tty=$(stty -g 2>/dev/null || true)
  status=0
  # --foreground: top stays in the terminal's foreground process group, so it may set raw mode and
  # read keys; on SIGTERM it restores the terminal and leaves, as on q or Ctrl-C.
  timeout --foreground -k 2 "$view" "$bufshare" top "$sockdir" || status=$?
  if [[ $status -eq 137 ]]; then
    printf '\033[?25h\033[?1049l' # top was killed: leave its screen, show the cursor
  fi
  [[ -z $saved_tty ]] || stty "$saved_tty" 2>/dev/null || true
  case $status in
    124) echo "    (top ran for $view s on the terminal's alternate screen; the summary has the last figures)" ;;
    0)
      echo
      echo "demo.sh: top was quit (q or Ctrl-C); stopping every process (logs in $out)"
      trap - INT TERM
      stop_early
      ;;
    *) echo "demo.sh: warning: bufshare top ended with status $status" >&2 ;;
  esac
elif [[ $view -gt 0 ]]; then
  echo "==> stdout is not a terminal, so instead of bufshare top (which draws on one): bufshare dump $sock"
  view_end=$((SECONDS + view))
  while :; do
    died=$(any_died)
    [[ -z $died ]] || fail_early
    echo "    [$((SECONDS - start_time))s]"
    "$bufshare" dump "$sock" 2>&1 | grep -v '^socket:\|^caps:' | sed 's/^/    /' || true
    [[ $((SECONDS + 3)) -le $view_end ]] || break
    sleep 2
  done
  sleep $((view_end > SECONDS ? view_end - SECONDS : 0))
fi

remaining=$((duration - (SECONDS - start_time)))
if [[ $remaining -gt 0 ]]; then
  echo "==> Running $remaining s more (Ctrl-C stops early)"
fi
while [[ $((SECONDS - start_time)) -lt $duration ]]; do
  sleep 1
  died=$(any_died)
  [[ -z $died ]] || fail_early
  elapsed=$((SECONDS - start_time))
  if [[ $((elapsed % 2)) -eq 0 || $elapsed -ge $duration ]]; then
    printf '    [%3ds] inference: %s | recording.avi %s | RTSP client: %s\n' "$elapsed" \
      "$(inference_fps)" "$(size_of "$out/recording.avi")" "$(rtsp_result)"
  fi
done

if [[ -n ${pid[rtsp-client]:-} ]] && alive rtsp-client; then
  echo "==> Waiting for the RTSP client to finish"
  while alive rtsp-client; do
    sleep 0.5
  done
fi
[[ -z ${pid[rtsp-client]:-} ]] || reap rtsp-client

final_dump
stop_all
trap - INT TERM

summary
if [[ $failed -ne 0 ]]; then
  echo "==> Demo FAILED (see the logs above)"
  exit 1
fi
echo "==> Demo OK"
