//! The seed's `parent` and `child` examples under conditions that used to stop them: the process
//! out of descriptors, handles they cannot serve, and what their envelopes carry.

mod util;

use std::io::Read;
use std::net::SocketAddr;
use std::process::Stdio;

use handoff::handle::{HandleType, RawHandle};

/// Starts the `parent` example on a free port, with `child` as its child command if not empty,
/// under `wrapper` (e.g. `prlimit ...`) if given; returns the process and its address.
async fn start_parent(wrapper: &[&str], child: &[&std::ffi::OsStr]) -> (tokio::process::Child, SocketAddr) {
    let parent = util::example("parent");
    let mut command = match wrapper.split_first() {
        Some((program, rest)) => {
            let mut command = tokio::process::Command::new(program);
            command.args(rest).arg(&parent);
            command
        }
        None => tokio::process::Command::new(&parent),
    };
    command.args(["--port", "0"]);
    if !child.is_empty() {
        command.arg("--").args(child);
    }
    let mut process = command.stdout(Stdio::piped()).kill_on_drop(true).spawn().expect("spawn the parent example");
    let addr = util::read_listening_addr(process.stdout.take().unwrap()).await;
    (process, addr)
}

/// Connects `n` clients at once; returns how many read exactly `expected`.
fn clients(addr: SocketAddr, n: usize, expected: &str) -> usize {
    let threads: Vec<_> = (0..n)
        .map(|_| {
            let expected = expected.to_owned();
            std::thread::spawn(move || {
                let Ok(mut stream) = std::net::TcpStream::connect(addr) else { return false };
                stream.set_read_timeout(Some(util::STEP)).unwrap();
                let mut text = String::new();
                stream.read_to_string(&mut text).is_ok() && text == expected
            })
        })
        .collect();
    threads.into_iter().map(|t| t.join().unwrap()).filter(|ok| *ok).count()
}

/// With 32 descriptors the parent runs out while 40 clients connect at once. It waits for
/// descriptors instead of exiting (which killed its child and failed every client), so every
/// client is answered.
#[test]
fn the_parent_out_of_descriptors_still_serves_every_client() {
    util::serial_test(async {
        assert!(
            std::path::Path::new("/usr/bin/prlimit").exists(),
            "this test needs prlimit (Debian package util-linux)"
        );
        let (mut parent, addr) = start_parent(&["/usr/bin/prlimit", "--nofile=32"], &[]).await;
        let served = tokio::task::spawn_blocking(move || clients(addr, 40, "Child handled it."))
            .await
            .unwrap();
        assert_eq!(served, 40, "clients answered");
        assert!(parent.try_wait().unwrap().is_none(), "the parent is still running");
        parent.kill().await.unwrap();
    })
}

/// The envelopes carry the server's key, as the seed's `server.on('connection')` does, so the
/// child can count the connections for the parent's `getConnections()`.
#[test]
fn the_parent_hands_connections_with_their_server_key() {
    util::serial_test(async {
        let probe = util::example("ipc_probe");
        let (mut parent, addr) = start_parent(&[], &[probe.as_os_str()]).await;
        let answer = tokio::task::spawn_blocking(move || util::tcp_read_all(addr)).await.unwrap();
        assert_eq!(answer, format!("key=4:127.0.0.1:{}", addr.port()));
        parent.kill().await.unwrap();
    })
}

/// The child answers a `net.Socket` that is a Unix socket as well as TCP, and reports and skips
/// one it cannot serve (a pipe), then goes on serving.
#[test]
fn the_child_skips_what_it_cannot_serve_and_goes_on() {
    util::serial_test(async {
        let mut child = handoff::Command::new(util::example("child"))
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let (ours, theirs) = std::os::unix::net::UnixStream::pair().unwrap();
        child.send_handle(&"socket", theirs).await.unwrap();
        ours.set_read_timeout(Some(util::STEP)).unwrap();
        let mut text = String::new();
        (&ours).read_to_string(&mut text).unwrap();
        assert_eq!(text, "Child handled it.");

        let (read_end, write_end) = std::io::pipe().unwrap();
        let pipe = RawHandle::new(HandleType::NetSocket, std::os::fd::OwnedFd::from(read_end));
        child.send_handle(&"socket", pipe).await.unwrap();
        drop(write_end);

        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let client = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (server_side, _) = listener.accept().unwrap();
        child.send_handle(&"socket", server_side).await.unwrap();
        client.set_read_timeout(Some(util::STEP)).unwrap();
        let mut text = String::new();
        (&client).read_to_string(&mut text).unwrap();
        assert_eq!(text, "Child handled it.");

        child.disconnect();
        let status = util::within("child exit", child.wait()).await.unwrap();
        assert!(status.success(), "{status}");
        let mut stderr = String::new();
        use tokio::io::AsyncReadExt;
        child.process_mut().stderr.take().unwrap().read_to_string(&mut stderr).await.unwrap();
        assert!(stderr.contains("skipping a handle"), "{stderr}");
    })
}
