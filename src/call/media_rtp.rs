//! ARI externalMedia over RTP as a call's media channel: the [`MediaPort`] adapter over one
//! UDP socket and the sans-IO [`crate::rtp::RtpEndpoint`], the per-call port allocation
//! from `ari.rtp_ports` ([`RtpPorts`]), and the task that runs RTP calls through the same
//! router as AudioSocket calls ([`serve`]: guard screen, call limits, directory, fallback,
//! session, accounting), with the same shutdown grace.
//!
//! The Stasis controller binds the socket, asks Asterisk for `encapsulation=rtp` with
//! `external_host` = that socket's address, reads where Asterisk's own RTP port is
//! (`UNICASTRTP_LOCAL_ADDRESS`/`PORT`) and hands an [`RtpCall`] to [`serve`]. The socket is
//! the call's: it is closed (its port free again) when the call's task ends.

use crate::audiosocket::codec::SlinRate;
use crate::call::media::{MediaError, MediaEvent, MediaPort};
use crate::call::route::Router;
use crate::rtp::jitter::JitterConfig;
use crate::rtp::pacing::GapHistogram;
use crate::rtp::{RtpEndpoint, RtpFormat, RtpSender};
use bytes::{BufMut, BytesMut};
use std::net::{IpAddr, SocketAddr};
use std::ops::RangeInclusive;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;
use tokio::net::UdpSocket;
use tokio::sync::mpsc;
use tokio::time::{Instant, sleep_until, timeout};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};
use uuid::Uuid;

/// Datagrams dropped on a call's RTP socket, by `reason` (`foreign`, `malformed`,
/// `other_payload`).
pub(crate) const RTP_DROPPED: &str = "voicegate_rtp_dropped_total";
/// RTP packets by `direction`: `in` (taken into the jitter buffer), `out` (sent).
pub(crate) const RTP_PACKETS: &str = "voicegate_rtp_packets_total";
/// Incoming RTP frames by `what`: `late`, `duplicate`, `lost`, `concealed`.
pub(crate) const RTP_JITTER: &str = "voicegate_rtp_jitter_frames_total";

/// RTP calls waiting for [`serve`] (a burst of new calls; each is a few hundred bytes).
pub(crate) const RTP_CALL_QUEUE: usize = 64;

/// The UDP ports RTP calls bind, one per call, on one address.
#[derive(Debug)]
pub(crate) struct RtpPorts {
    ip: IpAddr,
    range: RangeInclusive<u16>,
    /// Where the next search starts (round robin, so a just-freed port rests a while).
    cursor: AtomicU32,
}

impl RtpPorts {
    /// Ports `range` (inclusive) on `ip`.
    pub(crate) fn new(ip: IpAddr, range: RangeInclusive<u16>) -> Self {
        RtpPorts {
            ip,
            range,
            cursor: AtomicU32::new(0),
        }
    }

    /// Binds a free port of the range, trying each at most once.
    ///
    /// # Errors
    /// `AddrInUse` when every port is taken; another bind error at once.
    pub(crate) fn bind(&self) -> std::io::Result<UdpSocket> {
        let (lo, hi) = (u32::from(*self.range.start()), u32::from(*self.range.end()));
        let n = hi - lo + 1;
        let start = self.cursor.fetch_add(1, Ordering::Relaxed);
        for k in 0..n {
            let port = (lo + (start + k) % n) as u16;
            match std::net::UdpSocket::bind(SocketAddr::new(self.ip, port)) {
                Ok(s) => {
                    self.cursor.store(start + k + 1, Ordering::Relaxed);
                    s.set_nonblocking(true)?;
                    return UdpSocket::from_std(s);
                }
                Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => continue,
                Err(e) => return Err(e),
            }
        }
        Err(std::io::Error::new(
            std::io::ErrorKind::AddrInUse,
            format!("every RTP port {lo}-{hi} on {} is in use", self.ip),
        ))
    }
}

/// The slin rate of an RTP format.
fn slin_rate(format: RtpFormat) -> SlinRate {
    match format {
        RtpFormat::Ulaw | RtpFormat::Alaw => SlinRate::Hz8000,
        RtpFormat::Slin16 => SlinRate::Hz16000,
    }
}

