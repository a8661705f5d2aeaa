//! The channel API between two in-process ends: typed messages, reserved commands, internal
//! observers, ordering, large messages, disconnect and drop, and where received handles go when
//! nobody takes them.

mod util;

use handoff::channel::InternalMessage;
use handoff::{Channel, ChannelConfig, RecvError, SendError};
use serde::{Deserialize, Serialize};
use serde_json::json;

#[derive(Debug, Serialize, Deserialize, PartialEq)]
struct Job {
    id: u32,
    name: String,
    tags: Vec<String>,
}

#[test]
fn typed_messages_round_trip() {
    util::serial_test(async {
        let (a, mut b) = Channel::pair().unwrap();
        let job = Job { id: 7, name: "é😀".into(), tags: vec!["x".into()] };
        a.send(&job).await.unwrap();
        let (got, handle) = util::within("job", b.recv_as::<Job>()).await.unwrap().unwrap();
        assert_eq!(got, job);
        assert!(handle.is_none());
    })
}

#[test]
fn a_message_of_the_wrong_shape_is_returned_whole_with_its_handle() {
    util::serial_test(async {
        let baseline = util::open_fds();
        let (a, mut b) = Channel::pair().unwrap();
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        a.send_handle(&json!({"not": "a job"}), listener).await.unwrap();
        match util::within("message", b.recv_as::<Job>()).await.unwrap() {
            Err(RecvError::Deserialize { mut message, .. }) => {
                assert_eq!(message.value().unwrap(), json!({"not": "a job"}));
                let listener: std::net::TcpListener = message.take_handle().unwrap().try_into().unwrap();
                assert!(listener.local_addr().is_ok());
            }
            other => panic!("expected a Deserialize error, got {other:?}"),
        }
        drop((a, b));
        util::assert_fds_settle_to(&baseline).await;
    })
}

#[test]
fn internal_commands_are_refused_or_observed_never_delivered() {
    util::serial_test(async {
        let (a, mut b) = Channel::pair().unwrap();
        for reserved in [json!({"cmd": "NODE_HANDLE_ACK"}), json!({"cmd": "NODE_X", "a": 1})] {
            match a.send(&reserved).await {
                Err(SendError::Reserved { cmd }) => assert_eq!(cmd, reserved["cmd"]),
                other => panic!("expected Reserved, got {other:?}"),
            }
        }
        // Only unmanaged internal commands may be sent explicitly.
        for refused in [json!({"cmd": "NODE_HANDLE_ACK"}), json!({"cmd": "NODE_SOCKET_COUNT"}), json!({"cmd": "user"})] {
            assert!(matches!(a.sender().send_internal(&refused).await, Err(SendError::Reserved { .. })));
        }
        let mut observer = b.sender().internal_messages();
        a.sender().send_internal(&json!({"cmd": "NODE_CUSTOM", "x": 1})).await.unwrap();
        // Look-alikes are ordinary messages (Node's rule: prefix NODE_ and longer than 5).
        for ordinary in [json!({"cmd": "NODE_"}), json!({"cmd": "fooNODE_"}), json!({"cmd": 5}), json!({"x": {"cmd": "NODE_Y"}})] {
            a.send(&ordinary).await.unwrap();
            let got = util::within("message", b.recv()).await.unwrap().unwrap();
            assert_eq!(got.value().unwrap(), ordinary);
        }
        let seen: InternalMessage = util::within("observer", observer.recv()).await.unwrap();
        assert_eq!(seen.value().unwrap(), json!({"cmd": "NODE_CUSTOM", "x": 1}));
        assert!(!seen.had_fd());
    })
}

#[test]
fn order_is_kept_across_sender_clones_and_large_messages() {
    util::serial_test(async {
        let (a, mut b) = Channel::pair().unwrap();
        let big = "x".repeat(32 * 1024 * 1024);
        let sender = a.sender().clone();
        let writer = tokio::spawn(async move {
            for i in 0..1000u32 {
                sender.send(&json!({"i": i})).await.unwrap();
                if i == 500 {
                    sender.send(&big).await.unwrap();
                }
            }
        });
        for i in 0..1000u32 {
            let got = util::within("message", b.recv()).await.unwrap().unwrap();
            assert_eq!(got.value().unwrap(), json!({"i": i}));
            if i == 500 {
                let got = util::within("big message", b.recv()).await.unwrap().unwrap();
                assert_eq!(got.json().len(), 32 * 1024 * 1024 + 2);
            }
        }
        writer.await.unwrap();
    })
}

