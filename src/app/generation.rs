//! What new calls get ([`Generation`]): built at start and again on every SIGHUP reload,
//! and the ARI controller's hooks that route and account Stasis callers like any call.

use crate::call::route::{Generation, ServerParams};
use crate::config::Config;
use crate::fallback::Breaker;
use crate::guard::Guard;
use crate::health::HealthState;
use std::path::Path;
use std::sync::Arc;
use tokio::sync::watch;
use tracing::warn;

/// The [`Generation`] new calls get under `config`.
///
/// # Errors
/// If the `[[tools]]` or a profile's agent cannot be built.
pub(crate) fn generation(
    config: &Config,
    agent: crate::agent::SharedAgent,
) -> anyhow::Result<Generation> {
    let tools = Arc::new(crate::tools::ToolRegistry::from_config(&config.tools)?);
    let mut params = ServerParams::from_config(&config.audiosocket).with_tools(tools.clone());
    params.session.max_duration = config.guard.max_call();
    params.session.agent_silence = config.fallback.agent_silence();
    let profiles = crate::profiles::Profiles::build(
        agent.clone(),
        &config.profiles,
        &config.profile_routing,
        &tools,
    )?;
    Ok(Generation {
        agent,
        params: Arc::new(params),
        fallback: config.fallback.clone(),
        profiles: Some(Arc::new(profiles)),
    })
}

/// The ARI controller's hooks: a new Stasis caller is routed like any call (maintenance or
/// an open breaker: straight to the operators, nothing set up), and a caller sent to the
/// operators before a session ran for it is counted and recorded as a fallback with its
/// reason.
pub(crate) fn ari_hooks(
    generation: watch::Receiver<Arc<Generation>>,
    breaker: Arc<Breaker>,
    summaries: crate::call::route::SummaryTx,
) -> crate::call::stasis::Hooks {
    use crate::fallback::Route;
    use crate::health::metrics as m;
    let current = generation.clone();
    crate::call::stasis::Hooks {
        route: Some(Arc::new(move || {
            match crate::fallback::route(&generation.borrow().fallback, &breaker) {
                Route::Fallback(reason) => Some(reason),
                Route::Agent => None,
            }
        })),
        report: Some(Arc::new(move |u: crate::call::stasis::Unserved| {
            let agent = current.borrow().agent.name();
            let mut s = crate::call::CallSummary::without_agent(
                u.call_id,
                agent,
                crate::call::Outcome::Fallback(u.reason.to_string()),
            );
            s.started = u.started;
            s.duration = u.duration;
            s.caller_number = u.caller_number;
            ::metrics::counter!(m::CALLS_TOTAL, "outcome" => "fallback").increment(1);
            ::metrics::counter!(m::FALLBACKS, "reason" => u.reason.label()).increment(1);
            s.fallback = Some(u.reason);
            summaries.send(s);
        })),
    }
}

/// Re-reads the config for SIGHUP: the new agent, limits and switches apply to new calls.
///
/// # Errors
/// If the file cannot be loaded or the agent or tools cannot be built; nothing changes then.
pub(crate) fn reload(
    old: &Config,
    path: Option<&Path>,
    guard: &Guard,
    breaker: &Breaker,
    health: &HealthState,
    gen_tx: &watch::Sender<Arc<Generation>>,
) -> anyhow::Result<Config> {
    let mut new = Config::load(path)?;
    console_maintenance(&mut new, &old.state.dir());
    warn_plaintext_secrets(&new);
    let agent = crate::agent::from_config(&new.agent)?;
    if new.audiosocket.listen != old.audiosocket.listen
        || new.health.listen != old.health.listen
        || new.health.enabled != old.health.enabled
        || new.state.dir != old.state.dir
        || new.records != old.records
    {
        warn!("listen addresses, [state] and [records] changes take effect on restart");
    }
    guard.reconfigure(new.guard.clone());
    breaker.reconfigure(&new.fallback);
    health.set_maintenance(new.fallback.maintenance);
    if new.fallback.maintenance {
        warn!("maintenance switch on: every call goes to the operators");
    }
    gen_tx.send_replace(Arc::new(generation(&new, agent)?));
    Ok(new)
}

/// With the console on, the maintenance switch it saved in `state_dir` wins over
/// `fallback.maintenance` ([`crate::console::saved_maintenance`]).
pub(crate) fn console_maintenance(config: &mut Config, state_dir: &Path) {
    if config.console.enabled {
        let on = crate::console::effective_maintenance(config.fallback.maintenance, state_dir);
        config.fallback.maintenance = on;
    }
}

/// Warns about every URL that would carry an API key or password unencrypted to another
/// machine ([`Config::plaintext_secret_urls`]).
pub(crate) fn warn_plaintext_secrets(config: &Config) {
    for (key, url) in config.plaintext_secret_urls() {
        warn!(%key, %url, "a secret will be sent unencrypted (ws:// or http://) to a host that is not loopback; use wss:// or https://");
    }
}
