//! The `voicegate` binary as an installer uses it: check-config, run + call, SIGTERM.
#![allow(clippy::disallowed_types)] // a test on real sockets and processes: real time (std::time::Instant)

use std::io::Write as _;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_voicegate");

fn temp_dir(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("vg-cli-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

#[test]
fn bad_config_exits_64_naming_the_key() {
    let dir = temp_dir("bad");
    let cfg = dir.join("bad.toml");
    std::fs::write(&cfg, "[audiosocket]\nlisen = \"127.0.0.1:9092\"\n").unwrap();
    let out = Command::new(BIN)
        .args(["--config", cfg.to_str().unwrap(), "check-config"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("lisen"), "{err}");

    let out = Command::new(BIN)
        .args(["--config", "/nonexistent/voicegate.toml", "run"])
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(64),
        "an explicit config that is missing is an error"
    );
}

/// A bad `[websocket]` (the chan_websocket listener) is refused like any bad key: exit 64,
/// the key named.
#[test]
fn bad_websocket_section_exits_64_naming_the_key() {
    let dir = temp_dir("bad-ws");
    for (text, key) in [
        (
            "[websocket]\nhandshake_timeout_ms = 5\n",
            "websocket.handshake_timeout_ms",
        ),
        (
            "[websocket]\nusername = \"asterisk\"\n",
            "websocket.password",
        ),
        (
            "[websocket]\nlisten = \"127.0.0.1:9092\"\n",
            "websocket.listen",
        ),
    ] {
        let cfg = dir.join("ws.toml");
        std::fs::write(&cfg, text).unwrap();
        let out = Command::new(BIN)
            .args(["--config", cfg.to_str().unwrap(), "check-config"])
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(64), "{text}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(key), "{text}: {err}");
    }
}

/// `[ari] media = "rtp"` and its keys are checked before anything starts (issue 16).
#[test]
fn bad_rtp_media_config_exits_64_naming_the_key() {
    let dir = temp_dir("rtp");
    let cfg = dir.join("rtp.toml");
    for (body, key) in [
        ("media = \"rtp\"\nformat = \"slin\"\n", "ari.format"),
        (
            "media = \"rtp\"\nrtp_ports = \"40000-30000\"\n",
            "ari.rtp_ports",
        ),
        ("media = \"rtp\"\nmode = \"lookup\"\n", "ari.media"),
        ("media = \"srtp\"\n", "media"),
        ("format = \"ulaw\"\n", "ari.format"),
    ] {
        std::fs::write(&cfg, format!("[ari]\npassword = \"pw\"\n{body}")).unwrap();
        let out = Command::new(BIN)
            .args(["--config", cfg.to_str().unwrap(), "check-config"])
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(64), "{body}: {err}");
        assert!(err.contains(key), "{body}: {err}");
    }
    std::fs::write(
        &cfg,
        "[ari]\npassword = \"pw\"\nmedia = \"rtp\"\nformat = \"alaw\"\n",
    )
    .unwrap();
    let out = Command::new(BIN)
        .args(["--config", cfg.to_str().unwrap(), "check-config"])
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// OpenAI removed the preview Realtime interface: a config that still asks for it is refused
/// before anything starts, saying what to do instead.
#[test]
fn removed_preview_realtime_api_exits_64_saying_to_use_ga() {
    let dir = temp_dir("preview");
    let cfg = dir.join("preview.toml");
    std::fs::write(
        &cfg,
        "[agent]\nkind = \"openai_realtime\"\napi_key = \"sk-x\"\napi = \"preview\"\n",
    )
    .unwrap();
    for cmd in ["check-config", "run"] {
        let out = Command::new(BIN)
            .args(["--config", cfg.to_str().unwrap(), cmd])
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(64), "{cmd}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains("agent.api") && err.contains("GA shapes"),
            "{err}"
        );
    }
}

/// ElevenLabs Scribe realtime takes at most 50 keyterms of up to 20 characters
/// (elevenlabs.io `speech-to-text/keyterm-prompting`): more is refused before anything
/// starts, naming the key and the limit, rather than sent and turned down mid-call.
#[test]
fn scribe_keyterms_over_the_vendor_limits_exit_64() {
    let dir = temp_dir("keyterms");
    let base = "[agent]\nkind = \"cascade\"\n[agent.stt]\nprovider = \"elevenlabs\"\n\
                api_key = \"k\"\n[agent.llm]\napi_key = \"k\"\n[agent.tts]\napi_key = \"k\"\n";
    let cases = [
        (
            "keyterms = [\"ElevenLabs\", \"a keyterm of 21 chars\"]".to_owned(),
            "at most 20 characters",
        ),
        (
            format!(
                "keyterms = [{}]",
                (0..51)
                    .map(|i| format!("\"t{i}\""))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
            "at most 50 keyterms, 51 given",
        ),
        ("keyterms = [\"exactly twenty chars\"]".to_owned(), ""),
    ];
    for (i, (keyterms, want)) in cases.iter().enumerate() {
        let cfg = dir.join(format!("k{i}.toml"));
        let text = base.replace(
            "api_key = \"k\"\n[agent.llm]",
            &format!("api_key = \"k\"\n{keyterms}\n[agent.llm]"),
        );
        std::fs::write(&cfg, text).unwrap();
        let out = Command::new(BIN)
            .args(["--config", cfg.to_str().unwrap(), "check-config"])
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        if want.is_empty() {
            assert_eq!(out.status.code(), Some(0), "{keyterms}: {err}");
        } else {
            assert_eq!(out.status.code(), Some(64), "{keyterms}: {err}");
            assert!(
                err.contains("agent.stt.keyterms") && err.contains(want),
                "{err}"
            );
        }
    }
}

/// `eager_eot_threshold` is Deepgram Flux's (developers.deepgram.com
/// `docs/flux/configuration`: 0.3–0.9): on another STT, or out of range, the config is
/// refused (exit 64) naming the key.
#[test]
fn flux_eager_threshold_only_for_flux_and_in_range() {
    let dir = temp_dir("eager");
    for (stt, ok) in [
        (
            "provider = \"deepgram\"\nmodel = \"flux-general-en\"\neager_eot_threshold = 0.5",
            true,
        ),
        (
            "provider = \"deepgram\"\nmodel = \"flux-general-en\"\neager_eot_threshold = 0.95",
            false,
        ),
        (
            "provider = \"deepgram\"\nmodel = \"nova-3\"\neager_eot_threshold = 0.5",
            false,
        ),
        ("provider = \"soniox\"\neager_eot_threshold = 0.5", false),
    ] {
        let cfg = dir.join("eager.toml");
        std::fs::write(
            &cfg,
            format!(
                "[agent]\nkind = \"cascade\"\n[agent.stt]\n{stt}\napi_key = \"k\"\n\
                 [agent.llm]\napi_key = \"k\"\n[agent.tts]\napi_key = \"k\"\n"
            ),
        )
        .unwrap();
        let out = Command::new(BIN)
            .args(["--config", cfg.to_str().unwrap(), "check-config"])
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        if ok {
            assert_eq!(out.status.code(), Some(0), "{stt}: {err}");
        } else {
            assert_eq!(out.status.code(), Some(64), "{stt}: {err}");
            assert!(err.contains("agent.stt.eager_eot_threshold"), "{err}");
        }
    }
}

/// `voicegate tools --format elevenlabs` prints what `POST /v1/convai/tools` accepts: one
/// `{"tool_config": {"type": "client", …}}` per configured tool (elevenlabs.io
/// docs/api-reference/tools/create).
#[test]
fn tools_for_elevenlabs_are_convai_tools_request_bodies() {
    let dir = temp_dir("tools");
    let cfg = dir.join("tools.toml");
    std::fs::write(
        &cfg,
        "[[tools]]\nname = \"search_tires\"\ndescription = \"Find tyres.\"\nurl = \"http://127.0.0.1:9/t\"\n[[tools]]\nkind = \"hangup\"\n",
    )
    .unwrap();
    let out = Command::new(BIN)
        .args([
            "--config",
            cfg.to_str().unwrap(),
            "tools",
            "--format",
            "elevenlabs",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    let bodies = v.as_array().expect("one body per tool");
    assert_eq!(bodies.len(), 2);
    for b in bodies {
        let t = &b["tool_config"];
        assert_eq!(t["type"], "client", "{b}");
        let name = t["name"].as_str().unwrap();
        assert!(
            !name.is_empty()
                && name.len() <= 64
                && name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "_-".contains(c)),
            "ElevenLabs' name pattern ^[a-zA-Z0-9_-]{{1,64}}$: {name}"
        );
        assert!((1..=120).contains(&t["response_timeout_secs"].as_u64().unwrap()));
    }
}

#[test]
fn check_config_prints_effective_config_without_secrets() {
    let dir = temp_dir("check");
    let cfg = dir.join("ok.toml");
    std::fs::write(
        &cfg,
        "[agent]\nkind = \"openai_realtime\"\napi_key = \"sk-proj-abcdef123456\"\n",
    )
    .unwrap();
    let out = Command::new(BIN)
        .args(["--config", cfg.to_str().unwrap(), "check-config"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("listen = \"127.0.0.1:9092\""), "{text}");
    assert!(text.contains("gpt-realtime"), "{text}");
    assert!(!text.contains("abcdef123456"), "{text}");
}

#[test]
fn run_answers_a_call_and_stops_on_sigterm() {
    let dir = temp_dir("run");
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let cfg = dir.join("run.toml");
    let mut f = std::fs::File::create(&cfg).unwrap();
    // Every listener on its own port (another voicegate may hold the defaults), and state
    // in the test's own directory.
    writeln!(
        f,
        "[audiosocket]\nlisten = \"127.0.0.1:{port}\"\nshutdown_grace_s = 1\n\
         [health]\nlisten = \"127.0.0.1:0\"\n[state]\ndir = \"{}\"\n\
         [agent]\nkind = \"echo\"\ndelay_ms = 300",
        dir.join("state").display()
    )
    .unwrap();
    let mut service = Command::new(BIN)
        .args(["--config", cfg.to_str().unwrap(), "run"])
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "service did not listen");
        std::thread::sleep(Duration::from_millis(20));
    }

    let heard = dir.join("heard.wav");
    let wav = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/hello-world.wav"
    );
    let out = Command::new(BIN)
        .args([
            "call",
            "--to",
            &format!("127.0.0.1:{port}"),
            "--wav",
            wav,
            "--seconds",
            "2.5",
            "--json",
        ])
        .args(["--out", heard.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(
        report["frames_received"].as_u64().unwrap() >= 100,
        "{report}"
    );
    assert!(
        report["audible_frames_received"].as_u64().unwrap() >= 20,
        "{report}"
    );
    // The first audible echo: the echo delay (300 ms) after the recording's first audible
    // frame (the call starts speaking at once), never earlier (but for the caller's 20 ms
    // frame timing, up to a frame early; measured 342–343 ms for 360), and at most 150 ms
    // later on a loaded machine.
    let said8 = voicegate::caller::resample_recording(
        &voicegate::wavfile::open(std::path::Path::new(wav)).unwrap(),
        8000,
    )
    .unwrap();
    let lead = said8
        .samples
        .chunks(160)
        .position(|f| voicegate::audio::rms(f) > voicegate::caller::AUDIBLE_RMS)
        .expect("the recording is audible") as f64
        * 20.0;
    let first = report["first_audio_ms"].as_f64().unwrap();
    let want = 300.0 + lead;
    eprintln!("measured: first echo at {first} ms, expected {want} ms");
    assert!(
        first >= want - 30.0 && first <= want + 150.0,
        "echo after {first} ms; expected {want} ms (300 ms delay + {lead} ms lead-in)"
    );

    // The WAV holds the echoed speech.
    let got = voicegate::wavfile::open(&heard).unwrap();
    let said = voicegate::wavfile::open(std::path::Path::new(wav)).unwrap();
    assert_eq!(got.rate_hz, 8000);
    // 300 ms echo delay = 2400 samples; windows may shift by up to 60 ms on a loaded box.
    let similarity =
        voicegate::caller::speech_similarity(&got.samples, &said.samples, 8000, 2400, 480);
    assert!(similarity.passes(0.9), "echo: {}", similarity.describe(0.9));

    // SIGTERM: stops accepting and exits cleanly.
    let pid = service.id().to_string();
    assert!(
        Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap()
            .success()
    );
    let status = crate::common::service::exit_within(&mut service, Duration::from_secs(10))
        .expect("service did not exit on SIGTERM");
    assert!(status.success(), "exit status {status:?}");
}
