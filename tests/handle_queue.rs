//! The handle acknowledgement queue, seen on the wire: a raw socket under the test's control
//! plays the peer, reads exactly what handoff writes (bytes and attached descriptors), and answers
//! `NODE_HANDLE_ACK` / `NODE_HANDLE_NACK` when the test says so.
//!
//! Every test counts descriptors, so each one runs through [`run`], which takes `util::serial()`
//! *before* building its tokio runtime: with `#[tokio::test]` the runtime of the next test (its
//! epoll, eventfd and signal-socket descriptors) is built on another thread while this test holds
//! the lock, and shows up as a "leak" in the exact descriptor-set comparison.

mod util;

use util::raw_peer::*;
use util::serial_test as run;

use std::collections::VecDeque;
use std::future::Future;
use std::io::{self, Read, Write};
use std::os::fd::AsFd;
use std::time::Duration;

use handoff::handle::{FdKind, HandleType, KeepOpen, RawHandle};
use handoff::{Channel, ChannelConfig, SendError, SendHandleError};
use serde_json::json;

// ---------------------------------------------------------------------------------------------
// The raw peer
// ---------------------------------------------------------------------------------------------

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

async fn assert_pending<F: Future + Unpin>(future: &mut F, what: &str)
where
    F::Output: std::fmt::Debug,
{
    if let Ok(output) = tokio::time::timeout(Duration::from_millis(20), future).await {
        panic!("{what} resolved too early: {output:?}");
    }
}

/// The envelope handoff writes for a `net.Socket` carrying `msg`.
fn socket_frame(msg: serde_json::Value) -> Vec<u8> {
    format!("{{\"cmd\":\"NODE_HANDLE\",\"type\":\"net.Socket\",\"msg\":{msg}}}\n").into_bytes()
}

/// Whether the client side of a TCP connection has seen EOF (without waiting).
fn client_saw_eof(client: &std::net::TcpStream) -> bool {
    client.set_nonblocking(true).unwrap();
    let mut byte = [0u8; 1];
    let eof = match (&*client).read(&mut byte) {
        Ok(0) => true,
        Ok(_) => panic!("unexpected data on the client"),
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => false,
        Err(e) => panic!("client read failed: {e}"),
    };
    client.set_nonblocking(false).unwrap();
    eof
}

/// Reads everything until the server side is closed everywhere.
fn client_read_to_end(client: &std::net::TcpStream) -> String {
    client.set_read_timeout(Some(util::STEP)).unwrap();
    let mut text = String::new();
    (&*client).read_to_string(&mut text).unwrap();
    text
}

/// Reads exactly `expected.len()` bytes from the client and compares.
fn client_expect(client: &std::net::TcpStream, expected: &str) {
    client.set_read_timeout(Some(util::STEP)).unwrap();
    let mut got = vec![0u8; expected.len()];
    (&*client).read_exact(&mut got).unwrap();
    assert_eq!(String::from_utf8_lossy(&got), expected);
}

// ---------------------------------------------------------------------------------------------
// Node's rule: one handle at a time, everything else behind it
// ---------------------------------------------------------------------------------------------

