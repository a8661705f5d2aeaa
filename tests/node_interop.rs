//! Interop with real Node processes, in both roles.
//!
//! * Rust parent, Node child: the test process spawns `tests/node/interop_peer.js` (a responder
//!   driven by `{op: ...}` commands) or a smaller script, and checks what comes back.
//! * Node parent, Rust child: the test runs `tests/node/interop_parent.js SCENARIO CHILD`, which
//!   spawns a Rust child (`examples/interop_child`, the Rust twin of `interop_peer.js`, or the
//!   `server_child` / `udp_child` examples) with `spawn(path, [], {stdio: [0, 1, 2, 'ipc']})` and
//!   prints its observations as JSON lines; the test checks them.
//!
//! The little protocols spoken over handed-over handles are described in
//! `tests/node/interop_lib.js` (stream: greeting, `ping`, answer; server: `<who> accepted`; UDP:
//! `<who>:payload`). Every test runs through `util::serial_test` (one at a time, each on its own
//! current-thread runtime built under the lock): one of them counts this process's fds.

mod util;

use std::collections::VecDeque;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::linux::net::SocketAddrExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use handoff::handle::{DgramType, FdKind, HandleType, KeepOpen, Native, ReceivedHandle};
use handoff::{Channel, Child, Command, Message, SendError};
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// The values both sides send (Node loads the same file).
const VALUES: &str = include_str!("node/interop_values.json");
/// `bigString` in interop_lib.js: 15 UTF-8 bytes per repetition.
const BIG_UNIT: &str = "abc\u{fc}\u{20ac}\u{1F600}\u{2028}";
/// Repetitions for a little over 1 MiB.
const BIG_REPS: usize = 69_906;
const IO_TIMEOUT: Option<Duration> = Some(util::STEP);

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

fn value(message: &Message) -> Value {
    message.value().unwrap_or_else(|e| panic!("message {:?} is not JSON: {e}", message.json()))
}

fn values() -> Vec<Value> {
    serde_json::from_str(VALUES).expect("interop_values.json")
}

/// A Node child speaking the `interop_peer.js` commands, with the messages received but not yet
/// asked for.
struct Peer {
    child: Child,
    stash: VecDeque<Message>,
}

impl Peer {
    fn spawn(node: &Path) -> Peer {
        let child = Command::new(node)
            .arg(util::node_script("interop_peer.js"))
            .kill_on_drop(true)
            .spawn()
            .expect("spawn node interop_peer.js");
        Peer { child, stash: VecDeque::new() }
    }

    async fn send(&self, message: Value) {
        self.child.send(&message).await.expect("send to node");
    }

    async fn recv_new(&mut self) -> Message {
        match util::within("a message from node", self.child.recv()).await {
            Some(Ok(message)) => message,
            Some(Err(e)) => panic!("error receiving from node: {e}"),
            None => panic!("the channel to node closed unexpectedly"),
        }
    }

    /// The next message, in arrival order.
    async fn recv(&mut self) -> Message {
        match self.stash.pop_front() {
            Some(message) => message,
            None => self.recv_new().await,
        }
    }

    /// The first message matching `pred`; others are kept for later, in order.
    async fn wait_for(&mut self, pred: impl Fn(&Value) -> bool) -> Message {
        if let Some(i) = self.stash.iter().position(|m| pred(&value(m))) {
            return self.stash.remove(i).expect("position is valid");
        }
        loop {
            let message = self.recv_new().await;
            if pred(&value(&message)) {
                return message;
            }
            self.stash.push_back(message);
        }
    }

    async fn op(&mut self, op: &str, id: u64) -> Message {
        self.wait_for(|v| v["op"] == op && v["id"] == id).await
    }

    /// Asks node to give a handle of `kind`; returns its message and the handle, once node has
    /// released its own copy.
    async fn take(&mut self, kind: &str, id: u64) -> (Value, ReceivedHandle) {
        self.send(json!({"op": "give", "kind": kind, "id": id})).await;
        let mut given = self.op("given", id).await;
        let handle =
            given.take_handle().unwrap_or_else(|| panic!("{kind} arrived without a handle"));
        self.op("released", id).await;
        (value(&given), handle)
    }

    async fn client_got(&mut self, id: u64) -> Value {
        value(&self.op("client-got", id).await)["data"].clone()
    }

    /// Disconnects and expects node to exit 0.
    async fn finish(mut self) {
        self.child.disconnect();
        let status = util::within("node to exit", self.child.wait()).await.expect("wait");
        assert!(status.success(), "node exited with {status}");
    }
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    util::within("a blocking client", tokio::task::spawn_blocking(f)).await.expect("client thread")
}

/// Stream protocol, client side (blocking): read the greeting, send `ping`, read to the end.
fn stream_client<S: Read + Write>(stream: S) -> String {
    let mut stream = BufReader::new(stream);
    let mut text = String::new();
    stream.read_line(&mut text).expect("read greeting");
    stream.get_mut().write_all(b"ping\n").expect("write ping");
    stream.read_to_string(&mut text).expect("read answer");
    text
}

/// Stream protocol, receiving side: greet, answer the first line, end.
async fn serve_stream<S: AsyncRead + AsyncWrite + Unpin>(stream: S, who: &str) {
    let mut stream = tokio::io::BufReader::new(stream);
    stream.get_mut().write_all(format!("{who} says hi\n").as_bytes()).await.expect("greet");
    let mut line = String::new();
    util::within("the client's line", stream.read_line(&mut line)).await.expect("read line");
    let answer = format!("{who} got: {}\n", line.trim_end());
    stream.get_mut().write_all(answer.as_bytes()).await.expect("answer");
    stream.get_mut().shutdown().await.expect("shutdown");
}

fn tcp_pair() -> (std::net::TcpStream, std::net::TcpStream) {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let client = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
    let (accepted, _) = listener.accept().unwrap();
    client.set_read_timeout(IO_TIMEOUT).unwrap();
    (client, accepted)
}

fn read_all<R: Read>(mut r: R) -> String {
    let mut text = String::new();
    r.read_to_string(&mut text).expect("read to end");
    text
}

