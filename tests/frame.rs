//! The `json` frame decoder, `handoff::channel::frame::Decoder`, against its documented rules:
//! frames split anywhere, descriptors bound to the last `NODE_HANDLE` frame that starts in their
//! read, every other descriptor reported and closed, frames in stream order (some held back until
//! a descriptor's frame is known), memory bounded by `max_frame_len`.
//!
//! Descriptors are tracked without counting `/proc/self/fd`, which would race with the other
//! tests of this file (they run on parallel threads, and descriptor numbers are reused). Every
//! descriptor handed to the decoder is the write end of a fresh pipe whose read end the test
//! keeps (a [`Probe`]): the write end has been closed exactly when a non-blocking read of the
//! read end reports end of file, and a descriptor the decoder hands back is identified by
//! `fstat` and by a byte written through it.

use std::ops::Range;
use std::os::fd::{AsFd, OwnedFd};

use handoff::channel::frame::{
    Decoded, Decoder, Frame, FrameError, StrayReason, DEFAULT_MAX_FRAME_LEN,
};
use proptest::prelude::*;
use proptest::test_runner::TestCaseError;
use rustix::io::Errno;
use rustix::pipe::{pipe_with, PipeFlags};
use serde_json::Value;

// ---------------------------------------------------------------------------------------------
// Descriptor tracking

/// The read end of a pipe whose write end was given to the decoder.
struct Probe {
    read: OwnedFd,
    stat: rustix::fs::Stat,
}

/// A fresh descriptor to hand to the decoder, and the probe that tracks it.
fn tracked_fd() -> (OwnedFd, Probe) {
    let (read, write) = pipe_with(PipeFlags::CLOEXEC | PipeFlags::NONBLOCK).expect("pipe");
    let stat = rustix::fs::fstat(&read).expect("fstat");
    (write, Probe { read, stat })
}

fn tracked_fds(n: usize) -> (Vec<OwnedFd>, Vec<Probe>) {
    (0..n).map(|_| tracked_fd()).unzip()
}

impl Probe {
    /// Whether the tracked descriptor (the pipe's only write end) has been closed.
    fn closed(&self) -> bool {
        let mut byte = [0u8; 1];
        match rustix::io::read(&self.read, &mut byte) {
            Ok(0) => true,
            Err(Errno::AGAIN) => false,
            other => panic!("unexpected result reading a probe pipe: {other:?}"),
        }
    }

    /// Whether `fd` is the tracked descriptor: same pipe, and a byte written through it arrives.
    fn is(&self, fd: impl AsFd) -> bool {
        let st = rustix::fs::fstat(&fd).expect("fstat");
        if (st.st_dev, st.st_ino) != (self.stat.st_dev, self.stat.st_ino) {
            return false;
        }
        assert_eq!(
            rustix::io::write(&fd, b"!").expect("write through received fd"),
            1
        );
        let mut byte = [0u8; 1];
        rustix::io::read(&self.read, &mut byte).expect("read back") == 1 && byte == *b"!"
    }
}

// ---------------------------------------------------------------------------------------------
// Helpers

fn decode(d: &mut Decoder, chunk: &[u8], fds: Vec<OwnedFd>) -> Vec<Decoded> {
    let mut out = Vec::new();
    d.decode(chunk, fds, &mut out);
    out
}

fn finish(d: &mut Decoder) -> Vec<Decoded> {
    let mut out = Vec::new();
    d.finish(&mut out);
    out
}

#[track_caller]
fn frame(item: &Decoded) -> &Frame {
    match item {
        Decoded::Frame(f) => f,
        Decoded::Error(e) => panic!("expected a frame, got error {e:?}"),
    }
}

#[track_caller]
fn error(item: &Decoded) -> &FrameError {
    match item {
        Decoded::Error(e) => e,
        Decoded::Frame(f) => panic!("expected an error, got frame {f:?}"),
    }
}

fn stray(count: usize, reason: StrayReason) -> FrameError {
    FrameError::StrayFds { count, reason }
}

