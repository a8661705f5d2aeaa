//! Node's `json` framing, with no I/O: one JSON value per `\n`-terminated line, and the file
//! descriptors that arrive beside the bytes.
//!
//! [`Decoder`] is incremental: feed it each read's bytes and the descriptors that came with that
//! read, and it yields complete [`Frame`]s, binding a descriptor to the `NODE_HANDLE` frame it
//! belongs to and reporting (then closing) every descriptor no frame claims.
//!
//! # Which frame a descriptor belongs to
//! A sender (libuv, or handoff) attaches a handle's descriptor to the `sendmsg` that carries the
//! first byte of its `NODE_HANDLE` line; that `sendmsg` may carry more lines after it (a sender
//! that writes a handle and the messages queued behind it at once), and it may be split by the
//! kernel. Linux never returns stream data past a segment that carried descriptors in the same
//! `recvmsg`, so the descriptor segment is the *last* part of the read that brings its
//! descriptors, and its owner is the first `NODE_HANDLE` line starting in that segment (protocol
//! doc §4.5: "bind each fd to the `NODE_HANDLE` whose first bytes it arrived with"). Where that
//! segment starts inside the read cannot be seen, but every `NODE_HANDLE` line of a well-behaved
//! sender that starts before the owner, in an earlier segment, came without descriptors, and none
//! can start after it. So:
//!
//! * the descriptors of a read belong to the **last `NODE_HANDLE` frame whose first byte is in
//!   that read**. It gets the first descriptor; the others are surplus
//!   ([`StrayReason::Surplus`]). This is right both for a handle followed by plain lines in one
//!   `sendmsg` (the handle is the last `NODE_HANDLE` starting in the read) and for a kernel merge
//!   of a handle sent without a descriptor with the next one sent with it (the later one is).
//! * If no frame starts in the read, the descriptors belong to nothing
//!   ([`StrayReason::NoFrame`]).
//! * If frames start in the read but none of them is a valid `NODE_HANDLE`, the reason is taken
//!   from the *last* frame starting in the read: [`StrayReason::NotAHandle`] if it is a valid
//!   message, [`StrayReason::BadFrame`] if it is malformed or too large (a malformed or
//!   over-long line is never a `NODE_HANDLE` frame, even if an earlier one in the read is bad
//!   too). If the channel ends before that last frame is complete, it is unknown whether it was
//!   the handle, so the descriptors are closed as [`StrayReason::Truncated`] and any complete
//!   `NODE_HANDLE` frame before it in the read is delivered without them.
//!
//! Unclaimed descriptors are dropped (closed) and reported as [`FrameError::StrayFds`] — never
//! handed on to a frame of a later read, which is how Node misattributes them (protocol doc §4.2).
//!
//! Which frame is the last `NODE_HANDLE` starting in a read is known only when the last frame
//! starting in it is complete, possibly several reads later. Frames are produced in stream order,
//! so from the first complete `NODE_HANDLE` frame of such a read on, the frames are held back
//! until that last frame completes (or turns out too long, or the channel ends); frames before it
//! cannot get a descriptor and are produced at once. The held frames are at most one read's worth,
//! and a frame that starts in a read without descriptors is never held back.
//!
//! # Text
//! Lines are decoded as UTF-8; invalid bytes become U+FFFD, as Node's stream decoder does. JSON
//! that `JSON.stringify` can emit but `serde_json` refuses — lone UTF-16 surrogate escapes such as
//! `"\ud800"` — is accepted by replacing each lone surrogate with U+FFFD: a lossy, documented
//! mapping, because a Rust `String` cannot hold a lone surrogate. `\r\n` endings and any JSON
//! value at top level are accepted. An empty line is a malformed frame.

use std::borrow::Cow;
use std::fmt;
use std::os::fd::OwnedFd;

use serde::de::{self, Deserializer, MapAccess, SeqAccess, Visitor};

use super::json;

/// Default largest frame the decoder accepts: 64 MiB.
pub const DEFAULT_MAX_FRAME_LEN: usize = 64 * 1024 * 1024;
pub use super::json::DEFAULT_MAX_DEPTH;

/// The `cmd` of a handle-carrying message.
pub(crate) const NODE_HANDLE: &str = "NODE_HANDLE";

