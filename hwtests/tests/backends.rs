//! Every memory backend end to end (issue 4): `videotestsrc ! bufsharesink backend=<b>` in one
//! process, two `bufshare-peer consume` processes. Checked per backend: the producer used the
//! backend asked for (its report's `backend` line), both consumers got frames identical to the
//! producer's, read-only, over the producer's own files (same inodes), and of the right kind:
//! dma-buf memory for dma-heap, drm and v4l2, fd memory (memfd) for memfd.
//!
//! Interface expected of the plugin (the hw-backends work): bufsharesink properties `backend`
//! (enum nicks auto, memfd, dma-heap, drm, v4l2), `heap` (name in /dev/dma_heap or a path) and
//! `device` (DRM/V4L2 device path, unset = auto-pick); bufshare-peer `produce --backend B
//! [--heap H] [--device D]` setting them, and a `backend <name>` report line. Until the built
//! bufsharesink has a `backend` property the tests skip, saying so; a backend the build lacks
//! ("not built into this plugin") skips too.

use std::process::Command;

use bufshare_hwtests::*;

const FRAMES: u32 = 30;

fn backend_end_to_end(backend: &str, extra: &[&str], expected_kind: &str) {
    let _serial = serial();
    skip_unless!(sink_has_property("backend"));
    let peer = skip_unless!(peer());
    let dir = TempDir::new(&format!("backend-{backend}"));
    let socket = dir.path("b.sock");

    let mut producer = Command::new(&peer);
    producer
        .args(["produce", "--socket"])
        .arg(&socket)
        .args(["--source", "test", "--frames", &FRAMES.to_string()])
        .args(["--width", "320", "--height", "240"])
        .args(["--backend", backend])
        .args(extra)
        .args(["--wait-clients", "2", "--report"])
        .arg(dir.path("producer.txt"));
    let mut producer = Proc::spawn("producer", producer, dir.path("producer.err"));
    // A backend the build lacks is reported when the sink starts, before it serves.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    while !socket.exists() && std::time::Instant::now() < deadline {
        let err = std::fs::read_to_string(dir.path("producer.err")).unwrap_or_default();
        if err.contains("not built into this plugin") {
            eprintln!("skipped: {}", err.trim());
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    wait_for_socket(&socket, &mut producer);
    let consumers: Vec<Proc> = (0..2)
        .map(|i| {
            let mut c = Command::new(&peer);
            c.args(["consume", "--socket"])
                .arg(&socket)
                .args(["--timeout", "60000", "--report"])
                .arg(dir.path(&format!("consumer{i}.txt")));
            Proc::spawn(
                &format!("consumer {i}"),
                c,
                dir.path(&format!("consumer{i}.err")),
            )
        })
        .collect();
    for c in consumers {
        c.wait_ok();
    }
    producer.wait_ok();

    let prod = Report::read(&dir.path("producer.txt"));
    assert_eq!(
        prod.backend.as_deref(),
        Some(backend),
        "the producer's backend in use"
    );
    assert_eq!(prod.frames.len(), FRAMES as usize, "producer frames");
    let prod_inodes = prod.inodes();
    for i in 0..2 {
        let name = format!("consumer {i}");
        let cons = Report::read(&dir.path(&format!("consumer{i}.txt")));
        assert_identical(&name, &prod, &cons);
        for f in &cons.frames {
            assert_eq!(
                f.kind, expected_kind,
                "{name}: frame {} memory kind with backend {backend}",
                f.offset
            );
            assert!(f.ro, "{name}: frame {} is writable", f.offset);
            assert!(
                prod_inodes.contains(&f.ino),
                "{name}: frame {} is inode {}, not one of the producer's {prod_inodes:?}",
                f.offset,
                f.ino
            );
        }
        eprintln!(
            "{name}: {} of {FRAMES} frames, identical, {expected_kind} memory over the producer's {} files",
            cons.frames.len(),
            prod_inodes.len()
        );
    }
}

#[test]
fn backend_memfd() {
    backend_end_to_end("memfd", &[], "fd");
}

#[test]
fn backend_dma_heap_system() {
    skip_unless!(dma_heap("system"));
    backend_end_to_end("dma-heap", &["--heap", "system"], "dmabuf");
}

#[test]
fn backend_dma_heap_cma() {
    // The CMA heap: "reserved" on the virtual board, "linux,cma" on many boards.
    let heap = skip_unless!(dma_heap("reserved")
        .or_else(|_| dma_heap("linux,cma"))
        .map_err(|_| "no CMA dma-heap (/dev/dma_heap/reserved or /dev/dma_heap/linux,cma)"));
    let name = heap.file_name().unwrap().to_str().unwrap().to_string();
    backend_end_to_end("dma-heap", &["--heap", &name], "dmabuf");
}

#[test]
fn backend_drm() {
    if drm_cards().is_empty() {
        eprintln!("skipped: no DRM device (/dev/dri/card*)");
        return;
    }
    backend_end_to_end("drm", &[], "dmabuf");
}

#[test]
fn backend_v4l2() {
    if !v4l2_nodes().iter().any(|n| n.is_m2m()) {
        eprintln!("skipped: no V4L2 mem2mem device (the v4l2 backend exports its OUTPUT queue)");
        return;
    }
    backend_end_to_end("v4l2", &[], "dmabuf");
}
