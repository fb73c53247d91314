//! cargo-fuzz target for the wire decoder: any datagram with any fd count
//! must decode or fail with a `DecodeError`, never panic, and whatever
//! decodes must encode back to a datagram that decodes to the same message.
//!
//! The protocol module is pure (no I/O, no GStreamer), so it is compiled in
//! directly from the plugin's sources instead of building GStreamer under
//! the sanitizers. Run: `cargo +nightly fuzz run decode` (see docs/reliability.md, "Fuzzing").

#![no_main]

#[allow(dead_code, unused_imports)]
#[path = "../../src/protocol/mod.rs"]
mod protocol;

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // First byte: how many fds "arrived" with the datagram (0..=3).
    let Some((&fds, datagram)) = data.split_first() else {
        return;
    };
    let received_fds = (fds % 4) as usize;
    if let Ok(msg) = protocol::decode(datagram, received_fds) {
        let again = protocol::encode(&msg);
        assert_eq!(
            protocol::decode(&again, msg.fd_count()).as_ref(),
            Ok(&msg),
            "re-encoding a decoded message changed it"
        );
    }
});
