//! bufsharesink's memory backend properties (`backend`, `heap`, `device`):
//! bad heaps and devices fail at start naming the path, `auto` falls back to
//! memfd with a warning that says why, and (where the devices exist: the VM in
//! ../shared/vm or a board, with `--features all-backends`) the pool proposed
//! upstream hands out GstDmaBufMemory laid out with the device's pitch.
//! Device tests print `SKIP:` and pass when their device is absent.

use gst::prelude::*;

mod common;

use common::{init, TempSocket};

fn temp_socket(name: &str) -> TempSocket {
    common::temp_socket("be", name)
}

fn sink(socket: &TempSocket, props: &[(&str, &str)]) -> gst::Element {
    let e = gst::ElementFactory::make("bufsharesink")
        .property("socket", socket.to_str().unwrap())
        .build()
        .unwrap();
    for (k, v) in props {
        e.set_property_from_str(k, v);
    }
    e
}

/// Starts `sink` alone in a pipeline (to PAUSED); returns the pipeline and
/// the error and warning messages posted.
fn start(sink: &gst::Element) -> (gst::Pipeline, Result<(), String>, Vec<String>) {
    let pipeline = gst::Pipeline::new();
    pipeline.add(sink).unwrap();
    let res = pipeline.set_state(gst::State::Paused);
    let bus = pipeline.bus().unwrap();
    let mut error = None;
    let mut warnings = Vec::new();
    while let Some(m) = bus.pop_filtered(&[gst::MessageType::Error, gst::MessageType::Warning]) {
        match m.view() {
            // The first error is the element's own; basesink adds a generic one after it.
            gst::MessageView::Error(e) if error.is_none() => error = Some(e.error().to_string()),
            gst::MessageView::Warning(w) => warnings.push(w.error().to_string()),
            _ => {}
        }
    }
    let res = match (res, error) {
        (Ok(_), None) => Ok(()),
        (_, Some(e)) => Err(e),
        (Err(e), None) => Err(format!("state change failed without a message: {e}")),
    };
    (pipeline, res, warnings)
}

fn stats_backend(sink: &gst::Element) -> String {
    sink.property::<gst::Structure>("stats")
        .get::<String>("backend")
        .unwrap()
}

#[test]
fn default_backend_is_memfd_and_stats_say_so() {
    init();
    let socket = temp_socket("default.sock");
    let sink = sink(&socket, &[]);
    assert_eq!(
        sink.property_value("backend")
            .get::<gstbufshare::bufsharesink::backend::BackendKind>()
            .unwrap(),
        gstbufshare::bufsharesink::backend::BackendKind::Memfd
    );
    let (pipeline, res, warnings) = start(&sink);
    res.unwrap();
    assert!(warnings.is_empty(), "{warnings:?}");
    assert_eq!(stats_backend(&sink), "memfd");
    pipeline.set_state(gst::State::Null).unwrap();
}

#[test]
fn dma_heap_that_does_not_exist_fails_at_start_naming_it() {
    init();
    let socket = temp_socket("noheap.sock");
    let sink = sink(
        &socket,
        &[("backend", "dma-heap"), ("heap", "/nonexistent")],
    );
    let (pipeline, res, _) = start(&sink);
    let err = res.expect_err("a missing heap must fail");
    if cfg!(feature = "dma-heap") {
        assert!(
            err.contains("/nonexistent") && err.contains("No such file"),
            "{err}"
        );
    } else {
        assert!(err.contains("--features dma-heap"), "{err}");
    }
    pipeline.set_state(gst::State::Null).unwrap();
}

#[test]
fn device_that_is_a_regular_file_fails_at_start_naming_it() {
    init();
    let socket = temp_socket("filedev.sock");
    let file = socket.with_file_name("not-a-device");
    std::fs::write(&file, b"x").unwrap();
    for backend in ["drm", "v4l2"] {
        let sink = sink(
            &socket,
            &[("backend", backend), ("device", file.to_str().unwrap())],
        );
        let (pipeline, res, _) = start(&sink);
        let err = res.expect_err("a regular file is no device");
        let built = match backend {
            "drm" => cfg!(feature = "drm"),
            _ => cfg!(feature = "v4l2"),
        };
        if built {
            assert!(
                err.contains(file.to_str().unwrap()) && err.contains("not a character device"),
                "{err}"
            );
        } else {
            assert!(err.contains(&format!("--features {backend}")), "{err}");
        }
        pipeline.set_state(gst::State::Null).unwrap();
    }
}

