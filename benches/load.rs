//! Load bench: N concurrent synthetic callers against one `voicegate run` child process.
//!
//! ```text
//! cargo bench --bench load -- [--agent echo|openai] [--transport audiosocket|websocket|rtp|all] [--calls N] [--seconds S] [--ramp 50,100,200,400] [--soak MIN] [--console]
//! ```
//!
//! `--transport websocket` (echo agent) runs every level twice in one run, first over
//! AudioSocket, then with callers that speak Asterisk's WebSocket media channel
//! (`chan_websocket`) to voicegate's `[websocket]` listener, so the two rows compare.
//!
//! `--transport rtp` runs every level twice in one run: Stasis calls with
//! `[ari] media = "rtp"` (A-law, lines `rtp`), then the same over AudioSocket. The RTP calls
//! run against the fake ARI of `tests/fake_ari/` playing Asterisk's chan_rtp side (its own
//! UDP port per call, RTP both ways): the same echo agent, CPU and RSS measured the same
//! way, pacing as the fake Asterisk receives voicegate's packets.
//!
//! `--transport all` runs every level three times in one run: AudioSocket, the WebSocket
//! media channel, RTP.
//!
//! `--console` (echo path) runs every level twice in the same run: the console off, then on
//! with 5 logged-in watchers reading its live feed (`/console/api/events`, Server-Sent
//! Events, reconnecting as a browser does); the rows are labelled `off` and `on/5`, with the
//! feed lines the watchers got and the lines dropped for them.
//!
//! Each caller speaks a real recording in a loop, paced at 20 ms, through the real AudioSocket
//! listener; voicegate answers with the echo agent. Reported per N: voicegate's CPU time per
//! call-second (from `/proc/<pid>/stat`, so the load generator's own CPU does not count), RSS
//! and RSS per call, the pacing the callers saw (p50/p99/max inter-frame gap over all calls),
//! late frames (gaps > 30 ms) and missing frames. Numbers are printed, never asserted.
//!
//! `--agent openai` runs path (b): voicegate with `kind = "openai_realtime"` against a fake
//! OpenAI Realtime server inside this process (real wire format: `session.created`,
//! `session.updated`, appends consumed, replies as bursts of `response.output_audio.delta`
//! μ-law, barge-ins with `input_audio_buffer.speech_started`). The callers and the fake
//! stamp their audio in band, so one clock times each direction: frame written → append
//! received (up), delta sent → frame received (down; `dn+` is the part beyond the first
//! 20 ms tick that could have carried it), and speech_started → first frame without reply
//! audio (barge). The load average at the start of each level is printed next to it.
#![allow(clippy::disallowed_types)] // a benchmark on real sockets and processes: real time (std::time::Instant)

use std::io::Write as _;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use voicegate::audio::wav::Recording;
use voicegate::audiosocket::SlinRate;
use voicegate::caller::{CallPlan, CallReport, place_call};

#[path = "../tests/fake_ari/mod.rs"]
mod fake_ari;
#[path = "../tests/support/mod.rs"]
mod support;

struct Args {
    calls: Vec<usize>,
    seconds: f64,
    soak_minutes: Option<f64>,
    /// `--agent openai`: path (b), the fake OpenAI Realtime server; default echo.
    realtime: bool,
    /// `--console`: each level with the console off, then on with 5 watchers.
    console: bool,
    /// The transports each level runs over, in order (`--transport websocket`: AudioSocket,
    /// then the WebSocket media channel).
    transports: Vec<Transport>,
}

/// How the bench's callers reach voicegate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Transport {
    AudioSocket,
    WebSocket,
    /// Stasis + externalMedia over RTP, against the fake ARI.
    Rtp,
}

impl Transport {
    fn label(self) -> &'static str {
        match self {
            Transport::AudioSocket => "audiosocket",
            Transport::WebSocket => "websocket",
            Transport::Rtp => "rtp",
        }
    }
}

fn parse_args() -> Args {
    let mut args = Args {
        calls: vec![100],
        seconds: 20.0,
        soak_minutes: None,
        realtime: false,
        console: false,
        transports: vec![Transport::AudioSocket],
    };
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        match a.as_str() {
            "--calls" => {
                args.calls = vec![it.next().and_then(|v| v.parse().ok()).expect("--calls N")]
            }
            "--ramp" => {
                args.calls = it
                    .next()
                    .expect("--ramp N,N,...")
                    .split(',')
                    .map(|v| v.parse().expect("number"))
                    .collect()
            }
            "--seconds" => {
                args.seconds = it.next().and_then(|v| v.parse().ok()).expect("--seconds S")
            }
            "--soak" => args.soak_minutes = it.next().and_then(|v| v.parse().ok()),
            "--agent" => args.realtime = it.next().as_deref() == Some("openai"),
            "--console" => args.console = true,
            "--transport" => {
                args.transports = match it.next().as_deref() {
                    Some("websocket") => vec![Transport::AudioSocket, Transport::WebSocket],
                    Some("rtp") => vec![Transport::Rtp, Transport::AudioSocket],
                    Some("audiosocket") => vec![Transport::AudioSocket],
                    Some("all") => {
                        vec![Transport::AudioSocket, Transport::WebSocket, Transport::Rtp]
                    }
                    other => panic!("--transport audiosocket|websocket|rtp|all, not {other:?}"),
                }
            }
            "--bench" => {}
            other => eprintln!("ignoring argument {other}"),
        }
    }
    args
}

fn voicegate_binary() -> PathBuf {
    // cargo bench builds the binary next to the bench's own deps directory.
    let exe = std::env::current_exe().expect("current exe");
    let dir = exe
        .parent()
        .and_then(|p| p.parent())
        .expect("target profile dir");
    let bin = dir.join("voicegate");
    assert!(
        bin.exists(),
        "{} missing: run `cargo build --release` first",
        bin.display()
    );
    bin
}

