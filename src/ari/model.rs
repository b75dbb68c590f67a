//! ARI JSON shapes voicegate reads: channels, bridges and the events of the
//! `/ari/events` WebSocket (Asterisk's `rest-api/api-docs/{channels,bridges,events}.json`;
//! the shapes observed on Asterisk 22 are in `asterisk.md`, "ARI facts").
//!
//! Fields voicegate does not use are ignored; fields Asterisk may leave out default to empty.
//! An event of a type not listed in [`Event`] parses as [`Event::Other`], never as an error.

use serde::Deserialize;

/// Caller or connected party (`CallerID`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(default)]
pub struct CallerId {
    /// Display name, may be empty.
    pub name: String,
    /// Number, may be empty.
    pub number: String,
}

/// Where a channel is in the dialplan (`DialplanCEP`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(default)]
pub struct Dialplan {
    /// Context.
    pub context: String,
    /// Extension.
    pub exten: String,
    /// Priority.
    pub priority: i64,
    /// The application running (`AudioSocket`, `Stasis`, `Dial`, …).
    pub app_name: String,
    /// Its argument string, e.g. `"<uuid>,host:port"` for `AudioSocket()`.
    pub app_data: String,
}

/// A channel (`Channel`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(default)]
pub struct Channel {
    /// Unique id (`1700000000.42`).
    pub id: String,
    /// Name (`PJSIP/trunk-00000001`, `AudioSocket/host:port-…`).
    pub name: String,
    /// State (`Up`, `Ring`, …).
    pub state: String,
    /// Caller id.
    pub caller: CallerId,
    /// Dialplan location.
    pub dialplan: Dialplan,
    /// Channel variables, where ARI includes them (the externalMedia response:
    /// `UNICASTRTP_LOCAL_ADDRESS`, `UNICASTRTP_LOCAL_PORT` for RTP).
    pub channelvars: std::collections::BTreeMap<String, String>,
}

impl Channel {
    /// The caller number, `None` when empty.
    pub(crate) fn caller_number(&self) -> Option<String> {
        non_empty(&self.caller.number)
    }

    /// The caller name, `None` when empty.
    pub(crate) fn caller_name(&self) -> Option<String> {
        non_empty(&self.caller.name)
    }

    /// Where an externalMedia RTP channel receives: `UNICASTRTP_LOCAL_ADDRESS` and
    /// `UNICASTRTP_LOCAL_PORT` from [`Self::channelvars`]; `None` if either is missing or
    /// not an address and a port.
    pub(crate) fn unicast_rtp_local(&self) -> Option<std::net::SocketAddr> {
        let ip: std::net::IpAddr = self
            .channelvars
            .get("UNICASTRTP_LOCAL_ADDRESS")?
            .trim_matches(['[', ']'])
            .parse()
            .ok()?;
        let port: u16 = self
            .channelvars
            .get("UNICASTRTP_LOCAL_PORT")?
            .parse()
            .ok()?;
        Some(std::net::SocketAddr::new(ip, port))
    }
}

fn non_empty(s: &str) -> Option<String> {
    (!s.is_empty()).then(|| s.to_owned())
}

/// A bridge (`Bridge`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(default)]
pub struct Bridge {
    /// Unique id.
    pub id: String,
    /// `mixing`, `holding`, …
    pub bridge_type: String,
    /// Name given at creation (voicegate uses `voicegate-<call id>`).
    pub name: String,
    /// Ids of the channels in it.
    pub channels: Vec<String>,
}

/// The value of `GET /channels/{id}/variable` (`Variable`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(default)]
pub(crate) struct Variable {
    /// The value.
    pub(crate) value: String,
}