#[test]
fn window_1_holds_everything_behind_an_unacknowledged_handle() {
    run(async {
        let baseline = util::open_fds();
        let (chan, mut peer) = raw_channel(ChannelConfig::default());

        let (client, server) = tcp_pair();
        let id = file_id(&server);
        let (client2, server2) = tcp_pair();
        let id2 = file_id(&server2);
        let mut first = chan
            .sender()
            .queue_handle(&json!({"h": 1}), server)
            .await
            .unwrap();
        chan.send(&"p1").await.unwrap();
        chan.send(&"p2").await.unwrap();
        let mut second = chan
            .sender()
            .queue_handle(&json!({"h": 2}), server2)
            .await
            .unwrap();
        chan.send(&"p3").await.unwrap();

        // Only the handle frame, with its one descriptor, until the peer answers.
        let fds = peer.expect_frame(&socket_frame(json!({"h": 1}))).await;
        assert_eq!(fds.len(), 1);
        assert_eq!(file_id(&fds[0]), id);
        peer.assert_silent(Duration::from_millis(200)).await;
        assert_pending(&mut first, "the first delivery").await;
        // The sender's copy is still open (ours plus the one the peer received)...
        assert_eq!(copies(id), 2);
        assert!(!client_saw_eof(&client));

        peer.write(ACK).await;
        util::within("the first delivery", &mut first)
            .await
            .unwrap();
        assert!(peer.expect_frame(b"\"p1\"\n").await.is_empty());
        assert!(peer.expect_frame(b"\"p2\"\n").await.is_empty());
        let fds2 = peer.expect_frame(&socket_frame(json!({"h": 2}))).await;
        assert_eq!(fds2.len(), 1);
        assert_eq!(file_id(&fds2[0]), id2);
        // ...and closed after the ACK: the connection now lives only in the peer's copy.
        wait_copies(id, 1).await;
        drop(fds);
        assert_eq!(client_read_to_end(&client), "");

        // p3 waits behind the second handle.
        peer.assert_silent(Duration::from_millis(100)).await;
        assert_pending(&mut second, "the second delivery").await;
        peer.write(ACK).await;
        util::within("the second delivery", second).await.unwrap();
        assert!(peer.expect_frame(b"\"p3\"\n").await.is_empty());
        wait_copies(id2, 1).await;
        drop(fds2);
        assert_eq!(client_read_to_end(&client2), "");

        drop((chan, peer, client, client2));
        util::assert_fds_settle_to(&baseline).await;
    });
}

#[test]
fn nack_resends_the_same_bytes_then_gives_up_after_four_writes() {
    run(async {
        let baseline = util::open_fds();
        let (chan, mut peer) = raw_channel(ChannelConfig::default());

        let (client, server) = tcp_pair();
        let id = file_id(&server);
        let mut delivery = chan
            .sender()
            .queue_handle(&json!({"n": "nack", "key": [1, 2]}), server)
            .await
            .unwrap();
        chan.send(&"after").await.unwrap();

        let expected = socket_frame(json!({"n": "nack", "key": [1, 2]}));
        for attempt in 1..=4 {
            let (line, fds) = peer.frame().await;
            // Byte for byte the first frame: not wrapped in a net.Native envelope as Node does.
            assert_eq!(
                String::from_utf8_lossy(&line),
                String::from_utf8_lossy(&expected),
                "attempt {attempt}"
            );
            assert_eq!(fds.len(), 1, "attempt {attempt} carries one descriptor");
            assert_eq!(file_id(&fds[0]), id);
            drop(fds);
            if attempt == 1 {
                peer.assert_silent(Duration::from_millis(100)).await;
            }
            assert_pending(&mut delivery, "the delivery").await;
            assert_eq!(copies(id), 1, "handoff keeps its copy between attempts");
            peer.write(NACK).await;
        }
        match util::within("the delivery", delivery).await {
            Err(SendHandleError { error: SendError::NotDelivered { attempts: 4 }, handle }) => {
                // Given back, not closed behind our back.
                assert_eq!(file_id(&handle), id);
                drop(handle);
            }
            other => panic!("expected NotDelivered after 4 attempts, got {other:?}"),
        }
        // Closed once dropped, and the queue moves on.
        wait_copies(id, 0).await;
        assert_eq!(client_read_to_end(&client), "");
        assert!(peer.expect_frame(b"\"after\"\n").await.is_empty());

        // max_retransmits(0): the first NACK is final.
        let (chan0, mut peer0) = raw_channel(ChannelConfig::default().max_retransmits(0));
        let (fd, watch) = probe();
        let delivery = chan0
            .sender()
            .queue_handle(&"once", std::os::unix::net::UnixStream::from(fd))
            .await
            .unwrap();
        assert_eq!(
            peer0.expect_frame(&socket_frame(json!("once"))).await.len(),
            1
        );
        peer0.write(NACK).await;
        assert!(matches!(
            util::within("the delivery", delivery).await,
            Err(SendHandleError { error: SendError::NotDelivered { attempts: 1 }, .. })
        ));
        assert_peer_closed(&watch).await;
        peer0.assert_silent(Duration::from_millis(50)).await;

        drop((chan, peer, client, chan0, peer0, watch));
        util::assert_fds_settle_to(&baseline).await;
    });
}

