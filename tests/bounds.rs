//! A hostile peer cannot grow us without limit: every queue a peer can fill — protocol replies,
//! errors, received and queued handles, socket-list keys, observer copies — has a bound, and the
//! work a request or a frame costs does not grow with what else the process holds.
//!
//! A raw socket under the test's control plays the peer (see `util::raw_peer`). Where a bound is
//! the point, the observable is what the peer *could push*: once handoff's bound is reached it
//! stops reading, so the peer's writes stall in the kernel instead of growing our memory.
//!
//! Every test counts descriptors or changes process limits, so each one runs through [`run`]
//! (one at a time, runtime built under the lock).

mod util;

use util::raw_peer::*;
use util::serial_test as run;

use std::io::Read;
use std::os::fd::{AsFd, OwnedFd};
use std::time::{Duration, Instant};

use handoff::channel::FrameError;
use handoff::{Channel, ChannelConfig, RecvError, SendError};
use serde_json::json;

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

/// Writes as much of `data` as handoff reads, giving up once no byte has gone for `stall`.
/// Returns how many bytes went.
async fn flood(peer: &RawPeer, data: &[u8], stall: Duration) -> usize {
    let mut written = 0;
    let mut last_progress = Instant::now();
    while written < data.len() {
        let end = (written + 256 * 1024).min(data.len());
        match peer.sock.try_write(&data[written..end]) {
            Ok(n) => {
                written += n;
                last_progress = Instant::now();
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                if last_progress.elapsed() >= stall {
                    break;
                }
                let _ = tokio::time::timeout(Duration::from_millis(20), peer.sock.writable()).await;
            }
            Err(e) => panic!("flood write failed: {e}"),
        }
    }
    written
}

/// Reads and counts the lines handoff writes, on a duplicate of the peer's socket, until stopped.
struct Drain {
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<Vec<Vec<u8>>>,
}

impl Drain {
    fn start(peer: &RawPeer) -> Drain {
        let dup = peer.sock.as_fd().try_clone_to_owned().unwrap();
        let sock = tokio::net::UnixStream::from_std(std::os::unix::net::UnixStream::from(dup)).unwrap();
        let (stop, mut stopped) = tokio::sync::oneshot::channel();
        let task = tokio::spawn(async move {
            let mut lines = Vec::new();
            let mut partial = Vec::new();
            let mut buf = vec![0u8; 64 * 1024];
            loop {
                tokio::select! {
                    _ = &mut stopped => break,
                    ready = sock.readable() => {
                        ready.unwrap();
                        match sock.try_read(&mut buf) {
                            Ok(0) => break,
                            Ok(n) => {
                                partial.extend_from_slice(&buf[..n]);
                                while let Some(i) = memchr::memchr(b'\n', &partial) {
                                    lines.push(partial.drain(..=i).collect());
                                }
                            }
                            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                            Err(e) => panic!("drain read failed: {e}"),
                        }
                    }
                }
            }
            lines
        });
        Drain { stop, task }
    }

    /// Stops reading and returns the lines read so far.
    async fn stop(self) -> Vec<Vec<u8>> {
        let _ = self.stop.send(());
        self.task.await.unwrap()
    }
}

/// Reads lines until `want` of them arrived, or none came for `quiet` (a step at most).
async fn read_lines(peer: &mut RawPeer, want: usize, quiet: Duration) -> Vec<Vec<u8>> {
    let deadline = Instant::now() + util::STEP;
    let mut lines = Vec::new();
    while lines.len() < want && Instant::now() < deadline {
        if let Some(i) = memchr::memchr(b'\n', &peer.buf) {
            lines.push(peer.buf.drain(..=i).collect());
            continue;
        }
        match tokio::time::timeout(quiet, peer.fill()).await {
            Ok(0) | Err(_) => break,
            Ok(_) => {}
        }
    }
    peer.base += lines.iter().map(Vec::len).sum::<usize>();
    peer.fds.clear();
    lines
}

/// Restores the descriptor limit when dropped, so a failed test does not starve the next one.
struct RestoreNofile(rustix::process::Rlimit);

impl Drop for RestoreNofile {
    fn drop(&mut self) {
        let _ = rustix::process::setrlimit(rustix::process::Resource::Nofile, self.0);
    }
}

/// Socket-list requests `{"cmd":CMD,"key":KEY}`, one line each.
fn requests(cmd: &str, keys: impl Iterator<Item = String>) -> Vec<u8> {
    let mut out = Vec::new();
    for key in keys {
        out.extend_from_slice(format!("{}\n", json!({"cmd": cmd, "key": key})).as_bytes());
    }
    out
}

fn handle_frame(value: serde_json::Value) -> Vec<u8> {
    format!("{value}\n").into_bytes()
}

/// CPU time (user + system) this process has used.
fn cpu_time() -> Duration {
    // Fields 14 and 15 of /proc/self/stat, in clock ticks (100 per second on Linux), counted
    // after the parenthesised command name, which may itself contain spaces.
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap();
    let after_name = &stat[stat.rfind(')').unwrap() + 2..];
    let fields: Vec<u64> = after_name.split(' ').skip(11).take(2).map(|f| f.parse().unwrap()).collect();
    Duration::from_millis((fields[0] + fields[1]) * 10)
}

/// Opens `/dev/null` `n` times (descriptors to make the fd table large).
fn filler_fds(n: usize) -> Vec<OwnedFd> {
    (0..n).map(|_| OwnedFd::from(std::fs::File::open("/dev/null").unwrap())).collect()
}