#[test]
fn auto_falls_back_to_memfd_with_a_warning_saying_why() {
    init();
    let socket = temp_socket("auto.sock");
    // A heap and a device that exist nowhere, so this holds on boards too.
    let sink = sink(
        &socket,
        &[
            ("backend", "auto"),
            ("heap", "nope-heap"),
            ("device", "/dev/nope-device"),
        ],
    );
    let (pipeline, res, warnings) = start(&sink);
    res.unwrap();
    let warning = warnings
        .iter()
        .find(|w| w.contains("falling back to memfd"))
        .unwrap_or_else(|| panic!("no fallback warning in {warnings:?}"));
    assert!(warning.contains("dma-heap:"), "{warning}");
    if cfg!(feature = "dma-heap") {
        assert!(warning.contains("/dev/dma_heap/nope-heap"), "{warning}");
    }
    if cfg!(feature = "drm") {
        assert!(warning.contains("/dev/nope-device"), "{warning}");
    }
    assert_eq!(stats_backend(&sink), "memfd");
    pipeline.set_state(gst::State::Null).unwrap();
}

#[cfg(any(feature = "dma-heap", feature = "drm", feature = "v4l2"))]
/// Proposes a pool for NV12 320x240 from a sink with `props` and acquires one
/// buffer: (is dma-buf, strides, offsets, pool max).
fn pool_buffer(props: &[(&str, &str)]) -> Result<(bool, Vec<i32>, Vec<usize>, u32), String> {
    pool_buffer_for(
        props,
        "video/x-raw,format=NV12,width=320,height=240,framerate=30/1",
    )
}

#[cfg(any(feature = "dma-heap", feature = "drm", feature = "v4l2"))]
/// Like [`pool_buffer`] for any raw video caps.
fn pool_buffer_for(
    props: &[(&str, &str)],
    caps: &str,
) -> Result<(bool, Vec<i32>, Vec<usize>, u32), String> {
    let socket = temp_socket("hwpool.sock");
    let sink = sink(&socket, props);
    let (pipeline, res, _) = start(&sink);
    res?;
    let caps: gst::Caps = caps.parse().unwrap();
    let info = gst_video::VideoInfo::from_caps(&caps).unwrap();
    let mut query = gst::query::Allocation::new(Some(&caps), true);
    assert!(sink.static_pad("sink").unwrap().query(&mut query));
    let (pool, size, _, max) = query.allocation_pools().next().expect("a pool");
    let pool = pool.expect("a pool object");
    assert!(size as usize >= info.size());
    let mut config = pool.config();
    config.add_option(gst_video::BUFFER_POOL_OPTION_VIDEO_META);
    pool.set_config(config).unwrap();
    pool.set_active(true).unwrap();
    let mut buffer = pool.acquire_buffer(None).unwrap();
    let dmabuf = buffer
        .peek_memory(0)
        .is_memory_type::<gst_allocators::DmaBufMemory>();
    let meta = buffer.meta::<gst_video::VideoMeta>().expect("a video meta");
    let (strides, offsets) = (meta.stride().to_vec(), meta.offset().to_vec());
    // The whole frame as the meta describes it is writable memory.
    {
        let mut frame =
            gst_video::VideoFrameRef::from_buffer_ref_writable(buffer.get_mut().unwrap(), &info)
                .unwrap();
        frame.plane_data_mut(1).unwrap().fill(0x80);
        frame.plane_data_mut(0).unwrap().fill(0x10);
    }
    drop(buffer);
    pool.set_active(false).unwrap();
    pipeline.set_state(gst::State::Null).unwrap();
    Ok((dmabuf, strides, offsets, max))
}

#[cfg(any(feature = "dma-heap", feature = "drm", feature = "v4l2"))]
fn skip(what: &str) {
    println!("SKIP: {what}");
}

#[test]
#[cfg(feature = "dma-heap")]
fn dma_heap_pool_gives_dmabuf_memory() {
    init();
    if !std::path::Path::new("/dev/dma_heap/system").exists() {
        return skip("/dev/dma_heap/system absent");
    }
    let (dmabuf, strides, offsets, _) =
        pool_buffer(&[("backend", "dma-heap"), ("heap", "system")]).unwrap();
    assert!(dmabuf);
    assert_eq!(strides, [320, 320]);
    assert_eq!(offsets, [0, 320 * 240]);
}

