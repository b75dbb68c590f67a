//! The cascade agent (STT → LLM → TTS) against fakes of Soniox, Deepgram, ElevenLabs STT,
//! a Chat Completions endpoint and ElevenLabs TTS, each speaking its vendor's wire format on
//! 127.0.0.1:0, driven by real recordings.

use crate::cascade_fakes;
use crate::common;

use cascade_fakes::*;
use common::{TestServer, fixture};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;
use voicegate::agent::cascade::config::SttConfig;
use voicegate::agent::cascade::{CascadeAgent, ToolSpec, stt};
use voicegate::agent::{Agent, AgentEvent, AgentInput, AgentSession, CallInfo, Speaker};
use voicegate::audiosocket::SlinRate;
use voicegate::call::Outcome;
use voicegate::call::session::CallSummary;
use voicegate::caller::best_correlation;
use voicegate::secret::{Secret, SecretSource};

fn messages(llm: &LlmFake, i: usize) -> Vec<serde_json::Value> {
    llm.log.lock().unwrap().requests[i].body["messages"]
        .as_array()
        .cloned()
        .unwrap_or_default()
}

// ------------------------------------------------------------------------------------
// Each STT client against its vendor's fake
// ------------------------------------------------------------------------------------

async fn stt_round_trip(vendor: SttVendor, rate_hz: u32, expect_encoding: &str) {
    let fake = SttFake::start(vendor, &["hello world"], None).await;
    let cfg = SttConfig {
        provider: provider(vendor),
        url: Some(fake.url(vendor)),
        api_key: Some(SecretSource::Inline(KEY.into())),
        languages: vec!["en".into()],
        model: (vendor == SttVendor::Flux).then(|| "flux-general-en".into()),
        ..SttConfig::default()
    };
    let proto = stt::protocol(&cfg, Secret::new(KEY), rate_hz);
    let mut h = stt::spawn(proto, rate_hz, Duration::from_secs(5));
    let speech = clip_at(&fixture("hello-world.wav"), rate_hz);
    let spf = rate_hz as usize / 50;
    let mut audio = speech.clone();
    audio.extend(std::iter::repeat_n(0i16, rate_hz as usize)); // 1 s of silence
    let feeder = {
        let tx = h.audio.clone();
        tokio::spawn(async move {
            for f in audio.chunks(spf) {
                let mut b = Vec::new();
                voicegate::audio::slin_to_le_bytes(f, &mut b);
                tx.send(bytes::Bytes::from(b)).await.unwrap();
                tokio::time::sleep(Duration::from_millis(4)).await;
            }
        })
    };
    let mut events = Vec::new();
    let end = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match h.events.recv().await {
                Some(stt::SttEvent::EndOfTurn(t)) => break t,
                Some(e) => events.push(e),
                None => panic!("stt ended: {events:?}"),
            }
        }
    })
    .await
    .expect("end of turn in time");
    feeder.await.unwrap();
    assert_eq!(end, "hello world");
    assert!(
        events.contains(&stt::SttEvent::Interim("hello".into())),
        "{events:?}"
    );
    match vendor {
        // No audio for more than 3 s (Deepgram) / 5 s (Soniox): a keepalive goes out.
        SttVendor::Deepgram => tokio::time::sleep(Duration::from_millis(3_800)).await,
        SttVendor::Flux => {}
        SttVendor::Soniox => tokio::time::sleep(Duration::from_millis(5_800)).await,
        SttVendor::ElevenLabs => {}
    }
    drop(h);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let log = fake.log.lock().unwrap();
    assert!(log.errors.is_empty(), "{:?}", log.errors);
    assert_eq!(log.encoding, expect_encoding);
    assert_eq!(log.rate_hz, rate_hz);
    assert!(
        log.client_closed,
        "client ended the stream the vendor's way"
    );
    let keepalive = match vendor {
        SttVendor::Deepgram => Some(r#"{"type":"KeepAlive"}"#),
        SttVendor::Flux => None,
        SttVendor::Soniox => Some(r#"{"type":"keepalive"}"#),
        SttVendor::ElevenLabs => None,
    };
    if let Some(k) = keepalive {
        assert!(log.texts.iter().any(|t| t == k), "{:?}", log.texts);
    }
    if vendor == SttVendor::ElevenLabs {
        assert!(log.final_commit, "the call ends with a commit: true chunk");
    }
    // What the vendor received is the recording.
    assert!(log.audio.len() >= speech.len(), "{}", log.audio.len());
    let (corr, lag) = best_correlation(&log.audio[..speech.len()], &speech, 40);
    assert!(corr > 0.95, "correlation {corr} at lag {lag}");
}

#[tokio::test]
async fn stt_soniox_8khz_mulaw_with_keepalive() {
    stt_round_trip(SttVendor::Soniox, 8_000, "mulaw").await;
}

#[tokio::test]
async fn stt_soniox_16khz_pcm() {
    stt_round_trip(SttVendor::Soniox, 16_000, "pcm_s16le").await;
}

/// The STT fakes, like the vendors, refuse an upgrade that does not carry the key (Soniox
/// from 15 January 2027: the key in the start message alone is no longer enough).
#[tokio::test]
async fn stt_fakes_refuse_an_upgrade_without_the_key() {
    for vendor in [
        SttVendor::Soniox,
        SttVendor::Deepgram,
        SttVendor::ElevenLabs,
    ] {
        let fake = SttFake::start(vendor, &[], None).await;
        let e = tokio_tungstenite::connect_async(fake.url(vendor))
            .await
            .expect_err("refused");
        assert!(e.to_string().contains("401"), "{vendor:?}: {e}");
        assert_eq!(fake.log.lock().unwrap().refused, 1);
    }
}

#[tokio::test]
async fn stt_deepgram_8khz_mulaw_with_keepalive() {
    stt_round_trip(SttVendor::Deepgram, 8_000, "mulaw").await;
}

/// Deepgram Flux (a `flux-…` model): `/v2/listen`, pcm16 at the call rate, `TurnInfo`
/// events, `EndOfTurn` ends the turn.
#[tokio::test]
async fn stt_deepgram_flux_8khz() {
    stt_round_trip(SttVendor::Flux, 8_000, "linear16").await;
}

#[tokio::test]
async fn stt_deepgram_16khz_linear16() {
    stt_round_trip(SttVendor::Deepgram, 16_000, "linear16").await;
}

/// Scribe ends a session at its time limit (`session_time_limit_exceeded`): the client
/// opens a new one and carries on, giving it the text so far as `previous_text` with its
/// first chunk only (the fake, like the contract, refuses it on any later chunk).
#[tokio::test]
async fn stt_elevenlabs_session_time_limit_reconnects_with_previous_text() {
    let vendor = SttVendor::ElevenLabs;
    let fake = SttFake::start_with(vendor, &["hello world"], Some(2_600), Some(1)).await;
    let cfg = SttConfig {
        provider: provider(vendor),
        url: Some(fake.url(vendor)),
        api_key: Some(SecretSource::Inline(KEY.into())),
        ..SttConfig::default()
    };
    let mut h = stt::spawn(
        stt::protocol(&cfg, Secret::new(KEY), 8_000),
        8_000,
        Duration::from_secs(5),
    );
    let speech = fixture("hello-world.wav").samples;
    let mut audio = speech.clone();
    audio.extend(std::iter::repeat_n(0i16, 8_000 * 3 / 2));
    audio.extend(fixture("auth-thankyou.wav").samples);
    audio.extend(std::iter::repeat_n(0i16, 8_000));
    let tx = h.audio.clone();
    let feeder = tokio::spawn(async move {
        for f in audio.chunks(160) {
            let mut b = Vec::new();
            voicegate::audio::slin_to_le_bytes(f, &mut b);
            if tx.send(bytes::Bytes::from(b)).await.is_err() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(4)).await;
        }
    });
    let mut turns = Vec::new();
    tokio::time::timeout(Duration::from_secs(15), async {
        while turns.len() < 2 {
            match h.events.recv().await {
                Some(stt::SttEvent::EndOfTurn(t)) => turns.push(t),
                Some(_) => {}
                None => panic!("stt ended after {turns:?}"),
            }
        }
    })
    .await
    .expect("both turns in time");
    feeder.await.unwrap();
    drop(h);
    let log = fake.log.lock().unwrap();
    // The fake's script starts over in each session: the second turn, heard by the new
    // session, is its first utterance again.
    assert_eq!(turns, ["hello world", "hello world"]);
    assert_eq!(log.connections, 2, "one reconnect");
    assert_eq!(log.previous_texts, ["hello world"]);
    assert!(log.errors.is_empty(), "{:?}", log.errors);
}

