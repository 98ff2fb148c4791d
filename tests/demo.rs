//! `taskgate demo`, run as a user runs it: the real binary, its exit code and what it prints.

use std::process::Command;

#[test]
fn demo_shows_the_direct_client_misled_and_the_proxied_one_truthful_in_80_columns() {
    let out = Command::new(env!("CARGO_BIN_EXE_taskgate"))
        .args(["demo", "--time-scale", "0.3"])
        .output()
        .expect("taskgate runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "exit {:?}\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("too early"), "{stdout}");
    assert!(stdout.contains("and printed the last answer"), "{stdout}");
    assert!(
        stdout.contains("FINAL: parent got the child result"),
        "{stdout}"
    );
    for line in stdout.lines() {
        assert!(
            line.chars().count() <= 80,
            "line wider than 80 columns: {line:?}"
        );
    }
}

#[test]
fn demo_rejects_an_unknown_scenario_naming_the_choices() {
    let out = Command::new(env!("CARGO_BIN_EXE_taskgate"))
        .args(["demo", "--scenario", "nope"])
        .output()
        .expect("taskgate runs");
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("bg-child"), "{stderr}");
}