/// One complete message line, validated as JSON.
#[derive(Debug)]
pub struct Frame {
    /// The JSON text, without the line terminator (and with invalid UTF-8 and lone surrogates
    /// replaced by U+FFFD, see the module docs).
    pub text: String,
    /// `Some(cmd)` when the message is internal: an object whose `cmd` is a string longer than
    /// five characters starting with `NODE_` (Node's rule, protocol doc §3).
    pub internal_cmd: Option<String>,
    /// The descriptor bound to this frame (only ever to a `NODE_HANDLE`; see the module docs for
    /// which one).
    pub fd: Option<OwnedFd>,
}

impl Frame {
    /// Whether this frame is a `NODE_HANDLE` envelope.
    pub fn is_handle(&self) -> bool {
        self.internal_cmd.as_deref() == Some(NODE_HANDLE)
    }
}

/// Why descriptors were not given to any frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StrayReason {
    /// No frame started in the read that carried them.
    NoFrame,
    /// No frame that started in their read is a `NODE_HANDLE` message, and the last one is a
    /// valid message.
    NotAHandle,
    /// The `NODE_HANDLE` frame already took one descriptor; these came in addition.
    Surplus,
    /// No frame that started in their read is a `NODE_HANDLE` message, and the last one was
    /// malformed or too large.
    BadFrame,
    /// The channel ended before the last frame that started in their read was complete.
    Truncated,
}

impl fmt::Display for StrayReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            StrayReason::NoFrame => "no message started in the read that carried them",
            StrayReason::NotAHandle => {
                "no NODE_HANDLE message started in the read that carried them"
            }
            StrayReason::Surplus => "a NODE_HANDLE message carries exactly one descriptor",
            StrayReason::BadFrame => "the message they came with could not be decoded",
            StrayReason::Truncated => "the channel closed before their message was complete",
        })
    }
}

/// A problem in the byte stream. The decoder goes on with the next line after each one.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum FrameError {
    /// A line that is not valid JSON.
    #[error("malformed message from peer ({len} bytes, starting {excerpt:?}): {error}")]
    Malformed {
        /// What the JSON parser said.
        error: String,
        /// The first characters of the line.
        excerpt: String,
        /// The length of the line in bytes.
        len: usize,
    },
    /// A line longer than the configured maximum; its bytes were discarded up to its end.
    #[error(
        "message from peer is longer than the {limit}-byte limit and was discarded; \
         raise ChannelConfig::max_frame_len if such messages are expected"
    )]
    TooLarge {
        /// The limit in force.
        limit: usize,
    },
    /// Descriptors that no frame claimed; they have been closed.
    #[error("closed {count} file descriptor(s) received from peer: {reason}")]
    StrayFds {
        /// How many descriptors were closed.
        count: usize,
        /// Why they belonged to no frame.
        reason: StrayReason,
    },
    /// A line nested (arrays and objects) deeper than the configured maximum; it was discarded.
    #[error(
        "message from peer nests deeper than the {limit}-level limit and was discarded; raise \
         ChannelConfig::max_depth if such messages are expected"
    )]
    TooDeep {
        /// The limit in force.
        limit: usize,
    },
    /// The channel ended in the middle of a line.
    #[error("peer closed the channel in the middle of a message ({len} bytes received)")]
    Truncated {
        /// Bytes of the incomplete line.
        len: usize,
    },
}

/// Something the decoder produced.
#[derive(Debug)]
pub enum Decoded {
    /// A complete message.
    Frame(Frame),
    /// A problem; decoding continues after it.
    Error(FrameError),
}

/// Incremental decoder for Node's `json` serialization. See the module docs.
#[derive(Debug)]
pub struct Decoder {
    max_frame_len: usize,
    max_depth: usize,
    /// Bytes of the frame in progress (it started in an earlier read).
    partial: Vec<u8>,
    /// Discarding an over-long frame up to its terminating newline.
    skipping: bool,
    /// Descriptors whose frame is not decided yet, and the frames held back meanwhile.
    pending: Option<Pending>,
    /// Where a frame growing past [`RECYCLE_MIN`](super::recycle::RECYCLE_MIN) finds the buffer
    /// of an earlier large message (the channel's; none for a standalone decoder).
    recycler: Option<std::sync::Arc<super::recycle::Recycler>>,
}

