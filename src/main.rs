//! The `voicegate` command: argument parsing only; the work is in the library.

#![forbid(unsafe_code)]

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;
use voicegate::audio::wav::Recording;
use voicegate::audiosocket::SlinRate;
use voicegate::config::Config;

/// Exit code for a configuration that cannot be used (sysexits.h `EX_USAGE`... `EX_CONFIG`
/// is 78, but 64 is what systemd units and the docs promise).
const EXIT_CONFIG: u8 = 64;

#[derive(Parser, Debug)]
#[command(
    name = "voicegate",
    version,
    about = "Answers Asterisk calls with a cloud voice agent"
)]
struct Cli {
    /// Config file (TOML). Without it, /etc/voicegate/voicegate.toml if present, else the
    /// built-in defaults (AudioSocket on 127.0.0.1:9092, echo agent).
    #[arg(long, global = true, env = "VOICEGATE_CONFIG")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the service: answer AudioSocket calls until SIGTERM/SIGINT.
    Run,
    /// Validate the config and print the effective config, secrets redacted.
    CheckConfig,
    /// Place a synthetic call like Asterisk does and report what came back.
    Call(CallArgs),
    /// Start the service in-process on a loopback port and place one call with a recording
    /// built into the binary; pass/fail for installers.
    Selftest(SelftestArgs),
    /// List or export the call records in the state directory's spool.
    Records(RecordsArgs),
    /// Print the configured tools ([[tools]]) as a provider declares them, as JSON (for
    /// ElevenLabs: the client tools to create on the agent).
    Tools(ToolsArgs),
    /// WireGuard keys and tunnel status, like the `wg` tool.
    #[command(subcommand)]
    Wg(WgCommand),
}

#[derive(clap::Args, Debug)]
struct RecordsArgs {
    /// `list` (one line per call) or `export` (JSON lines).
    #[arg(value_enum, default_value_t = RecordsAction::List)]
    action: RecordsAction,
    /// Spool directory; default `[records] dir`, else `<state dir>/records`.
    #[arg(long)]
    dir: Option<PathBuf>,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug)]
enum RecordsAction {
    /// One line per call: start, call id, outcome, duration, agent.
    List,
    /// One JSON object per line, every field.
    Export,
}

#[derive(clap::Args, Debug)]
struct ToolsArgs {
    /// elevenlabs (client tools), openai-realtime (session tools) or chat-completions.
    #[arg(long, default_value = "elevenlabs", value_parser = ["elevenlabs", "openai-realtime", "chat-completions"])]
    format: String,
    /// ElevenLabs: seconds the agent waits for each tool result.
    #[arg(long, default_value_t = 20)]
    response_timeout_secs: u32,
}

#[derive(Subcommand, Debug)]
enum WgCommand {
    /// Print a new private key (base64), like `wg genkey`.
    Genkey,
    /// Read a private key on stdin, print its public key, like `wg pubkey`.
    Pubkey,
    /// Show the running service's tunnel: peers, latest handshakes, transfer (`wg show`).
    Show {
        /// The service's health listener, HOST:PORT. Default: `[health] listen` of the
        /// config (`--config`, `VOICEGATE_CONFIG`, else /etc/voicegate/voicegate.toml),
        /// else 127.0.0.1:9100.
        #[arg(long)]
        health: Option<String>,
        /// Print the JSON as served instead of wg-style text.
        #[arg(long)]
        json: bool,
    },
}

#[derive(clap::Args, Debug)]
struct CallArgs {
    /// AudioSocket server to call, HOST:PORT.
    #[arg(long, default_value = "127.0.0.1:9092")]
    to: SocketAddr,
    /// What the caller says: a mono 16-bit WAV (8 or 16 kHz; other rates are resampled).
    /// Without it, the built-in recording.
    #[arg(long)]
    wav: Option<PathBuf>,
    /// Call sample rate, Hz: 8000 (kind 0x10, like AudioSocket()) or 16000 (0x12, slin16).
    #[arg(long, default_value_t = 8000)]
    rate: u32,
    /// DTMF to send, DIGIT@SECONDS (repeatable), e.g. --dtmf 1@2.5s.
    #[arg(long, value_parser = voicegate::caller::parse_dtmf)]
    dtmf: Vec<(char, Duration)>,
    /// Call length in seconds, from the call id until the caller hangs up.
    #[arg(long, default_value_t = 8.0)]
    seconds: f64,
    /// Write everything received to this WAV.
    #[arg(long)]
    out: Option<PathBuf>,
    /// Print the summary as JSON.
    #[arg(long)]
    json: bool,
}

#[derive(clap::Args, Debug)]
struct SelftestArgs {
    /// Print the summary as JSON.
    #[arg(long)]
    json: bool,
    /// Call length in seconds.
    #[arg(long, default_value_t = 6.0)]
    seconds: f64,
}

