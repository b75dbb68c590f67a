//! Sans-IO control messages of Asterisk's WebSocket media channel (`chan_websocket`): text
//! ⇄ [`Event`] (Asterisk to the app) and [`Command`] (the app to Asterisk), no sockets, no
//! clock.
//!
//! Source: Asterisk 22.10.1 `channels/chan_websocket.c` (`_create_event_*`, `handle_command`,
//! `process_text_message`) and `channels/chan_websocket_doc.xml`. Binary WebSocket frames
//! carry the media in the channel's format; text frames carry control, in one of two formats
//! chosen per call by the dial string's `f(plain-text|json)` or `chan_websocket.conf`
//! ([`ControlFormat`]):
//!
//! | event (Asterisk → app)      | plain text                                                           |
//! |-----------------------------|----------------------------------------------------------------------|
//! | `MEDIA_START`               | `MEDIA_START connection_id:<id> channel:<name> channel_id:<uniqueid> format:<fmt> optimal_frame_size:<bytes> ptime:<ms>` |
//! | `MEDIA_XOFF` / `MEDIA_XON`  | the bare word                                                        |
//! | `QUEUE_DRAINED`             | the bare word                                                        |
//! | `MEDIA_MARK_PROCESSED`      | `MEDIA_MARK_PROCESSED[ <correlation_id>]`                            |
//! | `MEDIA_BUFFERING_COMPLETED` | `MEDIA_BUFFERING_COMPLETED[ <correlation_id>]`                       |
//! | `DTMF_END`                  | `DTMF_END digit:<d> channel_id:<uniqueid>`                           |
//! | `STATUS`                    | `STATUS channel_id:<id> queue_length:<n> xon_level:<n> xoff_level:<n> queue_full:<bool> bulk_media:<bool> media_paused:<bool>` |
//! | `ERROR`                     | `ERROR channel_id:<id> error_text:<text with spaces>`                |
//!
//! In JSON every event is one compact object with `"event"` and `"channel_id"`; `MEDIA_START`
//! adds `connection_id`, `channel`, `format`, `optimal_frame_size`, `ptime` and
//! `channel_variables` (an object of strings); the mark and buffering events add
//! `correlation_id` (`""` when none was given).
//!
//! Commands are `COMMAND[ <data>]` in plain text and `{"command":"COMMAND", ...}` in JSON;
//! `MARK_MEDIA` and `STOP_MEDIA_BUFFERING` carry a correlation id (plain: the text after the
//! first space; JSON: `"correlation_id"`), `SET_MEDIA_DIRECTION` exists only in JSON
//! (`"direction":"both|in|out"`). Asterisk ignores a text message longer than
//! [`MAX_TEXT_MESSAGE_LEN`] bytes (with only a log line), so [`Command::render`] refuses to
//! build one, and correlation ids are limited to [`MAX_CORRELATION_ID_LEN`] characters of
//! `[A-Za-z0-9._-]`.
//!
//! Guarantees: [`Event::parse`] and [`Command::parse`] never panic on any input; an unknown
//! word is [`ParseError::Unknown`], never a guess.

use serde_json::{Map, Value};
use std::collections::BTreeMap;
use std::fmt::Write as _;

/// The longest text message Asterisk acts on, in bytes (`MAX_TEXT_MESSAGE_LEN`: 128).
pub(crate) const MAX_TEXT_MESSAGE_LEN: usize = 128;

/// The longest correlation id [`Command::render`] sends, in characters (leaves room for the
/// JSON wrapping within [`MAX_TEXT_MESSAGE_LEN`]).
pub(crate) const MAX_CORRELATION_ID_LEN: usize = 64;

/// How control messages are written on a call (`f(...)` in the dial string).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ControlFormat {
    /// One line, `WORD key:value ...` (Asterisk's default, `plain-text`).
    #[default]
    PlainText,
    /// One compact JSON object per message (`json`).
    Json,
}

impl ControlFormat {
    /// Asterisk's name for it: `plain-text` or `json`.
    pub(crate) fn name(self) -> &'static str {
        match self {
            ControlFormat::PlainText => "plain-text",
            ControlFormat::Json => "json",
        }
    }

    /// The format of a text message as it arrives: JSON if it starts with `{` (after
    /// whitespace), plain text otherwise. Asterisk picks one per call and never mixes them,
    /// so the first message (`MEDIA_START`) tells the call's format.
    pub(crate) fn sniff(text: &str) -> Self {
        if text.trim_start().starts_with('{') {
            ControlFormat::Json
        } else {
            ControlFormat::PlainText
        }
    }
}

/// The channel's media format as `MEDIA_START` names it (`ast_format_get_name`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MediaFormat {
    /// Signed 16-bit little-endian linear PCM at this rate in Hz (`slin` = 8000, `slin16`,
    /// `slin12`, ... `slin192`).
    Slin(u32),
    /// G.711 μ-law 8 kHz (`ulaw`).
    Ulaw,
    /// G.711 A-law 8 kHz (`alaw`).
    Alaw,
    /// Any other codec name (`opus`, `g722`, ...), kept as sent.
    Other(String),
}

impl MediaFormat {
    /// Parses an Asterisk format name.
    pub(crate) fn from_name(name: &str) -> Self {
        match name {
            "slin" => MediaFormat::Slin(8000),
            "ulaw" => MediaFormat::Ulaw,
            "alaw" => MediaFormat::Alaw,
            _ => match name.strip_prefix("slin").map(str::parse::<u32>) {
                Some(Ok(k)) if [12, 16, 24, 32, 44, 48, 96, 192].contains(&k) => {
                    MediaFormat::Slin(if k == 44 { 44_100 } else { k * 1000 })
                }
                _ => MediaFormat::Other(name.to_owned()),
            },
        }
    }

