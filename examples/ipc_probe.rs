//! A test helper child (used by `tests/process.rs`): attaches to its parent's channel and obeys
//! simple commands, reporting what it observes.
//!
//! A message that comes with a TCP connection is answered on that connection: `key=<the server
//! key in its envelope>` (or `key=none`), then the connection is closed.
//!
//! Messages it understands (anything else is echoed back as `{"echo": <message>}`):
//! - `{"report": true}` → `{"env_fd": .., "env_mode": .., "channel_fds": [[fd, cloexec], ..],
//!   "grandchild_env": ".."}`: the `NODE_CHANNEL_*` variables left in its environment, its open
//!   socket descriptors with their close-on-exec flag, and what a grandchild shell sees;
//! - `{"exit": code}` → exits with that code at once;
//! - `{"disconnect": true}` → disconnects from its side and exits 0 once the channel closed;
//! - `{"burst": n}` → sends `{"i": 0}` … `{"i": n-1}` and returns from `main` at once, without
//!   flushing (what is still queued must reach the parent anyway);
//! - `{"spawn_probe": {"stdout_piped": bool, "set_worker_id": "..", "worker_id": ".."}}` → starts
//!   another `ipc_probe` through `handoff::Command` (optionally with its stdout piped, after
//!   putting `NODE_UNIQUE_ID` into its own environment, or setting it on the command), asks it for
//!   its report and answers `{"grandchild": <report or error>}`.
//!
//! It exits 0 when the parent closes the channel, and 3 when it has no channel.
//!
//! With `IPC_PROBE_BURST=n` it sends `{"i": 0}` … `{"i": n-1}` as soon as it is attached and
//! returns from `main` at once: its channel's task has never run by then.
//!
//! With `IPC_PROBE_HANDLE_FIRST=1` it first sends its parent a handle (one end of a socket pair,
//! message `"mine"`) and waits for the acknowledgement before it receives anything; then it
//! counts the handles it is sent until `{"done": true}`, answers `{"handles": n}`, and goes on as
//! usual.
//!
//! With `IPC_PROBE_CLOSE_STDIO=1` it closes its descriptors 0-2 once attached, as a daemon does,
//! so that the socket pair of the next child it spawns lands there.
//!
//! With `IPC_PROBE_MODE=own-fd` it instead points `NODE_CHANNEL_FD` at a socket it opened itself
//! and prints what `parent_channel()` says and whether that socket still works (it must: the
//! descriptor was not inherited, so it is not the channel's to take).

use std::os::fd::RawFd;

use serde_json::{json, Value};

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    if std::env::var("IPC_PROBE_MODE").as_deref() == Ok("own-fd") {
        return own_fd();
    }
    let parent = handoff::process::parent_channel();
    if std::env::var_os("IPC_PROBE_CLOSE_STDIO").is_some() {
        close_stdio();
    }
    if let (Some(burst), Ok(Some(parent))) = (std::env::var_os("IPC_PROBE_BURST"), &parent) {
        let n: u64 = burst.to_string_lossy().parse()?;
        for i in 0..n {
            parent.send(&json!({ "i": i })).await?;
        }
        return Ok(());
    }
    let mut parent = match parent {
        Ok(Some(channel)) => channel,
        Ok(None) => {
            eprintln!("ipc_probe: no channel");
            std::process::exit(3);
        }
        Err(e) => {
            eprintln!("ipc_probe: {e}");
            std::process::exit(4);
        }
    };
    if std::env::var_os("IPC_PROBE_HANDLE_FIRST").is_some() {
        let (mine, _theirs) = std::os::unix::net::UnixStream::pair()?;
        parent.send_handle(&"mine", mine).await?;
        let mut handles = 0;
        while let Some(received) = parent.recv().await {
            let received = received?;
            handles += usize::from(received.handle().is_some());
            if received.value()?.get("done").is_some() {
                break;
            }
        }
        parent.send(&json!({ "handles": handles })).await?;
    }
    while let Some(received) = parent.recv().await {
        let mut received = received?;
        if let Some(handle) = received.take_handle() {
            // A connection handed over: answer on it with the server key it came under.
            let key = handle.key().unwrap_or("none").to_owned();
            if let Ok(mut socket) = std::net::TcpStream::try_from(handle) {
                use std::io::Write;
                socket.set_nonblocking(false)?;
                socket.write_all(format!("key={key}").as_bytes())?;
            }
            continue;
        }
        let message = received.value()?;
        if message.get("report").is_some() {
            parent.send(&report().await?).await?;
        } else if let Some(code) = message.get("exit").and_then(Value::as_i64) {
            parent.sender().flush().await?;
            std::process::exit(code as i32);
        } else if message.get("disconnect").is_some() {
            parent.disconnect();
            parent.sender().closed().await;
        } else if let Some(n) = message.get("burst").and_then(Value::as_u64) {
            for i in 0..n {
                parent.send(&json!({ "i": i })).await?;
            }
            return Ok(());
        } else if let Some(options) = message.get("spawn_probe") {
            let grandchild = match spawn_probe(options).await {
                Ok(report) => report,
                Err(e) => json!({ "error": e.to_string() }),
            };
            parent.send(&json!({ "grandchild": grandchild })).await?;
        } else {
            parent.send(&json!({ "echo": message })).await?;
        }
    }
    Ok(())
}