/// The descriptors of one read, until the last frame that started in that read is complete (see
/// the module docs). While it exists, every item the decoder produces comes from a frame that
/// started in that read.
#[derive(Debug)]
struct Pending {
    /// The read's descriptors (never empty).
    fds: Vec<OwnedFd>,
    /// Items produced by earlier calls of `decode` and held back: empty, or starting with the
    /// first `NODE_HANDLE` frame of the read.
    held: Vec<Decoded>,
    /// Where this call's items start in its `out`. The items so far are `held` followed by
    /// `out[out_start..]`; the positions below count in that sequence.
    out_start: usize,
    /// Position of the first `NODE_HANDLE` frame so far.
    first_handle: Option<usize>,
    /// Position of the last `NODE_HANDLE` frame so far: the one the descriptors go to.
    last_handle: Option<usize>,
    /// The frame in progress is the last that started in the read: its item decides.
    last_started: bool,
}

impl Default for Decoder {
    fn default() -> Self {
        Decoder::new(DEFAULT_MAX_FRAME_LEN)
    }
}

impl Decoder {
    /// A decoder that refuses lines longer than `max_frame_len` bytes, counting every byte before
    /// the `\n` (so the `\r` of a `\r\n` ending counts).
    pub fn new(max_frame_len: usize) -> Decoder {
        Decoder {
            max_frame_len,
            max_depth: DEFAULT_MAX_DEPTH,
            partial: Vec::new(),
            skipping: false,
            pending: None,
            recycler: None,
        }
    }

    /// Refuses lines nesting arrays and objects deeper than `levels` ([`FrameError::TooDeep`]);
    /// default [`DEFAULT_MAX_DEPTH`]. Any depth up to it is parsed safely (the stack grows as
    /// needed).
    pub fn with_max_depth(mut self, levels: usize) -> Decoder {
        self.max_depth = levels;
        self
    }

    /// Bytes of an incomplete frame held from earlier reads. Complete frames held back until a
    /// descriptor's frame is known (see the module docs) are not counted; they come from a single
    /// read.
    pub fn buffered_len(&self) -> usize {
        self.partial.len()
    }

    /// Feeds one read: `chunk` and the descriptors that arrived with it. Appends what it decoded
    /// to `out`, in stream order. Frames that may still get this or an earlier read's descriptors
    /// are held back and appended by a later call (see the module docs).
    pub fn decode(&mut self, chunk: &[u8], fds: Vec<OwnedFd>, out: &mut Vec<Decoded>) {
        if chunk.is_empty() {
            if !fds.is_empty() {
                stray(out, fds, StrayReason::NoFrame);
            }
            return;
        }
        // Where the first and the last frame starting in this read begin, if it carries
        // descriptors (see module docs).
        let mut starts = None;
        let mut fds = Some(fds).filter(|f| !f.is_empty());
        if fds.is_some() {
            let first = if self.partial.is_empty() && !self.skipping {
                Some(0)
            } else {
                memchr::memchr(b'\n', chunk).map(|i| i + 1).filter(|&s| s < chunk.len())
            };
            match first {
                Some(first) => {
                    let last = memchr::memrchr(b'\n', &chunk[first..chunk.len() - 1])
                        .map_or(first, |i| first + i + 1);
                    starts = Some((first, last));
                }
                None => stray(out, fds.take().unwrap_or_default(), StrayReason::NoFrame),
            }
        }
        if let Some(pending) = &mut self.pending {
            pending.out_start = out.len();
        }

        let mut start = 0;
        for nl in memchr::memchr_iter(b'\n', chunk) {
            if starts.is_some() {
                self.frame_starts(start, &mut starts, &mut fds, out);
            }
            self.finish_line(&chunk[start..nl], out);
            start = nl + 1;
        }
        if start < chunk.len() {
            if starts.is_some() {
                self.frame_starts(start, &mut starts, &mut fds, out);
            }
            self.hold(&chunk[start..], out);
        }
        debug_assert!(fds.is_none(), "every descriptor is bound, pending or reported");
        self.hold_back(out);
    }

    /// The peer closed the channel: delivers the frames held back and reports an incomplete
    /// frame, if any.
    pub fn finish(&mut self, out: &mut Vec<Decoded>) {
        if let Some(pending) = self.pending.take() {
            // Whether the incomplete last frame was the handle is unknown: bind nothing.
            out.extend(pending.held);
            stray(out, pending.fds, StrayReason::Truncated);
        }
        if !self.partial.is_empty() {
            out.push(Decoded::Error(FrameError::Truncated { len: self.partial.len() }));
            self.partial = Vec::new();
        }
        self.skipping = false;
    }

