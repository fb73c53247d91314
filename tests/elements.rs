//! Element-level tests in one process: gst_check Harness round trips, the
//! allocation proposal, and bad input (settings, a second producer, scripted
//! peers that speak another version or send garbage).

use std::path::Path;
use std::time::Duration;

use gst::glib;
use gst::prelude::*;
use gstbufshare::protocol::{self, Hello, Message, Role};
use gstbufshare::transport::unix::{Listener, UnixChannel};
use gstbufshare::transport::Channel;

mod common;

use common::{init, recv_datagram, TempSocket};

fn temp_socket(name: &str) -> TempSocket {
    common::temp_socket("el", name)
}

/// The next message, decoded, or None once the peer closed.
fn recv_msg(c: &UnixChannel) -> Option<Message> {
    common::recv_msg(c).map(|(msg, _fds)| msg)
}

/// Brings `element` (alone in a pipeline) to PAUSED and returns the error text, if any.
fn start_error(element: &gst::Element) -> Option<String> {
    let pipeline = gst::Pipeline::new();
    pipeline.add(element).unwrap();
    let res = pipeline.set_state(gst::State::Paused);
    let bus = pipeline.bus().unwrap();
    let err = bus
        .timed_pop_filtered(
            gst::ClockTime::from_mseconds(100),
            &[gst::MessageType::Error],
        )
        .map(|m| match m.view() {
            gst::MessageView::Error(e) => format!("{} {:?}", e.error(), e.debug()),
            _ => unreachable!(),
        });
    pipeline.set_state(gst::State::Null).unwrap();
    pipeline.remove(element).unwrap();
    assert_eq!(
        res.is_err(),
        err.is_some(),
        "state change result and error message disagree"
    );
    err
}

fn sink(socket: &Path) -> gst::Element {
    gst::ElementFactory::make("bufsharesink")
        .property("socket", socket.to_str().unwrap())
        .build()
        .unwrap()
}

#[test]
fn sink_without_socket_says_so() {
    init();
    let e = gst::ElementFactory::make("bufsharesink").build().unwrap();
    let err = start_error(&e).expect("must fail");
    assert!(err.contains("No socket path set"), "{err}");
}

#[test]
fn sink_in_missing_or_readonly_directory_names_the_path() {
    init();
    let e = sink(Path::new("/nonexistent-bufshare-dir/cam.sock"));
    let err = start_error(&e).expect("must fail");
    assert!(err.contains("/nonexistent-bufshare-dir"), "{err}");
    // A directory we cannot write to (when not root, /proc is a good one; as root, a file path).
    let file = temp_socket("plain-file");
    std::fs::write(&file, b"x").unwrap();
    let e = sink(&file.join("cam.sock"));
    let err = start_error(&e).expect("must fail");
    assert!(err.contains(file.to_str().unwrap()), "{err}");
}

#[test]
fn second_producer_on_a_live_socket_is_refused_and_stale_socket_is_replaced() {
    init();
    let path = temp_socket("live.sock");
    let first = gst::Pipeline::new();
    let s1 = sink(&path);
    first.add(&s1).unwrap();
    first.set_state(gst::State::Paused).unwrap();
    let err = start_error(&sink(&path)).expect("second producer must fail");
    assert!(err.contains("in use by a live producer"), "{err}");
    assert!(err.contains(path.to_str().unwrap()), "{err}");
    first.set_state(gst::State::Null).unwrap();

    // A socket file left behind by a dead process is taken over.
    let stale = temp_socket("stale.sock");
    drop(std::os::unix::net::UnixListener::bind(&stale).unwrap());
    assert!(stale.exists());
    assert_eq!(start_error(&sink(&stale)), None);
}

#[test]
fn src_timeout_says_what_it_waited_for() {
    init();
    let path = temp_socket("nobody.sock");
    let src = gst::ElementFactory::make("bufsharesrc")
        .property("socket", path.to_str().unwrap())
        .property("timeout", 200u64)
        .build()
        .unwrap();
    let err = start_error(&src).expect("must time out");
    assert!(err.contains("timed out waiting for a producer"), "{err}");
    assert!(err.contains(path.to_str().unwrap()), "{err}");
}