/// Counts live heap bytes for `/metrics` (`voicegate::health::heap`).
#[global_allocator]
static ALLOCATOR: voicegate::health::heap::CountingAllocator =
    voicegate::health::heap::CountingAllocator;

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Command::Wg(wg) = &cli.command {
        // Key tools need no config, like `wg`; `show` reads only the health listener's
        // address from it.
        let health = match wg {
            WgCommand::Show {
                health: Some(h), ..
            } => h.clone(),
            WgCommand::Show { health: None, .. } => match Config::load(cli.config.as_deref()) {
                Ok(c) => health_client_addr(c.health.listen),
                Err(e) => {
                    eprintln!("voicegate: {e}");
                    return ExitCode::from(EXIT_CONFIG);
                }
            },
            WgCommand::Genkey | WgCommand::Pubkey => String::new(),
        };
        return match wg_command(wg, &health) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("voicegate wg: {e:#}");
                ExitCode::FAILURE
            }
        };
    }
    let config = match Config::load(cli.config.as_deref()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("voicegate: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    match cli.command {
        Command::CheckConfig => {
            print!("{}", config.to_redacted_toml());
            return ExitCode::SUCCESS;
        }
        Command::Records(args) => return records(&config, args),
        Command::Tools(ref args) => return print_tools(&config, args),
        Command::Run | Command::Selftest(_) | Command::Call(_) | Command::Wg(_) => {}
    }
    voicegate::tls::install_crypto_provider();
    init_tracing(&config, matches!(cli.command, Command::Run));
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("voicegate: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async move {
        match cli.command {
            Command::Run => voicegate::app::run(config, cli.config.clone())
                .await
                .map(|()| true),
            Command::Call(args) => call(args).await,
            Command::Selftest(args) => selftest(config, args).await,
            Command::CheckConfig | Command::Records(_) | Command::Tools(_) | Command::Wg(_) => {
                Ok(true)
            }
        }
    });
    match result {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("voicegate: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn records(config: &Config, args: RecordsArgs) -> ExitCode {
    use std::io::Write as _;
    let dir = args
        .dir
        .unwrap_or_else(|| config.records.spool_dir(&config.state.dir()));
    let (records, torn) = match voicegate::records::spool::read_dir(&dir) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("voicegate: {e}");
            return ExitCode::FAILURE;
        }
    };
    let mut out = std::io::stdout().lock();
    for r in &records {
        let line = match args.action {
            RecordsAction::Export => serde_json::to_string(r).unwrap_or_default(),
            RecordsAction::List => format!(
                "{}  {}  {:<14} {:>7.1} s  {}{}",
                r.started_unix_ms,
                r.call_id,
                r.outcome,
                r.duration_ms as f64 / 1000.0,
                r.agent,
                r.detail
                    .as_deref()
                    .map(|d| format!("  ({d})"))
                    .unwrap_or_default()
            ),
        };
        if writeln!(out, "{line}").is_err() {
            return ExitCode::FAILURE;
        }
    }
    if torn > 0 {
        eprintln!("voicegate: skipped {torn} bytes of a torn record (a crash mid-write)");
    }
    ExitCode::SUCCESS
}

fn init_tracing(config: &Config, service: bool) {
    use tracing_subscriber::EnvFilter;
    let default = if service {
        config.log.level.as_str()
    } else {
        "warn"
    };
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default));
    // No colour codes into journald or files.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi)
        .with_writer(std::io::stderr);
    match config.log.format {
        voicegate::config::LogFormat::Json => builder.json().init(),
        voicegate::config::LogFormat::Text => builder.init(),
    }
}

fn load_speech(path: Option<&std::path::Path>) -> anyhow::Result<Recording> {
    match path {
        Some(p) => voicegate::wavfile::open(p).with_context(|| format!("reading {}", p.display())),
        None => Ok(voicegate::selftest::builtin_recording()),
    }
}

async fn call(args: CallArgs) -> anyhow::Result<bool> {
    let rate = SlinRate::from_hz(args.rate)
        .with_context(|| format!("--rate {}: AudioSocket has no kind for it", args.rate))?;
    let plan = voicegate::caller::CallPlan {
        call_id: uuid::Uuid::new_v4(),
        rate,
        speech: load_speech(args.wav.as_deref())?,
        speech_offset: Duration::ZERO,
        dtmf: args.dtmf,
        duration: Duration::from_secs_f64(args.seconds),
    };
    let report = voicegate::caller::place_call(args.to, &plan).await?;
    if let Some(out) = &args.out {
        voicegate::wavfile::save(&report.received, out)
            .with_context(|| format!("writing {}", out.display()))?;
    }
    print_report(&report, args.json, None);
    Ok(true)
}

async fn selftest(config: Config, args: SelftestArgs) -> anyhow::Result<bool> {
    let outcome = voicegate::selftest::run(&config, Duration::from_secs_f64(args.seconds)).await?;
    print_report(&outcome.report, args.json, Some(&outcome));
    Ok(outcome.passed)
}

