//! What bufsharesrc does with each frame it receives: push it as it is,
//! push a copy of it, or drop it. Pure policy, no I/O and no GStreamer, so
//! it is unit-tested on its own; `imp.rs` gathers the facts and acts.
//!
//! - **Skipped frames.** The producer numbers every frame it renders. A gap
//!   in the ids one consumer sees means the producer skipped frames for it
//!   (it was slow, or a bound said no): counted, and the next buffer pushed
//!   carries DISCONT. Ids restart with each new producer (reconnect), whose
//!   first buffer is DISCONT too.
//! - **Time never goes backwards.** A frame whose running time (DTS, or PTS
//!   when there is no DTS) is earlier than the last one pushed is dropped as
//!   late and released at once. That happens to frames that waited in the
//!   socket while the pipeline was PAUSED: back in PLAYING the base time has
//!   moved on, so they map to running times before the ones already pushed.
//!   A live source drops what it produced while paused; so do we. For the
//!   same reason a frame from before this pipeline's base time (rendered
//!   before the consumer reached PLAYING, or older than the producer's
//!   latency when the consumer joins) is dropped, not stamped 0 with the
//!   others: a run of buffers at one timestamp breaks encoders and muxers
//!   (x264enc ! mp4mux: "Buffer has no PTS"), and a sink that syncs would
//!   drop them as late anyway.
//! - **Consumers that hold many frames.** The producer lets each consumer
//!   hold `max_inflight` frames (MAX_INFLIGHT). When downstream keeps more
//!   than that (an encoder's lookahead, a deep queue), the producer would
//!   skip every frame and the consumer would wait forever. So once the frames
//!   held reach [`zero_copy_budget`], each new frame is copied into this
//!   process's memory and the producer's frame goes back at once: the
//!   consumer gets every frame, the producer's pool and the other consumers
//!   are unaffected, and the copies stop as soon as downstream lets go.

/// What is known about one received frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameFacts {
    pub frame_id: u64,
    /// Running time used for ordering (DTS, else PTS) in ns; negative for an
    /// instant before this pipeline's base time; None when not stamped, or
    /// when the pipeline's clock is not CLOCK_MONOTONIC (an audio sink's
    /// clock: mapping onto it jitters, so frames are not judged by time).
    pub time: Option<i128>,
    /// The stale filter's verdict: it waited in the socket during a stall.
    pub stale: bool,
    /// The frame names producer memory (the producer holds it until RELEASE).
    pub needs_release: bool,
    /// Frames naming producer memory that we hold, this one included.
    pub held: usize,
    /// What the producer lets us hold (MAX_INFLIGHT), once it said.
    pub max_inflight: Option<u32>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Release it unseen.
    Drop(DropReason),
    /// Push it; `copy`: into our own memory first (releasing the producer's
    /// at once); `discont`: mark the buffer DISCONT.
    Push { copy: bool, discont: bool },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DropReason {
    /// It waited in the socket while this consumer did not read.
    Stale,
    /// Its running time is before this pipeline's base time, or before the
    /// last frame pushed.
    Late,
}

/// Counters for the element's `stats`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counters {
    pub received: u64,
    pub pushed: u64,
    /// Frames the producer skipped for us, from the gaps in frame ids.
    pub skipped_by_producer: u64,
    pub dropped_stale: u64,
    pub dropped_late: u64,
    pub copied: u64,
}

/// The most producer frames held before new ones are copied: the grant less
/// two, so that a frame or two on their way in the socket and a release on
/// its way back never make the producer skip us.
pub fn zero_copy_budget(max_inflight: u32) -> usize {
    (max_inflight as usize).saturating_sub(2).max(1)
}

#[derive(Debug, Default)]
pub struct Delivery {
    last_frame_id: Option<u64>,
    last_time: Option<i128>,
    discont: bool,
    pub counters: Counters,
}

impl Delivery {
    /// A new producer: its frame ids start again, its first buffer is DISCONT.
    /// Times go on from the last frame pushed.
    pub fn new_connection(&mut self) {
        self.last_frame_id = None;
        self.discont = true;
    }

    /// A new run of the element (start): nothing pushed yet.
    pub fn reset(&mut self) {
        *self = Delivery::default();
    }

