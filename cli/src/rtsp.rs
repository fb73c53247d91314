//! `bufshare rtsp`: an RTSP server (gst-rtsp-server) with one shared media per mount path.
//! Each media is `bufsharesrc ! queue ! videoconvert ! ENCODER ! h264parse ! rtph264pay`, built
//! once, kept prepared while clients come and go, and asked for a key frame whenever a client
//! starts playing so that a late joiner does not wait for the next GOP.

use std::sync::LazyLock;

use gst::glib;
use gst::prelude::*;
use gst_rtsp_server::prelude::*;
use gst_rtsp_server::{RTSPMedia, RTSPMediaFactory, RTSPServer, RTSPSuspendMode};

use crate::args::RtspArgs;

static CAT: LazyLock<gst::DebugCategory> = LazyLock::new(|| {
    gst::DebugCategory::new(
        "bufshare-cli",
        gst::DebugColorFlags::empty(),
        Some("bufshare command line tool"),
    )
});

/// Encoder used when `--encoder` is not given and v4l2h264enc is absent.
pub const SOFTWARE_ENCODER: &str = "x264enc tune=zerolatency speed-preset=ultrafast key-int-max=30";

/// A runtime error: one line on stderr, exit code 1.
#[derive(Debug)]
pub struct RuntimeError(pub String);

/// The encoder fragment: the user's, else the hardware one if present, else x264enc.
pub fn choose_encoder(user: Option<&str>) -> String {
    match user {
        Some(e) => e.trim().to_string(),
        None if gst::ElementFactory::find("v4l2h264enc").is_some() => "v4l2h264enc".to_string(),
        None => SOFTWARE_ENCODER.to_string(),
    }
}

/// The media pipeline for one producer socket (without the enclosing parentheses).
pub fn launch_line(socket: &str, encoder: &str) -> String {
    format!(
        "bufsharesrc socket=\"{}\" on-disconnect=reconnect ! queue ! videoconvert ! {encoder} \
         ! h264parse ! rtph264pay name=pay0 pt=96 config-interval=-1",
        socket.replace('\\', "\\\\").replace('"', "\\\"")
    )
}

/// Builds the pipeline once (not started) to check that every element exists and the
/// encoder fragment parses; names the missing elements otherwise.
fn check_launch_line(line: &str, encoder: &str) -> Result<(), RuntimeError> {
    let mut ctx = gst::ParseContext::new();
    match gst::parse::launch_full(line, Some(&mut ctx), gst::ParseFlags::FATAL_ERRORS) {
        Ok(pipeline) => {
            let _ = pipeline.set_state(gst::State::Null);
            Ok(())
        }
        Err(err) => {
            let missing = ctx.missing_elements();
            if missing.iter().any(|m| m == "bufsharesrc") {
                Err(RuntimeError(
                    "GStreamer element 'bufsharesrc' not found: set GST_PLUGIN_PATH to the \
                     directory of libgstbufshare.so"
                        .into(),
                ))
            } else if !missing.is_empty() {
                Err(RuntimeError(format!(
                    "GStreamer element '{}' not found (encoder: \"{encoder}\")",
                    missing.join("', '")
                )))
            } else {
                Err(RuntimeError(format!(
                    "invalid pipeline with encoder \"{encoder}\": {err}"
                )))
            }
        }
    }
}

/// Asks the encoder of `media` for a key frame (with SPS/PPS) from the payloader's sink pad.
fn force_key_unit(media: &RTSPMedia) {
    let Some(pay) = media
        .element()
        .downcast_ref::<gst::Bin>()
        .and_then(|bin| bin.by_name("pay0"))
    else {
        return;
    };
    let Some(sinkpad) = pay.static_pad("sink") else {
        return;
    };
    let event = gst_video::UpstreamForceKeyUnitEvent::builder()
        .all_headers(true)
        .build();
    let sent = sinkpad.push_event(event);
    gst::debug!(CAT, "force-key-unit sent upstream (handled: {sent})");
}