async fn report() -> anyhow::Result<Value> {
    let grandchild = tokio::process::Command::new("sh")
        .arg("-c")
        .arg("echo \"${NODE_CHANNEL_FD-unset}:${NODE_CHANNEL_SERIALIZATION_MODE-unset}:${NODE_UNIQUE_ID-unset}\"")
        .output()
        .await?;
    let mut sockets = Vec::new();
    for entry in std::fs::read_dir("/proc/self/fd")? {
        let entry = entry?;
        let Some(fd) = entry.file_name().to_str().and_then(|n| n.parse::<RawFd>().ok()) else {
            continue;
        };
        let is_socket = std::fs::read_link(entry.path())
            .is_ok_and(|target| target.to_string_lossy().starts_with("socket:"));
        if is_socket {
            sockets.push(json!([fd, is_cloexec(fd)?]));
        }
    }
    Ok(json!({
        "env_fd": std::env::var("NODE_CHANNEL_FD").ok(),
        "env_mode": std::env::var("NODE_CHANNEL_SERIALIZATION_MODE").ok(),
        "channel_fds": sockets,
        "grandchild_env": String::from_utf8_lossy(&grandchild.stdout).trim(),
        "pid": std::process::id(),
        "worker_id": handoff::process::worker_id(),
    }))
}

/// Starts another probe, asks for its report, and ends it.
async fn spawn_probe(options: &Value) -> anyhow::Result<Value> {
    if let Some(id) = options.get("set_worker_id").and_then(Value::as_str) {
        // As if this process had been started as a cluster worker and kept the variable.
        std::env::set_var("NODE_UNIQUE_ID", id);
    }
    let mut command = handoff::Command::new(std::env::current_exe()?);
    command.kill_on_drop(true);
    if let Some(id) = options.get("worker_id").and_then(Value::as_str) {
        command.env("NODE_UNIQUE_ID", id);
    }
    if options.get("stdout_piped").and_then(Value::as_bool) == Some(true) {
        command.stdout(std::process::Stdio::piped());
    }
    let mut child = command.spawn()?;
    child.send(&json!({ "report": true })).await?;
    let reply = tokio::time::timeout(std::time::Duration::from_secs(10), child.recv()).await;
    let report = match reply {
        Ok(Some(Ok(message))) => message.value()?,
        Ok(Some(Err(e))) => anyhow::bail!("the grandchild sent something bad: {e}"),
        Ok(None) => anyhow::bail!("the grandchild closed its channel: {:?}", child.wait().await?),
        Err(_) => anyhow::bail!("the grandchild did not answer"),
    };
    child.disconnect();
    child.wait().await?;
    Ok(report)
}

/// Closes descriptors 0-2, as a daemon does after start-up. (A Rust program cannot start with
/// them closed: std reopens them on `/dev/null` before `main`.)
#[allow(unsafe_code)]
fn close_stdio() {
    for fd in 0..3 {
        // SAFETY: this test helper never uses its standard I/O again (std's handles treat the
        // closed descriptors as sinks), and nothing else in it owns descriptors 0-2.
        unsafe { libc::close(fd) };
    }
}

/// `IPC_PROBE_MODE=own-fd`: `NODE_CHANNEL_FD` names a socket this process opened.
fn own_fd() -> anyhow::Result<()> {
    use std::io::{Read, Write};
    use std::os::fd::AsRawFd;
    let (mut ours, mut other) = std::os::unix::net::UnixStream::pair()?;
    std::env::set_var("NODE_CHANNEL_FD", ours.as_raw_fd().to_string());
    match handoff::process::parent_channel().map(|c| c.is_some()) {
        Ok(adopted) => println!("parent_channel: Ok(adopted: {adopted})"),
        Err(e) => println!("parent_channel: Err({e})"),
    }
    ours.write_all(b"ping")?;
    let mut got = [0u8; 4];
    other.read_exact(&mut got)?;
    println!("own socket still works: {}", &got == b"ping");
    drop(ours);
    println!("done");
    Ok(())
}

/// Reads the descriptor's flags from `/proc/self/fdinfo` (`flags:` is octal; `O_CLOEXEC` is
/// `0o2000000`).
fn is_cloexec(fd: RawFd) -> anyhow::Result<bool> {
    let info = std::fs::read_to_string(format!("/proc/self/fdinfo/{fd}"))?;
    let flags = info
        .lines()
        .find_map(|line| line.strip_prefix("flags:"))
        .ok_or_else(|| anyhow::anyhow!("no flags line for fd {fd}"))?;
    Ok(u32::from_str_radix(flags.trim(), 8)? & 0o2000000 != 0)
}
