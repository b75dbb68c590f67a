//! The ARI controller on tokio's paused clock against the in-memory Asterisk
//! ([`crate::ari::memory`]): the setup order, the reconcile schedule, the give-up and its
//! doubling retries, the transfer's confirmation and retry, the media-join limit, the
//! orphans' second look, the session backstop and the caller lookup, each timing asserted to
//! the millisecond (every REST answer takes [`REPLY`], every event [`EVENT`]). The same
//! controller runs over HTTP against the loopback fake in `tests/suite/ari.rs` and against a
//! real Asterisk in `tests/suite/asterisk.rs`.

use super::*;
use crate::ari::memory::{EVENT, MemoryAsterisk, REPLY};
use tokio::time::sleep_until;

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

/// Where Asterisk's externalMedia connects (nothing listens: the tests admit the call id
/// themselves, as the listener would).
const LISTEN: &str = "127.0.0.1:9092";

struct Harness {
    ast: Arc<MemoryAsterisk>,
    ctl: Controller,
    link: watch::Sender<LinkState>,
    stop: CancellationToken,
    t0: Instant,
    unserved: Arc<Mutex<Vec<Unserved>>>,
}

impl Harness {
    /// A controller on `[ari]` defaults edited by `edit`, its event loop running in Stasis
    /// mode; the events link is not up until [`Harness::link`] says so.
    fn start(edit: impl FnOnce(&mut AriConfig)) -> Harness {
        let mut cfg = AriConfig {
            password: crate::secret::SecretSource::Inline("in-memory".into()),
            ..AriConfig::default()
        };
        edit(&mut cfg);
        cfg.validate().expect("a valid [ari]");
        let (tx, rx) = mpsc::channel(events::EVENT_QUEUE);
        let ast = MemoryAsterisk::new(&cfg.app, tx);
        let client = AriClient::in_memory(ast.clone(), cfg.request_timeout());
        let unserved = Arc::new(Mutex::new(Vec::new()));
        let kept = unserved.clone();
        let hooks = Hooks {
            route: None,
            report: Some(Arc::new(move |u| kept.lock().unwrap().push(u))),
        };
        let settings = AriSettings::from_config(&cfg, LISTEN.parse().unwrap());
        let ctl = Controller::build(
            client,
            settings,
            Arc::new(NextStore::new()),
            hooks,
            (None, None),
        );
        let (link, link_rx) = watch::channel(LinkState::Connecting);
        let stop = CancellationToken::new();
        if cfg.mode == AriMode::Stasis {
            tokio::spawn(ctl.clone().run(rx, link_rx, stop.clone()));
        }
        Harness {
            ast,
            ctl,
            link,
            stop,
            t0: Instant::now(),
            unserved,
        }
    }

    /// [`Harness::start`], the events link up at once, and a caller's call live at 1 s
    /// ([`Harness::call_at`]).
    async fn live(edit: impl FnOnce(&mut AriConfig)) -> (Harness, String, Uuid, CancellationToken) {
        let h = Harness::start(edit);
        h.link(LinkState::Up);
        let (caller, id, end) = h.call_at(ms(1_000)).await;
        (h, caller, id, end)
    }

    /// Waits until `at` after the start.
    async fn at(&self, at: Duration) {
        sleep_until(self.t0 + at).await;
    }

    /// The events link reports `state`.
    fn link(&self, state: LinkState) {
        self.link.send_replace(state);
    }

    /// A caller enters the application at `at`; the AudioSocket connection of its
    /// externalMedia channel arrives once Asterisk answered the request (`admit`). Returns
    /// the caller's channel, the call id and the session's end token.
    async fn call_at(&self, at: Duration) -> (String, Uuid, CancellationToken) {
        self.at(at).await;
        let caller = self.ast.caller_enters("+15551230001", true);
        let before = self.ast.media_data().len();
        while self.ast.media_data().len() == before {
            tokio::time::sleep(ms(1)).await;
        }
        let id: Uuid = self.ast.media_data()[before].parse().unwrap();
        let end = CancellationToken::new();
        match self.ctl.admit(id, end.clone()).await {
            Admission::Accept(d) => assert_eq!(d.caller_number.as_deref(), Some("+15551230001")),
            Admission::Reject => panic!("the controller's own call id was rejected"),
        }
        (caller, id, end)
    }

