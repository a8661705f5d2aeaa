//! `handoff demo`, as a newcomer runs it: with the built-in child and with the seed's Node child.

mod util;

use util::{handoff, node_available};

#[test]
fn demo_with_built_in_child_answers_every_request() {
    let output = handoff().args(["demo", "--port", "0", "--requests", "3"]).output().unwrap();
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let stdout = String::from_utf8(output.stdout).unwrap();
    let answers: Vec<&str> = stdout.lines().filter(|l| !l.starts_with("listening on ")).collect();
    assert_eq!(answers, ["1: Child handled it.", "2: Child handled it.", "3: Child handled it."]);
}

#[test]
fn demo_with_the_seed_node_child() {
    if !node_available() {
        return;
    }
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/node/child.js");
    let output = handoff()
        .args(["demo", "--port", "0", "--requests", "2", "--", "node", script])
        .output()
        .unwrap();
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let stdout = String::from_utf8(output.stdout).unwrap();
    assert!(stdout.contains("1: Child handled it.\n2: Child handled it.\n"), "{stdout}");
}

#[test]
fn demo_child_alone_explains_itself() {
    let output = handoff().arg("demo-child").env_remove("NODE_CHANNEL_FD").output().unwrap();
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("must be started by `handoff demo`"));
}
