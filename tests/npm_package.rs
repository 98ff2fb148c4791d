//! The npm packages, installed and run the way a user does (docs/install.md).
//!
//! `npm/build.sh --binary` packs this test build's binary (the debug one: a release build is too
//! slow for a test) into the platform package for this machine, next to the main package with the
//! launcher. From an empty folder, with an empty npm cache and npm offline, the two tarballs
//! install and `npx taskgate …` runs the binary: the layout, the launcher and the install path are
//! what is tested, not the compiler's optimisations.
//!
//! Needs node and npm: without them the tests skip with a printed reason, except under `CI=true`,
//! where that is a failure (the convention of `tests/support/runtime.rs`).

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Output, Stdio};
use std::sync::mpsc;
use std::sync::OnceLock;
use std::time::Duration;

const TASKGATE: &str = env!("CARGO_BIN_EXE_taskgate");
const VERSION: &str = env!("CARGO_PKG_VERSION");
/// Every platform the main package offers a binary for (the folders of `npm/platforms`).
const PLATFORMS: [&str; 6] = [
    "linux-x64-gnu",
    "linux-arm64-gnu",
    "linux-x64-musl",
    "linux-arm64-musl",
    "darwin-x64",
    "darwin-arm64",
];
/// A deadline for a process that should be quick, not a measure of speed.
const DEADLINE: Duration = Duration::from_secs(120);

/// The two packed tarballs.
struct Packed {
    main: PathBuf,
    platform: PathBuf,
}

/// A folder under the target dir for this test binary's packs and installs, emptied once.
fn scratch() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("npm_package");
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    })
}

/// `None` (with a printed reason) when node or npm is missing outside CI; panics under `CI=true`.
fn npm_or_skip(test: &str) -> Option<()> {
    let missing: Vec<&str> = ["node", "npm"]
        .into_iter()
        .filter(|tool| {
            !Command::new(tool)
                .arg("--version")
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success())
        })
        .collect();
    if missing.is_empty() {
        return Some(());
    }
    let reason = format!("{} not found", missing.join(" and "));
    if std::env::var("CI").as_deref() == Ok("true") {
        panic!("{test}: node and npm are required in CI (CI=true): {reason}");
    }
    // Written to the stderr handle, not with `eprintln!`, which the harness hides for passing tests.
    let _ = writeln!(
        std::io::stderr(),
        "SKIPPED {test}: {reason}. Install node and npm to run it."
    );
    None
}

/// Packs this build's binary with `npm/build.sh`, once per test binary.
fn packed() -> &'static Packed {
    static PACKED: OnceLock<Packed> = OnceLock::new();
    PACKED.get_or_init(|| {
        let out = scratch().join("dist");
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("npm/build.sh");
        let output = Command::new("bash")
            .arg(&script)
            .arg("--binary")
            .arg(TASKGATE)
            .arg("--out")
            .arg(&out)
            .stdin(Stdio::null())
            .output()
            .expect("bash runs npm/build.sh");
        let stdout = String::from_utf8_lossy(&output.stdout);
        assert!(
            output.status.success(),
            "npm/build.sh failed: {:?}\n{stdout}\n{}",
            output.status,
            String::from_utf8_lossy(&output.stderr)
        );
        let tarballs: Vec<PathBuf> = stdout.lines().map(PathBuf::from).collect();
        let find = |name: &str| {
            tarballs
                .iter()
                .find(|t| t.file_name().is_some_and(|f| f == name))
                .unwrap_or_else(|| panic!("npm/build.sh printed no {name}: {stdout}"))
                .clone()
        };
        Packed {
            main: find(&format!("taskgate-{VERSION}.tgz")),
            platform: find(&format!("taskgate-{}-{VERSION}.tgz", platform())),
        }
    })
}

