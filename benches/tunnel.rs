//! Tunnel bench: throughput, added per-packet latency, and how many concurrent calls pass
//! through the tunnel with p99 pacing within 20 ± 2 ms.
//!
//! `cargo bench --bench tunnel` (release build). Both ends of the tunnel (the "PBX" and
//! voicegate), the callers and the echo sessions all run in this one process over loopback
//! UDP, so every packet is encrypted and decrypted twice on the same cores: the numbers are
//! a lower bound for one voicegate box. Options (after `--`): `--max-calls N` (default
//! 400), `--calls N` (only that round), `--seconds S` per call round (default 6).
//!
//! `--cpu` measures instead what a call costs in CPU: the process's user + system time
//! (`getrusage`) over rounds of 1 and 100 concurrent echo calls (`--cpu-calls N` for another
//! count; `--seconds`, default 10), through the tunnel and over plain loopback TCP, in ms per
//! call-second. The difference is what the tunnel adds at both of its ends (the PBX's and
//! voicegate's do the same work per frame, so voicegate's share is about half).
//! `--tunnel-only` skips the plain rounds (for `strace -c -f` or `valgrind --tool=callgrind`).
#![allow(clippy::disallowed_types)] // a benchmark on real sockets and processes: real time (std::time::Instant)

#[path = "../tests/tunnel_support/mod.rs"]
mod tunnel_support;

use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use voicegate::agent::echo::EchoAgent;
use voicegate::audio::wav::Recording;
use voicegate::audiosocket::SlinRate;
use voicegate::audiosocket::server::Server;
use voicegate::call::route::{Generation, Router, ServerParams};
use voicegate::caller::{CallPlan, place_call, run_call_on};
use voicegate::config::AudioSocketConfig;

fn arg(name: &str, default: u64) -> u64 {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

async fn throughput(pbx: &voicegate::tunnel::Tunnel, vg: &voicegate::tunnel::Tunnel, bytes: usize) {
    let mut listener = pbx.listen(5001).await.unwrap();
    let sink = tokio::spawn(async move {
        let (mut s, _) = listener.accept().await.unwrap();
        let mut buf = vec![0u8; 64 * 1024];
        let mut total = 0usize;
        loop {
            let n = s.read(&mut buf).await.unwrap();
            if n == 0 {
                break;
            }
            total += n;
        }
        total
    });
    let mut s = vg.connect("10.0.0.1:5001".parse().unwrap()).await.unwrap();
    let chunk = vec![0x5au8; 64 * 1024];
    let start = Instant::now();
    let mut sent = 0;
    while sent < bytes {
        s.write_all(&chunk).await.unwrap();
        sent += chunk.len();
    }
    s.shutdown().await.unwrap();
    let got = sink.await.unwrap();
    let secs = start.elapsed().as_secs_f64();
    assert_eq!(got, bytes);
    println!(
        "throughput: {:.0} Mbit/s ({} MiB in {:.2} s, one TCP stream, both tunnel ends in-process)",
        bytes as f64 * 8.0 / secs / 1e6,
        bytes >> 20,
        secs
    );
}

/// Round trips of one 320-byte frame: over the tunnel, and over plain loopback TCP.
async fn latency(pbx: &voicegate::tunnel::Tunnel, vg: &voicegate::tunnel::Tunnel, rounds: usize) {
    let mut listener = pbx.listen(5002).await.unwrap();
    tokio::spawn(async move {
        let (mut s, _) = listener.accept().await.unwrap();
        let mut buf = [0u8; 320];
        while s.read_exact(&mut buf).await.is_ok() {
            if s.write_all(&buf).await.is_err() {
                break;
            }
        }
    });
    let tcp = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let tcp_addr = tcp.local_addr().unwrap();
    tokio::spawn(async move {
        let (mut s, _) = tcp.accept().await.unwrap();
        s.set_nodelay(true).unwrap();
        let mut buf = [0u8; 320];
        while s.read_exact(&mut buf).await.is_ok() {
            if s.write_all(&buf).await.is_err() {
                break;
            }
        }
    });
    let mut tunnel = vg.connect("10.0.0.1:5002".parse().unwrap()).await.unwrap();
    let mut plain = tokio::net::TcpStream::connect(tcp_addr).await.unwrap();
    plain.set_nodelay(true).unwrap();
    let frame = [7u8; 320];
    let mut buf = [0u8; 320];
    let mut rtt_tunnel = Vec::with_capacity(rounds);
    let mut rtt_plain = Vec::with_capacity(rounds);
    for _ in 0..rounds {
        let t = Instant::now();
        tunnel.write_all(&frame).await.unwrap();
        tunnel.read_exact(&mut buf).await.unwrap();
        rtt_tunnel.push(t.elapsed().as_secs_f64() * 1e6);
        let t = Instant::now();
        plain.write_all(&frame).await.unwrap();
        plain.read_exact(&mut buf).await.unwrap();
        rtt_plain.push(t.elapsed().as_secs_f64() * 1e6);
    }
    rtt_tunnel.sort_by(f64::total_cmp);
    rtt_plain.sort_by(f64::total_cmp);
    let (t50, t99) = (percentile(&rtt_tunnel, 0.5), percentile(&rtt_tunnel, 0.99));
    let (p50, p99) = (percentile(&rtt_plain, 0.5), percentile(&rtt_plain, 0.99));
    println!(
        "latency, 320-byte frame round trip: tunnel p50 {t50:.0} µs p99 {t99:.0} µs; \
         plain loopback TCP p50 {p50:.0} µs p99 {p99:.0} µs"
    );
    // Half the difference of the round-trip medians: each frame crosses the tunnel once
    // each way, through both ends (encrypt + decrypt, two userspace TCP/IP stacks).
    println!(
        "added per-packet latency, one way through both tunnel ends: {:.0} µs (median)",
        (t50 - p50) / 2.0
    );
}

struct Round {
    /// p99 of the gaps between received frames, all calls pooled, ms.
    p99: f64,
    p50: f64,
    /// The worst single call's p99, ms.
    worst_call_p99: f64,
    failed: usize,
    frames: u64,
    /// Datagrams the kernel dropped for a full UDP receive buffer (all sockets on the box).
    udp_drops: u64,
}

/// `RcvbufErrors` of /proc/net/snmp (Linux), 0 elsewhere.
fn udp_receive_drops() -> u64 {
    let snmp = std::fs::read_to_string("/proc/net/snmp").unwrap_or_default();
    let mut lines = snmp.lines().filter(|l| l.starts_with("Udp:"));
    let (Some(names), Some(values)) = (lines.next(), lines.next()) else {
        return 0;
    };
    names
        .split_whitespace()
        .zip(values.split_whitespace())
        .find(|(n, _)| *n == "RcvbufErrors")
        .and_then(|(_, v)| v.parse().ok())
        .unwrap_or(0)
}

/// User + system CPU time of this process so far.
fn process_cpu() -> Duration {
    // SAFETY: getrusage writes into the zeroed struct it is given.
    let mut u: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: valid pointer to a rusage.
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut u) };
    let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    tv(u.ru_utime) + tv(u.ru_stime)
}

