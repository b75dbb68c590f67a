//! Sans-IO bookkeeping of what Asterisk holds in its chan_websocket playout queue: flow
//! control (`MEDIA_XOFF` / `MEDIA_XON`), marks (`MARK_MEDIA` / `MEDIA_MARK_PROCESSED`) that
//! say how much of the sent media the caller has heard, and `FLUSH_MEDIA`.
//!
//! Source: Asterisk 22.10.1 `channels/chan_websocket.c`: every binary message is cut into
//! `optimal_frame_size` frames and queued; a timer plays one frame per `ptime`; a mark is
//! queued in order with the media and answered when playout reaches it (`dequeue_frame`);
//! `FLUSH_MEDIA` empties the queue, pending marks included; `MEDIA_XOFF` is sent at 900
//! queued frames, `MEDIA_XON` under 800, and whole messages are dropped at 1000.
//!
//! Counts are in frames as sent (one [`Playout::frame_sent`] per frame). `heard` is a lower
//! bound of what the caller has heard, exact at each processed mark: marks go out every
//! `mark_every` frames, and a flush assumes every unconfirmed frame was dropped.

use crate::chanws::protocol::{Command, Event};
use std::collections::VecDeque;

/// The prefix of voicegate's mark ids (`vg-<flushes>-<frames sent>`: an answer still on
/// the wire from before a flush is told apart and ignored).
const MARK_PREFIX: &str = "vg-";

/// Most marks kept outstanding; beyond that (Asterisk not answering) no new mark is sent.
const MAX_PENDING_MARKS: usize = 256;

/// What the queue did over a call.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct PlayoutStats {
    /// Frames sent to Asterisk.
    pub(crate) frames_sent: u64,
    /// Frames Asterisk confirmed played (through marks), a lower bound.
    pub(crate) frames_heard: u64,
    /// Frames not sent because Asterisk said `MEDIA_XOFF`.
    pub(crate) frames_held_back: u64,
    /// Marks answered.
    pub(crate) marks_processed: u64,
    /// Most frames sent but not yet confirmed played, seen when a mark was answered: the
    /// depth of Asterisk's queue (plus the mark spacing), in frames.
    pub(crate) max_unconfirmed: u64,
    /// `FLUSH_MEDIA` sent.
    pub(crate) flushes: u64,
    /// Frames unconfirmed at the flushes (at most what the flushes dropped).
    pub(crate) frames_flushed: u64,
    /// `MEDIA_XOFF` received.
    pub(crate) xoffs: u64,
}

/// The playout bookkeeping of one call; see the module docs.
#[derive(Debug, Clone)]
pub struct Playout {
    mark_every: u64,
    xoff: bool,
    /// Frame counts at the marks sent and not yet answered, oldest first.
    pending: VecDeque<u64>,
    stats: PlayoutStats,
}

impl Playout {
    /// Bookkeeping that asks for a mark every `mark_every` frames (0 = no marks).
    pub fn new(mark_every: u32) -> Self {
        Playout {
            mark_every: u64::from(mark_every),
            xoff: false,
            pending: VecDeque::new(),
            stats: PlayoutStats::default(),
        }
    }

    /// Whether a frame may be sent now: not while Asterisk's queue is over its XOFF level.
    /// A refused frame is counted as held back (the caller drops it: audio that would play
    /// 18 s late is worse than a gap).
    pub(crate) fn admit_frame(&mut self) -> bool {
        if self.xoff {
            self.stats.frames_held_back += 1;
        }
        !self.xoff
    }

    /// One frame was sent; returns the `MARK_MEDIA` to send after it, if one is due.
    pub fn frame_sent(&mut self) -> Option<Command> {
        self.stats.frames_sent += 1;
        let n = self.stats.frames_sent;
        if self.mark_every == 0
            || n % self.mark_every != 0
            || self.pending.len() >= MAX_PENDING_MARKS
        {
            return None;
        }
        self.pending.push_back(n);
        Some(Command::MarkMedia {
            correlation_id: Some(format!("{MARK_PREFIX}{}-{n}", self.stats.flushes)),
        })
    }

    /// Takes a playout event (`MEDIA_XOFF`, `MEDIA_XON`, `MEDIA_MARK_PROCESSED`); returns
    /// whether it was one. A mark that is not voicegate's, or not the oldest pending, is
    /// ignored.
    pub fn on_event(&mut self, event: &Event) -> bool {
        match event {
            Event::MediaXoff => {
                self.xoff = true;
                self.stats.xoffs += 1;
            }
            Event::MediaXon => self.xoff = false,
            Event::MediaMarkProcessed { correlation_id } => {
                let epoch = format!("{MARK_PREFIX}{}-", self.stats.flushes);
                let n = correlation_id
                    .strip_prefix(&epoch)
                    .and_then(|n| n.parse::<u64>().ok());
                if n.is_none() {
                    return true;
                }
                // Asterisk answers marks in queue order; skip any it dropped before.
                while let Some(&front) = self.pending.front() {
                    if Some(front) > n {
                        break;
                    }
                    self.pending.pop_front();
                    if Some(front) == n {
                        self.stats.marks_processed += 1;
                        self.stats.frames_heard = self.stats.frames_heard.max(front);
                        let unconfirmed = self.stats.frames_sent - self.stats.frames_heard;
                        self.stats.max_unconfirmed = self.stats.max_unconfirmed.max(unconfirmed);
                    }
                }
            }
            _ => return false,
        }
        true
    }