    /// Asterisk's name for it (`slin`, `slin16`, `ulaw`, ...).
    pub(crate) fn name(&self) -> String {
        match self {
            MediaFormat::Slin(8000) => "slin".into(),
            MediaFormat::Slin(44_100) => "slin44".into(),
            MediaFormat::Slin(hz) => format!("slin{}", hz / 1000),
            MediaFormat::Ulaw => "ulaw".into(),
            MediaFormat::Alaw => "alaw".into(),
            MediaFormat::Other(s) => s.clone(),
        }
    }

    /// Bytes of `ms` milliseconds of this format, if it is a fixed-rate one.
    #[cfg(test)]
    pub(crate) fn bytes_per(&self, ms: u32) -> Option<usize> {
        match self {
            MediaFormat::Slin(hz) => Some((*hz as usize * ms as usize / 1000) * 2),
            MediaFormat::Ulaw | MediaFormat::Alaw => Some(8 * ms as usize),
            MediaFormat::Other(_) => None,
        }
    }
}

/// `MEDIA_START`: the first message of every call, sent by Asterisk once the WebSocket is up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MediaStart {
    /// The `websocket_client.conf` section (outbound) or the generated UUID (`INCOMING`).
    pub connection_id: String,
    /// The channel name, `WebSocket/<connection_id>/<pointer>`.
    pub channel: String,
    /// The channel's unique id (e.g. `1733140000.12`).
    pub channel_id: String,
    /// The negotiated media format (`c(...)` of the dial string, or the caller's first codec).
    pub format: MediaFormat,
    /// Bytes per frame Asterisk re-frames what it receives into (`ptime` worth of media; 0
    /// in passthrough mode).
    pub optimal_frame_size: u32,
    /// The codec's frame duration, ms (20 for slin, G.711).
    pub ptime: u32,
    /// The channel's variables (JSON format only; empty in plain text).
    pub channel_variables: BTreeMap<String, String>,
}

/// `STATUS`: Asterisk's answer to `GET_STATUS`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Status {
    /// Frames waiting in Asterisk's queue to be played to the caller (20 ms each for slin).
    pub queue_length: u32,
    /// The queue level under which `MEDIA_XON` is sent.
    pub xon_level: u32,
    /// The queue level at which `MEDIA_XOFF` is sent.
    pub xoff_level: u32,
    /// `MEDIA_XOFF` was sent and no `MEDIA_XON` since.
    pub queue_full: bool,
    /// `START_MEDIA_BUFFERING` is in effect.
    pub bulk_media: bool,
    /// `PAUSE_MEDIA` is in effect.
    pub media_paused: bool,
}

/// A control message from Asterisk to the app.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// The call's media is ready; see [`MediaStart`].
    MediaStart(MediaStart),
    /// Asterisk's queue reached 900 frames (its `QUEUE_LENGTH_XOFF_LEVEL`): stop sending
    /// media. At 1000 frames (`QUEUE_LENGTH_MAX`) it drops whole binary messages.
    MediaXoff,
    /// Asterisk's queue fell under 800 frames (its `QUEUE_LENGTH_XON_LEVEL`): media may flow
    /// again.
    MediaXon,
    /// The queue ran empty after `REPORT_QUEUE_DRAINED`.
    QueueDrained,
    /// Playout reached the `MARK_MEDIA` with this correlation id (`""` if it had none): all
    /// media sent before the mark has been played to the caller.
    MediaMarkProcessed {
        /// The mark's id.
        correlation_id: String,
    },
    /// `STOP_MEDIA_BUFFERING` took effect (queued in order with the media).
    MediaBufferingCompleted {
        /// The id given to `STOP_MEDIA_BUFFERING` (`""` if none).
        correlation_id: String,
    },
    /// The caller pressed (and released) a DTMF key.
    DtmfEnd {
        /// `0-9`, `*`, `#`, `A-D`.
        digit: char,
    },
    /// The answer to `GET_STATUS`.
    Status(Status),
    /// Asterisk refused a command (e.g. buffering in passthrough mode).
    Error {
        /// Asterisk's explanation.
        error_text: String,
    },
}

/// Media direction for `SET_MEDIA_DIRECTION`, from the app's point of view.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// Media both ways (the default).
    Both,
    /// Asterisk sends media to the app and drops what it receives.
    In,
    /// Asterisk only plays what the app sends.
    Out,
}

impl Direction {
    fn name(self) -> &'static str {
        match self {
            Direction::Both => "both",
            Direction::In => "in",
            Direction::Out => "out",
        }
    }
}

/// A control message from the app to Asterisk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    /// Answer the channel (with `n` in the dial string).
    Answer,
    /// Hang the channel up.
    Hangup,
    /// From now on, binary messages need not be whole frames: Asterisk keeps a partial one.
    StartMediaBuffering,
    /// Ends buffering; Asterisk answers `MEDIA_BUFFERING_COMPLETED` in order with the media.
    StopMediaBuffering {
        /// Echoed in the completion event.
        correlation_id: Option<String>,
    },
    /// Put a mark into the media queue; Asterisk sends `MEDIA_MARK_PROCESSED` when playout
    /// reaches it.
    MarkMedia {
        /// Echoed in `MEDIA_MARK_PROCESSED`.
        correlation_id: Option<String>,
    },
    /// Drop every queued frame (and pending marks) at once: barge-in.
    FlushMedia,
    /// Send `QUEUE_DRAINED` once the queue runs empty.
    ReportQueueDrained,
    /// Ask for a `STATUS` event.
    GetStatus,
    /// Stop playing queued media (silence instead) until `CONTINUE_MEDIA`.
    PauseMedia,
    /// Resume playing after `PAUSE_MEDIA`.
    ContinueMedia,
    /// Change the media direction (JSON format only).
    SetMediaDirection(Direction),
}

