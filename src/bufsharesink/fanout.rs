//! Who gets a frame: the fan-out policy of bufsharesink, apart from sockets.
//!
//! The server (server.rs) asks [`FanOut`] about each consumer in turn and only
//! does the I/O. Pure and unit-tested here:
//!
//! - A consumer that already holds all it was granted (MAX_INFLIGHT), or whose
//!   socket still has control messages queued, skips the frame (latest wins).
//! - Under a bound on the distinct frames all consumers hold together
//!   (`max-held`, or derived from a fixed upstream pool), consumers are served
//!   from the one holding the fewest frames to the one holding the most. One
//!   that holds nothing, or only frames among the [`RECENT_FRAMES`] newest sent
//!   (a sink keeps its last sample until the next frame comes), may take the
//!   frame while the distinct frames held stay within the bound; one that holds
//!   older frames (a greedy one) only while [`KEEPING_UP_RESERVE`] frames of
//!   the bound stay free. So greedy consumers lose frames first, those that
//!   keep up keep getting them, and upstream always keeps the buffers beyond
//!   the bound.

use std::collections::VecDeque;

/// Under a bound, a consumer that holds only frames among this many newest
/// ones sent keeps up: a sink keeps its last sample until the next frame
/// arrives, and a busy process may not have read that one yet.
pub const RECENT_FRAMES: usize = 2;
/// Room kept for consumers that keep up: their recent frames and the new one.
/// A consumer holding older frames gets a new one only while this much of the
/// bound stays free.
pub const KEEPING_UP_RESERVE: usize = RECENT_FRAMES + 1;

/// What the policy needs to know of one consumer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Candidate {
    /// Frames it holds now.
    pub held: usize,
    /// Frames it may hold at once (its grant).
    pub granted: usize,
    /// Control messages wait in its queue; a frame must not overtake them.
    pub queue_blocked: bool,
    /// It holds only frames among the [`RECENT_FRAMES`] newest sent (true
    /// when it holds none). Only asked for under a bound.
    pub keeping_up: bool,
}

/// The policy's answer for one consumer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Send,
    /// It holds all it was granted, or its queue is not empty.
    SkipBusy,
    /// Sending would pin more distinct frames than the bound allows it.
    SkipHeldBound,
}

/// The decisions for one frame, consumer by consumer.
#[derive(Debug, Clone)]
pub struct FanOut {
    bound: Option<usize>,
    needs_release: bool,
    /// Distinct frames held by consumers, this one included once it is held.
    distinct_held: usize,
    frame_held: bool,
}

impl FanOut {
    /// A frame that consumers hold until RELEASE (`needs_release`) or not
    /// (inline bytes), with `distinct_held` frames held now and at most
    /// `bound` allowed (None: no bound).
    pub fn new(bound: Option<usize>, needs_release: bool, distinct_held: usize) -> FanOut {
        FanOut {
            bound: bound.filter(|_| needs_release),
            needs_release,
            distinct_held,
            frame_held: false,
        }
    }

    /// The bound in force for this frame (None for frames not held).
    pub fn bound(&self) -> Option<usize> {
        self.bound
    }

    /// The order to serve consumers in, given what each holds: under a bound
    /// the fewest held first (ties in their order), else as they are. Fills
    /// `order` (reused to spare an allocation per frame).
    pub fn order(&self, held: impl Iterator<Item = usize>, order: &mut Vec<usize>) {
        order.clear();
        if self.bound.is_some() {
            let mut pairs: Vec<(usize, usize)> = held.enumerate().map(|(i, h)| (h, i)).collect();
            pairs.sort();
            order.extend(pairs.into_iter().map(|(_, i)| i));
        } else {
            order.extend(0..held.count());
        }
    }

    /// Whether `c` gets the frame. The caller says [`FanOut::sent`] when it did.
    pub fn verdict(&self, c: &Candidate) -> Verdict {
        if c.queue_blocked || (self.needs_release && c.held >= c.granted) {
            return Verdict::SkipBusy;
        }
        if let Some(bound) = self.bound {
            let held_after = self.distinct_held + usize::from(!self.frame_held);
            let allowed = if c.keeping_up {
                bound
            } else {
                bound.saturating_sub(KEEPING_UP_RESERVE)
            };
            if held_after > allowed {
                return Verdict::SkipHeldBound;
            }
        }
        Verdict::Send
    }

    /// The frame went to a consumer that holds it until RELEASE.
    pub fn sent(&mut self) {
        if self.needs_release && !self.frame_held {
            self.frame_held = true;
            self.distinct_held += 1;
        }
    }