/// This machine's platform package, as the launcher names it.
fn platform() -> String {
    let os = match std::env::consts::OS {
        "macos" => "darwin",
        other => other,
    };
    let cpu = match std::env::consts::ARCH {
        "x86_64" => "x64",
        "aarch64" => "arm64",
        other => other,
    };
    let libc = match os {
        "linux" if cfg!(target_env = "musl") => "-musl",
        "linux" => "-gnu",
        _ => "",
    };
    format!("{os}-{cpu}{libc}")
}

/// An npm command run in `dir` with a private, empty cache and npm offline: nothing may come
/// from a registry.
fn npm(program: &str, dir: &Path) -> Command {
    let mut command = Command::new(program);
    command
        .current_dir(dir)
        .env("npm_config_cache", dir.join(".npm-cache"))
        .env("npm_config_offline", "true")
        .env("npm_config_audit", "false")
        .env("npm_config_fund", "false")
        .env("npm_config_update_notifier", "false")
        .stdin(Stdio::null());
    command
}

/// Runs a command to its end, at most [`DEADLINE`].
fn run(mut command: Command) -> Output {
    let (tx, rx) = mpsc::channel();
    let description = format!("{command:?}");
    std::thread::spawn(move || {
        let _ = tx.send(command.output());
    });
    rx.recv_timeout(DEADLINE)
        .unwrap_or_else(|_| panic!("{description} did not end within {DEADLINE:?}"))
        .unwrap_or_else(|e| panic!("{description}: {e}"))
}

fn describe(out: &Output) -> String {
    format!(
        "exit {:?}\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// `npm install` of the given tarballs into `dir`, a new empty folder.
fn install(dir: &Path, tarballs: &[&Path]) {
    std::fs::create_dir_all(dir).unwrap();
    let mut command = npm("npm", dir);
    command.arg("install").args(tarballs);
    let out = run(command);
    assert!(out.status.success(), "npm install: {}", describe(&out));
}

/// Both tarballs installed into one folder, once per test binary.
fn installed() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let packed = packed();
        let dir = scratch().join("user");
        install(&dir, &[&packed.main, &packed.platform]);
        dir
    })
}

#[test]
fn packed_tarballs_install_offline_and_run_the_demo() {
    if npm_or_skip("packed_tarballs_install_offline_and_run_the_demo").is_none() {
        return;
    }
    let dir = installed();

    let mut version = npm("npx", dir);
    version.args(["taskgate", "--version"]);
    let out = run(version);
    assert!(
        out.status.success(),
        "npx taskgate --version: {}",
        describe(&out)
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        format!("taskgate {VERSION}")
    );

    let mut demo = npm("npx", dir);
    demo.args(["taskgate", "demo", "--time-scale", "0.3"]);
    let out = run(demo);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "npx taskgate demo: {}",
        describe(&out)
    );
    assert!(stdout.contains("too early"), "{stdout}");
    assert!(stdout.contains("and printed the last answer"), "{stdout}");
}

#[test]
fn the_main_package_offers_a_binary_for_every_supported_platform_at_its_own_version() {
    if npm_or_skip("the_main_package_offers_a_binary_for_every_supported_platform").is_none() {
        return;
    }
    let modules = installed().join("node_modules");
    let read = |path: PathBuf| -> serde_json::Value {
        serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap()
    };
    let main = read(modules.join("taskgate/package.json"));
    assert_eq!(main["version"], VERSION);
    assert_eq!(main["bin"]["taskgate"], "bin/taskgate.js");
    let optional = main["optionalDependencies"].as_object().unwrap();
    let mut offered: Vec<&str> = optional.keys().map(|k| k.as_str()).collect();
    offered.sort_unstable();
    let mut expected: Vec<String> = PLATFORMS.iter().map(|p| format!("@taskgate/{p}")).collect();
    expected.sort_unstable();
    assert_eq!(offered, expected);
    assert!(optional.values().all(|v| v == VERSION), "{optional:?}");

    let here = read(modules.join(format!("@taskgate/{}/package.json", platform())));
    assert_eq!(here["version"], VERSION);
    assert!(modules
        .join(format!("@taskgate/{}/bin/taskgate", platform()))
        .exists());
}