fn udp_round_trip(target: std::net::SocketAddr, payload: &str) -> String {
    let bind = if target.is_ipv4() { "127.0.0.1:0" } else { "[::1]:0" };
    let client = std::net::UdpSocket::bind(bind).unwrap();
    client.set_read_timeout(IO_TIMEOUT).unwrap();
    client.send_to(payload.as_bytes(), target).unwrap();
    let mut buf = [0u8; 2048];
    let (n, _) = client.recv_from(&mut buf).expect("a UDP answer");
    String::from_utf8_lossy(&buf[..n]).into_owned()
}

/// Answers every datagram on `socket` with `rust:<payload>`.
fn serve_udp(socket: tokio::net::UdpSocket) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut buf = vec![0u8; 2048];
        while let Ok((n, from)) = socket.recv_from(&mut buf).await {
            let mut reply = b"rust:".to_vec();
            reply.extend_from_slice(&buf[..n]);
            let _ = socket.send_to(&reply, from).await;
        }
    })
}

fn temp_socket_path(tag: &str) -> PathBuf {
    let path = std::env::temp_dir()
        .join(format!("handoff-interop-test-{}-{tag}.sock", std::process::id()));
    let _ = std::fs::remove_file(&path);
    path
}

/// Runs `node interop_parent.js SCENARIO CHILD` and returns its JSON lines (the Rust child's
/// stdout lines are among them). Fails on an `error` line or a non-zero exit.
async fn node_parent(node: &Path, scenario: &str, child: &Path) -> Vec<Value> {
    let process = tokio::process::Command::new(node)
        .arg(util::node_script("interop_parent.js"))
        .arg(scenario)
        .arg(child)
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn node interop_parent.js");
    let output =
        util::within(&format!("node parent scenario {scenario}"), process.wait_with_output())
            .await
            .expect("node parent output");
    let text = String::from_utf8(output.stdout).expect("utf-8 output");
    let lines: Vec<Value> = text
        .lines()
        .map(|line| {
            serde_json::from_str(line).unwrap_or_else(|e| panic!("not a JSON line ({e}): {line}"))
        })
        .collect();
    if let Some(error) = lines.iter().find(|l| l["case"] == "error") {
        panic!(
            "scenario {scenario} failed in node: {}",
            error["error"].as_str().unwrap_or_default()
        );
    }
    assert!(output.status.success(), "node parent exited with {}; output:\n{text}", output.status);
    lines
}

fn case<'a>(lines: &'a [Value], name: &str) -> &'a Value {
    lines
        .iter()
        .find(|l| l["case"] == name)
        .unwrap_or_else(|| panic!("no {name:?} line in {lines:#?}"))
}

/// The `end` line: the Rust child exited 0 after node saw 'disconnect' and then 'exit'.
fn assert_clean_end(lines: &[Value]) {
    let end = case(lines, "end");
    assert_eq!(end["code"], 0, "child exit: {end}");
    assert_eq!(end["signal"], Value::Null, "child exit: {end}");
    assert_eq!(end["events"], json!(["disconnect", "exit"]), "node parent events: {end}");
}

// ---------------------------------------------------------------------------------------------
// 1. The seed's three combinations
// ---------------------------------------------------------------------------------------------

async fn assert_serves_seed_reply(mut process: tokio::process::Child) {
    let addr = util::read_listening_addr(process.stdout.take().expect("piped stdout")).await;
    for _ in 0..5 {
        let reply = blocking(move || util::tcp_read_all(addr)).await;
        assert_eq!(reply, "Child handled it.");
    }
    process.kill().await.expect("kill the parent");
}

