//! Keypad digits (DTMF) as a caller turn for agents that read text.
//!
//! Digits typed less than [`DIGIT_GAP`] apart form one turn ("4711"), sent when the caller
//! stops typing or at once on `#`, IVR style. The text is what the model reads as the
//! caller's words: "(The caller typed 4711# on the phone keypad.)".

use std::time::Duration;
use tokio::time::Instant;

/// Digits typed less than this apart form one turn.
pub(crate) const DIGIT_GAP: Duration = Duration::from_millis(1_000);

/// Collects one call's digits. Sans-IO: [`Keypad::push_at`] takes `now`.
#[derive(Debug, Default)]
pub(crate) struct Keypad {
    digits: String,
    deadline: Option<Instant>,
}

impl Keypad {
    /// Adds `digit` (0-9, *, #, A-D) typed at `now`. Returns the turn's text when `digit` is
    /// `#`; otherwise the turn ends [`DIGIT_GAP`] after `now` unless another digit comes.
    pub(crate) fn push_at(&mut self, digit: char, now: Instant) -> Option<String> {
        self.digits.push(digit);
        if digit == '#' {
            self.take()
        } else {
            self.deadline = Some(now + DIGIT_GAP);
            None
        }
    }

    /// No digits are waiting (the next one is the first of a turn).
    pub(crate) fn is_empty(&self) -> bool {
        self.digits.is_empty()
    }

    /// When the waiting digits become a turn, if any are waiting.
    pub(crate) fn deadline(&self) -> Option<Instant> {
        self.deadline
    }

    /// The waiting digits as the turn's text (`None` if there are none), and clears them.
    pub(crate) fn take(&mut self) -> Option<String> {
        self.deadline = None;
        let digits = std::mem::take(&mut self.digits);
        match digits.chars().count() {
            0 => None,
            1 => Some(format!("(The caller pressed the phone key {digits}.)")),
            _ => Some(format!("(The caller typed {digits} on the phone keypad.)")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digits_form_one_turn_ended_by_hash_or_the_gap() {
        let now = Instant::now();
        let mut k = Keypad::default();
        assert!(k.is_empty() && k.deadline().is_none());
        assert_eq!(k.push_at('4', now), None);
        assert_eq!(k.push_at('2', now), None);
        assert_eq!(k.deadline(), Some(now + DIGIT_GAP));
        assert_eq!(
            k.push_at('#', now).as_deref(),
            Some("(The caller typed 42# on the phone keypad.)")
        );
        assert!(k.is_empty() && k.deadline().is_none());
        assert_eq!(k.push_at('0', now), None);
        assert_eq!(
            k.take().as_deref(),
            Some("(The caller pressed the phone key 0.)")
        );
        assert_eq!(k.take(), None);
    }
}
