//! A hardware converter as a bufshare consumer (issue 4): `bufsharesrc ! v4l2convert
//! output-io-mode=dmabuf-import` on vim2m reads the producer's dma-bufs directly.
//!
//! Producer process: vivid `v4l2src io-mode=dmabuf` (RGB) ! tee (one branch dumps the frames)
//! ! bufsharesink. Consumer process: bufsharesrc ! v4l2convert (vim2m, RGB -> BGR; vim2m takes
//! only RGB formats in) ! filesink. Checked: the converter's V4L2 allocator queued the producer's
//! dma-bufs (same inodes) for every frame, it produced one picture per frame, and each picture is
//! the captured frame with red and blue swapped, byte for byte.

use bufshare_hwtests::*;

const WIDTH: usize = 320; // a vivid webcam size
const HEIGHT: usize = 180;
const FRAMES: usize = 20;

/// Packed RGB to packed BGR, the reference for the converter's output.
fn rgb_to_bgr(rgb: &[u8]) -> Vec<u8> {
    rgb.chunks_exact(3)
        .flat_map(|p| [p[2], p[1], p[0]])
        .collect()
}

#[test]
fn vim2m_converter_imports_dmabuf() {
    let _serial = serial();
    let camera = skip_unless!(v4l2_node("vivid", "video capture node", |n| n.is_capture()));
    let converter = skip_unless!(v4l2_node("vim2m", "mem2mem node", |n| n.is_m2m()));
    skip_unless!(gst_element("v4l2convert"));
    let peer = skip_unless!(peer());
    eprintln!(
        "camera {}, converter {}",
        camera.path.display(),
        converter.path.display()
    );

    let dir = TempDir::new("vim2m");
    let socket = dir.path("cam.sock");
    let raw = dir.path("captured.rgb");
    let converted = dir.path("converted.bgr");
    let log = dir.path("consumer-gst.log");

    let producer = spawn_camera_producer(
        &peer,
        &dir,
        &socket,
        &camera.path,
        "RGB",
        (WIDTH, HEIGHT),
        FRAMES,
        &raw,
    );
    let consumer = spawn_v4l2_consumer(
        &peer,
        &dir,
        &socket,
        &format!(
            "v4l2convert output-io-mode=dmabuf-import \
             ! video/x-raw,format=BGR,width={WIDTH},height={HEIGHT} ! filesink location={}",
            converted.display()
        ),
        &log,
    );
    consumer.wait_ok();
    producer.wait_ok();

    let prod = Report::read(&dir.path("producer.txt"));
    let cons = Report::read(&dir.path("consumer.txt"));
    eprintln!(
        "producer pushed {} frames, consumer got {}",
        prod.frames.len(),
        cons.frames.len()
    );
    assert_eq!(prod.frames.len(), FRAMES, "producer frames");
    assert_identical("consumer", &prod, &cons);
    for f in &cons.frames {
        assert_eq!(
            f.kind, "dmabuf",
            "consumer frame {} is not dma-buf memory",
            f.offset
        );
    }
    let imports = assert_imports_are_producer_dmabufs("v4l2convert", &log, &prod, &cons);
    eprintln!("v4l2convert imported {imports} distinct fds, all the producer's dma-bufs");

    let in_size = WIDTH * HEIGHT * 3;
    let out_size = WIDTH * HEIGHT * 3;
    let raw = std::fs::read(&raw).unwrap();
    let converted = std::fs::read(&converted).unwrap();
    assert_eq!(raw.len(), FRAMES * in_size, "captured dump size");
    assert_eq!(
        converted.len(),
        cons.frames.len() * out_size,
        "converter output: {} bytes for {} frames",
        converted.len(),
        cons.frames.len()
    );
    for (i, f) in cons.frames.iter().enumerate() {
        let (index, p) = prod.frame_at(f.offset).unwrap();
        let captured = frame_of(&raw, in_size, index);
        assert_eq!(
            fnv1a(captured),
            p.sum,
            "dumped frame {index} is not the shared frame"
        );
        let picture = frame_of(&converted, out_size, i);
        let reference = rgb_to_bgr(captured);
        let differing = picture
            .iter()
            .zip(&reference)
            .filter(|(a, b)| a != b)
            .count();
        assert!(
            differing == 0,
            "converted frame {i} (offset {}) differs from its capture in {differing} of {out_size} bytes (PSNR {:.2} dB)",
            f.offset,
            psnr(picture, &reference)
        );
    }
    eprintln!(
        "{} frames converted, each exactly its captured frame in BGR",
        cons.frames.len()
    );
}