#[test]
fn keep_open_leaves_the_stream_usable_after_the_ack() {
    run(async {
        let baseline = util::open_fds();
        let (chan, mut peer) = raw_channel(ChannelConfig::default());

        let (client, server) = tcp_pair();
        let id = file_id(&server);
        let peer_side = async {
            let fds = peer.expect_frame(&socket_frame(json!("shared"))).await;
            peer.write(ACK).await;
            fds
        };
        let (sent, mut fds) =
            tokio::join!(chan.send_handle(&"shared", KeepOpen(&server)), peer_side);
        sent.unwrap();
        assert_eq!(fds.len(), 1);
        assert_eq!(file_id(&fds[0]), id);
        // Both copies open after the ACK: ours and the peer's.
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(copies(id), 2);
        (&server).write_all(b"from the caller;").unwrap();
        client_expect(&client, "from the caller;");
        let peer_copy = std::net::TcpStream::from(fds.remove(0));
        (&peer_copy).write_all(b"from the peer;").unwrap();
        client_expect(&client, "from the peer;");
        drop(server);
        assert!(
            !client_saw_eof(&client),
            "the peer's copy keeps the connection"
        );
        drop(peer_copy);
        assert_eq!(client_read_to_end(&client), "");
        drop(client);

        // The same with a tokio stream.
        let (client, server) = tcp_pair();
        server.set_nonblocking(true).unwrap();
        let mut server = tokio::net::TcpStream::from_std(server).unwrap();
        let peer_side = async {
            let fds = peer.expect_frame(&socket_frame(json!("tokio"))).await;
            peer.write(ACK).await;
            fds
        };
        let (sent, fds) = tokio::join!(chan.send_handle(&"tokio", KeepOpen(&server)), peer_side);
        sent.unwrap();
        drop(fds);
        tokio::io::AsyncWriteExt::write_all(&mut server, b"still ours")
            .await
            .unwrap();
        client_expect(&client, "still ours");
        drop(server);
        assert_eq!(client_read_to_end(&client), "");

        drop((chan, peer, client));
        util::assert_fds_settle_to(&baseline).await;
    });
}

#[test]
fn incoming_handle_is_acked_while_ours_awaits_its_ack() {
    run(async {
        let baseline = util::open_fds();
        let (mut chan, mut peer) = raw_channel(ChannelConfig::default());

        let (ours, our_watch) = probe();
        let mut delivery = chan
            .sender()
            .queue_handle(&"ours", std::os::unix::net::UnixStream::from(ours))
            .await
            .unwrap();
        let our_copy = peer.expect_frame(&socket_frame(json!("ours"))).await;
        assert_eq!(our_copy.len(), 1);

        // The peer sends its own handle before answering ours: handoff ACKs it at once.
        let (theirs, their_watch) = probe();
        peer.send(
            &handle_line("net.Socket", json!("theirs")),
            &[theirs.as_fd()],
        )
        .await;
        drop(theirs);
        assert!(peer.expect_frame(ACK).await.is_empty());
        let message = util::within("recv", chan.recv()).await.unwrap().unwrap();
        assert_eq!(message.value().unwrap(), json!("theirs"));
        assert_eq!(message.handle().unwrap().kind(), FdKind::UnixStream);
        assert_pending(&mut delivery, "our delivery").await;

        peer.write(ACK).await;
        util::within("our delivery", delivery).await.unwrap();
        drop((message, our_copy));
        assert_peer_closed(&our_watch).await;
        assert_peer_closed(&their_watch).await;

        drop((chan, peer, our_watch, their_watch));
        util::assert_fds_settle_to(&baseline).await;
    });
}

// ---------------------------------------------------------------------------------------------
// Pipelining
// ---------------------------------------------------------------------------------------------

