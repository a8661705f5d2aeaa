//! A misbehaving peer: a raw socket under the test's control sends what a correct Node (or
//! handoff) peer never would, and the tests check what handoff reports from `recv()`, what it
//! writes back on the wire, and that no file descriptor leaks — and that the channel goes on.
//!
//! Every test counts descriptors, so each one runs through [`run`], which takes `util::serial()`
//! *before* building its tokio runtime: with `#[tokio::test]` the runtime of the next test (its
//! epoll, eventfd and signal-socket descriptors) is built on another thread while this test holds
//! the lock, and shows up as a "leak" in the exact descriptor-set comparison.

mod util;

use util::raw_peer::*;
use util::serial_test as run;

use std::io::{Read, Write};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use handoff::channel::{FrameError, StrayReason};
use handoff::handle::{FdKind, HandleError, HandleType, KeepOpen, RawHandle};
use handoff::{Channel, ChannelConfig, Message, RecvError, SendError, SendHandleError};
use serde_json::json;

// ---------------------------------------------------------------------------------------------
// The raw peer
// ---------------------------------------------------------------------------------------------

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

async fn next(chan: &mut Channel) -> Result<Message, RecvError> {
    util::within("an item from recv()", chan.recv())
        .await
        .expect("the receive stream ended early")
}

async fn expect_value(chan: &mut Channel, expected: serde_json::Value) -> Message {
    match next(chan).await {
        Ok(message) => {
            assert_eq!(
                message.value().unwrap(),
                expected,
                "json: {}",
                message.json()
            );
            message
        }
        Err(e) => panic!("expected {expected}, got error {e:?}"),
    }
}

/// Proves handoff wrote nothing since the last frame read: a marker sent now is the next thing on
/// the wire. (Replies are queued while the input is decoded, so call it after `recv()` has
/// reported the input.)
async fn assert_no_reply(chan: &Channel, peer: &mut RawPeer) {
    static N: AtomicUsize = AtomicUsize::new(0);
    let marker = json!({ "marker": N.fetch_add(1, Ordering::SeqCst) });
    chan.send(&marker).await.unwrap();
    util::within("flush", chan.sender().flush()).await.unwrap();
    let fds = peer.expect_frame(format!("{marker}\n").as_bytes()).await;
    assert!(fds.is_empty());
}

/// The channel still works both ways.
async fn assert_still_works(chan: &mut Channel, peer: &mut RawPeer) {
    assert_no_reply(chan, peer).await;
    peer.write(b"{\"still\":\"alive\"}\n").await;
    expect_value(chan, json!({"still": "alive"})).await;
}

fn regular_file() -> OwnedFd {
    OwnedFd::from(std::fs::File::open(concat!(env!("CARGO_MANIFEST_DIR"), "/Cargo.toml")).unwrap())
}

fn vm_rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

// ---------------------------------------------------------------------------------------------
// Malformed frames
// ---------------------------------------------------------------------------------------------

#[test]
fn malformed_json_line_is_an_error_and_the_channel_goes_on() {
    run(async {
        let baseline = util::open_fds();
        let (mut chan, mut peer) = raw_channel(ChannelConfig::default());

        peer.write(b"{\"a\":\n").await;
        match next(&mut chan).await {
            Err(RecvError::Frame(FrameError::Malformed { excerpt, len, .. })) => {
                assert_eq!(excerpt, "{\"a\":");
                assert_eq!(len, 5);
            }
            other => panic!("expected Malformed, got {other:?}"),
        }
        // Several bad ones in one write, each reported, good ones between them delivered.
        peer.write(b"nope\n{\"ok\":1}\n[1,2\n{\"a\":1}}\n").await;
        assert!(matches!(
            next(&mut chan).await,
            Err(RecvError::Frame(FrameError::Malformed { len: 4, .. }))
        ));
        expect_value(&mut chan, json!({"ok": 1})).await;
        assert!(matches!(
            next(&mut chan).await,
            Err(RecvError::Frame(FrameError::Malformed { len: 4, .. }))
        ));
        assert!(matches!(
            next(&mut chan).await,
            Err(RecvError::Frame(FrameError::Malformed { len: 8, .. }))
        ));

        assert_still_works(&mut chan, &mut peer).await;
        drop((chan, peer));
        util::assert_fds_settle_to(&baseline).await;
    });
}

#[test]
fn empty_and_blank_lines_are_malformed() {
    run(async {
        let baseline = util::open_fds();
        let (mut chan, mut peer) = raw_channel(ChannelConfig::default());

        // `\n\n` between two messages (the blank line that kills a Node peer), then `\r\n` and spaces.
        peer.write(b"1\n\n2\n\r\n   \n3\r\n").await;
        expect_value(&mut chan, json!(1)).await;
        assert!(matches!(
            next(&mut chan).await,
            Err(RecvError::Frame(FrameError::Malformed { len: 0, .. }))
        ));
        expect_value(&mut chan, json!(2)).await;
        assert!(matches!(
            next(&mut chan).await,
            Err(RecvError::Frame(FrameError::Malformed { len: 1, .. }))
        ));
        assert!(matches!(
            next(&mut chan).await,
            Err(RecvError::Frame(FrameError::Malformed { len: 3, .. }))
        ));
        expect_value(&mut chan, json!(3)).await;

        assert_still_works(&mut chan, &mut peer).await;
        drop((chan, peer));
        util::assert_fds_settle_to(&baseline).await;
    });
}