/// Why a text message could not be read or written.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    /// Empty after trimming.
    #[error("empty control message")]
    Empty,
    /// Longer than [`MAX_TEXT_MESSAGE_LEN`] (commands only; Asterisk would ignore it).
    #[error("control message of {0} bytes is over the 128 Asterisk reads")]
    TooLong(usize),
    /// Not valid JSON, or not an object, in the JSON format.
    #[error("control message is not a JSON object")]
    NotJson,
    /// The event or command word is not one `chan_websocket` knows.
    #[error("unknown control message `{0}`")]
    Unknown(String),
    /// A field is missing or has the wrong type.
    #[error("control message `{word}`: field `{field}` missing or malformed")]
    Field {
        /// The event or command.
        word: &'static str,
        /// The field.
        field: &'static str,
    },
    /// A correlation id with characters outside `[A-Za-z0-9._-]` or over
    /// [`MAX_CORRELATION_ID_LEN`].
    #[error("correlation id must be 1 to 64 characters of [A-Za-z0-9._-]")]
    BadCorrelationId,
    /// `SET_MEDIA_DIRECTION` in the plain-text format (Asterisk answers it with an ERROR).
    #[error("SET_MEDIA_DIRECTION exists only in the JSON format")]
    JsonOnly,
}

fn field(word: &'static str, name: &'static str) -> ParseError {
    ParseError::Field { word, field: name }
}

/// `key:value` pairs of a plain-text event after its word (values have no spaces).
fn plain_pairs(rest: &str) -> BTreeMap<&str, &str> {
    rest.split_whitespace()
        .filter_map(|kv| kv.split_once(':'))
        .collect()
}

fn plain_bool(
    word: &'static str,
    name: &'static str,
    v: Option<&&str>,
) -> Result<bool, ParseError> {
    match v.copied() {
        Some("true") => Ok(true),
        Some("false") => Ok(false),
        _ => Err(field(word, name)),
    }
}

fn plain_u32(word: &'static str, name: &'static str, v: Option<&&str>) -> Result<u32, ParseError> {
    v.and_then(|s| s.parse().ok()).ok_or(field(word, name))
}

fn plain_str(
    word: &'static str,
    name: &'static str,
    v: Option<&&str>,
) -> Result<String, ParseError> {
    v.map(|s| (*s).to_owned()).ok_or(field(word, name))
}

fn json_str(
    o: &Map<String, Value>,
    word: &'static str,
    name: &'static str,
) -> Result<String, ParseError> {
    o.get(name)
        .and_then(Value::as_str)
        .map(str::to_owned)
        .ok_or(field(word, name))
}

fn json_u32(
    o: &Map<String, Value>,
    word: &'static str,
    name: &'static str,
) -> Result<u32, ParseError> {
    o.get(name)
        .and_then(Value::as_u64)
        .and_then(|n| u32::try_from(n).ok())
        .ok_or(field(word, name))
}

fn json_bool(
    o: &Map<String, Value>,
    word: &'static str,
    name: &'static str,
) -> Result<bool, ParseError> {
    o.get(name)
        .and_then(Value::as_bool)
        .ok_or(field(word, name))
}

fn digit_of(word: &'static str, s: &str) -> Result<char, ParseError> {
    let mut chars = s.chars();
    match (chars.next(), chars.next()) {
        (Some(d), None) if d.is_ascii_digit() || matches!(d, '*' | '#' | 'A'..='D') => Ok(d),
        _ => Err(field(word, "digit")),
    }
}

impl Event {
    /// Reads one text message from Asterisk in `format`.
    ///
    /// # Errors
    /// [`ParseError`] for an empty, non-JSON (in JSON), unknown or malformed message.
    pub fn parse(text: &str, format: ControlFormat) -> Result<Event, ParseError> {
        let text = text.trim();
        if text.is_empty() {
            return Err(ParseError::Empty);
        }
        match format {
            ControlFormat::PlainText => Self::parse_plain(text),
            ControlFormat::Json => Self::parse_json(text),
        }
    }

