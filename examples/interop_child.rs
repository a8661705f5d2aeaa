//! A test helper, not a demo: the Rust responder that `tests/node/interop_parent.js` (Node in the
//! parent role) drives in `tests/node_interop.rs`. It is the mirror of `tests/node/interop_peer.js`
//! (the Node responder a Rust parent drives) and speaks the same commands and small protocols
//! over handed-over handles (described in `tests/node/interop_lib.js`).
//!
//! Start it from a Node parent with `spawn(path, [], {stdio: [0, 1, 2, 'ipc']})`. It sends
//! `{op: "ready", pid}` first. Every message that is not an object with a string `op` is echoed
//! back byte for byte. Commands:
//!
//! | message | answer |
//! |---|---|
//! | `{op:"values"}` | each value of `tests/node/interop_values.json`, then `{op:"values-done"}` |
//! | `{op:"big", reps}` | `{op:"big", value}` (the shared 1 MiB string) |
//! | `{op:"many", n}` | `{seq: 0}` .. `{seq: n-1}` |
//! | `{op:"take", as, id}` + handle | `{op:"took", id, as, handleType, kind, key, dgramType}`, then serves it |
//! | `{op:"close-server", id}` | stops serving a taken server, `{op:"closed-server", id}` |
//! | `{op:"give", kind, id}` | a handle of `kind` with `{op:"given", id, kind, ...}`; `{op:"released", id}` after the ACK; `{op:"client-got", id, data}` for sockets |
//! | `{op:"give-many", kind, n, base}` | `n` gives at once, ids `base..base+n` |
//! | `{op:"report"}` | `{op:"report", received, internal}`: the first user messages and internal messages seen |
//! | `{op:"try-reserved"}` | tries `send({"cmd":"NODE_X"})`, sends `{"cmd":"NODE_"}` and `{"cmd":"fooNODE_"}`, then `{op:"reserved-result", error, refusedCmd}` |
//! | `{op:"disconnect"}` | disconnects; exits 0 when the channel has closed |
//! | `{op:"exit"}` | exits 0 at once, channel still open |
//!
//! When the channel ends it prints `{"rust":"recv-ended"}` on stdout and exits 0.

use std::collections::HashMap;

use handoff::handle::{FdKind, Native, ReceivedHandle};
use handoff::{SendError, Sender};
use serde_json::value::RawValue;
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::task::JoinHandle;