/// Lowers the soft descriptor limit to a little above what is open and opens `/dev/null` until
/// no descriptor is left; dropping the two gives the table back.
fn fill_descriptor_table() -> (RestoreNofile, Vec<std::fs::File>) {
    let old = rustix::process::getrlimit(rustix::process::Resource::Nofile);
    let open_now = util::open_fds().len() as u64;
    let limit = rustix::process::Rlimit { current: Some(open_now + 64), maximum: old.maximum };
    let restore = RestoreNofile(old);
    rustix::process::setrlimit(rustix::process::Resource::Nofile, limit).unwrap();
    let mut fillers = Vec::new();
    while let Ok(file) = std::fs::File::open("/dev/null") {
        fillers.push(file);
    }
    (restore, fillers)
}

/// Raises the soft descriptor limit to at least `want` (up to the hard limit); returns the old
/// limit to restore.
fn raise_nofile(want: u64) -> RestoreNofile {
    let old = rustix::process::getrlimit(rustix::process::Resource::Nofile);
    let hard = old.maximum.unwrap_or(u64::MAX);
    let new = rustix::process::Rlimit { current: Some(want.min(hard)), maximum: old.maximum };
    rustix::process::setrlimit(rustix::process::Resource::Nofile, new).unwrap();
    RestoreNofile(old)
}

/// Receives `count` keyed sockets over `chan` (each a socket-pair end), returning the received
/// handles (held open) and the far ends.
async fn receive_keyed_sockets(
    chan: &mut Channel,
    peer: &mut RawPeer,
    key: &str,
    count: usize,
) -> (Vec<OwnedFd>, Vec<std::os::unix::net::UnixStream>) {
    let mut held = Vec::new();
    let mut watches = Vec::new();
    for i in 0..count {
        let (fd, watch) = probe();
        let line = handle_frame(json!({"cmd": "NODE_HANDLE", "type": "net.Socket", "msg": i, "key": key}));
        peer.send(&line, &[fd.as_fd()]).await;
        drop(fd);
        assert!(peer.expect_frame(ACK).await.is_empty());
        let mut message = util::within("a keyed socket", chan.recv()).await.unwrap().unwrap();
        held.push(OwnedFd::from(message.take_handle().unwrap()));
        watches.push(watch);
    }
    (held, watches)
}

async fn count_reply(peer: &mut RawPeer, key: &str) -> u64 {
    peer.write(&requests("NODE_SOCKET_GET_COUNT", std::iter::once(key.to_owned()))).await;
    let (line, _) = peer.frame().await;
    let reply: serde_json::Value = serde_json::from_slice(&line).unwrap();
    assert_eq!(reply["cmd"], "NODE_SOCKET_COUNT");
    assert_eq!(reply["key"], key);
    reply["count"].as_u64().unwrap()
}

// ---------------------------------------------------------------------------------------------
// 1. Protocol replies count against a bound; identical count replies coalesce
// ---------------------------------------------------------------------------------------------

/// A peer that floods `NODE_SOCKET_GET_COUNT` (distinct keys) and never reads the replies: once
/// the replies reach their bound handoff stops reading, and the flood stalls. Read afterwards,
/// every complete request has its reply.
#[test]
fn count_requests_from_a_peer_that_never_reads_stall_and_are_all_answered() {
    run(async {
        let baseline = util::open_fds();
        let (chan, mut peer) = raw_channel(ChannelConfig::default());
        let flood_bytes = requests("NODE_SOCKET_GET_COUNT", (0..400_000).map(|i| format!("4:10.0.0.1:{i}")));
        let written = flood(&peer, &flood_bytes, Duration::from_millis(500)).await;
        assert!(
            written < flood_bytes.len() / 2,
            "handoff read {written} bytes of count requests ({} MiB) while their replies went unread",
            written >> 20
        );
        let complete = memchr::memchr_iter(b'\n', &flood_bytes[..written]).count();
        let lines = read_lines(&mut peer, complete, Duration::from_secs(2)).await;
        assert_eq!(lines.len(), complete, "every complete request is answered once read");
        for (i, line) in lines.iter().enumerate() {
            let reply: serde_json::Value = serde_json::from_slice(line).unwrap();
            assert_eq!(reply, json!({"cmd": "NODE_SOCKET_COUNT", "key": format!("4:10.0.0.1:{i}"), "count": 0}));
        }
        drop((chan, peer));
        util::assert_fds_settle_to(&baseline).await;
    });
}

/// The same with handle messages that come without a descriptor (each answered with a NACK),
/// while the user does read what is delivered.
#[test]
fn nacks_for_a_peer_that_never_reads_stall_it() {
    run(async {
        let baseline = util::open_fds();
        let (mut chan, peer) = raw_channel(ChannelConfig::default());
        let one = handle_frame(json!({"cmd": "NODE_HANDLE", "type": "net.Socket", "msg": null}));
        let flood_bytes: Vec<u8> = one.iter().copied().cycle().take(one.len() * 300_000).collect();
        let user = tokio::spawn(async move {
            let mut errors = 0usize;
            while let Some(item) = chan.recv().await {
                // The flood may end mid-line.
                let expected = matches!(
                    item,
                    Err(RecvError::HandleWithoutFd { .. } | RecvError::Frame(FrameError::Truncated { .. }))
                );
                assert!(expected, "{item:?}");
                errors += 1;
            }
            errors
        });
        let written = flood(&peer, &flood_bytes, Duration::from_millis(500)).await;
        assert!(
            written < flood_bytes.len() / 2,
            "handoff read {} handle messages while their NACKs went unread",
            written / one.len()
        );
        drop(peer);
        util::within("the receive stream's end", user).await.unwrap();
        util::assert_fds_settle_to(&baseline).await;
    });
}

