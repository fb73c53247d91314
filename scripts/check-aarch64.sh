#!/usr/bin/env bash
# Cross-builds the whole workspace for aarch64-unknown-linux-gnu (i.MX8 / QCS boards) with
# --all-features, so CI notices when a backend or feature stops compiling or linking for arm64.
#
# How: the cross linker (gcc-aarch64-linux-gnu) is installed on the host; the arm64 GStreamer libraries
# come from Debian's arm64 packages (libgstreamer1.0-dev, libgstreamer-plugins-base1.0-dev,
# libgstrtspserver-1.0-dev and their dependencies), downloaded with apt and unpacked into a private sysroot under target/ instead of being
# installed with dpkg. Reason: on Debian 12 libgstreamer-plugins-base1.0-dev is not "Multi-Arch: same",
# so installing its :arm64 flavour would REMOVE the amd64 one (and with it plugins-bad-dev) that
# scripts/install-deps.sh needs, and installing the other :arm64 libraries forces upgrades of the
# matching amd64 libraries. The sysroot leaves the host's dpkg database untouched (apart from the
# cross compiler and the arm64 package lists).
#
# Usage: scripts/check-aarch64.sh [extra cargo build args]   (root or sudo needed for apt)
#        eval "$(scripts/check-aarch64.sh --print-env)"     sets up the sysroot, then prints the
#            exports (PKG_CONFIG_*, linker) so that any cargo command can build for aarch64, e.g.
#            cargo build --release --target aarch64-unknown-linux-gnu -p gst-plugin-bufshare --features imx8
# Env:   AARCH64_SYSROOT (default: <target dir>/aarch64-sysroot), CARGO_TARGET_DIR.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
start=$(date +%s)
print_env=0
if [[ "${1:-}" == "--print-env" ]]; then
  print_env=1
  shift
  exec 3>&1 1>&2 # progress to stderr, only the exports to stdout
fi

target=aarch64-unknown-linux-gnu
multiarch=aarch64-linux-gnu
target_dir=${CARGO_TARGET_DIR:-$PWD/target}
sysroot=${AARCH64_SYSROOT:-$target_dir/aarch64-sysroot}
# The arm64 packages whose .pc files and libraries the gstreamer-rs crates link against.
# libgstrtspserver-1.0-dev: cli/ (bufshare rtsp) links gst-rtsp-server.
# libucx-dev: ucx-sys/ links libucp/libuct/libucs/libucm (feature ucx); its committed bindings
# were generated on x86_64, and bindgen's layout assertions in them now compile for arm64.
arm64_packages=(libgstreamer1.0-dev libgstreamer-plugins-base1.0-dev libgstrtspserver-1.0-dev libucx-dev)
host_packages=(gcc-aarch64-linux-gnu libc6-dev-arm64-cross pkg-config file)

