//! UCX's log forwarded to a Rust handler (`ucx::log`), and the count of live memory
//! registrations (`ucx::live_registrations`), in a process of their own (both are
//! process-wide, so this file holds one test).

mod common;

use std::net::TcpListener;
use std::sync::{Arc, Mutex};

use common::*;
use ucx::log::{LogAction, LogLevel};
use ucx::{Listener, MemoryRegion};

#[test]
fn log_handler_sees_a_failed_bind_and_registrations_are_counted() {
    let seen: Arc<Mutex<Vec<(LogLevel, String, String)>>> = Arc::default();
    let s = seen.clone();
    ucx::log::set_handler(Some(Box::new(move |r| {
        s.lock()
            .unwrap()
            .push((r.level, r.file.to_owned(), r.message.to_owned()));
        LogAction::Stop
    })));
    let (ctx, worker) = tcp_context("log");
    // An address a plain TCP socket listens on: UCX logs the bind failure.
    let tcp = TcpListener::bind("127.0.0.1:0").unwrap();
    let taken = tcp.local_addr().unwrap();
    assert!(Listener::bind(&worker, taken, |_| {}).is_err());
    let seen_now = seen.lock().unwrap().clone();
    eprintln!("{seen_now:#?}");
    assert!(
        seen_now
            .iter()
            .any(|(l, _, m)| *l <= LogLevel::Warn && m.contains("Address already in use")),
        "UCX's bind failure did not reach the handler: {seen_now:?}"
    );

    let before = ucx::live_registrations();
    let a = MemoryRegion::allocate(&ctx, 1 << 20).unwrap();
    let b = a.clone();
    let c = MemoryRegion::allocate(&ctx, 4096).unwrap();
    assert_eq!(ucx::live_registrations(), before + 2);
    drop(a);
    assert_eq!(ucx::live_registrations(), before + 2, "a clone keeps it");
    drop((b, c));
    assert_eq!(ucx::live_registrations(), before);
    ucx::log::set_handler(None);
}
