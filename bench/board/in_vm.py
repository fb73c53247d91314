#!/usr/bin/env python3
"""In-VM half of the board benchmark (started by bench/board/run.sh inside the virtual board).

One camera, two consumer processes, one of which encodes on the "hardware" encoder:

    vivid capture 640x480 NV12 -> producer process -> consumer "enc":   ... ! v4l2fwhtenc (vicodec) ! fakesink
                                                   -> consumer "plain": ... ! fakesink

for bufshare (v4l2src io-mode=dmabuf, and io-mode=mmap) and for shmsink/shmsrc, all in this one boot.
Every process is a `bufshare-bench __child` (bench/src/roles.rs): it runs a gst-launch style pipeline,
counts buffers on the src pad of the element named read0, and reports its own CPU time (all threads)
for the window between "start" and "stop". Every process also runs with the copycount LD_PRELOAD shim
(bench/board/copycount.c), signalled with SIGUSR1 at the window's start and end.
"""
import argparse
import os
import select
import signal
import subprocess
import sys
import time

WIDTH, HEIGHT = 640, 480
FRAME_BYTES = WIDTH * HEIGHT * 3 // 2  # NV12
# vivid's webcam input offers 5/1 at 640x480. vicodec encodes on the CPU (in the encoding process's
# QBUF ioctl), ~100-150 ms per frame under emulation: at 10/1 it already saturates one of the 2 vCPUs.
FPS = 5
CAPS = f"video/x-raw,format=NV12,width={WIDTH},height={HEIGHT},framerate={FPS}/1"
# shm carries no caps: its consumers state them in full (a capsfilter needs fixed caps).
SHM_CAPS = f"{CAPS},interlace-mode=progressive,colorimetry=bt601,pixel-aspect-ratio=1/1"


def find_video_node(name):
    base = "/sys/class/video4linux"
    for entry in sorted(os.listdir(base)):
        with open(os.path.join(base, entry, "name")) as f:
            if f.read().strip() == name:
                return "/dev/" + entry
    sys.exit(f"in_vm.py: no V4L2 device named {name!r} in {base} (is this the virtual board?)")


def scenarios(capture, encoder, tmp, with_backends):
    bs = f"{tmp}/bufshare.sock"
    shm = f"{tmp}/shm.sock"
    enc_tail = "v4l2fwhtenc {io} ! fakesink sync=false async=false"
    plain_tail = "fakesink sync=false async=false"
    return [
        (
            "bufshare, v4l2src io-mode=dmabuf",
            f"v4l2src device={capture} io-mode=dmabuf name=read0 ! {CAPS} ! bufsharesink socket={bs}",
            f"bufsharesrc socket={bs} name=read0 ! " + enc_tail.format(io="output-io-mode=dmabuf-import"),
            f"bufsharesrc socket={bs} name=read0 ! " + plain_tail,
            bs,
        ),
        (
            "bufshare, v4l2src io-mode=mmap",
            f"v4l2src device={capture} io-mode=mmap name=read0 ! {CAPS} ! bufsharesink socket={bs}",
            f"bufsharesrc socket={bs} name=read0 ! " + enc_tail.format(io=""),
            f"bufsharesrc socket={bs} name=read0 ! " + plain_tail,
            bs,
        ),
        (
            "shmsink/shmsrc",
            f"v4l2src device={capture} name=read0 ! {CAPS} ! shmsink socket-path={shm} "
            f"shm-size={FRAME_BYTES * 20} wait-for-connection=false sync=false async=false",
            f"shmsrc socket-path={shm} is-live=true name=read0 ! {SHM_CAPS} ! " + enc_tail.format(io=""),
            f"shmsrc socket-path={shm} is-live=true name=read0 ! {SHM_CAPS} ! " + plain_tail,
            shm,
        ),
    ] + ([
        # With the memory backends (cargo feature all-backends): frames in dma-buf memory that the
        # camera writes (dmabuf-import) or that the encoder's own OUTPUT queue owns.
        (
            "bufshare backend=dma-heap, v4l2src io-mode=dmabuf-import",
            f"v4l2src device={capture} io-mode=dmabuf-import name=read0 ! {CAPS} ! "
            f"bufsharesink socket={bs} backend=dma-heap heap=reserved",
            f"bufsharesrc socket={bs} name=read0 ! " + enc_tail.format(io="output-io-mode=dmabuf-import"),
            f"bufsharesrc socket={bs} name=read0 ! " + plain_tail,
            bs,
        ),
        (
            "bufshare backend=v4l2 (encoder's queue), v4l2src io-mode=mmap",
            f"v4l2src device={capture} io-mode=mmap name=read0 ! {CAPS} ! "
            f"bufsharesink socket={bs} backend=v4l2 device={encoder} max-inflight=4",
            f"bufsharesrc socket={bs} name=read0 ! " + enc_tail.format(io="output-io-mode=dmabuf-import"),
            f"bufsharesrc socket={bs} name=read0 ! " + plain_tail,
            bs,
        ),
    ] if with_backends else [])


