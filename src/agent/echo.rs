//! The `echo` agent: plays the caller's own voice back after a fixed delay, like the echo
//! test extension PBX installers use. A diagnostic for the whole audio path with no cloud.

use super::{Agent, AgentEndpoint, AgentEvent, AgentInput, AgentSession, CallInfo};
use crate::audio::{ReplyId, slin_from_le_bytes};
use std::collections::VecDeque;
use std::time::Duration;
use tokio::time::{Instant, sleep_until};

/// Echoes caller audio back after `delay`.
#[derive(Debug, Clone)]
pub struct EchoAgent {
    delay: Duration,
}

impl EchoAgent {
    /// An echo agent with the given delay (the default config uses 500 ms).
    pub fn new(delay: Duration) -> Self {
        EchoAgent { delay }
    }
}

impl Agent for EchoAgent {
    fn name(&self) -> &'static str {
        "echo"
    }

    fn start(&self, call: CallInfo) -> AgentSession {
        let (session, endpoint) = super::session_channel();
        tokio::spawn(run(self.delay, call, endpoint));
        session
    }
}

/// Audio the delay line holds beyond the delay itself before it drops its oldest frames
/// (the call already meters input to real time plus 1 s; this is the second fence).
const DELAY_LINE_SLACK: Duration = Duration::from_secs(2);

async fn run(delay: Duration, call: CallInfo, mut io: AgentEndpoint) {
    // Frames waiting for their time, oldest first: (due, samples); at most `max_samples`.
    let mut delayed: VecDeque<(Instant, Vec<i16>)> = VecDeque::new();
    let max_samples = ((delay + DELAY_LINE_SLACK).as_millis() as usize)
        .saturating_mul(call.rate_hz.max(8_000) as usize)
        / 1000;
    let mut queued_samples = 0usize;
    let reply = ReplyId(0);
    loop {
        let next_due = delayed.front().map(|(due, _)| *due);
        tokio::select! {
            input = io.input.recv() => match input {
                Some(AgentInput::Audio(bytes)) => {
                    let mut samples = Vec::with_capacity(bytes.len() / 2);
                    slin_from_le_bytes(&bytes, &mut samples);
                    queued_samples += samples.len();
                    delayed.push_back((Instant::now() + delay, samples));
                    while queued_samples > max_samples {
                        // Non-empty: it holds more than max_samples samples.
                        let (_, old) = delayed.pop_front().expect("non-empty delay line");
                        queued_samples -= old.len();
                    }
                }
                Some(_) => {}
                None => return,
            },
            () = async { sleep_until(next_due.unwrap_or_else(Instant::now)).await }, if next_due.is_some() => {
                let now = Instant::now();
                while delayed.front().is_some_and(|(due, _)| *due <= now) {
                    // front() was just checked to be Some.
                    let (_, samples) = delayed.pop_front().expect("front exists");
                    queued_samples -= samples.len();
                    if io.events.send(AgentEvent::Audio { reply, samples }).await.is_err() {
                        return;
                    }
                }
            }
        }
    }
}
