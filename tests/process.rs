//! Spawning children with a channel, attaching from the child side, and the process lifecycle:
//! environment, descriptor numbers and flags, exit status, disconnect from either side.

mod util;

use std::process::Stdio;

use handoff::{Command, SendError};
use serde_json::{json, Value};

async fn next_value(child: &mut handoff::Child) -> Value {
    util::within("a message from the child", child.recv())
        .await
        .expect("channel open")
        .expect("valid message")
        .value()
        .unwrap()
}

fn probe() -> Command {
    let mut command = Command::new(util::example("ipc_probe"));
    command.kill_on_drop(true);
    command
}

#[test]
fn rust_child_round_trip_and_clean_environment() {
    util::serial_test(async {
    let mut child = probe().spawn().unwrap();
    child.send(&json!({"n": 1, "s": "é😀\u{2028}"})).await.unwrap();
    assert_eq!(next_value(&mut child).await, json!({"echo": {"n": 1, "s": "é😀\u{2028}"}}));

    child.send(&json!({"report": true})).await.unwrap();
    let report = next_value(&mut child).await;
    // The child removed the variables, so neither it nor its own children see them.
    assert_eq!(report["env_fd"], Value::Null);
    assert_eq!(report["env_mode"], Value::Null);
    assert_eq!(report["grandchild_env"], "unset:unset:unset");
    // Its channel is at fd 3 and close-on-exec once attached (the other sockets, if any, are
    // tokio's own signal pipe, made when the probe spawned the grandchild).
    let sockets = report["channel_fds"].as_array().unwrap();
    assert!(sockets.contains(&json!([3, true])), "{sockets:?}");
    assert!(sockets.iter().all(|s| s[1] == true), "every socket close-on-exec: {sockets:?}");
    assert_eq!(report["pid"], child.id().unwrap());

    child.disconnect();
    let status = util::within("child exit", child.wait()).await.unwrap();
    assert!(status.success(), "{status}");
    assert!(util::within("end of messages", child.recv()).await.is_none());
    })
}

#[test]
fn channel_on_another_descriptor() {
    util::serial_test(async {
    let mut child = probe().channel_fd(7).spawn().unwrap();
    child.send(&json!({"report": true})).await.unwrap();
    let report = next_value(&mut child).await;
    let sockets = report["channel_fds"].as_array().unwrap();
    assert!(sockets.contains(&json!([7, true])), "{sockets:?}");
    assert!(!sockets.iter().any(|s| s[0] == 3), "nothing at the default fd: {sockets:?}");
    child.disconnect();
    assert!(util::within("child exit", child.wait()).await.unwrap().success());
    })
}

#[test]
fn exit_status_and_disconnect_seen_by_parent() {
    util::serial_test(async {
    let mut child = probe().spawn().unwrap();
    let sender = child.sender().clone();
    child.send(&json!({"exit": 7})).await.unwrap();
    let status = util::within("child exit", child.wait()).await.unwrap();
    assert_eq!(status.code(), Some(7));
    assert!(util::within("end of messages", child.recv()).await.is_none());
    util::within("closed", sender.closed()).await;
    assert!(!child.is_connected());
    assert!(matches!(child.send(&"late").await, Err(SendError::Closed)));
    })
}

#[test]
fn child_disconnects_first() {
    util::serial_test(async {
    let mut child = probe().spawn().unwrap();
    child.send(&json!({"disconnect": true})).await.unwrap();
    assert!(util::within("end of messages", child.recv()).await.is_none());
    util::within("closed", child.sender().closed()).await;
    assert!(!child.is_connected());
    assert!(util::within("child exit", child.wait()).await.unwrap().success());
    })
}

#[test]
fn parent_descriptors_return_to_baseline() {
    util::serial_test(async {
    // Warm up the runtime's own descriptors (signal pipe for child reaping) before the baseline.
    let mut warm = probe().spawn().unwrap();
    warm.disconnect();
    warm.wait().await.unwrap();
    drop(warm);
    let baseline = util::open_fds();
    for _ in 0..5 {
        let mut child = probe().spawn().unwrap();
        child.send(&"ping").await.unwrap();
        next_value(&mut child).await;
        child.disconnect();
        assert!(util::within("child exit", child.wait()).await.unwrap().success());
    }
    util::assert_fds_settle_to(&baseline).await;
    })
}

