//! The cluster (issue 9): a Rust primary with Rust workers and unchanged Node apps, both modes; a
//! Rust worker under Node's own primary; and the lifecycle under steady load with faults — every
//! client connection counted.
//!
//! The load comes from `util::load` (threads opening fresh connections back to back). "Failed"
//! means a client got no answer: refused, reset, or closed without its pid.

mod util;

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use handoff::cluster::{BoundAddr, Event, Primary, PrimaryBuilder, PrimaryError, Schedule};
use util::load::{self, Load, Protocol};

fn rust_workers() -> PrimaryBuilder {
    Primary::builder(util::example("cluster_worker"))
}

fn node_app(script: &str) -> Option<PrimaryBuilder> {
    let node = util::node()?;
    Some(Primary::builder(node).arg(util::node_script(script)))
}

fn addr(primary: &Primary) -> SocketAddr {
    match &primary.local_addrs()[0] {
        BoundAddr::Tcp(addr) => *addr,
        other => panic!("not TCP: {other}"),
    }
}

async fn start(builder: PrimaryBuilder, workers: usize, schedule: Schedule) -> Primary {
    let primary = builder
        .workers(workers)
        .schedule(schedule)
        .listen("127.0.0.1:0".parse().unwrap())
        .drain_timeout(Duration::from_secs(10))
        .start()
        .await
        .expect("the primary starts");
    util::within("every worker ready", primary.wait_ready()).await.expect("workers ready");
    primary
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    tokio::task::spawn_blocking(f).await.unwrap()
}

/// `n` connections one after the other; the pids that answered.
async fn requests(addr: SocketAddr, protocol: Protocol, n: usize) -> Vec<u32> {
    blocking(move || (0..n).map(|_| load::request(addr, protocol).expect("answered")).collect()).await
}

async fn stop(primary: Primary) {
    util::within("the primary to stop", primary.stop()).await;
}

fn pids(primary_status: &handoff::cluster::Status) -> BTreeSet<u32> {
    primary_status.workers.iter().map(|w| w.pid).collect()
}

fn kill(pid: u32, signal: rustix::process::Signal) {
    let pid = rustix::process::Pid::from_raw(pid as i32).unwrap();
    rustix::process::kill_process(pid, signal).unwrap();
}

/// Waits for an event matching `want` (failing after a step).
async fn expect_event(events: &mut tokio::sync::broadcast::Receiver<Event>, what: &str, want: impl Fn(&Event) -> bool) -> Event {
    util::within(what, async {
        loop {
            match events.recv().await {
                Ok(event) if want(&event) => return event,
                Ok(_) | Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
                Err(e) => panic!("events ended: {e}"),
            }
        }
    })
    .await
}

// ---------------------------------------------------------------------------------------------
// Serving: Rust and Node workers, both modes
// ---------------------------------------------------------------------------------------------

async fn serves_with_every_worker(builder: PrimaryBuilder, schedule: Schedule, protocol: Protocol) {
    let primary = start(builder, 2, schedule).await;
    let status = primary.status().await.unwrap();
    assert_eq!(status.workers.len(), 2);
    let answered = requests(addr(&primary), protocol, 40).await;
    let serving: BTreeSet<u32> = answered.iter().copied().collect();
    assert_eq!(serving, pids(&status), "both workers answered");
    let mut events = primary.events();
    stop(primary).await;
    let mut exits = 0;
    while let Ok(event) = events.try_recv() {
        if let Event::Exited { code, signal, expected, .. } = event {
            assert_eq!((code, signal, expected), (Some(0), None, true), "drained workers exit 0 by themselves");
            exits += 1;
        }
    }
    assert_eq!(exits, 2);
}

#[test]
fn rust_workers_round_robin() {
    util::serial_test(serves_with_every_worker(rust_workers(), Schedule::RoundRobin, Protocol::Raw));
}

#[test]
fn rust_workers_shared() {
    util::serial_test(async {
        // Shared: the kernel spreads connections; both workers must still get some.
        let primary = start(rust_workers(), 2, Schedule::Shared).await;
        let expected = pids(&primary.status().await.unwrap());
        let mut seen = BTreeSet::new();
        for _ in 0..20 {
            seen.extend(requests(addr(&primary), Protocol::Raw, 20).await);
            if seen == expected {
                break;
            }
        }
        assert_eq!(seen, expected);
        stop(primary).await;
    });
}

