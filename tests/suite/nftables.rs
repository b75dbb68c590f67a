//! The optional nftables ruleset, loaded for real inside a network namespace of our own
//! (`unshare -Urn`: a user namespace gives CAP_NET_ADMIN over a fresh network namespace, so
//! the host's ruleset is never touched). Inside, a listener on 127.0.0.1 is reachable from
//! 127.0.0.1 but packets from 127.0.0.2 are dropped, and loading twice replaces the table.
//!
//! The namespaced half is this test binary re-run under `unshare` with
//! `VOICEGATE_TEST_NFT_CHILD=1` (`nft_child`); without that variable it returns at once.
//! Needs `nft` (package nftables) and `unshare`; without them, or where `unshare -Urn` is refused, the
//! test prints a `voicegate-test-skipped` line and passes, or fails under
//! `VOICEGATE_REQUIRE_ALL=1` (CI).

use crate::common;
use crate::skip;

use skip::skip;
use std::process::Command;
use std::time::Duration;

const CHILD_ENV: &str = "VOICEGATE_TEST_NFT_CHILD";

#[tokio::test]
async fn nft_child() {
    if std::env::var(CHILD_ENV).is_err() {
        return;
    }
    let up = Command::new("ip")
        .args(["link", "set", "lo", "up"])
        .status()
        .unwrap();
    assert!(up.success(), "ip link set lo up");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((s, _)) = listener.accept().await {
            drop(s);
        }
    });
    let allow = ["127.0.0.1/32".parse().unwrap(), "::1/128".parse().unwrap()];
    let text = voicegate::guard::nft::ruleset(&allow, &[port]);
    voicegate::guard::nft::load(&text).expect("load ruleset");
    // Loading again replaces the table instead of failing or duplicating it.
    voicegate::guard::nft::load(&text).expect("reload ruleset");

    let connect_from = |src: &'static str| async move {
        let s = tokio::net::TcpSocket::new_v4().unwrap();
        s.bind(format!("{src}:0").parse().unwrap()).unwrap();
        tokio::time::timeout(
            Duration::from_millis(700),
            s.connect(format!("127.0.0.1:{port}").parse().unwrap()),
        )
        .await
    };
    assert!(
        matches!(connect_from("127.0.0.1").await, Ok(Ok(_))),
        "allowed source connects"
    );
    assert!(
        connect_from("127.0.0.2").await.is_err(),
        "stranger's SYN is dropped (connect times out)"
    );
    let list = Command::new("nft")
        .args(["list", "table", "inet", voicegate::guard::nft::TABLE])
        .output()
        .unwrap();
    let list = String::from_utf8_lossy(&list.stdout);
    assert_eq!(list.matches("chain input").count(), 1, "{list}");
    // The stranger's SYNs were counted by the IPv4 drop rule.
    let dropped: u64 = list
        .lines()
        .find(|l| l.contains("ip saddr != 127.0.0.1"))
        .and_then(|l| l.split("counter packets ").nth(1))
        .and_then(|r| r.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no IPv4 drop counter in {list}"));
    assert!(dropped >= 1, "{list}");
    println!("NFT-CHILD-OK");
}

#[test]
fn ruleset_drops_strangers_inside_a_private_network_namespace() {
    let have = |tool: &str, arg: &str| Command::new(tool).arg(arg).output().is_ok();
    if !(have("nft", "--version") && have("unshare", "--version")) {
        skip(
            "ruleset_drops_strangers_inside_a_private_network_namespace",
            "nft or unshare missing (apt-get install nftables)",
        );
        return;
    }
    // Can this box make an unprivileged user + network namespace at all?
    let probe = Command::new("unshare").args(["-Urn", "true"]).status();
    if !probe.is_ok_and(|s| s.success()) {
        skip(
            "ruleset_drops_strangers_inside_a_private_network_namespace",
            "unshare -Urn not permitted here",
        );
        return;
    }
    let out = Command::new("unshare")
        .arg("-Urn")
        .arg(std::env::current_exe().unwrap())
        .arg(common::test_name(module_path!(), "nft_child"))
        .args(["--exact", "--nocapture", "--test-threads=1"])
        .env(CHILD_ENV, "1")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.contains("NFT-CHILD-OK"),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