#[test]
fn deeply_nested_json_is_accepted_to_the_limit_and_too_deep_beyond() {
    run(async {
        let baseline = util::open_fds();
        let (mut chan, mut peer) = raw_channel(ChannelConfig::default());

        // serde_json alone stops at 128; the default limit is 1,000. Accepted and readable.
        for depth in [129, 1_000] {
            let mut line = "[".repeat(depth) + &"]".repeat(depth);
            line.push('\n');
            peer.write(line.as_bytes()).await;
            let message = next(&mut chan).await.unwrap();
            let value = message.value().unwrap();
            let mut level = &value;
            let mut levels = 1;
            while let Some(inner) = level.as_array().and_then(|a| a.first()) {
                level = inner;
                levels += 1;
            }
            assert_eq!(levels, depth);
            let mut line = "{\"a\":".repeat(depth) + "1" + &"}".repeat(depth);
            line.push('\n');
            peer.write(line.as_bytes()).await;
            let message = next(&mut chan).await.unwrap();
            assert_eq!(message.json().len(), line.len() - 1);
            message.deserialize::<serde_json::Value>().unwrap();
        }

        // Beyond the limit: TooDeep, not "malformed", and no stack overflow however deep.
        let depth = 100_000;
        let mut line = "[".repeat(depth) + &"]".repeat(depth);
        line.push('\n');
        peer.write(line.as_bytes()).await;
        assert!(matches!(
            next(&mut chan).await,
            Err(RecvError::Frame(FrameError::TooDeep { limit: 1_000 }))
        ));
        let mut line = "{\"a\":".repeat(depth) + "1" + &"}".repeat(depth);
        line.push('\n');
        peer.write(line.as_bytes()).await;
        assert!(matches!(
            next(&mut chan).await,
            Err(RecvError::Frame(FrameError::TooDeep { limit: 1_000 }))
        ));
        // Malformed at depth is still malformed.
        let mut line = "[".repeat(200) + "x" + &"]".repeat(200);
        line.push('\n');
        peer.write(line.as_bytes()).await;
        assert!(matches!(next(&mut chan).await, Err(RecvError::Frame(FrameError::Malformed { .. }))));

        assert_still_works(&mut chan, &mut peer).await;
        drop((chan, peer));

        // The limit is configurable, both ways (Node writes up to ~4,000 levels of arrays).
        let (mut chan, mut peer) = raw_channel(ChannelConfig::default().max_depth(200));
        peer.write(format!("{}{}\n", "[".repeat(200), "]".repeat(200)).as_bytes()).await;
        assert!(next(&mut chan).await.is_ok());
        peer.write(format!("{}{}\n", "[".repeat(201), "]".repeat(201)).as_bytes()).await;
        assert!(matches!(
            next(&mut chan).await,
            Err(RecvError::Frame(FrameError::TooDeep { limit: 200 }))
        ));
        assert_still_works(&mut chan, &mut peer).await;
        drop((chan, peer));
        let (mut chan, mut peer) = raw_channel(ChannelConfig::default().max_depth(4_500));
        peer.write(format!("{}{}\n", "[".repeat(4_200), "]".repeat(4_200)).as_bytes()).await;
        assert_eq!(next(&mut chan).await.unwrap().value().unwrap().as_array().unwrap().len(), 1);
        assert_still_works(&mut chan, &mut peer).await;
        drop((chan, peer));
        util::assert_fds_settle_to(&baseline).await;
    });
}