#[test]
#[cfg(feature = "drm")]
fn drm_pool_lays_planes_out_with_the_driver_pitch() {
    init();
    if bufshare_backends::drm::DrmDumbBackend::open_first().is_err() {
        return skip("no /dev/dri/card* that exports dumb buffers");
    }
    let (dmabuf, strides, offsets, _) = pool_buffer(&[("backend", "drm")]).unwrap();
    assert!(dmabuf);
    let pitch = strides[0];
    assert!(pitch >= 320, "{strides:?}");
    // NV12: the UV plane has the luma pitch and starts right after 240 luma rows.
    assert_eq!(strides[1], pitch);
    assert_eq!(offsets, [0, pitch as usize * 240]);
    println!("drm pool: strides {strides:?} offsets {offsets:?}");
    // Odd sizes: chroma rows of NV12 321 pixels wide take 322 bytes, so the
    // pitch must be at least that (GStreamer's stride is 324).
    let (dmabuf, strides, offsets, _) = pool_buffer_for(
        &[("backend", "drm")],
        "video/x-raw,format=NV12,width=321,height=241,framerate=30/1",
    )
    .unwrap();
    assert!(dmabuf);
    assert!(strides[0] >= 322 && strides[1] == strides[0], "{strides:?}");
    assert!(offsets[1] >= strides[0] as usize * 241, "{offsets:?}");
    println!("drm pool 321x241: strides {strides:?} offsets {offsets:?}");
}

#[test]
#[cfg(feature = "v4l2")]
fn v4l2_pool_has_the_queue_pitch_and_its_buffer_count_as_max() {
    init();
    if bufshare_backends::v4l2::V4l2Backend::open_first_mem2mem().is_err() {
        return skip("no V4L2 mem2mem device");
    }
    let (dmabuf, strides, offsets, max) = pool_buffer(&[("backend", "v4l2")]).unwrap();
    assert!(dmabuf);
    assert_eq!(max, bufshare_backends::v4l2::DEFAULT_BUFFERS);
    let pitch = strides[0];
    assert!(pitch >= 320 && strides[1] == pitch, "{strides:?}");
    // The UV plane follows the queue's luma rows (the device may pad the height).
    assert!(offsets[1] >= pitch as usize * 240, "{offsets:?}");
    println!("v4l2 pool: strides {strides:?} offsets {offsets:?} max {max}");
}

/// A consumer process that reads dma-heap frames with the CPU goes through
/// DMA_BUF_IOCTL_SYNC (start and end) for each read: GstDmaBufMemory's map
/// and unmap, on the producer's dma-buf. strace counts the ioctls; a consumer
/// that imported the fds as plain fd memory, or mapped without syncing, makes
/// fewer than two per frame and fails this.
#[test]
#[cfg(feature = "dma-heap")]
fn consumer_cpu_reads_of_dmabuf_frames_are_bracketed_by_sync_ioctls() {
    use std::process::{Command, Stdio};
    if !std::path::Path::new("/dev/dma_heap/system").exists() {
        return skip("/dev/dma_heap/system absent");
    }
    if Command::new("strace").arg("-V").output().is_err() {
        return skip("strace not installed");
    }
    let peer = env!("CARGO_BIN_EXE_bufshare-peer");
    let socket = temp_socket("sync.sock");
    let dir = socket.parent().unwrap().to_path_buf();
    let (strace_log, report) = (dir.join("strace.txt"), dir.join("consumer.txt"));
    let mut consumer = Command::new("strace")
        .args(["-f", "-e", "trace=ioctl", "-o"])
        .arg(&strace_log)
        .args([peer, "consume", "--socket"])
        .arg(&*socket)
        // Room for all 10 frames: under strace in an emulated board the
        // consumer falls behind, and past its grant it would copy frames into
        // its own memory instead of reading the dma-bufs.
        .args(["--timeout", "60000", "--max-inflight", "32", "--report"])
        .arg(&report)
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let producer = Command::new(peer)
        .args(["produce", "--socket"])
        .arg(&*socket)
        .args([
            "--source", "test", "--frames", "10", "--width", "64", "--height", "48",
        ])
        .args([
            "--backend",
            "dma-heap",
            "--heap",
            "system",
            "--wait-clients",
            "1",
        ])
        .args(["--report", "-"])
        .output()
        .unwrap();
    assert!(producer.status.success(), "{producer:?}");
    let stdout = String::from_utf8_lossy(&producer.stdout);
    assert!(stdout.contains("backend dma-heap"), "{stdout}");
    assert!(consumer.wait().unwrap().success());
    let report = std::fs::read_to_string(&report).unwrap();
    let frames: Vec<&str> = report.lines().filter(|l| l.starts_with("frame ")).collect();
    assert!(!frames.is_empty(), "the consumer got no frame: {report}");
    assert!(frames.iter().all(|l| l.contains("kind=dmabuf")), "{report}");
    let log = std::fs::read_to_string(&strace_log).unwrap();
    let syncs = log
        .lines()
        .filter(|l| l.contains("DMA_BUF_IOCTL_SYNC") && l.ends_with("= 0"))
        .count();
    println!(
        "{} frames read, {} DMA_BUF_IOCTL_SYNC ioctls",
        frames.len(),
        syncs
    );
    assert!(
        syncs >= 2 * frames.len(),
        "{} frames read with the CPU but only {syncs} DMA_BUF_IOCTL_SYNC ioctls",
        frames.len()
    );
}