#[test]
fn consumer_refuses_a_producer_of_another_version() {
    init();
    let path = temp_socket("v2-producer.sock");
    let listener = Listener::bind(&path).unwrap();
    let fake = std::thread::spawn(move || {
        let conn = loop {
            if let Some(c) = listener.accept().unwrap() {
                break c;
            }
            std::thread::sleep(Duration::from_millis(5));
        };
        let hello = Message::Hello(Hello {
            version: protocol::VERSION + 1,
            role: Role::Producer,
            features: 0,
        });
        conn.send(&protocol::encode(&hello), &[]).unwrap();
        std::thread::sleep(Duration::from_millis(500));
    });
    let src = gst::ElementFactory::make("bufsharesrc")
        .property("socket", path.to_str().unwrap())
        .build()
        .unwrap();
    let err = start_error(&src).expect("must be refused");
    let (theirs, ours) = (protocol::VERSION + 1, protocol::VERSION);
    assert!(
        err.contains(&format!("producer speaks version {theirs}")),
        "{err}"
    );
    assert!(
        err.contains(&format!("consumer speaks version {ours}")),
        "{err}"
    );
    fake.join().unwrap();
}

/// A producer pipeline with a live test source, and a bus to read warnings from.
fn live_producer(path: &Path) -> (gst::Pipeline, gst::Element) {
    common::live_producer_with(path, "")
}