fn print_report(
    r: &voicegate::caller::CallReport,
    json: bool,
    selftest: Option<&voicegate::selftest::SelftestOutcome>,
) {
    if json {
        let mut v = serde_json::to_value(r).unwrap_or_default();
        if let Some(s) = selftest {
            v["selftest"] = serde_json::to_value(s).unwrap_or_default();
        }
        println!("{v}");
        return;
    }
    println!(
        "call {}  {} Hz  {:.0} ms",
        r.call_id, r.rate_hz, r.duration_ms
    );
    println!(
        "  frames sent {}  received {} (audible {})",
        r.frames_sent, r.frames_received, r.audible_frames_received
    );
    match r.first_audio_ms {
        Some(ms) => println!("  first audio back after {ms:.0} ms"),
        None => println!("  no audible audio came back"),
    }
    println!(
        "  pacing: gap p50 {:.2} ms  p99 {:.2} ms  max {:.2} ms  underruns {}  short frames {}",
        r.gap_p50_ms, r.gap_p99_ms, r.gap_max_ms, r.underruns, r.short_frames
    );
    println!(
        "  ended: {}",
        if r.hangup_received {
            "far end sent hangup (0x00)"
        } else if r.closed_by_peer {
            "far end closed"
        } else {
            "caller hung up"
        }
    );
    if let Some(s) = selftest {
        println!(
            "  agent: {}  echo similarity: {}",
            s.agent,
            s.correlation.map_or("n/a".into(), |c| format!("{c:.2}"))
        );
        for check in &s.checks {
            println!(
                "  [{}] {}",
                if check.ok { "ok" } else { "FAIL" },
                check.what
            );
        }
        println!("selftest {}", if s.passed { "PASSED" } else { "FAILED" });
    }
}

fn print_tools(config: &Config, args: &ToolsArgs) -> ExitCode {
    let registry = match voicegate::tools::ToolRegistry::from_config(&config.tools) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("voicegate: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    let specs = registry.specs();
    let json = match args.format.as_str() {
        "openai-realtime" => {
            serde_json::Value::Array(voicegate::agent::openai_realtime::tool_declarations(&specs))
        }
        "chat-completions" => voicegate::agent::cascade::llm::tool_declarations(&specs),
        _ => voicegate::agent::elevenlabs_agent::client_tools(&specs, args.response_timeout_secs),
    };
    // A serde_json::Value always serializes.
    println!(
        "{}",
        serde_json::to_string_pretty(&json).unwrap_or_default()
    );
    ExitCode::SUCCESS
}

/// Where a client on this box reaches a listener bound to `listen`: a wildcard address
/// (`0.0.0.0`, `::`) is reached on loopback.
fn health_client_addr(listen: SocketAddr) -> String {
    let ip = match listen.ip() {
        std::net::IpAddr::V4(a) if a.is_unspecified() => std::net::Ipv4Addr::LOCALHOST.into(),
        std::net::IpAddr::V6(a) if a.is_unspecified() => std::net::Ipv6Addr::LOCALHOST.into(),
        ip => ip,
    };
    SocketAddr::new(ip, listen.port()).to_string()
}

/// `voicegate wg …`; `health` is the health listener `show` asks.
fn wg_command(cmd: &WgCommand, health: &str) -> anyhow::Result<()> {
    use std::io::Read as _;
    use voicegate::tunnel::keys;
    match cmd {
        WgCommand::Genkey => {
            println!("{}", keys::generate_private_key()?.expose());
        }
        WgCommand::Pubkey => {
            let mut text = String::new();
            std::io::stdin()
                .take(1024)
                .read_to_string(&mut text)
                .context("reading the private key from stdin")?;
            println!("{}", keys::public_key_of(&text)?);
        }
        WgCommand::Show { json, .. } => {
            voicegate::tls::install_crypto_provider();
            let url = format!("http://{health}/v1/wireguard");
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .context("starting the runtime")?;
            let body = runtime.block_on(async {
                let client = voicegate::tls::http_client_builder()
                    .timeout(Duration::from_secs(5))
                    .build()
                    .context("building the HTTP client")?;
                let response = client
                    .get(&url)
                    .send()
                    .await
                    .with_context(|| format!("GET {url} (is the service running?)"))?;
                let status = response.status();
                let body = response.text().await.context("reading the response")?;
                anyhow::ensure!(status.is_success(), "GET {url}: {status}: {body}");
                anyhow::Ok(body)
            })?;
            if *json {
                println!("{body}");
            } else {
                let stats: voicegate::tunnel::TunnelStats = serde_json::from_str(&body)
                    .with_context(|| format!("{url} did not return tunnel stats"))?;
                print!("{}", voicegate::tunnel::render_wg_show(&stats));
            }
        }
    }
    Ok(())
}
