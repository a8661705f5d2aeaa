//! Shared helpers for the integration tests: fd counting, finding `node` and the example binaries,
//! timeouts, small TCP/UDP clients.
//!
//! Each test file is its own process. A file whose tests count descriptors must run them one at
//! a time: every test in it runs through [`serial_test`] (or takes [`serial`] first and builds no
//! runtime before it).
#![allow(dead_code, unreachable_pub)]

pub mod load;
pub mod raw_peer;

use std::collections::BTreeSet;
use std::future::Future;
use std::io::Read;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// Default limit for one awaited step in a test.
pub const STEP: Duration = Duration::from_secs(20);

/// Runs `test` on a fresh current-thread runtime while holding the [`serial`] lock.
///
/// Files whose tests count descriptors use this instead of `#[tokio::test]`, which builds its
/// runtime (epoll, eventfd: descriptors) before the test body could take the lock, so a queued
/// test's runtime would show up in another test's count.
pub fn serial_test<F: Future>(test: F) -> F::Output {
    let _guard = serial();
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    let output = runtime.block_on(test);
    // Closed here, while the lock is still held (a temporary in the tail expression would only
    // be dropped after `_guard`).
    drop(runtime);
    output
}

/// Runs the tests of one file one at a time (descriptor counts are per process).
pub fn serial() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// The descriptors open in this process.
pub fn open_fds() -> BTreeSet<i32> {
    std::fs::read_dir("/proc/self/fd")
        .expect("/proc/self/fd")
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .collect()
}

/// What a descriptor of this process refers to (`socket:[123]`, a path, ...).
pub fn fd_target(fd: i32) -> String {
    std::fs::read_link(format!("/proc/self/fd/{fd}"))
        .map(|p| p.display().to_string())
        .unwrap_or_else(|_| "closed".into())
}

/// The event masks under which the socket (or file) behind `fd` is registered in this process's
/// epoll instances (tokio's reactors), through `fd` or any duplicate of it, from
/// `/proc/self/fdinfo`: empty when no reactor watches it.
pub fn epoll_registrations(fd: i32) -> Vec<u32> {
    use std::os::unix::fs::MetadataExt;
    // Matched by inode: a duplicate has another number, and a number may have been registered
    // before for another file.
    let Ok(ino) = std::fs::metadata(format!("/proc/self/fd/{fd}")).map(|m| m.ino()) else { return Vec::new() };
    let ino = format!("ino:{ino:x}");
    // A reactor's epoll descriptor may be duplicated (tokio clones mio's registry): the same
    // instance then shows up twice, with identical lines.
    let mut seen = BTreeSet::new();
    let mut masks = Vec::new();
    for epoll in open_fds() {
        if fd_target(epoll) != "anon_inode:[eventpoll]" {
            continue;
        }
        let Ok(info) = std::fs::read_to_string(format!("/proc/self/fdinfo/{epoll}")) else { continue };
        for line in info.lines() {
            // "tfd:       12 events:       19 data: ..."
            let mut words = line.split_whitespace();
            if words.next() != Some("tfd:")
                || words.next().is_none()
                || !line.split_whitespace().any(|w| w == ino)
                || !seen.insert(line.to_owned())
            {
                continue;
            }
            if let (Some("events:"), Some(mask)) = (words.next(), words.next()) {
                masks.push(u32::from_str_radix(mask, 16).expect("a hex event mask"));
            }
        }
    }
    masks
}

/// Waits (up to 5 s) until exactly the descriptors in `baseline` are open again, and fails with a
/// list of the extra ones otherwise. Channel drivers close their sockets asynchronously, so a
/// test gives them a moment.
pub async fn assert_fds_settle_to(baseline: &BTreeSet<i32>) {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let now = open_fds();
        if &now == baseline {
            return;
        }
        if Instant::now() > deadline {
            let extra: Vec<String> =
                now.difference(baseline).map(|fd| format!("{fd} -> {}", fd_target(*fd))).collect();
            let missing: Vec<&i32> = baseline.difference(&now).collect();
            panic!("descriptor leak: extra {extra:?}, missing {missing:?}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Awaits `future` for at most [`STEP`], failing the test with `what` otherwise.
pub async fn within<T>(what: &str, future: impl Future<Output = T>) -> T {
    tokio::time::timeout(STEP, future)
        .await
        .unwrap_or_else(|_| panic!("timed out after {STEP:?} waiting for {what}"))
}

/// The `node` binary, if there is one. In CI (`CI` set) a missing node fails the test instead:
/// interop tests must run there.
pub fn node() -> Option<PathBuf> {
    let found = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths).map(|p| p.join("node")).find(|p| p.is_file())
    });
    if found.is_none() {
        assert!(
            std::env::var_os("CI").is_none(),
            "node is required for the interop tests in CI, and it is not on PATH"
        );
        eprintln!("node not found: skipping (set CI=1 to make this an error)");
    }
    found
}

/// Returns early from a test when node is missing outside CI.
#[macro_export]
macro_rules! require_node {
    () => {
        match $crate::util::node() {
            Some(node) => node,
            None => return,
        }
    };
}

/// A script in `tests/node/`.
pub fn node_script(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/node").join(name)
}

/// An example binary (`cargo test` builds the examples next to the test binaries).
///
/// `cargo test --test NAME` alone does not rebuild examples, so an example older than the
/// library or examples sources is refused rather than silently testing old code.
pub fn example(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("test binary path");
    // target/<profile>/deps/<test> -> target/<profile>/examples/<name>
    let profile_dir = exe.parent().and_then(|deps| deps.parent()).expect("target dir");
    let path = profile_dir.join("examples").join(name);
    assert!(
        path.is_file(),
        "example {name} not built at {}; run `cargo test --workspace` or `cargo build --examples`",
        path.display()
    );
    let built = std::fs::metadata(&path).and_then(|m| m.modified()).expect("mtime");
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let own_source = std::fs::metadata(root.join("examples").join(format!("{name}.rs")))
        .and_then(|m| m.modified())
        .ok();
    let newest_source = newest_mtime(&root.join("src")).max(own_source);
    assert!(
        newest_source.is_none_or(|newest| newest <= built),
        "example {name} is older than the sources; run `cargo build --examples` (or `cargo test \
         --workspace`, which builds them) before running a single test file"
    );
    path
}

fn newest_mtime(dir: &std::path::Path) -> Option<std::time::SystemTime> {
    let mut newest = None;
    for entry in std::fs::read_dir(dir).ok()?.flatten() {
        let path = entry.path();
        let mtime = if path.is_dir() {
            newest_mtime(&path)
        } else {
            entry.metadata().and_then(|m| m.modified()).ok()
        };
        newest = newest.max(mtime);
    }
    newest
}

/// Connects to `addr`, reads until the peer closes, returns the text.
pub fn tcp_read_all(addr: SocketAddr) -> String {
    let mut stream = std::net::TcpStream::connect(addr).expect("connect");
    stream.set_read_timeout(Some(STEP)).unwrap();
    let mut text = String::new();
    stream.read_to_string(&mut text).expect("read reply");
    text
}

/// Reads the first stdout line of a child that announces `listening on ADDR`.
pub async fn read_listening_addr(stdout: tokio::process::ChildStdout) -> SocketAddr {
    use tokio::io::AsyncBufReadExt;
    let mut lines = tokio::io::BufReader::new(stdout).lines();
    loop {
        let line = within("the 'listening on' line", lines.next_line())
            .await
            .expect("read stdout")
            .expect("process ended before it was listening");
        if let Some(addr) = line.strip_prefix("listening on ") {
            return addr.trim().parse().expect("an address");
        }
    }
}