const WHO: &str = "rust";
const VALUES: &str = include_str!("../tests/node/interop_values.json");
/// The unit of the shared big string (see `bigString` in `tests/node/interop_lib.js`).
const BIG_UNIT: &str = "abc\u{fc}\u{20ac}\u{1F600}\u{2028}";

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let Some(channel) = handoff::process::parent_channel()? else {
        eprintln!("interop_child: no IPC channel; start me from a Node or handoff parent");
        std::process::exit(2);
    };
    let (sender, mut receiver) = channel.split();
    let mut internal = sender.internal_messages();
    sender.send(&json!({"op": "ready", "pid": std::process::id()})).await?;

    let mut received_log: Vec<Value> = Vec::new();
    let mut internal_log: Vec<Value> = Vec::new();
    let mut servers: HashMap<u64, JoinHandle<()>> = HashMap::new();
    let mut tasks = tokio::task::JoinSet::new();

    while let Some(item) = receiver.recv().await {
        // The driver publishes an internal message before it delivers the next user message, so
        // everything seen so far is already in the broadcast buffer.
        while let Ok(seen) = internal.try_recv() {
            internal_log.push(seen.value()?);
        }
        let mut message = match item {
            Ok(message) => message,
            Err(e) => {
                eprintln!("interop_child: {e}");
                continue;
            }
        };
        let value: Value = message.value()?;
        if received_log.len() < 50 && message.json().len() < 2000 {
            received_log.push(value.clone());
        }
        let Some(op) = value.get("op").and_then(Value::as_str).filter(|_| value.is_object()) else {
            // Echo unchanged, byte for byte.
            let raw = RawValue::from_string(message.json().to_owned())?;
            sender.send(&raw).await?;
            continue;
        };
        let id = value.get("id").and_then(Value::as_u64).unwrap_or(0);
        match op {
            "values" => {
                let values: Vec<Box<RawValue>> = serde_json::from_str(VALUES)?;
                for v in &values {
                    sender.send(v).await?;
                }
                sender.send(&json!({"op": "values-done", "count": values.len()})).await?;
            }
            "reserialize" => {
                // Parsed into numbers and written anew: every double must survive exactly.
                let values: Vec<f64> = serde_json::from_value(value["values"].clone())?;
                sender.send(&json!({"op": "reserialized", "values": values})).await?;
            }
            "doubles" => {
                // Doubles made in Rust from bit patterns: edge cases, then pseudo-random ones.
                let mut bits: Vec<u64> = vec![
                    0x0000_0000_0000_0001, // 5e-324, the smallest subnormal
                    0x000F_FFFF_FFFF_FFFF, // the largest subnormal
                    0x0010_0000_0000_0000, // the smallest normal
                    0x7FEF_FFFF_FFFF_FFFF, // the largest finite
                    0x8000_0000_0000_0000, // -0
                    0x4340_0000_0000_0000, // 2^53
                    0x4340_0000_0000_0001, // 2^53 + 2
                    0x4445_0000_0000_0000, // 2^69 + 2^68, a 1e21-ish integer
                    0x3FB9_9999_9999_999A, // 0.1
                ];
                let mut state: u64 = 0x9E37_79B9_7F4A_7C15;
                while bits.len() < 2000 {
                    state ^= state << 13;
                    state ^= state >> 7;
                    state ^= state << 17;
                    if f64::from_bits(state).is_finite() {
                        bits.push(state);
                    }
                }
                let values: Vec<f64> = bits.iter().map(|b| f64::from_bits(*b)).collect();
                let bits: Vec<String> = bits.iter().map(|b| format!("{b:016x}")).collect();
                sender.send(&json!({"op": "doubles", "values": values, "bits": bits})).await?;
            }
            "big" => {
                let reps = value["reps"].as_u64().unwrap_or(0) as usize;
                sender.send(&json!({"op": "big", "value": BIG_UNIT.repeat(reps)})).await?;
            }
            "many" => {
                for seq in 0..value["n"].as_u64().unwrap_or(0) {
                    sender.send(&json!({"seq": seq})).await?;
                }
            }
            "take" => {
                let as_ = value["as"].as_str().unwrap_or_default().to_owned();
                let Some(handle) = message.take_handle() else {
                    sender
                        .send(&json!({"op": "error", "id": id, "error": "take without a handle"}))
                        .await?;
                    continue;
                };
                sender
                    .send(&json!({
                        "op": "took", "id": id, "as": as_,
                        "handleType": handle.handle_type().as_str(),
                        "kind": format!("{:?}", handle.kind()),
                        "key": handle.key(),
                        "dgramType": handle.dgram_type().map(|d| d.as_str()),
                    }))
                    .await?;
                match take(handle) {
                    Ok(Some(server)) => {
                        servers.insert(id, server);
                    }
                    Ok(None) => {}
                    Err(e) => {
                        sender
                            .send(&json!({"op": "error", "id": id, "error": e.to_string()}))
                            .await?;
                    }
                }
            }
            "close-server" => {
                if let Some(server) = servers.remove(&id) {
                    server.abort();
                    let _ = server.await; // the listener is dropped once the task is gone
                }
                sender.send(&json!({"op": "closed-server", "id": id})).await?;
            }
            "give" => {
                let kind = value["kind"].as_str().unwrap_or_default().to_owned();
                tasks.spawn(give(sender.clone(), kind, id));
            }
            "give-many" => {
                let kind = value["kind"].as_str().unwrap_or_default();
                let base = value["base"].as_u64().unwrap_or(0);
                for i in 0..value["n"].as_u64().unwrap_or(0) {
                    tasks.spawn(give(sender.clone(), kind.to_owned(), base + i));
                }
            }
            "report" => {
                sender
                    .send(&json!({"op": "report", "received": received_log, "internal": internal_log}))
                    .await?;
            }
            "try-reserved" => {
                let refused = sender.send(&json!({"cmd": "NODE_X"})).await;
                let cmd = match &refused {
                    Err(SendError::Reserved { cmd }) => Some(cmd.clone()),
                    _ => None,
                };
                sender.send(&json!({"cmd": "NODE_"})).await?;
                sender.send(&json!({"cmd": "fooNODE_"})).await?;
                sender
                    .send(&json!({"op": "reserved-result", "error": format!("{refused:?}"), "refusedCmd": cmd}))
                    .await?;
            }
            "disconnect" => sender.disconnect(),
            "exit" => {
                sender.flush().await?;
                std::process::exit(0);
            }
            other => {
                sender
                    .send(&json!({"op": "error", "error": format!("unknown op {other}")}))
                    .await?;
            }
        }
    }
    println!(r#"{{"rust":"recv-ended"}}"#);
    for server in servers.into_values() {
        server.abort();
    }
    tasks.abort_all();
    Ok(())
}

