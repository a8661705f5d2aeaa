//! Fuzzes `handoff::channel::frame::Decoder` with arbitrary bytes, arbitrary read boundaries and
//! real descriptors attached to arbitrary reads.
//!
//! Input layout:
//!
//! | bytes | meaning |
//! | --- | --- |
//! | 0 | `max_frame_len`: the byte's value if below 0xF0, else `DEFAULT_MAX_FRAME_LEN` |
//! | 1 | bits 0–4: `n - 1`, the number of read specs that follow; bits 5–6: descriptors on an empty read after the end of the stream |
//! | 2 .. 2+n | read specs, used in turn (cycled) until the stream is consumed: bits 0–5 the read's length (0–63), bits 6–7 its number of descriptors (0–3) |
//! | rest | the byte stream |
//!
//! Each descriptor is the write end of a fresh pipe; the target keeps the read end, so it can
//! tell (by end of file) whether the decoder closed the descriptor, and (by `fstat` and a byte
//! written through it) which one a frame carries. Everything is closed at the end of the run.
//!
//! Invariants checked (a panic is a finding):
//! - `buffered_len() <= max_frame_len` after every read, 0 after `finish`;
//! - leaving out the `StrayFds` reports, the output equals that of the whole stream fed in one
//!   read without descriptors: one item per line, the same frames and errors;
//! - every frame is one line of valid JSON; only `NODE_HANDLE` frames carry a descriptor;
//! - descriptors follow the module docs' rule: a read's descriptors belong to the last valid
//!   `NODE_HANDLE` frame whose first byte is in it, which gets the first one; all others are
//!   reported with the expected reason and count (if no `NODE_HANDLE` starts in the read, the
//!   reason comes from the last frame that does; `Truncated` if the stream ends inside that
//!   frame, whatever starts before it), and closed;
//! - after the output is dropped, every descriptor is closed.
#![no_main]

use std::collections::HashMap;
use std::ops::Range;
use std::os::fd::{AsFd, OwnedFd};

use handoff::channel::frame::{Decoded, Decoder, FrameError, StrayReason, DEFAULT_MAX_FRAME_LEN};
use libfuzzer_sys::fuzz_target;
use rustix::io::Errno;
use rustix::pipe::{pipe_with, PipeFlags};

/// Most descriptors one run hands to the decoder.
const MAX_FDS: usize = 64;

fuzz_target!(|input: &[u8]| run(input));

struct Probe {
    read: OwnedFd,
    stat: rustix::fs::Stat,
}

fn tracked_fd() -> (OwnedFd, Probe) {
    let (read, write) = pipe_with(PipeFlags::CLOEXEC | PipeFlags::NONBLOCK).expect("pipe");
    let stat = rustix::fs::fstat(&read).expect("fstat");
    (write, Probe { read, stat })
}

impl Probe {
    fn closed(&self) -> bool {
        let mut byte = [0u8; 1];
        match rustix::io::read(&self.read, &mut byte) {
            Ok(0) => true,
            Err(Errno::AGAIN) => false,
            other => panic!("unexpected result reading a probe pipe: {other:?}"),
        }
    }

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
        rustix::io::read(&self.read, &mut byte).expect("read back") == 1
    }
}

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

fn newlines(bytes: &[u8]) -> usize {
    bytes.iter().filter(|&&b| b == b'\n').count()
}

/// The lines (numbered from 0) whose first byte is in `stream[range]`.
fn lines_starting_in(stream: &[u8], range: Range<usize>) -> Range<usize> {
    if range.is_empty() {
        return 0..0;
    }
    let at_line_start = range.start == 0 || stream[range.start - 1] == b'\n';
    let first = newlines(&stream[..range.start]) + usize::from(!at_line_start);
    // The line holding the read's last byte is the last line starting in it, if any does.
    first..newlines(&stream[..range.end - 1]) + 1
}

/// What the rule makes of `nfds` descriptors arriving with `stream[range]`, given the whole
/// stream's items: the line that gets the first one, and the stray report, if any.
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
    if matches!(oracle[last], Item::Error(FrameError::Truncated { .. })) {
        return (None, Some((nfds, StrayReason::Truncated)));
    }
    let is_handle = |line: &usize| {
        matches!(&oracle[*line], Item::Frame { internal_cmd, .. }
            if internal_cmd.as_deref() == Some("NODE_HANDLE"))
    };
    if let Some(handle) = lines.rev().find(is_handle) {
        return (
            Some(handle),
            (nfds > 1).then(|| (nfds - 1, StrayReason::Surplus)),
        );
    }
    let reason = match &oracle[last] {
        Item::Frame { .. } => StrayReason::NotAHandle,
        Item::Error(_) => StrayReason::BadFrame,
    };
    (None, Some((nfds, reason)))
}