/// One call's RTP media channel.
#[derive(Debug)]
pub struct RtpPort {
    socket: UdpSocket,
    endpoint: RtpEndpoint,
    rate: SlinRate,
    /// Cancelled when the caller's side is gone (the Stasis controller's clean-up): reads
    /// end as a clean close.
    closed: CancellationToken,
    recv: Vec<u8>,
    frame: Vec<i16>,
    /// The caller's frames as slin bytes; its allocation is reused once the call has
    /// dropped the previous frame's `Bytes`.
    payload: BytesMut,
    out: Vec<u8>,
    pacing: GapHistogram,
}

impl RtpPort {
    /// The port over `socket`, talking `format` with Asterisk's RTP at `peer`; its jitter
    /// buffer holds at most `jitter_max`. Sequence number, timestamp and SSRC start random
    /// (RFC 3550 §5.1).
    pub(crate) fn new(
        socket: UdpSocket,
        peer: SocketAddr,
        format: RtpFormat,
        jitter_max: Duration,
        closed: CancellationToken,
    ) -> Self {
        let r = Uuid::new_v4();
        let b = r.as_bytes();
        let sender = RtpSender::new(
            format,
            u32::from_be_bytes([b[0], b[1], b[2], b[3]]),
            u16::from_be_bytes([b[4], b[5]]),
            u32::from_be_bytes([b[8], b[9], b[10], b[11]]),
        );
        let jitter = JitterConfig {
            max_delay: jitter_max,
            ..JitterConfig::new(format.clock_hz())
        };
        RtpPort {
            socket,
            endpoint: RtpEndpoint::new(format, peer, jitter, sender),
            rate: slin_rate(format),
            closed,
            recv: vec![0; crate::rtp::packet::MAX_DATAGRAM_BYTES],
            frame: Vec::with_capacity(format.samples_per_frame()),
            payload: BytesMut::new(),
            out: Vec::with_capacity(12 + 2 * format.samples_per_frame()),
            pacing: GapHistogram::default(),
        }
    }

    /// The send gaps so far (pacing as seen at the socket).
    #[cfg(test)]
    pub(crate) fn pacing(&self) -> &GapHistogram {
        &self.pacing
    }

    /// Counters of the stream.
    #[cfg(test)]
    pub(crate) fn stats(&self) -> crate::rtp::RtpStats {
        self.endpoint.stats()
    }

    fn audio_event(&mut self) -> MediaEvent {
        self.payload.reserve(self.frame.len() * 2);
        for &s in &self.frame {
            self.payload.put_i16_le(s);
        }
        MediaEvent::Audio {
            rate: self.rate,
            payload: self.payload.split().freeze(),
        }
    }

    /// Logs and counts what the stream saw (at its end, in the call's span).
    fn report(&self) {
        let s = self.endpoint.stats();
        let j = s.jitter;
        ::metrics::counter!(RTP_PACKETS, "direction" => "in").increment(j.packets);
        ::metrics::counter!(RTP_PACKETS, "direction" => "out").increment(s.sent);
        for (reason, n) in [
            ("foreign", s.foreign),
            ("malformed", s.malformed),
            ("other_payload", s.other_payload),
        ] {
            if n > 0 {
                ::metrics::counter!(RTP_DROPPED, "reason" => reason).increment(n);
            }
        }
        for (what, n) in [
            ("late", j.late),
            ("duplicate", j.duplicates),
            ("lost", j.lost),
            ("concealed", j.concealed),
        ] {
            if n > 0 {
                ::metrics::counter!(RTP_JITTER, "what" => what).increment(n);
            }
        }
        let ms = |q| {
            self.pacing
                .quantile(q)
                .map_or(0.0, |d: Duration| d.as_secs_f64() * 1000.0)
        };
        info!(
            sent = s.sent,
            received = j.packets,
            lost = j.lost,
            late = j.late,
            duplicates = j.duplicates,
            concealed = j.concealed,
            foreign = s.foreign,
            other_payload = s.other_payload,
            send_gaps = self.pacing.count(),
            send_gap_p1_ms = ms(0.01),
            send_gap_p50_ms = ms(0.5),
            send_gap_p99_ms = ms(0.99),
            send_gap_max_ms = ms(1.0),
            send_gap_mean_ms = self.pacing.mean().map_or(0.0, |d| d.as_secs_f64() * 1000.0),
            "rtp stream ended"
        );
    }
}