    /// A frame starts at `at` in a read whose first and last frame start at `starts`.
    fn frame_starts(
        &mut self,
        at: usize,
        starts: &mut Option<(usize, usize)>,
        fds: &mut Option<Vec<OwnedFd>>,
        out: &[Decoded],
    ) {
        let Some((first, last)) = *starts else { return };
        if at == first {
            // An earlier read's decision was made when its last frame ended, before this one.
            debug_assert!(self.pending.is_none());
            self.pending = Some(Pending {
                fds: fds.take().unwrap_or_default(),
                held: Vec::new(),
                out_start: out.len(),
                first_handle: None,
                last_handle: None,
                last_started: false,
            });
        }
        if at == last {
            if let Some(pending) = &mut self.pending {
                pending.last_started = true;
            }
            *starts = None;
        }
    }

    /// Appends one frame's item, held back with the descriptors' decision if one is pending.
    fn emit(&mut self, item: Decoded, out: &mut Vec<Decoded>) {
        let Some(pending) = &mut self.pending else {
            out.push(item);
            return;
        };
        if let Decoded::Frame(frame) = &item {
            if frame.is_handle() {
                let at = pending.held.len() + out.len() - pending.out_start;
                pending.first_handle.get_or_insert(at);
                pending.last_handle = Some(at);
            }
        }
        out.push(item);
        if pending.last_started {
            self.decide(out);
        }
    }

    /// The last frame of the pending read has just been appended to `out`: binds the descriptors
    /// and releases the frames held back, in order.
    fn decide(&mut self, out: &mut Vec<Decoded>) {
        let Some(Pending { mut fds, held, out_start, last_handle, .. }) = self.pending.take()
        else {
            return;
        };
        let reason = match (last_handle, out.last()) {
            (Some(_), _) => StrayReason::Surplus,
            (None, Some(Decoded::Frame(_))) => StrayReason::NotAHandle,
            (None, _) => StrayReason::BadFrame,
        };
        if !held.is_empty() {
            out.splice(out_start..out_start, held);
        }
        if let Some(at) = last_handle {
            if let Decoded::Frame(frame) = &mut out[out_start + at] {
                frame.fd = Some(fds.remove(0));
            }
        }
        if !fds.is_empty() {
            stray(out, fds, reason);
        }
    }

    /// At the end of a read, still undecided: takes back from `out` the items from the first
    /// `NODE_HANDLE` frame of the pending read on. Items before it can get no descriptor.
    fn hold_back(&mut self, out: &mut Vec<Decoded>) {
        let Some(pending) = &mut self.pending else {
            return;
        };
        let from = if !pending.held.is_empty() {
            pending.out_start
        } else if let Some(first) = pending.first_handle {
            pending.first_handle = Some(0);
            pending.last_handle = pending.last_handle.map(|last| last - first);
            pending.out_start + first
        } else {
            return;
        };
        pending.held.extend(out.drain(from..));
    }

    /// Keeps the start of an incomplete frame, unless it is already too long.
    fn hold(&mut self, bytes: &[u8], out: &mut Vec<Decoded>) {
        if self.skipping {
            return;
        }
        if self.partial.len() + bytes.len() > self.max_frame_len {
            self.skipping = true;
            self.partial = Vec::new();
            self.emit(Decoded::Error(FrameError::TooLarge { limit: self.max_frame_len }), out);
            return;
        }
        self.grow_partial(bytes.len());
        self.partial.extend_from_slice(bytes);
    }

    /// Before `partial` grows by `more` bytes past its capacity into a large buffer: move it into
    /// a kept buffer of an earlier large message instead, whose pages are already in memory.
    fn grow_partial(&mut self, more: usize) {
        let needed = self.partial.len() + more;
        if needed <= self.partial.capacity() || needed < super::recycle::RECYCLE_MIN {
            return;
        }
        let Some(mut spare) = self.recycler.as_ref().and_then(|r| r.take()) else { return };
        if spare.capacity() <= self.partial.capacity() {
            return; // dropped: no better than what we have
        }
        spare.extend_from_slice(&self.partial);
        self.partial = spare;
        if let Some(recycler) = &self.recycler {
            recycler.large_frame();
        }
    }

    /// Large frames of this decoder reuse the buffers `recycler` keeps.
    pub(crate) fn with_recycler(mut self, recycler: std::sync::Arc<super::recycle::Recycler>) -> Self {
        self.recycler = Some(recycler);
        self
    }