fn sorted(mut v: Vec<(usize, StrayReason)>) -> Vec<(String, usize)> {
    v.sort_by_key(|(count, reason)| (format!("{reason:?}"), *count));
    v.into_iter()
        .map(|(count, reason)| (format!("{reason:?}"), count))
        .collect()
}

fn run(input: &[u8]) {
    let [b0, b1, rest @ ..] = input else { return };
    let max = if *b0 < 0xF0 {
        usize::from(*b0)
    } else {
        DEFAULT_MAX_FRAME_LEN
    };
    let n = usize::from(b1 & 0x1F) + 1;
    let tail_fds = usize::from((b1 >> 5) & 3);
    if rest.len() < n {
        return;
    }
    let (specs, stream) = rest.split_at(n);

    // Oracle: the whole stream in one read, no descriptors.
    let mut whole = Decoder::new(max);
    let mut oracle = Vec::new();
    whole.decode(stream, Vec::new(), &mut oracle);
    whole.finish(&mut oracle);
    let oracle: Vec<Item> = oracle.iter().map(Item::of).collect();
    let unterminated = !stream.is_empty() && !stream.ends_with(b"\n");
    assert_eq!(
        oracle.len(),
        newlines(stream) + usize::from(unterminated),
        "one item per line"
    );
    assert!(oracle
        .iter()
        .all(|i| !matches!(i, Item::Error(FrameError::StrayFds { .. }))));

    // The reads.
    let progress = specs.iter().any(|s| s & 0x3F != 0);
    let mut plan = Vec::new();
    let mut pos = 0;
    for s in specs.iter().cycle() {
        if pos == stream.len() {
            break;
        }
        let len = if progress { usize::from(s & 0x3F) } else { 1 };
        let end = (pos + len).min(stream.len());
        plan.push((pos..end, usize::from(s >> 6)));
        pos = end;
    }
    plan.push((stream.len()..stream.len(), tail_fds));

    let mut d = Decoder::new(max);
    let mut out = Vec::new();
    let mut probes: Vec<Probe> = Vec::new();
    let mut bound_to_line = HashMap::new();
    let mut expected_strays = Vec::new();
    for (range, nfds) in plan {
        let nfds = nfds.min(MAX_FDS - probes.len());
        let first = probes.len();
        let mut fds = Vec::with_capacity(nfds);
        for _ in 0..nfds {
            let (fd, probe) = tracked_fd();
            fds.push(fd);
            probes.push(probe);
        }
        if nfds > 0 {
            let (bound, stray) = expected_binding(stream, range.clone(), nfds, &oracle);
            if let Some(line) = bound {
                assert!(bound_to_line.insert(line, first).is_none());
            }
            expected_strays.extend(stray);
        }
        d.decode(&stream[range], fds, &mut out);
        assert!(
            d.buffered_len() <= max,
            "buffered {} > max {max}",
            d.buffered_len()
        );
    }
    d.finish(&mut out);
    assert_eq!(d.buffered_len(), 0);

    let mut strays = Vec::new();
    let mut items = Vec::new();
    for item in &out {
        match item {
            Decoded::Error(FrameError::StrayFds { count, reason }) => {
                assert!(*count > 0);
                strays.push((*count, *reason));
            }
            Decoded::Frame(f) => {
                assert!(!f.text.contains('\n'));
                if let Err(e) = serde_json::from_str::<serde_json::Value>(&f.text) {
                    panic!("frame is not JSON ({e}): {:?}", f.text);
                }
                assert!(
                    f.fd.is_none() || f.is_handle(),
                    "descriptor on a non-handle frame"
                );
                items.push(item);
            }
            Decoded::Error(_) => items.push(item),
        }
    }
    assert_eq!(
        items.iter().copied().map(Item::of).collect::<Vec<_>>(),
        oracle
    );
    assert_eq!(sorted(strays), sorted(expected_strays));

    let mut bound = vec![false; probes.len()];
    for (line, item) in items.iter().enumerate() {
        let fd = match item {
            Decoded::Frame(f) => f.fd.as_ref(),
            Decoded::Error(_) => None,
        };
        match (bound_to_line.get(&line), fd) {
            (Some(&p), Some(fd)) => {
                assert!(probes[p].is(fd), "line {line} carries the wrong descriptor");
                bound[p] = true;
            }
            (None, None) => {}
            (p, fd) => panic!("line {line}: expected probe {p:?}, got {fd:?}"),
        }
    }
    for (p, bound) in probes.iter().zip(&bound) {
        assert_eq!(p.closed(), !bound, "every descriptor is bound or closed");
    }
    drop(out);
    drop(d);
    assert!(
        probes.iter().all(Probe::closed),
        "a descriptor outlived its frame"
    );
}