/// Scribe realtime keyterms go as one `keyterms` query parameter each (elevenlabs-js
/// `wrapper/realtime/scribe.ts`); the fake, like the vendor, turns down a term over 20
/// characters with an `input_error` (config validation refuses such a term before that).
#[tokio::test]
async fn stt_elevenlabs_sends_keyterms_and_the_fake_refuses_an_overlong_one() {
    let vendor = SttVendor::ElevenLabs;
    for (keyterms, ok) in [
        (vec!["ElevenLabs", "R16 Michelin"], true),
        (vec!["ElevenLabs", "a keyterm of 21 chars"], false),
    ] {
        let fake = SttFake::start(vendor, &["hello world"], None).await;
        let cfg = SttConfig {
            provider: provider(vendor),
            url: Some(fake.url(vendor)),
            api_key: Some(SecretSource::Inline(KEY.into())),
            keyterms: keyterms.iter().map(|k| k.to_string()).collect(),
            ..SttConfig::default()
        };
        let mut h = stt::spawn(
            stt::protocol(&cfg, Secret::new(KEY), 8_000),
            8_000,
            Duration::from_secs(5),
        );
        let mut audio = fixture("hello-world.wav").samples;
        audio.extend(std::iter::repeat_n(0i16, 8_000));
        let tx = h.audio.clone();
        let feeder = tokio::spawn(async move {
            for f in audio.chunks(160) {
                let mut b = Vec::new();
                voicegate::audio::slin_to_le_bytes(f, &mut b);
                if tx.send(bytes::Bytes::from(b)).await.is_err() {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(4)).await;
            }
        });
        let got = tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                match h.events.recv().await {
                    Some(stt::SttEvent::EndOfTurn(t)) => break Ok(t),
                    Some(stt::SttEvent::Failed(e)) => break Err(e.to_string()),
                    Some(_) => {}
                    None => break Err("stt ended".into()),
                }
            }
        })
        .await
        .expect("an answer in time");
        feeder.abort();
        drop(h);
        let log = fake.log.lock().unwrap();
        assert_eq!(log.keyterms, keyterms, "one keyterms parameter per term");
        if ok {
            assert_eq!(got.as_deref(), Ok("hello world"));
            assert!(log.errors.is_empty(), "{:?}", log.errors);
        } else {
            let e = got.expect_err("refused");
            assert!(e.contains("input_error") && e.contains("maximum 20"), "{e}");
        }
    }
}

#[tokio::test]
async fn stt_elevenlabs_8khz_ulaw() {
    stt_round_trip(SttVendor::ElevenLabs, 8_000, "ulaw_8000").await;
}

#[tokio::test]
async fn stt_elevenlabs_16khz_pcm() {
    stt_round_trip(SttVendor::ElevenLabs, 16_000, "pcm_16000").await;
}

// ------------------------------------------------------------------------------------
// A whole call through AudioSocket
// ------------------------------------------------------------------------------------

const REPLY: &str = "Hello! This is the voicegate test line. How can I help you today?";

async fn first_audio_before_llm_finished(rate: SlinRate) {
    let stt = SttFake::start(SttVendor::Deepgram, &["hello world"], None).await;
    let llm = LlmFake::start(vec![LlmReply::Stream {
        events: text_events(REPLY),
        // role + "Hello! This " + "is the " + "voicegate test ": the first sentence is done.
        hold_after: Some(4),
    }])
    .await;
    let clip = fixture("vm-goodbye.wav");
    let tts = TtsFake::start(clip.clone(), false).await;
    let agent = CascadeAgent::new(&config(SttVendor::Deepgram, &stt, &llm, &tts), vec![]).unwrap();
    let mut server = TestServer::start(Arc::new(agent)).await;
    let (first_tx, mut first_rx) = watch::channel(None);
    let caller = EchoCaller {
        rate,
        speech: clip_at(&fixture("hello-world.wav"), rate.hz()),
        speech_at_ms: 200,
        barge: None,
        echo: None,
        noise_rms: 30.0,
        duration_ms: 6_500,
    };
    let call_id = uuid::Uuid::new_v4();
    let call = tokio::spawn(caller.run(server.addr, call_id, first_tx));
    tokio::time::timeout(Duration::from_secs(10), first_rx.wait_for(|v| v.is_some()))
        .await
        .expect("agent audio reached the caller")
        .unwrap();
    {
        // The caller hears the agent while the LLM is still holding back its last chunks.
        let l = llm.log.lock().unwrap();
        assert_eq!(l.holding, vec![0]);
        assert!(l.completed.is_empty(), "{:?}", l.completed);
        let t = tts.log.lock().unwrap();
        assert_eq!(t.conns[0].texts[0], "Hello! ");
    }
    llm.release.notify_one();
    let report = call.await.unwrap();
    let summary = server.next_summary().await;
    assert_eq!(summary.outcome, Outcome::CallerHungUp);

    // The LLM request: streaming, the history, the auth and the extra header.
    {
        let l = llm.log.lock().unwrap();
        assert_eq!(l.completed, vec![0]);
        let r = &l.requests[0];
        assert_eq!(r.path, "/v1/chat/completions");
        assert_eq!(r.body["stream"], true);
        assert_eq!(r.body["model"], "test-model");
        assert!(
            r.headers
                .contains(&("authorization".into(), format!("Bearer {KEY}")))
        );
        assert!(r.headers.contains(&("x-title".into(), "voicegate".into())));
    }
    let m = messages(&llm, 0);
    assert_eq!(m[0]["role"], "system");
    assert_eq!(
        m[1],
        serde_json::json!({"role":"user","content":"hello world"})
    );

    // The TTS got sentences in order, in the call's format, with the key.
    {
        let t = tts.log.lock().unwrap();
        let c = &t.conns[0];
        let want = if rate.hz() == 8_000 {
            "ulaw_8000"
        } else {
            "pcm_16000"
        };
        assert!(
            c.uri.contains(&format!("output_format={want}")),
            "{}",
            c.uri
        );
        assert!(
            c.uri
                .starts_with("/v1/text-to-speech/voice1/multi-stream-input?"),
            "{}",
            c.uri
        );
        assert_eq!(t.sockets, 1, "one socket for the call");
        assert_eq!(c.init.as_ref().unwrap()["context_id"], "vg_r1");
        assert!(t.errors.is_empty(), "{:?}", t.errors);
        assert_eq!(c.api_key.as_deref(), Some(KEY));
        assert_eq!(
            c.texts,
            vec![
                "Hello! ",
                "This is the voicegate test line. ",
                "How can I help you today? "
            ]
        );
        assert!(c.end_of_input && c.final_sent && !c.closed_early);
    }

    // The caller heard the TTS audio, decoded once, at the call rate.
    let spms = rate.hz() as usize / 1000;
    let clip_call = clip_at(&clip, rate.hz());
    let first = report.first_audio_ms.unwrap() as usize;
    let from = (first.saturating_sub(200)) * spms;
    let window = &report.received[from..(from + 1_000 * spms).min(report.received.len())];
    let (corr, _) = best_correlation(
        window,
        &clip_call[..clip_call.len().min(400 * spms)],
        400 * spms,
    );
    assert!(corr > 0.9, "reply audio correlation {corr}");

    // Latency of the turn, recorded in the call summary.
    assert_eq!(summary.turns.len(), 1, "{:?}", summary.turns);
    let t = &summary.turns[0];
    let (s, l, a, f) = (
        t.stt_final_ms.unwrap(),
        t.llm_first_token_ms.unwrap(),
        t.tts_first_audio_ms.unwrap(),
        t.first_frame_ms.unwrap(),
    );
    assert!(s <= l && l <= a && a <= f, "{t:?}");
    eprintln!(
        "turn latency at {} Hz (from end of caller speech): stt final {s} ms, llm first token {l} ms, tts first audio {a} ms, first frame on the wire {f} ms",
        rate.hz()
    );
    // The values, not only their order (measured 399–420, +14–28, +1–14, +0–19 ms): the
    // fake STT's endpointing ends the turn after 400 ms of silence; the fake LLM streams at
    // once, the TTS fake answers the first sentence at once, and the first frame goes out
    // on the next 20 ms tick. The margins are for a loaded machine.
    assert!((350..=600).contains(&s), "stt final {s} ms: {t:?}");
    assert!(
        l - s <= 200,
        "llm first token {} ms after stt final: {t:?}",
        l - s
    );
    assert!(
        a - l <= 200,
        "tts first audio {} ms after the llm's first token: {t:?}",
        a - l
    );
    assert!(
        f - a <= 100,
        "first frame {} ms after tts first audio: {t:?}",
        f - a
    );
    assert!(
        summary
            .transcript
            .contains(&(Speaker::Caller, "hello world".into()))
    );
    assert!(summary.transcript.contains(&(Speaker::Agent, REPLY.into())));
    server.stop.cancel();
}