/// Identical pending count requests share one reply: a peer that asks the same thing 200,000
/// times without reading is answered far fewer times, never stalls, and each answer is current.
#[test]
fn identical_pending_count_replies_coalesce() {
    run(async {
        let baseline = util::open_fds();
        let (mut chan, mut peer) = raw_channel(ChannelConfig::default());
        let (held, watches) = receive_keyed_sockets(&mut chan, &mut peer, "4:127.0.0.1:80", 2).await;
        let key = "4:127.0.0.1:80".to_owned();
        let flood_bytes = requests("NODE_SOCKET_GET_COUNT", std::iter::repeat_n(key.clone(), 200_000));
        let written = flood(&peer, &flood_bytes, Duration::from_secs(2)).await;
        assert_eq!(written, flood_bytes.len(), "identical requests must not stall the peer");
        // Wait until every request was read (the last reply reflects it), then look.
        tokio::time::sleep(Duration::from_millis(300)).await;
        let lines = read_lines(&mut peer, usize::MAX, Duration::from_millis(500)).await;
        assert!(!lines.is_empty());
        assert!(
            lines.len() < 100_000,
            "{} replies for 200,000 identical pending requests: not coalesced",
            lines.len()
        );
        for line in &lines {
            let reply: serde_json::Value = serde_json::from_slice(line).unwrap();
            assert_eq!(reply, json!({"cmd": "NODE_SOCKET_COUNT", "key": key, "count": 2}));
        }
        // Asked again now, one request gets one reply, with the current count.
        drop(held);
        assert_eq!(count_reply(&mut peer, &key).await, 0);
        peer.assert_silent(Duration::from_millis(50)).await;
        drop((chan, peer, watches));
        util::assert_fds_settle_to(&baseline).await;
    });
}

// ---------------------------------------------------------------------------------------------
// 2. Errors are charged what they hold
// ---------------------------------------------------------------------------------------------

/// A `type` string of a megabyte on a handle without its descriptor is kept only as an excerpt.
#[test]
fn a_huge_handle_type_is_kept_as_an_excerpt() {
    run(async {
        let baseline = util::open_fds();
        let (mut chan, mut peer) = raw_channel(ChannelConfig::default());
        let huge = "T".repeat(1 << 20);
        peer.write(&handle_frame(json!({"cmd": "NODE_HANDLE", "type": huge, "msg": 1}))).await;
        assert!(peer.expect_frame(NACK).await.is_empty());
        match util::within("the error", chan.recv()).await.unwrap() {
            Err(e @ RecvError::HandleWithoutFd { .. }) => {
                let RecvError::HandleWithoutFd { handle_type } = &e else { unreachable!() };
                assert!(handle_type.len() <= 256, "kept {} bytes of the peer's type", handle_type.len());
                assert!(handle_type.starts_with("TTTT"));
                assert!(e.to_string().len() < 1024);
            }
            other => panic!("expected HandleWithoutFd, got {other:?}"),
        }
        // The same for a refused handle with a huge unknown type: the reason is short too.
        let (fd, watch) = probe();
        peer.send(&handle_frame(json!({"cmd": "NODE_HANDLE", "type": huge, "msg": 2})), &[fd.as_fd()]).await;
        drop(fd);
        assert!(peer.expect_frame(ACK).await.is_empty());
        match util::within("the error", chan.recv()).await.unwrap() {
            Err(e @ RecvError::HandleRejected { .. }) => assert!(e.to_string().len() < 1024, "{} bytes", e.to_string().len()),
            other => panic!("expected HandleRejected, got {other:?}"),
        }
        drop((chan, peer, watch));
        util::assert_fds_settle_to(&baseline).await;
    });
}

/// Refused handles whose message is a megabyte each count what they hold against `recv_buffer`:
/// a receiver that does not read stalls the peer after about that many bytes.
#[test]
fn refused_handles_with_huge_messages_count_against_recv_buffer() {
    run(async {
        let baseline = util::open_fds();
        let (mut chan, peer) = raw_channel(ChannelConfig::default().recv_buffer(4 << 20));
        let drain = Drain::start(&peer);
        let big = "m".repeat(1 << 20);
        let file = std::fs::File::open("/dev/null").unwrap();
        let mut sent = 0;
        // A regular file sent as a net.Socket: ACKed, refused, closed — the message is kept.
        let line = handle_frame(json!({"cmd": "NODE_HANDLE", "type": "net.Socket", "msg": big}));
        loop {
            let fds = [file.as_fd()];
            if tokio::time::timeout(Duration::from_millis(500), peer.send(&line, &fds)).await.is_err() {
                break;
            }
            sent += 1;
            assert!(sent < 64, "64 MiB of refused handles queued against a 4 MiB recv_buffer");
        }
        assert!(sent >= 3, "stalled after {sent}");
        drain.stop().await;
        let mut refused = 0;
        drop(peer);
        while let Some(item) = util::within("recv", chan.recv()).await {
            match item {
                Err(RecvError::HandleRejected { message, .. }) => {
                    assert_eq!(message.len(), (1 << 20) + 2);
                    refused += 1;
                }
                Err(RecvError::Frame(FrameError::Truncated { .. } | FrameError::StrayFds { .. })) => {}
                other => panic!("{other:?}"),
            }
        }
        assert!(refused >= sent);
        drop((chan, file));
        util::assert_fds_settle_to(&baseline).await;
    });
}