#[test]
fn window_8_pipelines_handles_and_resends_a_nack_behind_the_others() {
    run(async {
        let baseline = util::open_fds();
        let (chan, mut peer) = raw_channel(ChannelConfig::default().handle_window(8));

        let mut watches = Vec::new();
        let mut ids = Vec::new();
        let mut deliveries = Vec::new();
        for n in 0..9 {
            if n == 8 {
                // Plain messages do not wait behind handles in flight.
                chan.send(&"plain").await.unwrap();
            }
            let (fd, watch) = probe();
            ids.push(file_id(&fd));
            watches.push(watch);
            let stream = std::os::unix::net::UnixStream::from(fd);
            deliveries.push(Some(
                chan.sender()
                    .queue_handle(&json!({"n": n}), stream)
                    .await
                    .unwrap(),
            ));
        }
        // Eight handles without waiting for an answer, each with its own descriptor.
        let mut received = Vec::new();
        for (n, id) in ids.iter().enumerate().take(8) {
            let fds = peer.expect_frame(&socket_frame(json!({"n": n}))).await;
            assert_eq!(fds.len(), 1, "handle {n}");
            assert_eq!(file_id(&fds[0]), *id);
            received.extend(fds);
        }
        assert!(peer.expect_frame(b"\"plain\"\n").await.is_empty());
        // The ninth waits for room in the window.
        peer.assert_silent(Duration::from_millis(100)).await;

        // ACKs resolve the oldest first.
        peer.write(ACK).await;
        util::within("delivery 0", deliveries[0].take().unwrap())
            .await
            .unwrap();
        assert_pending(deliveries[1].as_mut().unwrap(), "delivery 1").await;
        let fds = peer.expect_frame(&socket_frame(json!({"n": 8}))).await;
        assert_eq!(fds.len(), 1);
        received.extend(fds);

        // A NACK answers handle 1: it is resent, unchanged, behind the eight others in flight.
        peer.write(NACK).await;
        let fds = peer.expect_frame(&socket_frame(json!({"n": 1}))).await;
        assert_eq!(fds.len(), 1);
        assert_eq!(file_id(&fds[0]), ids[1]);
        received.extend(fds);
        assert_pending(deliveries[1].as_mut().unwrap(), "delivery 1").await;
        for n in [2, 3, 4, 5, 6, 7, 8, 1] {
            peer.write(ACK).await;
            let delivery = deliveries[n].take().unwrap();
            util::within("a delivery", delivery).await.unwrap();
            if let Some(next) = deliveries.iter_mut().flatten().next() {
                assert_pending(next, "a later delivery").await;
            }
        }
        assert!(deliveries.iter().all(Option::is_none));
        peer.assert_silent(Duration::from_millis(50)).await;

        // handoff closed every copy it held; the peer's copies are the last ones.
        for id in &ids {
            wait_copies(*id, received.iter().filter(|fd| file_id(fd) == *id).count()).await;
        }
        drop(received);
        for watch in &watches {
            assert_peer_closed(watch).await;
        }

        drop((chan, peer, watches));
        util::assert_fds_settle_to(&baseline).await;
    });
}

#[test]
fn large_handle_frame_carries_its_descriptor_once() {
    run(async {
        let baseline = util::open_fds();
        let (chan, mut peer) = raw_channel(ChannelConfig::default().handle_window(8));

        // Larger than the socket buffer: written in several sendmsg calls.
        let big = "z".repeat(2 * 1024 * 1024);
        let (fd, watch) = probe();
        let id = file_id(&fd);
        let first = chan
            .sender()
            .queue_handle(
                &json!({"big": big}),
                std::os::unix::net::UnixStream::from(fd),
            )
            .await
            .unwrap();
        chan.send(&"tail").await.unwrap();
        let (fd2, watch2) = probe();
        let second = chan
            .sender()
            .queue_handle(&"small", std::os::unix::net::UnixStream::from(fd2))
            .await
            .unwrap();

        let fds = peer.expect_frame(&socket_frame(json!({"big": big}))).await;
        assert_eq!(fds.len(), 1, "one descriptor, with the first bytes only");
        assert_eq!(file_id(&fds[0]), id);
        assert!(peer.expect_frame(b"\"tail\"\n").await.is_empty());
        let fds2 = peer.expect_frame(&socket_frame(json!("small"))).await;
        assert_eq!(fds2.len(), 1);
        peer.write(ACK).await;
        peer.write(ACK).await;
        util::within("first", first).await.unwrap();
        util::within("second", second).await.unwrap();
        drop((fds, fds2));
        assert_peer_closed(&watch).await;
        assert_peer_closed(&watch2).await;

        drop((chan, peer, watch, watch2));
        util::assert_fds_settle_to(&baseline).await;
    });
}

// ---------------------------------------------------------------------------------------------
// Disconnect, flush, back-pressure
// ---------------------------------------------------------------------------------------------

