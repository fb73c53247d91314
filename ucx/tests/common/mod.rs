//! Helpers shared by the ucx integration tests.
#![allow(dead_code)]

use std::io::BufRead;
use std::time::Duration;

use ucx::{Context, Worker};

/// The same pattern as `ucx-peer` (src/bin/ucx-peer.rs): byte `i` of the message with `seed`.
pub fn pattern(seed: u64, i: usize) -> u8 {
    let x =
        (i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ seed.wrapping_mul(0xD6E8_FEB8_6659_FD93);
    (x >> 56) as u8 ^ (i as u8)
}

pub fn pattern_vec(seed: u64, len: usize) -> Vec<u8> {
    (0..len).map(|i| pattern(seed, i)).collect()
}

/// Header of a test message: length and seed, u64 little endian each.
pub fn header(len: usize, seed: u64) -> Vec<u8> {
    let mut h = (len as u64).to_le_bytes().to_vec();
    h.extend_from_slice(&seed.to_le_bytes());
    h
}

pub fn parse_header(h: &[u8]) -> (usize, u64) {
    assert_eq!(h.len(), 16, "header length");
    (
        u64::from_le_bytes(h[..8].try_into().unwrap()) as usize,
        u64::from_le_bytes(h[8..].try_into().unwrap()),
    )
}

/// First differing byte, for a readable assertion on megabytes.
pub fn first_mismatch(data: &[u8], seed: u64) -> Option<usize> {
    (0..data.len()).find(|&i| data[i] != pattern(seed, i))
}

/// A context on TCP only: on one host UCX would otherwise pick shared memory.
pub fn tcp_context(name: &str) -> (Context, Worker) {
    let ctx = Context::builder()
        .name(name)
        .config("TLS", "tcp")
        .build()
        .expect("UCX context (tcp)");
    let worker = Worker::new(&ctx).expect("worker");
    (ctx, worker)
}

/// CPU time consumed by the calling thread.
pub fn thread_cpu() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: valid out-pointer.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

pub fn peer_exe() -> &'static str {
    env!("CARGO_BIN_EXE_ucx-peer")
}

/// The next line of ucx-peer's stdout that is not a UCX log line (UCX logs to stdout);
/// empty at end of file.
pub fn peer_line(out: &mut impl BufRead) -> String {
    loop {
        let mut line = String::new();
        if out.read_line(&mut line).unwrap() == 0 || !line.contains(" UCX ") {
            return line;
        }
        eprint!("(ucx-peer log) {line}");
    }
}
