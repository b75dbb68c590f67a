//! The `voicegate` binary as an installer uses it: check-config, run + call, SIGTERM.

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
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(s) = service.try_wait().unwrap() {
            break s;
        }
        assert!(Instant::now() < deadline, "service did not exit on SIGTERM");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(status.success(), "exit status {status:?}");
}
