//! The drop-in Asterisk configs in `asterisk/` hang together: every context a `Goto`,
//! `GotoIf`, `DIALPLAN_EXISTS`, `Dial(Local/…)` or a `context =` setting names exists; every
//! queue the dialplan uses is defined; queue members are defined endpoints; and the names
//! voicegate's defaults use (Stasis app, ARI user, transfer context) match the files.

use std::collections::{BTreeSet, HashMap};
use std::path::PathBuf;
use voicegate::config::AriConfig;

fn read(name: &str) -> String {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("asterisk")
        .join(name);
    std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

/// Sections of an Asterisk .conf file: `[name]` or `[name](template)` → their lines
/// (comments stripped). Section names may repeat (pjsip), lines are merged.
fn sections(text: &str) -> HashMap<String, Vec<String>> {
    let mut out: HashMap<String, Vec<String>> = HashMap::new();
    let mut current = None;
    for raw in text.lines() {
        let line = raw.split(';').next().unwrap_or("").trim();
        if line.is_empty() {
            continue;
        }
        if let Some(rest) = line.strip_prefix('[') {
            let name = rest.split(']').next().unwrap().to_owned();
            assert!(!name.is_empty(), "empty section name: {raw}");
            out.entry(name.clone()).or_default();
            current = Some(name);
            continue;
        }
        let sec = current
            .clone()
            .unwrap_or_else(|| panic!("line outside a section: {raw}"));
        out.get_mut(&sec).unwrap().push(line.to_owned());
    }
    out
}

/// Balanced parentheses and brackets on every line.
fn assert_balanced(file: &str, text: &str) {
    for raw in text.lines() {
        let line = raw.split(';').next().unwrap_or("");
        let mut depth = 0i32;
        for c in line.chars() {
            match c {
                '(' | '[' | '{' => depth += 1,
                ')' | ']' | '}' => depth -= 1,
                _ => {}
            }
            assert!(depth >= 0, "{file}: unbalanced: {raw}");
        }
        assert_eq!(depth, 0, "{file}: unbalanced: {raw}");
    }
}

/// `ctx,ext,prio` targets inside `Goto(...)` / the branches of `GotoIf(...)`.
fn goto_targets(line: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for (app, branches) in [("GotoIf(", true), ("Goto(", false)] {
        let mut rest = line;
        while let Some(i) = rest.find(app) {
            let after = &rest[i + app.len()..];
            // The argument ends at the matching ')'.
            let mut depth = 1;
            let end = after
                .char_indices()
                .find_map(|(j, c)| {
                    match c {
                        '(' => depth += 1,
                        ')' => depth -= 1,
                        _ => {}
                    }
                    (depth == 0).then_some(j)
                })
                .expect("closing paren");
            let arg = &after[..end];
            let dests: Vec<&str> = if branches {
                arg.rsplit_once('?')
                    .map(|(_, d)| d.split(':').collect())
                    .unwrap_or_default()
            } else {
                vec![arg]
            };
            for d in dests {
                let parts: Vec<&str> = d.split(',').collect();
                if parts.len() == 3 {
                    out.push((parts[0].trim().to_owned(), parts[1].trim().to_owned()));
                }
            }
            rest = &after[end..];
            if branches {
                // Don't let the Goto( search re-find the GotoIf( we just handled.
                break;
            }
        }
    }
    out
}

/// Extensions defined in a context: `exten => NAME,`.
fn extensions(lines: &[String]) -> BTreeSet<String> {
    lines
        .iter()
        .filter_map(|l| l.strip_prefix("exten"))
        .filter_map(|l| l.trim_start().strip_prefix("=>"))
        .filter_map(|l| l.split(',').next())
        .map(|e| e.trim().to_owned())
        .collect()
}

#[test]
fn every_referenced_context_exists() {
    let ext_text = read("extensions.conf");
    for f in [
        "extensions.conf",
        "pjsip.conf",
        "queues.conf",
        "ari.conf",
        "http.conf",
    ] {
        assert_balanced(f, &read(f));
    }
    let ext = sections(&ext_text);
    let mut checked = 0;
    for (ctx, lines) in &ext {
        for line in lines {
            for (target, exten) in goto_targets(line) {
                if target.contains("${") {
                    continue;
                }
                let exts = extensions(ext.get(&target).unwrap_or_else(|| {
                    panic!("[{ctx}] goes to missing context [{target}]: {line}")
                }));
                if !exten.contains("${") {
                    assert!(
                        exts.contains(&exten),
                        "[{ctx}] goes to {target},{exten} which has no such extension"
                    );
                }
                checked += 1;
            }
            if let Some(i) = line.find("DIALPLAN_EXISTS(") {
                let target = line[i + 16..].split(',').next().unwrap();
                assert!(
                    ext.contains_key(target),
                    "[{ctx}] checks missing context [{target}]"
                );
            }
        }
    }
    assert!(checked >= 15, "only {checked} gotos found: parser broken?");

    // The contexts the issue names, and the one voicegate's ARI transfer targets by default.
    let ari = AriConfig::default();
    for c in [
        "voicegate-entry",
        "voicegate-transfer",
        "voicegate-operators",
        "voicegate-app",
        "voicegate-driver",
        "voicegate-stasis",
        &ari.transfer_context,
    ] {
        assert!(ext.contains_key(c), "missing [{c}]");
    }
    assert!(
        extensions(&ext[&ari.transfer_context]).contains(&ari.transfer_extension),
        "[{}] has no extension {}",
        ari.transfer_context,
        ari.transfer_extension
    );
    assert!(
        ext_text.contains(&format!("Stasis({})", ari.app))
            || ext_text.contains(&format!("Stasis({},", ari.app)),
        "dialplan runs a different Stasis app"
    );
    // Mode 1 is protected by TryExec, mode 2 by Dial's g option, as asterisk.md requires.
    assert!(ext_text.contains("TryExec(AudioSocket("));
    assert!(ext_text.contains("/c(slin16),,g)"));
    assert!(ext_text.contains("/v1/calls/${AS_UUID}/next"));

    // pjsip endpoints land in contexts that exist.
    let pjsip_text = read("pjsip.conf");
    let pjsip = sections(&pjsip_text);
    let mut contexts = 0;
    for (name, lines) in &pjsip {
        for l in lines {
            if let Some(ctx) = l.strip_prefix("context") {
                let ctx = ctx.trim_start_matches([' ', '=']).trim();
                assert!(
                    ext.contains_key(ctx),
                    "pjsip [{name}] context {ctx} missing"
                );
                contexts += 1;
            }
        }
    }
    assert!(contexts >= 2);
    assert!(
        pjsip_text.contains("context = voicegate-entry"),
        "the example trunk must land in [voicegate-entry]"
    );
    // Everything the project ships lives in its own contexts (issue 12): included into a
    // PBX's dialplan it can neither shadow nor be shadowed by the PBX's own contexts.
    for ctx in ext.keys() {
        assert!(
            ctx == "globals" || ctx.starts_with("voicegate-"),
            "[{ctx}] is not a voicegate-* context"
        );
    }

    // Queues used in the dialplan exist; their members are pjsip endpoints.
    let queues = sections(&read("queues.conf"));
    let globals = &ext["globals"];
    let global = |name: &str| {
        globals
            .iter()
            .find_map(|l| l.strip_prefix(&format!("{name}=")))
            .map(str::to_owned)
    };
    for line in ext.values().flatten() {
        if let Some(i) = line.find("Queue(") {
            let mut q = line[i + 6..].split([',', ')']).next().unwrap().to_owned();
            if let Some(var) = q.strip_prefix("${").and_then(|v| v.strip_suffix('}')) {
                q = global(var).unwrap_or_else(|| panic!("queue variable {var} not in [globals]"));
            }
            assert!(queues.contains_key(&q), "queue {q} not in queues.conf");
        }
    }
    for (q, lines) in &queues {
        for l in lines.iter().filter(|l| l.starts_with("member")) {
            let ep = l
                .split("PJSIP/")
                .nth(1)
                .unwrap()
                .split([',', ' '])
                .next()
                .unwrap();
            assert!(
                pjsip.contains_key(ep),
                "queue {q} member {ep} not in pjsip.conf"
            );
        }
    }
    assert!(queues.contains_key("operators"));

    // The ARI user voicegate logs in as exists and may control calls.
    let ari_conf = sections(&read("ari.conf"));
    let user = ari_conf.get(&ari.username).expect("ari.conf user");
    assert!(user.iter().any(|l| l.replace(' ', "") == "type=user"));
    assert!(user.iter().any(|l| l.replace(' ', "") == "read_only=no"));
}

/// Mode 4: the dialplan dials the `websocket_client.conf` connection that exists, with the
/// `g` option and the call id for `/next`; the connection points at voicegate's default
/// `[websocket]` listen port, offers the `media` subprotocol and gives up fast.
#[test]
fn websocket_connection_matches_the_dialplan_and_defaults() {
    let ext_text = read("extensions.conf");
    let ws_text = read("websocket_client.conf");
    assert_balanced("websocket_client.conf", &ws_text);
    let ws = sections(&ws_text);
    let conn = ws.get("voicegate").expect("[voicegate] connection");
    let has = |l: &str| {
        conn.iter()
            .any(|x| x.replace(' ', "") == l.replace(' ', ""))
    };
    assert!(has("type = websocket_client"), "{conn:?}");
    assert!(has("connection_type = per_call_config"), "{conn:?}");
    assert!(has("protocols = media"), "{conn:?}");
    assert!(has("reconnect_attempts = 1"), "{conn:?}");
    let default = voicegate::chanws::config::ChanWsConfig::default().listen;
    assert!(
        has(&format!("uri = ws://{default}/media")),
        "uri is not voicegate's default [websocket] listen {default}: {conn:?}"
    );
    let ext = sections(&ext_text);
    let mode4 = ext
        .get("voicegate-websocket")
        .expect("[voicegate-websocket]");
    let dial = mode4
        .iter()
        .find(|l| l.contains("Dial(WebSocket/voicegate/"))
        .expect("mode 4 dials the [voicegate] connection");
    assert!(dial.ends_with(",,g)"), "{dial}");
    assert!(dial.contains("call_id=${AS_UUID}"), "{dial}");
    assert!(
        dial.contains("profile=${URIENCODE(${VOICEGATE_PROFILE})}"),
        "{dial}"
    );
    assert!(ext_text.contains("\"websocket\"]?voicegate-websocket,s,1)"));
}