    fn parse_plain(text: &str) -> Result<Event, ParseError> {
        let (word, rest) = text.split_once(' ').unwrap_or((text, ""));
        let rest = rest.trim();
        let id = || rest.to_owned();
        Ok(match word {
            "MEDIA_START" => {
                const W: &str = "MEDIA_START";
                let p = plain_pairs(rest);
                Event::MediaStart(MediaStart {
                    connection_id: plain_str(W, "connection_id", p.get("connection_id"))?,
                    channel: plain_str(W, "channel", p.get("channel"))?,
                    channel_id: plain_str(W, "channel_id", p.get("channel_id"))?,
                    format: MediaFormat::from_name(&plain_str(W, "format", p.get("format"))?),
                    optimal_frame_size: plain_u32(
                        W,
                        "optimal_frame_size",
                        p.get("optimal_frame_size"),
                    )?,
                    ptime: plain_u32(W, "ptime", p.get("ptime"))?,
                    channel_variables: BTreeMap::new(),
                })
            }
            "MEDIA_XOFF" => Event::MediaXoff,
            "MEDIA_XON" => Event::MediaXon,
            "QUEUE_DRAINED" => Event::QueueDrained,
            "MEDIA_MARK_PROCESSED" => Event::MediaMarkProcessed {
                correlation_id: id(),
            },
            "MEDIA_BUFFERING_COMPLETED" => Event::MediaBufferingCompleted {
                correlation_id: id(),
            },
            "DTMF_END" => {
                let p = plain_pairs(rest);
                let d = p.get("digit").ok_or(field("DTMF_END", "digit"))?;
                Event::DtmfEnd {
                    digit: digit_of("DTMF_END", d)?,
                }
            }
            "STATUS" => {
                const W: &str = "STATUS";
                let p = plain_pairs(rest);
                Event::Status(Status {
                    queue_length: plain_u32(W, "queue_length", p.get("queue_length"))?,
                    xon_level: plain_u32(W, "xon_level", p.get("xon_level"))?,
                    xoff_level: plain_u32(W, "xoff_level", p.get("xoff_level"))?,
                    queue_full: plain_bool(W, "queue_full", p.get("queue_full"))?,
                    bulk_media: plain_bool(W, "bulk_media", p.get("bulk_media"))?,
                    media_paused: plain_bool(W, "media_paused", p.get("media_paused"))?,
                })
            }
            "ERROR" => {
                // error_text runs to the end and may hold spaces and colons.
                let error_text = rest
                    .split_once("error_text:")
                    .map(|(_, t)| t.trim().to_owned())
                    .ok_or(field("ERROR", "error_text"))?;
                Event::Error { error_text }
            }
            other => return Err(ParseError::Unknown(other.chars().take(40).collect())),
        })
    }

    fn parse_json(text: &str) -> Result<Event, ParseError> {
        let Ok(Value::Object(o)) = serde_json::from_str::<Value>(text) else {
            return Err(ParseError::NotJson);
        };
        let word = o
            .get("event")
            .and_then(Value::as_str)
            .ok_or(field("event", "event"))?;
        let corr = |w| {
            // Asterisk always writes it (`""` when none); tolerate its absence as none.
            o.get("correlation_id")
                .map(|v| {
                    v.as_str()
                        .map(str::to_owned)
                        .ok_or(field(w, "correlation_id"))
                })
                .unwrap_or(Ok(String::new()))
        };
        Ok(match word {
            "MEDIA_START" => {
                const W: &str = "MEDIA_START";
                let mut vars = BTreeMap::new();
                if let Some(v) = o.get("channel_variables") {
                    let Value::Object(m) = v else {
                        return Err(field(W, "channel_variables"));
                    };
                    for (k, v) in m {
                        let v = v.as_str().ok_or(field(W, "channel_variables"))?;
                        vars.insert(k.clone(), v.to_owned());
                    }
                }
                Event::MediaStart(MediaStart {
                    connection_id: json_str(&o, W, "connection_id")?,
                    channel: json_str(&o, W, "channel")?,
                    channel_id: json_str(&o, W, "channel_id")?,
                    format: MediaFormat::from_name(&json_str(&o, W, "format")?),
                    optimal_frame_size: json_u32(&o, W, "optimal_frame_size")?,
                    ptime: json_u32(&o, W, "ptime")?,
                    channel_variables: vars,
                })
            }
            "MEDIA_XOFF" => Event::MediaXoff,
            "MEDIA_XON" => Event::MediaXon,
            "QUEUE_DRAINED" => Event::QueueDrained,
            "MEDIA_MARK_PROCESSED" => Event::MediaMarkProcessed {
                correlation_id: corr("MEDIA_MARK_PROCESSED")?,
            },
            "MEDIA_BUFFERING_COMPLETED" => Event::MediaBufferingCompleted {
                correlation_id: corr("MEDIA_BUFFERING_COMPLETED")?,
            },
            "DTMF_END" => Event::DtmfEnd {
                digit: digit_of("DTMF_END", &json_str(&o, "DTMF_END", "digit")?)?,
            },
            "STATUS" => {
                const W: &str = "STATUS";
                Event::Status(Status {
                    queue_length: json_u32(&o, W, "queue_length")?,
                    xon_level: json_u32(&o, W, "xon_level")?,
                    xoff_level: json_u32(&o, W, "xoff_level")?,
                    queue_full: json_bool(&o, W, "queue_full")?,
                    bulk_media: json_bool(&o, W, "bulk_media")?,
                    media_paused: json_bool(&o, W, "media_paused")?,
                })
            }
            "ERROR" => Event::Error {
                error_text: json_str(&o, "ERROR", "error_text")?,
            },
            other => return Err(ParseError::Unknown(other.chars().take(40).collect())),
        })
    }

    /// Writes the event as Asterisk 22.10.1 does for channel `channel_id`, for fakes and
    /// tests that stand in for Asterisk: plain text byte for byte; JSON with the same keys
    /// and values (serde_json sorts the keys, jansson keeps insertion order; no reader may
    /// depend on the order).
    pub fn render(&self, format: ControlFormat, channel_id: &str) -> String {
        match format {
            ControlFormat::PlainText => self.render_plain(channel_id),
            ControlFormat::Json => self.render_json(channel_id),
        }
    }