#[test]
fn disconnect_ends_both_sides_and_later_sends_fail() {
    util::serial_test(async {
        let baseline = util::open_fds();
        let (a, mut b) = Channel::pair().unwrap();
        a.send(&"last words").await.unwrap();
        a.disconnect();
        a.disconnect(); // a second call does nothing
        assert!(!a.is_connected());
        assert!(matches!(a.send(&"too late").await, Err(SendError::Closed)));
        // What was queued before disconnect() still arrives, then the stream ends.
        let got = util::within("last words", b.recv()).await.unwrap().unwrap();
        assert_eq!(got.value().unwrap(), "last words");
        assert!(util::within("end", b.recv()).await.is_none());
        util::within("b closed", b.sender().closed()).await;
        assert!(!b.is_connected());
        assert!(matches!(b.send(&"anyone?").await, Err(SendError::Closed)));
        util::within("a closed", a.sender().closed()).await;
        drop((a, b));
        util::assert_fds_settle_to(&baseline).await;
    })
}

#[test]
fn dropping_a_channel_closes_it_after_writing_what_was_queued() {
    util::serial_test(async {
        let (a, mut b) = Channel::pair().unwrap();
        for i in 0..100 {
            a.send(&i).await.unwrap();
        }
        drop(a);
        for i in 0..100 {
            let got = util::within("message", b.recv()).await.unwrap().unwrap();
            assert_eq!(got.value().unwrap(), i);
        }
        assert!(util::within("end", b.recv()).await.is_none());
    })
}

#[test]
fn handles_nobody_reads_are_closed_with_the_channel() {
    util::serial_test(async {
        let baseline = util::open_fds();
        let (a, b) = Channel::pair().unwrap();
        let (sender_b, receiver_b) = b.split();
        drop(receiver_b); // nobody reads b: its handles must be closed, not kept
        for _ in 0..50 {
            let socket = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
            a.send_handle(&"udp", socket).await.unwrap();
        }
        // b still acknowledges (its driver runs while its sender lives)...
        a.send(&"still alive").await.unwrap();
        a.sender().flush().await.unwrap();
        drop(sender_b);
        drop(a);
        util::assert_fds_settle_to(&baseline).await;
    })
}

#[test]
fn flush_waits_for_the_bytes_to_be_written() {
    util::serial_test(async {
        let (a, mut b) = Channel::pair_with_config(ChannelConfig::default().send_buffer(1024)).unwrap();
        let payload = "y".repeat(100_000);
        a.send(&payload).await.unwrap();
        let reader = tokio::spawn(async move { b.recv().await.unwrap().unwrap().json().len() });
        util::within("flush", a.sender().flush()).await.unwrap();
        assert_eq!(reader.await.unwrap(), 100_002);
    })
}

#[test]
fn a_handle_message_with_a_reserved_cmd_is_refused_before_the_wire() {
    util::serial_test(async {
        let baseline = util::open_fds();
        let (a, mut b) = Channel::pair().unwrap();
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        // A Node receiver would treat this `msg` as an unsolicited ACK and die.
        match a.send_handle(&json!({"cmd": "NODE_HANDLE_ACK"}), listener).await {
            Err(handoff::SendHandleError { error: SendError::Reserved { cmd }, handle }) => {
                assert_eq!(cmd, "NODE_HANDLE_ACK");
                handle.set_nonblocking(true).unwrap(); // given back
            }
            other => panic!("expected Reserved, got {other:?}"),
        }
        a.send(&"after").await.unwrap();
        let next = util::within("message", b.recv()).await.unwrap().unwrap();
        assert_eq!(next.value().unwrap(), "after", "nothing else reached the wire");
        drop((a, b));
        util::assert_fds_settle_to(&baseline).await;
    })
}

