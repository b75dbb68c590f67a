//! The cascade's driver: the I/O around one call's [`CascadeProtocol`].
//!
//! It owns the call's channels, the STT session, the LLM requests (keyed by [`LlmId`]), the
//! replies' TTS streams (keyed by [`ReplyId`]) and the clock. It waits for whichever comes
//! first — an input from the call, an STT event, an event of any LLM or TTS stream, the
//! protocol's timer — hands it to the protocol with `now`, and carries out the
//! [`CascadeOut`]s it answers with, in order. It decides nothing: the end of a stream that
//! said neither `Done` nor `Failed` goes to the protocol as a `Failed`. Every task it starts
//! (through the LLM, STT and TTS clients) is spawned inside the call's span.

use super::llm::{LlmClient, LlmEvent, LlmStream};
use super::protocol::{CascadeOut, CascadeProtocol, LlmId};
use super::stt::{SttEvent, SttHandle};
use super::tts::{TtsCall, TtsCommand, TtsEvent, TtsStream};
use crate::agent::{AgentEndpoint, AgentError, AgentEvent};
use crate::audio::ReplyId;
use std::task::{Context, Poll};
use tokio::time::Instant;
use tracing::{debug, warn};

/// The I/O of one cascade call.
#[derive(Debug)]
pub(super) struct Driver {
    /// The call's end of the session.
    pub(super) io: AgentEndpoint,
    /// The STT session.
    pub(super) stt: SttHandle,
    /// The STT vendor's name, for its failure.
    pub(super) stt_name: &'static str,
    /// The LLM client, with the call's tools.
    pub(super) llm: LlmClient,
    /// The call's TTS.
    pub(super) tts: TtsCall,
}

/// Why the loop ended early.
enum Stop {
    /// The call side is gone.
    Gone,
    /// A provider failed.
    Failed(AgentError),
}

/// The next event of one of the streams.
enum StreamEv {
    Llm(LlmId, Option<LlmEvent>),
    Tts(ReplyId, Option<TtsEvent>),
}

/// The running streams of a call.
#[derive(Debug, Default)]
struct Streams {
    llm: Vec<(LlmId, LlmStream)>,
    tts: Vec<(ReplyId, TtsStream)>,
    /// Which kind is polled first, alternating so that neither starves the other.
    tts_first: bool,
    /// Caller frames the STT's full queue did not take.
    stt_dropped: u64,
}

/// Runs `protocol` for one call until the call or a provider ends it; a failure goes to the
/// call as [`AgentEvent::Failed`].
pub(super) async fn run(mut protocol: CascadeProtocol, mut d: Driver) {
    let mut out = Vec::new();
    protocol.start(Instant::now(), &mut out);
    let mut streams = Streams::default();
    match run_loop(&mut protocol, &mut d, &mut streams, out).await {
        Ok(()) | Err(Stop::Gone) => {}
        Err(Stop::Failed(e)) => {
            warn!(error = %e, "cascade failed");
            let _ = d.io.events.send(AgentEvent::Failed(e)).await;
        }
    }
}

async fn run_loop(
    p: &mut CascadeProtocol,
    d: &mut Driver,
    s: &mut Streams,
    mut out: Vec<CascadeOut>,
) -> Result<(), Stop> {
    loop {
        apply(&mut out, d, s).await?;
        let due = p.poll_timeout();
        tokio::select! {
            input = d.io.input.recv() => match input {
                None => {
                    debug!(stt_frames_dropped = s.stt_dropped, "call over");
                    return Ok(());
                }
                Some(i) => p.handle_input(Instant::now(), i, &mut out),
            },
            ev = d.stt.events.recv() => {
                let ev = ev.unwrap_or_else(|| SttEvent::Failed(AgentError::Provider {
                    provider: d.stt_name,
                    detail: "stt task ended".into(),
                }));
                p.handle_stt(Instant::now(), ev, &mut out);
            }
            () = tokio::time::sleep_until(due.unwrap_or_else(Instant::now)), if due.is_some() => {
                p.handle_timeout(Instant::now(), &mut out);
            }
            ev = s.next() => match ev {
                StreamEv::Llm(id, ev) => {
                    let ev = ev.unwrap_or_else(|| {
                        s.llm.retain(|(i, _)| *i != id);
                        LlmEvent::Failed(AgentError::Provider {
                            provider: "chat_completions",
                            detail: "llm task ended".into(),
                        })
                    });
                    p.handle_llm(Instant::now(), id, ev, &mut out);
                }
                StreamEv::Tts(id, ev) => {
                    let ev = ev.unwrap_or_else(|| {
                        s.tts.retain(|(i, _)| *i != id);
                        TtsEvent::Failed(AgentError::Provider {
                            provider: "elevenlabs_tts",
                            detail: "tts task ended".into(),
                        })
                    });
                    p.handle_tts(Instant::now(), id, ev, &mut out);
                }
            },
        }
    }
}