#[tokio::test]
async fn cascade_first_audio_before_llm_finished_8khz() {
    first_audio_before_llm_finished(SlinRate::Hz8000).await;
}

#[tokio::test]
async fn cascade_first_audio_before_llm_finished_16khz() {
    first_audio_before_llm_finished(SlinRate::Hz16000).await;
}

/// Time from asking for a reply's speech to its first audio, ms: on a fresh [`TtsCall`]
/// (the socket is opened for the reply, as every reply did before the persistent socket),
/// or on one whose socket was opened while the caller was still speaking.
async fn tts_first_audio_ms(tts: &TtsFake, warm: bool) -> f64 {
    use voicegate::agent::cascade::tts::{TtsCommand, TtsEvent, TtsSettings};
    let settings = TtsSettings {
        cfg: voicegate::agent::cascade::config::TtsConfig {
            url: tts.url(),
            api_key: SecretSource::Inline(KEY.into()),
            voice_id: "voice1".into(),
            ..Default::default()
        },
        key: Secret::new(KEY),
    };
    let mut call = settings.call(8_000);
    if warm {
        call.connect();
        // The caller is still speaking: the handshake completes meanwhile.
        tokio::time::sleep(Duration::from_millis(400)).await;
    }
    let t0 = tokio::time::Instant::now();
    let mut s = call.start();
    s.text
        .send(TtsCommand::Text("Hello there.".into()))
        .unwrap();
    s.text.send(TtsCommand::Finish).unwrap();
    loop {
        match tokio::time::timeout(Duration::from_secs(5), s.events.recv()).await {
            Ok(Some(TtsEvent::Audio(_))) => return t0.elapsed().as_secs_f64() * 1000.0,
            Ok(Some(TtsEvent::Failed(e))) => panic!("{e}"),
            Ok(Some(_)) => {}
            Ok(None) | Err(_) => panic!("no audio"),
        }
    }
}

/// The persistent TTS socket: against a fake whose handshake takes 150 ms (TCP + TLS + the
/// upgrade to a distant server), the first reply audio no longer waits for it. Best of three
/// each way, so a busy machine's hiccup does not decide.
#[tokio::test]
async fn tts_socket_opened_before_the_reply_saves_the_handshake() {
    const HANDSHAKE: Duration = Duration::from_millis(150);
    let tts = TtsFake::start_with(fixture("vm-goodbye.wav"), false, HANDSHAKE).await;
    let mut cold = f64::MAX;
    let mut warm = f64::MAX;
    for _ in 0..3 {
        cold = cold.min(tts_first_audio_ms(&tts, false).await);
        warm = warm.min(tts_first_audio_ms(&tts, true).await);
    }
    eprintln!(
        "tts first audio with a {} ms handshake: socket opened per reply {cold:.1} ms, socket opened while the caller speaks {warm:.1} ms",
        HANDSHAKE.as_millis()
    );
    assert!(cold >= 150.0, "the handshake was waited for: {cold}");
    assert!(warm + 100.0 < cold, "warm {warm} ms, cold {cold} ms");
    let log = tts.log.lock().unwrap();
    assert_eq!(log.sockets, 6);
    assert!(log.errors.is_empty(), "{:?}", log.errors);
}

/// Two replies of one call share one socket, each in its own context; a barge-in closes
/// the first reply's context and its late audio never reaches the second reply.
#[tokio::test]
async fn tts_replies_share_one_socket_as_contexts() {
    use voicegate::agent::cascade::tts::{TtsCommand, TtsEvent, TtsSettings};
    let tts = TtsFake::start(fixture("vm-goodbye.wav"), false).await;
    let settings = TtsSettings {
        cfg: voicegate::agent::cascade::config::TtsConfig {
            url: tts.url(),
            api_key: SecretSource::Inline(KEY.into()),
            voice_id: "voice1".into(),
            language_code: Some("uk".into()),
            model_id: "eleven_multilingual_v2".into(),
            ..Default::default()
        },
        key: Secret::new(KEY),
    };
    let mut call = settings.call(8_000);
    call.connect();
    let mut first = call.start();
    first
        .text
        .send(TtsCommand::Text("Our hours are long.".into()))
        .unwrap();
    match tokio::time::timeout(Duration::from_secs(5), first.events.recv()).await {
        Ok(Some(TtsEvent::Chars(_) | TtsEvent::Audio(_))) => {}
        other => panic!("{other:?}"),
    }
    drop(first); // barge-in
    let mut second = call.start();
    second.text.send(TtsCommand::Text("Sure.".into())).unwrap();
    second.text.send(TtsCommand::Finish).unwrap();
    let mut audio = 0;
    loop {
        match tokio::time::timeout(Duration::from_secs(5), second.events.recv()).await {
            Ok(Some(TtsEvent::Audio(a))) => audio += a.len(),
            Ok(Some(TtsEvent::Done)) => break,
            Ok(Some(TtsEvent::Failed(e))) => panic!("{e}"),
            Ok(Some(TtsEvent::Chars(_))) => {}
            Ok(None) | Err(_) => panic!("no end"),
        }
    }
    // Exactly one clip: nothing of the first reply leaked into the second.
    assert_eq!(audio, clip_at(&fixture("vm-goodbye.wav"), 8_000).len());
    drop(second);
    drop(call);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let log = tts.log.lock().unwrap();
    assert_eq!(log.sockets, 1);
    assert_eq!(log.conns.len(), 2);
    assert!(
        log.conns[0].closed_early,
        "the interrupted reply's context was closed"
    );
    assert!(log.conns[1].end_of_input && log.conns[1].final_sent && !log.conns[1].closed_early);
    assert_eq!(log.conns[1].init.as_ref().unwrap()["context_id"], "vg_r2");
    // eleven_multilingual_v2 takes no language_code: it is not sent (the fake would refuse).
    assert!(
        !log.conns[0].uri.contains("language_code"),
        "{}",
        log.conns[0].uri
    );
    assert!(log.errors.is_empty(), "{:?}", log.errors);
    assert!(log.close_socket, "the call's end closes the socket");
}