/// CPU ms per call-second of `n` echo calls of `seconds`, tunnel and plain TCP.
async fn cpu_round(n: usize, seconds: f64) {
    let mut per = [0.0f64; 2];
    // `--tunnel-only`: skip the plain round (to profile or trace the tunnel alone).
    let tunnel_only = std::env::args().any(|a| a == "--tunnel-only");
    for (i, tunnel) in [true, false].into_iter().enumerate() {
        if tunnel_only && !tunnel {
            continue;
        }
        let before = process_cpu();
        let r = calls(n, seconds, tunnel).await;
        let used = process_cpu() - before;
        assert_eq!(r.failed, 0, "calls failed in the CPU round");
        per[i] = used.as_secs_f64() * 1000.0 / (n as f64 * seconds);
    }
    println!(
        "cpu, {n:>3} calls x {seconds:.0} s: tunnel {:.2} ms per call-second, plain TCP {:.2} ms, \
         the tunnel adds {:.2} ms (both ends; voicegate's end about {:.2} ms)",
        per[0],
        per[1],
        per[0] - per[1],
        (per[0] - per[1]) / 2.0
    );
}

fn speech() -> Recording {
    voicegate::wavfile::open(
        &std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/hello-world.wav"),
    )
    .unwrap()
}

/// `n` concurrent echo calls of `seconds`, through the tunnel or (baseline) over plain
/// loopback TCP to the ordinary AudioSocket listener.
async fn calls(n: usize, seconds: f64, tunnel: bool) -> Round {
    let stop = CancellationToken::new();
    let _guard = stop.clone().drop_guard();
    let agent = Arc::new(EchoAgent::new(Duration::from_millis(200)));
    let mut pbx = None;
    let mut plain = None;
    if tunnel {
        let (p, vg) = tunnel_support::loopback_pair(&stop).await;
        let listener = vg.listen(9092).await.unwrap();
        // Summaries are not needed here; sending to a closed channel is ignored.
        let (tx, _) = mpsc::unbounded_channel();
        tunnel_support::serve_audiosocket(listener, agent, tx);
        pbx = Some(p);
    } else {
        let server = Server::bind("127.0.0.1:0".parse().unwrap()).await.unwrap();
        let router = Router::fixed(Generation::new(
            agent,
            ServerParams::from_config(&AudioSocketConfig::default()),
        ));
        plain = Some(server.local_addr().unwrap());
        tokio::spawn(server.run(Arc::new(router), stop.clone()));
    }
    let speech = speech();
    let mut tasks = Vec::new();
    for i in 0..n {
        let pbx = pbx.clone();
        let plan = CallPlan {
            call_id: uuid::Uuid::new_v4(),
            rate: SlinRate::Hz8000,
            speech: speech.clone(),
            speech_offset: Duration::from_millis(100),
            dtmf: vec![],
            duration: Duration::from_secs_f64(seconds),
        };
        tasks.push(tokio::spawn(async move {
            // Calls arrive over half a second, as a busy PBX would hand them over.
            tokio::time::sleep(Duration::from_micros(500_000 * i as u64 / n as u64)).await;
            let r = match (pbx, plain) {
                (Some(pbx), _) => {
                    let stream = pbx.connect("10.0.0.2:9092".parse().unwrap()).await?;
                    run_call_on(stream, &plan).await
                }
                (None, Some(addr)) => place_call(addr, &plan).await,
                (None, None) => unreachable!("one of the two is set above"),
            };
            r.map_err(|e| std::io::Error::other(e.to_string()))
        }));
    }
    let mut round = Round {
        p99: 0.0,
        p50: 0.0,
        worst_call_p99: 0.0,
        failed: 0,
        frames: 0,
        udp_drops: 0,
    };
    let drops_before = udp_receive_drops();
    let mut gaps = Vec::new();
    for t in tasks {
        match t.await {
            Ok(Ok(r)) => {
                round.worst_call_p99 = round.worst_call_p99.max(r.gap_p99_ms);
                round.frames += r.frames_received;
                gaps.extend(r.arrivals_ms.windows(2).map(|w| w[1] - w[0]));
            }
            Ok(Err(e)) => {
                if round.failed == 0 {
                    eprintln!(
                        "  first failed call ({}): {e}",
                        if tunnel { "tunnel" } else { "plain" }
                    );
                }
                round.failed += 1;
            }
            Err(e) => {
                eprintln!("  call task panicked: {e}");
                round.failed += 1;
            }
        }
    }
    round.udp_drops = udp_receive_drops().saturating_sub(drops_before);
    gaps.sort_by(f64::total_cmp);
    round.p99 = percentile(&gaps, 0.99);
    round.p50 = percentile(&gaps, 0.5);
    round
}