/// `{"cmd":"NODE_HANDLE","type":"net.Socket","msg":<msg>}`, in Node's key order.
fn handle_line(msg: &str) -> String {
    format!(r#"{{"cmd":"NODE_HANDLE","type":"net.Socket","msg":{msg}}}"#)
}

fn json(text: &str) -> Value {
    serde_json::from_str(text).unwrap_or_else(|e| panic!("not JSON ({e}): {text:?}"))
}

/// A decoded item, comparable (frames without their descriptor).
#[derive(Debug, PartialEq)]
enum Item {
    Frame {
        text: String,
        internal_cmd: Option<String>,
    },
    Error(FrameError),
}

impl Item {
    fn of(d: &Decoded) -> Item {
        match d {
            Decoded::Frame(f) => Item::Frame {
                text: f.text.clone(),
                internal_cmd: f.internal_cmd.clone(),
            },
            Decoded::Error(e) => Item::Error(e.clone()),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Generators

/// Strings that stress JSON escaping and UTF-8: quotes, backslashes, control characters,
/// multi-byte characters, U+2028/U+2029 (raw in Node's output), a BOM, U+FFFD.
fn json_string() -> impl Strategy<Value = String> {
    let tricky = prop::sample::select(vec![
        '"', '\\', '\n', '\r', '\t', '\u{0}', '\u{1f}', '\u{7f}', '/', 'a', 'Z', '{', '}', '[',
        ':', ',', ' ', 'é', '€', 'ह', '😀', '\u{2028}', '\u{2029}', '\u{feff}', '\u{fffd}',
    ]);
    prop_oneof![
        2 => "[a-z0-9_ ]{0,8}",
        1 => any::<String>(),
        3 => prop::collection::vec(tricky, 0..16).prop_map(String::from_iter),
    ]
}

fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        any::<f64>()
            .prop_filter("finite", |f| f.is_finite())
            .prop_map(Value::from),
        json_string().prop_map(Value::String),
    ];
    leaf.prop_recursive(4, 24, 5, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..5).prop_map(Value::Array),
            prop::collection::btree_map(json_string(), inner, 0..5)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// A message's JSON text as sent, and as the decoder must return it. Mostly `serde_json`
/// output; sometimes a string holding a lone UTF-16 surrogate escape, which `JSON.stringify`
/// emits and the decoder maps to `\ufffd`.
fn message() -> impl Strategy<Value = (String, String)> {
    prop_oneof![
        8 => json_value().prop_map(|v| {
            let text = serde_json::to_string(&v).unwrap();
            (text.clone(), text)
        }),
        1 => (json_string(), 0xd800u32..0xe000, json_string()).prop_map(|(a, unit, b)| {
            let a = serde_json::to_string(&a).unwrap();
            let b = serde_json::to_string(&b).unwrap();
            let a = &a[..a.len() - 1]; // open string, ends before the closing quote
            (format!("[{a}\\u{unit:04x}\",{b}]"), format!("[{a}\\ufffd\",{b}]"))
        }),
    ]
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Role {
    Plain,
    /// A `NODE_HANDLE` envelope sent with one descriptor.
    Handle,
    /// A `NODE_HANDLE` envelope sent without a descriptor (the decoder must not invent one).
    HandleWithoutFd,
}

#[derive(Debug, Clone)]
struct Spec {
    /// The line as sent, without its terminator.
    wire: String,
    /// What `Frame::text` must be.
    text: String,
    role: Role,
    crlf: bool,
}

fn spec() -> impl Strategy<Value = Spec> {
    let role = prop_oneof![
        5 => Just(Role::Plain),
        3 => Just(Role::Handle),
        1 => Just(Role::HandleWithoutFd),
    ];
    (message(), role, prop::bool::weighted(0.2)).prop_map(|((wire, text), role, crlf)| match role {
        Role::Plain => Spec {
            wire,
            text,
            role,
            crlf,
        },
        _ => Spec {
            wire: handle_line(&wire),
            text: handle_line(&text),
            role,
            crlf,
        },
    })
}

/// Read lengths, used in turn (cycled): single bytes, small and large reads, whole stream.
fn read_lens() -> impl Strategy<Value = Vec<usize>> {
    let len = prop_oneof![
        3 => 1usize..8,
        3 => 1usize..200,
        1 => 1usize..4096,
        1 => Just(usize::MAX),
    ];
    prop::collection::vec(len, 1..40)
}

#[derive(Debug, Clone, Copy)]
enum Limit {
    Default,
    Unlimited,
    /// The longest line plus this much.
    Tight(usize),
}

// ---------------------------------------------------------------------------------------------
// Property: a well-formed stream, split the way Linux may split it, decodes exactly.

/// One frame of a well-formed stream, as sent.
struct Sent {
    /// Its bytes in the stream, terminator included.
    range: Range<usize>,
    /// Sent with a descriptor.
    has_fd: bool,
    /// A `NODE_HANDLE` frame (with or without a descriptor).
    is_handle: bool,
}

/// Cuts a stream into reads of the lengths `lens` (cycled), shortened where the kernel stops a
/// `recvmsg`. A frame sent with a descriptor starts the `sendmsg` that carries it; that `sendmsg`
/// ends with the frame, or (when the next of `stops`, cycled, is false) goes on over the plain
/// frames after it, as from a sender that writes a handle and the messages queued behind it at
/// once, up to the next `NODE_HANDLE` frame, which is sent on its own. Linux returns no data past
/// that `sendmsg` in the read that holds its first byte, and the descriptor with that read.
/// Returns each read's range and the index of the frame whose descriptor comes with it.
fn kernel_reads(
    frames: &[Sent],
    total: usize,
    lens: &[usize],
    stops: &[bool],
) -> Vec<(Range<usize>, Option<usize>)> {
    let mut reads = Vec::new();
    let mut pos = 0;
    let mut stops = stops.iter().cycle();
    for &len in lens.iter().cycle() {
        if pos == total {
            break;
        }
        let mut end = pos.saturating_add(len).min(total);
        let fd_frame = frames
            .iter()
            .position(|f| f.has_fd && (pos..end).contains(&f.range.start));
        if let Some(i) = fd_frame {
            let sendmsg_end = if *stops.next().expect("stops is not empty") {
                frames[i].range.end
            } else {
                frames[i + 1..]
                    .iter()
                    .find(|f| f.is_handle)
                    .map_or(total, |f| f.range.start)
            };
            end = end.min(sendmsg_end);
        }
        reads.push((pos..end, fd_frame));
        pos = end;
    }
    reads
}

/// Whether the decoder must see `s` as a `NODE_HANDLE` frame (a plain message may happen to be
/// one).
fn is_handle_spec(s: &Spec) -> bool {
    s.role != Role::Plain || json(&s.text).get("cmd") == Some(&Value::from("NODE_HANDLE"))
}

fn check_round_trip(
    specs: &[Spec],
    lens: &[usize],
    stops: &[bool],
    limit: Limit,
) -> Result<(), TestCaseError> {
    let mut stream = Vec::new();
    let mut frames = Vec::new();
    for s in specs {
        let start = stream.len();
        stream.extend_from_slice(s.wire.as_bytes());
        stream.extend_from_slice(if s.crlf { b"\r\n" } else { b"\n" });
        frames.push(Sent {
            range: start..stream.len(),
            has_fd: s.role == Role::Handle,
            is_handle: is_handle_spec(s),
        });
    }
    // The limit counts the bytes before the `\n`.
    let longest = specs
        .iter()
        .map(|s| s.wire.len() + usize::from(s.crlf))
        .max()
        .unwrap_or(0);
    let max = match limit {
        Limit::Default => DEFAULT_MAX_FRAME_LEN,
        Limit::Unlimited => usize::MAX,
        Limit::Tight(slack) => longest + slack,
    };

    let mut fds: Vec<Option<OwnedFd>> = Vec::new();
    let mut probes: Vec<Option<Probe>> = Vec::new();
    for s in specs {
        if s.role == Role::Handle {
            let (fd, probe) = tracked_fd();
            fds.push(Some(fd));
            probes.push(Some(probe));
        } else {
            fds.push(None);
            probes.push(None);
        }
    }

    let mut d = Decoder::new(max);
    let mut out = Vec::new();
    for (range, fd_frame) in kernel_reads(&frames, stream.len(), lens, stops) {
        let sent = fd_frame.map(|i| fds[i].take().expect("one read per handle"));
        d.decode(&stream[range], sent.into_iter().collect(), &mut out);
        prop_assert!(d.buffered_len() <= max);
    }
    prop_assert!(fds.iter().all(Option::is_none), "every descriptor was sent");
    d.finish(&mut out);
    prop_assert_eq!(d.buffered_len(), 0);

    let errors: Vec<_> = out
        .iter()
        .filter_map(|d| match d {
            Decoded::Error(e) => Some(e),
            Decoded::Frame(_) => None,
        })
        .collect();
    prop_assert!(errors.is_empty(), "errors: {:?}", errors);
    prop_assert_eq!(out.len(), specs.len());
    for ((item, s), probe) in out.iter().zip(specs).zip(&probes) {
        let f = frame(item);
        prop_assert_eq!(&f.text, &s.text);
        prop_assert_eq!(json(&f.text), json(&s.text));
        prop_assert_eq!(f.is_handle(), is_handle_spec(s));
        match (probe, &f.fd) {
            (Some(p), Some(fd)) => prop_assert!(p.is(fd), "handle frame got another fd"),
            (None, None) => {}
            (p, fd) => {
                let msg = format!("sent an fd: {}, got {fd:?}", p.is_some());
                return Err(TestCaseError::fail(msg));
            }
        }
    }
    for p in probes.iter().flatten() {
        prop_assert!(!p.closed(), "a bound descriptor was closed");
    }
    drop(out);
    for p in probes.iter().flatten() {
        prop_assert!(p.closed(), "a descriptor outlived its frame");
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 1000, ..ProptestConfig::default() })]

    #[test]
    fn well_formed_stream_decodes_exactly_however_split(
        specs in prop::collection::vec(spec(), 0..20),
        lens in read_lens(),
        stops in prop::collection::vec(any::<bool>(), 1..8),
        limit in prop_oneof![
            Just(Limit::Default),
            Just(Limit::Unlimited),
            (0usize..4).prop_map(Limit::Tight),
        ],
    ) {
        check_round_trip(&specs, &lens, &stops, limit)?;
    }
}

// ---------------------------------------------------------------------------------------------
// Property: any bytes, any split, descriptors on any read.

/// Fragments that make interesting lines when concatenated.
fn chaos_piece() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        4 => prop::collection::vec(any::<u8>(), 0..12),
        4 => Just(b"\n".to_vec()),
        1 => Just(b"\r\n".to_vec()),
        1 => Just(b"\r".to_vec()),
        3 => Just(handle_line("1").into_bytes()),
        1 => Just(br#"{"cmd":"NODE_HANDLE""#.to_vec()),
        1 => Just(br#"{"cmd":"NODE_HANDLE_ACK"}"#.to_vec()),
        2 => json_value().prop_map(|v| serde_json::to_vec(&v).unwrap()),
        1 => Just(br#""\ud800""#.to_vec()),
        1 => Just(br#""\udc00\ud83d\ude00\\ud800""#.to_vec()),
        1 => Just(b"\xf0\x9f\x98".to_vec()),
        1 => Just(b"\xff".to_vec()),
        1 => Just("é😀\u{2028}".as_bytes().to_vec()),
        1 => Just(b"[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[".to_vec()),
    ]
}

#[derive(Debug, Clone)]
struct ChaosRead {
    len: usize,
    fds: usize,
}

fn chaos_reads() -> impl Strategy<Value = Vec<ChaosRead>> {
    let len = prop_oneof![1 => Just(0usize), 4 => 1usize..6, 4 => 1usize..64, 1 => 1usize..1024];
    let fds = prop_oneof![6 => Just(0usize), 3 => Just(1usize), 1 => 2usize..4];
    prop::collection::vec(
        (len, fds).prop_map(|(len, fds)| ChaosRead { len, fds }),
        1..30,
    )
}

/// Most descriptors one case hands to the decoder (each is a pipe, two descriptors, while the
/// case runs). The same cap as the fuzz target's, so its inputs replay identically.
const MAX_FDS: usize = 64;

/// The lines (numbered from 0) whose first byte is in `stream[range]`.
fn lines_starting_in(stream: &[u8], range: Range<usize>) -> Range<usize> {
    if range.is_empty() {
        return 0..0;
    }
    let before = memchr_count(&stream[..range.start]);
    let at_line_start = range.start == 0 || stream[range.start - 1] == b'\n';
    let first = before + usize::from(!at_line_start);
    // The line holding the read's last byte is the last line starting in it, if any does.
    let last = memchr_count(&stream[..range.end - 1]);
    first..last + 1
}

/// What the module docs' rule makes of `nfds` descriptors arriving with `stream[range]`, given
/// the whole stream's items: the line that gets the first one, and the stray report, if any.
fn expected_binding(
    stream: &[u8],
    range: Range<usize>,
    nfds: usize,
    oracle: &[Item],
) -> (Option<usize>, Option<(usize, StrayReason)>) {
    let lines = lines_starting_in(stream, range);
    let Some(last) = lines.clone().last() else {
        return (None, Some((nfds, StrayReason::NoFrame)));
    };
    let is_handle = |line: &usize| {
        matches!(&oracle[*line], Item::Frame { internal_cmd, .. }
            if internal_cmd.as_deref() == Some("NODE_HANDLE"))
    };
    if matches!(oracle[last], Item::Error(FrameError::Truncated { .. })) {
        // Still undecided when the stream ends: whether that frame was the handle is unknown.
        return (None, Some((nfds, StrayReason::Truncated)));
    }
    if let Some(handle) = lines.rev().find(is_handle) {
        let surplus = (nfds > 1).then(|| (nfds - 1, StrayReason::Surplus));
        return (Some(handle), surplus);
    }
    let reason = match &oracle[last] {
        Item::Frame { .. } => StrayReason::NotAHandle,
        Item::Error(_) => StrayReason::BadFrame,
    };
    (None, Some((nfds, reason)))
}

fn memchr_count(bytes: &[u8]) -> usize {
    bytes.iter().filter(|&&b| b == b'\n').count()
}

fn sorted_strays(mut v: Vec<(usize, StrayReason)>) -> Vec<(String, usize)> {
    v.sort_by_key(|(count, reason)| (format!("{reason:?}"), *count));
    v.into_iter()
        .map(|(count, reason)| (format!("{reason:?}"), count))
        .collect()
}

/// Decodes `stream` split per `reads` (cycled; then `tail_fds` on an empty read at the end) and
/// checks it against a model: the frames and errors are those of the whole stream decoded in one
/// read, and every descriptor is bound or reported and closed exactly as the module docs say.
fn check_chaos(
    stream: &[u8],
    reads: &[ChaosRead],
    tail_fds: usize,
    max: usize,
) -> Result<(), TestCaseError> {
    // Oracle: the whole stream in one read, no descriptors. One item per line.
    let mut whole = Decoder::new(max);
    let mut oracle = decode(&mut whole, stream, Vec::new());
    whole.finish(&mut oracle);
    let oracle: Vec<Item> = oracle.iter().map(Item::of).collect();
    let complete_lines = memchr_count(stream);
    let unterminated = !stream.is_empty() && !stream.ends_with(b"\n");
    prop_assert_eq!(
        oracle.len(),
        complete_lines + usize::from(unterminated),
        "one item per line"
    );

    // The split run, and what the model expects of its descriptors.
    let progress = reads.iter().any(|r| r.len > 0);
    let mut split = Vec::new();
    let mut plan: Vec<(Range<usize>, usize)> = Vec::new();
    let mut pos = 0;
    for r in reads.iter().cycle() {
        if pos == stream.len() {
            break;
        }
        let len = if progress { r.len } else { 1 };
        let end = (pos + len).min(stream.len());
        plan.push((pos..end, r.fds));
        pos = end;
    }
    plan.push((stream.len()..stream.len(), tail_fds));

    let mut d = Decoder::new(max);
    let mut probes = Vec::new();
    let mut bound_to_line = std::collections::HashMap::new(); // line -> probe index
    let mut expected_strays = Vec::new();
    for (range, nfds) in plan {
        let nfds = nfds.min(MAX_FDS - probes.len());
        let (fds, new_probes) = tracked_fds(nfds);
        let first_probe = probes.len();
        probes.extend(new_probes);
        if nfds > 0 {
            let (bound, strays) = expected_binding(stream, range.clone(), nfds, &oracle);
            if let Some(line) = bound {
                prop_assert!(bound_to_line.insert(line, first_probe).is_none());
            }
            expected_strays.extend(strays);
        }
        d.decode(&stream[range], fds, &mut split);
        prop_assert!(
            d.buffered_len() <= max,
            "buffered {} > {}",
            d.buffered_len(),
            max
        );
    }
    d.finish(&mut split);
    prop_assert_eq!(d.buffered_len(), 0);

    let mut strays = Vec::new();
    let mut items = Vec::new();
    for item in &split {
        match item {
            Decoded::Error(FrameError::StrayFds { count, reason }) => {
                prop_assert!(*count > 0);
                strays.push((*count, *reason));
            }
            Decoded::Frame(f) => {
                prop_assert!(!f.text.contains('\n'));
                prop_assert!(
                    serde_json::from_str::<Value>(&f.text).is_ok(),
                    "{:?}",
                    f.text
                );
                prop_assert!(f.fd.is_none() || f.is_handle(), "fd on a non-handle frame");
                items.push(item);
            }
            Decoded::Error(_) => items.push(item),
        }
    }
    prop_assert_eq!(
        items.iter().copied().map(Item::of).collect::<Vec<_>>(),
        oracle
    );
    prop_assert_eq!(sorted_strays(strays), sorted_strays(expected_strays));

    let mut bound = vec![false; probes.len()];
    for (line, item) in items.iter().enumerate() {
        let fd = match item {
            Decoded::Frame(f) => f.fd.as_ref(),
            Decoded::Error(_) => None,
        };
        match (bound_to_line.get(&line), fd) {
            (Some(&p), Some(fd)) => {
                prop_assert!(probes[p].is(fd), "line {} got the wrong descriptor", line);
                bound[p] = true;
            }
            (None, None) => {}
            (p, fd) => {
                let msg = format!("line {line}: expected probe {p:?}, got {fd:?}");
                return Err(TestCaseError::fail(msg));
            }
        }
    }
    for (p, bound) in probes.iter().zip(&bound) {
        prop_assert_eq!(p.closed(), !bound, "every descriptor is bound or closed");
    }
    drop(split);
    drop(d);
    for p in &probes {
        prop_assert!(p.closed(), "a descriptor outlived its frame");
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 3000, ..ProptestConfig::default() })]

    #[test]
    fn any_input_is_decoded_like_one_read_and_every_fd_is_accounted_for(
        pieces in prop::collection::vec(chaos_piece(), 0..40),
        reads in chaos_reads(),
        tail_fds in prop_oneof![3 => Just(0usize), 1 => 1usize..3],
        max in prop_oneof![2 => 0usize..48, 1 => 48usize..256, 1 => Just(DEFAULT_MAX_FRAME_LEN)],
    ) {
        check_chaos(&pieces.concat(), &reads, tail_fds, max)?;
    }
}

// ---------------------------------------------------------------------------------------------
// Descriptor binding: the tricky cases

#[test]
fn fd_on_plain_message_is_closed_and_not_given_to_the_next_handle() {
    let mut d = Decoder::default();
    let (fd, probe) = tracked_fd();
    let out = decode(&mut d, b"{\"a\":1}\n", vec![fd]);
    assert_eq!(out.len(), 2);
    assert_eq!(frame(&out[0]).text, r#"{"a":1}"#);
    assert!(frame(&out[0]).fd.is_none());
    assert_eq!(*error(&out[1]), stray(1, StrayReason::NotAHandle));
    assert!(probe.closed());

    // Node would hand the kept descriptor to this handle (protocol doc 4.2); the decoder must not.
    let line = handle_line("\"s\"") + "\n";
    let out = decode(&mut d, line.as_bytes(), Vec::new());
    assert_eq!(out.len(), 1);
    assert!(frame(&out[0]).is_handle());
    assert!(frame(&out[0]).fd.is_none());
}

#[test]
fn two_fds_on_one_handle_first_is_bound_second_is_surplus() {
    let mut d = Decoder::default();
    let (fds, probes) = tracked_fds(2);
    let out = decode(&mut d, (handle_line("1") + "\n").as_bytes(), fds);
    assert_eq!(out.len(), 2);
    let f = frame(&out[0]);
    assert!(probes[0].is(f.fd.as_ref().expect("bound")));
    assert_eq!(*error(&out[1]), stray(1, StrayReason::Surplus));
    assert!(probes[1].closed());
    assert!(!probes[0].closed());

    // The surplus one is not carried over to the next handle either.
    let out = decode(&mut d, (handle_line("2") + "\n").as_bytes(), Vec::new());
    assert!(frame(&out[0]).fd.is_none());
}

#[test]
fn fd_arriving_where_no_frame_starts_is_closed() {
    let mut d = Decoder::default();
    let line = handle_line("1") + "\n";
    let (head, tail) = line.as_bytes().split_at(10);
    assert!(decode(&mut d, head, Vec::new()).is_empty());
    let (fd, probe) = tracked_fd();
    let out = decode(&mut d, tail, vec![fd]);
    assert_eq!(out.len(), 2);
    assert_eq!(*error(&out[0]), stray(1, StrayReason::NoFrame));
    assert!(frame(&out[1]).is_handle());
    assert!(frame(&out[1]).fd.is_none());
    assert!(probe.closed());

    // A read that only ends the frame in progress.
    assert!(decode(&mut d, b"[1,", Vec::new()).is_empty());
    let (fd, probe) = tracked_fd();
    let out = decode(&mut d, b"2]\n", vec![fd]);
    assert_eq!(*error(&out[0]), stray(1, StrayReason::NoFrame));
    assert_eq!(frame(&out[1]).text, "[1,2]");
    assert!(probe.closed());

    // An empty read (as at end of stream) with descriptors.
    let (fds, probes) = tracked_fds(2);
    let out = decode(&mut d, b"", fds);
    assert_eq!(out.len(), 1);
    assert_eq!(*error(&out[0]), stray(2, StrayReason::NoFrame));
    assert!(probes.iter().all(Probe::closed));
}

#[test]
fn fd_with_the_first_bytes_of_a_handle_is_bound_when_the_rest_comes_later() {
    let mut d = Decoder::default();
    let line = handle_line("{\"k\":\"é\"}") + "\n";
    let bytes = line.as_bytes();
    let (fd, probe) = tracked_fd();
    // The previous frame ends in the same read: the handle is the last frame starting in it.
    let mut first = b"\"before\"\n".to_vec();
    first.extend_from_slice(&bytes[..10]);
    let out = decode(&mut d, &first, vec![fd]);
    assert_eq!(out.len(), 1);
    assert_eq!(frame(&out[0]).text, "\"before\"");
    assert!(frame(&out[0]).fd.is_none());
    assert!(!probe.closed(), "held for the frame in progress");
    assert!(decode(&mut d, &bytes[10..20], Vec::new()).is_empty());
    let out = decode(&mut d, &bytes[20..], Vec::new());
    assert_eq!(out.len(), 1);
    let f = frame(&out[0]);
    assert!(f.is_handle());
    assert_eq!(json(&f.text)["msg"]["k"], "é");
    assert!(probe.is(f.fd.as_ref().expect("bound")));
}

#[test]
fn fds_belong_to_the_last_handle_frame_starting_in_the_read() {
    // This test used to assert the earlier rule, "the last frame starting in the read": the
    // descriptor went with the plain `[2]` and was closed as NotAHandle, and the handle was
    // NACKed. A sender may write a handle and the lines queued behind it in one `sendmsg` with
    // the handle's descriptor, so the rule is now "the last NODE_HANDLE frame starting in the
    // read" (protocol doc 4.5: the NODE_HANDLE whose first bytes the fd arrived with).
    let mut d = Decoder::default();
    let (fd, probe) = tracked_fd();
    let chunk = handle_line("1") + "\n[2]\n";
    let out = decode(&mut d, chunk.as_bytes(), vec![fd]);
    assert_eq!(out.len(), 2, "{out:?}");
    assert!(probe.is(frame(&out[0]).fd.as_ref().expect("bound")));
    assert_eq!(frame(&out[1]).text, "[2]");
    assert!(frame(&out[1]).fd.is_none());

    // And a handle that is last, after plain frames, gets it.
    let (fd, probe) = tracked_fd();
    let chunk = "1\n2\n".to_owned() + &handle_line("3") + "\n";
    let out = decode(&mut d, chunk.as_bytes(), vec![fd]);
    assert_eq!(out.len(), 3);
    assert!(probe.is(frame(&out[2]).fd.as_ref().expect("bound")));
}

/// (1) A sender writes a handle and a plain message in one `sendmsg` with the handle's
/// descriptor: the handle gets it, nothing is stray, the plain message comes after it.
#[test]
fn handle_then_plain_in_one_read_with_the_handles_fd() {
    let mut d = Decoder::default();
    let (fd, probe) = tracked_fd();
    let chunk = handle_line(r#"{"h":1}"#) + "\n{\"plain\":2}\n";
    let out = decode(&mut d, chunk.as_bytes(), vec![fd]);
    assert_eq!(out.len(), 2, "{out:?}");
    let f = frame(&out[0]);
    assert!(f.is_handle());
    assert_eq!(json(&f.text)["msg"]["h"], 1);
    assert!(probe.is(f.fd.as_ref().expect("bound")));
    assert_eq!(frame(&out[1]).text, r#"{"plain":2}"#);
    assert!(frame(&out[1]).fd.is_none());
    assert!(!probe.closed());
    drop(out);
    assert!(probe.closed());
    assert!(finish(&mut d).is_empty());
}

/// (2) The kernel merged a handle sent without a descriptor with the next one, sent with one:
/// the second gets it, the first none.
#[test]
fn two_handles_in_one_read_with_one_fd_the_second_gets_it() {
    let mut d = Decoder::default();
    let (fd, probe) = tracked_fd();
    let chunk = handle_line("1") + "\n" + &handle_line("2") + "\n";
    let out = decode(&mut d, chunk.as_bytes(), vec![fd]);
    assert_eq!(out.len(), 2, "{out:?}");
    assert!(frame(&out[0]).is_handle());
    assert!(frame(&out[0]).fd.is_none());
    assert_eq!(json(&frame(&out[1]).text)["msg"], 2);
    assert!(probe.is(frame(&out[1]).fd.as_ref().expect("bound")));

    // With two descriptors, still only the last handle gets one.
    let (fds, probes) = tracked_fds(2);
    let out = decode(&mut d, chunk.as_bytes(), fds);
    assert_eq!(out.len(), 3, "{out:?}");
    assert!(frame(&out[0]).fd.is_none());
    assert!(probes[0].is(frame(&out[1]).fd.as_ref().expect("bound")));
    assert_eq!(*error(&out[2]), stray(1, StrayReason::Surplus));
    assert!(probes[1].closed());
}

/// (3) The read with the descriptor ends inside a frame that started in it: the frames from its
/// first `NODE_HANDLE` on are held back until that frame completes, then come out in order.
#[test]
fn frames_are_held_back_until_the_last_frame_of_the_fd_read_completes() {
    // A plain frame, then a handle continued over three later reads. The plain frame cannot get
    // the descriptor (it is not a handle and nothing before it is held), so it is not held.
    let mut d = Decoder::default();
    let line = handle_line("\"h\"") + "\n";
    let bytes = line.as_bytes();
    let (fd, probe) = tracked_fd();
    let mut first = b"{\"plain\":1}\n".to_vec();
    first.extend_from_slice(&bytes[..10]);
    let out = decode(&mut d, &first, vec![fd]);
    assert_eq!(out.len(), 1, "{out:?}");
    assert_eq!(frame(&out[0]).text, r#"{"plain":1}"#);
    for piece in [&bytes[10..20], &bytes[20..30]] {
        assert!(decode(&mut d, piece, Vec::new()).is_empty());
        assert!(!probe.closed());
    }
    let out = decode(&mut d, &bytes[30..], Vec::new());
    assert_eq!(out.len(), 1, "{out:?}");
    assert!(probe.is(frame(&out[0]).fd.as_ref().expect("bound")));

    // A handle sent without a descriptor, a plain frame, and a handle sent with one, continued
    // over three later reads: the first handle and the plain frame wait for the second handle
    // (until it completes, either handle may be the one), then all come out in stream order.
    let mut d = Decoder::default();
    let (fd, probe) = tracked_fd();
    let mut first = b"0\n".to_vec();
    first.extend_from_slice((handle_line("1") + "\n[2]\n").as_bytes());
    first.extend_from_slice(&bytes[..10]);
    let out = decode(&mut d, &first, vec![fd]);
    assert_eq!(out.len(), 1, "{out:?}");
    assert_eq!(frame(&out[0]).text, "0");
    for end in [20, 30] {
        assert!(decode(&mut d, &bytes[end - 10..end], Vec::new()).is_empty());
        // Only the incomplete frame counts, not the frames held back.
        assert_eq!(d.buffered_len(), end);
    }
    let mut last = bytes[30..].to_vec();
    last.extend_from_slice(b"[3]\n");
    let out = decode(&mut d, &last, Vec::new());
    assert_eq!(out.len(), 4, "{out:?}");
    assert_eq!(json(&frame(&out[0]).text)["msg"], 1);
    assert!(frame(&out[0]).fd.is_none());
    assert_eq!(frame(&out[1]).text, "[2]");
    assert_eq!(json(&frame(&out[2]).text)["msg"], "h");
    assert!(probe.is(frame(&out[2]).fd.as_ref().expect("bound")));
    assert_eq!(frame(&out[3]).text, "[3]");
    assert_eq!(d.buffered_len(), 0);

    // A handle, then a plain frame that completes in a later read: the handle waits for it, and
    // gets the descriptor.
    let mut d = Decoder::default();
    let (fd, probe) = tracked_fd();
    let chunk = handle_line("4") + "\n[5,";
    assert!(decode(&mut d, chunk.as_bytes(), vec![fd]).is_empty());
    assert_eq!(d.buffered_len(), 3);
    assert!(!probe.closed());
    let out = decode(&mut d, b"6]\n7\n", Vec::new());
    assert_eq!(out.len(), 3, "{out:?}");
    assert!(probe.is(frame(&out[0]).fd.as_ref().expect("bound")));
    assert_eq!(frame(&out[1]).text, "[5,6]");
    assert_eq!(frame(&out[2]).text, "7");
}

/// (4) A handle, then a plain frame that turns out too long, with the handle's descriptor: the
/// handle gets it, and comes out when the long frame is found too long, before its error.
#[test]
fn handle_then_an_over_long_frame_in_the_fd_read() {
    let max = 100;
    let h = handle_line("1") + "\n";
    assert!(h.len() <= max);

    // Found too long while it is still incomplete.
    let mut d = Decoder::new(max);
    let (fd, probe) = tracked_fd();
    let out = decode(&mut d, (h.clone() + "[\"").as_bytes(), vec![fd]);
    assert!(out.is_empty(), "{out:?}");
    assert!(decode(&mut d, &[b'x'; 60], Vec::new()).is_empty());
    let out = decode(&mut d, &[b'x'; 60], Vec::new());
    assert_eq!(out.len(), 2, "{out:?}");
    assert!(probe.is(frame(&out[0]).fd.as_ref().expect("bound")));
    assert_eq!(*error(&out[1]), FrameError::TooLarge { limit: max });
    assert_eq!(d.buffered_len(), 0);
    assert!(decode(&mut d, &[b'x'; 1000], Vec::new()).is_empty());
    let out = decode(&mut d, b"\"]\n[5]\n", Vec::new());
    assert_eq!(out.len(), 1, "{out:?}");
    assert_eq!(frame(&out[0]).text, "[5]");

    // Found too long when it completes.
    let mut d = Decoder::new(max);
    let (fd, probe) = tracked_fd();
    assert!(decode(&mut d, (h.clone() + "[\"").as_bytes(), vec![fd]).is_empty());
    let mut rest = vec![b'x'; 200];
    rest.extend_from_slice(b"\"]\n[6]\n");
    let out = decode(&mut d, &rest, Vec::new());
    assert_eq!(out.len(), 3, "{out:?}");
    assert!(probe.is(frame(&out[0]).fd.as_ref().expect("bound")));
    assert_eq!(*error(&out[1]), FrameError::TooLarge { limit: max });
    assert_eq!(frame(&out[2]).text, "[6]");

    // And a malformed frame after the handle, complete in the same read.
    let mut d = Decoder::new(max);
    let (fd, probe) = tracked_fd();
    let out = decode(&mut d, (h + "{oops\n").as_bytes(), vec![fd]);
    assert_eq!(out.len(), 2, "{out:?}");
    assert!(probe.is(frame(&out[0]).fd.as_ref().expect("bound")));
    assert!(matches!(error(&out[1]), FrameError::Malformed { .. }));
}

/// (5) No handle starts in the read: the reason comes from the last frame starting in it.
#[test]
fn fd_read_without_a_handle_is_not_a_handle_or_bad_frame() {
    let mut d = Decoder::default();
    let (fds, probes) = tracked_fds(2);
    let out = decode(&mut d, b"1\n\"2\"\n[3]\n", fds);
    assert_eq!(out.len(), 4, "{out:?}");
    assert_eq!(frame(&out[2]).text, "[3]");
    assert!(out[..3].iter().all(|i| frame(i).fd.is_none()));
    assert_eq!(*error(&out[3]), stray(2, StrayReason::NotAHandle));
    assert!(probes.iter().all(Probe::closed));

    // Split: plain frames are not held back, the descriptor is released when the last completes.
    let (fd, probe) = tracked_fd();
    let out = decode(&mut d, b"1\n[2", vec![fd]);
    assert_eq!(out.len(), 1, "{out:?}");
    assert_eq!(frame(&out[0]).text, "1");
    assert!(!probe.closed());
    let out = decode(&mut d, b",3]\n", Vec::new());
    assert_eq!(out.len(), 2, "{out:?}");
    assert_eq!(frame(&out[0]).text, "[2,3]");
    assert_eq!(*error(&out[1]), stray(1, StrayReason::NotAHandle));
    assert!(probe.closed());

    // The last frame malformed, an earlier one plain: BadFrame.
    let (fd, probe) = tracked_fd();
    let out = decode(&mut d, b"1\n{oops\n", vec![fd]);
    assert_eq!(out.len(), 3, "{out:?}");
    assert!(matches!(error(&out[1]), FrameError::Malformed { .. }));
    assert_eq!(*error(&out[2]), stray(1, StrayReason::BadFrame));
    assert!(probe.closed());

    // An earlier frame malformed, the last one plain: NotAHandle.
    let (fd, probe) = tracked_fd();
    let out = decode(&mut d, b"{oops\n1\n", vec![fd]);
    assert_eq!(out.len(), 3, "{out:?}");
    assert_eq!(*error(&out[2]), stray(1, StrayReason::NotAHandle));
    assert!(probe.closed());
}

#[test]
fn a_second_fd_read_while_a_decision_is_pending() {
    let h = |msg: &str| handle_line(msg) + "\n";

    // The pending read's last frame completes in the next read, which carries its own
    // descriptor for a later handle: first the pending decision, then the new one.
    let mut d = Decoder::default();
    let (a, probe_a) = tracked_fd();
    let (b, probe_b) = tracked_fd();
    let h2 = h("2");
    let first = h("1") + &h2[..10];
    assert!(decode(&mut d, first.as_bytes(), vec![a]).is_empty());
    let second = h2[10..].to_owned() + &h("3");
    let out = decode(&mut d, second.as_bytes(), vec![b]);
    assert_eq!(out.len(), 3, "{out:?}");
    assert!(frame(&out[0]).fd.is_none());
    assert!(probe_a.is(frame(&out[1]).fd.as_ref().expect("bound")));
    assert!(probe_b.is(frame(&out[2]).fd.as_ref().expect("bound")));

    // A read with descriptors in which no frame starts, while one is pending: NoFrame, and the
    // pending one is not disturbed.
    let (a, probe_a) = tracked_fd();
    let (b, probe_b) = tracked_fd();
    let line = h("4");
    let first = h("0") + &line[..10];
    assert!(decode(&mut d, first.as_bytes(), vec![a]).is_empty());
    assert_eq!(d.buffered_len(), 10);
    let out = decode(&mut d, &line.as_bytes()[10..20], vec![b]);
    assert_eq!(out.len(), 1, "{out:?}");
    assert_eq!(*error(&out[0]), stray(1, StrayReason::NoFrame));
    assert!(probe_b.closed());
    assert!(!probe_a.closed());
    let out = decode(&mut d, &line.as_bytes()[20..], Vec::new());
    assert_eq!(out.len(), 2, "{out:?}");
    assert!(frame(&out[0]).fd.is_none());
    assert!(probe_a.is(frame(&out[1]).fd.as_ref().expect("bound")));

    // A second descriptor-carrying read that both completes the pending frame and starts one.
    let (a, probe_a) = tracked_fd();
    let (b, probe_b) = tracked_fd();
    let first = "[1]\n".to_owned() + &h("5")[..5];
    let out = decode(&mut d, first.as_bytes(), vec![a]);
    assert_eq!(frame(&out[0]).text, "[1]");
    let second = h("5")[5..].to_owned() + "[6]\n";
    let out = decode(&mut d, second.as_bytes(), vec![b]);
    assert_eq!(out.len(), 3, "{out:?}");
    assert!(probe_a.is(frame(&out[0]).fd.as_ref().expect("bound")));
    assert_eq!(frame(&out[1]).text, "[6]");
    assert_eq!(*error(&out[2]), stray(1, StrayReason::NotAHandle));
    assert!(probe_b.closed());
}

#[test]
fn eof_while_the_last_frame_of_an_fd_read_is_incomplete() {
    // A handle, then a frame the channel ends inside: whether that frame was the handle meant
    // for the descriptor is unknown, so nothing is bound; the held handle is still delivered.
    let mut d = Decoder::default();
    let (fd, probe) = tracked_fd();
    let chunk = handle_line("1") + "\n[2,";
    assert!(decode(&mut d, chunk.as_bytes(), vec![fd]).is_empty());
    let out = finish(&mut d);
    assert_eq!(out.len(), 3, "{out:?}");
    assert!(frame(&out[0]).is_handle());
    assert!(frame(&out[0]).fd.is_none());
    assert_eq!(*error(&out[1]), stray(1, StrayReason::Truncated));
    assert_eq!(*error(&out[2]), FrameError::Truncated { len: 3 });
    assert!(probe.closed());
    assert!(finish(&mut d).is_empty(), "reported once");
}

#[test]
fn fd_on_malformed_frame_is_bad_frame() {
    let mut d = Decoder::default();
    let (fd, probe) = tracked_fd();
    let out = decode(
        &mut d,
        br#"{"cmd":"NODE_HANDLE","type":"net.Socket","msg":}"#,
        vec![fd],
    );
    assert!(out.is_empty());
    assert!(!probe.closed(), "held until the frame is complete");
    let out = decode(&mut d, b"\n", Vec::new());
    assert_eq!(out.len(), 2);
    assert!(matches!(error(&out[0]), FrameError::Malformed { .. }));
    assert_eq!(*error(&out[1]), stray(1, StrayReason::BadFrame));
    assert!(probe.closed());

    // An empty line is a malformed frame too.
    let (fd, probe) = tracked_fd();
    let out = decode(&mut d, b"\n", vec![fd]);
    assert!(matches!(
        error(&out[0]),
        FrameError::Malformed { len: 0, .. }
    ));
    assert_eq!(*error(&out[1]), stray(1, StrayReason::BadFrame));
    assert!(probe.closed());
}

#[test]
fn fd_on_too_large_frame_is_bad_frame() {
    let line = handle_line("\"0123456789\"") + "\n";
    let max = line.len() - 2; // one byte too few

    // Complete in one read.
    let mut d = Decoder::new(max);
    let (fd, probe) = tracked_fd();
    let out = decode(&mut d, line.as_bytes(), vec![fd]);
    assert_eq!(out.len(), 2);
    assert_eq!(*error(&out[0]), FrameError::TooLarge { limit: max });
    assert_eq!(*error(&out[1]), stray(1, StrayReason::BadFrame));
    assert!(probe.closed());

    // Split: the descriptor is held, then released as soon as the frame exceeds the limit.
    let (fd, probe) = tracked_fd();
    let out = decode(&mut d, &line.as_bytes()[..max - 1], vec![fd]);
    assert!(out.is_empty());
    assert!(!probe.closed());
    let out = decode(
        &mut d,
        &line.as_bytes()[max - 1..line.len() - 1],
        Vec::new(),
    );
    assert_eq!(out.len(), 2);
    assert_eq!(*error(&out[0]), FrameError::TooLarge { limit: max });
    assert_eq!(*error(&out[1]), stray(1, StrayReason::BadFrame));
    assert!(probe.closed());
    assert_eq!(d.buffered_len(), 0);
    assert!(
        decode(&mut d, b"\n", Vec::new()).is_empty(),
        "end of the discarded frame"
    );

    // The limit itself is allowed, and the decoder is in step again.
    let ok = handle_line("\"012345678\"") + "\n";
    assert_eq!(ok.len() - 1, max);
    let (fd, probe) = tracked_fd();
    let out = decode(&mut d, ok.as_bytes(), vec![fd]);
    assert_eq!(out.len(), 1);
    assert!(probe.is(frame(&out[0]).fd.as_ref().expect("bound")));
}

#[test]
fn eof_inside_a_handle_frame_closes_its_fd() {
    let mut d = Decoder::default();
    let line = handle_line("1");
    let (fd, probe) = tracked_fd();
    assert!(decode(&mut d, &line.as_bytes()[..12], vec![fd]).is_empty());
    assert!(decode(&mut d, &line.as_bytes()[12..], Vec::new()).is_empty());
    assert!(!probe.closed());
    let out = finish(&mut d);
    assert_eq!(out.len(), 2);
    assert_eq!(*error(&out[0]), stray(1, StrayReason::Truncated));
    assert_eq!(*error(&out[1]), FrameError::Truncated { len: line.len() });
    assert!(probe.closed());
    assert_eq!(d.buffered_len(), 0);
    assert!(finish(&mut d).is_empty(), "reported once");
}

// ---------------------------------------------------------------------------------------------
// Text

#[test]
fn crlf_line_endings() {
    let mut d = Decoder::default();
    let (fd, probe) = tracked_fd();
    let mut bytes = b"1\r\n{\"a\":\"b\\r\"}\r\n".to_vec();
    let handle_start = bytes.len();
    bytes.extend_from_slice((handle_line("null") + "\r\n").as_bytes());
    let end = bytes.len();
    // The third read holds the previous frame's `\r\n`, the handle's start and its `\r`.
    let mut out = decode(&mut d, &bytes[..5], Vec::new());
    out.extend(decode(&mut d, &bytes[5..handle_start - 2], Vec::new()));
    out.extend(decode(&mut d, &bytes[handle_start - 2..end - 1], vec![fd]));
    out.extend(decode(&mut d, &bytes[end - 1..], Vec::new()));
    out.extend(finish(&mut d));
    assert_eq!(out.len(), 3, "{out:?}");
    assert_eq!(frame(&out[0]).text, "1");
    assert_eq!(frame(&out[1]).text, r#"{"a":"b\r"}"#);
    assert_eq!(json(&frame(&out[1]).text)["a"], "b\r");
    assert_eq!(frame(&out[2]).text, handle_line("null"));
    assert!(probe.is(frame(&out[2]).fd.as_ref().expect("bound")));
}

#[test]
fn line_of_32_mib_in_64_kib_reads() {
    const LEN: usize = 32 * 1024 * 1024;
    // Multi-byte characters and escapes straddle the read boundaries.
    let unit = "é😀\u{2028}ab\\\"\\n€";
    let mut content = String::with_capacity(LEN + unit.len());
    while content.len() < LEN {
        content.push_str(unit);
    }
    let line = handle_line(&format!("\"{content}\""));
    let mut bytes = line.clone().into_bytes();
    bytes.push(b'\n');

    let mut d = Decoder::default();
    let (fd, probe) = tracked_fd();
    let mut fd = Some(fd);
    let mut out = Vec::new();
    let mut fed = 0;
    for chunk in bytes.chunks(64 * 1024) {
        d.decode(chunk, fd.take().into_iter().collect(), &mut out);
        fed += chunk.len();
        if fed < bytes.len() {
            assert!(out.is_empty());
            assert_eq!(d.buffered_len(), fed);
        }
    }
    assert_eq!(d.buffered_len(), 0);
    assert_eq!(out.len(), 1);
    let f = frame(&out[0]);
    assert!(f.text == line, "text differs from what was sent");
    assert!(f.is_handle());
    assert!(probe.is(f.fd.as_ref().expect("bound")));
}

#[test]
fn lone_surrogate_escapes_become_replacement_characters() {
    let mut d = Decoder::default();
    let (fd, probe) = tracked_fd();
    // In a handle's message, in a key, high and low halves, next to a valid pair and an escaped
    // backslash; split in the middle of an escape.
    let line =
        handle_line(r#"{"\udc00k":["\ud800","x\udbff\ud83d\ude00","\\ud800","\udfff"]}"#) + "\n";
    let cut = line.find("d800").unwrap();
    let mut out = decode(&mut d, &line.as_bytes()[..cut], vec![fd]);
    out.extend(decode(&mut d, &line.as_bytes()[cut..], Vec::new()));
    assert_eq!(out.len(), 1, "{out:?}");
    let f = frame(&out[0]);
    assert!(f.is_handle());
    assert!(probe.is(f.fd.as_ref().expect("bound")));
    let msg = &json(&f.text)["msg"];
    assert_eq!(
        msg["\u{fffd}k"],
        serde_json::json!(["\u{fffd}", "x\u{fffd}😀", "\\ud800", "\u{fffd}"])
    );
}

#[test]
fn invalid_utf8_becomes_replacement_characters() {
    let mut d = Decoder::default();
    let bytes = b"[\"a\xffb\xc3\",\"\xe2\x82\",\"\xf0\x9f\x98\x80\xed\xa0\x80\"]\n";
    let mut out = Vec::new();
    // One byte per read: the decoder must not decode per read.
    for b in bytes {
        d.decode(std::slice::from_ref(b), Vec::new(), &mut out);
    }
    assert_eq!(out.len(), 1, "{out:?}");
    let v = json(&frame(&out[0]).text);
    // `\xed\xa0\x80` (an encoded surrogate) is three invalid bytes: three U+FFFD, like
    // `String::from_utf8_lossy` and WHATWG decoders.
    assert_eq!(
        v,
        serde_json::json!([
            "a\u{fffd}b\u{fffd}",
            "\u{fffd}",
            "😀\u{fffd}\u{fffd}\u{fffd}"
        ])
    );
}

#[test]
fn memory_stays_bounded_while_discarding_a_long_line() {
    let mut d = Decoder::new(100);
    let mut out = Vec::new();
    d.decode(b"[\"", Vec::new(), &mut out);
    for _ in 0..1000 {
        d.decode(&[b'x'; 1000], Vec::new(), &mut out);
        assert!(d.buffered_len() <= 100);
    }
    d.decode(b"\"]\n[1]\n", Vec::new(), &mut out);
    assert_eq!(out.len(), 2, "{out:?}");
    assert_eq!(*error(&out[0]), FrameError::TooLarge { limit: 100 });
    assert_eq!(frame(&out[1]).text, "[1]");
}

// ---------------------------------------------------------------------------------------------
// Fuzz inputs

/// Interprets an input of the `decoder` fuzz target (layout documented in
/// `fuzz/fuzz_targets/decoder.rs`) as `(stream, reads, tail_fds, max_frame_len)`.
fn fuzz_input(input: &[u8]) -> Option<(&[u8], Vec<ChaosRead>, usize, usize)> {
    let [b0, b1, rest @ ..] = input else {
        return None;
    };
    let max = if *b0 < 0xF0 {
        usize::from(*b0)
    } else {
        DEFAULT_MAX_FRAME_LEN
    };
    let n = usize::from(b1 & 0x1F) + 1;
    let tail_fds = usize::from((b1 >> 5) & 3);
    if rest.len() < n {
        return None;
    }
    let (specs, stream) = rest.split_at(n);
    let reads = specs.iter().map(|s| ChaosRead {
        len: usize::from(s & 0x3F),
        fds: usize::from(s >> 6),
    });
    Some((stream, reads.collect(), tail_fds, max))
}

/// Replays the fuzzer's committed seeds and every saved regression through the same checks as
/// the fuzz target.
#[test]
fn fuzz_seeds_and_regressions_replay() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz");
    let mut replayed = 0;
    for dir in [root.join("seeds/decoder"), root.join("regressions")] {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries {
            let path = entry.unwrap().path();
            let input = std::fs::read(&path).unwrap();
            let (stream, reads, tail_fds, max) =
                fuzz_input(&input).unwrap_or_else(|| panic!("{}: too short", path.display()));
            if let Err(e) = check_chaos(stream, &reads, tail_fds, max) {
                panic!("{}: {e}", path.display());
            }
            replayed += 1;
        }
    }
    assert!(
        replayed >= 7,
        "the seeds are missing from {}",
        root.display()
    );
}

/// `Decoder::new` documents the limit as "lines longer than `max_frame_len` bytes (terminator
/// excluded)", and `\r\n` endings are accepted; but the `\r` of a `\r\n` terminator is counted.
/// The limit counts every byte before the `\n`, a `\r` included (documented on
/// `Decoder::new`): the decoder never looks past the limit to decide.
#[test]
fn crlf_carriage_return_counts_toward_the_limit() {
    let mut d = Decoder::new(3);
    let out = decode(&mut d, b"[1]\n[2]\r\n[3]\n", Vec::new());
    assert_eq!(out.len(), 3, "{out:?}");
    assert_eq!(frame(&out[0]).text, "[1]");
    assert!(
        matches!(out[1], Decoded::Error(FrameError::TooLarge { limit: 3 })),
        "{out:?}"
    );
    assert_eq!(frame(&out[2]).text, "[3]");
    let mut d = Decoder::new(4);
    let out = decode(&mut d, b"[2]\r\n", Vec::new());
    assert_eq!(frame(&out[0]).text, "[2]");
}

// ---------------------------------------------------------------------------------------------
// Encoding: large messages take the SIMD path; the result must mean the same as serde_json's.
// ---------------------------------------------------------------------------------------------

fn arb_json() -> impl Strategy<Value = serde_json::Value> {
    let leaf = prop_oneof![
        Just(serde_json::Value::Null),
        any::<bool>().prop_map(serde_json::Value::from),
        any::<i64>().prop_map(serde_json::Value::from),
        any::<u64>().prop_map(serde_json::Value::from),
        any::<f64>().prop_map(serde_json::Value::from),
        ".{0,40}".prop_map(serde_json::Value::from),
        // Long strings with escapes and non-ASCII, so values cross the large-message threshold.
        (proptest::collection::vec(prop_oneof![Just("\"".to_string()), Just("\\\\".to_string()), Just("\n".to_string()), Just("\u{1}".to_string()), Just("\u{2028}".to_string()), Just("é😀".to_string()), "[a-z]{1,64}"], 0..400))
            .prop_map(|parts| serde_json::Value::from(parts.concat())),
    ];
    leaf.prop_recursive(4, 64, 8, |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..8).prop_map(serde_json::Value::from),
            proptest::collection::btree_map(".{0,12}", inner, 0..8)
                .prop_map(|m| serde_json::Value::Object(m.into_iter().collect())),
        ]
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]
    /// Whatever path `encode` takes, the line parses back to the same value serde_json would
    /// produce, holds one newline (its last byte), and decodes as one frame.
    #[test]
    fn encode_means_what_serde_json_means(value in arb_json()) {
        let line = handoff::channel::frame::encode(&value).unwrap();
        prop_assert_eq!(line.iter().filter(|&&b| b == b'\n').count(), 1);
        prop_assert_eq!(*line.last().unwrap(), b'\n');
        let back: serde_json::Value = serde_json::from_slice(&line).unwrap();
        let reference: serde_json::Value = serde_json::from_slice(&serde_json::to_vec(&value).unwrap()).unwrap();
        prop_assert_eq!(back, reference);
    }
}

#[test]
fn large_messages_keep_raw_values_and_non_finite_floats_as_serde_json_does() {
    let raw = serde_json::value::RawValue::from_string(format!("[{}]", "1,".repeat(10_000) + "1")).unwrap();
    let line = handoff::channel::frame::encode(&raw).unwrap();
    assert_eq!(&line[..line.len() - 1], raw.get().as_bytes());
    let floats = vec![f64::NAN; 5_000];
    let line = handoff::channel::frame::encode(&floats).unwrap();
    assert_eq!(line, [serde_json::to_vec(&floats).unwrap(), b"\n".to_vec()].concat());
}