#[test]
fn without_the_platform_package_the_launcher_names_the_platform_it_needs() {
    if npm_or_skip("without_the_platform_package_the_launcher_names_the_platform_it_needs")
        .is_none()
    {
        return;
    }
    let dir = scratch().join("main-only");
    install(&dir, &[&packed().main]);

    let mut command = npm("npx", &dir);
    command.args(["taskgate", "--version"]);
    let out = run(command);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{}", describe(&out));
    assert!(
        stderr.contains("no prebuilt binary for this platform"),
        "{stderr}"
    );
    assert!(
        stderr.contains(&format!("@taskgate/{}@{VERSION}", platform())),
        "{stderr}"
    );
}

#[test]
fn the_launcher_passes_taskgates_exit_code_through() {
    if npm_or_skip("the_launcher_passes_taskgates_exit_code_through").is_none() {
        return;
    }
    let mut command = npm("npx", installed());
    command.args(["taskgate", "demo", "--scenario", "nope"]);
    let out = run(command);
    assert_eq!(out.status.code(), Some(2), "{}", describe(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("bg-child"),
        "{}",
        describe(&out)
    );
}

/// `taskgate serve` started through the launcher (`node_modules/.bin/taskgate`, as a supervisor
/// or a package script runs it), with its stderr, once it says it is serving.
fn serve_through_the_launcher() -> (std::process::Child, mpsc::Receiver<String>) {
    let (mut child, stderr) = spawn_the_launcher();
    // taskgate logs every few seconds while the runtime cannot be reached, so the deadline is
    // for the whole wait, not for each line.
    let end = std::time::Instant::now() + DEADLINE;
    loop {
        match stderr.recv_timeout(end.saturating_duration_since(std::time::Instant::now())) {
            Ok(line) if line.contains("taskgate serving") => return (child, stderr),
            Ok(_) => {}
            Err(e) => {
                end_group(&mut child);
                panic!("taskgate serve did not say it is serving: {e}");
            }
        }
    }
}

/// `taskgate serve` started through the launcher, with a thread passing on its stderr lines.
fn spawn_the_launcher() -> (std::process::Child, mpsc::Receiver<String>) {
    let mut command = npm(
        installed()
            .join("node_modules/.bin/taskgate")
            .to_str()
            .unwrap(),
        installed(),
    );
    // Its own process group, so a failing test can end the launcher and taskgate together.
    std::os::unix::process::CommandExt::process_group(&mut command, 0);
    command
        .args(["serve", "--listen", "127.0.0.1:0"])
        .args(["--upstream", "http://127.0.0.1:9"])
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let mut child = command.spawn().expect("the launcher starts");
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = mpsc::channel();
    // The pipe ends only when every process holding it (the launcher and taskgate) has exited.
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    (child, rx)
}

/// Kills the launcher's process group (the launcher and taskgate) and reaps the launcher.
fn end_group(child: &mut std::process::Child) {
    // SAFETY: kill(2) on the process group this test created for the child.
    unsafe { libc::kill(-(child.id() as i32), libc::SIGKILL) };
    let _ = child.wait();
}

/// Waits, at most [`DEADLINE`] in all, until stderr is closed by every process holding it (the
/// launcher and taskgate), then reaps the launcher.
fn ended(mut child: std::process::Child, stderr: mpsc::Receiver<String>) -> ExitStatus {
    let end = std::time::Instant::now() + DEADLINE;
    let mut rest = Vec::new();
    loop {
        match stderr.recv_timeout(end.saturating_duration_since(std::time::Instant::now())) {
            Ok(line) => rest.push(line),
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
            Err(mpsc::RecvTimeoutError::Timeout) => {
                end_group(&mut child);
                panic!("stderr still open after {DEADLINE:?}: {rest:#?}");
            }
        }
    }
    child.wait().unwrap()
}

#[test]
fn sigterm_to_the_launcher_stops_taskgate_cleanly() {
    if npm_or_skip("sigterm_to_the_launcher_stops_taskgate_cleanly").is_none() {
        return;
    }
    let (child, stderr) = serve_through_the_launcher();
    // SAFETY: kill(2) on the pid of a child this test started and has not reaped.
    assert_eq!(unsafe { libc::kill(child.id() as i32, libc::SIGTERM) }, 0);
    let status = ended(child, stderr);
    assert_eq!(status.code(), Some(0), "{status:?}");
}

#[test]
fn a_signal_that_kills_taskgate_kills_the_launcher_the_same_way() {
    if npm_or_skip("a_signal_that_kills_taskgate_kills_the_launcher_the_same_way").is_none() {
        return;
    }
    use std::os::unix::process::ExitStatusExt;
    let (child, stderr) = serve_through_the_launcher();
    // taskgate does not handle SIGUSR2: it dies of it, and so must the launcher.
    // SAFETY: kill(2) on the pid of a child this test started and has not reaped.
    assert_eq!(unsafe { libc::kill(child.id() as i32, libc::SIGUSR2) }, 0);
    let status = ended(child, stderr);
    assert_eq!(status.signal(), Some(libc::SIGUSR2), "{status:?}");
}

/// Bug: the launcher installed its signal handlers only after it had started taskgate, so a
/// signal in between ended the launcher by its default action and left taskgate running with
/// nobody to stop it (in CI the test above then waited for good on the stderr taskgate held).
/// The signal here is sent the moment taskgate's process exists, each round.
#[test]
fn a_signal_as_the_launcher_starts_taskgate_does_not_leave_taskgate_running() {
    let test = "a_signal_as_the_launcher_starts_taskgate_does_not_leave_taskgate_running";
    if npm_or_skip(test).is_none() {
        return;
    }
    use std::os::unix::process::ExitStatusExt;
    for round in 0..10 {
        let (mut launcher, stderr) = spawn_the_launcher();
        let end = std::time::Instant::now() + DEADLINE;
        // A busy look at /proc, not a sleep: the point is to be as early as can be.
        let taskgate = loop {
            if let Some(pid) = child_of(launcher.id()) {
                break pid;
            }
            if std::time::Instant::now() > end {
                end_group(&mut launcher);
                panic!("round {round}: the launcher started no process");
            }
            std::thread::yield_now();
        };
        // SAFETY: kill(2) on the pid of a child this test started and has not reaped.
        assert_eq!(
            unsafe { libc::kill(launcher.id() as i32, libc::SIGUSR2) },
            0
        );
        let status = wait_at_most(&mut launcher, DEADLINE);
        if is_running(taskgate) {
            end_group(&mut launcher);
            panic!("round {round}: taskgate ({taskgate}) outlived its launcher ({status:?})");
        }
        assert_eq!(status.signal(), Some(libc::SIGUSR2), "round {round}");
        drop(stderr);
    }
}

/// A process whose parent is `parent`, from /proc.
fn child_of(parent: u32) -> Option<u32> {
    std::fs::read_dir("/proc").ok()?.find_map(|entry| {
        let pid: u32 = entry.ok()?.file_name().to_str()?.parse().ok()?;
        (stat(pid)?.1 == parent).then_some(pid)
    })
}

/// A process's state letter and parent, from `/proc/PID/stat` (its name, in parentheses, may
/// hold spaces, so the fields are read after the last `)`).
fn stat(pid: u32) -> Option<(char, u32)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let mut fields = stat[stat.rfind(')')? + 1..].split_whitespace();
    let state = fields.next()?.chars().next()?;
    Some((state, fields.next()?.parse().ok()?))
}