#[test]
fn sending_on_a_disconnected_channel_gives_the_handle_back() {
    run(async {
        let baseline = util::open_fds();

        // Disconnected by us.
        let (chan, mut peer) = raw_channel(ChannelConfig::default());
        chan.disconnect();
        assert!(!chan.is_connected());
        peer.expect_eof().await;
        let (client, server) = tcp_pair();
        let id = file_id(&server);
        match chan.send_handle(&"late", server).await {
            Err(SendHandleError { error: SendError::Disconnected { written: false }, handle: socket }) => {
                assert_eq!(file_id(&socket), id);
                (&socket).write_all(b"returned").unwrap();
            }
            other => panic!("expected Disconnected with the handle, got {other:?}"),
        }
        assert_eq!(client_read_to_end(&client), "returned");
        drop(client);
        // By reference: nothing to give back, ours stays.
        let (client, server) = tcp_pair();
        let result = chan.sender().queue_handle(&"late", KeepOpen(&server)).await;
        assert!(matches!(
            result,
            Err(SendHandleError { error: SendError::Disconnected { written: false }, handle: () })
        ));
        drop(result);
        assert_eq!(copies(file_id(&server)), 1);
        (&server).write_all(b"ours").unwrap();
        drop(server);
        assert_eq!(client_read_to_end(&client), "ours");
        drop(client);
        assert!(matches!(chan.send(&1).await, Err(SendError::Closed)));
        assert!(matches!(
            chan.sender().flush().await,
            Err(SendError::Closed)
        ));
        drop((chan, peer));

        // Closed by the peer.
        let (mut chan, peer) = raw_channel(ChannelConfig::default());
        drop(peer);
        util::within("the channel to close", chan.sender().closed()).await;
        assert!(util::within("recv", chan.recv()).await.is_none());
        let (fd, watch) = probe();
        let stream = std::os::unix::net::UnixStream::from(fd);
        match chan.send_handle(&"late", stream).await {
            Err(SendHandleError { error: SendError::Disconnected { written: false }, handle }) => drop(handle),
            other => panic!("expected Disconnected with the handle, got {other:?}"),
        }
        assert_peer_closed(&watch).await;
        assert!(matches!(chan.send(&1).await, Err(SendError::Closed)));
        drop((chan, watch));

        util::assert_fds_settle_to(&baseline).await;
    });
}

#[test]
fn flush_resolves_once_the_bytes_are_on_the_wire() {
    run(async {
        let baseline = util::open_fds();
        let (chan, mut peer) = raw_channel(ChannelConfig::default());

        for i in 0..3 {
            chan.send(&json!({"i": i})).await.unwrap();
        }
        util::within("flush", chan.sender().flush()).await.unwrap();
        // Already in the peer's socket buffer: read without waiting.
        while peer.try_fill().is_ok() {}
        assert_eq!(peer.buf, b"{\"i\":0}\n{\"i\":1}\n{\"i\":2}\n");
        peer.buf.clear();
        peer.base += 24;

        // Behind an unacknowledged handle (window 1), a flush waits for the ACK.
        let (fd, watch) = probe();
        let delivery = chan
            .sender()
            .queue_handle(&"h", std::os::unix::net::UnixStream::from(fd))
            .await
            .unwrap();
        chan.send(&"behind").await.unwrap();
        let sender = chan.sender().clone();
        let mut flush = Box::pin(async move { sender.flush().await });
        let fds = peer.expect_frame(&socket_frame(json!("h"))).await;
        assert_pending(&mut flush, "flush behind a handle").await;
        peer.write(ACK).await;
        util::within("flush", flush).await.unwrap();
        util::within("delivery", delivery).await.unwrap();
        while peer.try_fill().is_ok() {}
        assert_eq!(peer.buf, b"\"behind\"\n");

        drop((chan, peer, fds));
        assert_peer_closed(&watch).await;
        drop(watch);
        util::assert_fds_settle_to(&baseline).await;
    });
}

#[test]
fn disconnect_waits_for_the_pending_ack() {
    run(async {
        let baseline = util::open_fds();
        let (mut chan, mut peer) = raw_channel(ChannelConfig::default());

        let (client, server) = tcp_pair();
        let id = file_id(&server);
        let delivery = chan
            .sender()
            .queue_handle(&"pending", server)
            .await
            .unwrap();
        chan.send(&"queued before disconnect").await.unwrap();
        let fds = peer.expect_frame(&socket_frame(json!("pending"))).await;
        assert_eq!(fds.len(), 1);

        chan.disconnect();
        assert!(!chan.is_connected());
        assert!(matches!(
            chan.send(&"too late").await,
            Err(SendError::Closed)
        ));
        // Neither EOF nor anything else while the handle awaits its ACK.
        peer.assert_silent(Duration::from_millis(200)).await;
        assert_eq!(copies(id), 2);

        peer.write(ACK).await;
        util::within("the delivery", delivery).await.unwrap();
        // What was queued before disconnect() is written, then the channel closes.
        assert!(peer
            .expect_frame(b"\"queued before disconnect\"\n")
            .await
            .is_empty());
        peer.expect_eof().await;
        assert!(util::within("recv", chan.recv()).await.is_none());
        wait_copies(id, 1).await;
        drop(fds);
        assert_eq!(client_read_to_end(&client), "");

        drop((chan, peer, client));
        util::assert_fds_settle_to(&baseline).await;
    });
}