#[test]
fn child_without_a_channel_or_with_a_bad_one() {
    util::serial_test(async {
    let run = |env: Option<&str>| {
        let mut command = std::process::Command::new(util::example("ipc_probe"));
        command.env_remove("NODE_CHANNEL_FD").stderr(Stdio::piped());
        if let Some(value) = env {
            command.env("NODE_CHANNEL_FD", value);
        }
        command.output().unwrap()
    };
    assert_eq!(run(None).status.code(), Some(3), "no variable: no channel");
    let not_a_number = run(Some("three"));
    assert_eq!(not_a_number.status.code(), Some(4));
    assert!(String::from_utf8_lossy(&not_a_number.stderr).contains("not a file descriptor number"));
    // fd 1 is a pipe here, not a socket.
    let std_out = {
        let mut command = std::process::Command::new(util::example("ipc_probe"));
        command.env("NODE_CHANNEL_FD", "1").stdout(Stdio::piped()).stderr(Stdio::piped());
        command.output().unwrap()
    };
    assert_eq!(std_out.status.code(), Some(4));
    assert!(String::from_utf8_lossy(&std_out.stderr).contains("not an AF_UNIX stream socket"));
    let closed = run(Some("99"));
    assert_eq!(closed.status.code(), Some(4));
    assert!(String::from_utf8_lossy(&closed.stderr).contains("not open"));
    })
}

#[test]
fn advanced_serialization_is_refused_clearly() {
    util::serial_test(async {
        let Some(node) = util::node() else { return };
        // A Node parent asking for V8 serialization: the Rust child must refuse with a clear
        // error instead of misreading the length-prefixed frames as JSON.
        let script = "const c = require('child_process').spawn(process.argv[1], [], \
            {stdio: [0, 1, 'pipe', 'ipc'], serialization: 'advanced'}); \
            let err = ''; c.stderr.on('data', (d) => err += d); \
            c.on('exit', (code) => { console.log(JSON.stringify({code, err})); });";
        let output = tokio::process::Command::new(node)
            .args(["-e", script])
            .arg(util::example("ipc_probe"))
            .output()
            .await
            .unwrap();
        let result: Value = serde_json::from_slice(&output.stdout).unwrap();
        assert_eq!(result["code"], 4, "{result}");
        let err = result["err"].as_str().unwrap();
        assert!(err.contains("\"advanced\" serialization"), "{err}");
    })
}

#[test]
fn node_child_on_fd_4() {
    util::serial_test(async {
    let Some(_) = util::node() else { return };
    let script = "process.on('message', (m) => process.send({got: m, fd: process.env.NODE_CHANNEL_FD ?? null}))";
    let mut child = Command::new("node");
    child.args(["-e", script]).channel_fd(4).kill_on_drop(true);
    let mut child = child.spawn().unwrap();
    child.send(&json!([1, "two", null])).await.unwrap();
    assert_eq!(next_value(&mut child).await, json!({"got": [1, "two", null], "fd": null}));
    child.disconnect();
    let status = util::within("node exit", child.wait()).await.unwrap();
    assert!(status.success(), "{status}");
    })
}

#[test]
fn channel_on_stdin_leaves_standard_input_valid() {
    util::serial_test(async {
        // Node accepts 'ipc' at stdio index 0; the child keeps a duplicate as its channel and
        // puts /dev/null back at 0, so its stdin stays a valid descriptor.
        let mut child = probe().channel_fd(0).spawn().unwrap();
        child.send(&json!({"report": true})).await.unwrap();
        let report = next_value(&mut child).await;
        let sockets = report["channel_fds"].as_array().unwrap();
        assert!(!sockets.iter().any(|s| s[0] == 0), "fd 0 is no longer the socket: {sockets:?}");
        assert!(sockets.iter().any(|s| s[0].as_i64().unwrap() > 2 && s[1] == true), "{sockets:?}");
        child.disconnect();
        let status = util::within("child exit", child.wait()).await.unwrap();
        assert!(status.success(), "{status}");
    })
}

