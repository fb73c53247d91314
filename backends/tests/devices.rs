//! Backends against real kernel devices: allocate, mmap, write, read back, and
//! check kind, size and pitch. Each test skips (passes, printing `SKIP:` and
//! what is missing) when its device is absent, so the suite runs on any host;
//! on the VM in ../shared/vm (or a board) every device is there and nothing skips.
//!
//! Build: `cargo test -p bufshare-backends --all-features --no-run`, then run the
//! printed binary inside the VM with `--nocapture` to see what ran.

#![cfg(all(feature = "dma-heap", feature = "drm", feature = "v4l2"))]

use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};

use bufshare_backends::dma_heap::DmaHeapBackend;
use bufshare_backends::drm::DrmDumbBackend;
use bufshare_backends::v4l2::V4l2Backend;
use bufshare_backends::{
    fd_kind, fd_size, BlockRequest, ImageRequest, MemoryBackend, MemoryKind, VideoFormatRequest,
};

fn skip(what: &str) {
    println!("SKIP: {what}");
}

/// Maps `len` bytes of `fd`, writes a pattern seeded by `seed`, unmaps, maps
/// again and checks the pattern is there: the memory is real and shared.
fn write_and_read_back(fd: &OwnedFd, len: usize, seed: u8) {
    let pattern = |i: usize| (i as u8).wrapping_mul(31).wrapping_add(seed);
    unsafe {
        let p = rustix::mm::mmap(
            std::ptr::null_mut(),
            len,
            rustix::mm::ProtFlags::READ | rustix::mm::ProtFlags::WRITE,
            rustix::mm::MapFlags::SHARED,
            fd,
            0,
        )
        .expect("mmap read-write");
        let s = std::slice::from_raw_parts_mut(p.cast::<u8>(), len);
        for (i, b) in s.iter_mut().enumerate() {
            *b = pattern(i);
        }
        rustix::mm::munmap(p, len).unwrap();
        let p = rustix::mm::mmap(
            std::ptr::null_mut(),
            len,
            rustix::mm::ProtFlags::READ,
            rustix::mm::MapFlags::SHARED,
            fd,
            0,
        )
        .expect("mmap read-only");
        let s = std::slice::from_raw_parts(p.cast::<u8>(), len);
        let bad = s
            .iter()
            .enumerate()
            .filter(|(i, b)| **b != pattern(*i))
            .count();
        rustix::mm::munmap(p, len).unwrap();
        assert_eq!(bad, 0, "{bad} bytes differ after writing and mapping again");
    }
}

fn check_dmabuf(fd: &OwnedFd, at_least: usize) {
    assert_eq!(fd_kind(fd.as_fd()).unwrap(), Some(MemoryKind::DmaBuf));
    assert!(fd_size(fd.as_fd()).unwrap() as usize >= at_least);
}

fn heap_test(name: &str) {
    let path = Path::new("/dev/dma_heap").join(name);
    if !path.exists() {
        return skip(&format!("{} absent", path.display()));
    }
    let heap = DmaHeapBackend::open(name).unwrap();
    let block = heap.allocate(&BlockRequest::bytes(300_000)).unwrap();
    assert_eq!(block.kind, MemoryKind::DmaBuf);
    assert!(block.size >= 300_000 && block.size.is_multiple_of(4096));
    check_dmabuf(&block.fd, block.size);
    write_and_read_back(&block.fd, block.size, 7);
    println!(
        "dma-heap {}: {} bytes, dma-buf, written and read back",
        path.display(),
        block.size
    );
}

#[test]
fn dma_heap_system() {
    heap_test("system");
}

#[test]
fn dma_heap_reserved_cma() {
    heap_test("reserved");
}

/// DRM card paths and their drivers (from DRM_IOCTL_VERSION: virtual cards
/// such as vgem have no device/driver link in sysfs).
fn drm_cards() -> Vec<(PathBuf, String)> {
    let mut out: Vec<(PathBuf, String)> = std::fs::read_dir("/dev/dri")
        .map(|d| {
            d.flatten()
                .filter(|e| e.file_name().to_string_lossy().starts_with("card"))
                .filter_map(|e| {
                    let b = DrmDumbBackend::open(&e.path()).ok()?;
                    Some((e.path(), b.driver().to_string()))
                })
                .collect()
        })
        .unwrap_or_default();
    out.sort();
    out
}

fn drm_test(driver: &str) {
    let Some((path, _)) = drm_cards().into_iter().find(|(_, d)| d == driver) else {
        return skip(&format!(
            "no DRM card with driver {driver} in /sys/class/drm"
        ));
    };
    let drm = DrmDumbBackend::open(&path).unwrap();
    assert_eq!(drm.driver(), driver);
    // NV12 320x240 as the pool asks for it: 8 bpp, 360 rows.
    let req = BlockRequest {
        size: 320 * 360,
        image: Some(ImageRequest {
            width: 320,
            height: 360,
            bits_per_pixel: 8,
        }),
    };
    let block = drm.allocate(&req).unwrap();
    let pitch = block.pitch.expect("dumb buffers report a pitch");
    assert!(pitch >= 320, "pitch {pitch}");
    assert!(block.size >= pitch as usize * 360);
    check_dmabuf(&block.fd, block.size);
    write_and_read_back(&block.fd, block.size, 3);
    // Plain bytes (the copy path) too.
    let bytes = drm.allocate(&BlockRequest::bytes(100_000)).unwrap();
    assert!(bytes.size >= 100_000 && bytes.pitch.is_none());
    check_dmabuf(&bytes.fd, bytes.size);
    println!(
        "drm {} ({driver}): 320x360x8 dumb buffer, pitch {pitch}, {} bytes, exported, written and read back",
        path.display(),
        block.size
    );
}