/// An appsrc producer on `path`, started, with caps already sent (a first
/// buffer nobody receives), and a consumer Harness connected to it.
fn appsrc_pair(
    path: &Path,
    caps: &str,
) -> (
    gst::Pipeline,
    gst_app::AppSrc,
    gst::Element,
    gst_check::Harness,
) {
    let (prod, appsrc, sink) = common::appsrc_producer(path, Some(caps));
    prod.set_state(gst::State::Playing).unwrap();
    // The consumer's start waits for caps, which the sink has once a buffer went through.
    appsrc
        .push_buffer(gst::Buffer::from_slice(b"before anyone"))
        .unwrap();
    let mut cons = gst_check::Harness::new_parse(&format!(
        "bufsharesrc socket={} timeout=5000",
        path.display()
    ));
    cons.play();
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while sink.property::<u32>("num-clients") < 1 {
        assert!(
            std::time::Instant::now() < deadline,
            "consumer never connected"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    // The first buffer may or may not have reached it: pull up to a marker.
    appsrc
        .push_buffer(gst::Buffer::from_slice(b"marker"))
        .unwrap();
    while cons.pull().unwrap().map_readable().unwrap().as_slice() != b"marker" {}
    (prod, appsrc, sink, cons)
}

fn warnings(pipeline: &gst::Pipeline) -> Vec<String> {
    let bus = pipeline.bus().unwrap();
    let mut out = Vec::new();
    while let Some(m) = bus.pop_filtered(&[gst::MessageType::Warning]) {
        if let gst::MessageView::Warning(w) = m.view() {
            out.push(w.error().to_string());
        }
    }
    out
}

#[test]
fn bad_peers_are_dropped_and_good_ones_carry_on() {
    init();
    let path = temp_socket("hostile.sock");
    let (pipeline, sink) = live_producer(&path);

    // A well-behaved consumer, in this process.
    let mut good = gst_check::Harness::new_parse(&format!("bufsharesrc socket={}", path.display()));
    good.play();
    assert!(good.pull().is_ok());

    // A consumer speaking a newer version gets REFUSE naming both versions, then the door.
    let v2 = UnixChannel::connect(&path).unwrap();
    assert!(matches!(recv_msg(&v2), Some(Message::Hello(h)) if h.role == Role::Producer));
    let hello = Message::Hello(Hello {
        version: protocol::VERSION + 1,
        role: Role::Consumer,
        features: 0,
    });
    v2.send(&protocol::encode(&hello), &[]).unwrap();
    match recv_msg(&v2) {
        Some(Message::Refuse { reason }) => {
            let (theirs, ours) = (protocol::VERSION + 1, protocol::VERSION);
            assert!(
                reason.contains(&format!("consumer speaks version {theirs}")),
                "{reason}"
            );
            assert!(
                reason.contains(&format!("producer speaks version {ours}")),
                "{reason}"
            );
        }
        other => panic!("expected REFUSE, got {other:?}"),
    }
    assert!(recv_datagram(&v2).is_none());

    // Garbage bytes: dropped.
    let junk = UnixChannel::connect(&path).unwrap();
    assert!(matches!(recv_msg(&junk), Some(Message::Hello(_))));
    junk.send(b"GET / HTTP/1.1\r\n\r\n", &[]).unwrap();
    assert!(recv_datagram(&junk).is_none());

    // A consumer that releases a frame it never got: dropped.
    let liar = UnixChannel::connect(&path).unwrap();
    assert!(matches!(recv_msg(&liar), Some(Message::Hello(_))));
    let hello = Message::Hello(Hello {
        version: protocol::VERSION,
        role: Role::Consumer,
        features: 0,
    });
    liar.send(&protocol::encode(&hello), &[]).unwrap();
    liar.send(
        &protocol::encode(&Message::Release {
            frame_ids: vec![u64::MAX - 1],
        }),
        &[],
    )
    .unwrap();
    // Whatever it was sent before the drop, the connection then closes.
    while recv_datagram(&liar).is_some() {}

    // The good consumer never noticed.
    for _ in 0..10 {
        assert!(good.pull().is_ok());
    }
    // The sink posts its warning once it has closed a connection: wait for
    // all three, not a fixed time (a loaded machine may take longer).
    let mut w = Vec::new();
    let expected = [
        "protocol version mismatch",
        "protocol error",
        "does not hold",
    ];
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !expected
        .iter()
        .all(|e| w.iter().any(|w: &String| w.contains(e)))
        && std::time::Instant::now() < deadline
    {
        std::thread::sleep(Duration::from_millis(20));
        w.extend(warnings(&pipeline));
    }
    assert!(
        w.iter().any(|w| w.contains("protocol version mismatch")),
        "{w:?}"
    );
    assert!(w.iter().any(|w| w.contains("protocol error")), "{w:?}");
    assert!(w.iter().any(|w| w.contains("does not hold")), "{w:?}");
    assert_eq!(sink.property::<u32>("num-clients"), 1);
    pipeline.set_state(gst::State::Null).unwrap();
}

#[test]
fn harness_round_trip_keeps_bytes_timestamps_and_flags() {
    init();
    let path = temp_socket("harness.sock");
    let (prod, appsrc, sink, mut cons) = appsrc_pair(&path, "application/x-test-bytes");
    appsrc
        .push_buffer(gst::Buffer::from_slice(b"hello"))
        .unwrap();
    assert_eq!(
        cons.pull().unwrap().map_readable().unwrap().as_slice(),
        b"hello"
    );

    for (i, size) in [100usize, 5000, 1 << 20].into_iter().enumerate() {
        let data: Vec<u8> = (0..size).map(|b| (b * 7 + i) as u8).collect();
        let mut buffer = gst::Buffer::from_mut_slice(data.clone());
        {
            let b = buffer.get_mut().unwrap();
            b.set_offset(42 + i as u64);
            b.set_offset_end(43 + i as u64);
            b.set_duration(gst::ClockTime::from_mseconds(33));
            b.set_flags(gst::BufferFlags::DELTA_UNIT);
        }
        appsrc.push_buffer(buffer).unwrap();
        let got = cons.pull().unwrap();
        assert_eq!(got.map_readable().unwrap().as_slice(), &data[..]);
        assert_eq!(got.offset(), 42 + i as u64);
        assert_eq!(got.offset_end(), 43 + i as u64);
        assert_eq!(got.duration(), Some(gst::ClockTime::from_mseconds(33)));
        assert!(got.flags().contains(gst::BufferFlags::DELTA_UNIT));
        // Read-only downstream.
        assert!(got
            .peek_memory(0)
            .flags()
            .contains(gst::MemoryFlags::READONLY));
    }
    let caps = cons
        .element()
        .unwrap()
        .static_pad("src")
        .unwrap()
        .current_caps()
        .unwrap();
    assert_eq!(caps.to_string(), "application/x-test-bytes");
    appsrc.end_of_stream().unwrap();
    // EOS crosses the socket.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        if let Some(ev) = cons.try_pull_event() {
            if ev.type_() == gst::EventType::Eos {
                break;
            }
        }
        assert!(std::time::Instant::now() < deadline, "no EOS");
        std::thread::sleep(Duration::from_millis(5));
    }
    let stats = sink.property::<gst::Structure>("stats");
    assert_eq!(stats.get::<u64>("frames-rendered").unwrap(), 6);
    // Two of the buffers came without fds and were large: one copy each. The small ones went inline.
    assert_eq!(stats.get::<u64>("frames-copied").unwrap(), 2);
    prod.set_state(gst::State::Null).unwrap();
}