const HOURS: &str = "Our shop is open from nine to six on weekdays. On Saturdays we open at ten. Sundays we are closed.";
const FIRST_SENTENCE: &str = "Our shop is open from nine to six on weekdays.";

#[tokio::test]
async fn cascade_barge_in_cancels_llm_and_tts_and_keeps_what_was_heard() {
    barge_in(SlinRate::Hz8000).await;
}

#[tokio::test]
async fn cascade_barge_in_16khz() {
    barge_in(SlinRate::Hz16000).await;
}

async fn barge_in(rate: SlinRate) {
    let stt = SttFake::start(SttVendor::Soniox, &["hello world", "thank you"], None).await;
    let llm = LlmFake::start(vec![
        // role + 5 pieces up to "on weekdays. ": one sentence, then the LLM stalls.
        LlmReply::text_held(HOURS, 6),
        LlmReply::text("You are welcome."),
    ])
    .await;
    let tts = TtsFake::start(fixture("invalid.wav"), false).await;
    let agent = CascadeAgent::new(&config(SttVendor::Soniox, &stt, &llm, &tts), vec![]).unwrap();
    let mut server = TestServer::start(Arc::new(agent)).await;
    let (first_tx, _first_rx) = watch::channel(None);
    let caller = EchoCaller {
        rate,
        speech: clip_at(&fixture("hello-world.wav"), rate.hz()),
        speech_at_ms: 200,
        // "Thank you." 1 s into the agent's 4 s sentence, over the echo of it.
        barge: Some((clip_at(&fixture("auth-thankyou.wav"), rate.hz()), 1_000)),
        echo: Some((0.3, 100)),
        noise_rms: 40.0,
        duration_ms: 9_000,
    };
    let report = caller
        .run(server.addr, uuid::Uuid::new_v4(), first_tx)
        .await;
    let summary = server.next_summary().await;
    assert_eq!(summary.barge_ins, 1, "{summary:?}");

    // Both streams of the interrupted reply were cancelled.
    for _ in 0..50 {
        if tts
            .log
            .lock()
            .unwrap()
            .conns
            .first()
            .is_some_and(|c| c.closed_early)
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(40)).await;
    }
    {
        let l = llm.log.lock().unwrap();
        assert_eq!(l.cancelled, vec![0], "{l:?}");
        assert_eq!(l.requests.len(), 2);
        let t = tts.log.lock().unwrap();
        assert!(t.conns[0].closed_early, "{:?}", t.conns);
        assert!(!t.conns[0].end_of_input);
        assert_eq!(t.conns[0].texts, vec![format!("{FIRST_SENTENCE} ")]);
    }
    // The history keeps only the heard part of the reply.
    let m = messages(&llm, 1);
    assert_eq!(m.len(), 4, "{m:?}");
    assert_eq!(m[1]["content"], "hello world");
    assert_eq!(m[2]["role"], "assistant");
    let heard = m[2]["content"].as_str().unwrap();
    assert!(
        !heard.is_empty() && heard.len() < FIRST_SENTENCE.len(),
        "heard {heard:?}"
    );
    assert!(FIRST_SENTENCE.starts_with(heard), "heard {heard:?}");
    assert_eq!(
        m[3],
        serde_json::json!({"role":"user","content":"thank you"})
    );
    let barge_at = report.barge_at_ms.unwrap();
    eprintln!("barge-in at {barge_at} ms; the history kept {heard:?}");
    assert!(
        summary
            .transcript
            .contains(&(Speaker::Agent, heard.to_owned()))
    );
    assert!(
        summary
            .transcript
            .contains(&(Speaker::Caller, "thank you".into()))
    );
    server.stop.cancel();
}

#[tokio::test]
async fn cascade_own_echo_does_not_barge_in() {
    own_echo_does_not_barge_in(SlinRate::Hz8000).await;
}

#[tokio::test]
async fn cascade_own_echo_does_not_barge_in_16khz() {
    own_echo_does_not_barge_in(SlinRate::Hz16000).await;
}

async fn own_echo_does_not_barge_in(rate: SlinRate) {
    let stt = SttFake::start(SttVendor::ElevenLabs, &["hello world", "echo turn"], None).await;
    let llm = LlmFake::start(vec![LlmReply::text(FIRST_SENTENCE)]).await;
    let clip = fixture("invalid.wav");
    let tts = TtsFake::start(clip.clone(), false).await;
    let agent =
        CascadeAgent::new(&config(SttVendor::ElevenLabs, &stt, &llm, &tts), vec![]).unwrap();
    let mut server = TestServer::start(Arc::new(agent)).await;
    let (first_tx, _first_rx) = watch::channel(None);
    let caller = EchoCaller {
        rate,
        speech: clip_at(&fixture("hello-world.wav"), rate.hz()),
        speech_at_ms: 200,
        barge: None,
        // A loud echo (−9 dB), 150 ms late.
        echo: Some((0.35, 150)),
        noise_rms: 40.0,
        duration_ms: 8_500,
    };
    let report = caller
        .run(server.addr, uuid::Uuid::new_v4(), first_tx)
        .await;
    let summary = server.next_summary().await;
    assert_eq!(summary.barge_ins, 0);
    let t = tts.log.lock().unwrap();
    assert!(
        t.conns[0].final_sent && !t.conns[0].closed_early,
        "{:?}",
        t.conns[0]
    );
    // The whole reply was heard, and the echo never became a caller turn.
    let clip_frames = clip.samples.len() / 160;
    assert!(
        report.audible_ms.len() * 10 >= clip_frames * 8,
        "{} of {clip_frames} frames audible",
        report.audible_ms.len()
    );
    assert_eq!(llm.log.lock().unwrap().requests.len(), 1);
    assert!(
        summary
            .transcript
            .contains(&(Speaker::Agent, FIRST_SENTENCE.into()))
    );
    assert_eq!(
        summary
            .transcript
            .iter()
            .filter(|(s, _)| *s == Speaker::Caller)
            .count(),
        1
    );
    server.stop.cancel();
}

const OVERLOADED: &str =
    r#"{"error":{"message":"upstream overloaded","type":"server_error","param":null,"code":null}}"#;

fn refusal(status: u16, retry_after_s: Option<u32>) -> LlmReply {
    LlmReply::Error {
        status,
        body: OVERLOADED.into(),
        retry_after_s,
    }
}

/// A call whose LLM answers with `script`: "hello world", then 6 s of the line.
async fn call_with_llm(script: Vec<LlmReply>) -> (EchoReport, CallSummary, LlmFake) {
    let stt = SttFake::start(SttVendor::Deepgram, &["hello world"], None).await;
    let llm = LlmFake::start(script).await;
    let tts = TtsFake::start(fixture("vm-goodbye.wav"), false).await;
    let agent = CascadeAgent::new(&config(SttVendor::Deepgram, &stt, &llm, &tts), vec![]).unwrap();
    let mut server = TestServer::start(Arc::new(agent)).await;
    let (first_tx, _rx) = watch::channel(None);
    let caller = EchoCaller {
        rate: SlinRate::Hz8000,
        speech: fixture("hello-world.wav").samples,
        speech_at_ms: 200,
        barge: None,
        echo: None,
        noise_rms: 30.0,
        duration_ms: 6_000,
    };
    let report = caller
        .run(server.addr, uuid::Uuid::new_v4(), first_tx)
        .await;
    let summary = server.next_summary().await;
    server.stop.cancel();
    (report, summary, llm)
}