    /// `tail` is the end of a line (its `\n` excluded); completes the frame.
    fn finish_line(&mut self, tail: &[u8], out: &mut Vec<Decoded>) {
        if self.skipping {
            // Its `TooLarge` was reported when it went over the limit.
            self.skipping = false;
            return;
        }
        let item = if self.partial.len() + tail.len() > self.max_frame_len {
            self.partial = Vec::new();
            Decoded::Error(FrameError::TooLarge { limit: self.max_frame_len })
        } else if self.partial.is_empty() {
            if let Some(recycler) = &self.recycler {
                recycler.small_frame();
            }
            parse_frame(tail, self.max_depth)
        } else {
            self.grow_partial(tail.len());
            let mut line = std::mem::take(&mut self.partial);
            line.extend_from_slice(tail);
            parse_owned_frame(line, self.max_depth)
        };
        self.emit(item, out);
    }
}

fn stray(out: &mut Vec<Decoded>, fds: Vec<OwnedFd>, reason: StrayReason) {
    let count = fds.len();
    drop(fds);
    out.push(Decoded::Error(FrameError::StrayFds { count, reason }));
}

/// Like [`parse_frame`] for a line assembled in a buffer we own: valid text becomes the frame's
/// `String` without another copy (large messages span reads, so this is their usual path).
fn parse_owned_frame(line: Vec<u8>, max_depth: usize) -> Decoded {
    match String::from_utf8(line) {
        Ok(mut text) => {
            let len = text.trim_end_matches('\r').len();
            match probe(&text[..len], max_depth) {
                Ok(internal_cmd) => {
                    text.truncate(len);
                    Decoded::Frame(Frame { text, internal_cmd, fd: None })
                }
                // Too deep, repairable (lone surrogates) or malformed: the general path says
                // which.
                Err(_) => parse_frame(text.as_bytes(), max_depth),
            }
        }
        Err(invalid) => parse_frame(invalid.as_bytes(), max_depth),
    }
}

/// Parses one complete line into a frame (without a descriptor yet) or an error.
fn parse_frame(line: &[u8], max_depth: usize) -> Decoded {
    match parse_line(line, max_depth) {
        Ok((text, internal_cmd)) => Decoded::Frame(Frame { text, internal_cmd, fd: None }),
        Err(error) => Decoded::Error(error),
    }
}

/// Validates one line as JSON and reports whether it is an internal message.
///
/// Returns the (possibly repaired) text and the internal `cmd`, if any.
pub(crate) fn parse_line(
    line: &[u8],
    max_depth: usize,
) -> Result<(String, Option<String>), FrameError> {
    // The acknowledgement, byte for byte as Node and handoff write it, arrives once per handle:
    // it is known without parsing.
    const ACK_LINE: &str = r#"{"cmd":"NODE_HANDLE_ACK"}"#;
    if line == ACK_LINE.as_bytes() {
        return Ok((ACK_LINE.to_owned(), Some("NODE_HANDLE_ACK".to_owned())));
    }
    let text = match std::str::from_utf8(line) {
        Ok(s) => Cow::Borrowed(s),
        Err(_) => String::from_utf8_lossy(line),
    };
    let text = text.trim_end_matches('\r');
    match probe(text, max_depth) {
        Ok(cmd) => Ok((text.to_owned(), cmd)),
        Err(json::Refused::TooDeep) => Err(FrameError::TooDeep { limit: max_depth }),
        Err(json::Refused::Json(first)) => {
            if let Some(repaired) = replace_lone_surrogates(text) {
                if let Ok(cmd) = probe(&repaired, max_depth) {
                    return Ok((repaired, cmd));
                }
            }
            Err(FrameError::Malformed {
                // The parser's message can quote the peer's input: keep an excerpt.
                error: super::excerpt(&first.to_string(), 200),
                excerpt: text.chars().take(64).collect(),
                len: line.len(),
            })
        }
    }
}

/// Parses `text` as one JSON value without building it, returning the internal `cmd` if the
/// value is an internal message.
pub(crate) fn probe(text: &str, max_depth: usize) -> Result<Option<String>, json::Refused> {
    let probe = json::deserialize_any_within(text, ProbeVisitor, max_depth)?;
    Ok(probe.filter(|cmd| is_internal_cmd(cmd)))
}

