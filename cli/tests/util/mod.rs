//! Shared by the CLI's test files: the binary under test, and `node` (required under CI).

#![allow(dead_code)] // each test file uses its own part

use std::process::Command;

/// The `handoff` binary built for these tests.
pub fn handoff() -> Command {
    Command::new(env!("CARGO_BIN_EXE_handoff"))
}

/// Whether `node` runs here; under CI (`CI` set) a missing node fails the test instead.
pub fn node_available() -> bool {
    let found = Command::new("node").arg("--version").output().is_ok_and(|o| o.status.success());
    assert!(found || std::env::var_os("CI").is_none(), "node is required in CI");
    found
}