#[test]
fn raw_json_values_are_sent_as_one_canonical_line() {
    util::serial_test(async {
        use serde_json::value::RawValue;
        let (a, mut b) = Channel::pair().unwrap();
        // Pretty-printed raw JSON: its newlines must not end the line early.
        let pretty = RawValue::from_string("{\n  \"a\": [1,\n 2]\n}".to_owned()).unwrap();
        a.send(&pretty).await.unwrap();
        a.send(&json!({"wrapped": pretty})).await.unwrap();
        for expected in [json!({"a": [1, 2]}), json!({"wrapped": {"a": [1, 2]}})] {
            let got = util::within("message", b.recv()).await.unwrap().unwrap();
            assert_eq!(got.value().unwrap(), expected);
            assert!(!got.json().contains('\n'));
        }
        // A reserved command hidden by spacing or escapes in raw text is still seen.
        for disguised in [r#"{"cmd" : "NODE_HANDLE_ACK"}"#, r#"{"cmd":"NODE\u005fHANDLE_ACK"}"#] {
            let raw = RawValue::from_string(disguised.to_owned()).unwrap();
            assert!(matches!(a.send(&raw).await, Err(SendError::Reserved { .. })), "{disguised}");
        }
    })
}

#[test]
fn dropping_a_full_receiver_does_not_stop_acknowledgements() {
    util::serial_test(async {
        let baseline = util::open_fds();
        let config = ChannelConfig::default().recv_buffer(1024);
        let (a, b) = Channel::pair_with_config(config).unwrap();
        let (b_sender, b_receiver) = b.split();
        // Fill b's receive queue past its limit, then drop the receiver unread.
        for i in 0..100 {
            a.send(&json!({"i": i, "pad": "x".repeat(100)})).await.unwrap();
        }
        a.sender().flush().await.unwrap();
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        drop(b_receiver);
        // b must still read, acknowledge handles, and see the end of the channel.
        let socket = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        util::within("the ACK", a.send_handle(&"udp", socket)).await.unwrap();
        a.disconnect();
        util::within("b closed", b_sender.closed()).await;
        drop((a, b_sender));
        util::assert_fds_settle_to(&baseline).await;
    })
}

/// What cannot be JSON is refused before anything is queued: a map whose keys are not strings,
/// and a value whose `Serialize` fails. The channel goes on.
#[test]
fn values_that_cannot_be_serialized_are_refused() {
    util::serial_test(async {
        let (a, mut b) = Channel::pair().unwrap();
        let mut by_pair = std::collections::BTreeMap::new();
        by_pair.insert((1, 2), "tuple keys");
        match a.send(&by_pair).await {
            Err(SendError::Serialize(e)) => assert!(e.to_string().contains("key must be a string"), "{e}"),
            other => panic!("expected Serialize, got {other:?}"),
        }

        struct Fails;
        impl serde::Serialize for Fails {
            fn serialize<S: serde::Serializer>(&self, _: S) -> Result<S::Ok, S::Error> {
                Err(serde::ser::Error::custom("this value refuses"))
            }
        }
        match a.send(&Fails).await {
            Err(SendError::Serialize(e)) => assert!(e.to_string().contains("this value refuses"), "{e}"),
            other => panic!("expected Serialize, got {other:?}"),
        }
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        match a.send_handle(&Fails, handoff::handle::KeepOpen(&listener)).await {
            Err(handoff::SendHandleError { error: SendError::Serialize(_), handle: () }) => {}
            other => panic!("expected Serialize, got {other:?}"),
        }

        a.send(&"still fine").await.unwrap();
        let got = util::within("message", b.recv()).await.unwrap().unwrap();
        assert_eq!(got.json(), "\"still fine\"");
    })
}

