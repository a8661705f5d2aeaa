//! Servers that keep count across processes (issue 3): get_connections and close after their
//! connections were handed to Rust and Node children, and handed to us by a Node parent.

mod util;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use handoff::handle::KeepOpen;
use handoff::server::{Server, ServerError};
use handoff::Command;

fn echo_child() -> Command {
    let mut command = Command::new(util::example("echo_child"));
    command.kill_on_drop(true);
    command
}

fn node_echo_child() -> Command {
    let mut command = Command::node(util::node_script("echo_child.js"));
    command.kill_on_drop(true);
    command
}

async fn local_server() -> Server {
    Server::bind("127.0.0.1:0").await.unwrap()
}

/// A client that checks its connection works (the echo comes back) before going on.
fn client(addr: SocketAddr) -> TcpStream {
    let stream = TcpStream::connect(addr).unwrap();
    stream.set_read_timeout(Some(util::STEP)).unwrap();
    stream
}

fn assert_echo(stream: &mut TcpStream) {
    stream.write_all(b"ping").unwrap();
    let mut buf = [0u8; 4];
    stream.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"ping");
}

/// Polls until `get_connections` reports `expected` (counts settle as children notice closes).
async fn expect_count(server: &Server, expected: usize) {
    let deadline = tokio::time::Instant::now() + util::STEP;
    loop {
        let count = server.get_connections().await.unwrap();
        if count == expected {
            return;
        }
        assert!(tokio::time::Instant::now() < deadline, "count stuck at {count}, expected {expected}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Hands `n` connections to the children in turn; returns the clients.
async fn hand_out(server: &Server, children: &[&handoff::Child], n: usize) -> Vec<TcpStream> {
    let addr = server.local_addr().unwrap();
    let mut clients = Vec::new();
    for i in 0..n {
        let connecting = tokio::task::spawn_blocking(move || client(addr));
        let connection = util::within("accept", server.accept()).await.unwrap();
        let mut stream = connecting.await.unwrap();
        children[i % children.len()].send_handle(&"socket", connection).await.unwrap();
        assert_echo(&mut stream);
        clients.push(stream);
    }
    clients
}

async fn closes_after_every_child_socket(children: Vec<handoff::Child>) {
    let server = local_server().await;
    let refs: Vec<&handoff::Child> = children.iter().collect();
    let mut clients = hand_out(&server, &refs, 12).await;
    assert_eq!(server.local_connections(), 0, "sent connections leave the local count");
    expect_count(&server, 12).await;
    while clients.len() > 1 {
        drop(clients.pop());
        expect_count(&server, clients.len()).await;
    }
    // close() must wait for the last one, held by a child.
    let closing = server.close();
    tokio::pin!(closing);
    assert!(
        tokio::time::timeout(Duration::from_millis(300), &mut closing).await.is_err(),
        "close() resolved while a child still held a connection"
    );
    assert!(server.accept().await.is_err(), "a closing server accepts nothing");
    drop(clients.pop());
    util::within("close()", &mut closing).await.unwrap();
    assert!(matches!(server.close().await, Err(ServerError::NotRunning)));
    for child in children {
        child.disconnect();
        let mut child = child;
        assert!(util::within("child exit", child.wait()).await.unwrap().success());
    }
}

#[test]
fn rust_parent_counts_and_closes_across_two_rust_children() {
    util::serial_test(async {
        let children = vec![echo_child().spawn().unwrap(), echo_child().spawn().unwrap()];
        closes_after_every_child_socket(children).await;
    })
}

#[test]
fn rust_parent_counts_and_closes_across_node_children() {
    util::serial_test(async {
        let Some(_) = util::node() else { return };
        let children = vec![node_echo_child().spawn().unwrap(), node_echo_child().spawn().unwrap()];
        closes_after_every_child_socket(children).await;
    })
}

#[test]
fn node_parent_counts_sockets_held_by_a_rust_child() {
    util::serial_test(async {
        let Some(node) = util::node() else { return };
        let output = tokio::process::Command::new(node)
            .arg(util::node_script("get_connections_parent.js"))
            .arg(util::example("echo_child"))
            .arg("5")
            .kill_on_drop(true)
            .output();
        let output = util::within("node parent", output).await.unwrap();
        let stdout = String::from_utf8(output.stdout).unwrap();
        let steps: Vec<serde_json::Value> =
            stdout.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
        let expected = serde_json::json!([
            {"step": "sent", "count": 5},
            {"step": "after-close", "count": 4},
            {"step": "after-close", "count": 3},
            {"step": "after-close", "count": 2},
            {"step": "after-close", "count": 1},
            {"step": "close-pending", "closed": false},
            {"step": "closed"},
            {"step": "child-exit", "code": 0},
        ]);
        assert_eq!(serde_json::Value::Array(steps), expected, "stderr: {}", String::from_utf8_lossy(&output.stderr));
        assert!(output.status.success());
    })
}

#[test]
fn a_killed_child_neither_hangs_nor_leaks() {
    util::serial_test(async {
        // Warm the runtime's child-reaping descriptors before the baseline.
        let mut warm = echo_child().spawn().unwrap();
        warm.disconnect();
        warm.wait().await.unwrap();
        drop(warm);
        let baseline = util::open_fds();
        let server = local_server().await;
        let mut child = echo_child().spawn().unwrap();
        let mut clients = hand_out(&server, &[&child], 5).await;
        expect_count(&server, 5).await;
        let sender = child.sender().clone();
        // Stopped, the child cannot answer: the request is certainly in flight when it dies.
        let pid = rustix::process::Pid::from_raw(child.id().unwrap() as i32).unwrap();
        rustix::process::kill_process(pid, rustix::process::Signal::STOP).unwrap();
        let server = std::sync::Arc::new(server);
        let asking = tokio::spawn({
            let server = server.clone();
            async move { server.get_connections().await }
        });
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        assert!(!asking.is_finished(), "a stopped child answered");
        child.kill().await.unwrap();
        match util::within("the count", asking).await.unwrap() {
            Err(ServerError::ChildClosedBeforeReply { peer }) => {
                assert_eq!(peer, format!("child process {}", child_pid(&sender)));
            }
            other => panic!("expected ChildClosedBeforeReply, got {other:?}"),
        }
        // Asked again, the closed channel is left out.
        util::within("channel closed", sender.closed()).await;
        assert_eq!(server.get_connections().await.unwrap(), 0);
        util::within("close()", server.close()).await.unwrap();
        // The kernel closed the child's copies: the clients see end-of-file.
        for stream in &mut clients {
            let mut buf = [0u8; 1];
            assert_eq!(stream.read(&mut buf).unwrap(), 0);
        }
        drop((clients, server, sender, child));
        util::assert_fds_settle_to(&baseline).await;
    })
}

fn child_pid(sender: &handoff::Sender) -> String {
    sender.peer().trim_start_matches("child process ").to_owned()
}

#[test]
fn each_server_counts_only_its_own_connections() {
    util::serial_test(async {
        let servers = [local_server().await, local_server().await, local_server().await];
        let keys: std::collections::HashSet<&str> = servers.iter().map(Server::key).collect();
        assert_eq!(keys.len(), 3, "servers on port 0 get distinct keys");
        let children = [echo_child().spawn().unwrap(), echo_child().spawn().unwrap()];
        let refs: Vec<&handoff::Child> = children.iter().collect();
        let mut clients = Vec::new();
        for (i, server) in servers.iter().enumerate() {
            clients.push(hand_out(server, &refs, 2 * (i + 1)).await);
        }
        for (i, server) in servers.iter().enumerate() {
            expect_count(server, 2 * (i + 1)).await;
        }
        clients[1].truncate(1);
        expect_count(&servers[0], 2).await;
        expect_count(&servers[1], 1).await;
        expect_count(&servers[2], 6).await;
        drop(clients);
        for server in &servers {
            util::within("close()", server.close()).await.unwrap();
        }
    })
}

#[test]
fn keep_open_connections_are_counted_by_both_processes() {
    util::serial_test(async {
        let server = local_server().await;
        let child = echo_child().spawn().unwrap();
        let addr = server.local_addr().unwrap();
        let connecting = tokio::task::spawn_blocking(move || client(addr));
        let connection = server.accept().await.unwrap();
        let mut stream = connecting.await.unwrap();
        child.send_handle(&"socket", KeepOpen(&connection)).await.unwrap();
        // Ours and the child's copy: counted twice, as Node counts it.
        assert_eq!(server.local_connections(), 1);
        expect_count(&server, 2).await;
        assert_echo(&mut stream); // the child serves it...
        drop(connection); // ...and ours goes
        expect_count(&server, 1).await;
        drop(stream);
        expect_count(&server, 0).await;
        util::within("close()", server.close()).await.unwrap();
    })
}

type Lines = tokio::io::Lines<tokio::io::BufReader<tokio::process::ChildStdout>>;

async fn next_line(stdout: &mut Lines) -> String {
    util::within("a line on stdout", stdout.next_line()).await.unwrap().expect("stdout open")
}

/// Runs `examples/get_connections` with `child` (empty: its default Rust child) and checks its
/// stdout, line by line, through three connections, SIGTERM, and the clients closing.
async fn get_connections_example(child: &[&str]) {
    use tokio::io::{AsyncBufReadExt, BufReader};
    let mut command = tokio::process::Command::new(util::example("get_connections"));
    command.args(["--port", "0"]);
    if !child.is_empty() {
        command.arg("--").args(child);
    }
    let mut example = command
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut stderr = BufReader::new(example.stderr.take().unwrap()).lines();
    let first = util::within("the address", stderr.next_line()).await.unwrap().unwrap();
    let addr: SocketAddr = first.strip_prefix("listening on ").unwrap().parse().unwrap();
    let mut stdout = BufReader::new(example.stdout.take().unwrap()).lines();
    assert_eq!(next_line(&mut stdout).await, "connections=0");
    let mut clients = Vec::new();
    for expected in 1..=3 {
        let mut stream = tokio::task::spawn_blocking(move || client(addr)).await.unwrap();
        assert_echo(&mut stream);
        clients.push(stream);
        // Polled every 100 ms: the count may jump, but it only goes up, to 3.
        loop {
            let line = next_line(&mut stdout).await;
            let n: usize = line.strip_prefix("connections=").expect(&line).parse().unwrap();
            assert!(n <= 3, "{line}");
            if n >= expected {
                break;
            }
        }
    }
    rustix::process::kill_process(
        rustix::process::Pid::from_raw(example.id().unwrap() as i32).unwrap(),
        rustix::process::Signal::TERM,
    )
    .unwrap();
    let mut after: Vec<String> = Vec::new();
    while after.last().map(String::as_str) != Some("closing") {
        after.push(next_line(&mut stdout).await);
    }
    while let Some(stream) = clients.pop() {
        drop(stream);
        let left = clients.len();
        // Each close shows up as a new count (the poller keeps going while closing).
        loop {
            let line = next_line(&mut stdout).await;
            if line == format!("connections={left}") || (left == 0 && line == "closed") {
                after.push(line);
                break;
            }
            after.push(line);
        }
    }
    while after.last().map(String::as_str) != Some("closed") {
        after.push(next_line(&mut stdout).await);
    }
    let status = util::within("exit", example.wait()).await.unwrap();
    assert!(status.success(), "{status}: {after:?}");
    assert!(util::within("end of stdout", stdout.next_line()).await.unwrap().is_none());
    let pos = |s: &str| after.iter().position(|l| l == s).unwrap_or_else(|| panic!("{s} missing: {after:?}"));
    assert!(pos("closing") < pos("closed"), "{after:?}");
    for line in &after {
        assert!(
            line == "closing" || line == "closed" || line.starts_with("connections="),
            "unexpected line {line:?} in {after:?}"
        );
    }
}

#[test]
fn get_connections_example_with_rust_child() {
    util::serial_test(get_connections_example(&[]))
}

#[test]
fn get_connections_example_with_node_child() {
    util::serial_test(async {
        let Some(_) = util::node() else { return };
        let script = util::node_script("echo_child.js");
        get_connections_example(&["node", script.to_str().unwrap()]).await
    })
}

#[test]
fn a_server_does_not_keep_a_dropped_channel_open() {
    util::serial_test(async {
        let server = local_server().await;
        let child = echo_child().spawn().unwrap();
        let mut clients = hand_out(&server, &[&child], 1).await;
        expect_count(&server, 1).await;
        // The user lets go of the channel; the server's list must not keep it open.
        let (mut process, sender, receiver) = child.into_parts();
        drop((sender, receiver));
        drop(clients.pop()); // the echo session ends, so the child can finish
        let status = util::within("the child exiting", process.wait()).await.unwrap();
        assert!(status.success(), "{status}");
        assert_eq!(server.get_connections().await.unwrap(), 0);
        util::within("close()", server.close()).await.unwrap();
    })
}

/// A connection whose send fails comes back as the `Connection` it was, counted again by its
/// server (it left the count when it was queued, as in Node), and still usable.
#[test]
fn a_connection_that_cannot_be_delivered_comes_back_counted() {
    util::serial_test(async {
        let server = local_server().await;
        let mut client = client(server.local_addr().unwrap());
        let connection = server.accept().await.unwrap();
        assert_eq!(server.local_connections(), 1);
        let (a, b) = handoff::Channel::pair().unwrap();
        drop(b); // nobody will acknowledge it
        util::within("the channel closing", a.closed()).await;
        match a.send_handle(&"socket", connection).await {
            Err(handoff::SendHandleError { error: handoff::SendError::Disconnected { written: false }, handle }) => {
                assert_eq!(server.local_connections(), 1, "counted again");
                let mut connection = handle;
                use tokio::io::AsyncWriteExt;
                connection.write_all(b"still ours").await.unwrap();
                drop(connection);
                let mut text = String::new();
                client.read_to_string(&mut text).unwrap();
                assert_eq!(text, "still ours");
            }
            other => panic!("expected the connection back, got {other:?}"),
        }
        assert_eq!(server.local_connections(), 0);
    })
}

/// A connection is registered with tokio's reactor only if this process reads or writes it: one
/// handed straight to a child costs no registration (no `epoll_ctl` pair, no spurious wake-up).
/// One served here still works, registered on first use.
#[test]
fn connections_are_registered_only_when_used_here() {
    use std::os::fd::{AsFd, AsRawFd};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    util::serial_test(async {
        let server = local_server().await;
        let addr = server.local_addr().unwrap();
        let child = echo_child().spawn().unwrap();

        let mut sent = client(addr);
        let connection = server.accept().await.unwrap();
        let raw = connection.as_fd().as_raw_fd();
        assert!(util::epoll_registrations(raw).is_empty(), "registered before any use");
        child.send_handle(&"socket", connection).await.unwrap();
        assert_echo(&mut sent);

        let served = std::thread::spawn(move || {
            let mut stream = client(addr);
            stream.write_all(b"here").unwrap();
            let mut buf = [0u8; 4];
            stream.read_exact(&mut buf).unwrap();
            buf
        });
        let mut connection = server.accept().await.unwrap();
        let raw = connection.as_fd().as_raw_fd();
        assert!(util::epoll_registrations(raw).is_empty(), "registered before any use");
        let mut buf = [0u8; 4];
        connection.read_exact(&mut buf).await.unwrap();
        connection.write_all(&buf).await.unwrap();
        assert_eq!(util::epoll_registrations(connection.as_fd().as_raw_fd()).len(), 1, "registered once used");
        assert_eq!(&served.join().unwrap(), b"here");
    })
}

/// A connection first used outside a tokio runtime (it is registered on first use) fails with an
/// error; it does not panic, and the connection is kept.
#[test]
fn a_connection_used_outside_a_runtime_fails_cleanly() {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let (connection, client) = runtime.block_on(async {
        let server = local_server().await;
        let client = TcpStream::connect(server.local_addr().unwrap()).unwrap();
        (server.accept().await.unwrap(), client)
    });
    let (result, mut connection) = std::thread::spawn(move || {
        let mut connection = connection;
        let mut context = std::task::Context::from_waker(std::task::Waker::noop());
        let mut bytes = [0u8; 4];
        let mut buf = tokio::io::ReadBuf::new(&mut bytes);
        let polled = tokio::io::AsyncRead::poll_read(std::pin::Pin::new(&mut connection), &mut context, &mut buf);
        (format!("{polled:?}"), connection)
    })
    .join()
    .expect("no panic");
    assert!(result.contains("tokio runtime"), "{result}");
    // Back inside the runtime, the same connection works.
    runtime.block_on(async {
        use tokio::io::AsyncWriteExt;
        connection.write_all(b"pong").await.unwrap();
    });
    let mut client = client;
    let mut buf = [0u8; 4];
    client.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"pong");
}
