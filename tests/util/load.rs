//! A load generator for cluster tests: threads that open fresh connections in a loop, each one
//! reading its whole answer, and count what happened to every one of them.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// What a client sends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    /// Nothing: the server writes `pid=N` and closes.
    Raw,
    /// `GET / HTTP/1.0`; the body is the pid.
    Http,
}

/// The fate of every connection made.
#[derive(Debug, Default, Clone)]
pub struct Outcome {
    /// Answered, per pid that answered.
    pub pids: BTreeMap<u32, u64>,
    /// Failed, with why (refused, reset, empty answer...).
    pub failures: Vec<String>,
    /// Refused at connect (the listener was not there).
    pub refused: u64,
}

impl Outcome {
    pub fn ok(&self) -> u64 {
        self.pids.values().sum()
    }
}

/// A running load; [`Load::finish`] stops it and returns what happened.
pub struct Load {
    stop: Arc<AtomicBool>,
    threads: Vec<std::thread::JoinHandle<()>>,
    outcome: Arc<Mutex<Outcome>>,
}

/// One connection, answered with a pid, or the reason it failed.
pub fn request(addr: SocketAddr, protocol: Protocol) -> Result<u32, String> {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(10)).map_err(|e| format!("connect: {e}"))?;
    stream.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    if protocol == Protocol::Http {
        stream.write_all(b"GET / HTTP/1.0\r\nHost: x\r\n\r\n").map_err(|e| format!("write: {e}"))?;
    }
    let mut answer = String::new();
    stream.read_to_string(&mut answer).map_err(|e| format!("read: {e}"))?;
    let body = match protocol {
        Protocol::Raw => answer.trim().strip_prefix("pid=").map(str::to_owned),
        Protocol::Http => answer.split("\r\n\r\n").nth(1).map(|b| b.trim().to_owned()),
    };
    body.and_then(|b| b.parse().ok()).ok_or_else(|| format!("answer without a pid: {answer:?}"))
}

impl Load {
    /// Starts `clients` threads making connections to `addr` back to back.
    pub fn start(addr: SocketAddr, clients: usize, protocol: Protocol) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let outcome = Arc::new(Mutex::new(Outcome::default()));
        let threads = (0..clients)
            .map(|_| {
                let (stop, outcome) = (stop.clone(), outcome.clone());
                std::thread::spawn(move || {
                    while !stop.load(Ordering::SeqCst) {
                        let result = request(addr, protocol);
                        let mut outcome = outcome.lock().unwrap();
                        match result {
                            Ok(pid) => *outcome.pids.entry(pid).or_default() += 1,
                            Err(e) => {
                                if e.contains("refused") {
                                    outcome.refused += 1;
                                }
                                outcome.failures.push(e);
                            }
                        }
                    }
                })
            })
            .collect();
        Load { stop, threads, outcome }
    }

    /// What happened so far.
    pub fn snapshot(&self) -> Outcome {
        self.outcome.lock().unwrap().clone()
    }

    /// Waits until `more` connections beyond `from` were answered (or fails after `within`).
    pub fn wait_for_answers(&self, from: u64, more: u64, within: Duration) {
        let deadline = Instant::now() + within;
        while self.snapshot().ok() < from + more {
            assert!(Instant::now() < deadline, "fewer than {more} answers within {within:?}: {:?}", self.snapshot());
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Stops the clients (each finishes its connection) and returns the outcome.
    pub fn finish(self) -> Outcome {
        self.stop.store(true, Ordering::SeqCst);
        for thread in self.threads {
            thread.join().unwrap();
        }
        Arc::try_unwrap(self.outcome).unwrap().into_inner().unwrap()
    }
}
