//! The drop-in monitoring under `monitoring/`: the Grafana dashboard is valid JSON of the
//! dashboard model (unique panel ids, every panel queried, laid out on the 24-column grid
//! without overlap) and queries only metrics voicegate emits; the Prometheus alert rules
//! pass `promtool check rules` and their unit tests (`promtool test rules`), and use only
//! metrics voicegate emits.

use crate::skip;

use serde_json::Value;
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Every `"voicegate_…"` string literal in `src/`: the metric names the code emits.
fn emitted() -> BTreeSet<String> {
    fn walk(dir: &Path, out: &mut BTreeSet<String>) {
        for e in std::fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                walk(&p, out);
            } else if p.extension().is_some_and(|x| x == "rs") {
                let text = std::fs::read_to_string(&p).unwrap();
                for piece in text.split("\"voicegate_").skip(1) {
                    let name: String = piece
                        .chars()
                        .take_while(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '_')
                        .collect();
                    if piece[name.len()..].starts_with('"') {
                        out.insert(format!("voicegate_{name}"));
                    }
                }
            }
        }
    }
    let mut out = BTreeSet::new();
    walk(&root().join("src"), &mut out);
    out
}

/// The `voicegate_…` metric names a query text uses, with a histogram's `_bucket`, `_sum`
/// and `_count` series named by the histogram.
fn used(text: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for piece in text.split("voicegate_").skip(1) {
        let name: String = piece
            .chars()
            .take_while(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '_')
            .collect();
        let name = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|s| name.strip_suffix(s))
            .unwrap_or(&name)
            .to_owned();
        out.insert(format!("voicegate_{name}"));
    }
    out
}

#[test]
fn the_metric_scan_finds_what_the_code_emits() {
    let names = emitted();
    for n in [
        "voicegate_calls_total",
        "voicegate_turn_latency_seconds",
        "voicegate_webhook_backlog_events",
        "voicegate_wireguard_peer_up",
    ] {
        assert!(names.contains(n), "{n} not found in src/: {names:?}");
    }
    assert!(!names.contains("voicegate_no_such_metric"));
    assert_eq!(
        used("histogram_quantile(0.5, rate(voicegate_turn_latency_seconds_bucket[5m]))"),
        BTreeSet::from(["voicegate_turn_latency_seconds".to_owned()])
    );
}

#[test]
fn the_dashboard_is_valid_and_queries_only_emitted_metrics() {
    let text = std::fs::read_to_string(root().join("monitoring/voicegate-dashboard.json"))
        .expect("monitoring/voicegate-dashboard.json");
    let dash: Value = serde_json::from_str(&text).expect("the dashboard is JSON");
    assert!(dash["title"].is_string() && dash["uid"].is_string());
    assert!(dash["schemaVersion"].as_u64().unwrap() >= 36);
    let vars: Vec<&str> = dash["templating"]["list"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["name"].as_str().unwrap())
        .collect();
    assert!(
        vars.contains(&"datasource") && vars.contains(&"instance"),
        "{vars:?}"
    );
    let panels = dash["panels"].as_array().unwrap();
    let mut ids = BTreeSet::new();
    let mut cells = BTreeSet::new();
    let mut queried = BTreeSet::new();
    for p in panels {
        let id = p["id"].as_u64().expect("panel id");
        assert!(ids.insert(id), "panel id {id} used twice");
        let title = p["title"].as_str().expect("panel title");
        let g = &p["gridPos"];
        let (x, y, w, h) = (
            g["x"].as_u64().unwrap(),
            g["y"].as_u64().unwrap(),
            g["w"].as_u64().unwrap(),
            g["h"].as_u64().unwrap(),
        );
        assert!(w > 0 && h > 0 && x + w <= 24, "{title}: gridPos {g}");
        for cx in x..x + w {
            for cy in y..y + h {
                assert!(cells.insert((cx, cy)), "{title} overlaps another panel");
            }
        }
        if p["type"] == "row" {
            continue;
        }
        assert!(
            ["timeseries", "stat", "gauge", "bargauge", "table"]
                .contains(&p["type"].as_str().unwrap()),
            "{title}: type {}",
            p["type"]
        );
        let targets = p["targets"].as_array().expect("targets");
        assert!(!targets.is_empty(), "{title} queries nothing");
        let mut refs = BTreeSet::new();
        for t in targets {
            assert!(
                refs.insert(t["refId"].as_str().unwrap()),
                "{title}: refId twice"
            );
            let expr = t["expr"].as_str().expect("expr");
            let names = used(expr);
            assert!(
                !names.is_empty(),
                "{title}: {expr} uses no voicegate metric"
            );
            queried.extend(names);
        }
    }
    let emitted = emitted();
    let missing: Vec<_> = queried.difference(&emitted).collect();
    assert!(
        missing.is_empty(),
        "the dashboard queries metrics voicegate does not emit: {missing:?}"
    );
    // What issue 19 asks the dashboard to show, each by at least one metric.
    for m in [
        "voicegate_calls_total",
        "voicegate_fallbacks_total",
        "voicegate_breaker_open",
        "voicegate_turn_latency_seconds",
        "voicegate_playout_lateness_seconds",
        "voicegate_underruns_total",
        "voicegate_provider_errors_total",
        "voicegate_budget_used_seconds",
        "voicegate_wireguard_peer_up",
        "voicegate_webhook_backlog_events",
    ] {
        assert!(queried.contains(m), "the dashboard does not show {m}");
    }
}

#[test]
fn the_alert_rules_pass_promtool_and_use_only_emitted_metrics() {
    let rules = root().join("monitoring/alerts.yml");
    let text = std::fs::read_to_string(&rules).unwrap();
    let emitted = emitted();
    let missing: Vec<_> = used(&text)
        .into_iter()
        .filter(|m| !emitted.contains(m))
        .collect();
    assert!(
        missing.is_empty(),
        "alerts.yml uses metrics voicegate does not emit: {missing:?}"
    );
    for alert in [
        "VoicegateBreakerOpen",
        "VoicegateFallbackRatioHigh",
        "VoicegateProviderErrors",
        "VoicegateRestarting",
        "VoicegateBudgetNearlySpent",
        "VoicegateWebhookBacklog",
    ] {
        assert!(text.contains(&format!("alert: {alert}\n")), "no {alert}");
    }
    if Command::new("promtool").arg("--version").output().is_err() {
        skip::skip(
            "the_alert_rules_pass_promtool_and_use_only_emitted_metrics",
            "promtool not installed (Debian package prometheus)",
        );
        return;
    }
    for args in [
        ["check", "rules", "monitoring/alerts.yml"],
        ["test", "rules", "monitoring/alerts_test.yml"],
    ] {
        let out = Command::new("promtool")
            .args(args)
            .current_dir(root())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "promtool {args:?}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}
