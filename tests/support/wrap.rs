//! Running `taskgate wrap -- <opencode> …` against the real runtime, in the isolated folder the
//! real-runtime harness builds ([`super::runtime::sandbox_dir`]), and watching its processes.

#![allow(dead_code)] // Each test binary uses a different part of the support code.

use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use tokio::process::{Child, Command};

use crate::runtime::{isolate, RunOutput, RUN_DEADLINE};

/// The taskgate binary under test.
pub const TASKGATE: &str = env!("CARGO_BIN_EXE_taskgate");

/// A command run from `root/project` with the harness's isolated environment (own HOME, the
/// scripted model), in its own process group, killed on drop.
pub fn isolated(program: &Path, args: &[&str], root: &Path) -> Command {
    let mut cmd = Command::new(program);
    cmd.args(args);
    isolate(&mut cmd, root, None);
    cmd.current_dir(root.join("project"))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(true);
    cmd
}

/// `taskgate wrap [wrap_args] -- <opencode> [command]`, isolated like [`isolated`].
pub fn wrap_command(opencode: &Path, wrap_args: &[&str], command: &[&str], root: &Path) -> Command {
    let mut args = vec!["wrap"];
    args.extend_from_slice(wrap_args);
    args.push("--");
    let opencode = opencode.to_str().unwrap();
    args.push(opencode);
    args.extend_from_slice(command);
    isolated(Path::new(TASKGATE), &args, root)
}

/// Waits (at most [`RUN_DEADLINE`]) for a spawned command and returns what it printed. Its
/// process group is killed afterwards, whatever happened.
pub async fn finish(child: Child) -> RunOutput {
    let started = Instant::now();
    let pid = child.id().unwrap();
    let out = tokio::time::timeout(RUN_DEADLINE, child.wait_with_output()).await;
    kill_group(pid);
    let out = out
        .unwrap_or_else(|_| panic!("pid {pid} did not exit within {RUN_DEADLINE:?}"))
        .unwrap();
    RunOutput {
        status: out.status,
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        elapsed: started.elapsed(),
    }
}

pub fn kill_group(pid: u32) {
    // SAFETY: a plain syscall on a process group the test created.
    unsafe {
        libc::kill(-(pid as i32), libc::SIGKILL);
    }
}

pub fn signal(pid: u32, sig: i32) {
    // SAFETY: a plain syscall on a process the test started.
    unsafe {
        libc::kill(pid as i32, sig);
    }
}

/// `(state, ppid)` of a live process from `/proc/<pid>/stat`; `None` once it is gone.
fn stat(pid: u32) -> Option<(char, u32)> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // `pid (comm) state ppid …`; comm may hold spaces and parentheses.
    let rest = &text[text.rfind(')')? + 2..];
    let mut fields = rest.split_whitespace();
    let state = fields.next()?.chars().next()?;
    let ppid = fields.next()?.parse().ok()?;
    Some((state, ppid))
}

/// Whether `pid` is a running (not zombie) process.
pub fn alive(pid: u32) -> bool {
    matches!(stat(pid), Some((state, _)) if state != 'Z')
}

/// Every live descendant of `root` (what `pstree -p root` would list), `root` excluded.
pub fn descendants(root: u32) -> Vec<u32> {
    let all: Vec<(u32, u32)> = std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter_map(|pid| {
            stat(pid)
                .filter(|(s, _)| *s != 'Z')
                .map(|(_, ppid)| (pid, ppid))
        })
        .collect();
    let mut found = vec![root];
    let mut i = 0;
    while i < found.len() {
        let parent = found[i];
        found.extend(all.iter().filter(|(_, pp)| *pp == parent).map(|(p, _)| *p));
        i += 1;
    }
    found.remove(0);
    found
}

/// Polls `cond` every 100 ms until it holds, panicking with `what` after `deadline`.
pub async fn poll_until(what: &str, deadline: Duration, mut cond: impl FnMut() -> bool) {
    let end = Instant::now() + deadline;
    while !cond() {
        assert!(Instant::now() < end, "timed out after {deadline:?}: {what}");
        tokio::time::sleep(Duration::from_millis(100)).await; // poll interval, not a sync
    }
}

/// A private tmux server (its own socket) running one command in a pseudo-terminal; the server
/// is killed on drop.
pub struct Tmux {
    socket: String,
}

impl Tmux {
    /// Whether tmux can run here.
    pub fn available() -> bool {
        std::process::Command::new("tmux")
            .arg("-V")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    }

    /// Starts `argv` in a detached 200x50 session, from `root/project`, with the harness's
    /// isolated environment (a fresh tmux server passes its own environment to the pane).
    pub fn start(argv: &[&str], root: &Path) -> Tmux {
        static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let socket = format!("taskgate-test-{}-{n}", std::process::id());
        let line = argv
            .iter()
            .map(|a| format!("'{}'", a.replace('\'', r"'\''")))
            .collect::<Vec<_>>()
            .join(" ");
        let mut cmd = Command::new("tmux");
        isolate(&mut cmd, root, None);
        let cmd = cmd.as_std_mut();
        let status = cmd
            .args([
                "-L",
                &socket,
                "new-session",
                "-d",
                "-x",
                "200",
                "-y",
                "50",
                &line,
            ])
            .current_dir(root.join("project"))
            .env("TERM", "xterm-256color")
            .stdin(Stdio::null())
            .status()
            .unwrap();
        assert!(status.success(), "tmux new-session failed: {status}");
        Tmux { socket }
    }

    fn tmux(&self, args: &[&str]) -> Option<String> {
        let out = std::process::Command::new("tmux")
            .args(["-L", &self.socket])
            .args(args)
            .stdin(Stdio::null())
            .output()
            .ok()?;
        out.status
            .success()
            .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// The pane's process (the command started), while the session lives.
    pub fn pane_pid(&self) -> Option<u32> {
        self.tmux(&["list-panes", "-F", "#{pane_pid}"])?
            .trim()
            .parse()
            .ok()
    }

    /// What the terminal shows now, as text.
    pub fn screen(&self) -> String {
        self.tmux(&["capture-pane", "-p"]).unwrap_or_default()
    }

    /// Types `keys` (tmux key names, e.g. `C-c`).
    pub fn send_keys(&self, keys: &str) {
        self.tmux(&["send-keys", keys]);
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        self.tmux(&["kill-server"]);
    }
}

/// `/proc/<pid>/cmdline` with spaces between the arguments.
pub fn cmdline(pid: u32) -> String {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|b| String::from_utf8_lossy(&b).replace('\0', " "))
        .unwrap_or_default()
}
