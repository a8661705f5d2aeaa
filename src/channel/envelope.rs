//! The `NODE_HANDLE` envelope and the other fixed protocol messages (protocol doc §4).

use serde::Deserialize;
use serde_json::value::RawValue;

use crate::handle::WireHandle;

/// `{"cmd":"NODE_HANDLE_ACK"}` and its terminator.
pub(crate) const ACK: &[u8] = b"{\"cmd\":\"NODE_HANDLE_ACK\"}\n";
/// `{"cmd":"NODE_HANDLE_NACK"}` and its terminator.
pub(crate) const NACK: &[u8] = b"{\"cmd\":\"NODE_HANDLE_NACK\"}\n";

/// Builds `{"cmd":"NODE_HANDLE","type":T,"msg":M[,"key":K][,"dgramType":D]}\n`, in Node's key
/// order. `msg_json` is the already-serialized user message.
pub(crate) fn encode_handle(msg_json: &[u8], wire: &WireHandle) -> Vec<u8> {
    let mut out = Vec::with_capacity(msg_json.len() + 96);
    out.extend_from_slice(b"{\"cmd\":\"NODE_HANDLE\",\"type\":\"");
    out.extend_from_slice(wire.handle_type.as_str().as_bytes());
    out.extend_from_slice(b"\",\"msg\":");
    out.extend_from_slice(msg_json);
    if let Some(key) = &wire.key {
        out.extend_from_slice(b",\"key\":");
        serde_json::to_writer(&mut out, key).expect("a string always serializes");
    }
    if let Some(dgram_type) = wire.dgram_type {
        out.extend_from_slice(b",\"dgramType\":\"");
        out.extend_from_slice(dgram_type.as_str().as_bytes());
        out.push(b'"');
    }
    out.extend_from_slice(b"}\n");
    out
}

/// Appends `{"cmd":"NODE_SOCKET_COUNT","key":KEY,"count":N}\n`, in Node's key order.
pub(crate) fn encode_count(out: &mut Vec<u8>, key: &str, count: usize) {
    out.extend_from_slice(b"{\"cmd\":\"NODE_SOCKET_COUNT\",\"key\":");
    serde_json::to_writer(&mut *out, key).expect("a string always serializes");
    out.extend_from_slice(b",\"count\":");
    out.extend_from_slice(count.to_string().as_bytes());
    out.extend_from_slice(b"}\n");
}

/// Appends `{"cmd":"NODE_SOCKET_ALL_CLOSED","key":KEY}\n`.
pub(crate) fn encode_all_closed(out: &mut Vec<u8>, key: &str) {
    out.extend_from_slice(b"{\"cmd\":\"NODE_SOCKET_ALL_CLOSED\",\"key\":");
    serde_json::to_writer(&mut *out, key).expect("a string always serializes");
    out.extend_from_slice(b"}\n");
}

/// The internal `cmd` of a serialized outgoing message, if it has one.
///
/// Fast path: compact `serde_json` output can only contain `"cmd":"NODE_` as an object key and
/// value, so a message without that byte sequence is a user message and is not parsed again.
pub(crate) fn reserved_cmd(frame: &[u8]) -> Option<String> {
    static NEEDLE: std::sync::LazyLock<memchr::memmem::Finder<'static>> =
        std::sync::LazyLock::new(|| memchr::memmem::Finder::new(b"\"cmd\":\"NODE_"));
    NEEDLE.find(frame)?;
    let text = std::str::from_utf8(frame).ok()?;
    super::frame::probe(text.trim_end(), usize::MAX).ok().flatten()
}

/// Commands handoff itself speaks; user code may not send them.
pub(crate) fn is_managed_cmd(cmd: &str) -> bool {
    cmd.starts_with("NODE_HANDLE") || cmd.starts_with("NODE_SOCKET_") || cmd == "NODE_CLUSTER"
}

#[derive(Deserialize)]
struct RawEnvelope<'a> {
    #[serde(rename = "type", default)]
    handle_type: Option<String>,
    #[serde(borrow, default)]
    msg: Option<&'a RawValue>,
    #[serde(default)]
    key: Option<String>,
    #[serde(rename = "dgramType", default)]
    dgram_type: Option<String>,
}