    pub fn decide(&mut self, f: &FrameFacts) -> Decision {
        self.counters.received += 1;
        if let Some(last) = self.last_frame_id {
            if f.frame_id > last + 1 {
                self.counters.skipped_by_producer += f.frame_id - last - 1;
                self.discont = true;
            }
        }
        self.last_frame_id = Some(f.frame_id);
        if f.stale {
            self.counters.dropped_stale += 1;
            self.discont = true;
            return Decision::Drop(DropReason::Stale);
        }
        if let Some(t) = f.time {
            if t < 0 || self.last_time.is_some_and(|last| t < last) {
                self.counters.dropped_late += 1;
                self.discont = true;
                return Decision::Drop(DropReason::Late);
            }
        }
        if f.time.is_some() {
            self.last_time = f.time;
        }
        let copy = f.needs_release
            && f.max_inflight
                .is_some_and(|max| f.held > zero_copy_budget(max));
        if copy {
            self.counters.copied += 1;
        }
        self.counters.pushed += 1;
        Decision::Push {
            copy,
            discont: std::mem::take(&mut self.discont),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn facts(frame_id: u64, time: i128) -> FrameFacts {
        FrameFacts {
            frame_id,
            time: Some(time),
            stale: false,
            needs_release: true,
            held: 1,
            max_inflight: Some(8),
        }
    }

    const PUSH: Decision = Decision::Push {
        copy: false,
        discont: false,
    };
    const PUSH_DISCONT: Decision = Decision::Push {
        copy: false,
        discont: true,
    };

    #[test]
    fn a_gap_in_frame_ids_is_counted_and_marks_the_next_buffer() {
        let mut d = Delivery::default();
        assert_eq!(d.decide(&facts(1, 10)), PUSH);
        assert_eq!(d.decide(&facts(2, 20)), PUSH);
        assert_eq!(d.decide(&facts(5, 50)), PUSH_DISCONT);
        assert_eq!(d.decide(&facts(6, 60)), PUSH);
        assert_eq!(d.counters.skipped_by_producer, 2);
        assert_eq!(d.counters.pushed, 4);
    }

    #[test]
    fn a_new_producer_restarts_ids_and_is_discont_but_time_goes_on() {
        let mut d = Delivery::default();
        d.decide(&facts(100, 1_000));
        d.new_connection();
        assert_eq!(d.decide(&facts(1, 2_000)), PUSH_DISCONT);
        assert_eq!(d.counters.skipped_by_producer, 0);
        // Earlier than what the old producer's last frame was pushed at: late.
        d.new_connection();
        assert_eq!(d.decide(&facts(1, 1_500)), Decision::Drop(DropReason::Late));
        assert_eq!(d.decide(&facts(2, 2_500)), PUSH_DISCONT);
    }

    #[test]
    fn frames_from_before_a_pause_are_dropped_and_time_never_goes_back() {
        let mut d = Delivery::default();
        let frame = 33_000_000;
        for i in 1..=10u64 {
            assert_eq!(d.decide(&facts(i, i as i128 * frame)), PUSH);
        }
        // PLAYING again after 5 s in PAUSED: the frames that waited in the
        // socket map to running times 5 s earlier (before base time, even).
        for i in 11..=14u64 {
            let t = i as i128 * frame - 5_000_000_000;
            assert_eq!(d.decide(&facts(i, t)), Decision::Drop(DropReason::Late));
        }
        assert_eq!(d.decide(&facts(15, 11 * frame)), PUSH_DISCONT);
        assert_eq!(d.counters.dropped_late, 4);
        // Frames without a time are never judged by it.
        let mut untimed = facts(16, 0);
        untimed.time = None;
        assert_eq!(d.decide(&untimed), PUSH);
    }

    #[test]
    fn frames_from_before_the_base_time_are_late() {
        let mut d = Delivery::default();
        assert_eq!(
            d.decide(&facts(1, -2_000_000)),
            Decision::Drop(DropReason::Late)
        );
        assert_eq!(d.decide(&facts(2, -1)), Decision::Drop(DropReason::Late));
        assert_eq!(d.decide(&facts(3, 0)), PUSH_DISCONT);
        assert_eq!(d.counters.dropped_late, 2);
    }

    #[test]
    fn equal_times_pass() {
        let mut d = Delivery::default();
        assert_eq!(d.decide(&facts(1, 0)), PUSH);
        assert_eq!(d.decide(&facts(2, 0)), PUSH);
    }

    #[test]
    fn stale_frames_are_dropped_and_the_next_one_is_discont() {
        let mut d = Delivery::default();
        d.decide(&facts(1, 10));
        let mut stale = facts(2, 20);
        stale.stale = true;
        assert_eq!(d.decide(&stale), Decision::Drop(DropReason::Stale));
        assert_eq!(d.decide(&facts(3, 30)), PUSH_DISCONT);
        assert_eq!(d.counters.dropped_stale, 1);
        assert_eq!(d.counters.skipped_by_producer, 0);
    }

    #[test]
    fn frames_past_the_budget_are_copied_until_downstream_lets_go() {
        let mut d = Delivery::default();
        assert_eq!(zero_copy_budget(8), 6);
        let decide = |d: &mut Delivery, id: u64, held: usize| {
            let mut f = facts(id, id as i128);
            f.held = held;
            d.decide(&f)
        };
        for held in 1..=6 {
            assert_eq!(decide(&mut d, held as u64, held), PUSH);
        }
        let copy = Decision::Push {
            copy: true,
            discont: false,
        };
        assert_eq!(decide(&mut d, 7, 7), copy);
        assert_eq!(decide(&mut d, 8, 7), copy);
        // Downstream released some: zero-copy again.
        assert_eq!(decide(&mut d, 9, 4), PUSH);
        assert_eq!(d.counters.copied, 2);
        // Inline frames hold nothing of the producer's: never copied.
        let mut inline = facts(10, 10);
        inline.needs_release = false;
        inline.held = 50;
        assert_eq!(d.decide(&inline), PUSH);
        // Before the producer said its grant: no copies.
        let mut unknown = facts(11, 11);
        unknown.max_inflight = None;
        unknown.held = 50;
        assert_eq!(d.decide(&unknown), PUSH);
    }

    #[test]
    fn the_budget_leaves_room_but_never_drops_below_one() {
        assert_eq!(zero_copy_budget(1), 1);
        assert_eq!(zero_copy_budget(2), 1);
        assert_eq!(zero_copy_budget(3), 1);
        assert_eq!(zero_copy_budget(64), 62);
    }
}