#[test]
fn dropping_the_channel_with_a_handle_in_flight_waits_for_the_ack() {
    run(async {
        let baseline = util::open_fds();
        let (chan, mut peer) = raw_channel(ChannelConfig::default());

        let (fd, watch) = probe();
        let delivery = chan
            .sender()
            .queue_handle(&"in flight", std::os::unix::net::UnixStream::from(fd))
            .await
            .unwrap();
        let fds = peer.expect_frame(&socket_frame(json!("in flight"))).await;
        drop(chan);
        peer.assert_silent(Duration::from_millis(100)).await;
        peer.write(ACK).await;
        util::within("the delivery", delivery).await.unwrap();
        peer.expect_eof().await;
        drop(fds);
        assert_peer_closed(&watch).await;

        drop((peer, watch));
        util::assert_fds_settle_to(&baseline).await;
    });
}

#[test]
fn send_blocks_when_the_peer_does_not_read_and_resumes_when_it_does() {
    run(async {
        let baseline = util::open_fds();
        let (chan, peer) = raw_channel(ChannelConfig::default().send_buffer(64 * 1024));

        let pad = "x".repeat(16 * 1024);
        let mut sent = 0;
        loop {
            let message = json!({"i": sent, "pad": pad});
            match tokio::time::timeout(Duration::from_millis(200), chan.send(&message)).await {
                Ok(result) => {
                    result.unwrap();
                    sent += 1;
                    assert!(sent < 1000, "16 MiB queued without back-pressure");
                }
                Err(_) => break, // pending: the buffer is full
            }
        }
        // At least the 64 KiB budget was accepted before it blocked.
        assert!(sent >= 4, "blocked after {sent} messages");

        // The peer starts reading: the same send now completes, and nothing was lost.
        let reader = tokio::spawn(async move {
            let mut peer = peer;
            for i in 0..=sent {
                let (line, fds) = peer.frame().await;
                assert!(fds.is_empty());
                let value: serde_json::Value = serde_json::from_slice(&line).unwrap();
                assert_eq!(value["i"], i, "message order");
            }
            peer
        });
        let message = json!({"i": sent, "pad": pad});
        util::within("send after the peer reads", chan.send(&message))
            .await
            .unwrap();
        util::within("flush", chan.sender().flush()).await.unwrap();
        let mut peer = util::within("the reader", reader).await.unwrap();
        peer.assert_quiet_now();

        drop((chan, peer));
        util::assert_fds_settle_to(&baseline).await;
    });
}

#[test]
fn sends_blocked_on_back_pressure_fail_when_the_peer_goes_away() {
    run(async {
        let baseline = util::open_fds();
        let (mut chan, peer) = raw_channel(ChannelConfig::default().send_buffer(64 * 1024));

        let pad = "x".repeat(16 * 1024);
        let mut sent = 0;
        while tokio::time::timeout(Duration::from_millis(200), chan.send(&json!({"pad": pad})))
            .await
            .is_ok()
        {
            sent += 1;
            assert!(sent < 1000, "no back-pressure");
        }
        let sender = chan.sender().clone();
        let message = json!({"pad": pad});
        let blocked = tokio::spawn(async move { sender.send(&message).await });
        let (fd, watch) = probe();
        let sender = chan.sender().clone();
        let pad = pad.clone();
        let blocked_handle = tokio::spawn(async move {
            let stream = std::os::unix::net::UnixStream::from(fd);
            sender.send_handle(&json!({"pad": pad}), stream).await
        });
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(!blocked.is_finished() && !blocked_handle.is_finished());

        // The peer goes away without reading.
        drop(peer);
        match util::within("the blocked send", blocked).await.unwrap() {
            Err(SendError::Closed) => {}
            other => panic!("expected Closed, got {other:?}"),
        }
        match util::within("the blocked send_handle", blocked_handle)
            .await
            .unwrap()
        {
            Err(SendHandleError { error: SendError::Disconnected { written: false }, handle }) => drop(handle),
            other => panic!("expected Disconnected with the handle, got {other:?}"),
        }
        assert_peer_closed(&watch).await;
        while let Some(item) = util::within("recv", chan.recv()).await {
            assert!(matches!(item, Err(handoff::RecvError::Io(_))), "{item:?}");
        }

        drop((chan, watch));
        util::assert_fds_settle_to(&baseline).await;
    });
}

