//! Load bench: N concurrent synthetic callers against one `voicegate run` child process.
//!
//! ```text
//! cargo bench --bench load -- [--calls N] [--seconds S] [--ramp 50,100,200,400] [--soak MIN]
//! ```
//!
//! Each caller speaks a real recording in a loop, paced at 20 ms, through the real AudioSocket
//! listener; voicegate answers with the echo agent. Reported per N: voicegate's CPU time per
//! call-second (from `/proc/<pid>/stat`, so the load generator's own CPU does not count), RSS
//! and RSS per call, the pacing the callers saw (p50/p99/max inter-frame gap over all calls),
//! late frames (gaps > 30 ms) and missing frames. Numbers are printed, never asserted.

use std::io::Write as _;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use voicegate::audio::wav::Recording;
use voicegate::audiosocket::SlinRate;
use voicegate::caller::{CallPlan, CallReport, place_call};

struct Args {
    calls: Vec<usize>,
    seconds: f64,
    soak_minutes: Option<f64>,
}

fn parse_args() -> Args {
    let mut args = Args {
        calls: vec![100],
        seconds: 20.0,
        soak_minutes: None,
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
}

impl Service {
    fn start() -> Self {
        let port = free_port();
        let dir = std::env::temp_dir().join(format!("vg-bench-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let cfg = dir.join("voicegate.toml");
        std::fs::write(
            &cfg,
            format!("[audiosocket]\nlisten = \"127.0.0.1:{port}\"\n[log]\nlevel = \"warn\"\n[agent]\nkind = \"echo\"\ndelay_ms = 200\n"),
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
        Service { child, addr }
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
    Recording::open(&path).expect("fixture")
}

struct RunResult {
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

fn run_level(rt: &tokio::runtime::Runtime, calls: usize, seconds: f64) -> RunResult {
    let service = Service::start();
    let idle_rss = service.rss_kib();
    let speech = speech();
    let duration = Duration::from_secs_f64(seconds);
    // Stagger starts over one second so the calls' 20 ms grids are spread like real traffic.
    let reports: Vec<Result<CallReport, String>> = rt.block_on(async {
        let mut tasks = Vec::with_capacity(calls);
        let addr = service.addr;
        for i in 0..calls {
            let plan = CallPlan {
                call_id: uuid::Uuid::new_v4(),
                rate: SlinRate::Hz8000,
                speech: speech.clone(),
                speech_offset: Duration::ZERO,
                dtmf: Vec::new(),
                duration,
            };
            let stagger = Duration::from_micros((i as u64 * 1_000_000) / calls as u64);
            tasks.push(tokio::spawn(async move {
                tokio::time::sleep(stagger).await;
                place_call(addr, &plan).await.map_err(|e| e.to_string())
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

thread_local! {
    static CPU: std::cell::Cell<(f64, f64, u64)> = const { std::cell::Cell::new((0.0, 0.0, 0)) };
}

fn soak(rt: &tokio::runtime::Runtime, calls: usize, minutes: f64) {
    let service = Service::start();
    let speech = speech();
    let total = Duration::from_secs_f64(minutes * 60.0);
    println!("soak: {calls} calls for {minutes} min (calls last 60 s and are replaced)");
    println!(
        "{:>6} {:>10} {:>8} {:>10}",
        "min", "rss_mib", "fds", "cpu_cores"
    );
    rt.block_on(async {
        let addr = service.addr;
        let start = Instant::now();
        let mut tasks = Vec::new();
        for i in 0..calls {
            let speech = speech.clone();
            tasks.push(tokio::spawn(async move {
                tokio::time::sleep(Duration::from_micros(
                    (i as u64 * 60_000_000) / calls as u64,
                ))
                .await;
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
        while start.elapsed() < total {
            tokio::time::sleep(Duration::from_secs(30)).await;
            minute += 0.5;
            let cpu = service.cpu_seconds();
            let cores = (cpu - last_cpu.0) / last_cpu.1.elapsed().as_secs_f64();
            last_cpu = (cpu, Instant::now());
            println!(
                "{minute:>6.1} {:>10.1} {:>8} {:>10.3}",
                service.rss_kib() as f64 / 1024.0,
                service.open_fds(),
                cores
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
        soak(&rt, args.calls[0], min);
        return;
    }
    println!(
        "load bench: echo agent, 8 kHz calls, {} s each (voicegate in its own process)",
        args.seconds
    );
    println!(
        "{:>6} {:>12} {:>9} {:>8} {:>12} {:>7} {:>7} {:>7} {:>6} {:>8} {:>6}",
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
    for &n in &args.calls {
        let r = run_level(&rt, n, args.seconds);
        println!(
            "{:>6} {:>12.3} {:>9.3} {:>8.1} {:>12.1} {:>7.2} {:>7.2} {:>7.2} {:>6} {:>8} {:>6}",
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
        if r.failed == 0 && (18.0..=22.0).contains(&r.p99) && (18.0..=22.0).contains(&r.p50) {
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