/// A parsed `NODE_HANDLE` envelope.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct HandleEnvelope {
    /// The `type` field (may name a type Node does not define).
    pub(crate) handle_type: String,
    /// The user's message as JSON text (`null` when absent).
    pub(crate) msg: String,
    pub(crate) key: Option<String>,
    pub(crate) dgram_type: Option<String>,
    /// How many retransmission wrappers were removed (Node v20 wraps resent handles).
    pub(crate) unwrapped: usize,
}

/// Most retransmission wrappers removed from one envelope. Node wraps a handle once per resend
/// and gives up after 3 resends, so 8 is never reached by a real peer; the limit keeps the work
/// per frame within a small multiple of its size.
pub(crate) const MAX_UNWRAP: usize = 8;

/// Why an envelope could not be read.
#[derive(Debug)]
pub(crate) enum EnvelopeError {
    /// Not an object of the expected shape.
    Shape(serde_json::Error),
    /// Wrapped more than [`MAX_UNWRAP`] times.
    TooDeep,
}

impl std::fmt::Display for EnvelopeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            EnvelopeError::Shape(e) => write!(
                f,
                "the NODE_HANDLE envelope is not an object of the expected shape: {}",
                crate::channel::excerpt(&e.to_string(), 200)
            ),
            EnvelopeError::TooDeep => write!(
                f,
                "the NODE_HANDLE envelope is nested more than {MAX_UNWRAP} levels deep (Node wraps a \
                 resent handle once per attempt, at most 3 times)"
            ),
        }
    }
}

/// Parses a `NODE_HANDLE` frame, removing Node's retransmission wrapping: a resent handle arrives
/// as `{"cmd":"NODE_HANDLE","type":"net.Native","msg":<the original envelope>}`.
///
/// Each level costs a parse of what is inside it, and there are at most [`MAX_UNWRAP`] levels, so
/// the work is linear in the frame's size.
pub(crate) fn parse_handle(text: &str) -> Result<HandleEnvelope, EnvelopeError> {
    // The frame's depth was bounded by the decoder already.
    let mut raw: RawEnvelope<'_> = super::json::from_str(text).map_err(EnvelopeError::Shape)?;
    let mut unwrapped = 0;
    loop {
        let inner = raw.msg.map(RawValue::get).unwrap_or("null");
        let nested = raw.handle_type.as_deref() == Some("net.Native")
            && super::frame::probe(inner, usize::MAX).ok().flatten().as_deref() == Some("NODE_HANDLE");
        if !nested {
            return Ok(HandleEnvelope {
                handle_type: raw.handle_type.unwrap_or_default(),
                msg: inner.to_owned(),
                key: raw.key,
                dgram_type: raw.dgram_type,
                unwrapped,
            });
        }
        if unwrapped == MAX_UNWRAP {
            return Err(EnvelopeError::TooDeep);
        }
        raw = super::json::from_str(inner).map_err(EnvelopeError::Shape)?;
        unwrapped += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unwraps_node_retransmission() {
        let text = r#"{"cmd":"NODE_HANDLE","type":"net.Native","msg":{"cmd":"NODE_HANDLE","type":"net.Socket","msg":{"a":[1]},"key":"4:127.0.0.1:0"}}"#;
        let env = parse_handle(text).unwrap();
        assert_eq!(env.handle_type, "net.Socket");
        assert_eq!(env.msg, r#"{"a":[1]}"#);
        assert_eq!(env.key.as_deref(), Some("4:127.0.0.1:0"));
        assert_eq!(env.unwrapped, 1);
    }

    #[test]
    fn reserved_only_for_top_level_internal_cmd() {
        assert_eq!(reserved_cmd(b"{\"cmd\":\"NODE_X\"}\n").as_deref(), Some("NODE_X"));
        assert_eq!(reserved_cmd(b"{\"a\":{\"cmd\":\"NODE_X\"}}\n"), None);
        assert_eq!(reserved_cmd(b"{\"cmd\":\"NODE_\"}\n"), None);
        assert_eq!(reserved_cmd(b"\"{\\\"cmd\\\":\\\"NODE_X\\\"}\"\n"), None);
    }
}