#[test]
fn handles_arriving_after_the_receiver_is_dropped_are_acked_and_closed() {
    run(async {
        let baseline = util::open_fds();
        let (chan, mut peer) = raw_channel(ChannelConfig::default());
        let (sender, receiver) = chan.split();
        drop(receiver);

        let (fd, watch) = probe();
        peer.send(
            &handle_line("net.Socket", json!("nobody reads")),
            &[fd.as_fd()],
        )
        .await;
        drop(fd);
        assert!(peer.expect_frame(ACK).await.is_empty());
        assert_peer_closed(&watch).await;
        // The sending half still works.
        sender.send(&"still sending").await.unwrap();
        assert!(peer.expect_frame(b"\"still sending\"\n").await.is_empty());

        drop((sender, peer, watch));
        util::assert_fds_settle_to(&baseline).await;
    });
}

// ---------------------------------------------------------------------------------------------
// Stress
// ---------------------------------------------------------------------------------------------

#[derive(Clone, Copy)]
enum Kind {
    Tcp,
    UnixPair,
}

/// Sends `count` handles from one end of a `Channel::pair()` to the other, which drops each, and
/// checks order, kinds, and that every descriptor is closed at the end.
async fn stress(count: usize, window: usize, kind: Kind) {
    let baseline = util::open_fds();
    let (a, mut b) =
        Channel::pair_with_config(ChannelConfig::default().handle_window(window)).unwrap();
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();

    let receiver = tokio::spawn(async move {
        for i in 0..count {
            let message = b.recv().await.expect("stream ended").expect("a message");
            assert_eq!(message.value().unwrap()["i"], i);
            let handle = message.handle().expect("a handle");
            assert_eq!(handle.handle_type(), HandleType::NetSocket);
            match kind {
                Kind::Tcp => assert_eq!(handle.kind(), FdKind::TcpStream),
                Kind::UnixPair => assert_eq!(handle.kind(), FdKind::UnixStream),
            }
        }
        b
    });

    let mut deliveries = VecDeque::new();
    for i in 0..count {
        let message = json!({"i": i});
        let queued = match kind {
            Kind::Tcp => {
                let _client = std::net::TcpStream::connect(addr).unwrap();
                let (server, _) = listener.accept().unwrap();
                a.sender().queue_handle(&message, RawHandle::new(HandleType::NetSocket, server.into())).await
            }
            Kind::UnixPair => {
                let (x, _y) = std::os::unix::net::UnixStream::pair().unwrap();
                a.sender().queue_handle(&message, RawHandle::new(HandleType::NetSocket, x.into())).await
            }
        };
        deliveries.push_back(queued.unwrap());
        // Keep a bounded number of descriptors in the queue.
        while deliveries.len() > 2 * window {
            util::within("a delivery", deliveries.pop_front().unwrap())
                .await
                .unwrap();
        }
    }
    for delivery in deliveries {
        util::within("a delivery", delivery).await.unwrap();
    }
    let b = util::within("the receiver", receiver).await.unwrap();

    drop((a, b, listener));
    util::assert_fds_settle_to(&baseline).await;
}

#[test]
fn stress_5000_tcp_handles_window_1() {
    run(stress(5000, 1, Kind::Tcp));
}

#[test]
fn stress_5000_socketpair_handles_window_1() {
    run(stress(5000, 1, Kind::UnixPair));
}

#[test]
fn stress_5000_tcp_handles_window_64() {
    run(stress(5000, 64, Kind::Tcp));
}

#[test]
fn stress_5000_socketpair_handles_window_64() {
    run(stress(5000, 64, Kind::UnixPair));
}
