//! A test helper child (used by `tests/process.rs`): attaches to its parent's channel and obeys
//! simple commands, reporting what it observes.
//!
//! Messages it understands (anything else is echoed back as `{"echo": <message>}`):
//! - `{"report": true}` → `{"env_fd": .., "env_mode": .., "channel_fds": [[fd, cloexec], ..],
//!   "grandchild_env": ".."}`: the `NODE_CHANNEL_*` variables left in its environment, its open
//!   socket descriptors with their close-on-exec flag, and what a grandchild shell sees;
//! - `{"exit": code}` → exits with that code at once;
//! - `{"disconnect": true}` → disconnects from its side and exits 0 once the channel closed.
//!
//! It exits 0 when the parent closes the channel, and 3 when it has no channel.

use std::os::fd::RawFd;

use serde_json::{json, Value};

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let mut parent = match handoff::process::parent_channel() {
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
    while let Some(received) = parent.recv().await {
        let message = received?.value()?;
        if message.get("report").is_some() {
            parent.send(&report().await?).await?;
        } else if let Some(code) = message.get("exit").and_then(Value::as_i64) {
            parent.sender().flush().await?;
            std::process::exit(code as i32);
        } else if message.get("disconnect").is_some() {
            parent.disconnect();
            parent.sender().closed().await;
        } else {
            parent.send(&json!({ "echo": message })).await?;
        }
    }
    Ok(())
}

async fn report() -> anyhow::Result<Value> {
    let grandchild = tokio::process::Command::new("sh")
        .arg("-c")
        .arg("echo \"${NODE_CHANNEL_FD-unset}:${NODE_CHANNEL_SERIALIZATION_MODE-unset}\"")
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
    }))
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