#[test]
fn seed_rust_parent_with_rust_child() {
    util::serial_test(async {
        let parent = tokio::process::Command::new(util::example("parent"))
            .args(["--port", "0"])
            .stdout(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("spawn parent example");
        assert_serves_seed_reply(parent).await;
    })
}

#[test]
fn seed_rust_parent_with_node_child() {
    util::serial_test(async {
        let node = require_node!();
        let parent = tokio::process::Command::new(util::example("parent"))
            .args(["--port", "0", "--"])
            .arg(&node)
            .arg(util::node_script("child.js"))
            .stdout(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("spawn parent example");
        assert_serves_seed_reply(parent).await;
    })
}

#[test]
fn seed_node_parent_with_rust_child() {
    util::serial_test(async {
        let node = require_node!();
        let parent = tokio::process::Command::new(&node)
            .arg(util::node_script("parent.js"))
            .arg("0")
            .arg(util::example("child"))
            .stdout(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("spawn node parent.js");
        assert_serves_seed_reply(parent).await;
    })
}

// ---------------------------------------------------------------------------------------------
// 2. Plain messages
// ---------------------------------------------------------------------------------------------

#[test]
fn messages_rust_parent_node_child() {
    util::serial_test(async {
        let node = require_node!();
        let mut peer = Peer::spawn(&node);
        let values = values();

        // Node echoes what we send: objects, arrays, unicode, numbers, booleans, null, strings.
        for v in &values {
            peer.send(v.clone()).await;
        }
        for v in &values {
            assert_eq!(value(&peer.recv().await), *v, "node's echo");
        }

        // Node sends its own (JSON.stringify writes U+2028 and non-ASCII raw).
        peer.send(json!({"op": "values"})).await;
        for v in &values {
            assert_eq!(value(&peer.recv().await), *v, "node's own value");
        }
        assert_eq!(value(&peer.recv().await), json!({"op": "values-done", "count": values.len()}));

        // A 1 MiB string, both ways.
        let big = BIG_UNIT.repeat(BIG_REPS);
        assert!(big.len() >= 1 << 20);
        peer.send(json!({"big": big})).await;
        let echo = peer.recv().await;
        assert_eq!(
            echo.json().len(),
            big.len() + r#"{"big":""}"#.len(),
            "echo is one raw UTF-8 line"
        );
        assert!(value(&echo)["big"] == big.as_str(), "1 MiB echo differs");
        peer.send(json!({"op": "big", "reps": BIG_REPS})).await;
        assert!(value(&peer.recv().await)["value"] == big.as_str(), "node's 1 MiB string differs");

        // 10,000 messages, in order, both ways.
        for seq in 0..10_000 {
            peer.child.send(&json!({"seq": seq})).await.unwrap();
        }
        for seq in 0..10_000 {
            assert_eq!(value(&peer.recv().await), json!({"seq": seq}), "echo order");
        }
        peer.send(json!({"op": "many", "n": 10_000})).await;
        for seq in 0..10_000 {
            assert_eq!(value(&peer.recv().await), json!({"seq": seq}), "node's order");
        }
        peer.finish().await;
    })
}

/// Doubles survive both ways bit for bit (checked in Node with `Object.is` and the bits): a Rust
/// child that parses Node's numbers and writes them back changes none (`2**70` used to come
/// back one ULP off), and what Rust writes Node reads exactly (subnormals, `-0`, `2**53`...).
#[test]
fn doubles_round_trip_exactly_node_parent_rust_child() {
    util::serial_test(async {
        let node = require_node!();
        let lines = node_parent(&node, "doubles", &util::example("interop_child")).await;
        let echo = case(&lines, "doubles-echo");
        assert_eq!(echo["count"], 2000);
        assert_eq!(echo["changedCount"], 0, "doubles changed by a Rust round trip: {echo}");
        let made = case(&lines, "doubles-from-rust");
        assert_eq!(made["count"], 2000);
        assert_eq!(made["wrongCount"], 0, "doubles Node read differently: {made}");
        assert_clean_end(&lines);
    })
}

#[test]
fn messages_node_parent_rust_child() {
    util::serial_test(async {
        let node = require_node!();
        let lines = node_parent(&node, "messages", &util::example("interop_child")).await;
        let values = Value::Array(values());
        assert_eq!(
            case(&lines, "echo-values")["echoes"],
            values,
            "Rust child's echoes, as node parsed them"
        );
        assert_eq!(
            case(&lines, "own-values")["values"],
            values,
            "Rust child's own values, as node parsed them"
        );
        for name in ["echo-big", "own-big"] {
            assert_eq!(case(&lines, name)["equal"], true, "{name}");
            assert_eq!(case(&lines, name)["bytes"], BIG_UNIT.len() * BIG_REPS, "{name}");
        }
        for name in ["echo-many", "own-many"] {
            assert_eq!(case(&lines, name)["count"], 10_000, "{name}");
            assert_eq!(case(&lines, name)["inOrder"], true, "{name}");
        }
        assert_clean_end(&lines);
    })
}

// ---------------------------------------------------------------------------------------------
// 3. Handles, every type, both ways
// ---------------------------------------------------------------------------------------------

#[test]
fn handles_from_rust_parent_to_node_child() {
    util::serial_test(async {
        let node = require_node!();
        let mut peer = Peer::spawn(&node);
        let node_stream_reply = "node says hi\nnode got: ping\n";

        // TCP net.Socket: node writes and reads on it; our client outside sees it.
        let (client, accepted) = tcp_pair();
        peer.child
            .send_handle(&json!({"op": "take", "as": "stream", "id": 1}), accepted)
            .await
            .unwrap();
        assert_eq!(value(&peer.op("took", 1).await)["got"], "net.Socket");
        assert_eq!(blocking(move || stream_client(client)).await, node_stream_reply);

        // Unix stream net.Socket.
        let (ours, theirs) = std::os::unix::net::UnixStream::pair().unwrap();
        ours.set_read_timeout(IO_TIMEOUT).unwrap();
        peer.child
            .send_handle(&json!({"op": "take", "as": "stream", "id": 2}), theirs)
            .await
            .unwrap();
        assert_eq!(value(&peer.op("took", 2).await)["got"], "net.Socket");
        assert_eq!(blocking(move || stream_client(ours)).await, node_stream_reply);

        // net.Native: node gets the raw TCP handle (and wraps it in a net.Socket itself).
        let (client, accepted) = tcp_pair();
        accepted.set_nonblocking(true).unwrap();
        let accepted = tokio::net::TcpStream::from_std(accepted).unwrap();
        peer.child
            .send_handle(&json!({"op": "take", "as": "native-stream", "id": 3}), Native(accepted))
            .await
            .unwrap();
        assert_eq!(
            value(&peer.op("took", 3).await)["got"],
            "TCP",
            "a raw handle, not a net.Socket"
        );
        assert_eq!(blocking(move || stream_client(client)).await, node_stream_reply);

        // TCP net.Server, kept open on our side: node accepts; once node closes its copy, ours still
        // listens and we accept.
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        peer.child
            .send_handle(&json!({"op": "take", "as": "server", "id": 4}), KeepOpen(&listener))
            .await
            .unwrap();
        let took = value(&peer.op("took", 4).await);
        assert_eq!(took["got"], "net.Server");
        assert_eq!(took["address"]["port"], addr.port());
        for _ in 0..3 {
            assert_eq!(blocking(move || util::tcp_read_all(addr)).await, "node accepted\n");
        }
        peer.send(json!({"op": "close-server", "id": 4})).await;
        peer.op("closed-server", 4).await;
        // Node made the shared open file description non-blocking (libuv does); accept blocking here.
        listener.set_nonblocking(false).unwrap();
        let acceptor = std::thread::spawn(move || {
            let (mut socket, _) = listener.accept().unwrap();
            socket.write_all(b"rust accepted\n").unwrap();
        });
        assert_eq!(blocking(move || util::tcp_read_all(addr)).await, "rust accepted\n");
        acceptor.join().unwrap();

        // Unix net.Server, the same way.
        let path = temp_socket_path("server");
        let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
        peer.child
            .send_handle(&json!({"op": "take", "as": "server", "id": 5}), KeepOpen(&listener))
            .await
            .unwrap();
        assert_eq!(value(&peer.op("took", 5).await)["got"], "net.Server");
        for _ in 0..3 {
            let path = path.clone();
            let reply = blocking(move || {
                let stream = std::os::unix::net::UnixStream::connect(path).unwrap();
                stream.set_read_timeout(IO_TIMEOUT).unwrap();
                read_all(stream)
            })
            .await;
            assert_eq!(reply, "node accepted\n");
        }
        peer.send(json!({"op": "close-server", "id": 5})).await;
        peer.op("closed-server", 5).await;
        assert!(path.exists(), "node must not unlink a path it did not bind");
        listener.set_nonblocking(false).unwrap();
        let acceptor = std::thread::spawn(move || {
            let (mut socket, _) = listener.accept().unwrap();
            socket.write_all(b"rust accepted\n").unwrap();
        });
        let connect_path = path.clone();
        let reply = blocking(move || {
            read_all(std::os::unix::net::UnixStream::connect(connect_path).unwrap())
        })
        .await;
        assert_eq!(reply, "rust accepted\n");
        acceptor.join().unwrap();
        let _ = std::fs::remove_file(&path);

        // dgram.Socket, udp4 and udp6: node builds a dgram.Socket of the type our envelope names.
        for (id, bind, type_) in [(6, "127.0.0.1:0", "udp4"), (7, "[::1]:0", "udp6")] {
            let socket = std::net::UdpSocket::bind(bind).unwrap();
            let addr = socket.local_addr().unwrap();
            peer.child
                .send_handle(&json!({"op": "take", "as": "dgram", "id": id}), socket)
                .await
                .unwrap();
            let took = value(&peer.op("took", id).await);
            assert_eq!(took["got"], "dgram.Socket");
            assert_eq!(took["type"], type_, "socket.type comes from the envelope's dgramType");
            assert_eq!(took["address"]["port"], addr.port());
            assert_eq!(blocking(move || udp_round_trip(addr, "payload")).await, "node:payload");
        }

        // dgram.Native: node gets the raw UDP handle and reads from it.
        let socket = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let addr = socket.local_addr().unwrap();
        peer.child
            .send_handle(&json!({"op": "take", "as": "native-dgram", "id": 8}), Native(socket))
            .await
            .unwrap();
        assert_eq!(value(&peer.op("took", 8).await)["got"], "UDP");
        let client = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        client.send_to(b"payload", addr).unwrap();
        assert_eq!(value(&peer.op("datagram", 8).await)["data"], "payload");

        peer.finish().await;
    })
}

#[test]
fn handles_from_node_child_to_rust_parent() {
    util::serial_test(async {
        let node = require_node!();
        let mut peer = Peer::spawn(&node);
        let rust_stream_reply = "rust says hi\nrust got: ping\n";

        // TCP net.Socket accepted by a server that listened with listen(0, '127.0.0.1').
        let (_, handle) = peer.take("tcp-socket", 1).await;
        assert_eq!(handle.handle_type(), HandleType::NetSocket);
        assert_eq!(handle.kind(), FdKind::TcpStream);
        assert_eq!(handle.key(), Some("4:127.0.0.1:0"), "the key uses the port given to listen()");
        serve_stream(tokio::net::TcpStream::try_from(handle).unwrap(), "rust").await;
        assert_eq!(peer.client_got(1).await, rust_stream_reply);

        // Unix stream net.Socket from a server on a path.
        let (given, handle) = peer.take("unix-socket", 2).await;
        assert_eq!(handle.handle_type(), HandleType::NetSocket);
        assert_eq!(handle.kind(), FdKind::UnixStream);
        let key = format!("-1:{}:-1", given["path"].as_str().unwrap());
        assert_eq!(handle.key(), Some(key.as_str()));
        serve_stream(tokio::net::UnixStream::try_from(handle).unwrap(), "rust").await;
        assert_eq!(peer.client_got(2).await, rust_stream_reply);

        // net.Native: a connected socket's _handle.
        let (_, handle) = peer.take("native-tcp-socket", 3).await;
        assert_eq!(handle.handle_type(), HandleType::NetNative);
        assert_eq!(handle.kind(), FdKind::TcpStream);
        assert_eq!(handle.key(), None);
        serve_stream(tokio::net::TcpStream::try_from(handle).unwrap(), "rust").await;
        assert_eq!(peer.client_got(3).await, rust_stream_reply);

        // TCP net.Server, and net.Native carrying a server's _handle: we accept on them.
        for (id, kind, handle_type) in [
            (4, "tcp-server", HandleType::NetServer),
            (5, "native-tcp-server", HandleType::NetNative),
        ] {
            let (given, handle) = peer.take(kind, id).await;
            assert_eq!(handle.handle_type(), handle_type, "{kind}");
            assert_eq!(handle.kind(), FdKind::TcpListener, "{kind}");
            let listener: tokio::net::TcpListener = handle.try_into().unwrap();
            let addr = listener.local_addr().unwrap();
            assert_eq!(given["port"], addr.port());
            let server = tokio::spawn(async move {
                while let Ok((mut socket, _)) = listener.accept().await {
                    let _ = socket.write_all(b"rust accepted\n").await;
                }
            });
            for _ in 0..3 {
                assert_eq!(
                    blocking(move || util::tcp_read_all(addr)).await,
                    "rust accepted\n",
                    "{kind}"
                );
            }
            server.abort();
        }

        // Unix net.Server (abstract name: node unlinks a path it bound when it closes its copy).
        let (given, handle) = peer.take("unix-server", 6).await;
        assert_eq!(handle.handle_type(), HandleType::NetServer);
        assert_eq!(handle.kind(), FdKind::UnixListener);
        let listener: std::os::unix::net::UnixListener = handle.try_into().unwrap();
        let bound = listener
            .local_addr()
            .unwrap()
            .as_abstract_name()
            .expect("an abstract address")
            .to_vec();
        // Node v20 binds an abstract name with the whole sun_path (108 bytes), NUL-padded: the
        // address is the name plus trailing NULs, and a client must connect with exactly that.
        let name = given["abstract"].as_str().unwrap();
        assert!(bound.starts_with(name.as_bytes()), "bound to {bound:?}");
        assert!(bound[name.len()..].iter().all(|&b| b == 0), "bound to {bound:?}");
        listener.set_nonblocking(true).unwrap();
        let listener = tokio::net::UnixListener::from_std(listener).unwrap();
        let server = tokio::spawn(async move {
            while let Ok((mut socket, _)) = listener.accept().await {
                let _ = socket.write_all(b"rust accepted\n").await;
            }
        });
        for _ in 0..3 {
            let bound = bound.clone();
            let reply = blocking(move || {
                let addr = std::os::unix::net::SocketAddr::from_abstract_name(bound).unwrap();
                let stream = std::os::unix::net::UnixStream::connect_addr(&addr).unwrap();
                stream.set_read_timeout(IO_TIMEOUT).unwrap();
                read_all(stream)
            })
            .await;
            assert_eq!(reply, "rust accepted\n");
        }
        server.abort();

        // dgram.Socket udp4 / udp6 and dgram.Native: datagrams reach us.
        for (id, kind, handle_type, fd_kind, dgram_type) in [
            (7, "udp4", HandleType::DgramSocket, FdKind::Udp4, Some(DgramType::Udp4)),
            (8, "udp6", HandleType::DgramSocket, FdKind::Udp6, Some(DgramType::Udp6)),
            (9, "native-udp", HandleType::DgramNative, FdKind::Udp4, Some(DgramType::Udp4)),
        ] {
            let (given, handle) = peer.take(kind, id).await;
            assert_eq!(handle.handle_type(), handle_type, "{kind}");
            assert_eq!(handle.kind(), fd_kind, "{kind}");
            assert_eq!(handle.dgram_type(), dgram_type, "{kind}");
            let socket: tokio::net::UdpSocket = handle.try_into().unwrap();
            let addr = socket.local_addr().unwrap();
            assert_eq!(given["port"], addr.port(), "{kind}");
            let server = serve_udp(socket);
            assert_eq!(
                blocking(move || udp_round_trip(addr, "payload")).await,
                "rust:payload",
                "{kind}"
            );
            server.abort();
        }

        peer.finish().await;
    })
}

/// Node parent <-> Rust child, every handle type both ways. Includes the key check: a socket
/// accepted by a Node parent's `listen(0, '127.0.0.1')` server arrives in the Rust child with
/// `key() == Some("4:127.0.0.1:0")`.
#[test]
fn handles_between_node_parent_and_rust_child() {
    util::serial_test(async {
        let node = require_node!();
        let lines = node_parent(&node, "handles", &util::example("interop_child")).await;

        // Node parent -> Rust child: what the child saw, and the data through the handle.
        let rust_stream_reply = "rust says hi\nrust got: ping\n";
        let expect_took = |kind: &str, handle_type: &str, fd_kind: &str| {
            let took = &case(&lines, &format!("to-rust-{kind}"))["took"];
            assert_eq!(took["handleType"], handle_type, "{kind}: {took}");
            assert_eq!(took["kind"], fd_kind, "{kind}: {took}");
            took.clone()
        };
        let took = expect_took("tcp-socket", "net.Socket", "TcpStream");
        assert_eq!(
            took["key"], "4:127.0.0.1:0",
            "key of a socket from a listen(0, '127.0.0.1') server"
        );
        assert!(expect_took("unix-socket", "net.Socket", "UnixStream")["key"]
            .as_str()
            .is_some_and(|k| k.starts_with("-1:/") && k.ends_with(".sock:-1")));
        assert_eq!(expect_took("native-tcp-socket", "net.Native", "TcpStream")["key"], Value::Null);
        for kind in ["tcp-socket", "unix-socket", "native-tcp-socket"] {
            assert_eq!(
                case(&lines, &format!("to-rust-{kind}"))["clientGot"],
                rust_stream_reply,
                "{kind}"
            );
        }
        expect_took("tcp-server", "net.Server", "TcpListener");
        expect_took("unix-server", "net.Server", "UnixListener");
        expect_took("native-tcp-server", "net.Native", "TcpListener");
        for kind in ["tcp-server", "unix-server", "native-tcp-server"] {
            assert_eq!(
                case(&lines, &format!("to-rust-{kind}"))["replies"],
                json!(["rust accepted\n", "rust accepted\n", "rust accepted\n"]),
                "{kind}"
            );
        }
        assert_eq!(expect_took("udp4", "dgram.Socket", "Udp4")["dgramType"], "udp4");
        assert_eq!(expect_took("udp6", "dgram.Socket", "Udp6")["dgramType"], "udp6");
        expect_took("native-udp", "dgram.Native", "Udp4");
        for kind in ["udp4", "udp6", "native-udp"] {
            assert_eq!(case(&lines, &format!("to-rust-{kind}"))["reply"], "rust:payload", "{kind}");
        }

        // Rust child -> Node parent: what Node built from each handle, and the data through it.
        let node_stream_reply = "node says hi\nnode got: ping\n";
        for (kind, got) in [
            ("tcp-socket", "net.Socket"),
            ("unix-socket", "net.Socket"),
            ("native-tcp-socket", "TCP"),
        ] {
            let line = case(&lines, &format!("from-rust-{kind}"));
            assert_eq!(line["got"], got, "{kind}");
            assert_eq!(line["clientGot"], node_stream_reply, "{kind}");
        }
        for (kind, got) in [
            ("tcp-server", "net.Server"),
            ("unix-server", "net.Server"),
            ("native-tcp-server", "TCP"),
        ] {
            let line = case(&lines, &format!("from-rust-{kind}"));
            assert_eq!(line["got"], got, "{kind}");
            assert_eq!(
                line["replies"],
                json!(["node accepted\n", "node accepted\n", "node accepted\n"]),
                "{kind}"
            );
        }
        for kind in ["udp4", "udp6"] {
            let line = case(&lines, &format!("from-rust-{kind}"));
            assert_eq!(line["got"], "dgram.Socket", "{kind}");
            assert_eq!(line["type"], kind, "{kind}: socket.type comes from dgramType");
            assert_eq!(line["reply"], "node:payload", "{kind}");
        }
        let line = case(&lines, "from-rust-native-udp");
        assert_eq!(line["got"], "UDP");
        assert_eq!(line["datagram"], "payload");
        assert_clean_end(&lines);
    })
}

/// What handoff writes for UDP handles, seen from a handoff receiver's internal-message feed:
/// `dgram.Socket` always carries `dgramType` (a Node receiver dies without it); `dgram.Native`
/// does not need it.
#[test]
fn rust_sent_dgram_envelopes_carry_dgram_type() {
    util::serial_test(async {
        let (a, mut b) = Channel::pair().unwrap();
        let mut internal = b.sender().internal_messages();
        for (bind, type_) in [("127.0.0.1:0", "udp4"), ("[::1]:0", "udp6")] {
            a.send_handle(&"udp", std::net::UdpSocket::bind(bind).unwrap()).await.unwrap();
            let envelope = util::within("the envelope", internal.recv()).await.unwrap();
            assert!(envelope.had_fd());
            assert_eq!(envelope.value().unwrap()["cmd"], "NODE_HANDLE");
            assert_eq!(envelope.value().unwrap()["type"], "dgram.Socket");
            assert_eq!(envelope.value().unwrap()["dgramType"], type_);
            let mut message = util::within("the message", b.recv()).await.unwrap().unwrap();
            assert_eq!(message.take_handle().unwrap().dgram_type(), DgramType::from_wire(type_));
        }
        a.send_handle(&"native", Native(std::net::UdpSocket::bind("127.0.0.1:0").unwrap()))
            .await
            .unwrap();
        let envelope = util::within("the envelope", internal.recv()).await.unwrap();
        assert_eq!(envelope.value().unwrap()["type"], "dgram.Native");
        b.recv().await.unwrap().unwrap();
    })
}

// ---------------------------------------------------------------------------------------------
// 4. server_child and udp_child under both parents
// ---------------------------------------------------------------------------------------------

#[test]
fn server_child_under_rust_parent() {
    util::serial_test(async {
        let mut child =
            Command::new(util::example("server_child")).kill_on_drop(true).spawn().unwrap();
        let pid = child.id().unwrap();
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        // By value: our copy is closed on the ACK, so only the child serves.
        child.send_handle(&"server", listener).await.unwrap();
        for _ in 0..3 {
            assert_eq!(
                blocking(move || util::tcp_read_all(addr)).await,
                format!("served by {pid}")
            );
        }
        child.disconnect();
        let status = util::within("server_child to exit", child.wait()).await.unwrap();
        assert_eq!(status.code(), Some(0));
    })
}

#[test]
fn udp_child_under_rust_parent() {
    util::serial_test(async {
        let mut child =
            Command::new(util::example("udp_child")).kill_on_drop(true).spawn().unwrap();
        let pid = child.id().unwrap();
        for bind in ["127.0.0.1:0", "[::1]:0"] {
            let socket = std::net::UdpSocket::bind(bind).unwrap();
            let addr = socket.local_addr().unwrap();
            child.send_handle(&"udp", socket).await.unwrap();
            assert_eq!(
                blocking(move || udp_round_trip(addr, "payload")).await,
                format!("{pid}:payload")
            );
        }
        child.disconnect();
        let status = util::within("udp_child to exit", child.wait()).await.unwrap();
        assert_eq!(status.code(), Some(0));
    })
}

#[test]
fn server_child_under_node_parent() {
    util::serial_test(async {
        let node = require_node!();
        let lines = node_parent(&node, "server-child", &util::example("server_child")).await;
        let line = case(&lines, "server-child");
        let expected = format!("served by {}", line["pid"]);
        assert_eq!(line["replies"], json!([expected, expected, expected]));
        assert_clean_end(&lines);
    })
}

#[test]
fn udp_child_under_node_parent() {
    util::serial_test(async {
        let node = require_node!();
        let lines = node_parent(&node, "udp-child", &util::example("udp_child")).await;
        let line = case(&lines, "udp-child");
        let pid = &line["pid"];
        assert_eq!(
            line["replies"],
            json!([format!("{pid}:one"), format!("{pid}:two"), format!("{pid}:three")])
        );
        assert_clean_end(&lines);
    })
}

// ---------------------------------------------------------------------------------------------
// 5. Internal messages never surface
// ---------------------------------------------------------------------------------------------

#[test]
fn internal_messages_rust_parent_node_child() {
    util::serial_test(async {
        let node = require_node!();
        let mut peer = Peer::spawn(&node);
        let mut internal = peer.child.sender().internal_messages();

        // Node sends {cmd:'NODE_CUSTOM', x:1}, then a user message: recv() yields only the latter.
        peer.send(json!({"op": "internal"})).await;
        assert_eq!(value(&peer.recv().await), json!({"op": "after-internal"}));
        let seen = internal.try_recv().expect("NODE_CUSTOM on the internal feed");
        assert_eq!(seen.value().unwrap(), json!({"cmd": "NODE_CUSTOM", "x": 1}));
        assert!(!seen.had_fd());

        // We refuse to send an internal-looking message...
        match peer.child.send(&json!({"cmd": "NODE_X"})).await {
            Err(SendError::Reserved { cmd }) => assert_eq!(cmd, "NODE_X"),
            other => panic!("expected SendError::Reserved, got {other:?}"),
        }
        // ...but `NODE_` alone and a prefix elsewhere are user messages: node's 'message' gets them
        // (and echoes them back).
        for m in [json!({"cmd": "NODE_"}), json!({"cmd": "fooNODE_"}), json!({"cmd": "node_x"})] {
            peer.send(m.clone()).await;
            assert_eq!(value(&peer.recv().await), m);
        }
        assert!(internal.try_recv().is_err(), "nothing else was internal");
        peer.finish().await;
    })
}

#[test]
fn internal_messages_node_parent_rust_child() {
    util::serial_test(async {
        let node = require_node!();
        let lines = node_parent(&node, "internal", &util::example("interop_child")).await;
        let line = case(&lines, "internal-to-rust");
        assert_eq!(
            line["received"],
            json!([{"op": "report"}]),
            "the child's recv() saw only the user message"
        );
        assert_eq!(
            line["internal"],
            json!([{"cmd": "NODE_CUSTOM", "x": 1}]),
            "the child's internal feed"
        );
        let seen = &case(&lines, "reserved-from-rust")["seen"];
        assert_eq!(seen[0], json!({"cmd": "NODE_"}));
        assert_eq!(seen[1], json!({"cmd": "fooNODE_"}));
        assert_eq!(seen[2]["op"], "reserved-result");
        assert_eq!(seen[2]["refusedCmd"], "NODE_X", "send() refused NODE_X: {}", seen[2]);
        assert_eq!(seen.as_array().unwrap().len(), 3);
        assert_clean_end(&lines);
    })
}

// ---------------------------------------------------------------------------------------------
// 6. Disconnect and exit
// ---------------------------------------------------------------------------------------------

async fn spawn_lifecycle_child(node: &Path) -> Child {
    let mut child = Command::new(node)
        .arg(util::node_script("lifecycle_child.js"))
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let ready = util::within("ready", child.recv()).await.unwrap().unwrap();
    assert_eq!(value(&ready), "ready");
    child
}

/// The JSON lines a lifecycle child printed, once it has exited.
async fn lifecycle_events(child: &mut Child) -> Vec<Value> {
    let mut stdout = child.process_mut().stdout.take().unwrap();
    let mut text = String::new();
    util::within("node's stdout", stdout.read_to_string(&mut text)).await.unwrap();
    text.lines().map(|l| serde_json::from_str(l).unwrap()).collect()
}

#[test]
fn rust_parent_disconnects_node_child() {
    util::serial_test(async {
        let node = require_node!();
        let mut child = spawn_lifecycle_child(&node).await;
        child.disconnect();
        assert!(!child.is_connected());
        assert!(
            util::within("recv to end", child.recv()).await.is_none(),
            "recv() ends after disconnect"
        );
        let status = util::within("node to exit", child.wait()).await.unwrap();
        assert_eq!(status.code(), Some(0));
        let events = lifecycle_events(&mut child).await;
        assert_eq!(
            events,
            vec![
                json!({"event": "disconnect", "connected": false}),
                json!({"event": "exit", "code": 0})
            ]
        );
    })
}

#[test]
fn node_child_disconnects_from_rust_parent() {
    util::serial_test(async {
        let node = require_node!();
        let mut child = spawn_lifecycle_child(&node).await;
        child.send(&"disconnect-me").await.unwrap();
        assert!(
            util::within("recv to end", child.recv()).await.is_none(),
            "recv() ends on node's disconnect"
        );
        util::within("sender().closed()", child.sender().closed()).await;
        assert!(!child.is_connected());
        assert!(matches!(child.send(&"late").await, Err(SendError::Closed)));
        let status = util::within("node to exit", child.wait()).await.unwrap();
        assert_eq!(status.code(), Some(0));
        let events = lifecycle_events(&mut child).await;
        assert_eq!(
            events,
            vec![
                json!({"event": "disconnect", "connected": false}),
                json!({"event": "exit", "code": 0})
            ]
        );
    })
}

#[test]
fn node_parent_disconnects_rust_child() {
    util::serial_test(async {
        let node = require_node!();
        let lines = node_parent(&node, "parent-disconnects", &util::example("interop_child")).await;
        assert!(
            lines.contains(&json!({"rust": "recv-ended"})),
            "the Rust child's recv() ended: {lines:?}"
        );
        assert_clean_end(&lines);
    })
}

#[test]
fn rust_child_exits_under_node_parent() {
    util::serial_test(async {
        let node = require_node!();
        let lines = node_parent(&node, "child-exits", &util::example("interop_child")).await;
        assert!(
            !lines.contains(&json!({"rust": "recv-ended"})),
            "the child left on its own: {lines:?}"
        );
        assert_clean_end(&lines);
    })
}

// ---------------------------------------------------------------------------------------------
// 7. Handles crossing both ways at once
// ---------------------------------------------------------------------------------------------

#[test]
fn handles_cross_rust_parent_node_child() {
    util::serial_test(async {
        let node = require_node!();
        let mut peer = Peer::spawn(&node);
        const N: u64 = 10;

        // Node starts sending N sockets; at the same time we queue N sockets to it.
        peer.send(json!({"op": "give-many", "kind": "tcp-socket", "n": N, "base": 100})).await;
        let mut deliveries = Vec::new();
        let mut clients = Vec::new();
        for id in 0..N {
            let (client, accepted) = tcp_pair();
            let message = json!({"op": "take", "as": "stream", "id": id});
            deliveries.push(peer.child.sender().queue_handle(&message, accepted).await.unwrap());
            clients.push(client);
        }
        let clients: Vec<_> = clients
            .into_iter()
            .map(|c| tokio::task::spawn_blocking(move || stream_client(c)))
            .collect();

        let mut serving = tokio::task::JoinSet::new();
        for id in 100..100 + N {
            let mut given = peer.op("given", id).await;
            let handle = given.take_handle().expect("a socket");
            assert_eq!(handle.key(), Some("4:127.0.0.1:0"));
            let stream: tokio::net::TcpStream = handle.try_into().unwrap();
            serving.spawn(serve_stream(stream, "rust"));
        }
        for delivery in deliveries {
            util::within("node's ACK", delivery).await.expect("delivered");
        }
        for client in clients {
            assert_eq!(
                util::within("a client", client).await.unwrap(),
                "node says hi\nnode got: ping\n"
            );
        }
        for id in 0..N {
            assert_eq!(value(&peer.op("took", id).await)["got"], "net.Socket");
        }
        for id in 100..100 + N {
            assert_eq!(peer.client_got(id).await, "rust says hi\nrust got: ping\n");
        }
        while let Some(done) = serving.join_next().await {
            done.unwrap();
        }
        peer.finish().await;
    })
}

#[test]
fn handles_cross_node_parent_rust_child() {
    util::serial_test(async {
        let node = require_node!();
        let lines = node_parent(&node, "crossing", &util::example("interop_child")).await;
        let line = case(&lines, "crossing");
        let to_rust = line["toRust"].as_array().unwrap();
        let from_rust = line["fromRust"].as_array().unwrap();
        assert_eq!((to_rust.len(), from_rust.len()), (10, 10));
        for r in to_rust {
            assert_eq!(
                r,
                &json!({"handleType": "net.Socket", "clientGot": "rust says hi\nrust got: ping\n"})
            );
        }
        for r in from_rust {
            assert_eq!(
                r,
                &json!({"got": "net.Socket", "clientGot": "node says hi\nnode got: ping\n"})
            );
        }
        assert_clean_end(&lines);
    })
}

// ---------------------------------------------------------------------------------------------
// 8. fd hygiene
// ---------------------------------------------------------------------------------------------

/// Many handles of every type arrive from Node and are dropped — raw, or after conversion to a
/// std or tokio type: this process's fd set returns to what it was.
#[test]
fn received_handles_from_node_leave_no_fds() {
    util::serial_test(async {
        let node = require_node!();
        // Warm up what a spawn sets up once per process (tokio's SIGCHLD machinery), so that the
        // final count can be compared with a baseline taken before the child existed.
        let status = tokio::process::Command::new(&node).arg("-e").arg("").status().await.unwrap();
        assert!(status.success());
        let before_spawn = util::open_fds();

        let mut peer = Peer::spawn(&node);
        peer.send(json!({"op": "many", "n": 1})).await;
        peer.recv().await;
        let baseline = util::open_fds();

        let kinds = [
            ("tcp-socket", 20),
            ("unix-socket", 10),
            ("native-tcp-socket", 10),
            ("tcp-server", 10),
            ("native-tcp-server", 10),
            ("unix-server", 10),
            ("udp4", 10),
            ("udp6", 10),
            ("native-udp", 10),
        ];
        let mut base = 0;
        let mut received = 0;
        for (kind, n) in kinds {
            peer.send(json!({"op": "give-many", "kind": kind, "n": n, "base": base})).await;
            for id in base..base + n {
                let mut given = peer.op("given", id).await;
                let handle = given.take_handle().expect("a handle");
                received += 1;
                match (id % 3, handle.kind()) {
                    (0, _) => drop(handle),
                    (1, FdKind::TcpStream) => drop(tokio::net::TcpStream::try_from(handle).unwrap()),
                    (1, FdKind::UnixStream) => {
                        drop(tokio::net::UnixStream::try_from(handle).unwrap())
                    }
                    (1, FdKind::TcpListener) => {
                        drop(tokio::net::TcpListener::try_from(handle).unwrap())
                    }
                    (1, FdKind::UnixListener) => {
                        drop(tokio::net::UnixListener::try_from(handle).unwrap())
                    }
                    (1, FdKind::Udp4 | FdKind::Udp6) => {
                        drop(tokio::net::UdpSocket::try_from(handle).unwrap())
                    }
                    (_, FdKind::TcpStream) => drop(std::net::TcpStream::try_from(handle).unwrap()),
                    (_, FdKind::UnixStream) => {
                        drop(std::os::unix::net::UnixStream::try_from(handle).unwrap())
                    }
                    (_, FdKind::TcpListener) => {
                        drop(std::net::TcpListener::try_from(handle).unwrap())
                    }
                    (_, FdKind::UnixListener) => {
                        drop(std::os::unix::net::UnixListener::try_from(handle).unwrap())
                    }
                    (_, FdKind::Udp4 | FdKind::Udp6) => {
                        drop(std::net::UdpSocket::try_from(handle).unwrap())
                    }
                    (_, other) => panic!("unexpected {other:?}"),
                }
                peer.op("released", id).await;
            }
            base += n;
        }
        assert_eq!(received, 100);
        // Node's clients of the dropped sockets see them close.
        for id in 0..40 {
            assert_eq!(peer.client_got(id).await, "", "client {id} of a dropped socket");
        }
        assert!(peer.stash.is_empty(), "unexpected messages: {:?}", peer.stash);
        util::assert_fds_settle_to(&baseline).await;

        peer.finish().await;
        util::assert_fds_settle_to(&before_spawn).await;
    })
}

// ---------------------------------------------------------------------------------------------
// Socket lists (protocol doc section 6)
// ---------------------------------------------------------------------------------------------

/// A Node server whose accepted socket went to a Rust peer asks that peer for its connection
/// count (`getConnections`) and waits for it on `close()`: the Rust peer answers
/// `NODE_SOCKET_GET_COUNT` with `NODE_SOCKET_COUNT` (the socket we hold counts) and
/// `NODE_SOCKET_NOTIFY_CLOSE` with `NODE_SOCKET_ALL_CLOSED` once we dropped it; otherwise the
/// Node callbacks would never run.
#[test]
fn node_server_counts_and_waits_for_socket_held_by_rust() {
    util::serial_test(async {
        let node = require_node!();
        let mut peer = Peer::spawn(&node);
        let (_, handle) = peer.take("tcp-socket", 1).await;
        let stream: tokio::net::TcpStream = handle.try_into().unwrap();

        peer.send(json!({"op": "server-count", "id": 1})).await;
        let count = tokio::time::timeout(Duration::from_secs(3), peer.op("server-count", 1))
            .await
            .expect("node's getConnections() got no answer from the Rust peer");
        assert_eq!(value(&count)["count"], 1, "node's own 0 plus the socket we hold");

        // close() waits while we hold the socket, and completes once we drop it.
        peer.send(json!({"op": "server-close", "id": 1})).await;
        let early = tokio::time::timeout(Duration::from_millis(300), peer.op("server-closed", 1));
        assert!(early.await.is_err(), "node's close() completed while we still held its socket");
        drop(stream);
        let closed = tokio::time::timeout(Duration::from_secs(3), peer.op("server-closed", 1))
            .await
            .expect("node's server.close() got NODE_SOCKET_ALL_CLOSED from the Rust peer");
        assert_eq!(value(&closed)["error"], Value::Null);
        assert_eq!(peer.client_got(1).await, "", "node's client saw the socket close");
        peer.finish().await;
    })
}