#[test]
fn unchanged_node_http_app_round_robin() {
    util::serial_test(async {
        let Some(app) = node_app("http_app.js") else { return };
        serves_with_every_worker(app, Schedule::RoundRobin, Protocol::Http).await;
    });
}

#[test]
fn unchanged_node_net_app_round_robin() {
    util::serial_test(async {
        let Some(app) = node_app("net_app.js") else { return };
        serves_with_every_worker(app, Schedule::RoundRobin, Protocol::Raw).await;
    });
}

#[test]
fn unchanged_node_apps_shared() {
    util::serial_test(async {
        for (script, protocol) in [("http_app.js", Protocol::Http), ("net_app.js", Protocol::Raw)] {
            let Some(app) = node_app(script) else { return };
            let primary = start(app, 2, Schedule::Shared).await;
            let answered = requests(addr(&primary), protocol, 20).await;
            let all = pids(&primary.status().await.unwrap());
            assert!(answered.iter().all(|pid| all.contains(pid)), "{script}: {answered:?} vs {all:?}");
            stop(primary).await;
        }
    });
}

/// Waits until `status` satisfies `want`, returning it (failing after a step).
async fn status_until(primary: &Primary, what: &str, want: impl Fn(&handoff::cluster::Status) -> bool) -> handoff::cluster::Status {
    util::within(what, async {
        loop {
            let status = primary.status().await.unwrap();
            if want(&status) {
                return status;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
}

fn open_per_pid(status: &handoff::cluster::Status) -> std::collections::BTreeMap<u32, u64> {
    status.workers.iter().map(|w| (w.pid, w.connections_open.expect("round-robin counts open connections"))).collect()
}

/// Open connections per worker come from the kernel, so an unchanged Node app's count is right
/// too: keep-alive connections held open count, and stop counting once the client closes them.
#[test]
fn open_connections_are_counted_per_worker() {
    util::serial_test(async {
        let Some(app) = node_app("http_app.js") else { return };
        let primary = start(app, 2, Schedule::RoundRobin).await;
        let target = addr(&primary);
        let (clients, answered) = blocking(move || {
            use std::io::{BufRead, BufReader, Write};
            let mut clients = Vec::new();
            let mut answered = std::collections::BTreeMap::<u32, u64>::new();
            for _ in 0..6 {
                let mut client = std::net::TcpStream::connect(target).unwrap();
                client.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
                let mut reader = BufReader::new(client.try_clone().unwrap());
                let mut length = 0;
                loop {
                    let mut line = String::new();
                    reader.read_line(&mut line).unwrap();
                    if let Some(value) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                        length = value.trim().parse().unwrap();
                    }
                    if line == "\r\n" {
                        break;
                    }
                }
                let mut body = vec![0; length];
                std::io::Read::read_exact(&mut reader, &mut body).unwrap();
                *answered.entry(String::from_utf8(body).unwrap().parse().unwrap()).or_default() += 1;
                clients.push(client);
            }
            (clients, answered)
        })
        .await;
        let status = status_until(&primary, "6 handled", |s| s.workers.iter().map(|w| w.connections_handled).sum::<u64>() == 6).await;
        let mut want = answered.clone();
        for w in &status.workers {
            want.entry(w.pid).or_default();
        }
        assert_eq!(open_per_pid(&status), want, "keep-alive connections open, per worker");
        drop(clients);
        status_until(&primary, "closed connections to stop counting", |s| open_per_pid(s).values().all(|&n| n == 0)).await;
        stop(primary).await;

        // A worker that closes each connection itself (the Rust example) holds none open.
        let primary = start(rust_workers(), 2, Schedule::RoundRobin).await;
        requests(addr(&primary), Protocol::Raw, 10).await;
        // (A worker's `accepted` may reach the primary after its answer reached the client.)
        status_until(&primary, "10 handled, none open", |s| {
            s.workers.iter().map(|w| w.connections_handled).sum::<u64>() == 10 && open_per_pid(s).values().all(|&n| n == 0)
        })
        .await;
        stop(primary).await;
    });
}

/// The Rust worker under Node's own cluster primary (`execPath` pointed at it), both modes.
#[test]
fn rust_worker_under_nodes_primary() {
    util::serial_test(async {
        let Some(node) = util::node() else { return };
        for policy in ["rr", "none"] {
            let mut primary = tokio::process::Command::new(&node)
                .arg(util::node_script("cluster_primary.js"))
                .arg(policy)
                .arg("2")
                .arg(util::example("cluster_worker"))
                .stdin(std::process::Stdio::piped())
                .stdout(std::process::Stdio::piped())
                .kill_on_drop(true)
                .spawn()
                .unwrap();
            use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
            let mut lines = tokio::io::BufReader::new(primary.stdout.take().unwrap()).lines();
            let mut online = BTreeSet::new();
            let port = loop {
                let line = util::within("node's primary", lines.next_line()).await.unwrap().expect("a line");
                let event: serde_json::Value = serde_json::from_str(&line).unwrap();
                match event["event"].as_str() {
                    Some("online") => {
                        online.insert(event["pid"].as_u64().unwrap() as u32);
                    }
                    Some("ready") => break event["port"].as_u64().unwrap() as u16,
                    Some("timeout") => panic!("node's primary timed out"),
                    _ => {}
                }
            };
            let addr = SocketAddr::from(([127, 0, 0, 1], port));
            let mut seen = BTreeSet::new();
            for _ in 0..20 {
                seen.extend(requests(addr, Protocol::Raw, 10).await);
                if seen == online {
                    break;
                }
            }
            assert_eq!(seen, online, "{policy}: both Rust workers answered through Node's primary");
            primary.stdin.as_mut().unwrap().write_all(b"disconnect\n").await.unwrap();
            let mut exits = Vec::new();
            loop {
                let line = util::within("the workers' exits", lines.next_line()).await.unwrap().expect("a line");
                let event: serde_json::Value = serde_json::from_str(&line).unwrap();
                match event["event"].as_str() {
                    Some("exit") => exits.push(event),
                    Some("done") => break,
                    _ => {}
                }
            }
            for exit in exits {
                assert_eq!(exit["code"], 0, "{policy}: {exit}");
                assert_eq!(exit["exitedAfterDisconnect"], true, "{policy}: {exit}");
            }
            let _ = primary.kill().await;
        }
    });
}

// ---------------------------------------------------------------------------------------------
// Faults under load
// ---------------------------------------------------------------------------------------------

/// Runs load against `primary`, lets `during` act, and returns the outcome.
async fn under_load<F: std::future::Future<Output = ()>>(primary: &Primary, protocol: Protocol, during: F) -> load::Outcome {
    let load = Load::start(addr(primary), 6, protocol);
    tokio::time::sleep(Duration::from_millis(300)).await;
    during.await;
    // Served again afterwards.
    let after = load.snapshot().ok();
    blocking(move || {
        load.wait_for_answers(after, 200, Duration::from_secs(30));
        load.finish()
    })
    .await
}

#[test]
fn sigkill_a_worker_loses_at_most_the_connection_it_was_answering() {
    util::serial_test(async {
        let primary = start(rust_workers(), 3, Schedule::RoundRobin).await;
        let victim = primary.status().await.unwrap().workers[0].pid;
        let outcome = under_load(&primary, Protocol::Raw, async {
            kill(victim, rustix::process::Signal::KILL);
            tokio::time::sleep(Duration::from_millis(500)).await;
        })
        .await;
        assert_eq!(outcome.refused, 0);
        assert!(outcome.failures.len() <= 1, "failed: {:?}", outcome.failures);
        let status = primary.status().await.unwrap();
        assert!(!pids(&status).contains(&victim));
        assert_eq!(status.workers.len(), 3, "the slot was filled again");
        stop(primary).await;
    });
}

#[test]
fn connections_queued_to_a_stopped_worker_are_served_by_others_once_it_is_killed() {
    util::serial_test(async {
        let primary = start(rust_workers(), 3, Schedule::RoundRobin).await;
        let victim = primary.status().await.unwrap().workers[1].pid;
        let mut events = primary.events();
        let outcome = under_load(&primary, Protocol::Raw, async {
            kill(victim, rustix::process::Signal::STOP);
            tokio::time::sleep(Duration::from_millis(800)).await;
            kill(victim, rustix::process::Signal::KILL);
            tokio::time::sleep(Duration::from_millis(300)).await;
        })
        .await;
        assert_eq!(outcome.refused, 0);
        // Stopped between taking a connection and answering it: that one is lost, no other.
        assert!(outcome.failures.len() <= 1, "failed: {:?}", outcome.failures);
        let redispatched = std::iter::from_fn(|| events.try_recv().ok())
            .any(|e| matches!(e, Event::Redispatched { reason: "worker gone", .. }));
        assert!(redispatched, "the stopped worker's connections went to others");
        stop(primary).await;
    });
}

#[test]
fn a_wedged_worker_is_replaced_and_its_connections_served() {
    util::serial_test(async {
        let primary = rust_workers()
            .workers(2)
            .listen("127.0.0.1:0".parse().unwrap())
            .accept_timeout(Duration::from_millis(500))
            .start()
            .await
            .unwrap();
        util::within("ready", primary.wait_ready()).await.unwrap();
        let victim_id = primary.status().await.unwrap().workers[0].id;
        let victim = primary.status().await.unwrap().workers[0].pid;
        let mut events = primary.events();
        let outcome = under_load(&primary, Protocol::Raw, async {
            kill(victim, rustix::process::Signal::STOP);
            expect_event(&mut events, "the wedge", |e| *e == Event::Wedged { worker: victim_id }).await;
            expect_event(&mut events, "the wedged worker killed", |e| matches!(e, Event::Exited { worker, .. } if *worker == victim_id)).await;
        })
        .await;
        assert_eq!(outcome.refused, 0);
        assert!(outcome.failures.len() <= 1, "failed: {:?}", outcome.failures);
        let status = primary.status().await.unwrap();
        assert_eq!(status.workers.len(), 2, "{status:#?}\n{:?}", std::iter::from_fn(|| events.try_recv().ok()).collect::<Vec<_>>());
        assert!(!pids(&status).contains(&victim));
        stop(primary).await;
    });
}

#[test]
fn killing_every_worker_at_once_refuses_no_client() {
    util::serial_test(async {
        let primary = start(rust_workers(), 3, Schedule::RoundRobin).await;
        let victims = pids(&primary.status().await.unwrap());
        let outcome = under_load(&primary, Protocol::Raw, async {
            for pid in &victims {
                kill(*pid, rustix::process::Signal::KILL);
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        })
        .await;
        assert_eq!(outcome.refused, 0, "the listener outlives the workers");
        // At most the connection each one was answering.
        assert!(outcome.failures.len() <= victims.len(), "failed: {:?}", outcome.failures);
        let now = pids(&primary.status().await.unwrap());
        assert!(now.is_disjoint(&victims), "all replaced: {now:?}");
        assert!(outcome.pids.keys().any(|pid| now.contains(pid)), "served again after the restart");
        stop(primary).await;
    });
}

async fn reload_under_load(builder: PrimaryBuilder, protocol: Protocol) {
    let primary = start(builder, 3, Schedule::RoundRobin).await;
    let before = pids(&primary.status().await.unwrap());
    let mut report = None;
    let outcome = under_load(&primary, protocol, async {
        report = Some(util::within("the reload", primary.reload()).await.expect("the reload succeeds"));
    })
    .await;
    assert_eq!(report.unwrap().generation, 2);
    assert_eq!(outcome.refused, 0);
    assert!(outcome.failures.is_empty(), "failed: {:?}", outcome.failures);
    let status = primary.status().await.unwrap();
    let after: BTreeSet<u32> = status.workers.iter().filter(|w| w.state == "ready").map(|w| w.pid).collect();
    assert_eq!(after.len(), 3);
    assert!(after.is_disjoint(&before), "every worker replaced: {before:?} -> {after:?}");
    assert!(status.workers.iter().filter(|w| w.state == "ready").all(|w| w.generation == 2));
    stop(primary).await;
}

#[test]
fn rolling_reload_under_load_fails_no_connection_rust_workers() {
    util::serial_test(reload_under_load(rust_workers(), Protocol::Raw));
}

#[test]
fn rolling_reload_under_load_fails_no_connection_node_workers() {
    util::serial_test(async {
        let Some(app) = node_app("http_app.js") else { return };
        reload_under_load(app, Protocol::Http).await;
    });
}

/// A reload to a version that crashes at start stops, and the old generation keeps serving.
#[test]
fn a_reload_to_a_crashing_version_is_aborted_and_the_old_workers_serve_on() {
    util::serial_test(async {
        let Some(app) = node_app("http_app.js") else { return };
        let crash_file = std::env::temp_dir().join(format!("handoff-crash-{}", std::process::id()));
        let _ = std::fs::remove_file(&crash_file);
        let primary = start(app.env("CRASH_FILE", &crash_file), 2, Schedule::RoundRobin).await;
        let before = pids(&primary.status().await.unwrap());
        std::fs::write(&crash_file, "crash").unwrap();
        let mut result = None;
        let outcome = under_load(&primary, Protocol::Http, async {
            result = Some(util::within("the reload", primary.reload()).await);
        })
        .await;
        std::fs::remove_file(&crash_file).unwrap();
        match result.unwrap() {
            Err(PrimaryError::ReloadAborted(reason)) => assert!(reason.contains("exited"), "{reason}"),
            other => panic!("expected an aborted reload, got {other:?}"),
        }
        assert!(outcome.failures.is_empty(), "failed: {:?}", outcome.failures);
        let serving: BTreeSet<u32> = outcome.pids.keys().copied().collect();
        assert_eq!(serving, before, "only the old generation served");
        let status = primary.status().await.unwrap();
        assert_eq!(pids(&status), before);
        assert!(!status.reloading);
        // The next reload (the crash fixed) goes through.
        assert_eq!(primary.reload().await.unwrap().generation, 3);
        stop(primary).await;
    });
}

/// A graceful stop lets requests in flight finish: Node workers with no shutdown code of their
/// own close their servers on the cluster `disconnect` and exit after their last connection.
#[test]
fn graceful_stop_lets_requests_in_flight_finish() {
    util::serial_test(async {
        let Some(app) = node_app("http_app.js") else { return };
        let primary = start(app, 2, Schedule::RoundRobin).await;
        let addr = addr(&primary);
        let slow: Vec<_> = (0..4)
            .map(|_| {
                std::thread::spawn(move || {
                    let mut stream = std::net::TcpStream::connect(addr).unwrap();
                    use std::io::{Read, Write};
                    stream.write_all(b"GET /?slow=800 HTTP/1.0\r\n\r\n").unwrap();
                    let mut answer = String::new();
                    stream.read_to_string(&mut answer).map(|_| answer)
                })
            })
            .collect();
        tokio::time::sleep(Duration::from_millis(300)).await;
        let started = Instant::now();
        let mut events = primary.events();
        stop(primary).await;
        assert!(started.elapsed() < Duration::from_secs(10), "drained within the timeout");
        for request in slow {
            let answer = request.join().unwrap().expect("the request in flight finished");
            assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        }
        let exits: Vec<Event> = std::iter::from_fn(|| events.try_recv().ok()).filter(|e| matches!(e, Event::Exited { .. })).collect();
        assert!(exits.iter().all(|e| matches!(e, Event::Exited { code: Some(0), expected: true, .. })), "{exits:?}");
    });
}

/// Workers that exit at once are restarted with a growing delay, reported as a crash loop, and
/// waiting for readiness fails with the reason instead of spinning.
#[test]
fn a_crash_loop_is_reported_not_spun() {
    util::serial_test(async {
        let primary = Primary::builder("/bin/sh")
            .args(["-c", "exit 3"])
            .workers(2)
            .listen("127.0.0.1:0".parse().unwrap())
            .start()
            .await
            .unwrap();
        let mut events = primary.events();
        let started = Instant::now();
        match util::within("the verdict", primary.wait_ready()).await {
            Err(PrimaryError::NeverReady(reason)) => assert!(reason.contains("code 3"), "{reason}"),
            other => panic!("expected NeverReady, got {other:?}"),
        }
        // Five failures at 100, 200, 400, 800 ms apart: about 1.5 s, not a spin.
        assert!(started.elapsed() >= Duration::from_millis(1400), "{:?}", started.elapsed());
        let spawned = std::iter::from_fn(|| events.try_recv().ok()).filter(|e| matches!(e, Event::Spawned { .. })).count();
        assert!(spawned <= 12, "{spawned} spawns");
        primary.kill().await;
    });
}

/// Settings that cannot work are refused with a clear error before anything starts.
#[test]
fn impossible_settings_are_refused_clearly() {
    util::serial_test(async {
        match rust_workers().workers(0).listen("127.0.0.1:0".parse().unwrap()).start().await {
            Err(PrimaryError::Config(message)) => assert!(message.contains("at least 1"), "{message}"),
            other => panic!("{other:?}"),
        }
        match Primary::builder("no-such-command-handoff").listen("127.0.0.1:0".parse().unwrap()).start().await {
            Err(e @ PrimaryError::Spawn { .. }) => assert!(e.to_string().contains("no-such-command-handoff"), "{e}"),
            other => panic!("{other:?}"),
        }
        let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        match rust_workers().listen(taken.local_addr().unwrap().into()).start().await {
            Err(PrimaryError::Listen(e)) => {
                assert_eq!(e.kind(), std::io::ErrorKind::AddrInUse);
                assert!(e.to_string().contains("cannot listen on"), "{e}");
            }
            other => panic!("{other:?}"),
        }
    });
}

/// A Unix path listener: workers get the path in `PORT` (Node's `listen(path)` takes it).
#[test]
fn unix_path_listener_serves_node_workers() {
    util::serial_test(async {
        let path = std::env::temp_dir().join(format!("handoff-cluster-{}.sock", std::process::id()));
        let Some(app) = node_app("net_app.js") else { return };
        let _ = std::fs::remove_file(&path);
        let primary = app.workers(2).listen(handoff::cluster::ListenAddr::Unix(path.clone())).start().await.unwrap();
        util::within("ready", primary.wait_ready()).await.unwrap();
        let answers = blocking({
            let path = path.clone();
            move || {
                (0..10)
                    .map(|_| {
                        use std::io::Read;
                        let mut stream = std::os::unix::net::UnixStream::connect(&path).unwrap();
                        let mut text = String::new();
                        stream.read_to_string(&mut text).unwrap();
                        text
                    })
                    .collect::<Vec<_>>()
            }
        })
        .await;
        assert!(answers.iter().all(|a| a.starts_with("pid=")), "{answers:?}");
        stop(primary).await;
    });
}

// ---------------------------------------------------------------------------------------------
// Misbehaving workers and listeners (found by review; each fails without its fix)
// ---------------------------------------------------------------------------------------------

/// `n` requests at once, each on its own thread; what each got.
async fn concurrent_requests(addr: SocketAddr, protocol: Protocol, n: usize) -> Vec<Result<u32, String>> {
    blocking(move || {
        let threads: Vec<_> = (0..n).map(|_| std::thread::spawn(move || load::request(addr, protocol))).collect();
        threads.into_iter().map(|t| t.join().unwrap()).collect()
    })
    .await
}

fn events_so_far(events: &mut tokio::sync::broadcast::Receiver<Event>) -> Vec<Event> {
    std::iter::from_fn(|| events.try_recv().ok()).collect()
}

/// A worker that serves slowly, one connection at a time, with a timer in its accept loop: its
/// channel acknowledges each connection at once, so it is busy, not wedged (it is not killed),
/// and the `accept()` futures its loop drops lose no connection.
#[test]
fn a_slow_worker_is_not_taken_for_wedged_and_a_dropped_accept_loses_nothing() {
    util::serial_test(async {
        let primary = Primary::builder(util::example("cluster_worker_busy"))
            .env("SERVE_MS", "400")
            .workers(2)
            .listen("127.0.0.1:0".parse().unwrap())
            .accept_timeout(Duration::from_millis(300))
            .start()
            .await
            .unwrap();
        util::within("ready", primary.wait_ready()).await.unwrap();
        let mut events = primary.events();
        let answers = concurrent_requests(addr(&primary), Protocol::Raw, 8).await;
        let failed: Vec<&String> = answers.iter().filter_map(|a| a.as_ref().err()).collect();
        assert!(failed.is_empty(), "failed: {failed:?}");
        let seen = events_so_far(&mut events);
        assert!(!seen.iter().any(|e| matches!(e, Event::Wedged { .. } | Event::Exited { .. })), "{seen:?}");
        stop(primary).await;
    });
}

/// Clients of a listener no worker serves (workers listen on the first address only) wait; they
/// never hold up the listener the workers do serve.
#[test]
fn an_unserved_listener_does_not_hold_up_a_served_one() {
    util::serial_test(async {
        let primary = rust_workers()
            .workers(2)
            .listen("127.0.0.1:0".parse().unwrap())
            .listen("127.0.0.1:0".parse().unwrap())
            .max_pending(100)
            .start()
            .await
            .unwrap();
        util::within("ready", primary.wait_ready()).await.unwrap();
        let BoundAddr::Tcp(unserved) = primary.local_addrs()[1].clone() else { panic!("TCP") };
        let idle: Vec<std::net::TcpStream> = (0..150).map(|_| std::net::TcpStream::connect(unserved).unwrap()).collect();
        tokio::time::sleep(Duration::from_millis(200)).await;
        let answers = concurrent_requests(addr(&primary), Protocol::Raw, 10).await;
        assert!(answers.iter().all(Result::is_ok), "{answers:?}");
        drop(idle);
        stop(primary).await;
    });
}

/// A worker that never reports ready is killed at the ready timeout, and that counts as a
/// failure: backoff, then a crash loop reported, not a restart every timeout forever.
#[test]
fn a_worker_never_ready_is_a_failure_with_backoff() {
    util::serial_test(async {
        let primary = Primary::builder("sleep")
            .arg("100")
            .workers(1)
            .listen("127.0.0.1:0".parse().unwrap())
            .ready_timeout(Duration::from_millis(200))
            .restart_delay(Duration::from_millis(50))
            .start()
            .await
            .unwrap();
        match util::within("the verdict", primary.wait_ready()).await {
            Err(PrimaryError::NeverReady(reason)) => assert!(reason.contains("was not ready within"), "{reason}"),
            other => panic!("expected NeverReady, got {other:?}"),
        }
        primary.kill().await;
    });
}

/// A worker that leaves on its own at once, every time (Node's `cluster.worker.disconnect()`), is
/// restarted with the crash backoff, not in a tight loop.
#[test]
fn a_worker_leaving_on_its_own_is_restarted_with_backoff() {
    util::serial_test(async {
        let Some(app) = node_app("leave_app.js") else { return };
        let primary = app.workers(1).listen("127.0.0.1:0".parse().unwrap()).start().await.unwrap();
        let mut events = primary.events();
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let seen = events_so_far(&mut events);
        let spawned = seen.iter().filter(|e| matches!(e, Event::Spawned { .. })).count();
        // 100, 200, 400, 800 ms apart, after Node's own start-up time each.
        assert!(spawned <= 5, "{spawned} spawns in 1.5 s: {seen:?}");
        assert!(seen.iter().any(|e| matches!(e, Event::Exited { expected: true, .. })), "{seen:?}");
        primary.kill().await;
    });
}

/// A wedged worker whose replacement crashes at start is killed all the same: its connections
/// go to the other worker instead of waiting forever.
#[test]
fn a_wedged_worker_whose_replacement_fails_is_killed_and_its_connections_served() {
    util::serial_test(async {
        let Some(app) = node_app("http_app.js") else { return };
        let crash_file = std::env::temp_dir().join(format!("handoff-crash-{}", std::process::id()));
        let _ = std::fs::remove_file(&crash_file);
        let primary = app
            .env("CRASH_FILE", &crash_file)
            .workers(2)
            .listen("127.0.0.1:0".parse().unwrap())
            .accept_timeout(Duration::from_millis(300))
            .ready_timeout(Duration::from_secs(2))
            .start()
            .await
            .unwrap();
        util::within("ready", primary.wait_ready()).await.unwrap();
        std::fs::write(&crash_file, "crash").unwrap(); // every new worker crashes from now on
        let victim = primary.status().await.unwrap().workers[0].pid;
        kill(victim, rustix::process::Signal::STOP);
        let answers = concurrent_requests(addr(&primary), Protocol::Http, 6).await;
        std::fs::remove_file(&crash_file).unwrap();
        assert!(answers.iter().all(Result::is_ok), "{answers:?}");
        assert!(!answers.iter().any(|a| *a.as_ref().unwrap() == victim));
        let status = primary.status().await.unwrap();
        assert!(!pids(&status).contains(&victim), "the wedged worker was killed: {status:#?}");
        stop(primary).await;
    });
}

/// A wedged worker that dies while its replacement is still starting: the replacement takes
/// its slot (no third worker for two slots, none left out of a reload).
#[test]
fn a_worker_dying_while_its_replacement_starts_leaves_no_extra_worker() {
    util::serial_test(async {
        let Some(app) = node_app("http_app.js") else { return };
        let primary = app
            .env("START_DELAY_MS", "700")
            .workers(2)
            .listen("127.0.0.1:0".parse().unwrap())
            .accept_timeout(Duration::from_millis(300))
            .start()
            .await
            .unwrap();
        util::within("ready", primary.wait_ready()).await.unwrap();
        let mut events = primary.events();
        let status = primary.status().await.unwrap();
        let (victim_id, victim) = (status.workers[0].id, status.workers[0].pid);
        kill(victim, rustix::process::Signal::STOP);
        let target = addr(&primary);
        let answers = tokio::spawn(concurrent_requests(target, Protocol::Http, 4));
        expect_event(&mut events, "the wedge", |e| *e == Event::Wedged { worker: victim_id }).await;
        kill(victim, rustix::process::Signal::KILL); // its replacement is still in its start delay
        let answers = util::within("the answers", answers).await.unwrap();
        assert!(answers.iter().all(Result::is_ok), "{answers:?}");
        util::within("two ready workers again", primary.wait_ready()).await.unwrap();
        tokio::time::sleep(Duration::from_millis(1500)).await; // any second replacement is ready by now
        let status = primary.status().await.unwrap();
        assert_eq!(status.workers.len(), 2, "{status:#?}\n{:?}", events_so_far(&mut events));
        util::within("the reload", primary.reload()).await.unwrap();
        let status = primary.status().await.unwrap();
        let ready: Vec<_> = status.workers.iter().filter(|w| w.state == "ready").collect();
        assert_eq!(ready.len(), 2, "{status:#?}");
        assert!(ready.iter().all(|w| w.generation == 2), "{status:#?}");
        stop(primary).await;
    });
}

/// Every Node worker's `listen(0)` shares one port, as under Node's primary (one listener per
/// key), and a worker crashing and coming back does not make the primary bind another.
#[test]
fn node_workers_listening_on_port_0_share_one_port() {
    util::serial_test(async {
        let Some(app) = node_app("port0_app.js") else { return };
        let primary = start(app, 3, Schedule::RoundRobin).await;
        let status = primary.status().await.unwrap();
        assert_eq!(status.listeners.len(), 2, "the given one and one for port 0: {:?}", status.listeners);
        let shared: SocketAddr = status.listeners[1].parse().unwrap();
        let answered: BTreeSet<u32> = requests(shared, Protocol::Raw, 12).await.into_iter().collect();
        assert_eq!(answered, pids(&status), "every worker serves the port-0 listener");
        kill(status.workers[0].pid, rustix::process::Signal::KILL);
        util::within("ready again", async {
            while primary.status().await.unwrap().workers.iter().filter(|w| w.state == "ready").count() < 3 {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await;
        assert_eq!(primary.status().await.unwrap().listeners.len(), 2);
        stop(primary).await;
    });
}