/// When call `i` of `calls` starts: spread over `over`, in whole 20 ms frames, plus a phase
/// spread evenly across the 20 ms frame, so the calls' frame grids are out of step as real
/// calls answered at random moments are. (Starting call `i` at `i × over / calls` alone would
/// put every call on one or two phases when that step is a multiple of 10 ms, and the bench
/// would measure the queue of 50 frames arriving in the same instant.)
fn start_offset(i: usize, calls: usize, over: Duration) -> Duration {
    let frame_us = 20_000u64;
    let (i, calls) = (i as u64, calls.max(1) as u64);
    let base = (i * over.as_micros() as u64 / calls) / frame_us * frame_us;
    let phase = i * frame_us / calls;
    Duration::from_micros(base + phase)
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

struct Service {
    child: Child,
    addr: SocketAddr,
    /// The `[websocket]` listener (chan_websocket callers).
    ws: SocketAddr,
    health: SocketAddr,
}

impl Service {
    fn start() -> Self {
        Self::start_with("[agent]\nkind = \"echo\"\ndelay_ms = 200\n")
    }

    /// Starts voicegate with `agent` as its `[agent]` section (and call limits high enough
    /// for the bench).
    fn start_with(agent: &str) -> Self {
        let port = free_port();
        let health_port = free_port();
        let ws_port = free_port();
        let dir = std::env::temp_dir().join(format!("vg-bench-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let cfg = dir.join("voicegate.toml");
        std::fs::write(
            &cfg,
            format!("[audiosocket]\nlisten = \"127.0.0.1:{port}\"\n[health]\nlisten = \"127.0.0.1:{health_port}\"\n[state]\ndir = \"{}\"\n[log]\nlevel = \"warn\"\n[guard]\nmax_calls = 5000\nmax_calls_per_source = 5000\nmax_handshakes = 5000\nmax_handshakes_per_source = 5000\n[websocket]\nlisten = \"127.0.0.1:{ws_port}\"\n{agent}", dir.join("state").display()),
        )
        .unwrap();
        let child = Command::new(voicegate_binary())
            .args(["--config", cfg.to_str().unwrap(), "run"])
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn voicegate");
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        for _ in 0..100 {
            if std::net::TcpStream::connect(addr).is_ok() {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let health = format!("127.0.0.1:{health_port}").parse().unwrap();
        Service {
            child,
            addr,
            ws: format!("127.0.0.1:{ws_port}").parse().unwrap(),
            health,
        }
    }

    /// utime + stime of the child, in seconds.
    fn cpu_seconds(&self) -> f64 {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.child.id())).unwrap();
        // Fields after the command name (which is in parentheses and may contain spaces).
        let rest = &stat[stat.rfind(')').unwrap() + 2..];
        let f: Vec<&str> = rest.split_whitespace().collect();
        let ticks: f64 = f[11].parse::<f64>().unwrap() + f[12].parse::<f64>().unwrap();
        ticks / CLOCK_TICKS_PER_SECOND
    }

    fn rss_kib(&self) -> u64 {
        proc_status_kib(self.child.id(), "VmRSS:")
    }

    /// `voicegate_heap_allocated_bytes` from `/metrics` (live heap, MiB), or NaN.
    async fn heap_mib(&self, http: &reqwest::Client) -> f64 {
        let url = format!("http://{}/metrics", self.health);
        let text = match http.get(url).send().await {
            Ok(r) => r.text().await.unwrap_or_default(),
            Err(_) => return f64::NAN,
        };
        text.lines()
            .find_map(|l| l.strip_prefix("voicegate_heap_allocated_bytes "))
            .and_then(|v| v.trim().parse::<f64>().ok())
            .map_or(f64::NAN, |b| b / (1024.0 * 1024.0))
    }

    fn open_fds(&self) -> usize {
        std::fs::read_dir(format!("/proc/{}/fd", self.child.id()))
            .map(|d| d.count())
            .unwrap_or(0)
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn proc_status_kib(pid: u32, key: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with(key))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// `/proc/<pid>/stat` counts CPU in USER_HZ ticks, 100 per second on every Linux
/// architecture voicegate ships for (x86_64, aarch64, armv7).
const CLOCK_TICKS_PER_SECOND: f64 = 100.0;

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

fn speech() -> Recording {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/invalid.wav");
    voicegate::wavfile::open(&path).expect("fixture")
}

struct RunResult {
    transport: Transport,
    calls: usize,
    cpu_ms_per_call_second: f64,
    cpu_cores: f64,
    rss_mib: f64,
    rss_kib_per_call: f64,
    p50: f64,
    p99: f64,
    max: f64,
    late: u64,
    missing: i64,
    failed: usize,
}

/// The console's password in the bench.
const CONSOLE_PASSWORD: &str = "bench console password";

/// One console watcher: logs in, then reads the live feed until `stop`, reconnecting when
/// a stream ends (as `EventSource` does); counts the `data:` lines it got.
async fn watch_console(
    health: SocketAddr,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    lines: std::sync::Arc<std::sync::atomic::AtomicU64>,
) {
    use std::sync::atomic::Ordering;
    let http = voicegate::tls::http_client_builder().build().unwrap();
    let login = http
        .post(format!("http://{health}/console/login"))
        .header("content-type", "application/json")
        .body(format!("{{\"password\":\"{CONSOLE_PASSWORD}\"}}"))
        .send()
        .await
        .expect("console login");
    let cookie = login
        .headers()
        .get("set-cookie")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .expect("a session cookie")
        .to_owned();
    while !stop.load(Ordering::Relaxed) {
        let Ok(mut resp) = http
            .get(format!("http://{health}/console/api/events"))
            .header("cookie", &cookie)
            .send()
            .await
        else {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        while let Ok(Some(chunk)) = resp.chunk().await {
            let n = chunk.windows(5).filter(|w| w == b"data:").count();
            lines.fetch_add(n as u64, Ordering::Relaxed);
            if stop.load(Ordering::Relaxed) {
                break;
            }
        }
    }
}

/// `voicegate_console_events_dropped_total` from `/metrics` (0 when absent).
async fn console_dropped(health: SocketAddr) -> u64 {
    let http = voicegate::tls::http_client_builder().build().unwrap();
    let text = match http.get(format!("http://{health}/metrics")).send().await {
        Ok(r) => r.text().await.unwrap_or_default(),
        Err(_) => return 0,
    };
    text.lines()
        .find_map(|l| l.strip_prefix("voicegate_console_events_dropped_total "))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .map_or(0, |v| v as u64)
}

/// Feed lines the watchers got and lines dropped, of the last level.
static CONSOLE_FEED: std::sync::Mutex<(u64, u64)> = std::sync::Mutex::new((0, 0));

fn run_level(
    rt: &tokio::runtime::Runtime,
    calls: usize,
    seconds: f64,
    watchers: usize,
    transport: Transport,
) -> RunResult {
    let service = if watchers == 0 {
        Service::start()
    } else {
        let hash = voicegate::console::auth::PasswordHash::hash(CONSOLE_PASSWORD).unwrap();
        Service::start_with(&format!(
            "[agent]\nkind = \"echo\"\ndelay_ms = 200\n[console]\nenabled = true\npassword_hash = \"{hash}\"\n"
        ))
    };
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let lines = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let watching: Vec<_> = (0..watchers)
        .map(|_| rt.spawn(watch_console(service.health, stop.clone(), lines.clone())))
        .collect();
    let idle_rss = service.rss_kib();
    let speech = speech();
    let duration = Duration::from_secs_f64(seconds);
    // Stagger starts over one second, with the calls' 20 ms grids spread like real traffic.
    let reports: Vec<Result<ws_caller::WsReport, String>> = rt.block_on(async {
        let mut tasks = Vec::with_capacity(calls);
        let addr = service.addr;
        let ws = service.ws;
        let speech8k = voicegate::caller::resample_recording(&speech, 8000).expect("resample");
        for i in 0..calls {
            if transport == Transport::WebSocket {
                let stagger = start_offset(i, calls, Duration::from_secs(1));
                let speech = speech8k.clone();
                tasks.push(tokio::spawn(async move {
                    tokio::time::sleep(stagger).await;
                    ws_caller::place(ws, &speech, duration).await
                }));
                continue;
            }
            let plan = CallPlan {
                call_id: uuid::Uuid::new_v4(),
                rate: SlinRate::Hz8000,
                speech: speech.clone(),
                speech_offset: Duration::ZERO,
                dtmf: Vec::new(),
                duration,
            };
            let stagger = start_offset(i, calls, Duration::from_secs(1));
            tasks.push(tokio::spawn(async move {
                tokio::time::sleep(stagger).await;
                place_call(addr, &plan)
                    .await
                    .map(ws_caller::WsReport::from)
                    .map_err(|e| e.to_string())
            }));
        }
        // Measure CPU over the middle of the run, when every call is up.
        tokio::time::sleep(Duration::from_secs_f64(1.5)).await;
        let cpu0 = service.cpu_seconds();
        let t0 = Instant::now();
        let window = (seconds - 3.0).max(1.0);
        tokio::time::sleep(Duration::from_secs_f64(window)).await;
        let cpu1 = service.cpu_seconds();
        let wall = t0.elapsed().as_secs_f64();
        let rss = service.rss_kib();
        CPU.with(|c| c.set((cpu1 - cpu0, wall, rss)));
        let mut out = Vec::with_capacity(calls);
        for t in tasks {
            out.push(t.await.map_err(|e| e.to_string()).and_then(|r| r));
        }
        out
    });
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    rt.block_on(async {
        for w in watching {
            let _ = tokio::time::timeout(Duration::from_secs(10), w).await;
        }
        let dropped = if watchers > 0 {
            console_dropped(service.health).await
        } else {
            0
        };
        *CONSOLE_FEED.lock().unwrap() = (lines.load(std::sync::atomic::Ordering::Relaxed), dropped);
    });
    let (cpu, wall, rss) = CPU.with(|c| c.get());
    let mut gaps = Vec::new();
    let mut late = 0;
    let mut missing = 0i64;
    let mut failed = 0;
    for r in &reports {
        match r {
            Ok(rep) => {
                // Skip the first second: the call's start is not steady state.
                let steady: Vec<f64> = rep
                    .arrivals_ms
                    .iter()
                    .copied()
                    .filter(|&t| t > 1000.0)
                    .collect();
                gaps.extend(steady.windows(2).map(|w| w[1] - w[0]));
                late += rep.underruns;
                missing += rep.frames_sent as i64 - rep.frames_received as i64 - 1;
            }
            Err(e) => {
                failed += 1;
                if failed <= 3 {
                    eprintln!("call failed: {e}");
                }
            }
        }
    }
    gaps.sort_by(f64::total_cmp);
    let ok = calls - failed;
    RunResult {
        transport,
        calls,
        cpu_ms_per_call_second: cpu * 1000.0 / (wall * ok.max(1) as f64),
        cpu_cores: cpu / wall,
        rss_mib: rss as f64 / 1024.0,
        rss_kib_per_call: (rss.saturating_sub(idle_rss)) as f64 / ok.max(1) as f64,
        p50: percentile(&gaps, 0.5),
        p99: percentile(&gaps, 0.99),
        max: gaps.last().copied().unwrap_or(0.0),
        late,
        missing: missing.max(0),
        failed,
    }
}

/// One level over externalMedia RTP: `calls` Stasis callers at the fake ARI, each bridged
/// to voicegate over RTP (A-law), echoed for `seconds`, then hung up.
fn run_level_rtp(rt: &tokio::runtime::Runtime, calls: usize, seconds: f64) -> RunResult {
    let samples = speech().samples;
    let fake = rt.block_on(fake_ari::FakeAri::start(samples, SlinRate::Hz8000));
    let lo = free_port().clamp(1024, 60_000);
    let ari = format!(
        "[ari]\nurl = \"{}\"\nusername = \"{}\"\npassword = \"{}\"\nmode = \"stasis\"\n\
         media = \"rtp\"\nformat = \"alaw\"\nrtp_ports = \"{lo}-{}\"\n",
        fake.url(),
        fake_ari::USER,
        fake_ari::PASS,
        lo + calls as u16 + 50
    );
    let service = Service::start_with(&format!("[agent]\nkind = \"echo\"\ndelay_ms = 200\n{ari}"));
    let idle_rss = service.rss_kib();
    let duration = Duration::from_secs_f64(seconds);
    rt.block_on(fake.wait_ws());
    rt.block_on(async {
        let t_start = Instant::now();
        let mut live = Vec::with_capacity(calls);
        for i in 0..calls {
            let stagger = start_offset(i, calls, Duration::from_secs(1));
            tokio::time::sleep(stagger.saturating_sub(t_start.elapsed())).await;
            live.push(fake.new_caller(&format!("+1555{i:07}"), "bench"));
        }
        tokio::time::sleep(Duration::from_secs_f64(1.5)).await;
        let cpu0 = service.cpu_seconds();
        let t0 = Instant::now();
        let window = (seconds - 3.0).max(1.0);
        tokio::time::sleep(Duration::from_secs_f64(window)).await;
        let cpu1 = service.cpu_seconds();
        let wall = t0.elapsed().as_secs_f64();
        CPU.with(|c| c.set((cpu1 - cpu0, wall, service.rss_kib())));
        tokio::time::sleep(duration.saturating_sub(t_start.elapsed())).await;
        for ch in &live {
            fake.caller_hangs_up(ch);
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    });
    let (cpu, wall, rss) = CPU.with(|c| c.get());
    let reports = fake.media_reports();
    let mut gaps = Vec::new();
    let mut failed = calls.saturating_sub(reports.len());
    for r in &reports {
        if r.frames_received < 50 {
            failed += 1;
            continue;
        }
        // Skip the first second: the call's start is not steady state.
        gaps.extend(r.gaps_ms.iter().skip(50).copied());
    }
    gaps.sort_by(f64::total_cmp);
    let late = gaps.iter().filter(|&&g| g > 30.0).count() as u64;
    let ok = calls - failed.min(calls);
    RunResult {
        transport: Transport::Rtp,
        calls,
        cpu_ms_per_call_second: cpu * 1000.0 / (wall * ok.max(1) as f64),
        cpu_cores: cpu / wall,
        rss_mib: rss as f64 / 1024.0,
        rss_kib_per_call: (rss.saturating_sub(idle_rss)) as f64 / ok.max(1) as f64,
        p50: percentile(&gaps, 0.5),
        p99: percentile(&gaps, 0.99),
        max: gaps.last().copied().unwrap_or(0.0),
        late,
        // Not counted over RTP: a missing packet shows as a gap of 40 ms or more (`late`).
        missing: 0,
        failed,
    }
}

thread_local! {
    static CPU: std::cell::Cell<(f64, f64, u64)> = const { std::cell::Cell::new((0.0, 0.0, 0)) };
}

fn soak(rt: &tokio::runtime::Runtime, calls: usize, minutes: f64, realtime: bool) {
    // The fake (path b) lives on the bench's runtime for the whole soak.
    let fake_url = realtime.then(|| rt.block_on(realtime::start(Instant::now())).url);
    let service = match &fake_url {
        Some(url) => Service::start_with(&format!(
            "[agent]\nkind = \"openai_realtime\"\nurl = \"{url}\"\napi_key = \"sk-bench-not-a-key\"\n"
        )),
        None => Service::start(),
    };
    let speech = speech();
    let total = Duration::from_secs_f64(minutes * 60.0);
    println!(
        "soak: {calls} calls for {minutes} min (calls last 60 s and are replaced), agent {}, loadavg {}",
        if realtime {
            "openai_realtime (fake)"
        } else {
            "echo"
        },
        loadavg()
    );
    println!(
        "{:>6} {:>10} {:>10} {:>8} {:>10}",
        "min", "rss_mib", "heap_mib", "fds", "cpu_cores"
    );
    rt.block_on(async {
        let addr = service.addr;
        let start = Instant::now();
        let mut tasks = Vec::new();
        for i in 0..calls {
            let speech = speech.clone();
            tasks.push(tokio::spawn(async move {
                tokio::time::sleep(start_offset(i, calls, Duration::from_secs(60))).await;
                while start.elapsed() < total {
                    let plan = CallPlan {
                        call_id: uuid::Uuid::new_v4(),
                        rate: SlinRate::Hz8000,
                        speech: speech.clone(),
                        speech_offset: Duration::ZERO,
                        dtmf: Vec::new(),
                        duration: Duration::from_secs(60)
                            .min(total.saturating_sub(start.elapsed())),
                    };
                    if place_call(addr, &plan).await.is_err() {
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                }
            }));
        }
        let mut last_cpu = (service.cpu_seconds(), Instant::now());
        let mut minute = 0.0;
        let http = voicegate::tls::http_client_builder()
            .build()
            .expect("http client");
        while start.elapsed() < total {
            tokio::time::sleep(Duration::from_secs(30)).await;
            minute += 0.5;
            let heap = service.heap_mib(&http).await;
            let cpu = service.cpu_seconds();
            let cores = (cpu - last_cpu.0) / last_cpu.1.elapsed().as_secs_f64();
            last_cpu = (cpu, Instant::now());
            println!(
                "{minute:>6.1} {:>10.1} {:>10.2} {:>8} {:>10.3}   loadavg {}",
                service.rss_kib() as f64 / 1024.0,
                heap,
                service.open_fds(),
                cores,
                loadavg()
            );
            let _ = std::io::stdout().flush();
        }
        for t in tasks {
            let _ = t.await;
        }
    });
}

fn main() {
    // `cargo bench` passes --bench; `cargo test --all-targets` runs this binary without it,
    // and a minute-long load run is no unit test.
    if !std::env::args().any(|a| a == "--bench") {
        println!("load bench: run it with `cargo bench --bench load`; skipped under cargo test");
        return;
    }
    let args = parse_args();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    if let Some(min) = args.soak_minutes {
        soak(&rt, args.calls[0], min, args.realtime);
        return;
    }
    if args.realtime {
        ramp_realtime(&rt, &args.calls, args.seconds);
        return;
    }
    println!(
        "load bench: echo agent, 8 kHz calls, {} s each (voicegate in its own process)",
        args.seconds
    );
    println!(
        "{:>11} {:>6} {:>12} {:>9} {:>8} {:>12} {:>7} {:>7} {:>7} {:>6} {:>8} {:>6}",
        "transport",
        "calls",
        "cpu_ms/call_s",
        "cpu_cores",
        "rss_mib",
        "rss_kib/call",
        "p50_ms",
        "p99_ms",
        "max_ms",
        "late",
        "missing",
        "failed"
    );
    let mut best = None;
    let runs: Vec<(usize, Transport, usize)> = args
        .calls
        .iter()
        .flat_map(|&n| args.transports.iter().map(move |&t| (n, t)))
        .flat_map(|(n, t)| {
            if args.console {
                vec![(n, t, 0), (n, t, 5)]
            } else {
                vec![(n, t, 0)]
            }
        })
        .collect();
    for (n, transport, watchers) in runs {
        let r = if transport == Transport::Rtp {
            run_level_rtp(&rt, n, args.seconds)
        } else {
            run_level(&rt, n, args.seconds, watchers, transport)
        };
        if args.console {
            let (lines, dropped) = *CONSOLE_FEED.lock().unwrap();
            let label = if watchers == 0 {
                "off".to_owned()
            } else {
                format!("on/{watchers}")
            };
            print!("console {label:>5} (feed lines {lines}, dropped {dropped}) ");
        }
        println!(
            "{:>11} {:>6} {:>12.3} {:>9.3} {:>8.1} {:>12.1} {:>7.2} {:>7.2} {:>7.2} {:>6} {:>8} {:>6}",
            r.transport.label(),
            r.calls,
            r.cpu_ms_per_call_second,
            r.cpu_cores,
            r.rss_mib,
            r.rss_kib_per_call,
            r.p50,
            r.p99,
            r.max,
            r.late,
            r.missing,
            r.failed
        );
        let _ = std::io::stdout().flush();
        if transport == args.transports[0]
            && r.failed == 0
            && (18.0..=22.0).contains(&r.p99)
            && (18.0..=22.0).contains(&r.p50)
        {
            best = Some(r.calls);
        }
    }
    if args.calls.len() > 1 {
        match best {
            Some(n) => {
                println!("largest N with p99 pacing within 20 ± 2 ms and no failed call: {n}")
            }
            None => println!("no level held p99 pacing within 20 ± 2 ms"),
        }
    }
}

// ---------------------------------------------------------------------------------------
// Path (b): voicegate configured with `kind = "openai_realtime"` against a local fake
// OpenAI Realtime server that lives in this process, so one clock serves both ends.
// ---------------------------------------------------------------------------------------

mod realtime {
    //! The fake OpenAI Realtime server (`providers.md` §1, GA event names) and a caller that
    //! stamps its frames, so the bench can time each direction through voicegate.
    //!
    //! Time stamps travel in band: the first bytes of every 20 ms of μ-law audio are a magic
    //! byte and a microsecond time stamp in base 100, written with μ-law bytes whose decode
    //! → encode round trip is exact. voicegate carries μ-law 8 kHz calls as G.711 both ways
    //! (slin ↔ μ-law, no resampling), so the stamp survives the full path.

    use super::*;
    use base64::Engine as _;
    use futures_util::{SinkExt, StreamExt};
    use serde_json::{Value, json};
    use std::sync::Mutex;
    use std::sync::atomic::{AtomicU64, Ordering};
    use tokio::io::AsyncWriteExt;
    use tokio::net::TcpListener;
    use tokio_tungstenite::tungstenite::Message as WsMessage;
    use voicegate::audio::g711::Law;
    use voicegate::audiosocket::codec::{self, Message};
    use voicegate::audiosocket::read_message;

    const UP: u8 = 0x81;
    const DOWN: u8 = 0x82;
    const BARGE: u8 = 0x83;
    /// Stamp: magic, call index (2 digits), time (5 digits), all base 100.
    const STAMP: usize = 8;
    const FRAME: usize = 160;

    /// Bytes whose μ-law decode → encode round trip is exact, 100 of them, as digits.
    pub(crate) struct Digits {
        to_byte: [u8; 100],
        from_byte: [u8; 256],
    }

    impl Digits {
        pub(crate) fn new() -> Self {
            let mut to_byte = [0u8; 100];
            let mut from_byte = [255u8; 256];
            let mut n = 0;
            for b in 0u8..=255 {
                if n < 100
                    && ![UP, DOWN, BARGE].contains(&b)
                    && Law::Ulaw.encode(Law::Ulaw.decode(b)) == b
                {
                    to_byte[n] = b;
                    from_byte[b as usize] = n as u8;
                    n += 1;
                }
            }
            assert_eq!(n, 100, "100 exact μ-law bytes");
            Digits { to_byte, from_byte }
        }

        fn put(&self, out: &mut [u8], mut v: u64) {
            for o in out.iter_mut() {
                *o = self.to_byte[(v % 100) as usize];
                v /= 100;
            }
        }

        fn get(&self, bytes: &[u8]) -> Option<u64> {
            let mut v = 0u64;
            for &b in bytes.iter().rev() {
                let d = self.from_byte[b as usize];
                if d == 255 {
                    return None;
                }
                v = v * 100 + d as u64;
            }
            Some(v)
        }

        /// Writes a stamp into the first [`STAMP`] bytes of `frame`.
        pub(crate) fn stamp(&self, frame: &mut [u8], magic: u8, call: usize, us: u64) {
            frame[0] = magic;
            self.put(&mut frame[1..3], call as u64);
            self.put(&mut frame[3..8], us);
        }

        /// Reads a stamp: (magic, call index, µs).
        pub(crate) fn read(&self, frame: &[u8]) -> Option<(u8, usize, u64)> {
            if frame.len() < STAMP || ![UP, DOWN, BARGE].contains(&frame[0]) {
                return None;
            }
            Some((
                frame[0],
                self.get(&frame[1..3])? as usize,
                self.get(&frame[3..8])?,
            ))
        }
    }

    /// 400 Hz at about -20 dBFS as μ-law, one 20 ms frame (an integer number of periods).
    fn tone() -> [u8; FRAME] {
        let mut f = [0u8; FRAME];
        for (i, b) in f.iter_mut().enumerate() {
            let x = (2.0 * std::f64::consts::PI * 400.0 * i as f64 / 8000.0).sin() * 3000.0;
            *b = Law::Ulaw.encode(x as i16);
        }
        f
    }

    /// What the fake saw, shared by all its connections.
    #[derive(Default)]
    pub(crate) struct FakeStats {
        /// frame written by the caller → append received, µs.
        pub uplink_us: Mutex<Vec<u64>>,
        /// Appends received per call index.
        pub appends: Mutex<HashMap<usize, u64>>,
        /// speech_started sent, per call index, µs since t0.
        pub barge_sent: Mutex<HashMap<usize, Vec<u64>>>,
        pub sessions: AtomicU64,
    }

    use std::collections::HashMap;

    pub(crate) struct Fake {
        pub url: String,
        pub stats: Arc<FakeStats>,
    }

    use std::sync::Arc;

    /// Reply schedule of every session: a 1 s reply sent as a burst of five 200 ms deltas
    /// every 3 s; every third reply is 3 s long and the caller "barges in" 1 s into it.
    const REPLY_EVERY: Duration = Duration::from_secs(3);

    pub(crate) async fn start(t0: Instant) -> Fake {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("ws://{}/v1/realtime", listener.local_addr().unwrap());
        let stats = Arc::new(FakeStats::default());
        let st = stats.clone();
        tokio::spawn(async move {
            let digits = Arc::new(Digits::new());
            while let Ok((tcp, _)) = listener.accept().await {
                let _ = tcp.set_nodelay(true);
                let st = st.clone();
                let digits = digits.clone();
                tokio::spawn(async move {
                    if let Ok(ws) = tokio_tungstenite::accept_async(tcp).await {
                        st.sessions.fetch_add(1, Ordering::Relaxed);
                        let _ = session(ws, st, digits, t0).await;
                    }
                });
            }
        });
        Fake { url, stats }
    }

    async fn session(
        mut ws: tokio_tungstenite::WebSocketStream<tokio::net::TcpStream>,
        st: Arc<FakeStats>,
        digits: Arc<Digits>,
        t0: Instant,
    ) -> Result<(), tokio_tungstenite::tungstenite::Error> {
        let send = |v: Value| WsMessage::Text(v.to_string().into());
        ws.send(send(json!({"type": "session.created", "event_id": "ev_1",
            "session": {"id": "sess_1", "object": "realtime.session", "type": "realtime", "model": "gpt-realtime"}})))
            .await?;
        // session.update → session.updated with the session as asked (μ-law both ways).
        loop {
            match ws.next().await {
                Some(Ok(WsMessage::Text(t))) => {
                    let v: Value = serde_json::from_str(&t).unwrap_or_default();
                    if v["type"] == "session.update" {
                        let mut s = v["session"].clone();
                        s["id"] = json!("sess_1");
                        ws.send(send(
                            json!({"type": "session.updated", "event_id": "ev_2", "session": s}),
                        ))
                        .await?;
                        break;
                    }
                }
                Some(Ok(_)) => {}
                _ => return Ok(()),
            }
        }
        let tone = tone();
        let mut call: Option<usize> = None;
        let mut wire = Vec::with_capacity(FRAME);
        let mut next_reply = tokio::time::Instant::now() + Duration::from_secs(1);
        let mut n_reply = 0u64;
        let mut barge_at: Option<(tokio::time::Instant, String)> = None;
        loop {
            let barge_deadline = barge_at
                .as_ref()
                .map(|b| b.0)
                .unwrap_or(next_reply + Duration::from_secs(3600));
            tokio::select! {
                msg = ws.next() => match msg {
                    Some(Ok(WsMessage::Text(t))) => {
                        let now = t0.elapsed().as_micros() as u64;
                        // Only appends matter; look for the audio field without a full parse
                        // so the fake's own CPU stays small.
                        let Some(start) = t.find(r#""audio":""#) else { continue };
                        let rest = &t[start + 9..];
                        let Some(end) = rest.find('"') else { continue };
                        wire.clear();
                        if base64::engine::general_purpose::STANDARD.decode_vec(&rest[..end], &mut wire).is_err() {
                            continue;
                        }
                        if let Some((UP, c, us)) = digits.read(&wire) {
                            call = Some(c);
                            st.uplink_us.lock().unwrap().push(now.saturating_sub(us));
                            *st.appends.lock().unwrap().entry(c).or_default() += 1;
                        }
                    }
                    Some(Ok(_)) => {}
                    _ => return Ok(()),
                },
                () = tokio::time::sleep_until(next_reply) => {
                    next_reply += REPLY_EVERY;
                    n_reply += 1;
                    let barge = n_reply % 3 == 0;
                    let item = format!("item_{n_reply}");
                    let resp = format!("resp_{n_reply}");
                    let frames = if barge { 150 } else { 50 };
                    ws.send(send(json!({"type": "response.created", "response": {"id": resp, "object": "realtime.response", "status": "in_progress", "output": []}}))).await?;
                    ws.send(send(json!({"type": "response.output_item.added", "response_id": resp, "output_index": 0,
                        "item": {"id": item, "object": "realtime.item", "type": "message", "role": "assistant", "status": "in_progress", "content": []}}))).await?;
                    let mut audio = vec![0u8; FRAME * 10];
                    let mut b64 = String::with_capacity(audio.len() * 4 / 3 + 4);
                    for chunk in 0..frames / 10 {
                        let us = t0.elapsed().as_micros() as u64;
                        for (k, f) in audio.chunks_mut(FRAME).enumerate() {
                            f.copy_from_slice(&tone);
                            let magic = if chunk == 0 && k == 0 { DOWN } else { BARGE };
                            digits.stamp(f, magic, call.unwrap_or(0), us);
                        }
                        b64.clear();
                        base64::engine::general_purpose::STANDARD.encode_string(&audio, &mut b64);
                        ws.send(send(json!({"type": "response.output_audio.delta", "response_id": resp, "item_id": item,
                            "output_index": 0, "content_index": 0, "delta": b64}))).await?;
                    }
                    if barge {
                        // The fake's timers start on the caller's 20 ms grid, which voicegate's
                        // ticks follow too; spread the barge-in over the whole tick period so
                        // its latency is not measured at one phase only.
                        let phase = Duration::from_micros((n_reply * 7_300 + call.unwrap_or(0) as u64 * 1_300) % 20_000);
                        barge_at = Some((tokio::time::Instant::now() + Duration::from_secs(1) + phase, item.clone()));
                    } else {
                        ws.send(send(json!({"type": "response.output_audio.done", "response_id": resp, "item_id": item, "output_index": 0, "content_index": 0}))).await?;
                        ws.send(send(json!({"type": "response.done", "response": {"id": resp, "object": "realtime.response", "status": "completed", "output": []}}))).await?;
                    }
                }
                () = tokio::time::sleep_until(barge_deadline) => {
                    let (_, item) = barge_at.take().expect("armed");
                    let us = t0.elapsed().as_micros() as u64;
                    ws.send(send(json!({"type": "input_audio_buffer.speech_started", "audio_start_ms": 1000, "item_id": format!("{item}_caller")}))).await?;
                    if let Some(c) = call {
                        st.barge_sent.lock().unwrap().entry(c).or_default().push(us);
                    }
                    ws.send(send(json!({"type": "response.done", "response": {"id": "cancelled", "object": "realtime.response", "status": "cancelled", "output": []}}))).await?;
                }
            }
        }
    }

    /// A stamp read back: (magic, call index, µs since t0).
    pub(crate) type Stamp = (u8, usize, u64);

    /// What one stamped caller saw.
    #[derive(Default)]
    pub(crate) struct CallerSeen {
        pub frames_sent: u64,
        /// (arrival µs since t0, stamp) per frame received.
        pub frames: Vec<(u64, Option<Stamp>)>,
        pub error: Option<String>,
    }

    /// An AudioSocket caller at 8 kHz whose frames carry stamps (call index, send time).
    pub(crate) async fn stamped_call(
        addr: SocketAddr,
        index: usize,
        duration: Duration,
        t0: Instant,
        digits: Arc<Digits>,
    ) -> CallerSeen {
        let mut seen = CallerSeen::default();
        let stream = match tokio::net::TcpStream::connect(addr).await {
            Ok(s) => s,
            Err(e) => {
                seen.error = Some(e.to_string());
                return seen;
            }
        };
        let _ = stream.set_nodelay(true);
        let (mut reader, mut writer) = stream.into_split();
        let mut out = bytes::BytesMut::with_capacity(512);
        codec::encode(&Message::CallId(uuid::Uuid::new_v4()), &mut out);
        if let Err(e) = writer.write_all(&out).await {
            seen.error = Some(e.to_string());
            return seen;
        }
        let d2 = digits.clone();
        let reader_task = tokio::spawn(async move {
            let mut buf = bytes::BytesMut::with_capacity(4096);
            let mut frames = Vec::with_capacity(duration.as_millis() as usize / 20 + 16);
            let mut wire = [0u8; STAMP];
            while let Ok(Some(Message::Audio { payload, .. })) =
                read_message(&mut reader, &mut buf).await
            {
                let at = t0.elapsed().as_micros() as u64;
                let mut stamp = None;
                if payload.len() >= STAMP * 2 {
                    for (i, w) in wire.iter_mut().enumerate() {
                        *w = Law::Ulaw
                            .encode(i16::from_le_bytes([payload[2 * i], payload[2 * i + 1]]));
                    }
                    stamp = d2.read(&wire);
                }
                frames.push((at, stamp));
            }
            frames
        });
        let tone = tone();
        let mut wire = tone;
        let mut samples = [0i16; FRAME];
        let start = tokio::time::Instant::now();
        let total = (duration.as_millis() / 20) as u64;
        for n in 0..total {
            tokio::time::sleep_until(start + Duration::from_millis(20 * n)).await;
            wire.copy_from_slice(&tone);
            digits.stamp(&mut wire, UP, index, t0.elapsed().as_micros() as u64);
            for (s, &b) in samples.iter_mut().zip(&wire) {
                *s = Law::Ulaw.decode(b);
            }
            out.clear();
            codec::encode_audio_samples(SlinRate::Hz8000, &samples, &mut out);
            if let Err(e) = writer.write_all(&out).await {
                seen.error = Some(format!("write: {e}"));
                break;
            }
            seen.frames_sent += 1;
        }
        let _ = writer.shutdown().await;
        drop(writer);
        match tokio::time::timeout(Duration::from_secs(3), reader_task).await {
            Ok(Ok(f)) => seen.frames = f,
            _ => seen.error = Some("far end did not close".into()),
        }
        seen
    }
}

struct RealtimeResult {
    calls: usize,
    cpu_ms_per_call_second: f64,
    cpu_cores: f64,
    rss_mib: f64,
    rss_kib_per_call: f64,
    gap: [f64; 3],
    late: u64,
    dropped_up: i64,
    dropped_down: i64,
    up: [f64; 2],
    down_raw: [f64; 2],
    down_added: [f64; 2],
    barge: [f64; 3],
    /// speech_started sent → first frame without reply audio (p50, p99), ms.
    to_silence: [f64; 2],
    failed: usize,
    load: String,
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

fn run_level_realtime(rt: &tokio::runtime::Runtime, calls: usize, seconds: f64) -> RealtimeResult {
    use realtime::*;
    let t0 = Instant::now();
    let fake = rt.block_on(start(t0));
    let service = Service::start_with(&format!(
        "[agent]\nkind = \"openai_realtime\"\nurl = \"{}\"\napi_key = \"sk-bench-not-a-key\"\n",
        fake.url
    ));
    let idle_rss = service.rss_kib();
    let digits = std::sync::Arc::new(Digits::new());
    let duration = Duration::from_secs_f64(seconds);
    let load = loadavg();
    let seen: Vec<CallerSeen> = rt.block_on(async {
        let mut tasks = Vec::with_capacity(calls);
        for i in 0..calls {
            let digits = digits.clone();
            let addr = service.addr;
            let stagger = start_offset(i, calls, Duration::from_secs(1));
            tasks.push(tokio::spawn(async move {
                tokio::time::sleep(stagger).await;
                stamped_call(addr, i, duration, t0, digits).await
            }));
        }
        tokio::time::sleep(Duration::from_secs_f64(1.5)).await;
        let cpu0 = service.cpu_seconds();
        let w0 = Instant::now();
        tokio::time::sleep(Duration::from_secs_f64((seconds - 3.0).max(1.0))).await;
        let cpu1 = service.cpu_seconds();
        let wall = w0.elapsed().as_secs_f64();
        CPU.with(|c| c.set((cpu1 - cpu0, wall, service.rss_kib())));
        let mut out = Vec::with_capacity(calls);
        for t in tasks {
            out.push(t.await.unwrap_or_default());
        }
        out
    });
    let (cpu, wall, rss) = CPU.with(|c| c.get());
    let ms = |us: u64| us as f64 / 1000.0;
    let mut gaps = Vec::new();
    let mut late = 0;
    let mut failed = 0;
    let mut dropped_down = 0i64;
    let mut dropped_up = 0i64;
    let mut down_raw = Vec::new();
    let mut down_added = Vec::new();
    let mut barge = Vec::new();
    let mut to_silence = Vec::new();
    let appends = fake.stats.appends.lock().unwrap().clone();
    let barges = fake.stats.barge_sent.lock().unwrap().clone();
    for (i, s) in seen.iter().enumerate() {
        if s.error.is_some() || s.frames.is_empty() {
            failed += 1;
            if failed <= 3 {
                eprintln!("call {i} failed: {:?}", s.error);
            }
            continue;
        }
        let first = s.frames[0].0;
        let steady: Vec<u64> = s
            .frames
            .iter()
            .map(|f| f.0)
            .filter(|&t| t > first + 1_000_000)
            .collect();
        for w in steady.windows(2) {
            let g = ms(w[1] - w[0]);
            gaps.push(g);
            if g > 30.0 {
                late += 1;
            }
        }
        // Frames the caller should have received: one per 20 ms from the first on.
        let span = s.frames.last().unwrap().0 - first;
        dropped_down +=
            ((span as f64 / 20_000.0).round() as i64 + 1 - s.frames.len() as i64).max(0);
        // Appends missing beyond the setup buffer (the first second may be cut at set-up).
        dropped_up += (s.frames_sent as i64 - 50 - *appends.get(&i).unwrap_or(&0) as i64).max(0);
        for (k, &(at, stamp)) in s.frames.iter().enumerate() {
            if let Some((_, _, sent)) = stamp.filter(|st| st.0 == 0x82) {
                down_raw.push(ms(at.saturating_sub(sent)));
                // The first tick that could carry it, from the grid of the frames before.
                if k > 0 {
                    let prev = s.frames[k - 1].0;
                    if prev < sent {
                        let ticks = (sent - prev).div_ceil(20_000);
                        let expected = prev + ticks * 20_000;
                        down_added.push((at as f64 - expected as f64) / 1000.0);
                    }
                }
            }
        }
        for &b in barges.get(&i).map(Vec::as_slice).unwrap_or(&[]) {
            // First frame after the barge-in that carries no reply audio: from then on the
            // caller hears nothing of the interrupted reply.
            // The brief's measure: speech_started sent → the last frame of reply audio to
            // reach the caller (0 when it had already arrived).
            if let Some(k) = s.frames.iter().position(|(at, st)| *at > b && st.is_none()) {
                let last_reply = s.frames[..k].iter().rev().find(|(_, st)| st.is_some());
                barge.push(last_reply.map_or(0.0, |&(at, _)| ms(at.saturating_sub(b))));
                to_silence.push(ms(s.frames[k].0 - b));
            }
        }
    }
    let mut up: Vec<f64> = fake
        .stats
        .uplink_us
        .lock()
        .unwrap()
        .iter()
        .map(|&u| ms(u))
        .collect();
    for v in [
        &mut gaps,
        &mut up,
        &mut down_raw,
        &mut down_added,
        &mut barge,
        &mut to_silence,
    ] {
        v.sort_by(f64::total_cmp);
    }
    let ok = calls - failed;
    RealtimeResult {
        calls,
        cpu_ms_per_call_second: cpu * 1000.0 / (wall * ok.max(1) as f64),
        cpu_cores: cpu / wall,
        rss_mib: rss as f64 / 1024.0,
        rss_kib_per_call: rss.saturating_sub(idle_rss) as f64 / ok.max(1) as f64,
        gap: [
            percentile(&gaps, 0.5),
            percentile(&gaps, 0.99),
            gaps.last().copied().unwrap_or(0.0),
        ],
        late,
        dropped_up,
        dropped_down,
        up: [percentile(&up, 0.5), percentile(&up, 0.99)],
        down_raw: [percentile(&down_raw, 0.5), percentile(&down_raw, 0.99)],
        down_added: [percentile(&down_added, 0.5), percentile(&down_added, 0.99)],
        barge: [
            percentile(&barge, 0.5),
            percentile(&barge, 0.99),
            barge.last().copied().unwrap_or(0.0),
        ],
        to_silence: [percentile(&to_silence, 0.5), percentile(&to_silence, 0.99)],
        failed,
        load,
    }
}

fn ramp_realtime(rt: &tokio::runtime::Runtime, levels: &[usize], seconds: f64) {
    println!(
        "load bench: openai_realtime agent against a local fake (μ-law 8 kHz, replies in bursts), {seconds} s per level"
    );
    println!(
        "{:>5} {:>8} {:>6} {:>7} {:>8} {:>17} {:>5} {:>7} {:>12} {:>12} {:>14} {:>18} {:>13} {:>4} {:>16}",
        "calls",
        "cpu_ms/cs",
        "cores",
        "rss_mib",
        "kib/call",
        "gap p50/p99/max",
        "late",
        "drop u/d",
        "up p50/p99",
        "down p50/p99",
        "dn+ p50/p99",
        "barge p50/p99/max",
        "b→sil p50/p99",
        "fail",
        "loadavg(start)"
    );
    let mut best = None;
    for &n in levels {
        let r = run_level_realtime(rt, n, seconds);
        println!(
            "{:>5} {:>8.3} {:>6.3} {:>7.1} {:>8.1} {:>5.2}/{:>5.2}/{:>5.1} {:>5} {:>3}/{:<3} {:>5.2}/{:>6.2} {:>5.2}/{:>6.2} {:>6.2}/{:>7.2} {:>5.1}/{:>5.1}/{:>6.1} {:>6.1}/{:>6.1} {:>4} {:>16}",
            r.calls,
            r.cpu_ms_per_call_second,
            r.cpu_cores,
            r.rss_mib,
            r.rss_kib_per_call,
            r.gap[0],
            r.gap[1],
            r.gap[2],
            r.late,
            r.dropped_up,
            r.dropped_down,
            r.up[0],
            r.up[1],
            r.down_raw[0],
            r.down_raw[1],
            r.down_added[0],
            r.down_added[1],
            r.barge[0],
            r.barge[1],
            r.barge[2],
            r.to_silence[0],
            r.to_silence[1],
            r.failed,
            r.load
        );
        let _ = std::io::stdout().flush();
        if r.failed == 0
            && r.dropped_down == 0
            && r.dropped_up == 0
            && (18.0..=22.0).contains(&r.gap[1])
        {
            best = Some((r.calls, r.cpu_cores));
        }
    }
    match best {
        Some((n, cores)) => println!(
            "largest N with p99 pacing within 20 ± 2 ms and no dropped frame: {n} ({:.0} calls per core of voicegate CPU; {:.2} cores used)",
            n as f64 / cores.max(1e-9),
            cores
        ),
        None => println!("no level held p99 pacing within 20 ± 2 ms with no dropped frame"),
    }
}

// ---------------------------------------------------------------------------------------
// `--transport websocket`: the callers speak Asterisk's WebSocket media channel.
// ---------------------------------------------------------------------------------------

mod ws_caller {
    //! A caller that behaves as Asterisk 22.10.1's `chan_websocket` does towards voicegate
    //! (`channels/chan_websocket.c`, `res/res_http_websocket.c`): it connects with the
    //! subprotocol `media`, sends `MEDIA_START` (plain text) first, then one binary message
    //! of slin per 20 ms; it answers `MARK_MEDIA` with `MEDIA_MARK_PROCESSED` as it plays
    //! what it received (at once: it plays as it receives), and takes `FLUSH_MEDIA` and
    //! `HANGUP`. It reports the same figures as the AudioSocket caller.

    use super::*;
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message as WsMessage;
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    use voicegate::chanws::protocol::{Command, ControlFormat, Event, MediaFormat, MediaStart};

    /// What one call saw (of either transport).
    pub(crate) struct WsReport {
        pub arrivals_ms: Vec<f64>,
        pub frames_sent: u64,
        pub frames_received: u64,
        pub underruns: u64,
    }

    impl From<CallReport> for WsReport {
        fn from(r: CallReport) -> Self {
            WsReport {
                arrivals_ms: r.arrivals_ms,
                frames_sent: r.frames_sent,
                frames_received: r.frames_received,
                underruns: r.underruns,
            }
        }
    }

    /// One call of `duration` at 8 kHz to voicegate's `[websocket]` listener at `addr`.
    pub(crate) async fn place(
        addr: SocketAddr,
        speech: &Recording,
        duration: Duration,
    ) -> Result<WsReport, String> {
        let rate = SlinRate::Hz8000;
        let spf = rate.samples_per_frame();
        let mut req = format!("ws://{addr}/media?call_id={}", uuid::Uuid::new_v4())
            .into_client_request()
            .map_err(|e| e.to_string())?;
        req.headers_mut()
            .insert("sec-websocket-protocol", "media".parse().unwrap());
        let stream = tokio::net::TcpStream::connect(addr)
            .await
            .map_err(|e| e.to_string())?;
        stream.set_nodelay(true).map_err(|e| e.to_string())?;
        let (ws, _) = tokio_tungstenite::client_async(req, stream)
            .await
            .map_err(|e| e.to_string())?;
        let (mut tx, mut rx) = ws.split();
        let start = MediaStart {
            connection_id: "voicegate".into(),
            channel: "WebSocket/voicegate/0x1".into(),
            channel_id: "1764712345.1".into(),
            format: MediaFormat::Slin(8000),
            optimal_frame_size: 320,
            ptime: 20,
            channel_variables: Default::default(),
        };
        let text = Event::MediaStart(start).render(ControlFormat::PlainText, "1764712345.1");
        tx.send(WsMessage::text(text))
            .await
            .map_err(|e| e.to_string())?;
        let (ctl_tx, mut ctl_rx) = tokio::sync::mpsc::unbounded_channel::<String>();
        let t0 = Instant::now();
        let reader = tokio::spawn(async move {
            let mut arrivals = Vec::new();
            let mut received = 0u64;
            while let Some(Ok(m)) = rx.next().await {
                match m {
                    WsMessage::Binary(b) if b.len() == spf * 2 => {
                        received += 1;
                        arrivals.push(t0.elapsed().as_secs_f64() * 1000.0);
                    }
                    WsMessage::Text(t) => match Command::parse(&t, ControlFormat::PlainText) {
                        Ok(Command::MarkMedia { correlation_id }) => {
                            let e = Event::MediaMarkProcessed {
                                correlation_id: correlation_id.unwrap_or_default(),
                            };
                            let _ = ctl_tx.send(e.render(ControlFormat::PlainText, "1764712345.1"));
                        }
                        Ok(Command::Hangup) => break,
                        Ok(_) => {}
                        Err(e) => eprintln!("ws caller: bad command {t:?}: {e}"),
                    },
                    WsMessage::Close(_) => break,
                    _ => {}
                }
            }
            (arrivals, received)
        });
        let silence = vec![0i16; spf];
        let total = (duration.as_millis() / 20) as usize;
        let mut sent = 0u64;
        let mut frame = Vec::with_capacity(spf * 2);
        for n in 0..total {
            tokio::time::sleep_until((t0 + Duration::from_millis(20 * n as u64)).into()).await;
            if reader.is_finished() {
                break;
            }
            while let Ok(t) = ctl_rx.try_recv() {
                tx.send(WsMessage::text(t))
                    .await
                    .map_err(|e| e.to_string())?;
            }
            let chunk = speech
                .samples
                .chunks(spf)
                .nth(n % (speech.samples.len() / spf))
                .unwrap_or(&silence);
            frame.clear();
            for s in chunk {
                frame.extend_from_slice(&s.to_le_bytes());
            }
            frame.resize(spf * 2, 0);
            tx.send(WsMessage::binary(frame.clone()))
                .await
                .map_err(|e| e.to_string())?;
            sent += 1;
        }
        let _ = tx.send(WsMessage::Close(None)).await;
        let (arrivals, received) = tokio::time::timeout(Duration::from_secs(3), reader)
            .await
            .map_err(|_| "far end did not close".to_owned())?
            .map_err(|e| e.to_string())?;
        let underruns = arrivals
            .windows(2)
            .filter(|w| w[0] > 1000.0 && w[1] - w[0] > 30.0)
            .count() as u64;
        Ok(WsReport {
            arrivals_ms: arrivals,
            frames_sent: sent,
            frames_received: received,
            underruns,
        })
    }
}