sudo=()
if [[ $(id -u) -ne 0 ]]; then sudo=(sudo); fi
apt_get() { "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get "$@" </dev/null; }

if command -v rustup >/dev/null 2>&1; then
  echo "==> rustup target add $target"
  rustup target add "$target"
elif [[ ! -d "$(rustc --print target-libdir --target "$target" 2>/dev/null)" ]]; then
  echo "check-aarch64.sh: no rustup and no standard library for $target in this Rust installation" >&2
  exit 1
fi

echo "==> host packages: ${host_packages[*]}"
missing=()
for pkg in "${host_packages[@]}"; do
  status=$(dpkg -s "$pkg" 2>/dev/null | sed -n 's/^Status: //p' || true)
  [[ "$status" == "install ok installed" ]] || missing+=("$pkg")
done
need_update=0
if ! dpkg --print-foreign-architectures | grep -qx arm64; then
  echo "==> dpkg --add-architecture arm64 (for the arm64 package lists only)"
  "${sudo[@]}" dpkg --add-architecture arm64
  need_update=1
fi
if [[ $need_update -eq 1 || ${#missing[@]} -gt 0 ]] || ! apt-cache show "libgstreamer1.0-dev:arm64" >/dev/null 2>&1; then
  apt_get update -qq
fi
if [[ ${#missing[@]} -gt 0 ]]; then
  apt_get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

stamp="$sysroot/.packages"
wanted="${arm64_packages[*]}"
if [[ ! -f "$stamp" || "$(cat "$stamp")" != "$wanted" ]]; then
  echo "==> arm64 sysroot $sysroot from: $wanted (+ dependencies)"
  rm -rf "$sysroot"
  work="$sysroot.download"
  rm -rf "$work"
  mkdir -p "$work/archives/partial"
  : >"$work/status"
  # An empty dpkg status + arm64 as the only architecture: apt resolves the full arm64 dependency
  # closure and only downloads it.
  apt_get -qq -y --no-install-recommends --download-only \
    -o APT::Architecture=arm64 -o APT::Architectures::=arm64 \
    -o Dir::State::status="$work/status" -o Dir::Cache::archives="$work/archives" \
    install "${arm64_packages[@]}" >/dev/null
  mkdir -p "$sysroot.tmp"
  for deb in "$work"/archives/*.deb; do
    # libc6-dev's linker scripts (libc.so -> /lib/aarch64-linux-gnu/libc.so.6) would send ld to the
    # host's /lib; the cross toolchain's own libc6-dev-arm64-cross (same glibc 2.36) is used instead.
    case "$(basename "$deb")" in libc6-dev_*) continue ;; esac
    dpkg-deb -x "$deb" "$sysroot.tmp"
  done
  # Debian's -dev symlinks are sometimes absolute (libz.so -> /lib/aarch64-linux-gnu/libz.so.1):
  # point them into the sysroot.
  while IFS= read -r link; do
    dest=$(readlink "$link")
    if [[ "$dest" == /* ]]; then
      ln -sfn "$sysroot$dest" "$link"
    fi
  done < <(find "$sysroot.tmp" -type l)
  mv "$sysroot.tmp" "$sysroot"
  # fix the links made while the tree was still called .tmp
  while IFS= read -r link; do
    dest=$(readlink "$link")
    if [[ "$dest" == "$sysroot.tmp"/* ]]; then
      ln -sfn "$sysroot${dest#"$sysroot.tmp"}" "$link"
    fi
  done < <(find "$sysroot" -type l)
  rm -rf "$work"
  echo "$wanted" >"$stamp"
fi

libdir="$sysroot/usr/lib/$multiarch"
# pkg-config: only the arm64 .pc files, with their /usr paths prefixed by the sysroot.
export PKG_CONFIG_ALLOW_CROSS=1
export PKG_CONFIG_SYSROOT_DIR="$sysroot"
export PKG_CONFIG_PATH=""
export PKG_CONFIG_LIBDIR="$libdir/pkgconfig:$sysroot/usr/share/pkgconfig"
export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_LINKER=aarch64-linux-gnu-gcc
# The cross gcc has its own libc (libc6-dev-arm64-cross); the GStreamer/GLib libraries and what they
# need at link time (libunwind, libdw, ...) are found in the sysroot.
export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_RUSTFLAGS="-C link-arg=-Wl,-rpath-link,$libdir -C link-arg=-Wl,-rpath-link,$sysroot/lib/$multiarch"
export CC_aarch64_unknown_linux_gnu=aarch64-linux-gnu-gcc

if [[ $print_env -eq 1 ]]; then
  for var in PKG_CONFIG_ALLOW_CROSS PKG_CONFIG_SYSROOT_DIR PKG_CONFIG_PATH PKG_CONFIG_LIBDIR \
    CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_LINKER CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_RUSTFLAGS \
    CC_aarch64_unknown_linux_gnu; do
    printf 'export %s=%q\n' "$var" "${!var}" >&3
  done
  exit 0
fi

echo "==> cargo build --target $target --workspace --all-targets --all-features $*"
cargo build --target "$target" --workspace --all-targets --all-features "$@"

plugin="$target_dir/$target/debug/libgstbufshare.so"
echo "==> file $plugin"
description=$(file -b "$plugin")
echo "$description"
if [[ "$description" != *"ARM aarch64"* ]]; then
  echo "check-aarch64.sh: $plugin is not an ARM aarch64 ELF" >&2
  exit 1
fi
peer="$target_dir/$target/debug/ucx-peer"
echo "==> file $peer (ucx-sys + ucx, linked against the arm64 libucp)"
description=$(file -b "$peer")
echo "$description"
if [[ "$description" != *"ARM aarch64"* ]]; then
  echo "check-aarch64.sh: $peer is not an ARM aarch64 ELF" >&2
  exit 1
fi
echo "==> aarch64 cross-build OK in $(($(date +%s) - start)) s"