/// Whether `pid` is still a live process (not gone, not a zombie).
fn is_running(pid: u32) -> bool {
    stat(pid).is_some_and(|(state, _)| state != 'Z')
}

/// Reaps `child`, killing its process group if it has not ended within `limit`.
fn wait_at_most(child: &mut std::process::Child, limit: Duration) -> ExitStatus {
    let end = std::time::Instant::now() + limit;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        if std::time::Instant::now() > end {
            end_group(child);
            panic!("the launcher did not end within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Whether tmux runs here; `false` (with a printed reason) outside CI, panics under `CI=true`.
fn tmux_or_skip(test: &str) -> bool {
    let ok = Command::new("tmux")
        .arg("-V")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "{test}: tmux is required in CI (CI=true)"
        );
        let _ = writeln!(std::io::stderr(), "SKIPPED {test}: tmux is not installed");
    }
    ok
}

/// Polls `cond` every 100 ms (a poll interval, not a sync) until it holds, at most [`DEADLINE`].
fn poll_until(what: &str, mut cond: impl FnMut() -> bool) {
    let end = std::time::Instant::now() + DEADLINE;
    while !cond() {
        assert!(
            std::time::Instant::now() < end,
            "timed out after {DEADLINE:?}: {what}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A private tmux server running one command on a pseudo-terminal, killed on drop.
struct Tmux(String);

impl Drop for Tmux {
    fn drop(&mut self) {
        let _ = Command::new("tmux")
            .args(["-L", &self.0, "kill-server"])
            .stderr(Stdio::null())
            .status();
    }
}

/// Ctrl-C typed at a terminal, through `npx` as a user runs it, stops taskgate gracefully: one
/// shutdown, drained, never "second signal: exiting without draining". (The terminal signals the
/// whole foreground process group; the launcher does not pass SIGINT on again when stdin is a
/// terminal. A second SIGINT that close to the first is usually merged with it by the kernel, so
/// this test shows what the user sees, not that rule.)
#[test]
fn ctrl_c_at_a_terminal_stops_taskgate_once_and_it_drains() {
    let test = "ctrl_c_at_a_terminal_stops_taskgate_once_and_it_drains";
    if npm_or_skip(test).is_none() || !tmux_or_skip(test) {
        return;
    }
    let dir = installed();
    let log = scratch().join("ctrl-c.log");
    let _ = std::fs::remove_file(&log);
    let line = format!(
        "npx taskgate serve --listen 127.0.0.1:0 --upstream http://127.0.0.1:9 2>'{}'",
        log.display()
    );
    let socket = format!("taskgate-npm-{}", std::process::id());
    let mut start = npm("tmux", dir);
    start
        .args(["-L", &socket, "new-session", "-d", "-x", "120", "-y", "30"])
        .arg(&line)
        .env("RUST_LOG", "info")
        .env("TERM", "xterm-256color");
    let out = run(start);
    assert!(out.status.success(), "tmux: {}", describe(&out));
    let tmux = Tmux(socket);
    let read = || std::fs::read_to_string(&log).unwrap_or_default();

    poll_until("taskgate serve to say it is serving", || {
        read().contains("taskgate serving")
    });
    let out = run({
        let mut keys = Command::new("tmux");
        keys.args(["-L", &tmux.0, "send-keys", "C-c"]);
        keys
    });
    assert!(out.status.success(), "tmux send-keys: {}", describe(&out));
    // The session ends with its command: npx, the launcher and taskgate have all exited.
    poll_until("the command to end after Ctrl-C", || {
        !Command::new("tmux")
            .args(["-L", &tmux.0, "has-session"])
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    });
    let text = read();
    assert_eq!(
        text.matches("shutdown signal received").count(),
        1,
        "{text}"
    );
    assert!(!text.contains("second signal"), "{text}");
    assert!(text.contains("proxy stopped"), "{text}");
}