class Child:
    def __init__(self, bench, role, pipeline, env):
        self.role = role
        self.proc = subprocess.Popen(
            [bench, "__child", role, "--pipeline", pipeline],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            env=env, text=True, bufsize=1,
        )

    def wait_ready(self, timeout):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            r, _, _ = select.select([self.proc.stdout], [], [], 0.5)
            if r:
                line = self.proc.stdout.readline()
                if line.strip() == "READY":
                    return
                if line == "" or line.startswith("error"):
                    raise RuntimeError(f"{self.role}: {line.strip() or 'exited'}: {self.proc.stderr.read()}")
        raise RuntimeError(f"{self.role}: not READY after {timeout} s")

    def send(self, command):
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()

    def finish(self, timeout=30):
        if self.proc.returncode is not None:
            return {"counts": {}, "errors": [f"{self.role}: exited early"], "stderr": ""}
        try:
            self.send("quit")
        except BrokenPipeError:
            pass
        out, err = self.proc.communicate(timeout=timeout)
        report = {"counts": {}, "errors": []}
        for line in out.splitlines():
            parts = line.split()
            if not parts:
                continue
            if parts[0] == "cpu_ns":
                report["cpu_ns"] = int(parts[1])
            elif parts[0] == "window_ns":
                report["window_ns"] = int(parts[1])
            elif parts[0] == "count":
                report["counts"][parts[1]] = int(parts[2])
            elif parts[0] == "error":
                report["errors"].append(line)
        report["stderr"] = err
        return report


