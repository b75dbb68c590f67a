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

async fn run(delay: Duration, call: CallInfo, mut io: AgentEndpoint) {
    let _ = call;
    // Frames waiting for their time, oldest first: (due, samples).
    let mut delayed: VecDeque<(Instant, Vec<i16>)> = VecDeque::new();
    let reply = ReplyId(0);
    loop {
        let next_due = delayed.front().map(|(due, _)| *due);
        tokio::select! {
            input = io.input.recv() => match input {
                Some(AgentInput::Audio(bytes)) => {
                    let mut samples = Vec::with_capacity(bytes.len() / 2);
                    slin_from_le_bytes(&bytes, &mut samples);
                    delayed.push_back((Instant::now() + delay, samples));
                }
                Some(_) => {}
                None => return,
            },
            () = async { sleep_until(next_due.unwrap_or_else(Instant::now)).await }, if next_due.is_some() => {
                let now = Instant::now();
                while delayed.front().is_some_and(|(due, _)| *due <= now) {
                    // front() was just checked to be Some.
                    let (_, samples) = delayed.pop_front().expect("front exists");
                    if io.events.send(AgentEvent::Audio { reply, samples }).await.is_err() {
                        return;
                    }
                }
            }
        }
    }
}