#[tokio::test]
async fn cascade_llm_failure_falls_back() {
    // Overloaded twice: the first refusal is retried once, the second ends the agent.
    let (report, summary, llm) = call_with_llm(vec![refusal(500, None), refusal(500, None)]).await;
    assert!(
        report.hangup,
        "the call got 0x00 so the dialplan reaches the operators"
    );
    match &summary.outcome {
        Outcome::Fallback(e) => {
            assert!(
                e.contains("HTTP 500")
                    && e.contains("upstream overloaded")
                    && e.contains("after 2 attempts"),
                "{e}"
            )
        }
        other => panic!("{other:?}"),
    }
    let l = llm.log.lock().unwrap();
    assert_eq!(l.requests.len(), 2);
    // The default retry delay, 250 ms, between the two.
    let gap = l.requests[1].at - l.requests[0].at;
    assert!(gap >= Duration::from_millis(240), "{gap:?}");
}

/// A call whose first LLM request gets `first` and whose retry gets a reply: the caller
/// hears it and the call ends normally. Returns the fake, for its request log.
async fn retried_call(first: LlmReply) -> LlmFake {
    let (report, summary, llm) = call_with_llm(vec![first, LlmReply::text("Good morning.")]).await;
    assert!(
        matches!(summary.outcome, Outcome::CallerHungUp),
        "{:?}",
        summary.outcome
    );
    assert!(
        report.first_audio_ms.is_some(),
        "the caller heard the reply"
    );
    assert!(
        summary
            .transcript
            .contains(&(Speaker::Agent, "Good morning.".into()))
    );
    assert_eq!(llm.log.lock().unwrap().requests.len(), 2);
    llm
}

#[tokio::test]
async fn cascade_llm_rate_limit_is_retried_after_retry_after_and_the_caller_hears_the_reply() {
    let llm = retried_call(refusal(429, Some(1))).await;
    let l = llm.log.lock().unwrap();
    // The same conversation, sent again after the server's Retry-After (1 s).
    assert_eq!(l.requests[0].body, l.requests[1].body);
    let gap = l.requests[1].at - l.requests[0].at;
    assert!(gap >= Duration::from_millis(990), "{gap:?}");
}

#[tokio::test]
async fn cascade_llm_connection_dropped_before_an_answer_is_retried() {
    retried_call(LlmReply::Hangup).await;
}

#[tokio::test]
async fn cascade_llm_long_retry_after_is_not_waited_for() {
    // Asked to come back in 30 s, the agent does not keep the caller waiting: fallback now.
    let (report, summary, llm) =
        call_with_llm(vec![refusal(429, Some(30)), refusal(429, Some(30))]).await;
    assert!(report.hangup);
    match &summary.outcome {
        Outcome::Fallback(e) => assert!(e.contains("HTTP 429") && !e.contains("attempts"), "{e}"),
        other => panic!("{other:?}"),
    }
    assert_eq!(llm.log.lock().unwrap().requests.len(), 1);
}

#[tokio::test]
async fn cascade_llm_client_error_is_not_retried() {
    let (_, summary, llm) = call_with_llm(vec![LlmReply::Error {
        status: 401,
        body:
            r#"{"error":{"message":"Incorrect API key provided","type":"invalid_request_error"}}"#
                .into(),
        retry_after_s: None,
    }])
    .await;
    match &summary.outcome {
        Outcome::Fallback(e) => assert!(e.contains("HTTP 401"), "{e}"),
        other => panic!("{other:?}"),
    }
    assert_eq!(llm.log.lock().unwrap().requests.len(), 1);
}

// ------------------------------------------------------------------------------------
// Driving the agent directly
// ------------------------------------------------------------------------------------

