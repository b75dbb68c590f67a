//! One agent reply as the cascade's protocol tracks it, and the text arithmetic around it:
//! where a sentence ends (what goes to the TTS as one piece) and what the caller heard of an
//! interrupted reply. Pure functions of text, samples and milliseconds; no I/O, no clock.

use super::protocol::LlmId;
use crate::audio::ReplyId;
use tokio::time::Instant;

/// A sentence longer than this is cut at a comma or space rather than waiting for its end.
pub(super) const MAX_SENTENCE_CHARS: usize = 200;

/// When the moments of one turn happened.
#[derive(Debug, Clone, Copy)]
pub(super) struct Marks {
    /// The local VAD's last voiced frame of the caller's turn.
    pub(super) speech_end: Instant,
    /// The STT's end of turn.
    pub(super) stt_final: Instant,
    /// The reply's first LLM token (text or tool call).
    pub(super) llm_first: Option<Instant>,
}

/// One agent reply, from its LLM request to the end of its playout.
#[derive(Debug)]
pub(super) struct Reply {
    pub(super) id: ReplyId,
    /// The reply's LLM request while it streams.
    pub(super) llm: Option<LlmId>,
    /// The reply's TTS stream (keyed by `id`) is open.
    pub(super) tts: bool,
    /// Everything the LLM said.
    pub(super) text: String,
    /// LLM text not yet sent to the TTS.
    pub(super) pending: String,
    /// Text sent to the TTS.
    pub(super) sent: String,
    /// TTS character timings, ms from the start of the reply's audio.
    pub(super) chars: Vec<(u64, char)>,
    /// Samples of the reply's audio (call rate) received from the TTS.
    pub(super) audio_samples: u64,
    /// Agent-audio frames played (from the playout reference) since the first audio, ms.
    pub(super) played_ms: u64,
    pub(super) marks: Option<Marks>,
    pub(super) tts_first: Option<Instant>,
    /// Index of this reply's assistant message in the history.
    pub(super) history_index: Option<usize>,
    /// TTS done and `ReplyDone` sent; waiting for `PlayedOut`.
    pub(super) streamed: bool,
    /// Barged in; waiting for `Interrupted`.
    pub(super) interrupted: bool,
}

impl Reply {
    /// A reply that has said nothing yet, its TTS stream open, with `llm` streaming.
    pub(super) fn new(id: ReplyId, llm: Option<LlmId>) -> Self {
        Reply {
            id,
            llm,
            tts: true,
            text: String::new(),
            pending: String::new(),
            sent: String::new(),
            chars: Vec::new(),
            audio_samples: 0,
            played_ms: 0,
            marks: None,
            tts_first: None,
            history_index: None,
            streamed: false,
            interrupted: false,
        }
    }

    /// What the caller heard of this reply after `heard_ms` of its audio.
    pub(super) fn heard_text(&self, heard_ms: u64, rate_hz: u32) -> String {
        let total_ms = self.audio_samples * 1000 / rate_hz.max(1) as u64;
        if heard_ms >= total_ms && self.streamed {
            return self.text.trim().to_owned();
        }
        let heard: String = if !self.chars.is_empty() {
            // Count the characters whose audio started before the cut and take that much of
            // the text as sent (the LLM's own wording; the TTS got exactly this text).
            let n = self.chars.iter().filter(|(t, _)| *t < heard_ms).count();
            self.sent.chars().take(n).collect()
        } else {
            let n = (self.sent.chars().count() as u64 * heard_ms.min(total_ms))
                .checked_div(total_ms)
                .unwrap_or(0);
            self.sent.chars().take(n as usize).collect()
        };
        cut_to_words(&heard, &self.sent)
    }
}

/// `heard` cut back to its last whole word (unless it is all of `full`).
pub(super) fn cut_to_words(heard: &str, full: &str) -> String {
    if heard.trim() == full.trim() {
        return heard.trim().to_owned();
    }
    let ends_at_space = heard.ends_with(char::is_whitespace);
    let t = heard.trim_end();
    if ends_at_space || t.ends_with(['.', ',', '!', '?', ';', ':']) {
        return t.to_owned();
    }
    match t.rfind(char::is_whitespace) {
        Some(i) => t[..i].trim_end().to_owned(),
        None => String::new(),
    }
}

/// The byte index after the first complete sentence of `text`, if any.
pub(super) fn sentence_end(text: &str) -> Option<usize> {
    let mut chars = text.char_indices().peekable();
    while let Some((i, c)) = chars.next() {
        let terminal = matches!(c, '.' | '!' | '?' | '…' | ';' | '\n');
        if terminal {
            match chars.peek() {
                Some((_, next)) if next.is_whitespace() => return Some(i + c.len_utf8()),
                _ => {}
            }
        }
    }
    if text.len() > MAX_SENTENCE_CHARS {
        let head = &text[..text.floor_char_boundary_compat(MAX_SENTENCE_CHARS)];
        return head
            .rfind(',')
            .map(|i| i + 1)
            .or_else(|| head.rfind(' '))
            .filter(|&i| i > 0);
    }
    None
}

trait FloorCharBoundary {
    fn floor_char_boundary_compat(&self, i: usize) -> usize;
}

impl FloorCharBoundary for str {
    fn floor_char_boundary_compat(&self, mut i: usize) -> usize {
        i = i.min(self.len());
        while !self.is_char_boundary(i) {
            i -= 1;
        }
        i
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sentences_split_at_terminators_followed_by_space() {
        assert_eq!(sentence_end("Hello there. How"), Some(12));
        assert_eq!(sentence_end("It costs 3.50 dollars"), None);
        assert_eq!(sentence_end("Привет! Как"), Some("Привет!".len()));
        let long = "word ".repeat(60);
        let end = sentence_end(&long).unwrap();
        assert!(end <= MAX_SENTENCE_CHARS && end > 100);
    }

    #[test]
    fn heard_text_by_alignment_and_by_proportion() {
        let mut r = Reply {
            id: ReplyId(1),
            llm: None,
            tts: false,
            text: "Hello there. How are you today?".into(),
            pending: String::new(),
            sent: "Hello there. How are you today?".into(),
            chars: Vec::new(),
            audio_samples: 8_000 * 3,
            played_ms: 0,
            marks: None,
            tts_first: None,
            history_index: None,
            streamed: true,
            interrupted: true,
        };
        // 1 s of 3 s ≈ a third of 31 chars = 10 → "Hello ther" → "Hello".
        assert_eq!(r.heard_text(1_000, 8_000), "Hello");
        assert_eq!(
            r.heard_text(3_000, 8_000),
            "Hello there. How are you today?"
        );
        r.chars = "Hello there. How"
            .chars()
            .enumerate()
            .map(|(i, c)| (i as u64 * 100, c))
            .collect();
        // 1.35 s → 14 chars "Hello there. H" → "Hello there."
        assert_eq!(r.heard_text(1_350, 8_000), "Hello there.");
        assert_eq!(cut_to_words("Hello wor", "Hello world"), "Hello");
    }
}