#[test]
fn drm_vgem() {
    drm_test("vgem");
}

#[test]
fn drm_vkms() {
    drm_test("vkms");
}

#[test]
fn drm_first_card_is_found() {
    if drm_cards().is_empty() {
        return skip("no /dev/dri/card* that exports dumb buffers");
    }
    let drm = DrmDumbBackend::open_first().unwrap();
    println!("drm auto: {} ({})", drm.path().display(), drm.driver());
}

/// The /dev/video path of the first node of `driver` (QUERYCAP) whose sysfs
/// name contains `name`.
fn video_node(driver: &str, name: &str) -> Option<PathBuf> {
    bufshare_backends::v4l2::video_devices()
        .into_iter()
        .find(|path| {
            let sys_name = Path::new("/sys/class/video4linux")
                .join(path.file_name().unwrap())
                .join("name");
            let sys_name = std::fs::read_to_string(sys_name).unwrap_or_default();
            let opened = V4l2Backend::open(path);
            sys_name.contains(name) && opened.is_ok_and(|b| b.candidates()[0].driver == driver)
        })
}

fn nv12_320x240() -> VideoFormatRequest {
    VideoFormatRequest {
        fourcc: *b"NV12",
        width: 320,
        height: 240,
        size: 320 * 240 * 3 / 2,
        min_buffers: 4,
    }
}

fn check_queue(v4l2: &V4l2Backend, format: &VideoFormatRequest, min_pitch: u32) {
    let layout = v4l2
        .set_video_format(format)
        .unwrap()
        .expect("a queue layout");
    assert!(layout.count >= format.min_buffers, "{layout:?}");
    assert!(
        layout.pitch >= min_pitch && layout.size >= format.size,
        "{layout:?}"
    );
    let mut indices = Vec::new();
    for n in 0..layout.count {
        let block = v4l2.allocate(&BlockRequest::bytes(format.size)).unwrap();
        assert_eq!(block.kind, MemoryKind::DmaBuf);
        assert_eq!(block.pitch, Some(layout.pitch));
        check_dmabuf(&block.fd, layout.size);
        write_and_read_back(&block.fd, layout.size, n as u8);
        indices.push(block.index.unwrap());
    }
    indices.sort();
    indices.dedup();
    assert_eq!(
        indices.len() as u32,
        layout.count,
        "every queue buffer handed out once"
    );
    let dev = v4l2.device().unwrap();
    println!(
        "v4l2 {} ({}, {} queue): {} {}x{}: {} buffers of {} bytes, pitch {}, exported, written and read back",
        dev.path.display(),
        dev.card,
        dev.queue.queue_name(),
        String::from_utf8_lossy(&format.fourcc),
        format.width,
        format.height,
        layout.count,
        layout.size,
        layout.pitch
    );
}

#[test]
fn v4l2_vicodec_encoder_output_queue() {
    let Some(path) = video_node("vicodec", "encoder") else {
        return skip("no vicodec encoder in /sys/class/video4linux");
    };
    let v4l2 = V4l2Backend::open(&path).unwrap();
    // OUTPUT, or OUTPUT_MPLANE when vicodec runs with multiplanar=1.
    assert!(v4l2.candidates()[0]
        .queue
        .queue_name()
        .starts_with("OUTPUT"));
    check_queue(&v4l2, &nv12_320x240(), 320);
}

#[test]
fn v4l2_vim2m_output_queue() {
    let Some(path) = video_node("vim2m", "vim2m") else {
        return skip("no vim2m in /sys/class/video4linux");
    };
    let v4l2 = V4l2Backend::open(&path).unwrap();
    let rgb = VideoFormatRequest {
        fourcc: *b"RGB3",
        width: 320,
        height: 240,
        size: 320 * 240 * 3,
        min_buffers: 2,
    };
    check_queue(&v4l2, &rgb, 960);
    // vim2m has no NV12: the error names the device.
    let err = V4l2Backend::open(&path)
        .unwrap()
        .set_video_format(&nv12_320x240())
        .unwrap_err()
        .to_string();
    assert!(
        err.contains(path.to_str().unwrap()) && err.contains("NV12"),
        "{err}"
    );
}

#[test]
fn v4l2_vivid_capture_queue() {
    let Some(path) = video_node("vivid", "vid-cap") else {
        return skip("no vivid capture node in /sys/class/video4linux");
    };
    let v4l2 = V4l2Backend::open(&path).unwrap();
    assert!(v4l2.candidates()[0]
        .queue
        .queue_name()
        .starts_with("CAPTURE"));
    // vivid's webcam sizes are fixed; 320x180 is one of them.
    let nv12_320x180 = VideoFormatRequest {
        height: 180,
        size: 320 * 180 * 3 / 2,
        ..nv12_320x240()
    };
    check_queue(&v4l2, &nv12_320x180, 320);
}

#[test]
fn v4l2_auto_picks_a_mem2mem_device_for_nv12() {
    let Ok(v4l2) = V4l2Backend::open_first_mem2mem() else {
        return skip("no V4L2 mem2mem device");
    };
    check_queue(&v4l2, &nv12_320x240(), 320);
}