// ---------------------------------------------------------------------------------------------
// 3. Server keys have a length limit
// ---------------------------------------------------------------------------------------------

#[test]
fn a_socket_with_an_over_long_key_is_refused() {
    run(async {
        let baseline = util::open_fds();
        let (mut chan, mut peer) = raw_channel(ChannelConfig::default());
        let key = "k".repeat(handoff::server::MAX_KEY_LEN + 1);
        let (fd, watch) = probe();
        peer.send(&handle_frame(json!({"cmd": "NODE_HANDLE", "type": "net.Socket", "msg": "s", "key": key})), &[fd.as_fd()])
            .await;
        drop(fd);
        assert!(peer.expect_frame(ACK).await.is_empty());
        match util::within("the error", chan.recv()).await.unwrap() {
            Err(e @ RecvError::HandleRejected { .. }) => {
                let text = e.to_string();
                assert!(text.contains("key"), "{text}");
                assert!(text.len() < 1024);
            }
            other => panic!("expected HandleRejected, got {other:?}"),
        }
        assert_peer_closed(&watch).await;
        // A key at the limit is fine.
        let key = "k".repeat(handoff::server::MAX_KEY_LEN);
        let (held, more_watches) = receive_keyed_sockets(&mut chan, &mut peer, &key, 1).await;
        assert_eq!(count_reply(&mut peer, &key).await, 1);
        // A request for an over-long key is reported, not answered.
        let long = "k".repeat(handoff::server::MAX_KEY_LEN + 1);
        peer.write(&requests("NODE_SOCKET_GET_COUNT", std::iter::once(long))).await;
        match util::within("the error", chan.recv()).await.unwrap() {
            Err(e @ RecvError::InternalRejected { .. }) => assert!(e.to_string().len() < 1024),
            other => panic!("expected InternalRejected, got {other:?}"),
        }
        peer.assert_silent(Duration::from_millis(50)).await;
        drop((chan, peer, held, more_watches, watch));
        util::assert_fds_settle_to(&baseline).await;
    });
}

// ---------------------------------------------------------------------------------------------
// 4. send_buffer charges each frame its real memory
// ---------------------------------------------------------------------------------------------

#[test]
fn tiny_messages_are_charged_their_overhead_against_send_buffer() {
    run(async {
        let baseline = util::open_fds();
        let (ours, theirs) = std::os::unix::net::UnixStream::pair().unwrap();
        // A small kernel buffer, so that what the kernel holds does not hide what handoff holds.
        socket2::SockRef::from(&ours).set_send_buffer_size(4096).unwrap();
        let chan = Channel::with_config(OwnedFd::from(ours), ChannelConfig::default().send_buffer(1 << 20)).unwrap();
        let mut sent = 0usize;
        loop {
            match tokio::time::timeout(Duration::from_millis(200), chan.send(&1u8)).await {
                Ok(result) => result.unwrap(),
                Err(_) => break,
            }
            sent += 1;
            assert!(sent < 300_000, "{sent} two-byte messages queued against a 1 MiB send_buffer");
        }
        // Each costs its bytes plus the frame's bookkeeping (at least 64 bytes).
        assert!(sent < (1 << 20) / 64 + 16 * 1024, "{sent} two-byte messages queued against a 1 MiB send_buffer");
        drop((chan, theirs));
        util::assert_fds_settle_to(&baseline).await;
    });
}

// ---------------------------------------------------------------------------------------------
// 5. A socket-list request costs the same whatever else the process has open
// ---------------------------------------------------------------------------------------------

/// 500 count requests with 5,000 other descriptors open. Scanning `/proc/self/fd` per request
/// costs ~10 ms each here (5 s); tracking each received socket costs microseconds. The bound is
/// 20× above the second and far below the first.
#[test]
fn count_requests_do_not_scan_the_descriptor_table() {
    run(async {
        let old = raise_nofile(8192);
        let baseline = util::open_fds();
        let (mut chan, mut peer) = raw_channel(ChannelConfig::default());
        let (held, watches) = receive_keyed_sockets(&mut chan, &mut peer, "4:127.0.0.1:80", 20).await;
        let fillers = filler_fds(5000);
        let started = cpu_time();
        for _ in 0..500 {
            assert_eq!(count_reply(&mut peer, "4:127.0.0.1:80").await, 20);
        }
        let used = cpu_time() - started;
        assert!(used < Duration::from_secs(1), "500 count requests used {used:?} of CPU");

        // A pending close request does not poll the table either: one second idle.
        peer.write(&requests("NODE_SOCKET_NOTIFY_CLOSE", std::iter::once("4:127.0.0.1:80".to_owned()))).await;
        let started = cpu_time();
        tokio::time::sleep(Duration::from_secs(1)).await;
        let used = cpu_time() - started;
        assert!(used < Duration::from_millis(150), "a pending close used {used:?} of CPU in one idle second");
        peer.assert_quiet_now();
        drop(held);
        let (line, _) = peer.frame().await;
        assert_eq!(line, format!("{}\n", json!({"cmd": "NODE_SOCKET_ALL_CLOSED", "key": "4:127.0.0.1:80"})).into_bytes());
        drop((fillers, chan, peer, watches));
        util::assert_fds_settle_to(&baseline).await;
        drop(old);
    });
}

