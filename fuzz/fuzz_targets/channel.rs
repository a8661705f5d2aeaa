//! Fuzzes a whole channel from the peer's side: arbitrary lines, some carrying a descriptor, go
//! to a handoff [`Channel`], whose driver parses `NODE_HANDLE` envelopes (unwrapping Node's
//! retransmission wrappers), socket-list requests and replies and everything else, while the
//! target reads back all handoff writes. This covers what the `decoder` target cannot: the
//! envelope and unwrap paths, key limits, the reply queue.
//!
//! Input layout:
//!
//! | bytes | meaning |
//! | --- | --- |
//! | 0 | bit 0: the user reads every message (else it never takes one); bit 1: it drops the receiver at once |
//! | 1, 2 | a bit mask: which of the first 16 writes carry a descriptor (one end of a fresh socket pair) |
//! | rest | the byte stream, written one line (up to and including its `\n`) per `sendmsg` |
//!
//! Invariants checked (a panic is a finding):
//! - nothing panics, and the channel reaches its end (the peer's end-of-file) within 10 s;
//! - handoff writes only complete JSON lines, each one of the replies it owes: `NODE_HANDLE_ACK`,
//!   `NODE_HANDLE_NACK`, `NODE_SOCKET_COUNT` (with a string key and a numeric count) or
//!   `NODE_SOCKET_ALL_CLOSED`;
//! - every `NODE_HANDLE` frame of the stream (as a reference `Decoder` reads it) gets exactly one
//!   ACK or NACK;
//! - once the channel and everything it delivered are dropped, every descriptor handed to it is
//!   closed.
#![no_main]

use std::io::{IoSlice, Read};
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::time::Duration;

use handoff::channel::frame::{Decoded, Decoder};
use handoff::Channel;
use libfuzzer_sys::fuzz_target;
use rustix::net::{SendAncillaryBuffer, SendAncillaryMessage, SendFlags};

fuzz_target!(|input: &[u8]| run(input));

fn run(input: &[u8]) {
    if input.len() < 3 {
        return;
    }
    let (flags, mask, stream) = (input[0], u16::from_le_bytes([input[1], input[2]]), &input[3..]);
    let user_reads = flags & 1 != 0;
    let drop_receiver = flags & 2 != 0;

    // What the stream holds, read the way handoff's decoder reads it.
    let mut reference = Vec::new();
    let mut decoder = Decoder::default();
    decoder.decode(stream, Vec::new(), &mut reference);
    decoder.finish(&mut reference);
    let handle_frames =
        reference.iter().filter(|item| matches!(item, Decoded::Frame(f) if f.is_handle())).count();

    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let (probes, written) = runtime.block_on(async {
        let (ours, theirs) = UnixStream::pair().unwrap();
        let (sender, receiver) = Channel::from_fd(OwnedFd::from(ours)).unwrap().split();
        let receiver = (!drop_receiver).then_some(receiver);
        let user = tokio::spawn(async move {
            let Some(mut receiver) = receiver else { return };
            if user_reads {
                let mut kept = Vec::new();
                while let Some(item) = receiver.recv().await {
                    kept.push(item);
                }
            } else {
                // Holds the receiver and never takes anything.
                std::future::pending::<()>().await;
            }
        });

        // The peer: a thread writing the lines, another reading everything handoff writes.
        let reader = theirs.try_clone().unwrap();
        let reading = std::thread::spawn(move || {
            let mut all = Vec::new();
            let _ = (&reader).read_to_end(&mut all);
            all
        });
        let lines: Vec<Vec<u8>> = stream.split_inclusive(|&b| b == b'\n').map(<[u8]>::to_vec).collect();
        let writing = std::thread::spawn(move || {
            let mut probes = Vec::new();
            for (i, line) in lines.iter().enumerate() {
                let fd = (i < 16 && mask & (1 << i) != 0).then(|| {
                    let (sent, kept) = UnixStream::pair().unwrap();
                    probes.push(kept);
                    OwnedFd::from(sent)
                });
                send(&theirs, line, fd.as_ref());
            }
            let _ = theirs.shutdown(std::net::Shutdown::Write);
            (probes, theirs)
        });
        let (probes, theirs) = tokio::task::spawn_blocking(move || writing.join().unwrap()).await.unwrap();
        // handoff sees end-of-file and closes the channel.
        tokio::time::timeout(Duration::from_secs(10), sender.closed())
            .await
            .expect("the channel did not close after the peer's end-of-file");
        user.abort();
        let _ = user.await;
        drop(sender);
        drop(theirs);
        let written = tokio::task::spawn_blocking(move || reading.join().unwrap()).await.unwrap();
        (probes, written)
    });
    drop(runtime);

    let mut acks = 0;
    assert!(written.is_empty() || written.ends_with(b"\n"), "a partial line from handoff");
    for line in written.split(|&b| b == b'\n').filter(|l| !l.is_empty()) {
        let value: serde_json::Value = serde_json::from_slice(line).expect("handoff wrote invalid JSON");
        match value["cmd"].as_str() {
            Some("NODE_HANDLE_ACK" | "NODE_HANDLE_NACK") => acks += 1,
            Some("NODE_SOCKET_COUNT") => {
                assert!(value["key"].is_string() && value["count"].is_u64(), "{value}");
            }
            Some("NODE_SOCKET_ALL_CLOSED") => assert!(value["key"].is_string(), "{value}"),
            _ => panic!("handoff wrote something it does not owe: {value}"),
        }
    }
    assert_eq!(acks, handle_frames, "one ACK or NACK per NODE_HANDLE frame");
    for probe in probes {
        probe.set_nonblocking(true).unwrap();
        let mut byte = [0u8; 1];
        match (&probe).read(&mut byte) {
            Ok(0) => {}
            other => panic!("a descriptor handed to handoff is still open: {other:?}"),
        }
    }
}

/// One `sendmsg` of `line` (blocking), with `fd` attached if given.
fn send(socket: &UnixStream, line: &[u8], fd: Option<&OwnedFd>) {
    let mut space = [MaybeUninit::<u8>::uninit(); rustix::cmsg_space!(ScmRights(1))];
    let mut control = SendAncillaryBuffer::new(&mut space);
    let fds = fd.map(|fd| [fd.as_fd()]);
    if let Some(fds) = &fds {
        assert!(control.push(SendAncillaryMessage::ScmRights(fds)));
    }
    let mut sent = 0;
    while sent < line.len() {
        let attach = if sent == 0 { &mut control } else { &mut SendAncillaryBuffer::default() };
        match rustix::net::sendmsg(socket, &[IoSlice::new(&line[sent..])], attach, SendFlags::NOSIGNAL) {
            Ok(n) => sent += n,
            Err(_) => return, // handoff closed its end
        }
    }
}