/// Keeps `media` prepared for good: one extra prepare, taken once it is prepared, so that the
/// last client leaving does not tear the pipeline (and its producer connection) down.
fn hold_prepared(media: &RTSPMedia, path: String) {
    let held = std::sync::atomic::AtomicBool::new(false);
    media.connect_prepared(move |media| {
        if held.swap(true, std::sync::atomic::Ordering::SeqCst) {
            return;
        }
        let media = media.clone();
        let path = path.clone();
        // Not from inside the signal (the media's state lock is held there, and the status may
        // not read Prepared yet): from the main loop, polling until the preparation settles.
        glib::timeout_add(std::time::Duration::from_millis(20), move || {
            use gst_rtsp_server::RTSPMediaStatus;
            match media.status() {
                RTSPMediaStatus::Preparing => glib::ControlFlow::Continue,
                RTSPMediaStatus::Prepared => {
                    match media.prepare(None) {
                        Ok(()) => gst::info!(CAT, "media for {} prepared, kept prepared", path),
                        Err(e) => gst::warning!(CAT, "media for {} not held: {}", path, e),
                    }
                    glib::ControlFlow::Break
                }
                other => {
                    gst::warning!(CAT, "media for {} not held, status {:?}", path, other);
                    glib::ControlFlow::Break
                }
            }
        });
    });
}

fn make_factory(socket: &str, path: &str, encoder: &str) -> RTSPMediaFactory {
    let factory = RTSPMediaFactory::new();
    factory.set_launch(&format!("( {} )", launch_line(socket, encoder)));
    factory.set_shared(true);
    factory.set_eos_shutdown(false);
    factory.set_suspend_mode(RTSPSuspendMode::None);
    let path = path.to_string();
    factory.connect_media_configure(move |_, media| {
        gst::info!(CAT, "media for {path} created");
        media.set_eos_shutdown(false);
        media.set_suspend_mode(RTSPSuspendMode::None);
        hold_prepared(media, path.clone());
    });
    factory
}

/// Serves every mount until the process is stopped (SIGINT/SIGTERM).
pub fn run(args: RtspArgs) -> Result<(), RuntimeError> {
    gst::init().map_err(|e| RuntimeError(format!("GStreamer init failed: {e}")))?;
    let encoder = choose_encoder(args.encoder.as_deref());
    for m in &args.mounts {
        check_launch_line(&launch_line(&m.socket, &encoder), &encoder)?;
    }

    let server = RTSPServer::new();
    server.set_address(&args.address);
    server.set_service(&args.port.to_string());
    let mounts = server
        .mount_points()
        .ok_or_else(|| RuntimeError("RTSP server has no mount points".into()))?;
    for m in &args.mounts {
        mounts.add_factory(&m.path, make_factory(&m.socket, &m.path, &encoder));
    }

    // A client that starts playing gets a key frame at once (after its transport is active:
    // play-request is emitted once the PLAY has been handled).
    server.connect_client_connected(|_, client| {
        client.connect_play_request(|_, ctx| {
            let Some(session) = ctx.session() else { return };
            for session_media in session.filter(None) {
                if let Some(media) = session_media.media() {
                    force_key_unit(&media);
                }
            }
        });
    });

    let main_loop = glib::MainLoop::new(None, false);
    let _source = server.attach(None).map_err(|_| {
        RuntimeError(format!(
            "cannot listen on {}:{} (port in use or address not available)",
            args.address, args.port
        ))
    })?;
    let port = server.bound_port();
    for m in &args.mounts {
        println!(
            "serving rtsp://{}:{port}{} from {}",
            args.address, m.path, m.socket
        );
        gst::info!(
            CAT,
            "serving rtsp://{}:{port}{} from {} with encoder \"{encoder}\"",
            args.address,
            m.path,
            m.socket
        );
    }
    use std::io::Write;
    let _ = std::io::stdout().flush();

    main_loop.run();
    Ok(())
}