// ---------------------------------------------------------------------------------------------
// 6. A full descriptor table never turns into "closed"
// ---------------------------------------------------------------------------------------------

#[test]
fn a_full_descriptor_table_does_not_forget_received_sockets() {
    run(async {
        let baseline = util::open_fds();
        let (mut chan, mut peer) = raw_channel(ChannelConfig::default());
        let key = "4:127.0.0.1:81";
        let (held, watches) = receive_keyed_sockets(&mut chan, &mut peer, key, 5).await;

        // Fill the table: no descriptor can be opened any more.
        let (restore, fillers) = fill_descriptor_table();
        assert!(std::fs::File::open("/dev/null").is_err());

        assert_eq!(count_reply(&mut peer, key).await, 5, "counted with the table full");
        peer.write(&requests("NODE_SOCKET_NOTIFY_CLOSE", std::iter::once(key.to_owned()))).await;
        peer.assert_silent(Duration::from_millis(300)).await;
        assert_eq!(count_reply(&mut peer, key).await, 5, "still counted after a close request");

        drop(fillers);
        drop(restore);
        drop(held);
        let (line, _) = peer.frame().await;
        assert_eq!(line, format!("{}\n", json!({"cmd": "NODE_SOCKET_ALL_CLOSED", "key": key})).into_bytes());
        drop((chan, peer, watches));
        util::assert_fds_settle_to(&baseline).await;
    });
}

