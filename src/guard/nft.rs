//! The optional nftables ruleset: a kernel-level copy of the allowlist for the AudioSocket
//! and health ports, so strangers' packets are dropped before they reach the process.
//!
//! [`ruleset`] renders the ruleset text (nft(8) syntax; one table `inet voicegate`, replaced
//! as a whole on each load); [`load`] pipes it to `nft -f -`, which needs `CAP_NET_ADMIN`.
//! The in-process guard works without it; a failed load is logged by the caller, never fatal.

use ipnet::IpNet;
use std::io::Write as _;
use std::process::{Command, Stdio};

/// Name of the nftables table voicegate owns (family `inet`).
pub const TABLE: &str = "voicegate";

/// Why the ruleset could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum NftError {
    /// `nft` could not be started (not installed?).
    #[error("cannot run nft: {0}")]
    Spawn(std::io::Error),
    /// `nft` rejected the ruleset or lacked the capability; its stderr.
    #[error("nft failed: {0}")]
    Failed(String),
}

/// The ruleset text: drop TCP to `ports` unless the source is in `allow`. The table is
/// deleted and re-created in one transaction, so loading it again replaces it.
pub fn ruleset(allow: &[IpNet], ports: &[u16]) -> String {
    let v4: Vec<String> = allow
        .iter()
        .filter(|n| matches!(n, IpNet::V4(_)))
        .map(|n| n.to_string())
        .collect();
    let v6: Vec<String> = allow
        .iter()
        .filter(|n| matches!(n, IpNet::V6(_)))
        .map(|n| n.to_string())
        .collect();
    let ports: Vec<String> = ports.iter().map(|p| p.to_string()).collect();
    let ports = ports.join(", ");
    let mut out = String::new();
    // `add` then `delete` makes the delete succeed whether or not the table existed.
    out.push_str(&format!(
        "add table inet {TABLE}\ndelete table inet {TABLE}\n"
    ));
    out.push_str(&format!("table inet {TABLE} {{\n"));
    out.push_str("  chain input {\n    type filter hook input priority -10; policy accept;\n");
    if v4.is_empty() {
        out.push_str(&format!(
            "    meta nfproto ipv4 tcp dport {{ {ports} }} counter drop\n"
        ));
    } else {
        out.push_str(&format!(
            "    meta nfproto ipv4 tcp dport {{ {ports} }} ip saddr != {{ {} }} counter drop\n",
            v4.join(", ")
        ));
    }
    if v6.is_empty() {
        out.push_str(&format!(
            "    meta nfproto ipv6 tcp dport {{ {ports} }} counter drop\n"
        ));
    } else {
        out.push_str(&format!(
            "    meta nfproto ipv6 tcp dport {{ {ports} }} ip6 saddr != {{ {} }} counter drop\n",
            v6.join(", ")
        ));
    }
    out.push_str("  }\n}\n");
    out
}

/// Loads `text` with `nft -f -` (blocking; run it off the async threads).
///
/// # Errors
/// [`NftError`] with nft's message.
pub fn load(text: &str) -> Result<(), NftError> {
    let mut child = Command::new("nft")
        .args(["-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(NftError::Spawn)?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin.write_all(text.as_bytes()).map_err(NftError::Spawn)?;
    }
    let out = child.wait_with_output().map_err(NftError::Spawn)?;
    if out.status.success() {
        Ok(())
    } else {
        Err(NftError::Failed(
            String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ruleset_names_ports_and_networks() {
        let text = ruleset(
            &["127.0.0.1/32".parse().unwrap(), "::1/128".parse().unwrap()],
            &[9092, 9100],
        );
        assert!(
            text.contains("tcp dport { 9092, 9100 } ip saddr != { 127.0.0.1/32 } counter drop")
        );
        assert!(text.contains("ip6 saddr != { ::1/128 }"));
        // No IPv6 network allowed: all IPv6 to the ports is dropped.
        let text = ruleset(&["10.0.0.0/8".parse().unwrap()], &[9092]);
        assert!(text.contains("meta nfproto ipv6 tcp dport { 9092 } counter drop"));
    }
}