#[test]
fn frame_over_the_limit_is_skipped_with_bounded_memory() {
    run(async {
        let baseline = util::open_fds();
        let limit = 1024;
        let (mut chan, mut peer) = raw_channel(ChannelConfig::default().max_frame_len(limit));

        // Boundary: exactly `limit` bytes is accepted, one more is not.
        let exact = format!("\"{}\"\n", "x".repeat(limit - 2));
        peer.write(exact.as_bytes()).await;
        expect_value(&mut chan, json!("x".repeat(limit - 2))).await;
        let over = format!("\"{}\"\n", "x".repeat(limit - 1));
        peer.write(over.as_bytes()).await;
        assert!(matches!(
            next(&mut chan).await,
            Err(RecvError::Frame(FrameError::TooLarge { limit: 1024 }))
        ));

        // 16 MiB without a newline: handoff must not buffer it.
        let piece = vec![b'x'; 1024 * 1024];
        let rss_before = vm_rss_kib();
        peer.write(b"\"").await;
        for _ in 0..16 {
            peer.write(&piece).await;
        }
        // The writes only complete as handoff reads, so it has consumed all but a socket buffer.
        let grown_kib = vm_rss_kib().saturating_sub(rss_before);
        assert!(
            grown_kib < 8 * 1024,
            "resident memory grew by {grown_kib} KiB while skipping a long frame"
        );
        peer.write(b"\"\n{\"after\":\"long\"}\n").await;
        assert!(matches!(
            next(&mut chan).await,
            Err(RecvError::Frame(FrameError::TooLarge { limit: 1024 }))
        ));
        expect_value(&mut chan, json!({"after": "long"})).await;

        // A handle frame over the limit: its descriptor is closed, and no ACK/NACK is written.
        let (fd, watch) = probe();
        let mut big = br#"{"cmd":"NODE_HANDLE","type":"net.Socket","msg":""#.to_vec();
        big.extend_from_slice(&[b'y'; 4096]);
        big.extend_from_slice(b"\"}\n");
        peer.send(&big, &[fd.as_fd()]).await;
        drop(fd);
        let mut seen = Vec::new();
        for _ in 0..2 {
            match next(&mut chan).await {
                Err(RecvError::Frame(e)) => seen.push(e),
                other => panic!("expected frame errors, got {other:?}"),
            }
        }
        assert!(
            seen.contains(&FrameError::TooLarge { limit: 1024 }),
            "{seen:?}"
        );
        assert!(
            seen.contains(&FrameError::StrayFds {
                count: 1,
                reason: StrayReason::BadFrame
            }),
            "{seen:?}"
        );
        assert_peer_closed(&watch).await;

        assert_still_works(&mut chan, &mut peer).await;
        drop((chan, peer, watch));
        util::assert_fds_settle_to(&baseline).await;
    });
}