/// Serves a received handle; returns the task of a server (so it can be closed).
fn take(handle: ReceivedHandle) -> anyhow::Result<Option<JoinHandle<()>>> {
    Ok(match handle.kind() {
        FdKind::TcpStream => {
            let stream: tokio::net::TcpStream = handle.try_into()?;
            tokio::spawn(serve_stream(stream));
            None
        }
        FdKind::UnixStream => {
            let stream: tokio::net::UnixStream = handle.try_into()?;
            tokio::spawn(serve_stream(stream));
            None
        }
        FdKind::TcpListener => {
            let listener: tokio::net::TcpListener = handle.try_into()?;
            Some(tokio::spawn(serve_listener(Listener::Tcp(listener))))
        }
        FdKind::UnixListener => {
            let listener: tokio::net::UnixListener = handle.try_into()?;
            Some(tokio::spawn(serve_listener(Listener::Unix(listener))))
        }
        FdKind::Udp4 | FdKind::Udp6 => {
            let socket: tokio::net::UdpSocket = handle.try_into()?;
            Some(tokio::spawn(async move {
                let mut buf = vec![0u8; 65536];
                while let Ok((n, from)) = socket.recv_from(&mut buf).await {
                    let mut reply = format!("{WHO}:").into_bytes();
                    reply.extend_from_slice(&buf[..n]);
                    let _ = socket.send_to(&reply, from).await;
                }
            }))
        }
        other => anyhow::bail!("cannot serve a {other:?}"),
    })
}

/// The stream protocol, receiving side: greet, answer the first line, end.
async fn serve_stream<S: AsyncRead + AsyncWrite + Unpin>(stream: S) {
    let mut stream = BufReader::new(stream);
    let _ = stream.get_mut().write_all(format!("{WHO} says hi\n").as_bytes()).await;
    let mut line = String::new();
    let _ = stream.read_line(&mut line).await;
    let _ =
        stream.get_mut().write_all(format!("{WHO} got: {}\n", line.trim_end()).as_bytes()).await;
    let _ = stream.get_mut().shutdown().await;
}

/// The stream protocol, client side: read the greeting, send `ping`, read to the end.
async fn stream_client<S: AsyncRead + AsyncWrite + Unpin>(stream: S) -> String {
    let mut stream = BufReader::new(stream);
    let mut text = String::new();
    let _ = stream.read_line(&mut text).await;
    let _ = stream.get_mut().write_all(b"ping\n").await;
    let _ = stream.read_to_string(&mut text).await;
    text
}

enum Listener {
    Tcp(tokio::net::TcpListener),
    Unix(tokio::net::UnixListener),
}