/// Node's rule for an internal command: longer than five characters and starting with `NODE_`.
pub(crate) fn is_internal_cmd(cmd: &str) -> bool {
    cmd.len() > 5 && cmd.starts_with("NODE_")
}

/// Walks any JSON value; for an object, remembers its (last) string `cmd`.
#[derive(Clone, Copy)]
struct ProbeVisitor;

impl<'de> Visitor<'de> for ProbeVisitor {
    type Value = Option<String>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON value")
    }
    fn visit_bool<E>(self, _: bool) -> Result<Self::Value, E> {
        Ok(None)
    }
    fn visit_i64<E>(self, _: i64) -> Result<Self::Value, E> {
        Ok(None)
    }
    fn visit_u64<E>(self, _: u64) -> Result<Self::Value, E> {
        Ok(None)
    }
    fn visit_f64<E>(self, _: f64) -> Result<Self::Value, E> {
        Ok(None)
    }
    fn visit_str<E>(self, _: &str) -> Result<Self::Value, E> {
        Ok(None)
    }
    fn visit_unit<E>(self) -> Result<Self::Value, E> {
        Ok(None)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        while seq.next_element::<Validated>()?.is_some() {}
        Ok(None)
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut cmd = None;
        while let Some(key) = map.next_key::<KeyIsCmd>()? {
            if key.0 {
                cmd = map.next_value::<MaybeString>()?.0;
            } else {
                map.next_value::<Validated>()?;
            }
        }
        Ok(cmd)
    }
}

/// Any JSON value, walked the way a full parse walks it (strings unescaped, numbers parsed), but
/// not kept. `IgnoredAny` would skip string escapes unchecked and let through what a full parse
/// refuses.
struct Validated;

impl<'de> de::Deserialize<'de> for Validated {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(ProbeVisitor).map(|_| Validated)
    }
}

/// A map key, reduced to "is it `cmd`?" without allocating.
struct KeyIsCmd(bool);

impl<'de> de::Deserialize<'de> for KeyIsCmd {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = KeyIsCmd;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a key")
            }
            fn visit_str<E>(self, v: &str) -> Result<KeyIsCmd, E> {
                Ok(KeyIsCmd(v == "cmd"))
            }
        }
        d.deserialize_str(V)
    }
}

/// A value kept only if it is a string.
struct MaybeString(Option<String>);

impl<'de> de::Deserialize<'de> for MaybeString {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = MaybeString;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a JSON value")
            }
            fn visit_str<E>(self, v: &str) -> Result<MaybeString, E> {
                Ok(MaybeString(Some(v.to_owned())))
            }
            fn visit_bool<E>(self, _: bool) -> Result<MaybeString, E> {
                Ok(MaybeString(None))
            }
            fn visit_i64<E>(self, _: i64) -> Result<MaybeString, E> {
                Ok(MaybeString(None))
            }
            fn visit_u64<E>(self, _: u64) -> Result<MaybeString, E> {
                Ok(MaybeString(None))
            }
            fn visit_f64<E>(self, _: f64) -> Result<MaybeString, E> {
                Ok(MaybeString(None))
            }
            fn visit_unit<E>(self) -> Result<MaybeString, E> {
                Ok(MaybeString(None))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<MaybeString, A::Error> {
                ProbeVisitor.visit_seq(seq).map(|_| MaybeString(None))
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<MaybeString, A::Error> {
                ProbeVisitor.visit_map(map).map(|_| MaybeString(None))
            }
        }
        d.deserialize_any(V)
    }
}