/// Carries out `out` in order.
async fn apply(out: &mut Vec<CascadeOut>, d: &mut Driver, s: &mut Streams) -> Result<(), Stop> {
    for o in out.drain(..) {
        match o {
            CascadeOut::SttAudio(frame) => {
                if d.stt.audio.try_send(frame).is_err() {
                    s.stt_dropped += 1;
                }
            }
            CascadeOut::SttFinalize {
                trailing_silence_ms,
            } => d.stt.finalize(trailing_silence_ms),
            CascadeOut::TtsConnect => d.tts.connect(),
            CascadeOut::LlmStart { llm, messages } => s.llm.push((llm, d.llm.stream(&messages))),
            CascadeOut::LlmDrop { llm } => s.llm.retain(|(i, _)| *i != llm),
            CascadeOut::TtsOpen { reply } => s.tts.push((reply, d.tts.start())),
            CascadeOut::TtsText { reply, text } => s.tts_send(reply, TtsCommand::Text(text)),
            CascadeOut::TtsFinish { reply } => s.tts_send(reply, TtsCommand::Finish),
            CascadeOut::TtsDrop { reply } => s.tts.retain(|(i, _)| *i != reply),
            CascadeOut::Event(ev) => d.io.events.send(ev).await.map_err(|_| Stop::Gone)?,
            CascadeOut::Fail(e) => return Err(Stop::Failed(e)),
        }
    }
    Ok(())
}

impl Streams {
    /// Queues `cmd` on `reply`'s TTS stream; a stream that is gone says so with its events.
    fn tts_send(&self, reply: ReplyId, cmd: TtsCommand) {
        if let Some((_, stream)) = self.tts.iter().find(|(i, _)| *i == reply) {
            let _ = stream.text.send(cmd);
        }
    }

    /// The next event of any stream (`None`: that stream ended); pending while there is
    /// none.
    async fn next(&mut self) -> StreamEv {
        self.tts_first = !self.tts_first;
        let tts_first = self.tts_first;
        let (llm, tts) = (&mut self.llm, &mut self.tts);
        std::future::poll_fn(|cx| {
            let first = if tts_first {
                poll_tts(tts, cx)
            } else {
                poll_llm(llm, cx)
            };
            match first {
                Poll::Ready(ev) => Poll::Ready(ev),
                Poll::Pending if tts_first => poll_llm(llm, cx),
                Poll::Pending => poll_tts(tts, cx),
            }
        })
        .await
    }
}

fn poll_llm(llm: &mut [(LlmId, LlmStream)], cx: &mut Context<'_>) -> Poll<StreamEv> {
    for (id, s) in llm.iter_mut() {
        if let Poll::Ready(ev) = s.events.poll_recv(cx) {
            return Poll::Ready(StreamEv::Llm(*id, ev));
        }
    }
    Poll::Pending
}

fn poll_tts(tts: &mut [(ReplyId, TtsStream)], cx: &mut Context<'_>) -> Poll<StreamEv> {
    for (id, s) in tts.iter_mut() {
        if let Poll::Ready(ev) = s.events.poll_recv(cx) {
            return Poll::Ready(StreamEv::Tts(*id, ev));
        }
    }
    Poll::Pending
}
