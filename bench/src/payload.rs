//! The messages every variant sends, identical in Rust, the bare reference and Node
//! (`bench/node/common.js` builds the same ones).
//!
//! A message of `size` bytes is JSON text of exactly `size` bytes (plus the `\n` on the wire):
//! - 64 bytes: the object `{"seq":N,"pad":"xxx…"}` with an 8-digit `seq` that changes per message;
//! - any other size: a JSON string `"xxx…"`.

use serde::{Deserialize, Serialize};

/// The size whose message is an object rather than a string.
pub const SMALL: usize = 64;
/// Padding that makes [`Small`] exactly 64 bytes of JSON.
pub const PAD: &str = "xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx";

/// The 64-byte message.
#[derive(Debug, Serialize, Deserialize)]
pub struct Small<'a> {
    /// Always 8 digits: 10000000..=99999999.
    pub seq: u64,
    /// 39 bytes.
    pub pad: std::borrow::Cow<'a, str>,
}

impl Small<'static> {
    /// The `i`-th message.
    pub fn nth(i: u64) -> Small<'static> {
        Small { seq: 10_000_000 + i % 90_000_000, pad: std::borrow::Cow::Borrowed(PAD) }
    }
}

/// The JSON text (without `\n`) of a `size`-byte message.
pub fn text(size: usize) -> String {
    if size == SMALL {
        serde_json::to_string(&Small::nth(0)).expect("serializes")
    } else {
        let mut s = String::with_capacity(size);
        s.push('"');
        s.extend(std::iter::repeat_n('x', size.saturating_sub(2)));
        s.push('"');
        s
    }
}

/// The string inside a `size`-byte string message.
pub fn string_body(size: usize) -> String {
    "x".repeat(size.saturating_sub(2))
}

/// The frame bytes (`text` plus `\n`).
pub fn frame(size: usize) -> Vec<u8> {
    let mut bytes = text(size).into_bytes();
    bytes.push(b'\n');
    bytes
}

/// The `NODE_HANDLE` line the bare reference sends with each descriptor (what Node writes for
/// `child.send('h', socket)`).
pub const HANDLE_FRAME: &[u8] = b"{\"cmd\":\"NODE_HANDLE\",\"type\":\"net.Socket\",\"msg\":\"h\"}\n";

/// Node's acknowledgement of one handle, as the bare reference's child writes it.
pub const ACK: &[u8] = b"{\"cmd\":\"NODE_HANDLE_ACK\"}\n";

/// The seed child's answer.
pub const REPLY: &str = "Child handled it.";

#[cfg(test)]
mod tests {
    #[test]
    fn sizes_are_exact() {
        for size in [64, 4096, 65536] {
            assert_eq!(super::text(size).len(), size);
        }
        assert_eq!(serde_json::to_string(&super::Small::nth(89_999_999)).unwrap().len(), 64);
    }
}
