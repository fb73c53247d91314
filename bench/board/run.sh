#!/usr/bin/env bash
# Benchmark on the virtual board (not part of CI: it boots a software-emulated VM, ~2-3 minutes).
#
# Builds the plugin and bufshare-bench (release) and the copycount shim on the host, boots
# ../shared/vm/bzImage with virtme-ng, and runs bench/board/in_vm.py there: vivid capture 640x480
# NV12 -> one producer process -> two consumer processes (one encoding on vicodec), for bufshare
# (v4l2src io-mode=dmabuf and io-mode=mmap) and shmsink/shmsrc, in the same boot. Prints a table of
# CPU time per frame and frame copies per frame (see bench/board/copycount.c for what is counted).
#
# Usage: bash bench/board/run.sh [--seconds N] [--warmup N]
# Env:   BOARD_KERNEL (default ../shared/vm/bzImage relative to the repository, i.e. /work/shared/vm)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
root=$PWD
kernel=${BOARD_KERNEL:-$root/../shared/vm/bzImage}
out_dir=${CARGO_TARGET_DIR:-$root/target}/board-bench
mkdir -p "$out_dir"

for tool in vng qemu-system-x86_64 gcc python3; do
  if ! command -v "$tool" >/dev/null 2>&1; then
    echo "run.sh: $tool not found (needs: apt-get install qemu-system-x86 gcc python3;" \
      "python3 -m pip install virtme-ng)" >&2
    exit 1
  fi
done
[[ -f "$kernel" ]] || { echo "run.sh: no kernel at $kernel (set BOARD_KERNEL)" >&2; exit 1; }

features=()
if grep -q '^all-backends *=' Cargo.toml; then features=(--features all-backends); fi
echo "==> cargo build --release -p gst-plugin-bufshare -p bufshare-bench ${features[*]}"
cargo build --release -p gst-plugin-bufshare -p bufshare-bench "${features[@]}"
target_dir=${CARGO_TARGET_DIR:-$root/target}

echo "==> gcc bench/board/copycount.c -> $out_dir/copycount.so"
gcc -O2 -Wall -Wextra -fPIC -shared -fno-builtin -fno-tree-loop-distribute-patterns \
  -o "$out_dir/copycount.so" bench/board/copycount.c -ldl -lpthread

result=$out_dir/result.md
rm -f "$result" "$out_dir/in_vm.log"
echo "==> host load before: $(cut -d' ' -f1-3 /proc/loadavg) (the emulated CPUs slow down when the host is busy)"
echo "==> booting the virtual board ($kernel, TCG) and running bench/board/in_vm.py"
start=$(date +%s)
vng --disable-kvm --run "$kernel" --memory 2G --rwdir "$root" --exec \
  "python3 $root/bench/board/in_vm.py --bench $target_dir/release/bufshare-bench \
   --shim $out_dir/copycount.so --plugin-dir $target_dir/release --out $result $* \
   >$out_dir/in_vm.log 2>&1" >"$out_dir/vng.log" 2>&1 || true
# (vng's own exit code is not reliable here; the result file is what counts)
echo "==> VM run took $(($(date +%s) - start)) s (logs: $out_dir/in_vm.log, $out_dir/vng.log, children's stderr: $result.log)"
if [[ ! -s "$result" ]]; then
  echo "run.sh: the VM produced no result; see $out_dir/vng.log" >&2
  tail -n 30 "$out_dir/in_vm.log" "$out_dir/vng.log" >&2
  exit 1
fi
echo "==> host load after: $(cut -d' ' -f1-3 /proc/loadavg)"
sed '/^Raw copy counters/q' "$result"
echo "(per-process details: $result)"