/// Rewrites every lone UTF-16 surrogate escape (`\ud800` without its pair, or a stray low half)
/// inside JSON strings to `\ufffd`. Returns `None` when there is none to rewrite.
pub(crate) fn replace_lone_surrogates(text: &str) -> Option<String> {
    let bytes = text.as_bytes();
    let mut out = String::with_capacity(text.len());
    let mut changed = false;
    let mut copied = 0;
    let mut i = 0;
    let mut in_string = false;
    let hex_at = |i: usize| -> Option<u16> {
        let h = bytes.get(i..i + 4)?;
        u16::from_str_radix(std::str::from_utf8(h).ok()?, 16).ok()
    };
    while i < bytes.len() {
        match bytes[i] {
            b'"' => {
                in_string = !in_string;
                i += 1;
            }
            b'\\' if in_string => {
                if bytes.get(i + 1) == Some(&b'u') {
                    if let Some(unit) = hex_at(i + 2) {
                        let is_high = (0xD800..0xDC00).contains(&unit);
                        let is_low = (0xDC00..0xE000).contains(&unit);
                        let paired = is_high
                            && bytes.get(i + 6) == Some(&b'\\')
                            && bytes.get(i + 7) == Some(&b'u')
                            && hex_at(i + 8).is_some_and(|n| (0xDC00..0xE000).contains(&n));
                        if paired {
                            i += 12;
                            continue;
                        }
                        if is_high || is_low {
                            out.push_str(&text[copied..i]);
                            out.push_str("\\ufffd");
                            changed = true;
                            i += 6;
                            copied = i;
                            continue;
                        }
                    }
                }
                i += 2;
            }
            _ => i += 1,
        }
    }
    if !changed {
        return None;
    }
    out.push_str(&text[copied..]);
    Some(out)
}

/// Serializes `message` as one frame: compact JSON plus `\n`.
///
/// The JSON escapes control characters (so no raw newline can appear inside) and is never an
/// empty document, so the result is always one non-blank line, which is what keeps a Node peer
/// alive. See [`encode_json`] for how it is produced.
pub fn encode<T: serde::Serialize + ?Sized>(message: &T) -> Result<Vec<u8>, serde_json::Error> {
    encode_into(message, Vec::new())
}

/// [`encode`] into `buffer` (emptied first), so that a buffer kept from an earlier large
/// message is reused.
pub(crate) fn encode_into<T: serde::Serialize + ?Sized>(
    message: &T,
    buffer: Vec<u8>,
) -> Result<Vec<u8>, serde_json::Error> {
    let mut buf = encode_json_into(message, buffer)?;
    buf.push(b'\n');
    Ok(buf)
}

/// Serializes `message` as compact JSON (no terminator).
///
/// `sonic-rs` does the work: its SIMD string escaping runs at about 20 GB/s here, where
/// `serde_json` escapes a byte at a time (about 1.5 GB/s), which capped large messages; for small
/// ones the two are even. Anything `sonic-rs` refuses, and `serde_json`'s `RawValue` (a magic
/// struct only `serde_json` knows how to write), is serialized by `serde_json` instead, so the
/// output always means what `serde_json` would write for the same value (`tests/frame.rs` checks
/// this on arbitrary values).
pub fn encode_json<T: serde::Serialize + ?Sized>(message: &T) -> Result<Vec<u8>, serde_json::Error> {
    encode_json_into(message, Vec::new())
}