/// Starts a call at 8 kHz and feeds it `hello-world.wav`, then silence, until dropped.
fn start_call(agent: &CascadeAgent) -> (AgentSession, tokio::task::JoinHandle<()>) {
    let session = agent.start(CallInfo {
        tools: Vec::new(),
        variables: Default::default(),
        call_id: uuid::Uuid::new_v4(),
        rate_hz: 8_000,
        caller_number: Some("+15550100".into()),
        caller_name: None,
    });
    let tx = session.input.clone();
    let feeder = tokio::spawn(async move {
        let speech = fixture("hello-world.wav").samples;
        let mut frames: Vec<Vec<i16>> = speech.chunks(160).map(|c| c.to_vec()).collect();
        let mut n = 0usize;
        loop {
            let f = if n < frames.len() {
                std::mem::take(&mut frames[n])
            } else {
                vec![0; 160]
            };
            let mut b = Vec::new();
            voicegate::audio::slin_to_le_bytes(&f, &mut b);
            if tx
                .send(AgentInput::Audio(bytes::Bytes::from(b)))
                .await
                .is_err()
            {
                return;
            }
            n += 1;
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    });
    (session, feeder)
}

async fn next_event(s: &mut AgentSession) -> AgentEvent {
    tokio::time::timeout(Duration::from_secs(10), s.events.recv())
        .await
        .expect("agent event in time")
        .expect("agent alive")
}

async fn expect_failure(s: &mut AgentSession) -> String {
    loop {
        if let AgentEvent::Failed(e) = next_event(s).await {
            return e.to_string();
        }
    }
}

#[tokio::test]
async fn cascade_tool_call_round_trip() {
    let stt = SttFake::start(SttVendor::Deepgram, &["do you have winter tyres"], None).await;
    let args = r#"{"size":"205/55 R16","season":"winter"}"#;
    let llm = LlmFake::start(vec![
        LlmReply::Stream {
            events: tool_events("call_1", "search_tires", args),
            hold_after: None,
        },
        LlmReply::text("Yes, we have four in stock."),
    ])
    .await;
    let tts = TtsFake::start(fixture("vm-goodbye.wav"), false).await;
    let schema = serde_json::json!({"type":"object","properties":{"size":{"type":"string"},"season":{"type":"string"}},"required":["size"]});
    let tools = vec![ToolSpec {
        name: "search_tires".into(),
        description: "Search the tyre stock".into(),
        parameters: schema.clone(),
    }];
    let agent = CascadeAgent::new(&config(SttVendor::Deepgram, &stt, &llm, &tts), tools).unwrap();
    let (mut s, feeder) = start_call(&agent);
    let (call_id, reply) = loop {
        match next_event(&mut s).await {
            AgentEvent::ToolCall {
                call_id,
                name,
                arguments,
                reply,
            } => {
                assert_eq!(name, "search_tires");
                let a: serde_json::Value = serde_json::from_str(&arguments).unwrap();
                assert_eq!(a, serde_json::from_str::<serde_json::Value>(args).unwrap());
                break (call_id, reply);
            }
            AgentEvent::Failed(e) => panic!("{e}"),
            _ => {}
        }
    };
    assert_eq!(call_id, "call_1");
    assert!(reply.is_some());
    let output = r#"{"in_stock":4}"#;
    s.input
        .send(AgentInput::ToolResult {
            call_id: call_id.clone(),
            output: output.into(),
        })
        .await
        .unwrap();
    // The answer after the tool result is spoken.
    let mut audio = 0usize;
    loop {
        match next_event(&mut s).await {
            AgentEvent::Audio { samples, .. } => audio += samples.len(),
            AgentEvent::ReplyDone { .. } if audio > 0 => break,
            AgentEvent::Failed(e) => panic!("{e}"),
            _ => {}
        }
    }
    feeder.abort();
    let l = llm.log.lock().unwrap();
    assert_eq!(l.requests.len(), 2);
    let tools = &l.requests[0].body["tools"];
    assert_eq!(
        tools,
        &serde_json::json!([{"type":"function","function":{"name":"search_tires","description":"Search the tyre stock","parameters":schema}}])
    );
    let m = l.requests[1].body["messages"].as_array().unwrap().clone();
    assert_eq!(m.len(), 4, "{m:?}");
    assert_eq!(m[1]["content"], "do you have winter tyres");
    assert_eq!(
        m[2],
        serde_json::json!({"role":"assistant","content":null,"tool_calls":[{"id":"call_1","type":"function","function":{"name":"search_tires","arguments":args}}]})
    );
    assert_eq!(
        m[3],
        serde_json::json!({"role":"tool","tool_call_id":"call_1","content":output})
    );
    let t = tts.log.lock().unwrap();
    assert!(
        t.conns
            .iter()
            .any(|c| c.texts == vec!["Yes, we have four in stock. "])
    );
}

#[tokio::test]
async fn cascade_stt_socket_closed_mid_call_fails() {
    let stt = SttFake::start(SttVendor::Deepgram, &["hello world"], Some(300)).await;
    let llm = LlmFake::start(vec![]).await;
    let tts = TtsFake::start(fixture("vm-goodbye.wav"), false).await;
    let agent = CascadeAgent::new(&config(SttVendor::Deepgram, &stt, &llm, &tts), vec![]).unwrap();
    let (mut s, feeder) = start_call(&agent);
    let e = expect_failure(&mut s).await;
    feeder.abort();
    assert!(e.contains("deepgram") && e.contains("NET-0000"), "{e}");
}

#[tokio::test]
async fn cascade_soniox_error_mid_call_fails() {
    let stt = SttFake::start(SttVendor::Soniox, &["hello world"], Some(300)).await;
    let llm = LlmFake::start(vec![]).await;
    let tts = TtsFake::start(fixture("vm-goodbye.wav"), false).await;
    let agent = CascadeAgent::new(&config(SttVendor::Soniox, &stt, &llm, &tts), vec![]).unwrap();
    let (mut s, feeder) = start_call(&agent);
    let e = expect_failure(&mut s).await;
    feeder.abort();
    assert!(e.contains("soniox") && e.contains("503"), "{e}");
    // Soniox asks for a restart on 503: the agent reconnected (three times) before giving up.
    assert_eq!(stt.log.lock().unwrap().connections, 4);
}

/// When the local VAD hears the caller stop, Soniox is asked to finalize
/// (`{"type":"finalize","trailing_silence_ms"}`) and the `<fin>` that answers ends the turn,
/// before Soniox's own endpointing (the fake's needs 400 ms of silence; the VAD here 200).
#[tokio::test]
async fn cascade_soniox_finalize_ends_the_turn_when_the_caller_stops() {
    let stt = SttFake::start(SttVendor::Soniox, &["hello world"], None).await;
    let llm = LlmFake::start(vec![LlmReply::text("Hello.")]).await;
    let tts = TtsFake::start(fixture("vm-goodbye.wav"), false).await;
    let mut cfg = config(SttVendor::Soniox, &stt, &llm, &tts);
    cfg.vad.hang_ms = 200;
    let agent = CascadeAgent::new(&cfg, vec![]).unwrap();
    let (mut s, feeder) = start_call(&agent);
    loop {
        match next_event(&mut s).await {
            AgentEvent::ReplyDone { .. } => break,
            AgentEvent::Failed(e) => panic!("{e}"),
            _ => {}
        }
    }
    feeder.abort();
    let log = stt.log.lock().unwrap();
    assert!(log.finalized >= 1, "finalize sent");
    assert!(log.errors.is_empty(), "{:?}", log.errors);
    assert_eq!(log.turns, 1, "one turn");
    assert_eq!(
        log.turns_by_finalize, 1,
        "ended by the finalize, not by endpointing"
    );
    assert_eq!(messages(&llm, 0)[1]["content"], "hello world");
}

#[tokio::test]
async fn cascade_soniox_503_reconnects_and_carries_on() {
    let stt = SttFake::start_with(SttVendor::Soniox, &["hello world"], Some(300), Some(1)).await;
    let llm = LlmFake::start(vec![LlmReply::text("Hello.")]).await;
    let tts = TtsFake::start(fixture("vm-goodbye.wav"), false).await;
    let agent = CascadeAgent::new(&config(SttVendor::Soniox, &stt, &llm, &tts), vec![]).unwrap();
    let (mut s, feeder) = start_call(&agent);
    loop {
        match next_event(&mut s).await {
            AgentEvent::ReplyDone { .. } => break,
            AgentEvent::Failed(e) => panic!("{e}"),
            _ => {}
        }
    }
    feeder.abort();
    let log = stt.log.lock().unwrap();
    assert_eq!(log.connections, 2);
    assert!(log.errors.is_empty(), "{:?}", log.errors);
    assert_eq!(messages(&llm, 0)[1]["content"], "hello world");
}

/// The reply length goes as `max_completion_tokens` (the fake, like OpenAI for reasoning
/// models, refuses the deprecated `max_tokens` with 400), and what is not configured
/// (`temperature`) is not sent at all. The old key name `max_tokens` still reads.
#[tokio::test]
async fn llm_request_sends_max_completion_tokens_and_nothing_unset() {
    let stt = SttFake::start(SttVendor::Deepgram, &["hello world"], None).await;
    let llm = LlmFake::start(vec![LlmReply::text("Hello.")]).await;
    let tts = TtsFake::start(fixture("vm-goodbye.wav"), false).await;
    let mut cfg = config(SttVendor::Deepgram, &stt, &llm, &tts);
    let old: voicegate::agent::cascade::config::LlmConfig =
        toml::from_str("max_tokens = 150").expect("the old key is read");
    cfg.llm.max_completion_tokens = old.max_completion_tokens;
    let agent = CascadeAgent::new(&cfg, vec![]).unwrap();
    let (mut s, feeder) = start_call(&agent);
    loop {
        match next_event(&mut s).await {
            AgentEvent::ReplyDone { .. } => break,
            AgentEvent::Failed(e) => panic!("{e}"),
            _ => {}
        }
    }
    feeder.abort();
    let body = &llm.log.lock().unwrap().requests[0].body;
    assert_eq!(body["max_completion_tokens"], 150);
    assert!(body.get("max_tokens").is_none(), "{body}");
    assert!(
        body.get("temperature").is_none(),
        "unset is left out: {body}"
    );
}

#[tokio::test]
async fn cascade_tts_error_fails() {
    let stt = SttFake::start(SttVendor::ElevenLabs, &["hello world"], None).await;
    let llm = LlmFake::start(vec![LlmReply::text("Hello there. How are you?")]).await;
    let tts = TtsFake::start(fixture("vm-goodbye.wav"), true).await;
    let agent =
        CascadeAgent::new(&config(SttVendor::ElevenLabs, &stt, &llm, &tts), vec![]).unwrap();
    let (mut s, feeder) = start_call(&agent);
    let e = expect_failure(&mut s).await;
    feeder.abort();
    assert!(
        e.contains("elevenlabs_tts") && e.contains("Quota exceeded"),
        "{e}"
    );
}

async fn tts_http_mode(rate_hz: u32, want_format: &str) {
    let stt = SttFake::start(SttVendor::Deepgram, &["hello world"], None).await;
    let llm = LlmFake::start(vec![LlmReply::text("Hello there. How are you?")]).await;
    let ws_tts = TtsFake::start(fixture("vm-goodbye.wav"), false).await;
    let clip = fixture("vm-goodbye.wav");
    let http = HttpTtsFake::start(clip.clone()).await;
    let mut cfg = config(SttVendor::Deepgram, &stt, &llm, &ws_tts);
    cfg.tts.mode = voicegate::agent::cascade::config::TtsMode::Http;
    cfg.tts.url = format!("http://{}", http.addr);
    let agent = CascadeAgent::new(&cfg, vec![]).unwrap();
    let session = agent.start(CallInfo {
        tools: Vec::new(),
        variables: Default::default(),
        call_id: uuid::Uuid::new_v4(),
        rate_hz,
        caller_number: None,
        caller_name: None,
    });
    let mut s = session;
    let tx = s.input.clone();
    let feeder = tokio::spawn(async move {
        let speech = clip_at(&fixture("hello-world.wav"), rate_hz);
        let spf = rate_hz as usize / 50;
        for n in 0.. {
            let f: Vec<i16> = speech
                .chunks(spf)
                .nth(n)
                .map_or(vec![0; spf], |c| c.to_vec());
            let mut b = Vec::new();
            voicegate::audio::slin_to_le_bytes(&f, &mut b);
            if tx
                .send(AgentInput::Audio(bytes::Bytes::from(b)))
                .await
                .is_err()
            {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    });
    let mut audio = Vec::new();
    loop {
        match next_event(&mut s).await {
            AgentEvent::Audio { samples, .. } => audio.extend(samples),
            AgentEvent::ReplyDone { .. } => break,
            AgentEvent::Failed(e) => panic!("{e}"),
            _ => {}
        }
    }
    feeder.abort();
    let reqs = http.log.lock().unwrap().clone();
    assert_eq!(reqs.len(), 2, "one request per sentence");
    for (r, text) in reqs.iter().zip(["Hello there.", "How are you?"]) {
        assert_eq!(
            r.path,
            format!("/v1/text-to-speech/voice1/stream/with-timestamps?output_format={want_format}")
        );
        assert!(r.headers.contains(&("xi-api-key".into(), KEY.into())));
        assert_eq!(r.body["text"], text);
        assert_eq!(r.body["model_id"], "eleven_flash_v2_5");
    }
    // Continuity: the second sentence knows what came before it.
    assert!(reqs[0].body.get("previous_text").is_none());
    assert_eq!(reqs[1].body["previous_text"], "Hello there.");
    // Both sentences' audio, decoded once at the call rate, nothing lost or added.
    let one = clip_at(&clip, rate_hz);
    assert_eq!(audio.len(), 2 * one.len());
    let (corr, lag) = best_correlation(&audio[..one.len()], &one, 10);
    assert!(corr > 0.95 && lag == 0, "{corr} {lag}");
    assert!(ws_tts.log.lock().unwrap().conns.is_empty());
}

#[tokio::test]
async fn cascade_tts_http_mode_8khz_ulaw() {
    tts_http_mode(8_000, "ulaw_8000").await;
}

#[tokio::test]
async fn cascade_tts_http_mode_16khz_pcm() {
    tts_http_mode(16_000, "pcm_16000").await;
}

#[tokio::test]
async fn cascade_greeting_is_spoken_first_and_kept_in_history() {
    let stt = SttFake::start(SttVendor::Deepgram, &["hello world"], None).await;
    let llm = LlmFake::start(vec![LlmReply::text("Sure.")]).await;
    let tts = TtsFake::start(fixture("vm-goodbye.wav"), false).await;
    let mut cfg = config(SttVendor::Deepgram, &stt, &llm, &tts);
    // A profile's `{placeholder}`, filled from the call's variables.
    cfg.greeting = Some("Welcome to the {shop} shop.".into());
    let agent = CascadeAgent::new(&cfg, vec![]).unwrap();
    let session = agent.start(CallInfo {
        tools: Vec::new(),
        variables: [("shop".to_owned(), "tyre".to_owned())].into(),
        call_id: uuid::Uuid::new_v4(),
        rate_hz: 8_000,
        caller_number: None,
        caller_name: None,
    });
    let mut s = session;
    // Before the caller says anything, the greeting's audio arrives.
    let first = loop {
        match next_event(&mut s).await {
            AgentEvent::Audio { reply, .. } => break reply,
            AgentEvent::Failed(e) => panic!("{e}"),
            _ => {}
        }
    };
    loop {
        if let AgentEvent::ReplyDone { reply } = next_event(&mut s).await {
            assert_eq!(reply, first);
            break;
        }
    }
    s.input
        .send(AgentInput::PlayedOut { reply: first })
        .await
        .unwrap();
    assert_eq!(
        tts.log.lock().unwrap().conns[0].texts,
        vec!["Welcome to the tyre shop. "]
    );
    // Then the caller speaks; the LLM sees the greeting in the history.
    let mut s2 = s;
    let tx = s2.input.clone();
    let feeder = tokio::spawn(async move {
        let speech = fixture("hello-world.wav").samples;
        for n in 0.. {
            let f: Vec<i16> = speech
                .chunks(160)
                .nth(n)
                .map_or(vec![0; 160], |c| c.to_vec());
            let mut b = Vec::new();
            voicegate::audio::slin_to_le_bytes(&f, &mut b);
            if tx
                .send(AgentInput::Audio(bytes::Bytes::from(b)))
                .await
                .is_err()
            {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    });
    loop {
        match next_event(&mut s2).await {
            AgentEvent::Transcript {
                speaker: Speaker::Agent,
                text,
            } => assert_eq!(text, "Welcome to the tyre shop."),
            AgentEvent::ReplyDone { reply } if reply != first => break,
            AgentEvent::Failed(e) => panic!("{e}"),
            _ => {}
        }
    }
    feeder.abort();
    let m = messages(&llm, 0);
    assert_eq!(
        m[1],
        serde_json::json!({"role":"assistant","content":"Welcome to the tyre shop."})
    );
    assert_eq!(
        m[2],
        serde_json::json!({"role":"user","content":"hello world"})
    );
}

/// Waits until the LLM fake has `n` requests (5 s at most).
async fn wait_requests(llm: &LlmFake, n: usize) {
    for _ in 0..250 {
        if llm.log.lock().unwrap().requests.len() >= n {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!(
        "{n} llm requests expected: {:?}",
        llm.log.lock().unwrap().requests.len()
    );
}

#[tokio::test]
async fn cascade_keypad_digits_become_a_caller_turn() {
    let stt = SttFake::start(SttVendor::Deepgram, &["hello world"], None).await;
    let llm = LlmFake::start(vec![
        LlmReply::text("Please type your order number, then the hash key."),
        LlmReply::text("Order 4711 ships tomorrow."),
        LlmReply::text("Connecting you to sales."),
    ])
    .await;
    let tts = TtsFake::start(fixture("vm-goodbye.wav"), false).await;
    let agent = CascadeAgent::new(&config(SttVendor::Deepgram, &stt, &llm, &tts), vec![]).unwrap();
    let (s, feeder) = start_call(&agent);
    wait_requests(&llm, 1).await;

    // Digits typed together end with '#': one turn, sent at once.
    let typed = tokio::time::Instant::now();
    for d in ['4', '7', '1', '1', '#'] {
        s.input.send(AgentInput::Dtmf(d)).await.unwrap();
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
    wait_requests(&llm, 2).await;
    assert!(
        typed.elapsed() < Duration::from_millis(1_500),
        "{:?}",
        typed.elapsed()
    );
    let m = messages(&llm, 1);
    assert_eq!(
        m.last().unwrap(),
        &serde_json::json!({"role": "user", "content": "(The caller typed 4711# on the phone keypad.)"}),
        "{m:?}"
    );

    // One digit alone is sent after the 1 s gap.
    let pressed = tokio::time::Instant::now();
    s.input.send(AgentInput::Dtmf('2')).await.unwrap();
    wait_requests(&llm, 3).await;
    let waited = pressed.elapsed();
    assert!(
        waited >= Duration::from_millis(950) && waited < Duration::from_millis(2_500),
        "{waited:?}"
    );
    let m = messages(&llm, 2);
    assert_eq!(
        m.last().unwrap()["content"],
        "(The caller pressed the phone key 2.)"
    );
    // The conversation kept both keypad turns, in order, after the spoken one.
    let users: Vec<_> = m
        .iter()
        .filter(|x| x["role"] == "user")
        .map(|x| x["content"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(
        users,
        [
            "hello world",
            "(The caller typed 4711# on the phone keypad.)",
            "(The caller pressed the phone key 2.)"
        ]
    );
    feeder.abort();
}

#[tokio::test]
async fn cascade_keypad_digit_stops_the_agent_talking() {
    let stt = SttFake::start(SttVendor::Deepgram, &["hello world"], None).await;
    let llm = LlmFake::start(vec![
        LlmReply::text_held(HOURS, 6),
        LlmReply::text("Sales, one moment."),
    ])
    .await;
    let tts = TtsFake::start(fixture("invalid.wav"), false).await;
    let agent = CascadeAgent::new(&config(SttVendor::Deepgram, &stt, &llm, &tts), vec![]).unwrap();
    let (mut s, feeder) = start_call(&agent);
    // The reply's audio is flowing.
    loop {
        if let AgentEvent::Audio { .. } = next_event(&mut s).await {
            break;
        }
    }
    s.input.send(AgentInput::Dtmf('1')).await.unwrap();
    loop {
        if let AgentEvent::SpeechStarted = next_event(&mut s).await {
            break;
        }
    }
    wait_requests(&llm, 2).await;
    let l = llm.log.lock().unwrap();
    assert_eq!(
        l.cancelled,
        vec![0],
        "the talking reply's LLM stream was cancelled"
    );
    drop(l);
    assert_eq!(
        messages(&llm, 1).last().unwrap()["content"],
        "(The caller pressed the phone key 1.)"
    );
    feeder.abort();
}

// ------------------------------------------------------------------------------------
// Deepgram Flux eager end of turn
// ------------------------------------------------------------------------------------

/// One call through AudioSocket with a Flux STT (`flux-general-en`, `eager_eot_threshold`
/// as given); the caller says `speech` 200 ms in.
async fn flux_call(
    utterance: &str,
    speech: Vec<i16>,
    eager: Option<f32>,
    script: Vec<LlmReply>,
    first_token: Duration,
) -> (EchoReport, CallSummary, SttFake, LlmFake, TtsFake) {
    let stt = SttFake::start(SttVendor::Flux, &[utterance], None).await;
    let llm = LlmFake::start(script).await;
    llm.first_token_delay(first_token);
    let tts = TtsFake::start(fixture("vm-goodbye.wav"), false).await;
    let mut cfg = config(SttVendor::Flux, &stt, &llm, &tts);
    cfg.stt.model = Some("flux-general-en".into());
    cfg.stt.eager_eot_threshold = eager;
    cfg.validate().unwrap();
    let agent = CascadeAgent::new(&cfg, vec![]).unwrap();
    let mut server = TestServer::start(Arc::new(agent)).await;
    let (first_tx, _first_rx) = watch::channel(None);
    let caller = EchoCaller {
        rate: SlinRate::Hz8000,
        speech,
        speech_at_ms: 200,
        barge: None,
        echo: None,
        noise_rms: 30.0,
        duration_ms: 4_500,
    };
    let report = caller
        .run(server.addr, uuid::Uuid::new_v4(), first_tx)
        .await;
    let summary = server.next_summary().await;
    (report, summary, stt, llm, tts)
}

/// Deepgram's advice for voice agents (developers.deepgram.com
/// `docs/flux/voice-agent-eager-eot`): with `eager_eot_threshold` set, the reply's LLM
/// request starts on `EagerEndOfTurn` and `EndOfTurn` confirms it. Against the Flux fake
/// (eager after 120 ms of silence, end of turn after 400 ms) and a model that takes 600 ms
/// to its first token, the request goes out before the end of turn and the first token is
/// there that much sooner after it; without the threshold, Flux sends no eager event and
/// the request waits for the end of turn.
#[tokio::test]
async fn cascade_flux_eager_end_of_turn_starts_the_reply_earlier() {
    let mut gaps = Vec::new();
    for eager in [None, Some(0.5)] {
        let (report, summary, stt, llm, _tts) = flux_call(
            "hello world",
            fixture("hello-world.wav").samples,
            eager,
            vec![LlmReply::text("Hi there. How can I help?")],
            Duration::from_millis(600),
        )
        .await;
        assert!(
            report.first_audio_ms.is_some(),
            "the caller heard the reply"
        );
        let s = stt.log.lock().unwrap();
        let l = llm.log.lock().unwrap();
        assert!(s.errors.is_empty(), "{:?}", s.errors);
        assert_eq!(s.end_of_turn_sent.len(), 1);
        assert_eq!(l.requests.len(), 1, "one request for the turn: {eager:?}");
        assert_eq!(
            l.requests[0].body["messages"][1],
            serde_json::json!({"role":"user","content":"hello world"})
        );
        let eot = s.end_of_turn_sent[0];
        if eager.is_some() {
            assert_eq!(s.eager_sent.len(), 1, "{:?}", s.eager_sent);
            assert!(
                l.requests[0].at < eot,
                "the LLM request went out {:?} before the end of turn",
                eot - l.requests[0].at
            );
        } else {
            assert!(s.eager_sent.is_empty(), "no eager event unless asked for");
            assert!(
                l.requests[0].at >= eot,
                "the request waited for the end of turn"
            );
        }
        let t = &summary.turns[0];
        let gap = t.llm_first_token_ms.unwrap() - t.stt_final_ms.unwrap();
        eprintln!("flux eager {eager:?}: first llm token {gap} ms after the end of turn ({t:?})");
        gaps.push(gap);
    }
    // The eager event comes 280 ms before the end of turn; allow 130 ms for a busy machine.
    assert!(
        gaps[1] + 150 <= gaps[0],
        "first token after the end of turn: eager {} ms, without {} ms",
        gaps[1],
        gaps[0]
    );
}

/// The caller pauses (Flux sends `EagerEndOfTurn` for "hello world"), then goes on
/// (`TurnResumed`): the speculative request is cancelled and none of its words reach the
/// TTS or the caller; the turn is answered from the request made for the whole utterance
/// at its own `EagerEndOfTurn`, which the `EndOfTurn` confirms.
#[tokio::test]
async fn cascade_flux_turn_resumed_cancels_the_speculative_reply_unheard() {
    let mut speech = fixture("hello-world.wav").samples;
    speech.extend(std::iter::repeat_n(0i16, 800)); // 100 ms: a 280 ms pause in all
    speech.extend(fixture("auth-thankyou.wav").samples);
    let (report, summary, stt, llm, tts) = flux_call(
        "hello world | thank you",
        speech,
        Some(0.4),
        vec![
            LlmReply::text_held("Speculative words. More of them.", 1),
            LlmReply::text("Final answer."),
        ],
        Duration::ZERO,
    )
    .await;
    assert!(
        report.first_audio_ms.is_some(),
        "the caller heard the reply"
    );
    let s = stt.log.lock().unwrap();
    assert!(s.errors.is_empty(), "{:?}", s.errors);
    let eager: Vec<&str> = s.eager_sent.iter().map(|(_, t)| t.as_str()).collect();
    assert_eq!(eager, ["hello world", "hello world thank you"]);
    assert_eq!(s.resumed, 1);
    {
        let l = llm.log.lock().unwrap();
        assert_eq!(
            l.requests.len(),
            2,
            "the end of turn used the second request"
        );
        assert_eq!(
            l.cancelled,
            vec![0],
            "the speculative request was cancelled"
        );
        assert!(
            l.cancelled_at[0] < s.eager_sent[1].0,
            "cancelled on TurnResumed, not only replaced by the next eager request"
        );
    }
    let user = |i: usize| messages(&llm, i).last().unwrap()["content"].clone();
    assert_eq!(user(0), "hello world");
    assert_eq!(user(1), "hello world thank you");
    let t = tts.log.lock().unwrap();
    let said: Vec<&String> = t.conns.iter().flat_map(|c| &c.texts).collect();
    assert_eq!(
        said,
        ["Final answer. "],
        "only the confirmed reply was spoken"
    );
    assert_eq!(
        summary.transcript,
        [
            (Speaker::Caller, "hello world thank you".to_owned()),
            (Speaker::Agent, "Final answer.".to_owned()),
        ]
    );
}