    /// Barge-in: the `FLUSH_MEDIA` to send. Pending marks are gone with the queue; every
    /// unconfirmed frame counts as dropped (so `heard` stays a lower bound).
    pub(crate) fn flush(&mut self) -> Command {
        let unconfirmed = self.stats.frames_sent - self.stats.frames_heard;
        self.stats.flushes += 1;
        self.stats.frames_flushed += unconfirmed;
        self.stats.frames_sent = self.stats.frames_heard;
        self.pending.clear();
        Command::FlushMedia
    }

    /// Whether Asterisk said `MEDIA_XOFF` and not yet `MEDIA_XON`.
    #[cfg(test)]
    pub(crate) fn paused(&self) -> bool {
        self.xoff
    }

    /// The counters so far.
    pub(crate) fn stats(&self) -> PlayoutStats {
        self.stats
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn processed(id: &str) -> Event {
        Event::MediaMarkProcessed {
            correlation_id: id.into(),
        }
    }

    #[test]
    fn marks_go_out_every_n_frames_and_their_answers_count_heard_frames() {
        let mut p = Playout::new(5);
        let marks: Vec<_> = (0..12).filter_map(|_| p.frame_sent()).collect();
        assert_eq!(
            marks,
            vec![
                Command::MarkMedia {
                    correlation_id: Some("vg-0-5".into())
                },
                Command::MarkMedia {
                    correlation_id: Some("vg-0-10".into())
                },
            ]
        );
        assert_eq!(p.stats().frames_heard, 0);
        assert!(p.on_event(&processed("vg-0-5")));
        assert_eq!(p.stats().frames_heard, 5);
        assert_eq!(p.stats().max_unconfirmed, 7);
        // Somebody else's mark, or a stale one, changes nothing.
        assert!(p.on_event(&processed("other")));
        assert!(p.on_event(&processed("vg-0-5")));
        assert_eq!(p.stats().frames_heard, 5);
        assert!(p.on_event(&processed("vg-0-10")));
        assert_eq!(p.stats().frames_heard, 10);
        assert_eq!(p.stats().marks_processed, 2);
    }

    #[test]
    fn xoff_holds_frames_back_until_xon() {
        let mut p = Playout::new(0);
        assert!(p.admit_frame());
        assert!(p.on_event(&Event::MediaXoff));
        assert!(p.paused());
        assert!(!p.admit_frame());
        assert!(!p.admit_frame());
        assert!(p.on_event(&Event::MediaXon));
        assert!(p.admit_frame());
        assert_eq!(p.stats().frames_held_back, 2);
        assert_eq!(p.stats().xoffs, 1);
        assert!(!p.on_event(&Event::DtmfEnd { digit: '1' }));
    }

    #[test]
    fn a_flush_drops_pending_marks_and_keeps_heard_a_lower_bound() {
        let mut p = Playout::new(2);
        for _ in 0..6 {
            p.frame_sent();
        }
        p.on_event(&processed("vg-0-2"));
        assert_eq!(p.flush(), Command::FlushMedia);
        let s = p.stats();
        assert_eq!((s.frames_heard, s.frames_flushed, s.flushes), (2, 4, 1));
        // Asterisk dropped vg-4 and vg-6 with the queue; an answer to them never comes, and
        // the next mark counts from what was heard.
        assert_eq!(
            p.frame_sent(),
            None,
            "frame 3 after the flush: no mark due yet"
        );
        assert_eq!(
            p.frame_sent(),
            Some(Command::MarkMedia {
                correlation_id: Some("vg-1-4".into())
            })
        );
        // The answer to the flushed vg-0-4, sent before Asterisk flushed, is ignored.
        p.on_event(&processed("vg-0-4"));
        assert_eq!(p.stats().frames_heard, 2);
        p.on_event(&processed("vg-1-4"));
        assert_eq!(p.stats().frames_heard, 4);
    }

    #[test]
    fn an_unanswering_asterisk_does_not_grow_the_pending_marks() {
        let mut p = Playout::new(1);
        let n = (0..10_000).filter_map(|_| p.frame_sent()).count();
        assert_eq!(n, MAX_PENDING_MARKS);
    }
}