/// A write that finds the socket full while no descriptor is free (waiting for room needs a
/// duplicate of the socket registered for writability) still completes, on a timer, once the
/// peer reads: the channel is not closed.
#[test]
fn a_blocked_write_with_the_descriptor_table_full_still_completes() {
    run(async {
        let (a, mut b) = Channel::pair().unwrap();
        let big = "x".repeat(1 << 20);
        let (restore, fillers) = fill_descriptor_table();
        // More than the socket buffers hold: the driver's write blocks while the table is full.
        for _ in 0..4 {
            a.send(&big).await.unwrap();
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        for _ in 0..4 {
            let message = util::within("a large message", b.recv()).await.unwrap().unwrap();
            assert_eq!(message.json().len(), big.len() + 2);
        }
        util::within("flush", a.flush()).await.unwrap();
        drop(fillers);
        drop(restore);
    });
}

/// After a large message, later ones are encoded in its kept buffer: each is still charged what
/// it uses against `send_buffer`, not the buffer's capacity (the encoder reserves six times a
/// string's length), so a slow peer still lets the budget's worth of messages queue.
#[test]
fn a_kept_buffer_does_not_inflate_what_a_send_is_charged() {
    run(async {
        let (ours, theirs) = std::os::unix::net::UnixStream::pair().unwrap();
        let a = Channel::with_config(OwnedFd::from(ours), ChannelConfig::default().send_buffer(16 << 20)).unwrap();
        let huge = "x".repeat(16 << 20);
        let total = huge.len() + 3;
        let reader = std::thread::spawn(move || {
            let mut theirs = theirs;
            let mut buf = vec![0u8; total];
            theirs.read_exact(&mut buf).unwrap();
            theirs
        });
        a.send(huge.as_str()).await.unwrap();
        a.flush().await.unwrap();
        let _theirs = reader.join().unwrap(); // open, never read again
        // About 1.2 MB of JSON each: six fit in 16 MiB.
        let medium = vec![1u8; 600_000];
        for i in 0..6 {
            tokio::time::timeout(Duration::from_secs(2), a.send(&medium))
                .await
                .unwrap_or_else(|_| panic!("message {i} waited for room in a 16 MiB budget"))
                .unwrap();
        }
    });
}

// ---------------------------------------------------------------------------------------------
// 7. Unwrapping retransmission envelopes is bounded
// ---------------------------------------------------------------------------------------------

fn nested_envelope(depth: usize, inner: serde_json::Value) -> serde_json::Value {
    let mut value = json!({"cmd": "NODE_HANDLE", "type": "net.Socket", "msg": inner});
    for _ in 0..depth {
        value = json!({"cmd": "NODE_HANDLE", "type": "net.Native", "msg": value});
    }
    value
}

#[test]
fn envelopes_nested_deeper_than_node_ever_wraps_are_refused() {
    run(async {
        let baseline = util::open_fds();
        let (mut chan, mut peer) = raw_channel(ChannelConfig::default());
        // Node wraps once per retransmission (at most 3): accepted.
        let (fd, first_watch) = probe();
        peer.send(&handle_frame(nested_envelope(4, json!("ok"))), &[fd.as_fd()]).await;
        drop(fd);
        assert!(peer.expect_frame(ACK).await.is_empty());
        let message = util::within("the handle", chan.recv()).await.unwrap().unwrap();
        assert_eq!(message.json(), "\"ok\"");
        assert!(message.handle().is_some());
        drop((message, first_watch));
        // 100 levels: refused, with one ACK, and its descriptor closed.
        let (fd, watch) = probe();
        peer.send(&handle_frame(nested_envelope(100, json!("deep"))), &[fd.as_fd()]).await;
        drop(fd);
        assert!(peer.expect_frame(ACK).await.is_empty());
        match util::within("the error", chan.recv()).await.unwrap() {
            Err(e @ RecvError::HandleRejected { .. }) => assert!(e.to_string().contains("nested"), "{e}"),
            other => panic!("expected HandleRejected, got {other:?}"),
        }
        assert_peer_closed(&watch).await;
        drop((chan, peer, watch));
        util::assert_fds_settle_to(&baseline).await;
    });
}

// ---------------------------------------------------------------------------------------------
// 9. Descriptors in queues are bounded, both directions
// ---------------------------------------------------------------------------------------------

/// A flood of handles to a receiver that does not read: handoff stops reading once its queue
/// holds its descriptor budget, so the process's descriptor table stays small.
#[test]
fn a_handle_flood_to_a_receiver_that_does_not_read_is_bounded_in_descriptors() {
    run(async {
        let baseline = util::open_fds();
        let (chan, peer) = raw_channel(ChannelConfig::default());
        let drain = Drain::start(&peer);
        let line = handle_frame(json!({"cmd": "NODE_HANDLE", "type": "net.Socket", "msg": "s"}));
        let mut sent = 0;
        let mut peak = 0;
        while sent < 2000 {
            let (fd, watch) = probe();
            drop(watch);
            if tokio::time::timeout(Duration::from_millis(500), peer.send(&line, &[fd.as_fd()])).await.is_err() {
                break;
            }
            sent += 1;
            peak = peak.max(util::open_fds().len().saturating_sub(baseline.len()));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        peak = peak.max(util::open_fds().len().saturating_sub(baseline.len()));
        assert!(sent < 2000, "2000 handles read for a receiver that takes none");
        // The budget, one read's worth of descriptors still being decoded, and the test's own.
        assert!(peak < 128 + 253 + 16, "{peak} descriptors held");
        drain.stop().await;
        drop((chan, peer));
        util::assert_fds_settle_to(&baseline).await;
    });
}

/// Handles queued for a peer that does not read: `queue_handle` waits once the channel holds its
/// descriptor budget, instead of pinning one descriptor per accepted connection.
#[test]
fn handles_queued_for_a_peer_that_does_not_read_wait_for_room() {
    run(async {
        let baseline = util::open_fds();
        let (chan, peer) = raw_channel(ChannelConfig::default());
        let mut deliveries = Vec::new();
        loop {
            let (fd, watch) = probe();
            drop(watch);
            let queued = chan.sender().queue_handle(&"h", handoff::handle::RawHandle::new(handoff::handle::HandleType::NetSocket, fd));
            match tokio::time::timeout(Duration::from_millis(200), queued).await {
                Ok(delivery) => deliveries.push(delivery.unwrap()),
                Err(_) => break,
            }
            assert!(deliveries.len() < 2000, "2000 handles queued for a peer that never answers");
        }
        assert!(deliveries.len() <= 128, "{} handles queued", deliveries.len());
        drop((chan, peer));
        for delivery in deliveries {
            assert!(matches!(util::within("delivery", delivery).await, Err(handoff::SendHandleError { error: SendError::Disconnected { .. }, .. })));
        }
        util::assert_fds_settle_to(&baseline).await;
    });
}

// ---------------------------------------------------------------------------------------------
// 10. The internal-message feed is bounded by bytes
// ---------------------------------------------------------------------------------------------

#[test]
fn an_observer_that_does_not_read_holds_a_bounded_number_of_bytes() {
    run(async {
        let baseline = util::open_fds();
        let (mut chan, peer) = raw_channel(ChannelConfig::default());
        let mut observer = chan.sender().internal_messages();
        let big = "i".repeat(4 << 20);
        for i in 0..20 {
            peer.write(&handle_frame(json!({"cmd": "NODE_BIG", "i": i, "pad": big}))).await;
        }
        peer.write(&handle_frame(json!({"cmd": "NODE_SMALL"}))).await;
        peer.write(b"\"user\"\n").await;
        assert_eq!(util::within("recv", chan.recv()).await.unwrap().unwrap().json(), "\"user\"");
        let mut kept_bytes = 0;
        let mut lagged = 0;
        let mut small = false;
        loop {
            match observer.try_recv() {
                Ok(seen) => {
                    kept_bytes += seen.json().len();
                    small |= seen.value().unwrap()["cmd"] == "NODE_SMALL";
                }
                Err(tokio::sync::broadcast::error::TryRecvError::Lagged(n)) => lagged += n,
                Err(_) => break,
            }
        }
        assert!(kept_bytes <= handoff::channel::OBSERVER_BUFFER, "an observer held {kept_bytes} bytes");
        assert!(lagged >= 18, "lagged {lagged}");
        assert!(small, "the small message after the big ones was kept");
        drop((chan, peer, observer));
        util::assert_fds_settle_to(&baseline).await;
    });
}

// ---------------------------------------------------------------------------------------------
// 13. Retransmission counts do not overflow
// ---------------------------------------------------------------------------------------------

#[test]
fn max_retransmits_255_gives_up_after_256_writes() {
    run(async {
        let baseline = util::open_fds();
        let (chan, mut peer) = raw_channel(ChannelConfig::default().max_retransmits(255));
        let (fd, watch) = probe();
        let delivery = chan.sender().queue_handle(&"nacked", handoff::handle::RawHandle::new(handoff::handle::HandleType::NetSocket, fd)).await.unwrap();
        for _ in 0..256 {
            let (_, fds) = peer.frame().await;
            assert_eq!(fds.len(), 1);
            peer.write(NACK).await;
        }
        match util::within("the delivery", delivery).await {
            Err(handoff::SendHandleError { error: SendError::NotDelivered { attempts }, handle }) => {
                assert_eq!(attempts, 256);
                drop(handle); // given back, not closed behind our back
            }
            other => panic!("expected NotDelivered, got {other:?}"),
        }
        peer.assert_silent(Duration::from_millis(50)).await;
        let mut byte = [0u8; 1];
        watch.set_nonblocking(false).unwrap();
        watch.set_read_timeout(Some(util::STEP)).unwrap();
        assert_eq!((&watch).read(&mut byte).unwrap(), 0, "the descriptor was closed");
        drop((chan, peer, watch));
        util::assert_fds_settle_to(&baseline).await;
    });
}

// ---------------------------------------------------------------------------------------------
// Found by review: the bounds must not deadlock well-behaved peers, nor be skipped at exit
// ---------------------------------------------------------------------------------------------

/// Two handoff peers that each await the delivery of 200 handles (more than `recv_handles`)
/// before receiving any: each one's acknowledgements sit behind the other's handles, so a
/// receive queue that stops reading at its budget while a delivery is awaited deadlocks them.
#[test]
fn peers_awaiting_deliveries_before_receiving_do_not_deadlock() {
    run(async {
        let baseline = util::open_fds();
        let (a, b) = Channel::pair().unwrap();
        let side = |chan: Channel| async move {
            let (sender, mut receiver) = chan.split();
            for i in 0..200 {
                let (mine, _theirs) = std::os::unix::net::UnixStream::pair().unwrap();
                sender.send_handle(&i, mine).await.unwrap();
            }
            let mut got = 0;
            while got < 200 {
                let message = receiver.recv().await.unwrap().unwrap();
                assert!(message.handle().is_some());
                got += 1;
            }
            (sender, receiver)
        };
        let (a, b) = util::within("both sides", futures_join(side(a), side(b))).await;
        drop((a, b));
        util::assert_fds_settle_to(&baseline).await;
    });
}

async fn futures_join<A: std::future::Future, B: std::future::Future>(a: A, b: B) -> (A::Output, B::Output) {
    tokio::join!(a, b)
}

/// While lingering at exit (a handle awaiting its ACK, a message held behind it), a peer that
/// floods handle messages without descriptors and never reads cannot make the channel read on
/// past its bounds: the flood stalls.
#[test]
fn lingering_at_exit_keeps_to_the_bounds() {
    let _serial = util::serial();
    let (ours, theirs) = std::os::unix::net::UnixStream::pair().unwrap();
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let chan = runtime.block_on(async {
        let chan = Channel::with_config(OwnedFd::from(ours), ChannelConfig::default().linger(Duration::from_secs(2))).unwrap();
        let (mine, _other) = std::os::unix::net::UnixStream::pair().unwrap();
        let delivery = chan.sender().queue_handle(&"h", mine).await.unwrap();
        chan.send(&"held behind the handle").await.unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await; // the handle is written
        drop(delivery);
        chan
    });
    let flood = std::thread::spawn(move || {
        use std::io::Write;
        let line = b"{\"cmd\":\"NODE_HANDLE\"}\n".repeat(4096);
        theirs.set_write_timeout(Some(Duration::from_millis(500))).unwrap();
        let mut written = 0usize;
        let started = Instant::now();
        while started.elapsed() < Duration::from_secs(4) && written < 256 << 20 {
            match (&theirs).write(&line) {
                Ok(n) => written += n,
                Err(_) => break, // stalled for 500 ms, or the channel closed
            }
        }
        (written, theirs)
    });
    std::thread::sleep(Duration::from_millis(100));
    drop(runtime); // main returned: the channel lingers (2 s) with its frames unwritten
    drop(chan);
    let (written, theirs) = flood.join().unwrap();
    // The kernel's buffer and one read (~0.6 MiB here); without the bounds, 11 MiB in a debug
    // build and hundreds in a release one.
    assert!(written < 2 << 20, "the lingering channel read {} KiB of handle messages", written >> 10);
    drop(theirs);
}

/// A count from the peer is its claim: an absurd one saturates instead of overflowing.
#[test]
fn an_absurd_count_from_the_peer_saturates() {
    run(async {
        let baseline = util::open_fds();
        let (chan, mut peer) = raw_channel(ChannelConfig::default());
        let server = handoff::Server::bind("127.0.0.1:0").await.unwrap();
        let client = std::net::TcpStream::connect(server.local_addr().unwrap()).unwrap();
        let connection = server.accept().await.unwrap();
        // One connection stays here, so ours + the peer's claim would overflow.
        let kept_client = std::net::TcpStream::connect(server.local_addr().unwrap()).unwrap();
        let kept = server.accept().await.unwrap();
        let sending = chan.sender().clone();
        let delivery = tokio::spawn(async move { sending.send_handle(&"c", connection).await.is_ok() });
        let (_, fds) = peer.frame().await;
        peer.write(ACK).await;
        assert!(util::within("delivery", delivery).await.unwrap());
        drop(fds);
        let server = std::sync::Arc::new(server);
        let counting = tokio::spawn({
            let server = server.clone();
            async move { server.get_connections().await }
        });
        let (line, _) = peer.frame().await;
        let request: serde_json::Value = serde_json::from_slice(&line).unwrap();
        assert_eq!(request["cmd"], "NODE_SOCKET_GET_COUNT");
        let reply = json!({"cmd": "NODE_SOCKET_COUNT", "key": request["key"], "count": u64::MAX});
        peer.write(format!("{reply}\n").as_bytes()).await;
        assert_eq!(util::within("the count", counting).await.unwrap().unwrap(), usize::MAX);
        drop((chan, peer, client, server, kept, kept_client));
        util::assert_fds_settle_to(&baseline).await;
    });
}

/// A close request for one key does not postpone the check of another key's pending one.
#[test]
fn close_requests_for_other_keys_do_not_postpone_a_pending_one() {
    run(async {
        let baseline = util::open_fds();
        let (mut chan, mut peer) = raw_channel(ChannelConfig::default());
        let (held, watches) = receive_keyed_sockets(&mut chan, &mut peer, "4:127.0.0.1:1", 1).await;
        peer.write(&requests("NODE_SOCKET_NOTIFY_CLOSE", std::iter::once("4:127.0.0.1:1".to_owned()))).await;
        peer.assert_silent(Duration::from_millis(100)).await;
        drop(held);
        let started = Instant::now();
        let other = requests("NODE_SOCKET_NOTIFY_CLOSE", std::iter::once("4:127.0.0.1:2".to_owned()));
        let mut answered = false;
        while started.elapsed() < Duration::from_secs(2) {
            peer.write(&other).await;
            tokio::time::sleep(Duration::from_millis(30)).await;
            while let Ok(n) = tokio::time::timeout(Duration::from_millis(1), peer.fill()).await {
                if n == 0 {
                    break;
                }
            }
            let text = String::from_utf8_lossy(&peer.buf).into_owned();
            if text.contains("4:127.0.0.1:1") {
                answered = true;
                break;
            }
        }
        assert!(answered, "ALL_CLOSED for the first key never came while other requests arrived");
        assert!(started.elapsed() < Duration::from_millis(500), "came after {:?}", started.elapsed());
        drop((chan, peer, watches));
        util::assert_fds_settle_to(&baseline).await;
    });
}

fn vm_rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

/// The smallest messages cost a hundred times their size in the receive queue: reads shrink as
/// the queue fills, so a non-reading receiver holds about `recv_buffer`, not a read's worth of
/// tiny messages more.
#[test]
fn a_flood_of_tiny_messages_holds_about_recv_buffer() {
    run(async {
        let baseline = util::open_fds();
        let (chan, peer) = raw_channel(ChannelConfig::default().recv_buffer(4 << 20));
        let data = b"1\n".repeat(8 << 20);
        let before = vm_rss_kib();
        let written = flood(&peer, &data, Duration::from_millis(500)).await;
        assert!(written < data.len(), "16 MiB of messages read for a receiver that takes none");
        let grown = vm_rss_kib().saturating_sub(before);
        assert!(grown < 10 << 10, "RSS grew {grown} KiB against a 4 MiB recv_buffer");
        drop((chan, peer, data));
        util::assert_fds_settle_to(&baseline).await;
    });
}

/// Callers waiting for room in `send_handles` hold no descriptor while they wait (a `KeepOpen`
/// duplicate is made once there is room).
#[test]
fn keep_open_callers_waiting_for_room_hold_no_duplicate() {
    run(async {
        let baseline = util::open_fds();
        let (chan, peer) = raw_channel(ChannelConfig::default().send_handles(1));
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let first = chan.sender().queue_handle(&0, handoff::KeepOpen(&listener)).await.unwrap();
        let listener = std::sync::Arc::new(listener);
        let before = util::open_fds().len();
        let mut waiting = Vec::new();
        for i in 1..=20 {
            let (sender, listener) = (chan.sender().clone(), listener.clone());
            waiting.push(tokio::spawn(async move { sender.queue_handle(&i, handoff::KeepOpen(&*listener)).await.map(drop) }));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(waiting.iter().all(|w| !w.is_finished()));
        let during = util::open_fds().len();
        assert!(during <= before + 1, "{} descriptors held by waiting callers", during - before);
        drop((chan, peer));
        for w in waiting {
            let _ = w.await;
        }
        let _ = first.await;
        drop(listener);
        util::assert_fds_settle_to(&baseline).await;
    });
}

/// The same socket sent again after its first copy was closed, landing on the same number, is
/// one open socket, not two.
#[test]
fn a_socket_received_again_on_the_same_number_counts_once() {
    run(async {
        let baseline = util::open_fds();
        let (mut chan, mut peer) = raw_channel(ChannelConfig::default());
        let key = "4:127.0.0.1:3";
        let (socket, watch) = probe();
        let line = handle_frame(json!({"cmd": "NODE_HANDLE", "type": "net.Socket", "msg": 1, "key": key}));
        peer.send(&line, &[socket.as_fd()]).await;
        assert!(peer.expect_frame(ACK).await.is_empty());
        let first = OwnedFd::from(util::within("first", chan.recv()).await.unwrap().unwrap().take_handle().unwrap());
        let number = std::os::fd::AsRawFd::as_raw_fd(&first);
        drop(first);
        peer.send(&line, &[socket.as_fd()]).await;
        assert!(peer.expect_frame(ACK).await.is_empty());
        let second = OwnedFd::from(util::within("second", chan.recv()).await.unwrap().unwrap().take_handle().unwrap());
        assert_eq!(std::os::fd::AsRawFd::as_raw_fd(&second), number, "the number was reused");
        assert_eq!(count_reply(&mut peer, key).await, 1);
        drop(second);
        assert_eq!(count_reply(&mut peer, key).await, 0);
        drop((chan, peer, socket, watch));
        util::assert_fds_settle_to(&baseline).await;
    });
}