/// `NODE_UNIQUE_ID` marks a cluster worker: the child keeps it for `worker_id()` and removes it
/// from its environment; `Command` never passes on an inherited one, but one set explicitly
/// goes through.
#[test]
fn worker_id_is_not_inherited_by_grandchildren() {
    util::serial_test(async {
        let mut child = probe().env("NODE_UNIQUE_ID", "7").spawn().unwrap();
        child.send(&json!({"report": true})).await.unwrap();
        let report = next_value(&mut child).await;
        assert_eq!(report["worker_id"], "7");
        assert_eq!(report["grandchild_env"], "unset:unset:unset");

        // Put back into the child's environment (as if it never attached): a handoff::Command
        // still does not pass it on...
        child.send(&json!({"spawn_probe": {"set_worker_id": "9"}})).await.unwrap();
        let report = next_value(&mut child).await;
        assert_eq!(report["grandchild"]["worker_id"], Value::Null, "{report}");
        // ...unless it is set on the command.
        child.send(&json!({"spawn_probe": {"worker_id": "5"}})).await.unwrap();
        let report = next_value(&mut child).await;
        assert_eq!(report["grandchild"]["worker_id"], "5", "{report}");

        child.disconnect();
        assert!(util::within("child exit", child.wait()).await.unwrap().success());
    })
}

/// A Rust child that sends and returns from `main` at once loses nothing: the channel writes
/// what is queued while the runtime shuts down.
#[test]
fn messages_sent_just_before_main_returns_arrive() {
    util::serial_test(async {
        let mut child = probe().spawn().unwrap();
        child.send(&json!({"burst": 1000})).await.unwrap();
        for i in 0..1000 {
            assert_eq!(next_value(&mut child).await, json!({"i": i}));
        }
        assert!(util::within("end of messages", child.recv()).await.is_none());
        assert!(util::within("child exit", child.wait()).await.unwrap().success());
    })
}

/// A parent whose descriptors 0-2 are closed (a daemon) gets its socket pair there; the child's
/// end must not sit where std's stdio set-up overwrites it (here: the grandchild's stdout is
/// piped).
#[test]
fn a_parent_with_stdio_closed_still_gives_its_child_a_channel() {
    util::serial_test(async {
        let mut child = probe()
            .env("IPC_PROBE_CLOSE_STDIO", "1")
            .spawn()
            .unwrap();
        child.send(&json!({"spawn_probe": {"stdout_piped": true}})).await.unwrap();
        let report = next_value(&mut child).await;
        let grandchild = &report["grandchild"];
        assert!(grandchild["pid"].is_u64(), "the grandchild answered on its channel: {report}");
        let sockets = grandchild["channel_fds"].as_array().unwrap();
        assert!(sockets.contains(&json!([3, true])), "{sockets:?}");
        child.disconnect();
        assert!(util::within("child exit", child.wait()).await.unwrap().success());
    })
}

/// `NODE_CHANNEL_FD` naming a descriptor the process opened itself (close-on-exec) is refused
/// with a clear error, and that descriptor stays its owner's.
#[test]
fn parent_channel_refuses_a_descriptor_the_process_owns() {
    let output = std::process::Command::new(util::example("ipc_probe"))
        .env("IPC_PROBE_MODE", "own-fd")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{:?}: {stdout} {}", output.status, String::from_utf8_lossy(&output.stderr));
    assert!(stdout.contains("parent_channel: Err("), "{stdout}");
    assert!(stdout.contains("close-on-exec"), "{stdout}");
    assert!(stdout.contains("own socket still works: true"), "{stdout}");
    assert!(stdout.contains("done"), "{stdout}");
}