/// Accepts until the listener fails for good (waiting out descriptor exhaustion), answering each
/// connection.
async fn serve_listener(listener: Listener) {
    let mut retry = handoff::server::AcceptRetry::new();
    loop {
        let accepted = match &listener {
            Listener::Tcp(l) => l.accept().await.map(|(s, _)| tokio::spawn(answer_accepted(s))),
            Listener::Unix(l) => l.accept().await.map(|(s, _)| tokio::spawn(answer_accepted(s))),
        };
        match accepted {
            Ok(_) => retry.accepted(),
            Err(error) => {
                if retry.wait(error).await.is_err() {
                    return;
                }
            }
        }
    }
}

async fn answer_accepted<S: AsyncWrite + Unpin>(mut socket: S) {
    let _ = socket.write_all(format!("{WHO} accepted\n").as_bytes()).await;
    let _ = socket.shutdown().await;
}

/// Creates a handle of `kind` and sends it by value (our copy is closed on the ACK).
async fn give(sender: Sender, kind: String, id: u64) {
    if let Err(e) = try_give(&sender, &kind, id).await {
        let _ = sender.send(&json!({"op": "error", "id": id, "error": e.to_string()})).await;
    }
}

async fn try_give(sender: &Sender, kind: &str, id: u64) -> anyhow::Result<()> {
    let msg = |extra: Value| {
        let mut m = json!({"op": "given", "id": id, "kind": kind});
        if let (Some(m), Value::Object(extra)) = (m.as_object_mut(), extra) {
            m.extend(extra);
        }
        m
    };
    let mut client: Option<JoinHandle<String>> = None;
    match kind {
        "tcp-socket" | "native-tcp-socket" => {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
            let port = listener.local_addr()?.port();
            let connecting = tokio::net::TcpStream::connect(("127.0.0.1", port));
            let (connected, accepted) = tokio::join!(connecting, listener.accept());
            let (socket, _) = accepted?;
            client = Some(tokio::spawn(stream_client(connected?)));
            let m = msg(json!({"port": port}));
            if kind == "tcp-socket" {
                sender.send_handle(&m, socket).await?;
            } else {
                sender.send_handle(&m, Native(socket)).await?;
            }
        }
        "unix-socket" => {
            let (ours, theirs) = tokio::net::UnixStream::pair()?;
            client = Some(tokio::spawn(stream_client(ours)));
            sender.send_handle(&msg(json!({})), theirs).await?;
        }
        "tcp-server" | "native-tcp-server" => {
            let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
            let m = msg(json!({"port": listener.local_addr()?.port()}));
            if kind == "tcp-server" {
                sender.send_handle(&m, listener).await?;
            } else {
                sender.send_handle(&m, Native(listener)).await?;
            }
        }
        "unix-server" => {
            let path = std::env::temp_dir()
                .join(format!("handoff-interop-child-{}-{id}.sock", std::process::id()));
            let _ = std::fs::remove_file(&path);
            let listener = std::os::unix::net::UnixListener::bind(&path)?;
            sender.send_handle(&msg(json!({"path": path})), listener).await?;
        }
        "udp4" | "udp6" | "native-udp" => {
            let (addr, type_) =
                if kind == "udp6" { ("[::1]:0", "udp6") } else { ("127.0.0.1:0", "udp4") };
            let socket = std::net::UdpSocket::bind(addr)?;
            let local = socket.local_addr()?;
            let m = msg(
                json!({"address": local.ip().to_string(), "port": local.port(), "type": type_}),
            );
            if kind == "native-udp" {
                sender.send_handle(&m, Native(socket)).await?;
            } else {
                sender.send_handle(&m, socket).await?;
            }
        }
        other => anyhow::bail!("unknown kind {other}"),
    }
    sender.send(&json!({"op": "released", "id": id})).await?;
    if let Some(client) = client {
        let data = client.await?;
        sender.send(&json!({"op": "client-got", "id": id, "data": data})).await?;
    }
    Ok(())
}