    /// Whether any consumer took the frame to hold.
    pub fn taken(&self) -> bool {
        self.frame_held
    }
}

/// The [`RECENT_FRAMES`] newest frames sent to any consumer, oldest first.
#[derive(Debug, Clone, Default)]
pub struct RecentFrames(VecDeque<u64>);

impl RecentFrames {
    pub fn push(&mut self, frame_id: u64) {
        if self.0.len() == RECENT_FRAMES {
            self.0.pop_front();
        }
        self.0.push_back(frame_id);
    }

    /// Whether every frame of `held` is among the recent ones.
    pub fn all_recent(&self, mut held: impl Iterator<Item = u64>) -> bool {
        held.all(|id| self.0.contains(&id))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn consumer(held: usize, granted: usize) -> Candidate {
        Candidate {
            held,
            granted,
            queue_blocked: false,
            keeping_up: true,
        }
    }

    #[test]
    fn without_a_bound_only_the_grant_and_the_queue_count() {
        let f = FanOut::new(None, true, 1000);
        assert_eq!(f.verdict(&consumer(7, 8)), Verdict::Send);
        assert_eq!(f.verdict(&consumer(8, 8)), Verdict::SkipBusy);
        let blocked = Candidate {
            queue_blocked: true,
            ..consumer(0, 8)
        };
        assert_eq!(f.verdict(&blocked), Verdict::SkipBusy);
        let greedy = Candidate {
            keeping_up: false,
            ..consumer(3, 8)
        };
        assert_eq!(f.verdict(&greedy), Verdict::Send);
    }

    #[test]
    fn frames_not_held_ignore_grants_and_bounds() {
        // Inline frames are not held: a full consumer still gets them.
        let f = FanOut::new(Some(1), false, 5);
        assert_eq!(f.bound(), None);
        assert_eq!(f.verdict(&consumer(8, 8)), Verdict::Send);
        let mut f = f;
        f.sent();
        assert!(!f.taken());
    }

    #[test]
    fn the_first_consumer_pins_a_new_frame_the_others_share_it() {
        // Bound 4, 3 frames held: the frame makes 4, for everyone who takes it.
        let mut f = FanOut::new(Some(4), true, 3);
        assert_eq!(f.verdict(&consumer(1, 8)), Verdict::Send);
        f.sent();
        assert!(f.taken());
        assert_eq!(f.verdict(&consumer(1, 8)), Verdict::Send);
        f.sent();
        // Bound 3 and 3 held: nobody may pin a fourth frame.
        let f = FanOut::new(Some(3), true, 3);
        assert_eq!(f.verdict(&consumer(0, 8)), Verdict::SkipHeldBound);
    }

    #[test]
    fn a_greedy_consumer_leaves_the_reserve_to_those_that_keep_up() {
        let greedy = Candidate {
            keeping_up: false,
            ..consumer(4, 8)
        };
        // Bound 8: a greedy consumer may take the frame while 3 stay free.
        assert_eq!(
            FanOut::new(Some(8), true, 4).verdict(&greedy),
            Verdict::Send
        );
        assert_eq!(
            FanOut::new(Some(8), true, 5).verdict(&greedy),
            Verdict::SkipHeldBound
        );
        // A consumer that keeps up still gets it at 5 and 7 held.
        assert_eq!(
            FanOut::new(Some(8), true, 7).verdict(&consumer(1, 8)),
            Verdict::Send
        );
        // Once someone holds the frame, a greedy one may share it if the
        // count without a new frame is within its allowance.
        let mut f = FanOut::new(Some(8), true, 4);
        f.sent();
        assert_eq!(f.verdict(&greedy), Verdict::Send);
    }

    #[test]
    fn under_a_bound_the_fewest_held_go_first() {
        let mut order = vec![99];
        FanOut::new(Some(8), true, 0).order([3, 0, 2, 0].into_iter(), &mut order);
        assert_eq!(order, vec![1, 3, 2, 0]);
        FanOut::new(None, true, 0).order([3, 0, 2, 0].into_iter(), &mut order);
        assert_eq!(order, vec![0, 1, 2, 3]);
    }

    #[test]
    fn recent_frames_are_the_two_newest() {
        let mut r = RecentFrames::default();
        assert!(r.all_recent(std::iter::empty()));
        for id in 1..=3 {
            r.push(id);
        }
        assert!(r.all_recent([2, 3].into_iter()));
        assert!(!r.all_recent([1, 3].into_iter()));
    }
}
