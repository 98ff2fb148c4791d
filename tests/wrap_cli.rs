//! `taskgate wrap`'s failure paths, with a stand-in runtime (a shell script): they need no
//! OpenCode, so they always run.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

const TASKGATE: &str = env!("CARGO_BIN_EXE_taskgate");

/// Writes an executable `/bin/sh` script named `opencode` into `dir`.
fn fake_runtime(dir: &Path, body: &str) -> PathBuf {
    let path = dir.join("opencode");
    std::fs::write(&path, format!("#!/bin/sh\n{body}\n")).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    path
}

fn wrap(dir: &Path, command: &[&str]) -> Output {
    Command::new(TASKGATE)
        .arg("wrap")
        .arg("--")
        .args(command)
        .env("TMPDIR", dir)
        .current_dir(dir)
        .output()
        .unwrap()
}

#[test]
fn a_taken_port_is_a_clear_error_before_anything_starts() {
    let dir = tempfile::tempdir().unwrap();
    let marker = dir.path().join("started");
    let fake = fake_runtime(dir.path(), &format!("touch '{}'", marker.display()));
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port().to_string();

    let out = wrap(
        dir.path(),
        &[fake.to_str().unwrap(), "serve", "--port", &port],
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains(&format!("cannot listen on 127.0.0.1:{port}")),
        "{stderr}"
    );
    assert!(
        !marker.exists(),
        "the runtime was started although the port was taken"
    );

    // `run --port N` names the runtime's port: the same check.
    let out = wrap(
        dir.path(),
        &[fake.to_str().unwrap(), "run", "--port", &port, "hi"],
    );
    assert_eq!(out.status.code(), Some(2));
    assert!(!marker.exists());
}

#[test]
fn a_dying_runtime_is_reported_with_its_last_log_lines() {
    let dir = tempfile::tempdir().unwrap();
    let fake = fake_runtime(
        dir.path(),
        "echo \"args: $*\"\necho 'fatal: the database is locked' >&2\nexit 7",
    );
    let out = wrap(dir.path(), &[fake.to_str().unwrap(), "run", "hello"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "{stderr}");
    assert!(stderr.contains("exited unexpectedly"), "{stderr}");
    assert!(stderr.contains("fatal: the database is locked"), "{stderr}");
    // What the runtime was started with: `serve` on a private loopback port.
    assert!(
        stderr.contains("args: serve --port ") && stderr.contains("--hostname 127.0.0.1"),
        "{stderr}"
    );
}

#[test]
fn commands_taskgate_cannot_front_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let out = wrap(dir.path(), &["opencode", "models"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("`models`"));
    let out = wrap(
        dir.path(),
        &["opencode", "run", "--attach", "http://x", "hi"],
    );
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("taskgate serve"));
}