    /// The session of call `id` ends with `outcome` now.
    fn finish(&self, id: Uuid, outcome: Outcome) {
        let mut summary = CallSummary::without_agent(id, "test", outcome);
        self.ctl.finished(&mut summary);
    }
}

impl Drop for Harness {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// Lets every task woken at this instant run (the clock stays where it is).
async fn settle() {
    for _ in 0..10 {
        tokio::task::yield_now().await;
    }
}

fn ends_with(suffix: &'static str) -> impl Fn(&str) -> bool {
    move |l: &str| l.ends_with(suffix)
}

fn is(line: &'static str) -> impl Fn(&str) -> bool {
    move |l: &str| l == line
}

/// Setup: answer, bridge, externalMedia one after the other, and `addChannel` only once the
/// externalMedia channel's own `StasisStart` arrived (before it Asterisk answers 422).
#[tokio::test(start_paused = true)]
async fn setup_bridges_the_media_channel_only_after_its_stasis_start() {
    let h = Harness::start(|_| {});
    let t = ms(1_000);
    let (caller, id, _end) = h.call_at(t).await;
    h.at(ms(2_000)).await;
    // The caller's StasisStart reaches the controller EVENT after it entered.
    assert_eq!(h.ast.times(ends_with("/answer")), [t + EVENT]);
    assert_eq!(h.ast.times(is("POST /bridges")), [t + EVENT + REPLY]);
    let media_at = t + EVENT + REPLY * 2;
    assert_eq!(h.ast.times(is("POST /channels/externalMedia")), [media_at]);
    // Answered at media_at + REPLY; its StasisStart arrives EVENT later.
    assert_eq!(
        h.ast.times(ends_with("/addChannel")),
        [media_at + REPLY + EVENT]
    );
    let added = h.ast.requests();
    let added = added
        .iter()
        .find(|l| l.line.ends_with("/addChannel"))
        .unwrap();
    assert!(added.query[0].1.starts_with(&format!("{caller},")));
    assert_eq!(h.ast.media_data(), [id.to_string()]);
    assert_eq!(h.ctl.read(id, |c| c.phase), Some(Phase::Live));
    assert_eq!(h.ast.counts(), (2, 1));
}

/// A pass when the link comes up, again only after it was down, and every
/// `reconcile_interval` after the last pass ended in any case.
#[tokio::test(start_paused = true)]
async fn reconcile_passes_when_the_link_comes_up_and_every_interval() {
    let h = Harness::start(|c| c.reconcile_interval_ms = 10_000);
    // The interval holds before the link ever came up.
    h.at(ms(3_000)).await;
    assert!(h.ast.times(is("GET /channels")).is_empty());
    h.link(LinkState::Up);
    h.at(ms(5_000)).await;
    // Up again without a Down in between: nothing missed, no pass.
    h.link(LinkState::Up);
    h.at(ms(15_000)).await;
    h.link(LinkState::Down);
    h.at(ms(16_000)).await;
    h.link(LinkState::Up);
    h.at(ms(40_000)).await;
    // A pass lists the channels, then the bridges (orphans): it ends 2 × REPLY after it began.
    let pass = REPLY * 2;
    let interval = ms(10_000);
    let first = ms(3_000);
    let after_first = first + pass + interval;
    let again = ms(16_000);
    assert_eq!(
        h.ast.times(is("GET /channels")),
        [
            first,
            after_first,
            again,
            again + pass + interval,
            again + (pass + interval) * 2
        ]
    );
    assert_eq!(h.ctl.stats().reconciles, 5);
}

/// ARI hangs at the end of a call: each request waits `request_timeout_ms`, the caller is
/// given up on after four, then reconcile passes retry [`RETRY_INITIAL`] after the give-up
/// and then with a doubling wait, one `GET /channels` each and nothing in between, until
/// ARI answers and the caller reaches the operators; what the hang left behind is cleaned up.
#[tokio::test(start_paused = true)]
async fn hung_ari_gives_up_then_retries_with_a_doubling_wait_until_the_caller_is_moved() {
    const TIMEOUT: Duration = Duration::from_millis(500);
    let (h, caller, id, _end) = Harness::live(|c| c.request_timeout_ms = 500).await;
    h.at(ms(2_000)).await;
    h.ast.set_hung(true);
    h.finish(id, Outcome::Fallback("agent failed".into()));
    // removeChannel, continue, continue, DELETE: four timeouts, then the give-up.
    let gave_up = ms(2_000) + TIMEOUT * 4;
    h.at(gave_up - ms(1)).await;
    assert_eq!(h.ctl.given_up_callers(), 0);
    h.at(gave_up).await;
    settle().await;
    assert_eq!(h.ctl.given_up_callers(), 1);
    assert_eq!(
        h.ast.times(ends_with("/continue")),
        [ms(2_000) + TIMEOUT, ms(2_000) + TIMEOUT * 2]
    );
    h.at(ms(20_000)).await;
    h.ast.set_hung(false);
    h.at(ms(60_000)).await;
    let first = gave_up + RETRY_INITIAL;
    let second = first + TIMEOUT + RETRY_INITIAL * 2;
    let third = second + TIMEOUT + RETRY_INITIAL * 4;
    let fourth = third + TIMEOUT + RETRY_INITIAL * 8;
    let lists = h.ast.times(is("GET /channels"));
    // The link-up pass at 0, the four retries, the orphans' second look.
    let recheck = fourth + REPLY * 2 + REPLY + ORPHAN_RECHECK;
    assert_eq!(lists, [ms(0), first, second, third, fourth, recheck]);
    // Nothing at all between the clean-up's last timeout and the first retry: no busy loop.
    let quiet = h
        .ast
        .requests()
        .into_iter()
        .filter(|l| l.at > gave_up + TIMEOUT * 2 && l.at < first)
        .count();
    assert_eq!(quiet, 0);
    // The fourth pass moved the caller.
    let moved = h.ast.times(ends_with("/continue"));
    assert_eq!(moved.last(), Some(&(fourth + REPLY)));
    assert_eq!(
        h.ast.whereabouts(&caller),
        Some(("voicegate-transfer".into(), "Queue".into()))
    );
    assert_eq!(h.ctl.given_up_callers(), 0);
    // The bridge and the externalMedia channel the hang left: destroyed after the second look.
    assert_eq!(h.ast.counts(), (1, 0));
    let s = h.ctl.stats();
    assert_eq!(
        (s.given_up, s.transfers, s.transfer_failures),
        (1, 1, 1),
        "{s:?}"
    );
    assert_eq!(h.ctl.tracked_calls(), 0);
}

/// `continue` accepted but its `StasisEnd` lost: the transfer is asked again exactly
/// `transfer_confirm_ms` later; Asterisk's 409 (no longer in Stasis) means it did move.
#[tokio::test(start_paused = true)]
async fn unconfirmed_transfer_is_asked_again_after_transfer_confirm() {
    let (h, caller, id, _end) = Harness::live(|c| c.transfer_confirm_ms = 1_500).await;
    h.at(ms(2_000)).await;
    h.ast.lose_stasis_end_of_continue();
    h.finish(id, Outcome::Fallback("agent failed".into()));
    h.at(ms(10_000)).await;
    // removeChannel first, then continue; the second continue transfer_confirm after the
    // first was answered.
    let first = ms(2_000) + REPLY;
    assert_eq!(
        h.ast.times(ends_with("/continue")),
        [first, first + REPLY + ms(1_500)]
    );
    assert_eq!(
        h.ast.whereabouts(&caller).map(|w| w.1),
        Some("Queue".into())
    );
    let s = h.ctl.stats();
    assert_eq!((s.transfers, s.transfer_failures, s.hangups), (1, 0, 0));
    assert_eq!(h.ast.counts(), (1, 0));
    assert_eq!(h.ctl.tracked_calls(), 0);
}

/// `continue` refused twice: the caller is hung up at once, never left in silence.
#[tokio::test(start_paused = true)]
async fn transfer_refused_twice_hangs_the_caller_up() {
    let (h, caller, id, _end) = Harness::live(|_| {}).await;
    h.at(ms(2_000)).await;
    h.ast.fail_continue(2);
    h.finish(id, Outcome::Fallback("agent failed".into()));
    h.at(ms(5_000)).await;
    let first = ms(2_000) + REPLY;
    assert_eq!(h.ast.times(ends_with("/continue")), [first, first + REPLY]);
    let hangup = format!("DELETE /channels/{caller}");
    assert_eq!(h.ast.times(|l| l == hangup), [first + REPLY * 2]);
    assert_eq!(h.ast.whereabouts(&caller), None);
    let s = h.ctl.stats();
    assert_eq!((s.transfers, s.transfer_failures, s.hangups), (0, 1, 1));
}

/// The agent ended the call: the caller is hung up at once, not transferred.
#[tokio::test(start_paused = true)]
async fn agent_ended_call_is_hung_up_at_once() {
    let (h, caller, id, _end) = Harness::live(|_| {}).await;
    h.at(ms(2_000)).await;
    h.finish(id, Outcome::AgentEnded("goodbye".into()));
    h.at(ms(3_000)).await;
    let hangup = format!("DELETE /channels/{caller}");
    assert_eq!(h.ast.times(|l| l == hangup), [ms(2_000)]);
    assert!(h.ast.times(ends_with("/continue")).is_empty());
    assert_eq!(h.ast.counts(), (0, 0));
    assert_eq!(h.ctl.stats().hangups, 1);
}

/// The externalMedia channel never enters the application: `media_join_timeout_ms` after
/// Asterisk answered the request, the caller goes to the operators and is counted as
/// unserved with the reason.
#[tokio::test(start_paused = true)]
async fn media_channel_that_never_joins_sends_the_caller_on_after_media_join_timeout() {
    let h = Harness::start(|c| c.media_join_timeout_ms = 1_200);
    h.link(LinkState::Up);
    h.ast.media_never_joins();
    h.at(ms(1_000)).await;
    let caller = h.ast.caller_enters("+15551230002", true);
    h.at(ms(5_000)).await;
    let answered = ms(1_000) + EVENT + REPLY * 3;
    // removeChannel (a 422: the caller was never bridged), then continue.
    let removed = h.ast.times(ends_with("/removeChannel"));
    assert_eq!(removed, [answered + ms(1_200)]);
    assert_eq!(
        h.ast.times(ends_with("/continue")),
        [answered + ms(1_200) + REPLY]
    );
    assert!(h.ast.times(ends_with("/addChannel")).is_empty());
    assert_eq!(
        h.ast.whereabouts(&caller),
        Some(("voicegate-transfer".into(), "Queue".into()))
    );
    let unserved = h.unserved.lock().unwrap().clone();
    assert_eq!(unserved.len(), 1);
    // From its StasisStart's arrival to the decision.
    assert_eq!(unserved[0].duration, REPLY * 3 + ms(1_200));
    assert_eq!(unserved[0].caller_number.as_deref(), Some("+15551230002"));
    let reason = unserved[0].reason.to_string();
    assert!(reason.contains("no StasisStart within 1200 ms"), "{reason}");
    assert_eq!(h.ast.counts(), (1, 0));
}

/// Orphans found when the link comes up are acted on only if still orphaned
/// [`ORPHAN_RECHECK`] later: a caller whose `StasisStart` was on its way at either look is
/// left alone.
#[tokio::test(start_paused = true)]
async fn orphans_are_moved_only_after_a_second_look() {
    let h = Harness::start(|_| {});
    let orphan = h.ast.caller_enters("+15551230003", false);
    let old = h.ast.leftover_bridge("voicegate-0b7e5a41-old");
    h.at(ms(1_000)).await;
    // Listed by the pass before its StasisStart reaches the controller (EVENT > 2 × REPLY).
    let late = h.ast.caller_enters("+15551230004", true);
    h.link(LinkState::Up);
    let look = ms(1_000);
    let second = look + REPLY * 2 + ORPHAN_RECHECK;
    // Listed by the second look only (a caller's StasisStart on its way, a bridge): not
    // orphaned the first time, so left for the next pass.
    h.at(second - ms(1)).await;
    let newcomer = h.ast.caller_enters("+15551230007", true);
    let fresh = h.ast.leftover_bridge("voicegate-5d1c9e20-fresh");
    h.at(ms(10_000)).await;
    assert_eq!(h.ast.times(is("GET /channels")), [look, second]);
    let moved = format!("POST /channels/{orphan}/continue");
    assert_eq!(h.ast.times(|l| l == moved), [second + REPLY * 2]);
    let destroyed = format!("DELETE /bridges/{old}");
    assert_eq!(h.ast.times(|l| l == destroyed), [second + REPLY * 3]);
    let kept = format!("DELETE /bridges/{fresh}");
    assert!(h.ast.times(|l| l == kept).is_empty());
    for left_alone in [&late, &newcomer] {
        let moved = format!("POST /channels/{left_alone}/continue");
        assert!(h.ast.times(|l| l == moved).is_empty());
        let app = h.ast.whereabouts(left_alone).map(|w| w.1);
        assert_eq!(app.as_deref(), Some("Stasis"));
    }
    assert_eq!(h.ctl.stats().transfers, 1);
}

/// A `StasisEnd` lost on a link that never reported itself down: the periodic pass finds
/// the caller gone, cleans up, and ends the session [`SESSION_END_BACKSTOP`] after the
/// clean-up if Asterisk's socket close does not.
#[tokio::test(start_paused = true)]
async fn lost_stasis_end_is_found_by_the_periodic_pass_and_the_session_ended() {
    let (h, caller, id, end) = Harness::live(|c| c.reconcile_interval_ms = 10_000).await;
    h.at(ms(3_000)).await;
    h.ast.lose_events(true);
    h.ast.hang_up(&caller);
    let pass = ms(10_000) + REPLY * 2;
    h.at(pass + REPLY).await;
    assert_eq!(h.ast.times(is("GET /channels")), [ms(0), pass]);
    // DELETE the bridge, then the externalMedia channel, then the backstop's wait.
    let cleaned = pass + REPLY * 3;
    h.at(cleaned + SESSION_END_BACKSTOP - ms(1)).await;
    assert!(!end.is_cancelled());
    h.at(cleaned + SESSION_END_BACKSTOP).await;
    settle().await;
    assert!(end.is_cancelled());
    assert_eq!(h.ast.counts(), (0, 0));
    h.finish(id, Outcome::CallerHungUp);
    assert_eq!(h.ctl.tracked_calls(), 0);
}

/// `AudioSocket()` callers (modes 1 and 2): calls arriving together share one
/// `GET /channels`, a list answers for [`CHANNEL_CACHE_TTL`], and a hung ARI delays a call
/// by `lookup_timeout_ms` at most.
#[tokio::test(start_paused = true)]
async fn lookups_share_one_channel_list_and_a_hung_ari_costs_lookup_timeout() {
    let h = Harness::start(|c| {
        c.mode = AriMode::Lookup;
        c.lookup_timeout_ms = 300;
    });
    let (a, b, c) = (Uuid::new_v4(), Uuid::new_v4(), Uuid::new_v4());
    h.ast.audiosocket_caller("+15551230005", &a.to_string());
    h.ast.audiosocket_caller("+15551230006", &b.to_string());
    let number = |adm: Admission| match adm {
        Admission::Accept(d) => d.caller_number,
        Admission::Reject => panic!("rejected"),
    };
    let end = CancellationToken::new;
    let (na, nb) = tokio::join!(h.ctl.admit(a, end()), h.ctl.admit(b, end()));
    assert_eq!(number(na).as_deref(), Some("+15551230005"));
    assert_eq!(number(nb).as_deref(), Some("+15551230006"));
    h.at(CHANNEL_CACHE_TTL - ms(1)).await;
    assert_eq!(
        number(h.ctl.admit(b, end()).await).as_deref(),
        Some("+15551230006")
    );
    assert_eq!(h.ast.times(is("GET /channels")), [ms(0)]);
    h.at(ms(2_500)).await;
    h.ctl.admit(a, end()).await;
    assert_eq!(h.ast.times(is("GET /channels")), [ms(0), ms(2_500)]);
    assert_eq!(h.ctl.stats().lookups_fetched, 2);
    h.at(ms(5_000)).await;
    h.ast.set_hung(true);
    let asked = Instant::now();
    assert_eq!(number(h.ctl.admit(c, end()).await), None);
    assert_eq!(asked.elapsed(), ms(300));
}