fn encode_json_into<T: serde::Serialize + ?Sized>(
    message: &T,
    mut buf: Vec<u8>,
) -> Result<Vec<u8>, serde_json::Error> {
    static RAW_VALUE: std::sync::LazyLock<memchr::memmem::Finder<'static>> =
        std::sync::LazyLock::new(|| memchr::memmem::Finder::new(b"$serde_json::private::RawValue"));
    buf.clear();
    // As `sonic_rs::to_vec` does: a small message then fits without growing the buffer.
    buf.reserve(128);
    if sonic_rs::to_writer(&mut buf, message).is_ok() {
        // A raw value (sonic-rs's own) is written verbatim and may hold a newline, which would
        // end the line early and kill a Node peer; JSON strings never hold a raw one.
        if RAW_VALUE.find(&buf).is_none() && memchr::memchr(b'\n', &buf).is_none() {
            return Ok(buf);
        }
    }
    // Raw values (serde_json's `RawValue`, sonic-rs's lazy values) are written as their text
    // is, whitespace, escapes and all: go through a `Value` so the line is canonical compact
    // JSON — one line, and a `cmd` the reserved-command check can see.
    buf.clear();
    serde_json::to_writer(&mut buf, &serde_json::to_value(message)?)?;
    Ok(buf)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frames(d: &mut Decoder, chunk: &[u8]) -> Vec<Decoded> {
        let mut out = Vec::new();
        d.decode(chunk, Vec::new(), &mut out);
        out
    }

    fn texts(out: &[Decoded]) -> Vec<String> {
        out.iter()
            .map(|d| match d {
                Decoded::Frame(f) => f.text.clone(),
                Decoded::Error(e) => format!("ERR {e}"),
            })
            .collect()
    }

    #[test]
    fn splits_lines_across_reads() {
        let mut d = Decoder::default();
        assert!(frames(&mut d, b"{\"a\":").is_empty());
        assert_eq!(texts(&frames(&mut d, b"1}\n[2]\n\"x")), ["{\"a\":1}", "[2]"]);
        assert_eq!(texts(&frames(&mut d, b"\"\r\n")), ["\"x\""]);
    }

    #[test]
    fn multibyte_utf8_split_across_reads() {
        let mut d = Decoder::default();
        let bytes = "\"é\u{2028}😀\"\n".as_bytes();
        let mut got = Vec::new();
        for b in bytes {
            d.decode(std::slice::from_ref(b), Vec::new(), &mut got);
        }
        assert_eq!(texts(&got), ["\"é\u{2028}😀\""]);
    }

    #[test]
    fn malformed_and_empty_lines_are_errors_and_decoding_goes_on() {
        let mut d = Decoder::default();
        let out = frames(&mut d, b"{oops\n\n1\n");
        assert!(matches!(out[0], Decoded::Error(FrameError::Malformed { .. })));
        assert!(matches!(out[1], Decoded::Error(FrameError::Malformed { .. })));
        assert_eq!(texts(&out[2..]), ["1"]);
    }

    #[test]
    fn lone_surrogates_become_replacement_characters() {
        let mut d = Decoder::default();
        let out = frames(&mut d, br#"["\ud800","\udc00x","\ud83d\ude00","\\ud800"]"#);
        assert!(out.is_empty());
        let out = frames(&mut d, b"\n");
        let text = texts(&out).remove(0);
        let v: Vec<String> = serde_json::from_str(&text).unwrap();
        assert_eq!(v, ["\u{fffd}", "\u{fffd}x", "😀", "\\ud800"]);
    }

    #[test]
    fn invalid_utf8_becomes_replacement_character() {
        let mut d = Decoder::default();
        let out = frames(&mut d, b"\"a\xffb\"\n");
        assert_eq!(texts(&out), ["\"a\u{fffd}b\""]);
    }

    #[test]
    fn internal_rule_matches_node() {
        for (text, internal) in [
            (r#"{"cmd":"NODE_HANDLE_ACK"}"#, Some("NODE_HANDLE_ACK")),
            (r#"{"cmd":"NODE_"}"#, None),
            (r#"{"cmd":"NODEX"}"#, None),
            (r#"{"cmd":"node_x"}"#, None),
            (r#"{"cmd":5}"#, None),
            (r#"{"x":{"cmd":"NODE_X"}}"#, None),
            (r#"{"cmd":"NODE_A","cmd":"user"}"#, None),
            (r#"{"cmd":"fooNODE_"}"#, None),
            (r#"["NODE_X"]"#, None),
        ] {
            assert_eq!(probe(text, DEFAULT_MAX_DEPTH).unwrap().as_deref(), internal, "{text}");
        }
    }

    #[test]
    fn too_large_frames_are_skipped_with_bounded_memory() {
        let mut d = Decoder::new(8);
        let mut out = Vec::new();
        d.decode(b"\"12345", Vec::new(), &mut out);
        d.decode(b"6789", Vec::new(), &mut out);
        assert_eq!(d.buffered_len(), 0);
        d.decode(&[b'x'; 1000], Vec::new(), &mut out);
        assert_eq!(d.buffered_len(), 0);
        d.decode(b"\"\n1\n\"0123456789\"\n2\n", Vec::new(), &mut out);
        assert_eq!(texts(&out).len(), 4);
        assert!(matches!(out[0], Decoded::Error(FrameError::TooLarge { limit: 8 })));
        assert_eq!(texts(&out[1..2]), ["1"]);
        assert!(matches!(out[2], Decoded::Error(FrameError::TooLarge { limit: 8 })));
        assert_eq!(texts(&out[3..]), ["2"]);
    }

    #[test]
    fn truncated_frame_reported_at_end() {
        let mut d = Decoder::default();
        let mut out = frames(&mut d, b"1\n{\"a\"");
        d.finish(&mut out);
        assert!(matches!(out[1], Decoded::Error(FrameError::Truncated { len: 4 })));
    }

    #[test]
    fn encode_is_one_line() {
        let bytes = encode(&serde_json::json!({"s": "a\nb\u{2028}"})).unwrap();
        assert_eq!(bytes.iter().filter(|&&b| b == b'\n').count(), 1);
        assert_eq!(*bytes.last().unwrap(), b'\n');
    }
}