/// A child that sends as soon as it is attached and returns from `main` before its channel's
/// task ever ran loses nothing either (the linger guard exists from the task's creation).
#[test]
fn messages_sent_before_the_channel_task_ever_ran_arrive() {
    util::serial_test(async {
        let mut child = probe().env("IPC_PROBE_BURST", "1000").spawn().unwrap();
        for i in 0..1000 {
            assert_eq!(next_value(&mut child).await, json!({"i": i}));
        }
        assert!(util::within("end of messages", child.recv()).await.is_none());
        assert!(util::within("child exit", child.wait()).await.unwrap().success());
    })
}

/// Node hands a handoff child 300 sockets (more than its `recv_handles` budget) while the child,
/// before receiving anything, waits for Node to acknowledge a handle of its own. The
/// acknowledgement arrives behind Node's sockets; the child must read on to see it.
#[test]
fn a_child_awaiting_its_own_delivery_while_node_floods_it_with_handles() {
    util::serial_test(async {
        let node = require_node!();
        let output = tokio::process::Command::new(&node)
            .arg(util::node_script("handles_flood_parent.js"))
            .arg("300")
            .arg(util::example("ipc_probe"))
            .env("IPC_PROBE_HANDLE_FIRST", "1")
            .output();
        let output = util::within("the node parent", output).await.unwrap();
        let stdout = String::from_utf8_lossy(&output.stdout);
        let line: Value = serde_json::from_str(stdout.lines().last().unwrap_or("{}")).unwrap();
        assert_eq!(line, json!({"childHandles": 300, "gotChildHandle": true}), "{stdout}");
    })
}

/// A spawn failure names the program (Node: `spawn no-such-cmd ENOENT`) and keeps the kind.
#[test]
fn a_spawn_error_names_the_program() {
    util::serial_test(async {
        let error = Command::new("no-such-cmd-handoff").spawn().unwrap_err();
        assert_eq!(error.kind(), std::io::ErrorKind::NotFound);
        let text = error.to_string();
        assert!(text.contains("no-such-cmd-handoff"), "{text}");
        let source = std::error::Error::source(error.get_ref().unwrap()).unwrap();
        assert!(source.to_string().contains("os error 2"), "{source}");
    })
}

/// Once `wait()` has seen the child exit, the channel says so: `send` is an error, never an `Ok`
/// for a message nobody will read (it used to succeed now and then, and be lost).
#[test]
fn send_after_wait_is_an_error() {
    util::serial_test(async {
        for _ in 0..40 {
            let mut child = probe().spawn().unwrap();
            child.send(&json!({"exit": 0})).await.unwrap();
            assert!(util::within("exit", child.wait()).await.unwrap().success());
            assert!(!child.is_connected());
            assert!(matches!(child.send(&"late").await, Err(SendError::Closed)));
            let (socket, _other) = std::os::unix::net::UnixStream::pair().unwrap();
            match child.send_handle(&"late", socket).await {
                Err(handoff::SendHandleError { error: SendError::Disconnected { written: false }, handle }) => drop(handle),
                other => panic!("{other:?}"),
            }
        }
    })
}

/// The receiver can live in another task while this one keeps the process; the child is also
/// its channel's sender.
#[test]
fn receiving_in_another_task_keeps_process_control() {
    util::serial_test(async {
        let mut child = probe().spawn().unwrap();
        let mut receiver = child.take_receiver().unwrap();
        let (echoed, got_echo) = tokio::sync::oneshot::channel();
        let receiving = tokio::spawn(async move {
            let echo = receiver.recv().await.unwrap().unwrap().value().unwrap();
            let _ = echoed.send(echo);
            receiver.recv().await.is_none()
        });
        child.send(&json!({"n": 1})).await.unwrap(); // Child derefs to the Sender
        child.flush().await.unwrap();
        assert!(child.recv().await.is_none(), "the receiver was taken");
        let echo = util::within("the echo", got_echo).await.unwrap();
        assert_eq!(echo, json!({"echo": {"n": 1}}));
        child.disconnect();
        assert!(util::within("the receive stream's end", receiving).await.unwrap());
        assert!(util::within("exit", child.wait()).await.unwrap().success());
    })
}