#[test]
fn sink_proposes_a_pool_of_fd_memory_with_video_meta() {
    init();
    let path = temp_socket("pool.sock");
    let sink = sink(&path);
    let pipeline = gst::Pipeline::new();
    pipeline.add(&sink).unwrap();
    let _ = pipeline.set_state(gst::State::Paused);
    let caps: gst::Caps = "video/x-raw,format=NV12,width=320,height=240,framerate=30/1"
        .parse()
        .unwrap();
    let mut query = gst::query::Allocation::new(Some(&caps), true);
    assert!(sink.static_pad("sink").unwrap().query(&mut query));
    let (pool, size, _, _) = query.allocation_pools().next().expect("a pool");
    let pool = pool.expect("a pool object");
    assert_eq!(size as usize, 320 * 240 * 3 / 2);
    assert!(query
        .find_allocation_meta::<gst_video::VideoMeta>()
        .is_some());
    let mut config = pool.config();
    config.add_option(gst_video::BUFFER_POOL_OPTION_VIDEO_META);
    pool.set_config(config).unwrap();
    pool.set_active(true).unwrap();
    let buffer = pool.acquire_buffer(None).unwrap();
    assert!(buffer
        .peek_memory(0)
        .is_memory_type::<gst_allocators::FdMemory>());
    assert!(buffer.meta::<gst_video::VideoMeta>().is_some());
    drop(buffer);
    pool.set_active(false).unwrap();
    pipeline.set_state(gst::State::Null).unwrap();
}

#[test]
fn queries_are_answered_while_waiting_for_a_stalled_producer() {
    init();
    let path = temp_socket("stalled.sock");
    let (prod, appsrc, _sink, mut cons) = appsrc_pair(
        &path,
        "video/x-raw,format=GRAY8,width=64,height=64,framerate=30/1",
    );
    appsrc
        .push_buffer(gst::Buffer::from_mut_slice(vec![8u8; 64 * 64]))
        .unwrap();
    assert!(cons.pull().is_ok());
    // The producer sends nothing more: the source now blocks waiting for a frame.
    std::thread::sleep(Duration::from_millis(100));
    let src = cons.element().unwrap();
    let pad = src.static_pad("src").unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut latency = gst::query::Latency::new();
        let answered = pad.query(&mut latency);
        let caps = pad.query_caps(None);
        tx.send((answered, latency.result().0, caps.to_string()))
            .unwrap();
    });
    let (answered, live, caps) = rx
        .recv_timeout(Duration::from_secs(5))
        .expect("latency and caps queries hung while the source waited for frames");
    assert!(answered && live);
    assert!(caps.starts_with("video/x-raw"), "{caps}");
    prod.set_state(gst::State::Null).unwrap();
}