/// An event from `/ari/events`, tagged by its `type` field.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(tag = "type")]
pub enum Event {
    /// A channel entered the application (`args` from `Stasis(app,args…)`, or the
    /// externalMedia `data` for voicegate's own media channels).
    StasisStart {
        /// Application arguments.
        #[serde(default)]
        args: Vec<String>,
        /// The channel.
        channel: Channel,
    },
    /// A channel left the application (continued in the dialplan, or hung up).
    StasisEnd {
        /// The channel.
        channel: Channel,
    },
    /// The caller pressed a key.
    ChannelDtmfReceived {
        /// The digit (`0-9*#A-D`).
        digit: String,
        /// How long it was held, ms.
        #[serde(default)]
        duration_ms: u64,
        /// The channel.
        channel: Channel,
    },
    /// Someone asked for the channel to hang up.
    ChannelHangupRequest {
        /// Hangup cause code.
        #[serde(default)]
        cause: i64,
        /// The channel.
        channel: Channel,
    },
    /// The channel is gone.
    ChannelDestroyed {
        /// Hangup cause code.
        #[serde(default)]
        cause: i64,
        /// Its text.
        #[serde(default)]
        cause_txt: String,
        /// The channel.
        channel: Channel,
    },
    /// A channel joined a bridge.
    ChannelEnteredBridge {
        /// The bridge.
        bridge: Bridge,
        /// The channel.
        channel: Channel,
    },
    /// A bridge is gone.
    BridgeDestroyed {
        /// The bridge.
        bridge: Bridge,
    },
    /// Any other event type (`ChannelVarset`, `ChannelStateChange`, …): ignored.
    #[serde(other)]
    Other,
}

impl Event {
    /// Parses one WebSocket text message. A known type with a malformed body is an error;
    /// an unknown type is [`Event::Other`].
    ///
    /// # Errors
    /// serde's message.
    pub fn parse(text: &str) -> Result<Event, serde_json::Error> {
        serde_json::from_str(text)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_real_shapes_and_ignores_unknown_types() {
        let start = r#"{"type":"StasisStart","timestamp":"2025-01-01T00:00:00.000+0000",
            "args":[],"channel":{"id":"1700000000.1","name":"PJSIP/trunk-00000001",
            "state":"Ring","protocol_id":"abc","caller":{"name":"Alice","number":"+15551234567"},
            "connected":{"name":"","number":""},"accountcode":"",
            "dialplan":{"context":"incoming","exten":"s","priority":2,"app_name":"Stasis",
            "app_data":"voicegate"},"creationtime":"2025-01-01T00:00:00.000+0000",
            "language":"en"},"asterisk_id":"00:11:22:33:44:55","application":"voicegate"}"#;
        match Event::parse(start).unwrap() {
            Event::StasisStart { args, channel } => {
                assert!(args.is_empty());
                assert_eq!(channel.caller_number().as_deref(), Some("+15551234567"));
                assert_eq!(channel.dialplan.app_name, "Stasis");
            }
            other => panic!("{other:?}"),
        }
        let varset =
            r#"{"type":"ChannelVarset","variable":"X","value":"1","application":"voicegate"}"#;
        assert_eq!(Event::parse(varset).unwrap(), Event::Other);
        let dtmf = r#"{"type":"ChannelDtmfReceived","digit":"5","duration_ms":120,
            "channel":{"id":"1.1"},"application":"voicegate"}"#;
        assert!(
            matches!(Event::parse(dtmf).unwrap(), Event::ChannelDtmfReceived { digit, .. } if digit == "5")
        );
        assert!(Event::parse(r#"{"type":"StasisEnd"}"#).is_err());
        assert!(Event::parse("not json").is_err());
    }

    #[test]
    fn external_media_rtp_response_names_asterisks_rtp_port() {
        // The shape `external_media_rtp_udp` (res/ari/resource_channels.c) answers with: the
        // channel, plus `channelvars` set by chan_rtp.c's `unicast_rtp_request`.
        let body = r#"{"id":"1700000000.7","name":"UnicastRTP/127.0.0.1:40000-0x7f00",
            "state":"Down","protocol_id":"","caller":{"name":"","number":""},
            "connected":{"name":"","number":""},"accountcode":"",
            "dialplan":{"context":"default","exten":"s","priority":1,"app_name":"","app_data":""},
            "creationtime":"2026-12-02T22:00:00.000+0000","language":"en",
            "channelvars":{"UNICASTRTP_LOCAL_ADDRESS":"127.0.0.1","UNICASTRTP_LOCAL_PORT":"17234"}}"#;
        let ch: Channel = serde_json::from_str(body).unwrap();
        assert_eq!(
            ch.unicast_rtp_local(),
            Some("127.0.0.1:17234".parse().unwrap())
        );
        let mut v6 = ch.clone();
        v6.channelvars
            .insert("UNICASTRTP_LOCAL_ADDRESS".into(), "::1".into());
        assert_eq!(v6.unicast_rtp_local(), Some("[::1]:17234".parse().unwrap()));
        let mut bad = ch.clone();
        bad.channelvars.remove("UNICASTRTP_LOCAL_PORT");
        assert_eq!(bad.unicast_rtp_local(), None);
        assert_eq!(Channel::default().unicast_rtp_local(), None);
    }
}