impl MediaPort for RtpPort {
    fn transport(&self) -> &'static str {
        "rtp"
    }

    /// The next 20 ms frame out of the jitter buffer, when its turn comes; datagrams are
    /// taken in meanwhile. Cancel-safe: a datagram is either fully handled or still in the
    /// socket, and the buffer's state is the port's.
    async fn read(&mut self) -> Result<Option<MediaEvent>, MediaError> {
        loop {
            let now = Instant::now();
            if self.endpoint.poll_timeout().is_some_and(|t| t <= now) {
                if self.endpoint.poll_frame(now, &mut self.frame).is_some() {
                    return Ok(Some(self.audio_event()));
                }
                continue;
            }
            let due = self.endpoint.poll_timeout();
            tokio::select! {
                biased;
                () = self.closed.cancelled() => return Ok(None),
                r = self.socket.recv_from(&mut self.recv) => match r {
                    Ok((n, from)) => {
                        let _ = self.endpoint.handle_datagram(Instant::now(), from, &self.recv[..n]);
                    }
                    // ICMP port unreachable from an earlier send (Linux reports it on an
                    // unconnected socket only with IP_RECVERR; be safe): not the caller's end.
                    Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {}
                    Err(e) => return Err(MediaError::Io(e)),
                },
                () = sleep_until(due.unwrap_or(now)), if due.is_some() => {}
            }
        }
    }

    async fn write_frame(&mut self, _rate: SlinRate, samples: &[i16]) -> std::io::Result<()> {
        self.out.clear();
        self.endpoint.send_frame(samples, &mut self.out);
        let peer = self.endpoint.peer();
        match self.socket.send_to(&self.out, peer).await {
            Ok(_) => {}
            // An ICMP error from an earlier packet: Asterisk's port not there (yet); UDP goes
            // on, the controller notices a channel that is gone.
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {}
            Err(e) => return Err(e),
        }
        self.pacing.record(Instant::now());
        Ok(())
    }

    /// RTP has no goodbye: the Stasis controller moves or hangs up the caller.
    async fn hang_up(&mut self) -> std::io::Result<()> {
        Ok(())
    }

    /// Reports the stream's counters; the socket closes (its port is free) when the port
    /// is dropped with the call.
    async fn close(&mut self) -> std::io::Result<()> {
        self.report();
        Ok(())
    }
}

/// A call whose media channel the Stasis controller set up itself (RTP, or a WebSocket
/// voicegate connected to), for [`serve`].
#[derive(Debug)]
pub struct PortCall<P> {
    /// The call id the controller issued.
    pub call_id: Uuid,
    /// Asterisk's media address (the guard screens its IP).
    pub peer: SocketAddr,
    /// The media channel.
    pub port: P,
    /// The call's profile and details when the transport brought them (the dialplan's
    /// announcement of a `WebSocket/INCOMING` channel); `None` for Stasis calls, whose
    /// directory knows them.
    pub choice: Option<crate::profiles::ProfileChoice>,
}

/// An RTP call the Stasis controller set up, for [`serve`].
pub(crate) type RtpCall = PortCall<RtpPort>;