    fn render_plain(&self, channel_id: &str) -> String {
        let with_id = |word: &str, id: &str| {
            if id.is_empty() {
                word.to_owned()
            } else {
                format!("{word} {id}")
            }
        };
        match self {
            Event::MediaStart(m) => format!(
                "MEDIA_START connection_id:{} channel:{} channel_id:{} format:{} optimal_frame_size:{} ptime:{}",
                m.connection_id,
                m.channel,
                m.channel_id,
                m.format.name(),
                m.optimal_frame_size,
                m.ptime
            ),
            Event::MediaXoff => "MEDIA_XOFF".into(),
            Event::MediaXon => "MEDIA_XON".into(),
            Event::QueueDrained => "QUEUE_DRAINED".into(),
            Event::MediaMarkProcessed { correlation_id } => {
                with_id("MEDIA_MARK_PROCESSED", correlation_id)
            }
            Event::MediaBufferingCompleted { correlation_id } => {
                with_id("MEDIA_BUFFERING_COMPLETED", correlation_id)
            }
            Event::DtmfEnd { digit } => format!("DTMF_END digit:{digit} channel_id:{channel_id}"),
            Event::Status(s) => format!(
                "STATUS channel_id:{channel_id} queue_length:{} xon_level:{} xoff_level:{} queue_full:{} bulk_media:{} media_paused:{}",
                s.queue_length,
                s.xon_level,
                s.xoff_level,
                s.queue_full,
                s.bulk_media,
                s.media_paused
            ),
            Event::Error { error_text } => {
                format!("ERROR channel_id:{channel_id} error_text:{error_text}")
            }
        }
    }

    fn render_json(&self, channel_id: &str) -> String {
        let v = match self {
            Event::MediaStart(m) => serde_json::json!({
                "event": "MEDIA_START",
                "connection_id": m.connection_id,
                "channel": m.channel,
                "channel_id": m.channel_id,
                "format": m.format.name(),
                "optimal_frame_size": m.optimal_frame_size,
                "ptime": m.ptime,
                "channel_variables": m.channel_variables,
            }),
            Event::MediaXoff => {
                serde_json::json!({"event": "MEDIA_XOFF", "channel_id": channel_id})
            }
            Event::MediaXon => serde_json::json!({"event": "MEDIA_XON", "channel_id": channel_id}),
            Event::QueueDrained => {
                serde_json::json!({"event": "QUEUE_DRAINED", "channel_id": channel_id})
            }
            Event::MediaMarkProcessed { correlation_id } => serde_json::json!({
                "event": "MEDIA_MARK_PROCESSED", "channel_id": channel_id,
                "correlation_id": correlation_id,
            }),
            Event::MediaBufferingCompleted { correlation_id } => serde_json::json!({
                "event": "MEDIA_BUFFERING_COMPLETED", "channel_id": channel_id,
                "correlation_id": correlation_id,
            }),
            Event::DtmfEnd { digit } => serde_json::json!({
                "event": "DTMF_END", "channel_id": channel_id, "digit": digit.to_string(),
            }),
            Event::Status(s) => serde_json::json!({
                "event": "STATUS", "channel_id": channel_id,
                "queue_length": s.queue_length, "xon_level": s.xon_level,
                "xoff_level": s.xoff_level, "queue_full": s.queue_full,
                "bulk_media": s.bulk_media, "media_paused": s.media_paused,
            }),
            Event::Error { error_text } => serde_json::json!({
                "event": "ERROR", "channel_id": channel_id, "error_text": error_text,
            }),
        };
        v.to_string()
    }
}

/// Whether `id` may be sent as a correlation id (see [`ParseError::BadCorrelationId`]).
pub(crate) fn valid_correlation_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= MAX_CORRELATION_ID_LEN
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

