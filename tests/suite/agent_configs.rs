//! The `[agent]` section of whole config files, per agent kind: parsing, validation and
//! redaction as `voicegate check-config` sees them (config-level tests, moved out of the
//! agent modules so that no module below `config` reaches up to it).

use std::path::Path;
use voicegate::config::{AgentConfig, Config};

// --- ElevenLabs Agents ---

#[test]
fn config_parses_validates_and_redacts() {
    let text = r#"
[agent]
kind = "elevenlabs_agent"
agent_id = "agent_42"
api_key = "xi-very-secret"
language = "ru"
first_message = "Здравствуйте!"

[[tools]]
kind = "hangup"

[[tools]]
name = "search_tires"
description = "Find tyres"
url = "https://shop.example/api/tires"
headers = { Authorization = "Bearer shop-secret" }
[tools.parameters]
type = "object"
[tools.parameters.properties.size]
type = "string"
"#;
    let c = Config::from_toml(text, Path::new("x.toml")).unwrap();
    let AgentConfig::ElevenlabsAgent(e) = &c.agent else {
        panic!("{:?}", c.agent)
    };
    assert_eq!(e.agent_id, "agent_42");
    assert_eq!(e.chunk_ms, 40);
    assert_eq!(c.tools.len(), 2);
    let out = c.to_redacted_toml();
    assert!(
        !out.contains("xi-very-secret") && !out.contains("shop-secret"),
        "{out}"
    );
    assert!(
        out.contains("search_tires") && out.contains("elevenlabs_agent"),
        "{out}"
    );

    let e =
        Config::from_toml("[agent]\nkind = \"elevenlabs_agent\"\n", Path::new("x")).unwrap_err();
    assert!(e.to_string().contains("agent.agent_id"), "{e}");
    let e = Config::from_toml(
        "[agent]\nkind = \"elevenlabs_agent\"\nagent_id = \"a\"\nchunk_ms = 5\n",
        Path::new("x"),
    )
    .unwrap_err();
    assert!(e.to_string().contains("agent.chunk_ms"), "{e}");
    let e = Config::from_toml(
        "[[tools]]\nkind = \"hangup\"\nurl = \"http://x\"\n",
        Path::new("x"),
    )
    .unwrap_err();
    assert!(e.to_string().contains("tools"), "{e}");
}

// --- cascade ---

const TOML: &str = r#"
[agent]
kind = "cascade"
greeting = "Hello!"
[agent.stt]
provider = "soniox"
api_key = "k1"
languages = ["ru", "uk", "en"]
[agent.llm]
url = "https://openrouter.ai/api/v1/chat/completions"
api_key = "k2"
model = "openai/gpt-4o-mini"
temperature = 0.5
extra_headers = { "HTTP-Referer" = "https://example.com", "X-Title" = "voicegate" }
[agent.tts]
api_key = "k3"
mode = "http"
[agent.vad]
min_speech_ms = 240
"#;

#[test]
fn parses_and_validates() {
    let c = Config::from_toml(TOML, Path::new("x")).unwrap();
    let AgentConfig::Cascade(c) = c.agent else {
        panic!("not cascade")
    };
    assert_eq!(
        c.stt.provider,
        voicegate::agent::cascade::config::SttProvider::Soniox
    );
    assert_eq!(c.stt.url(), "wss://stt-rt.soniox.com/transcribe-websocket");
    assert_eq!(c.stt.model(), "stt-rt-v4");
    assert_eq!(c.llm.extra_headers["X-Title"], "voicegate");
    assert_eq!(c.tts.mode, voicegate::agent::cascade::config::TtsMode::Http);
    assert_eq!(c.vad.min_speech_ms, 240);
    assert_eq!(c.vad.hang_ms, 400);
    let out = Config::from_toml(TOML, Path::new("x"))
        .unwrap()
        .to_redacted_toml();
    assert!(!out.contains("k2"), "{out}");
}

#[test]
fn bad_values_are_named() {
    let bad = TOML.replace("min_speech_ms = 240", "onset_ratio = 0.5");
    let e = Config::from_toml(&bad, Path::new("x")).unwrap_err();
    assert!(e.to_string().contains("agent.vad.onset_ratio"), "{e}");
    let bad = TOML.replace("provider = \"soniox\"", "provider = \"whisper\"");
    let e = Config::from_toml(&bad, Path::new("x")).unwrap_err();
    assert!(e.to_string().contains("whisper"), "{e}");
    let bad = TOML.replace(
        "model = \"openai",
        "system_prompt_file = \"/nonexistent/p\"\nmodel = \"openai",
    );
    let e = Config::from_toml(&bad, Path::new("x")).unwrap_err();
    assert!(
        e.to_string().contains("agent.llm.system_prompt_file"),
        "{e}"
    );
}

#[test]
fn example_section_parses() {
    let text = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/voicegate.toml"),
    )
    .unwrap();
    let start = text
        .find("# [agent]\n# kind = \"cascade\"")
        .expect("cascade section");
    let end = text.find("# --- end cascade ---").expect("end of section");
    let toml: String = text[start..end]
        .lines()
        .filter_map(|l| l.strip_prefix("# "))
        .filter(|l| !l.starts_with('#') && !l.starts_with("---"))
        .map(|l| format!("{l}\n"))
        .collect();
    // Secrets from the environment are checked by validation; parse without it.
    let c: Config = toml::from_str(&toml).unwrap_or_else(|e| panic!("{e}\n{toml}"));
    let AgentConfig::Cascade(c) = c.agent else {
        panic!("not cascade")
    };
    assert_eq!(c.stt.languages, vec!["ru", "uk", "en"]);
    assert_eq!(c.llm.timeout_ms, 10_000);
    assert_eq!((c.llm.retries, c.llm.retry_delay_ms), (1, 250));
    assert_eq!(c.vad.min_speech_ms, 200);
    assert_eq!((c.barge_in.detect_ms, c.barge_in.confirm_ms), (60, 700));
    assert!(c.barge_in.is_backchannel("Ага."));
}