/// Received handles convert with the standard traits; one that does not fit comes back in the
/// error, untouched, and converts into what it is.
#[test]
fn received_handles_convert_with_try_from() {
    util::serial_test(async {
        let (a, mut b) = Channel::pair().unwrap();
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        a.send_handle(&"server", listener).await.unwrap();
        let handle = util::within("message", b.recv()).await.unwrap().unwrap().take_handle().unwrap();
        let error = std::net::TcpStream::try_from(handle).unwrap_err();
        assert!(error.to_string().contains("TcpStream"), "{error}");
        let handle = error.into_handle().expect("given back");
        let listener = tokio::net::TcpListener::try_from(handle).unwrap();
        assert_eq!(listener.local_addr().unwrap(), addr);
        let (socket, _) = tokio::join!(listener.accept(), tokio::net::TcpStream::connect(addr));
        socket.unwrap();
    })
}

/// `EPOLLOUT`: a channel socket polled for it is woken each time the peer reads a message.
const EPOLLOUT: u32 = 0x4;

/// A channel waits for writability only while a write waits for room: an idle or flowing
/// channel is not woken each time the peer reads one of its messages (a context switch per
/// handle in the seed pipeline), and a flooded one still finishes its writes.
#[test]
fn a_channel_is_polled_for_writing_only_while_a_write_waits() {
    use std::os::fd::{AsRawFd, OwnedFd};
    util::serial_test(async {
        let (ours, theirs) = std::os::unix::net::UnixStream::pair().unwrap();
        let raw = ours.as_raw_fd();
        let a = Channel::from_fd(OwnedFd::from(ours)).unwrap();
        let mut b = Channel::from_fd(OwnedFd::from(theirs)).unwrap();
        a.send(&"hello").await.unwrap();
        assert_eq!(util::within("hello", b.recv_as::<String>()).await.unwrap().unwrap().0, "hello");
        let masks = util::epoll_registrations(raw);
        assert_eq!(masks.len(), 1, "registered once: {masks:x?}");
        assert_eq!(masks[0] & EPOLLOUT, 0, "polled for writing while idle: {:x}", masks[0]);

        // Fill the socket while nobody reads: a write waits, and is polled for.
        let big = "x".repeat(1 << 20);
        let sending = tokio::spawn({
            let a = a.sender().clone();
            let big = big.clone();
            async move {
                for _ in 0..4 {
                    a.send(&big).await.unwrap();
                }
                a.flush().await.unwrap();
            }
        });
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(5);
        while util::epoll_registrations(raw).len() < 2 {
            assert!(tokio::time::Instant::now() < deadline, "a blocked write never waited for room");
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
        for _ in 0..4 {
            assert_eq!(util::within("big", b.recv_as::<String>()).await.unwrap().unwrap().0.len(), big.len());
        }
        util::within("flush", sending).await.unwrap();
        // Everything written: no longer polled for writing.
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(5);
        while util::epoll_registrations(raw).iter().any(|m| m & EPOLLOUT != 0) {
            assert!(tokio::time::Instant::now() < deadline, "still polled for writing once idle");
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
    })
}

/// Minor page faults of this process so far (`/proc/self/stat`, field 10).
fn minor_faults() -> u64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap();
    // The command name (field 2) may hold spaces: count from the closing parenthesis.
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    rest.split_whitespace().nth(7).unwrap().parse().unwrap()
}

/// Messages above glibc's largest mmap threshold (32 MiB) reuse the buffers of the previous ones
/// on both sides, instead of faulting fresh pages in for every one (three times per message:
/// encoding, receiving, and again after each free).
#[test]
fn large_messages_reuse_their_buffers() {
    const SIZE: usize = 40 << 20;
    const PAGES: u64 = (SIZE / 4096) as u64;
    util::serial_test(async {
        let (a, mut b) = Channel::pair().unwrap();
        let body = "x".repeat(SIZE - 2); // a JSON string of SIZE bytes
        let mut faults = Vec::new();
        for _ in 0..6 {
            let before = minor_faults();
            let (sent, received) = tokio::join!(a.send(body.as_str()), b.recv());
            sent.unwrap();
            let message = received.unwrap().unwrap();
            assert_eq!(message.json().len(), SIZE);
            drop(message);
            faults.push(minor_faults() - before);
        }
        // The first messages fault their buffers in; later ones find them kept.
        let steady = faults[3..].iter().max().unwrap();
        assert!(*steady < PAGES / 4, "page faults per {SIZE}-byte message: {faults:?} ({PAGES} pages)");
    })
}