impl Command {
    /// The command word Asterisk matches (`MARK_MEDIA`, ...).
    pub(crate) fn word(&self) -> &'static str {
        match self {
            Command::Answer => "ANSWER",
            Command::Hangup => "HANGUP",
            Command::StartMediaBuffering => "START_MEDIA_BUFFERING",
            Command::StopMediaBuffering { .. } => "STOP_MEDIA_BUFFERING",
            Command::MarkMedia { .. } => "MARK_MEDIA",
            Command::FlushMedia => "FLUSH_MEDIA",
            Command::ReportQueueDrained => "REPORT_QUEUE_DRAINED",
            Command::GetStatus => "GET_STATUS",
            Command::PauseMedia => "PAUSE_MEDIA",
            Command::ContinueMedia => "CONTINUE_MEDIA",
            Command::SetMediaDirection(_) => "SET_MEDIA_DIRECTION",
        }
    }

    fn correlation_id(&self) -> Option<&str> {
        match self {
            Command::StopMediaBuffering { correlation_id }
            | Command::MarkMedia { correlation_id } => correlation_id.as_deref(),
            _ => None,
        }
    }

    /// Writes the command as one text message in `format`.
    ///
    /// # Errors
    /// [`ParseError::BadCorrelationId`] for an id [`valid_correlation_id`] refuses,
    /// [`ParseError::JsonOnly`] for `SET_MEDIA_DIRECTION` in plain text,
    /// [`ParseError::TooLong`] if the message would be over [`MAX_TEXT_MESSAGE_LEN`].
    pub(crate) fn render(&self, format: ControlFormat) -> Result<String, ParseError> {
        let id = self.correlation_id();
        if id.is_some_and(|id| !valid_correlation_id(id)) {
            return Err(ParseError::BadCorrelationId);
        }
        let text = match format {
            ControlFormat::PlainText => {
                if matches!(self, Command::SetMediaDirection(_)) {
                    return Err(ParseError::JsonOnly);
                }
                let mut s = self.word().to_owned();
                if let Some(id) = id {
                    let _ = write!(s, " {id}");
                }
                s
            }
            ControlFormat::Json => {
                let mut o = Map::new();
                o.insert("command".into(), self.word().into());
                if let Some(id) = id {
                    o.insert("correlation_id".into(), id.into());
                }
                if let Command::SetMediaDirection(d) = self {
                    o.insert("direction".into(), d.name().into());
                }
                Value::Object(o).to_string()
            }
        };
        if text.len() > MAX_TEXT_MESSAGE_LEN {
            return Err(ParseError::TooLong(text.len()));
        }
        Ok(text)
    }

    /// Reads one command as Asterisk's `handle_command` does (for fakes that stand in for
    /// Asterisk): over [`MAX_TEXT_MESSAGE_LEN`] bytes is refused, the text is trimmed, plain
    /// text splits at the first space.
    ///
    /// # Errors
    /// [`ParseError`] for an empty, too long, non-JSON (in JSON) or unknown message.
    pub fn parse(text: &str, format: ControlFormat) -> Result<Command, ParseError> {
        if text.len() > MAX_TEXT_MESSAGE_LEN {
            return Err(ParseError::TooLong(text.len()));
        }
        let text = text.trim();
        if text.is_empty() {
            return Err(ParseError::Empty);
        }
        let (word, id, direction) = match format {
            ControlFormat::PlainText => {
                let (w, d) = match text.split_once(' ') {
                    Some((w, d)) => (w, Some(d.to_owned())),
                    None => (text, None),
                };
                (w.to_owned(), d, None)
            }
            ControlFormat::Json => {
                let Ok(Value::Object(o)) = serde_json::from_str::<Value>(text) else {
                    return Err(ParseError::NotJson);
                };
                let s = |k: &str| o.get(k).and_then(Value::as_str).map(str::to_owned);
                (
                    s("command").ok_or(field("command", "command"))?,
                    s("correlation_id"),
                    s("direction"),
                )
            }
        };
        Ok(match word.as_str() {
            "ANSWER" => Command::Answer,
            "HANGUP" => Command::Hangup,
            "START_MEDIA_BUFFERING" => Command::StartMediaBuffering,
            "STOP_MEDIA_BUFFERING" => Command::StopMediaBuffering { correlation_id: id },
            "MARK_MEDIA" => Command::MarkMedia { correlation_id: id },
            "FLUSH_MEDIA" => Command::FlushMedia,
            "REPORT_QUEUE_DRAINED" => Command::ReportQueueDrained,
            "GET_STATUS" => Command::GetStatus,
            "PAUSE_MEDIA" => Command::PauseMedia,
            "CONTINUE_MEDIA" => Command::ContinueMedia,
            "SET_MEDIA_DIRECTION" => {
                if format == ControlFormat::PlainText {
                    return Err(ParseError::JsonOnly);
                }
                Command::SetMediaDirection(match direction.as_deref() {
                    Some("both") => Direction::Both,
                    Some("in") => Direction::In,
                    Some("out") => Direction::Out,
                    _ => return Err(field("SET_MEDIA_DIRECTION", "direction")),
                })
            }
            other => return Err(ParseError::Unknown(other.chars().take(40).collect())),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BOTH: [ControlFormat; 2] = [ControlFormat::PlainText, ControlFormat::Json];

    fn start() -> MediaStart {
        MediaStart {
            connection_id: "voicegate".into(),
            channel: "WebSocket/voicegate/0x7f3a2c001234".into(),
            channel_id: "1764712345.17".into(),
            format: MediaFormat::Slin(16_000),
            optimal_frame_size: 640,
            ptime: 20,
            channel_variables: BTreeMap::new(),
        }
    }

    fn all_events() -> Vec<Event> {
        vec![
            Event::MediaStart(start()),
            Event::MediaXoff,
            Event::MediaXon,
            Event::QueueDrained,
            Event::MediaMarkProcessed {
                correlation_id: "reply-3.17".into(),
            },
            Event::MediaMarkProcessed {
                correlation_id: String::new(),
            },
            Event::MediaBufferingCompleted {
                correlation_id: "b1".into(),
            },
            Event::DtmfEnd { digit: '#' },
            Event::DtmfEnd { digit: '7' },
            Event::Status(Status {
                queue_length: 12,
                xon_level: 800,
                xoff_level: 900,
                queue_full: true,
                bulk_media: false,
                media_paused: true,
            }),
            Event::Error {
                error_text: "MARK_MEDIA not supported in passthrough mode".into(),
            },
        ]
    }

    fn all_commands() -> Vec<Command> {
        vec![
            Command::Answer,
            Command::Hangup,
            Command::StartMediaBuffering,
            Command::StopMediaBuffering {
                correlation_id: Some("s-1".into()),
            },
            Command::StopMediaBuffering {
                correlation_id: None,
            },
            Command::MarkMedia {
                correlation_id: Some("r12-f340".into()),
            },
            Command::MarkMedia {
                correlation_id: None,
            },
            Command::FlushMedia,
            Command::ReportQueueDrained,
            Command::GetStatus,
            Command::PauseMedia,
            Command::ContinueMedia,
        ]
    }

    /// The exact lines `_create_event_*` print with `ast_asprintf` in chan_websocket.c.
    #[test]
    fn plain_text_events_read_as_asterisk_writes_them() {
        let cases: [(&str, Event); 9] = [
            (
                "MEDIA_START connection_id:voicegate channel:WebSocket/voicegate/0x7f3a2c001234 channel_id:1764712345.17 format:slin16 optimal_frame_size:640 ptime:20",
                Event::MediaStart(start()),
            ),
            ("MEDIA_XOFF", Event::MediaXoff),
            ("MEDIA_XON", Event::MediaXon),
            ("QUEUE_DRAINED", Event::QueueDrained),
            (
                "MEDIA_MARK_PROCESSED reply-3.17",
                Event::MediaMarkProcessed {
                    correlation_id: "reply-3.17".into(),
                },
            ),
            (
                "MEDIA_BUFFERING_COMPLETED",
                Event::MediaBufferingCompleted {
                    correlation_id: String::new(),
                },
            ),
            (
                "DTMF_END digit:5 channel_id:1764712345.17",
                Event::DtmfEnd { digit: '5' },
            ),
            (
                "STATUS channel_id:1764712345.17 queue_length:3 xon_level:800 xoff_level:900 queue_full:false bulk_media:true media_paused:false",
                Event::Status(Status {
                    queue_length: 3,
                    xon_level: 800,
                    xoff_level: 900,
                    queue_full: false,
                    bulk_media: true,
                    media_paused: false,
                }),
            ),
            (
                "ERROR channel_id:1764712345.17 error_text:SET_MEDIA_DIRECTION only supports JSON format.",
                Event::Error {
                    error_text: "SET_MEDIA_DIRECTION only supports JSON format.".into(),
                },
            ),
        ];
        for (text, want) in cases {
            assert_eq!(
                Event::parse(text, ControlFormat::PlainText),
                Ok(want.clone()),
                "{text}"
            );
            assert_eq!(want.render(ControlFormat::PlainText, "1764712345.17"), text);
        }
    }

    /// The objects `ast_json_pack` builds in chan_websocket.c, compact, keys as Asterisk
    /// names them.
    #[test]
    fn json_events_read_as_asterisk_writes_them() {
        let text = r#"{"event":"MEDIA_START","connection_id":"voicegate","channel":"WebSocket/voicegate/0x7f3a2c001234","channel_id":"1764712345.17","format":"slin","optimal_frame_size":320,"ptime":20,"channel_variables":{"CALLERID(num)":"+4930123","MEDIA_WEBSOCKET_OPTIMAL_FRAME_SIZE":"320"}}"#;
        let Ok(Event::MediaStart(m)) = Event::parse(text, ControlFormat::Json) else {
            panic!("MEDIA_START not read");
        };
        assert_eq!(m.format, MediaFormat::Slin(8000));
        assert_eq!(m.optimal_frame_size, 320);
        assert_eq!(m.channel_id, "1764712345.17");
        assert_eq!(m.channel_variables["CALLERID(num)"], "+4930123");
        let cases = [
            (
                r#"{"event":"MEDIA_XOFF","channel_id":"1.2"}"#,
                Event::MediaXoff,
            ),
            (
                r#"{"event":"MEDIA_XON","channel_id":"1.2"}"#,
                Event::MediaXon,
            ),
            (
                r#"{"event":"MEDIA_MARK_PROCESSED","channel_id":"1.2","correlation_id":"m-9"}"#,
                Event::MediaMarkProcessed {
                    correlation_id: "m-9".into(),
                },
            ),
            (
                r#"{"event":"MEDIA_BUFFERING_COMPLETED","channel_id":"1.2","correlation_id":""}"#,
                Event::MediaBufferingCompleted {
                    correlation_id: String::new(),
                },
            ),
            (
                r#"{"event":"DTMF_END","channel_id":"1.2","digit":"*"}"#,
                Event::DtmfEnd { digit: '*' },
            ),
            (
                r#"{"event":"STATUS","channel_id":"1.2","queue_length":901,"xon_level":800,"xoff_level":900,"queue_full":true,"bulk_media":false,"media_paused":false}"#,
                Event::Status(Status {
                    queue_length: 901,
                    xon_level: 800,
                    xoff_level: 900,
                    queue_full: true,
                    bulk_media: false,
                    media_paused: false,
                }),
            ),
            (
                r#"{"event":"ERROR","channel_id":"1.2","error_text":"Unable to parse JSON command"}"#,
                Event::Error {
                    error_text: "Unable to parse JSON command".into(),
                },
            ),
        ];
        for (text, want) in cases {
            assert_eq!(Event::parse(text, ControlFormat::Json), Ok(want), "{text}");
        }
    }

    #[test]
    fn every_event_round_trips_in_both_formats() {
        for f in BOTH {
            for e in all_events() {
                let text = e.render(f, "1764712345.17");
                assert_eq!(ControlFormat::sniff(&text), f, "{text}");
                assert_eq!(Event::parse(&text, f), Ok(e), "{text}");
            }
        }
    }

    #[test]
    fn malformed_events_are_errors_not_guesses() {
        let p = ControlFormat::PlainText;
        let j = ControlFormat::Json;
        assert_eq!(Event::parse("  ", p), Err(ParseError::Empty));
        assert!(matches!(
            Event::parse("MEDIA_STOP", p),
            Err(ParseError::Unknown(_))
        ));
        assert!(matches!(
            Event::parse(
                "MEDIA_START connection_id:x channel:y channel_id:z format:slin ptime:20",
                p
            ),
            Err(ParseError::Field {
                field: "optimal_frame_size",
                ..
            })
        ));
        assert!(matches!(
            Event::parse("DTMF_END digit:x channel_id:1", p),
            Err(ParseError::Field { field: "digit", .. })
        ));
        assert!(matches!(
            Event::parse("STATUS channel_id:1 queue_length:-1", p),
            Err(ParseError::Field { .. })
        ));
        assert_eq!(Event::parse("MEDIA_XON", j), Err(ParseError::NotJson));
        assert_eq!(Event::parse("[1]", j), Err(ParseError::NotJson));
        assert!(matches!(
            Event::parse(r#"{"event":"DTMF_END","digit":"12"}"#, j),
            Err(ParseError::Field { .. })
        ));
        assert!(matches!(
            Event::parse(r#"{"event":"STATUS","queue_length":"3"}"#, j),
            Err(ParseError::Field { .. })
        ));
        assert!(matches!(
            Event::parse(r#"{"event":"MEDIA_START","channel_variables":{"A":1}}"#, j),
            Err(ParseError::Field { .. })
        ));
    }

    /// What `handle_command` in chan_websocket.c matches: the word, then the data after the
    /// first space (plain) or `correlation_id` (JSON).
    #[test]
    fn commands_are_written_as_asterisk_reads_them() {
        let p = ControlFormat::PlainText;
        let j = ControlFormat::Json;
        let mark = Command::MarkMedia {
            correlation_id: Some("r1-f20".into()),
        };
        assert_eq!(mark.render(p).unwrap(), "MARK_MEDIA r1-f20");
        assert_eq!(
            mark.render(j).unwrap(),
            r#"{"command":"MARK_MEDIA","correlation_id":"r1-f20"}"#
        );
        assert_eq!(Command::FlushMedia.render(p).unwrap(), "FLUSH_MEDIA");
        assert_eq!(
            Command::FlushMedia.render(j).unwrap(),
            r#"{"command":"FLUSH_MEDIA"}"#
        );
        assert_eq!(Command::GetStatus.render(p).unwrap(), "GET_STATUS");
        assert_eq!(
            Command::Hangup.render(j).unwrap(),
            r#"{"command":"HANGUP"}"#
        );
        assert_eq!(
            Command::SetMediaDirection(Direction::Out)
                .render(j)
                .unwrap(),
            r#"{"command":"SET_MEDIA_DIRECTION","direction":"out"}"#
        );
        assert_eq!(
            Command::SetMediaDirection(Direction::In).render(p),
            Err(ParseError::JsonOnly)
        );
        for f in BOTH {
            for c in all_commands() {
                let text = c.render(f).unwrap();
                assert!(text.len() <= MAX_TEXT_MESSAGE_LEN);
                assert_eq!(Command::parse(&text, f), Ok(c), "{text}");
            }
        }
        let dir = Command::SetMediaDirection(Direction::Both);
        assert_eq!(Command::parse(&dir.render(j).unwrap(), j), Ok(dir));
    }

    #[test]
    fn commands_asterisk_would_ignore_are_never_built() {
        let long = "x".repeat(MAX_CORRELATION_ID_LEN + 1);
        for bad in ["", "a b", "a\"b", "ü", long.as_str()] {
            let c = Command::MarkMedia {
                correlation_id: Some(bad.into()),
            };
            for f in BOTH {
                assert_eq!(c.render(f), Err(ParseError::BadCorrelationId), "{bad:?}");
            }
        }
        let max = "y".repeat(MAX_CORRELATION_ID_LEN);
        let c = Command::StopMediaBuffering {
            correlation_id: Some(max),
        };
        for f in BOTH {
            assert!(c.render(f).unwrap().len() <= MAX_TEXT_MESSAGE_LEN);
        }
        // Asterisk's reader refuses over-long text, as the fake must.
        let over = format!("MARK_MEDIA {}", "z".repeat(MAX_TEXT_MESSAGE_LEN));
        assert!(matches!(
            Command::parse(&over, ControlFormat::PlainText),
            Err(ParseError::TooLong(_))
        ));
        assert!(matches!(
            Command::parse("SET_MEDIA_DIRECTION out", ControlFormat::PlainText),
            Err(ParseError::JsonOnly)
        ));
        assert!(matches!(
            Command::parse("DROP_MEDIA", ControlFormat::PlainText),
            Err(ParseError::Unknown(_))
        ));
    }

    #[test]
    fn format_names_and_frame_sizes() {
        for (name, f, bytes) in [
            ("slin", MediaFormat::Slin(8000), Some(320)),
            ("slin16", MediaFormat::Slin(16_000), Some(640)),
            ("slin44", MediaFormat::Slin(44_100), Some(1764)),
            ("slin192", MediaFormat::Slin(192_000), Some(7680)),
            ("ulaw", MediaFormat::Ulaw, Some(160)),
            ("alaw", MediaFormat::Alaw, Some(160)),
            ("opus", MediaFormat::Other("opus".into()), None),
            ("slin17", MediaFormat::Other("slin17".into()), None),
        ] {
            assert_eq!(MediaFormat::from_name(name), f, "{name}");
            assert_eq!(f.name(), name);
            assert_eq!(f.bytes_per(20), bytes, "{name}");
        }
    }

    /// The fuzz target's seeds (`fuzz/corpus/chanws_control`) are real messages: each one
    /// reads as an event or a command in the format it sniffs as.
    #[test]
    fn fuzz_seeds_are_real_messages() {
        let dir =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus/chanws_control");
        let mut n = 0;
        for entry in std::fs::read_dir(dir).expect("corpus") {
            let path = entry.unwrap().path();
            let text = std::fs::read_to_string(&path).unwrap();
            let f = ControlFormat::sniff(&text);
            assert!(
                Event::parse(&text, f).is_ok() || Command::parse(&text, f).is_ok(),
                "{}",
                path.display()
            );
            n += 1;
        }
        assert!(n >= 8, "{n} seeds");
    }

    proptest::proptest! {
        #[test]
        fn parsers_never_panic(s in "\\PC{0,200}") {
            for f in BOTH {
                let _ = Event::parse(&s, f);
                let _ = Command::parse(&s, f);
            }
        }
    }
}