#[test]
fn caps_too_long_for_a_message_fail_negotiation_with_a_clear_error() {
    init();
    let path = temp_socket("longcaps.sock");
    let long = "x".repeat(protocol::MAX_MESSAGE_LEN);
    let (prod, appsrc, _sink) = common::appsrc_producer(&path, None);
    let caps = gst::Caps::builder("application/x-test")
        .field("blob", &long)
        .build();
    appsrc.set_caps(Some(&caps));
    prod.set_state(gst::State::Playing).unwrap();
    let _ = appsrc.push_buffer(gst::Buffer::from_mut_slice(vec![0u8; 16]));
    let bus = prod.bus().unwrap();
    let err = bus
        .timed_pop_filtered(gst::ClockTime::from_seconds(5), &[gst::MessageType::Error])
        .expect("an error");
    match err.view() {
        gst::MessageView::Error(e) => assert!(
            e.error().to_string().contains("do not fit in one message"),
            "{}",
            e.error()
        ),
        _ => unreachable!(),
    }
    prod.set_state(gst::State::Null).unwrap();
}

/// A buffer over a fresh memfd, and a flag that turns true when GStreamer frees the buffer.
fn fd_buffer_with_return_flag(
    size: usize,
) -> (gst::Buffer, std::sync::Arc<std::sync::atomic::AtomicBool>) {
    use gst_allocators::prelude::*;
    use std::os::fd::IntoRawFd;
    let fd = rustix::fs::memfd_create(
        "test",
        rustix::fs::MemfdFlags::CLOEXEC | rustix::fs::MemfdFlags::ALLOW_SEALING,
    )
    .unwrap();
    rustix::fs::ftruncate(&fd, size as u64).unwrap();
    let alloc = gst_allocators::FdAllocator::new();
    // SAFETY: the allocator takes ownership of the fd.
    let mem = unsafe {
        alloc
            .alloc_fd(fd.into_raw_fd(), size, gst_allocators::FdMemoryFlags::NONE)
            .unwrap()
    };
    let mut buffer = gst::Buffer::new();
    buffer.get_mut().unwrap().append_memory(mem);
    let returned = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    unsafe extern "C" fn notify(data: glib::ffi::gpointer, _obj: *mut gst::ffi::GstMiniObject) {
        // SAFETY: `data` is the Arc leaked below, given back once.
        let flag =
            unsafe { std::sync::Arc::from_raw(data as *const std::sync::atomic::AtomicBool) };
        flag.store(true, std::sync::atomic::Ordering::SeqCst);
    }
    // SAFETY: a weak ref on a live buffer; the notify owns one Arc.
    unsafe {
        gst::ffi::gst_mini_object_weak_ref(
            buffer.as_ptr() as *mut gst::ffi::GstMiniObject,
            Some(notify),
            std::sync::Arc::into_raw(returned.clone()) as glib::ffi::gpointer,
        );
    }
    (buffer, returned)
}