#[test]
fn invalid_utf8_and_lone_surrogates_become_replacement_characters() {
    run(async {
        let baseline = util::open_fds();
        let (mut chan, mut peer) = raw_channel(ChannelConfig::default());

        peer.write(b"\"a\xffb\"\n").await;
        let message = expect_value(&mut chan, json!("a\u{fffd}b")).await;
        assert_eq!(message.json(), "\"a\u{fffd}b\"");

        peer.write(br#"["\ud800","x\udc00","\ud83d\ude00",{"\udbff":"\\ud800"}]"#)
            .await;
        peer.write(b"\n").await;
        expect_value(
            &mut chan,
            json!(["\u{fffd}", "x\u{fffd}", "\u{1f600}", {"\u{fffd}": "\\ud800"}]),
        )
        .await;

        // A valid multi-byte character split across two reads is intact.
        peer.write(b"{\"sync\":1}\n\"\xc3").await;
        expect_value(&mut chan, json!({"sync": 1})).await;
        peer.write(b"\xa9\"\n").await;
        expect_value(&mut chan, json!("\u{e9}")).await;

        // A lone surrogate inside a handle's message.
        let (fd, watch) = probe();
        peer.send(
            b"{\"cmd\":\"NODE_HANDLE\",\"type\":\"net.Socket\",\"msg\":\"\\udc00\"}\n",
            &[fd.as_fd()],
        )
        .await;
        drop(fd);
        assert!(peer.expect_frame(ACK).await.is_empty());
        let message = expect_value(&mut chan, json!("\u{fffd}")).await;
        assert_eq!(message.handle().unwrap().kind(), FdKind::UnixStream);
        drop(message);
        assert_peer_closed(&watch).await;

        assert_still_works(&mut chan, &mut peer).await;
        drop((chan, peer, watch));
        util::assert_fds_settle_to(&baseline).await;
    });
}

// ---------------------------------------------------------------------------------------------
// Handles and descriptors that do not match
// ---------------------------------------------------------------------------------------------

#[test]
fn handle_without_fd_is_nacked() {
    run(async {
        let baseline = util::open_fds();
        let (mut chan, mut peer) = raw_channel(ChannelConfig::default());

        peer.write(&handle_line("net.Socket", json!({"x": 1})))
            .await;
        assert!(peer.expect_frame(NACK).await.is_empty());
        match next(&mut chan).await {
            Err(RecvError::HandleWithoutFd { handle_type }) => {
                assert_eq!(handle_type, "net.Socket")
            }
            other => panic!("expected HandleWithoutFd, got {other:?}"),
        }
        assert_no_reply(&chan, &mut peer).await; // exactly one NACK

        // Node then retransmits it, this time with its descriptor: accepted.
        let (fd, watch) = probe();
        peer.send(&handle_line("net.Socket", json!({"x": 1})), &[fd.as_fd()])
            .await;
        drop(fd);
        assert!(peer.expect_frame(ACK).await.is_empty());
        let mut message = expect_value(&mut chan, json!({"x": 1})).await;
        let mut socket: std::os::unix::net::UnixStream =
            message.take_handle().unwrap().try_into().unwrap();
        socket.write_all(b"hi").unwrap();
        let mut got = [0u8; 2];
        (&watch).read_exact(&mut got).unwrap();
        assert_eq!(&got, b"hi");
        drop(socket);
        assert_peer_closed(&watch).await;

        assert_still_works(&mut chan, &mut peer).await;
        drop((chan, peer, watch));
        util::assert_fds_settle_to(&baseline).await;
    });
}

#[test]
fn fd_in_a_read_where_no_frame_starts_is_closed() {
    run(async {
        let baseline = util::open_fds();
        let (mut chan, mut peer) = raw_channel(ChannelConfig::default());

        // The start of a long line, read together with a complete message (so we know it was read).
        let head = format!("{{\"first\":1}}\n{{\"long\":\"{}", "a".repeat(1000));
        peer.write(head.as_bytes()).await;
        expect_value(&mut chan, json!({"first": 1})).await;
        // Middle bytes carry a descriptor: no frame starts in that read.
        let (fd, watch) = probe();
        peer.send(b"bbbb", &[fd.as_fd()]).await;
        drop(fd);
        peer.write(b"\"}\n").await;
        match next(&mut chan).await {
            Err(RecvError::Frame(FrameError::StrayFds {
                count: 1,
                reason: StrayReason::NoFrame,
            })) => {}
            other => panic!("expected StrayFds NoFrame, got {other:?}"),
        }
        let message = expect_value(
            &mut chan,
            json!({"long": format!("{}bbbb", "a".repeat(1000))}),
        )
        .await;
        assert!(message.handle().is_none());
        assert_peer_closed(&watch).await;

        assert_still_works(&mut chan, &mut peer).await;
        drop((chan, peer, watch));
        util::assert_fds_settle_to(&baseline).await;
    });
}

#[test]
fn fd_on_a_plain_message_is_closed() {
    run(async {
        let baseline = util::open_fds();
        let (mut chan, mut peer) = raw_channel(ChannelConfig::default());

        let (fd, watch) = probe();
        peer.send(b"{\"plain\":1}\n", &[fd.as_fd()]).await;
        drop(fd);
        let message = expect_value(&mut chan, json!({"plain": 1})).await;
        assert!(message.handle().is_none());
        match next(&mut chan).await {
            Err(RecvError::Frame(FrameError::StrayFds {
                count: 1,
                reason: StrayReason::NotAHandle,
            })) => {}
            other => panic!("expected StrayFds NotAHandle, got {other:?}"),
        }
        assert_peer_closed(&watch).await;
        assert_no_reply(&chan, &mut peer).await;

        // Unlike Node, the stray descriptor is not handed to the next NODE_HANDLE that lacks one.
        peer.write(&handle_line("net.Socket", json!({"later": true})))
            .await;
        assert!(peer.expect_frame(NACK).await.is_empty());
        assert!(matches!(
            next(&mut chan).await,
            Err(RecvError::HandleWithoutFd { .. })
        ));

        assert_still_works(&mut chan, &mut peer).await;
        drop((chan, peer, watch));
        util::assert_fds_settle_to(&baseline).await;
    });
}

async fn several_fds_on_one_handle(count: usize) {
    let baseline = util::open_fds();
    let (mut chan, mut peer) = raw_channel(ChannelConfig::default());

    let probes: Vec<_> = (0..count).map(|_| probe()).collect();
    let fds: Vec<BorrowedFd<'_>> = probes.iter().map(|(fd, _)| fd.as_fd()).collect();
    peer.send(&handle_line("net.Socket", json!({"n": count})), &fds)
        .await;
    drop(fds);
    let watches: Vec<_> = probes
        .into_iter()
        .map(|(fd, watch)| {
            drop(fd);
            watch
        })
        .collect();

    assert!(peer.expect_frame(ACK).await.is_empty());
    let mut message = expect_value(&mut chan, json!({"n": count})).await;
    match next(&mut chan).await {
        Err(RecvError::Frame(FrameError::StrayFds {
            count: c,
            reason: StrayReason::Surplus,
        })) => {
            assert_eq!(c, count - 1)
        }
        other => panic!("expected StrayFds Surplus, got {other:?}"),
    }
    for watch in &watches[1..] {
        assert_peer_closed(watch).await;
    }
    // The first descriptor is the one delivered.
    let handle = message.take_handle().unwrap();
    assert_eq!(handle.handle_type(), HandleType::NetSocket);
    let mut socket: std::os::unix::net::UnixStream = handle.try_into().unwrap();
    socket.write_all(b"first").unwrap();
    let mut got = [0u8; 5];
    (&watches[0]).read_exact(&mut got).unwrap();
    assert_eq!(&got, b"first");
    drop(socket);
    assert_peer_closed(&watches[0]).await;

    assert_no_reply(&chan, &mut peer).await; // exactly one ACK
    assert_still_works(&mut chan, &mut peer).await;
    drop((chan, peer, watches));
    util::assert_fds_settle_to(&baseline).await;
}

#[test]
fn several_fds_on_one_handle_first_is_delivered_rest_closed() {
    run(async {
        several_fds_on_one_handle(3).await;
        // The most one sendmsg can carry (SCM_MAX_FD): no MSG_CTRUNC, all but one closed.
        several_fds_on_one_handle(253).await;
    });
}

#[test]
fn unknown_handle_type_is_acked_rejected_and_closed() {
    run(async {
        let baseline = util::open_fds();
        let (mut chan, mut peer) = raw_channel(ChannelConfig::default());

        let (fd, watch) = probe();
        peer.send(&handle_line("net.Bogus", json!({"b": 1})), &[fd.as_fd()])
            .await;
        drop(fd);
        assert!(peer.expect_frame(ACK).await.is_empty());
        match next(&mut chan).await {
            Err(RecvError::HandleRejected {
                message,
                handle_type,
                reason,
            }) => {
                assert_eq!(handle_type, "net.Bogus");
                assert_eq!(message, r#"{"b":1}"#);
                assert!(!reason.is_empty());
            }
            other => panic!("expected HandleRejected, got {other:?}"),
        }
        assert_peer_closed(&watch).await;
        assert_no_reply(&chan, &mut peer).await;

        // An envelope that is not of the expected shape (type is a number): ACKed, rejected, closed.
        let (fd, watch2) = probe();
        peer.send(
            b"{\"cmd\":\"NODE_HANDLE\",\"type\":5,\"msg\":1}\n",
            &[fd.as_fd()],
        )
        .await;
        drop(fd);
        assert!(peer.expect_frame(ACK).await.is_empty());
        assert!(matches!(
            next(&mut chan).await,
            Err(RecvError::HandleRejected { .. })
        ));
        assert_peer_closed(&watch2).await;

        assert_still_works(&mut chan, &mut peer).await;
        drop((chan, peer, watch, watch2));
        util::assert_fds_settle_to(&baseline).await;
    });
}

/// Sends `fd` as `line` and expects an ACK, a `HandleRejected` naming `handle_type`, and the
/// descriptor closed.
async fn expect_rejected(
    chan: &mut Channel,
    peer: &mut RawPeer,
    line: &[u8],
    handle_type: &str,
    fd: OwnedFd,
) {
    let id = file_id(&fd);
    peer.send(line, &[fd.as_fd()]).await;
    drop(fd);
    assert!(peer.expect_frame(ACK).await.is_empty());
    match next(chan).await {
        Err(RecvError::HandleRejected {
            handle_type: t,
            reason,
            ..
        }) => {
            assert_eq!(t, handle_type, "{reason}");
        }
        other => panic!("expected HandleRejected for {handle_type}, got {other:?}"),
    }
    wait_copies(id, 0).await;
    assert_no_reply(chan, peer).await;
}

#[test]
fn descriptor_of_the_wrong_kind_is_acked_rejected_and_closed() {
    run(async {
        let baseline = util::open_fds();
        let (mut chan, mut peer) = raw_channel(ChannelConfig::default());

        // UDP labelled net.Socket.
        let udp = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let line = handle_line("net.Socket", json!({"k": 1}));
        expect_rejected(&mut chan, &mut peer, &line, "net.Socket", udp.into()).await;

        // A connected TCP stream labelled dgram.Socket.
        let (client, server) = tcp_pair();
        let line = format!(
            "{}\n",
            json!({"cmd": "NODE_HANDLE", "type": "dgram.Socket", "msg": {"k": 2}, "dgramType": "udp4"})
        );
        expect_rejected(
            &mut chan,
            &mut peer,
            line.as_bytes(),
            "dgram.Socket",
            server.into(),
        )
        .await;
        let mut rest = Vec::new();
        client.set_read_timeout(Some(util::STEP)).unwrap();
        (&client).read_to_end(&mut rest).unwrap(); // EOF: the only copy of the server side is gone
        assert!(rest.is_empty());

        // A regular file labelled net.Socket (a Node receiver aborts on it).
        let line = handle_line("net.Socket", json!({"k": 3}));
        expect_rejected(&mut chan, &mut peer, &line, "net.Socket", regular_file()).await;

        // A listening socket labelled net.Socket, and an AF_UNIX datagram socket labelled net.Native.
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        expect_rejected(&mut chan, &mut peer, &line, "net.Socket", listener.into()).await;
        let (datagram, _other) = std::os::unix::net::UnixDatagram::pair().unwrap();
        let line = handle_line("net.Native", json!({"k": 4}));
        expect_rejected(&mut chan, &mut peer, &line, "net.Native", datagram.into()).await;

        assert_still_works(&mut chan, &mut peer).await;
        drop((chan, peer, client, _other));
        util::assert_fds_settle_to(&baseline).await;
    });
}

#[test]
fn regular_file_or_tty_is_never_sent() {
    run(async {
        let baseline = util::open_fds();
        let (mut chan, mut peer) = raw_channel(ChannelConfig::default());

        type Open = fn() -> Option<OwnedFd>;
        let mut victims: Vec<(&str, Open)> = vec![
            ("regular file", || Some(regular_file())),
            ("/dev/null", || {
                std::fs::File::open("/dev/null").ok().map(OwnedFd::from)
            }),
        ];
        // A netlink socket whose protocol number is TCP's (NETLINK_XFRM = 6): not a TCP socket.
        victims.push(("netlink socket of protocol 6", || {
            let six = rustix::net::Protocol::from_raw(rustix::net::RawProtocol::new(6).unwrap());
            rustix::net::socket(rustix::net::AddressFamily::NETLINK, rustix::net::SocketType::RAW, Some(six)).ok()
        }));
        // A terminal, if this machine lets us open one.
        victims.push(("tty", || {
            std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open("/dev/ptmx")
                .ok()
                .map(OwnedFd::from)
        }));

        for (what, open) in victims {
            let Some(fd) = open() else {
                eprintln!("cannot open a {what}: skipped");
                continue;
            };
            let id = file_id(&fd);
            // /dev/null may be our stdin, and every /dev/ptmx open is the same inode: count
            // relative to what was open before.
            let others = copies(id) - 1;
            drop(fd);

            for handle_type in [
                HandleType::NetSocket,
                HandleType::NetServer,
                HandleType::NetNative,
                HandleType::DgramSocket,
                HandleType::DgramNative,
            ] {
                let fd = open().unwrap();
                let id = file_id(&fd);
                match chan
                    .send_handle(&json!({"what": what}), RawHandle::new(handle_type, fd))
                    .await
                {
                    Err(SendHandleError {
                        error:
                            SendError::Handle(HandleError::KindMismatch {
                                handle_type: t,
                                kind: FdKind::Other,
                            }),
                        handle,
                    }) => {
                        assert_eq!(t, handle_type);
                        // Refused, and given back open, not closed behind our back.
                        assert_eq!(file_id(&handle), id);
                        assert_eq!(handle.handle_type(), handle_type);
                        drop(handle);
                    }
                    other => panic!("sending a {what} as {handle_type}: {other:?}"),
                }
                wait_copies(id, others).await;
            }
            // Nothing was written: the next thing on the wire is a marker.
            assert_no_reply(&chan, &mut peer).await;
        }

        assert_still_works(&mut chan, &mut peer).await;
        drop((chan, peer));
        util::assert_fds_settle_to(&baseline).await;
    });
}

#[test]
fn socket_types_wrapping_a_file_are_never_sent() {
    run(async {
        let baseline = util::open_fds();
        let (chan, mut peer) = raw_channel(ChannelConfig::default());

        // `From<OwnedFd>` is safe, so a "TcpStream" (or "UdpSocket") can hold any descriptor.
        let fake = std::net::TcpStream::from(regular_file());
        let result = chan.sender().queue_handle(&"keep", KeepOpen(&fake)).await;
        assert!(
            matches!(
                result,
                Err(SendHandleError { error: SendError::Handle(HandleError::KindMismatch { .. }), handle: () })
            ),
            "a regular file was queued as net.Socket via KeepOpen(&TcpStream): {result:?}"
        );
        let fake_id = file_id(&fake);
        let result = chan.sender().queue_handle(&"moved", fake).await;
        match result {
            Err(SendHandleError { error: SendError::Handle(HandleError::KindMismatch { .. }), handle }) => {
                assert_eq!(file_id(&handle), fake_id, "the TcpStream is given back");
            }
            other => panic!("a regular file was queued as net.Socket via TcpStream: {other:?}"),
        }
        let fake = std::net::UdpSocket::from(regular_file());
        let result = chan.sender().queue_handle(&"udp", fake).await;
        assert!(
            matches!(
                result,
                Err(SendHandleError { error: SendError::Handle(HandleError::KindMismatch { .. }), .. })
            ),
            "a regular file was queued as dgram.Socket via UdpSocket: {result:?}"
        );
        drop(result); // the UdpSocket, given back
        assert_no_reply(&chan, &mut peer).await;
        drop((chan, peer));
        util::assert_fds_settle_to(&baseline).await;
    });
}

#[test]
fn node_double_wrapped_retransmission_gets_one_ack() {
    run(async {
        let baseline = util::open_fds();
        let (mut chan, mut peer) = raw_channel(ChannelConfig::default());

        let (client, server) = tcp_pair();
        let server_id = file_id(&server);
        let line = br#"{"cmd":"NODE_HANDLE","type":"net.Native","msg":{"cmd":"NODE_HANDLE","type":"net.Socket","msg":{"a":1}}}"#;
        let mut line = line.to_vec();
        line.push(b'\n');
        peer.send(&line, &[server.as_fd()]).await;
        drop(server);

        assert!(peer.expect_frame(ACK).await.is_empty());
        let mut message = expect_value(&mut chan, json!({"a": 1})).await;
        assert_eq!(message.json(), r#"{"a":1}"#);
        let handle = message.take_handle().unwrap();
        assert_eq!(handle.handle_type(), HandleType::NetSocket);
        assert_eq!(handle.kind(), FdKind::TcpStream);
        assert_eq!(file_id(&handle), server_id);
        assert_no_reply(&chan, &mut peer).await; // one ACK, not two

        let mut socket: std::net::TcpStream = handle.try_into().unwrap();
        socket.write_all(b"via retransmission").unwrap();
        drop(socket);
        let mut text = String::new();
        client.set_read_timeout(Some(util::STEP)).unwrap();
        (&client).read_to_string(&mut text).unwrap();
        assert_eq!(text, "via retransmission");

        assert_still_works(&mut chan, &mut peer).await;
        drop((chan, peer, client));
        util::assert_fds_settle_to(&baseline).await;
    });
}

#[test]
fn unsolicited_ack_and_nack_are_reported_and_not_answered() {
    run(async {
        let baseline = util::open_fds();
        let (mut chan, mut peer) = raw_channel(ChannelConfig::default());

        peer.write(ACK).await;
        match next(&mut chan).await {
            Err(RecvError::UnexpectedAck { cmd }) => assert_eq!(cmd, "NODE_HANDLE_ACK"),
            other => panic!("expected UnexpectedAck, got {other:?}"),
        }
        assert_no_reply(&chan, &mut peer).await;
        peer.write(NACK).await;
        match next(&mut chan).await {
            Err(RecvError::UnexpectedAck { cmd }) => assert_eq!(cmd, "NODE_HANDLE_NACK"),
            other => panic!("expected UnexpectedAck, got {other:?}"),
        }
        assert_no_reply(&chan, &mut peer).await;

        // Handles still work afterwards, in both directions.
        let (client, server) = tcp_pair();
        let delivery = chan.sender().queue_handle(&"after", server).await.unwrap();
        let (line, fds) = peer.frame().await;
        assert_eq!(
            line,
            b"{\"cmd\":\"NODE_HANDLE\",\"type\":\"net.Socket\",\"msg\":\"after\"}\n"
        );
        assert_eq!(fds.len(), 1);
        peer.write(ACK).await;
        util::within("delivery", delivery).await.unwrap();

        assert_still_works(&mut chan, &mut peer).await;
        drop((chan, peer, client, fds));
        util::assert_fds_settle_to(&baseline).await;
    });
}

// ---------------------------------------------------------------------------------------------
// The peer goes away
// ---------------------------------------------------------------------------------------------

#[test]
fn peer_closing_mid_frame_reports_truncated() {
    run(async {
        let baseline = util::open_fds();

        let (mut chan, peer) = raw_channel(ChannelConfig::default());
        peer.write(b"{\"whole\":1}\n{\"half\":").await;
        drop(peer);
        expect_value(&mut chan, json!({"whole": 1})).await;
        match next(&mut chan).await {
            Err(RecvError::Frame(FrameError::Truncated { len: 8 })) => {}
            other => panic!("expected Truncated, got {other:?}"),
        }
        assert!(util::within("end of stream", chan.recv()).await.is_none());
        assert!(!chan.is_connected());
        assert!(matches!(chan.send(&1).await, Err(SendError::Closed)));
        drop(chan);

        // With a descriptor attached to the partial frame.
        let (mut chan, peer) = raw_channel(ChannelConfig::default());
        let (fd, watch) = probe();
        peer.send(
            br#"{"cmd":"NODE_HANDLE","type":"net.Socket","msg":"#,
            &[fd.as_fd()],
        )
        .await;
        drop(fd);
        drop(peer);
        let mut errors = Vec::new();
        while let Some(item) = util::within("the receive stream", chan.recv()).await {
            match item {
                Err(RecvError::Frame(e)) => errors.push(e),
                other => panic!("expected only frame errors, got {other:?}"),
            }
        }
        assert_eq!(errors.len(), 2, "{errors:?}");
        assert!(
            errors.contains(&FrameError::Truncated { len: 47 }),
            "{errors:?}"
        );
        assert!(
            errors.contains(&FrameError::StrayFds {
                count: 1,
                reason: StrayReason::Truncated
            }),
            "{errors:?}"
        );
        assert_peer_closed(&watch).await;
        drop((chan, watch));

        util::assert_fds_settle_to(&baseline).await;
    });
}

#[test]
fn child_killed_while_handles_are_queued_gives_them_back() {
    run(async {
        let baseline = util::open_fds();

        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        // `sleep` inherits the channel on fd 3 and never reads it, so nothing is ever acknowledged.
        let mut child = handoff::Command::new("sleep")
            .arg("30")
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let mut clients = Vec::new();
        let mut ids = Vec::new();
        let mut deliveries = Vec::new();
        for i in 0..5 {
            let client = std::net::TcpStream::connect(addr).unwrap();
            let (server, _) = listener.accept().unwrap();
            ids.push(file_id(&server));
            deliveries.push(
                child
                    .sender()
                    .queue_handle(&json!({"n": i}), server)
                    .await
                    .unwrap(),
            );
            clients.push(client);
        }
        // Let the driver write the first handle (the others wait for its ACK).
        tokio::time::sleep(Duration::from_millis(100)).await;
        util::within("kill", child.kill()).await.unwrap();

        for (i, delivery) in deliveries.into_iter().enumerate() {
            match util::within("a delivery after the kill", delivery).await {
                Err(SendHandleError {
                    error: SendError::Disconnected { written },
                    handle: mut socket,
                }) => {
                    assert_eq!(written, i == 0, "handle {i}: written");
                    assert_eq!(file_id(&socket), ids[i]);
                    // Given back as the TcpStream it was sent as, still open and usable.
                    socket.write_all(format!("back {i}").as_bytes()).unwrap();
                    drop(socket);
                    let mut text = String::new();
                    clients[i].set_read_timeout(Some(util::STEP)).unwrap();
                    clients[i].read_to_string(&mut text).unwrap();
                    assert_eq!(text, format!("back {i}"));
                }
                other => panic!("handle {i}: expected Disconnected with the fd, got {other:?}"),
            }
        }
        // The receive stream ends (possibly after reporting ECONNRESET: sleep died with unread data).
        while let Some(item) = util::within("the child's receive stream", child.recv()).await {
            assert!(matches!(item, Err(RecvError::Io(_))), "{item:?}");
        }
        assert!(!child.is_connected());
        assert!(matches!(child.send(&"late").await, Err(SendError::Closed)));

        drop((child, clients, listener));
        util::assert_fds_settle_to(&baseline).await;
    });
}

// ---------------------------------------------------------------------------------------------
// Questionable behaviour
// ---------------------------------------------------------------------------------------------

#[test]
fn fd_with_a_handle_line_followed_by_more_lines_in_one_write() {
    run(async {
        let baseline = util::open_fds();
        let (mut chan, mut peer) = raw_channel(ChannelConfig::default());

        let (fd, watch) = probe();
        let mut bytes = handle_line("net.Socket", json!({"h": 1}));
        bytes.extend_from_slice(b"{\"plain\":2}\n");
        peer.send(&bytes, &[fd.as_fd()]).await;
        drop(fd);
        let (line, _) = peer.frame().await;
        assert_eq!(String::from_utf8_lossy(&line), String::from_utf8_lossy(ACK));
        let message = expect_value(&mut chan, json!({"h": 1})).await;
        assert!(message.handle().is_some());
        expect_value(&mut chan, json!({"plain": 2})).await;
        drop(message);
        assert_peer_closed(&watch).await;

        assert_still_works(&mut chan, &mut peer).await;
        drop((chan, peer, watch));
        util::assert_fds_settle_to(&baseline).await;
    });
}

#[test]
fn bad_lines_count_against_recv_buffer() {
    run(async {
        let baseline = util::open_fds();
        let (mut chan, peer) = raw_channel(ChannelConfig::default().recv_buffer(64 * 1024));

        // 32 MiB of malformed 1 KiB lines while nobody reads: the writer should stall.
        let mut line = vec![b'{'; 1023];
        line.push(b'\n');
        let chunk: Vec<u8> = line.iter().copied().cycle().take(1024 * 1024).collect();
        let writer = async {
            for _ in 0..32 {
                peer.write(&chunk).await;
            }
        };
        let stalled = tokio::time::timeout(Duration::from_secs(2), writer)
            .await
            .is_err();
        assert!(
            stalled,
            "handoff queued 32 Ki errors (32 MiB of input) for a receiver that does not read"
        );
        drop(peer);
        while chan.recv().await.is_some() {}
        drop(chan);
        util::assert_fds_settle_to(&baseline).await;
    });
}

#[test]
fn valid_lines_respect_recv_buffer() {
    // The contrast for the test above: valid messages do stall a flooding peer.
    run(async {
        let baseline = util::open_fds();
        let (mut chan, peer) = raw_channel(ChannelConfig::default().recv_buffer(64 * 1024));

        let mut line = format!("\"{}\"", "v".repeat(1021)).into_bytes();
        line.push(b'\n');
        let chunk: Vec<u8> = line.iter().copied().cycle().take(1024 * 1024).collect();
        let writer = async {
            for _ in 0..32 {
                peer.write(&chunk).await;
            }
        };
        let stalled = tokio::time::timeout(Duration::from_millis(500), writer)
            .await
            .is_err();
        assert!(stalled, "32 MiB accepted for a receiver that does not read");
        drop(peer);
        let mut count = 0;
        while let Some(item) = util::within("recv", chan.recv()).await {
            match item {
                Ok(_) => count += 1,
                // The writer was cancelled mid-line.
                Err(RecvError::Frame(FrameError::Truncated { .. })) => {}
                Err(e) => panic!("{e:?}"),
            }
        }
        assert!(count > 0);
        drop(chan);
        util::assert_fds_settle_to(&baseline).await;
    });
}

#[test]
fn peer_closing_with_unread_data_is_a_plain_disconnect() {
    run(async {
        let baseline = util::open_fds();
        let (mut chan, peer) = raw_channel(ChannelConfig::default());

        chan.send(&"never read").await.unwrap();
        util::within("flush", chan.sender().flush()).await.unwrap();
        drop(peer);
        let item = util::within("recv", chan.recv()).await;
        assert!(
            item.is_none(),
            "expected the stream to end quietly, got {item:?}"
        );

        drop(chan);
        util::assert_fds_settle_to(&baseline).await;
    });
}
