#!/usr/bin/env python3
"""Measures how fast a reconnecting consumer resumes after a producer restart.

Real processes (target/debug/bufshare-peer; build first with `cargo build`):
a consumer with `--on-disconnect reconnect`, producer A (RGBA 320x240) that is
SIGKILLed after 2 s, then producer B (NV12 640x480, 90 frames) spawned 0.3 s
later on the same socket. Prints, per run and as medians, the time from B's
spawn to B's own first frame and to the consumer's first frame of B (both on
CLOCK_MONOTONIC), and how many of B's frames the consumer missed.

usage: scripts/measure-restart.py [RECONNECT_INTERVAL_MS [RUNS]]
"""
import os
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PEER = os.path.join(ROOT, "target", "debug", "bufshare-peer")
interval = sys.argv[1] if len(sys.argv) > 1 else "100"
runs = int(sys.argv[2]) if len(sys.argv) > 2 else 6


def field(line, key):
    return int(line.split(key + "=")[1].split()[0])


to_cons, to_prod, missed = [], [], []
for i in range(runs):
    with tempfile.TemporaryDirectory(prefix="bufshare-restart-") as d:
        sock = f"{d}/s.sock"
        cons = subprocess.Popen(
            [PEER, "consume", "--socket", sock, "--on-disconnect", "reconnect",
             "--reconnect-interval", interval, "--report", f"{d}/c.txt"],
            stderr=subprocess.DEVNULL)
        a = subprocess.Popen(
            [PEER, "produce", "--socket", sock, "--source", "test", "--format", "RGBA",
             "--frames", "3000", "--wait-clients", "1", "--report", f"{d}/a.txt"],
            stdout=subprocess.DEVNULL)
        time.sleep(2)
        a.kill()
        a.wait()
        time.sleep(0.3)
        t_spawn = time.monotonic_ns()
        b = subprocess.Popen(
            [PEER, "produce", "--socket", sock, "--source", "test", "--format", "NV12",
             "--width", "640", "--height", "480", "--frames", "90", "--report", f"{d}/b.txt"],
            stdout=subprocess.DEVNULL)
        b.wait()
        cons.wait(timeout=30)
        caps_seen, first = 0, None
        for line in open(f"{d}/c.txt"):
            if line.startswith("caps "):
                caps_seen += 1
            elif line.startswith("frame ") and caps_seen == 2 and first is None:
                first = (field(line, "at"), field(line, "offset"))
        b_first = next(field(l, "clock") for l in open(f"{d}/b.txt") if l.startswith("frame "))
    to_cons.append((first[0] - t_spawn) / 1e6)
    to_prod.append((b_first - t_spawn) / 1e6)
    missed.append(first[1])
    print(f"run {i}: producer's first frame {to_prod[-1]:.0f} ms, consumer's first frame "
          f"{to_cons[-1]:.0f} ms after spawn; frames missed {first[1]}", flush=True)
m = statistics.median
print(f"reconnect-interval {interval} ms, n={runs}: spawn->producer first frame median "
      f"{m(to_prod):.0f} ms; spawn->consumer first frame median {m(to_cons):.0f} ms "
      f"(min {min(to_cons):.0f}, max {max(to_cons):.0f}); frames missed median {m(missed)} "
      f"(max {max(missed)})")