fn main() {
    // `cargo bench` passes --bench; `cargo test --all-targets` runs this binary without it:
    // then only a quick smoke run that proves the bench works.
    let full = std::env::args().any(|a| a == "--bench");
    let max_calls = if full {
        arg("--max-calls", 400) as usize
    } else {
        10
    };
    let seconds = if full {
        arg("--seconds", 6) as f64
    } else {
        1.0
    };
    let bytes = if full { 64 << 20 } else { 1 << 20 };
    let rounds = if full { 2000 } else { 50 };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    if std::env::args().any(|a| a == "--cpu") || !full {
        let seconds = if full {
            arg("--seconds", 10) as f64
        } else {
            0.5
        };
        let counts = match arg("--cpu-calls", 0) as usize {
            0 if full => vec![1, 100],
            0 => vec![2],
            n => vec![n],
        };
        rt.block_on(async {
            for n in counts {
                cpu_round(n, seconds).await;
            }
        });
        if full {
            return;
        }
    }
    rt.block_on(async {
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
        println!("voicegate tunnel bench ({cpus} CPUs, boringtun + smoltcp, loopback UDP)");
        let stop = CancellationToken::new();
        let (pbx, vg) = tunnel_support::loopback_pair(&stop).await;
        throughput(&pbx, &vg, bytes).await;
        latency(&pbx, &vg, rounds).await;
        stop.cancel();

        // The caller, both tunnel ends and the sessions share the CPUs, and on a busy box
        // even plain TCP misses the target: each round also runs the same calls without the
        // tunnel, so what the tunnel adds is visible.
        let mut best = 0;
        let mut best_vs_plain = 0;
        let only = arg("--calls", 0) as usize;
        for n in [10usize, 30, 50, 100, 150, 200, 300, 400] {
            if n > max_calls || (only > 0 && n != only) {
                if only > 0 && n < only {
                    continue;
                }
                break;
            }
            let t = calls(n, seconds, true).await;
            let p = calls(n, seconds, false).await;
            let ok = t.failed == 0 && (18.0..=22.0).contains(&t.p99);
            let close = t.failed == 0 && t.p99 <= p.p99 + 2.0;
            println!(
                "calls {:>4}: tunnel gap p50 {:.2} / p99 {:.2} ms (worst call p99 {:.2}), failed {}, frames {}, udp drops {} | \
                 plain TCP p50 {:.2} / p99 {:.2} ms (worst call p99 {:.2}) -> {}{}",
                n,
                t.p50,
                t.p99,
                t.worst_call_p99,
                t.failed,
                t.frames,
                t.udp_drops,
                p.p50,
                p.p99,
                p.worst_call_p99,
                if ok { "within 20 ± 2 ms" } else { "OUT of 20 ± 2 ms" },
                if close { ", tunnel within 2 ms of plain" } else { "" }
            );
            if ok {
                best = n;
            }
            if close {
                best_vs_plain = n;
            }
            if t.failed > 0 || t.p99 > 60.0 {
                break;
            }
        }
        println!(
            "concurrent calls through the tunnel with p99 pacing within 2 ms of plain TCP: {best_vs_plain}"
        );
        println!("concurrent calls through the tunnel with p99 pacing (all calls' frame gaps) within 20 ± 2 ms: {best}");
    });
}