#[test]
fn a_share_made_downstream_keeps_the_producer_buffer() {
    init();
    let path = temp_socket("subshare.sock");
    let (prod, appsrc, _sink, mut cons) = appsrc_pair(&path, "application/x-test");

    let (buffer, returned) = fd_buffer_with_return_flag(64 * 1024);
    appsrc.push_buffer(buffer).unwrap();
    let got = cons.pull().unwrap();
    // Downstream keeps part of the frame: GStreamer parents this share to the import itself.
    let part = got
        .copy_region(gst::BufferCopyFlags::MEMORY, 100..200)
        .unwrap();
    drop(got);
    std::thread::sleep(Duration::from_millis(200));
    assert!(
        !returned.load(std::sync::atomic::Ordering::SeqCst),
        "released while a share of it was alive"
    );
    drop(part);
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while !returned.load(std::sync::atomic::Ordering::SeqCst) {
        assert!(
            std::time::Instant::now() < deadline,
            "never released after the share went"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    prod.set_state(gst::State::Null).unwrap();
}

/// A consumer with on-disconnect=reconnect and a retry interval far longer than the test.
fn reconnecting_consumer(path: &Path) -> (gst::Pipeline, gst::Element) {
    let pipeline = gst::parse::launch(&format!(
        "bufsharesrc name=src socket={} on-disconnect=reconnect reconnect-interval=600000 ! fakesink",
        path.display()
    ))
    .unwrap()
    .downcast::<gst::Pipeline>()
    .unwrap();
    let src = pipeline.by_name("src").unwrap();
    (pipeline, src)
}

/// Sets `pipeline` to NULL and answers how long that took.
fn time_to_null(pipeline: &gst::Pipeline) -> Duration {
    let started = std::time::Instant::now();
    pipeline.set_state(gst::State::Null).unwrap();
    started.elapsed()
}

#[test]
fn reconnecting_src_plays_without_a_producer_and_stops_at_once() {
    init();
    let path = temp_socket("nobody.sock");
    let (pipeline, src) = reconnecting_consumer(&path);
    // The source reaches PLAYING with no producer and no caps yet (live: no
    // preroll). The sink, as behind any live source, completes its own change
    // to PLAYING with the first buffer.
    pipeline.set_state(gst::State::Playing).unwrap();
    let (res, _, _) = src.state(gst::ClockTime::from_seconds(10));
    assert_eq!(res, Ok(gst::StateChangeSuccess::Success));
    assert_eq!(src.current_state(), gst::State::Playing);
    std::thread::sleep(Duration::from_millis(300));
    assert!(!src.property::<bool>("connected"));
    // Queries are answered while it waits for a producer.
    let pad = src.static_pad("src").unwrap();
    let mut latency = gst::query::Latency::new();
    assert!(pad.query(&mut latency));
    assert!(latency.result().0, "live");
    // Stopping does not wait for the next attempt, 10 minutes away.
    let took = time_to_null(&pipeline);
    assert!(took < Duration::from_secs(10), "NULL took {took:?}");
    let bus = pipeline.bus().unwrap();
    assert!(bus.pop_filtered(&[gst::MessageType::Error]).is_none());
}

#[test]
fn reconnecting_src_stops_at_once_after_its_producer_left() {
    init();
    let path = temp_socket("left.sock");
    let (prod, _sink) = live_producer(&path);
    let (pipeline, src) = reconnecting_consumer(&path);
    pipeline.set_state(gst::State::Playing).unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !src.property::<bool>("connected") {
        assert!(std::time::Instant::now() < deadline, "never connected");
        std::thread::sleep(Duration::from_millis(10));
    }
    prod.set_state(gst::State::Null).unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while src.property::<bool>("connected") {
        assert!(
            std::time::Instant::now() < deadline,
            "never saw the producer leave"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    let warned = warnings(&pipeline);
    assert!(
        warned.iter().any(|w| w.contains("the producer went away")),
        "{warned:?}"
    );
    let took = time_to_null(&pipeline);
    assert!(took < Duration::from_secs(10), "NULL took {took:?}");
}

/// The inode behind the first memory of `buffer` (a memfd), by fstat on its fd.
fn memfd_inode(buffer: &gst::BufferRef) -> u64 {
    let mem = buffer.peek_memory(0);
    let fd = mem
        .downcast_memory_ref::<gst_allocators::FdMemory>()
        .expect("fd memory")
        .fd();
    // SAFETY: the fd belongs to the memory, alive while we look.
    let fd = unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) };
    rustix::fs::fstat(fd).unwrap().st_ino
}

/// How many of this process's fds are open on a file with inode `ino`.
fn open_fds_on(ino: u64) -> usize {
    std::fs::read_dir("/proc/self/fd")
        .unwrap()
        .filter_map(|e| std::fs::metadata(e.ok()?.path()).ok())
        .filter(|m| std::os::unix::fs::MetadataExt::ino(m) == ino)
        .count()
}

#[test]
fn frames_of_a_vanished_producer_freed_after_a_reconnect_go_nowhere() {
    init();
    let path = temp_socket("held.sock");
    let (a, _) = live_producer(&path);
    let mut cons = gst_check::Harness::new_parse(&format!(
        "bufsharesrc name=src socket={} on-disconnect=reconnect reconnect-interval=20",
        path.display()
    ));
    cons.play();
    let held = cons.pull().unwrap();
    let a_size = held.size();
    let a_inode = memfd_inode(&held);
    for _ in 0..3 {
        cons.pull().unwrap();
    }
    a.set_state(gst::State::Null).unwrap();
    drop(a);
    // B on the same path, other caps. Its frame ids start again, like A's did.
    let b = gst::parse::launch(&format!(
        "videotestsrc is-live=true ! video/x-raw,format=GRAY8,width=32,height=32,framerate=30/1 ! bufsharesink name=sink socket={}",
        path.display()
    ))
    .unwrap()
    .downcast::<gst::Pipeline>()
    .unwrap();
    let b_sink = b.by_name("sink").unwrap();
    let kicked = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let k = kicked.clone();
    b_sink.connect("client-disconnected", false, move |_| {
        k.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        None
    });
    b.set_state(gst::State::Playing).unwrap();
    // A's last frames may still be queued: pull until B's.
    while cons.pull().unwrap().size() != 32 * 32 {}
    assert_ne!(a_size, 32 * 32);
    // The import of A's memory is still alive, and only A's frame holds it now.
    assert!(open_fds_on(a_inode) > 0, "A's memory went before its frame");
    drop(held);
    for _ in 0..10 {
        assert_eq!(cons.pull().unwrap().size(), 32 * 32);
    }
    assert_eq!(open_fds_on(a_inode), 0, "A's memory is still open: leaked");
    let bin = cons.element().unwrap().downcast::<gst::Bin>().unwrap();
    let src = bin.by_name("src").unwrap();
    assert_eq!(src.property::<u64>("reconnects"), 1);
    assert_eq!(
        kicked.load(std::sync::atomic::Ordering::SeqCst),
        0,
        "B dropped the consumer"
    );
    assert_eq!(b_sink.property::<u32>("num-clients"), 1);
    b.set_state(gst::State::Null).unwrap();
}

/// `frames-held` and `frames-held-peak` agree without a `max-held` bound (the
/// peak used to be updated only under one), and `clients` is a GstValueArray
/// whether empty or not.
#[test]
fn held_frames_peak_and_clients_array_agree() {
    init();
    let path = temp_socket("held-stats.sock");
    let (pipeline, sink) = live_producer(&path);
    let clients_type = |s: &gst::Structure| s.value("clients").unwrap().type_();
    let empty = sink.property::<gst::Structure>("stats");
    println!("no consumer: {empty}");
    assert_eq!(clients_type(&empty), gst::Array::static_type(), "{empty}");
    // GStreamer prints an empty array as `(int)< >`; it still reads back as one.
    let reparsed: gst::Structure = empty.to_string().parse().unwrap();
    assert_eq!(
        clients_type(&reparsed),
        gst::Array::static_type(),
        "{reparsed}"
    );
    // A scripted consumer that never releases: it holds max-inflight (8) frames.
    let c = UnixChannel::connect(&path).unwrap();
    assert!(matches!(recv_msg(&c), Some(Message::Hello(_))));
    c.send(
        &protocol::encode(&common::hello(protocol::VERSION, Role::Consumer)),
        &[],
    )
    .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let stats = loop {
        let s = sink.property::<gst::Structure>("stats");
        if s.get::<u32>("frames-held").unwrap() >= 8 {
            break s;
        }
        assert!(std::time::Instant::now() < deadline, "never held 8: {s}");
        std::thread::sleep(Duration::from_millis(20));
    };
    println!("one consumer: {stats}");
    assert_eq!(stats.get::<u32>("max-held").unwrap(), 0, "no bound here");
    assert_eq!(stats.get::<u32>("frames-held").unwrap(), 8);
    assert_eq!(stats.get::<u32>("frames-held-peak").unwrap(), 8);
    assert_eq!(clients_type(&stats), gst::Array::static_type());
    assert_eq!(stats.get::<gst::Array>("clients").unwrap().len(), 1);
    // It goes: nothing held, the peak stays.
    drop(c);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let s = sink.property::<gst::Structure>("stats");
        if s.get::<u32>("frames-held").unwrap() == 0 {
            assert_eq!(s.get::<u32>("frames-held-peak").unwrap(), 8);
            assert_eq!(clients_type(&s), gst::Array::static_type(), "{s}");
            break;
        }
        assert!(std::time::Instant::now() < deadline, "still held: {s}");
        std::thread::sleep(Duration::from_millis(20));
    }
    pipeline.set_state(gst::State::Null).unwrap();
}

/// `client-disconnected` fires only for consumers that fired
/// `client-connected`: connections dropped before their HELLO (garbage, a
/// refused version, silence) are logged, not signalled.
#[test]
fn only_connected_consumers_are_signalled_gone() {
    init();
    let path = temp_socket("signals.sock");
    let (pipeline, sink) = live_producer(&path);
    let connected = std::sync::Arc::new(std::sync::Mutex::new(Vec::<u64>::new()));
    let gone = std::sync::Arc::new(std::sync::Mutex::new(Vec::<u64>::new()));
    {
        let connected = connected.clone();
        sink.connect("client-connected", false, move |v| {
            connected.lock().unwrap().push(v[1].get::<u64>().unwrap());
            None
        });
        let gone = gone.clone();
        sink.connect("client-disconnected", false, move |v| {
            gone.lock().unwrap().push(v[1].get::<u64>().unwrap());
            None
        });
    }
    // Before HELLO: garbage, and a peer that says it is a producer.
    let junk = UnixChannel::connect(&path).unwrap();
    assert!(matches!(recv_msg(&junk), Some(Message::Hello(_))));
    junk.send(b"GET / HTTP/1.1\r\n\r\n", &[]).unwrap();
    assert!(recv_datagram(&junk).is_none());
    let wrong = UnixChannel::connect(&path).unwrap();
    assert!(matches!(recv_msg(&wrong), Some(Message::Hello(_))));
    wrong
        .send(
            &protocol::encode(&common::hello(protocol::VERSION, Role::Producer)),
            &[],
        )
        .unwrap();
    assert!(recv_datagram(&wrong).is_none());
    // A real one, connected and then gone.
    let good = UnixChannel::connect(&path).unwrap();
    assert!(matches!(recv_msg(&good), Some(Message::Hello(_))));
    good.send(
        &protocol::encode(&common::hello(protocol::VERSION, Role::Consumer)),
        &[],
    )
    .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while connected.lock().unwrap().is_empty() {
        assert!(std::time::Instant::now() < deadline, "never connected");
        std::thread::sleep(Duration::from_millis(10));
    }
    drop(good);
    while gone.lock().unwrap().is_empty() {
        assert!(std::time::Instant::now() < deadline, "never gone");
        std::thread::sleep(Duration::from_millis(10));
    }
    std::thread::sleep(Duration::from_millis(300));
    let (connected, gone) = (
        connected.lock().unwrap().clone(),
        gone.lock().unwrap().clone(),
    );
    println!("connected {connected:?}, disconnected {gone:?}");
    assert_eq!(connected.len(), 1);
    assert_eq!(
        gone, connected,
        "disconnected fired for peers never connected"
    );
    let w = warnings(&pipeline);
    assert!(w.iter().any(|w| w.contains("protocol error")), "{w:?}");
    pipeline.set_state(gst::State::Null).unwrap();
}