/// Runs every [`PortCall`] from `calls` through `router` (screen, limits, directory,
/// fallback, session, accounting) until `stop`, then lets live calls finish for `grace` and
/// ends the rest. Returns when every call has ended. A call the guard refuses is dropped
/// (its port closed); the controller sends its caller to the operators.
pub async fn serve<P: MediaPort + 'static>(
    router: Arc<Router>,
    mut calls: mpsc::Receiver<PortCall<P>>,
    stop: CancellationToken,
    grace: Duration,
) {
    let tracker = TaskTracker::new();
    let hangup = CancellationToken::new();
    loop {
        tokio::select! {
            () = stop.cancelled() => break,
            call = calls.recv() => {
                let Some(call) = call else { break };
                use crate::audiosocket::server::Handler as _;
                let Some(ticket) = router.screen(call.peer) else {
                    // Refused (counted by the guard); the controller sends the caller to the
                    // operators when the call is not admitted.
                    debug!(call_id = %call.call_id, peer = %call.peer, transport = call.port.transport(), "call refused by the guard");
                    continue;
                };
                let (router, hangup) = (router.clone(), hangup.clone());
                tracker.spawn(async move {
                    router
                        .take_call_with_choice(call.port, call.call_id, call.peer, call.choice, ticket, hangup)
                        .await;
                });
            }
        }
    }
    tracker.close();
    if !tracker.is_empty() {
        info!(
            live_calls = tracker.len(),
            "externalMedia: waiting for live calls"
        );
    }
    if timeout(grace, tracker.wait()).await.is_err() {
        warn!(
            live_calls = tracker.len(),
            "externalMedia: grace period over; hanging up live calls"
        );
        hangup.cancel();
        tracker.wait().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rtp::packet::{RtpHeader, parse};

    fn loopback() -> IpAddr {
        IpAddr::from([127, 0, 0, 1])
    }

    #[tokio::test]
    async fn ports_come_from_the_range_and_run_out() {
        // Three ports somewhere free: take an ephemeral one and use it and the two above it
        // only if free; otherwise the test still checks exhaustion on what it got.
        let probe = std::net::UdpSocket::bind((loopback(), 0)).unwrap();
        let base = probe.local_addr().unwrap().port().min(65_000);
        drop(probe);
        let ports = RtpPorts::new(loopback(), base..=base + 2);
        let mut held = Vec::new();
        while let Ok(s) = ports.bind() {
            let p = s.local_addr().unwrap().port();
            assert!((base..=base + 2).contains(&p), "{p}");
            held.push(s);
            assert!(held.len() <= 3);
        }
        assert!(!held.is_empty());
        let e = ports.bind().unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::AddrInUse);
        held.pop();
        assert!(ports.bind().is_ok(), "a released port is free again");
    }

    /// The port against a fake Asterisk RTP socket on loopback: PCMA in → slin frames out of
    /// `read`, slin frames in → PCMA packets with continuous numbering out; a stranger's
    /// packets are never heard; `closed` ends the reads.
    #[tokio::test]
    async fn the_port_speaks_rtp_with_asterisk_and_ignores_strangers() {
        let asterisk = UdpSocket::bind((loopback(), 0)).await.unwrap();
        let stranger = UdpSocket::bind((loopback(), 0)).await.unwrap();
        let sock = UdpSocket::bind((loopback(), 0)).await.unwrap();
        let ours = sock.local_addr().unwrap();
        let closed = CancellationToken::new();
        let mut port = RtpPort::new(
            sock,
            asterisk.local_addr().unwrap(),
            RtpFormat::Alaw,
            Duration::from_millis(300),
            closed.clone(),
        );
        for i in 0..5u16 {
            let mut payload = Vec::new();
            RtpFormat::Alaw.encode(&[-20_000; 160], &mut payload);
            let mut d = Vec::new();
            RtpHeader::new(8, 100 + i, 160 * u32::from(i), 9).emit(&payload, &mut d);
            stranger.send_to(&d, ours).await.unwrap();
            payload.clear();
            RtpFormat::Alaw.encode(&[1_000; 160], &mut payload);
            d.clear();
            RtpHeader::new(8, 100 + i, 160 * u32::from(i), 7).emit(&payload, &mut d);
            asterisk.send_to(&d, ours).await.unwrap();
        }
        for _ in 0..5 {
            let ev = timeout(Duration::from_secs(2), port.read())
                .await
                .unwrap()
                .unwrap();
            let Some(MediaEvent::Audio { rate, payload }) = ev else {
                panic!("{ev:?}")
            };
            assert_eq!((rate, payload.len()), (SlinRate::Hz8000, 320));
            let s = i16::from_le_bytes([payload[0], payload[1]]);
            assert!(
                (s - 1_000).abs() < 64,
                "only Asterisk's audio is heard: {s}"
            );
        }
        assert_eq!(port.stats().foreign, 5);
        let mut seqs = Vec::new();
        for _ in 0..3 {
            port.write_frame(SlinRate::Hz8000, &[500; 160])
                .await
                .unwrap();
            let mut buf = [0u8; 1500];
            let (n, from) = asterisk.recv_from(&mut buf).await.unwrap();
            assert_eq!(from, ours);
            let p = parse(&buf[..n]).unwrap();
            assert_eq!((p.header.payload_type, p.payload.len()), (8, 160));
            seqs.push((p.header.sequence, p.header.timestamp, p.header.marker));
        }
        assert_eq!(seqs[1].0, seqs[0].0.wrapping_add(1));
        assert_eq!(seqs[2].1, seqs[0].1.wrapping_add(320));
        assert_eq!(
            (seqs[0].2, seqs[1].2),
            (true, false),
            "marker on the talkspurt's first"
        );
        assert_eq!(port.pacing().count(), 2);
        closed.cancel();
        assert!(
            port.read().await.unwrap().is_none(),
            "closed ends the reads"
        );
        assert_eq!(port.transport(), "rtp");
    }
}
