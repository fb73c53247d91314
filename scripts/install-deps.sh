#!/usr/bin/env bash
# Installs the Debian 12 (bookworm) packages needed to build bufshare, run its tests, the demo
# (scripts/demo.sh) and the benchmark. Only missing packages are installed; when everything is
# already present this prints nothing and does not touch apt.
#
# Usage: scripts/install-deps.sh
set -euo pipefail

packages=(
  # build: gstreamer-rs finds GStreamer with pkg-config; cc links the cdylib
  pkg-config
  gcc
  libc6-dev
  g++                             # CI checks that the fuzz target (libfuzzer-sys: C++) compiles
  libgstreamer1.0-dev
  libgstreamer-plugins-base1.0-dev
  libgstrtspserver-1.0-dev        # cli/: bufshare rtsp (gstreamer-rtsp-server)
  libucx-dev                      # ucx-sys/, ucx/: cross-host transport (UCX 1.13, pkg-config ucx)
  # run: gst-launch-1.0 / gst-inspect-1.0, and the elements the demo, tests and benchmark use
  gstreamer1.0-tools
  gstreamer1.0-plugins-base       # videotestsrc, videoconvert, videoscale, appsrc/appsink
  gstreamer1.0-plugins-good       # jpegenc, avimux, mp4mux, rtph264pay, udpsink, v4l2src
  gstreamer1.0-plugins-bad        # h264parse, fpsdisplaysink, shmsink/shmsrc (benchmark)
  gstreamer1.0-plugins-ugly       # x264enc
  gstreamer1.0-libav              # avenc_aac/avdec_aac (planar audio), avdec_h264 (tests, README)
  gstreamer1.0-plugins-base-apps  # gst-discoverer-1.0 (demo summary)
  # ucx/tests: the cross-namespace test runs its peers with ip netns exec over a veth pair
  iproute2
  # tests: count the fds passed with SCM_RIGHTS (and scripts/profile-per-frame.sh: syscalls)
  strace
  # cli/tests: ffprobe counts the frames an RTSP client decodes
  ffmpeg
  # cli/tests: bufshare top runs in a terminal (skipped, saying so, without it)
  tmux
  # bufshare-bench: the font of its PNG charts (DejaVuSans.ttf, read at run time; nothing to build against)
  fonts-dejavu-core
  # scripts/profile-per-frame.sh: instructions (callgrind) and context switches (GNU time)
  valgrind
  time
  # hwtests/run-vm.sh: boots the virtual board (virtme-ng comes from pip: hwtests/install-vm-deps.sh)
  qemu-system-x86
)

if ! command -v dpkg >/dev/null 2>&1 || ! command -v apt-get >/dev/null 2>&1; then
  echo "install-deps.sh: no dpkg/apt-get here; install the equivalents of these Debian packages yourself:" >&2
  echo "  ${packages[*]}" >&2
  exit 0
fi

missing=()
for pkg in "${packages[@]}"; do
  status=$(dpkg -s "$pkg" 2>/dev/null | sed -n 's/^Status: //p' || true)
  if [[ "$status" != "install ok installed" ]]; then
    missing+=("$pkg")
  fi
done

if [[ ${#missing[@]} -eq 0 ]]; then
  exit 0
fi

sudo=()
if [[ $(id -u) -ne 0 ]]; then
  if command -v sudo >/dev/null 2>&1; then
    sudo=(sudo)
  else
    echo "install-deps.sh: missing packages (${missing[*]}), and not root and no sudo to install them" >&2
    exit 1
  fi
fi

echo "install-deps.sh: installing ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
"${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update -qq </dev/null
"${sudo[@]}" env DEBIAN_FRONTEND=noninteractive \
  apt-get install -y -qq --no-install-recommends "${missing[@]}" </dev/null >/dev/null
echo "install-deps.sh: done"