def proc_times(pid):
    """(utime, stime) of a process, all threads, in seconds, from /proc/<pid>/stat."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    tick = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / tick, int(fields[12]) / tick


def copy_delta(directory, pid):
    try:
        with open(os.path.join(directory, str(pid))) as f:
            lines = [list(map(int, l.split())) for l in f if l.strip()]
    except FileNotFoundError:
        return None
    if len(lines) < 2:
        return None
    a, b = lines[0], lines[-1]
    return [b[i] - a[i] for i in range(3)]


def run_scenario(args, name, producer, enc, plain, sock, env, copydir):
    if os.path.exists(sock):
        os.unlink(sock)
    children = []
    try:
        prod = Child(args.bench, "producer", producer, env)
        children.append(prod)
        prod.wait_ready(60)
        for _ in range(100):
            if os.path.exists(sock):
                break
            time.sleep(0.1)
        for role, desc in (("enc", enc), ("plain", plain)):
            c = Child(args.bench, role, desc, env)
            children.append(c)
            c.wait_ready(60)
        time.sleep(args.warmup)
        for c in children:
            os.kill(c.proc.pid, signal.SIGUSR1)
            c.times = proc_times(c.proc.pid)
            c.send("start")
        time.sleep(args.seconds)
        for c in children:
            c.send("stop")
            after = proc_times(c.proc.pid)
            c.times = (after[0] - c.times[0], after[1] - c.times[1])
            os.kill(c.proc.pid, signal.SIGUSR1)
        time.sleep(0.5)  # let the shim threads write their lines
    except Exception as e:
        detail = []
        for c in children:
            if c.proc.poll() is not None:
                out, err = c.proc.communicate()
                detail.append(f"[{c.role} exited {c.proc.returncode}: {out.strip()} {err.strip()}]")
        raise RuntimeError(f"{e} {' '.join(detail)}") from e
    finally:
        reports = {}
        # consumers first, so the producer does not see them vanish mid-frame
        for c in reversed(children):
            try:
                reports[c.role] = c.finish()
            except subprocess.TimeoutExpired:
                c.proc.kill()
                reports[c.role] = {"counts": {}, "errors": [f"{c.role}: did not exit"], "stderr": ""}
            reports[c.role]["copies"] = copy_delta(copydir, c.proc.pid)
            reports[c.role]["times"] = getattr(c, "times", None)
    return reports


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bench", required=True, help="bufshare-bench executable")
    ap.add_argument("--shim", required=True, help="copycount.so")
    ap.add_argument("--plugin-dir", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--seconds", type=float, default=10.0, help="measurement window per run")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--warmup", type=float, default=3.0)
    args = ap.parse_args()

    tmp = "/tmp/board-bench"
    os.makedirs(tmp, exist_ok=True)
    capture = find_video_node("vivid-000-vid-cap")
    encoder = find_video_node("stateful-encoder")
    env = dict(os.environ)
    env.update({
        "GST_PLUGIN_PATH": args.plugin_dir,
        "GST_REGISTRY": f"{tmp}/registry.bin",
        "LD_PRELOAD": args.shim,
        "COPYCOUNT_FRAME": str(FRAME_BYTES),
        "COPYCOUNT_MIN": "512",
    })
    # Build the registry once, outside any measurement (it also registers v4l2fwhtenc for vicodec).
    subprocess.run(["gst-inspect-1.0", "v4l2fwhtenc"], env={**env, "LD_PRELOAD": ""},
                   stdout=subprocess.DEVNULL, check=True)

    lines = [f"capture: {capture} (vivid), encoder: {encoder} (vicodec), {WIDTH}x{HEIGHT} NV12, "
             f"frame {FRAME_BYTES} bytes, window {args.seconds} s after {args.warmup} s warm-up, "
             f"{os.cpu_count()} vCPUs (TCG)"]
    inspect = subprocess.run(["gst-inspect-1.0", "bufsharesink"], env={**env, "LD_PRELOAD": ""},
                             capture_output=True, text=True)
    if inspect.returncode != 0:
        sys.exit(f"in_vm.py: bufsharesink not found in {args.plugin_dir}: {inspect.stderr}")
    with_backends = "backend" in inspect.stdout and "dma-heap" in inspect.stdout
    if not with_backends:
        lines.append("(plugin built without the memory backends: dma-heap and v4l2 rows skipped)")
    # Rounds: every transport once per round, in turn, so that a change of load on the host (which
    # slows the emulated CPUs, and so inflates every figure) hits all transports alike.
    lines[0] += f", {args.rounds} rounds"
    names = []
    runs = {}  # name -> (producer, enc, plain, [reports of each round])
    for rnd in range(args.rounds):
        for name, producer, enc, plain, sock in scenarios(capture, encoder, tmp, with_backends):
            if name not in runs:
                names.append(name)
                runs[name] = (producer, enc, plain, [])
            copydir = f"{tmp}/copies-{names.index(name)}-{rnd}"
            os.makedirs(copydir, exist_ok=True)
            for f in os.listdir(copydir):
                os.unlink(os.path.join(copydir, f))
            env["COPYCOUNT_DIR"] = copydir
            try:
                reports = run_scenario(args, name, producer, enc, plain, sock, env, copydir)
            except Exception as e:  # report and go on with the next transport
                lines.append(f"{name}, round {rnd + 1}: FAILED: {e}")
                continue
            runs[name][3].append(reports)
            print(f"round {rnd + 1}: {name}: done", flush=True)

    roles = ("producer", "enc", "plain")

    def ms(seconds, frames):
        return seconds * 1000 / frames if frames else float("nan")

    def user_kernel(user, kernel, frames):
        return f"{ms(user, frames):.1f} + {ms(kernel, frames):.1f}"

    lines.append("")
    lines.append("CPU: ms per frame (user + kernel) from /proc/<pid>/stat over the windows of all rounds; "
                 "a consumer's per frame it received. Copies: bytes the process copied with memcpy/memmove "
                 f"in calls >= 512 B, divided by the frame size ({FRAME_BYTES} B) and by the frames it handled.")
    lines.append("")
    lines.append("| transport | frames produced / received enc / plain "
                 "| CPU ms per produced frame, all 3 processes (per-round range) "
                 "| producer CPU ms/frame | enc CPU ms/frame | plain CPU ms/frame "
                 "| frame copies per frame: producer / enc / plain |")
    lines.append("|---|---:|---:|---:|---:|---:|---:|")
    for name in names:
        rounds = runs[name][3]
        if not rounds:
            continue
        handled = {r: sum(rep[r]["counts"].get("read0", 0) for rep in rounds) for r in roles}
        times = {r: [sum((rep[r]["times"] or (0, 0))[i] for rep in rounds) for i in (0, 1)] for r in roles}
        produced = handled["producer"]
        total_user = sum(t[0] for t in times.values())
        total_sys = sum(t[1] for t in times.values())
        per_round = []
        for rep in rounds:
            n = rep["producer"]["counts"].get("read0", 0)
            cpu = sum(sum(rep[r]["times"] or (0, 0)) for r in roles)
            per_round.append(ms(cpu, n))
        per = " | ".join(user_kernel(times[r][0], times[r][1], handled[r]) for r in roles)
        copies = []
        for r in roles:
            ds = [rep[r]["copies"] for rep in rounds]
            if all(ds) and handled[r]:
                copies.append(f"{sum(d[1] for d in ds) / FRAME_BYTES / handled[r]:.2f}")
            else:
                copies.append("n/a")
        lines.append(
            f"| {name} | {produced} / {handled['enc']} / {handled['plain']} | "
            f"{user_kernel(total_user, total_sys, produced)} ({min(per_round):.0f}-{max(per_round):.0f}) "
            f"| {per} | {' / '.join(copies)} |")
    rows = [(name, *runs[name][:3], rep) for name in names for rep in runs[name][3]]
    lines.append("")
    lines.append("Raw copy counters per process over the window (calls >= 512 B, bytes, calls >= one frame):")
    for name, producer, enc, plain, reports in rows:
        lines.append(f"- {name}")
        for r, desc in (("producer", producer), ("enc", enc), ("plain", plain)):
            rep = reports[r]
            lines.append(f"  - {r}: `{desc}`: copies {rep['copies']}, (utime, stime) s {rep['times']}, "
                         f"cpu_ns (bench child) {rep.get('cpu_ns')}, frames {rep['counts']}")
            for e in rep["errors"]:
                lines.append(f"    - {e}")
    text = "\n".join(lines) + "\n"
    with open(args.out, "w") as f:
        f.write(text)
    # full stderr of the children, for debugging
    with open(args.out + ".log", "w") as f:
        for name, _, _, _, reports in rows:
            for r in ("producer", "enc", "plain"):
                f.write(f"== {name} / {r}\n{reports[r]['stderr']}\n")
    print(text)


if __name__ == "__main__":
    main()
