//! `taskgate wrap -- COMMAND…`: put taskgate in front of an opencode command with no ports to
//! juggle (docs/wrap.md).
//!
//! `wrap` only starts processes and the same proxy `taskgate serve` runs ([`crate::proxy::run`],
//! in-process): a private runtime (`<COMMAND prefix> serve` on a free loopback port, its output
//! in a log file), the proxy in front of it, and, for `run` and the TUI, the user's client
//! attached to the proxy. Nothing about claims is decided here.
//!
//! Lifecycle rules, in the order they matter:
//! - The proxy's address is bound first, so a taken port is a clear error before anything runs.
//! - The runtime is in its own process group (terminal signals do not reach it behind our
//!   back; a kill reaches its helpers too) and dies with the wrapper even on SIGKILL
//!   (`PR_SET_PDEATHSIG` on Linux).
//! - SIGINT/SIGTERM/SIGHUP go to the client, then the runtime, each waited for with a bound, then
//!   killed: no orphan runtime is left behind.
//! - A runtime that dies is reported with the last lines of its log.

mod shape;

use std::path::{Path, PathBuf};
use std::process::{ExitCode, ExitStatus, Stdio};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::net::TcpListener;
use tokio::process::{Child, Command};
use tokio::signal::unix::{signal, Signal, SignalKind};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::cli::WrapArgs;
use crate::config::{Config, ConfigError, Overrides};
use crate::oracle::{Oracle, SessionRef, Verdict};

pub use shape::{parse, Plan, Shape, ShapeError};

/// How long a fresh runtime may take to answer `/global/health` (a first start may install a
/// plugin with npm).
const START_DEADLINE: Duration = Duration::from_secs(120);
/// Per-probe bound: a request sent the instant the port opens can hang forever (observed).
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);
/// Between readiness probes.
const PROBE_INTERVAL: Duration = Duration::from_millis(100);
/// How long a signalled child may take to exit before it is killed.
const STOP_GRACE: Duration = Duration::from_secs(10);
/// Log lines shown when the runtime dies.
const TAIL_LINES: usize = 20;

/// Exit codes of the wrapper itself (a client's own code is passed through otherwise).
const EXIT_STRICT: u8 = 1;
const EXIT_USAGE: u8 = 2;
const EXIT_RUNTIME: u8 = 3;

#[derive(Debug, thiserror::Error)]
pub enum WrapError {
    #[error("{0}")]
    Shape(#[from] ShapeError),
    #[error("config: {0}")]
    Config(#[from] ConfigError),
    #[error("cannot listen on {addr}: {source} (is another opencode or taskgate running there?)")]
    PortTaken {
        addr: String,
        source: std::io::Error,
    },
    #[error("cannot create the runtime log {path}: {source}")]
    Log {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot start `{program}`: {source}")]
    Spawn {
        program: String,
        source: std::io::Error,
    },
    #[error("the opencode runtime {what}; last lines of {log}:\n{tail}")]
    Runtime {
        what: String,
        log: PathBuf,
        tail: String,
    },
}

impl WrapError {
    fn exit_code(&self) -> u8 {
        match self {
            WrapError::Shape(_) | WrapError::Config(_) | WrapError::PortTaken { .. } => EXIT_USAGE,
            WrapError::Log { .. } | WrapError::Spawn { .. } | WrapError::Runtime { .. } => {
                EXIT_RUNTIME
            }
        }
    }
}

/// `taskgate wrap`: runs the plan and returns the exit code (docs/wrap.md lists them).
pub async fn command(args: WrapArgs) -> ExitCode {
    match wrap(args).await {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("taskgate wrap: {e}");
            ExitCode::from(e.exit_code())
        }
    }
}

async fn wrap(args: WrapArgs) -> Result<u8, WrapError> {
    let plan = shape::parse(&args.command)?;
    // Installed before any child exists, so a signal during start-up is ours to handle.
    let mut signals = Signals::new()?;

    let (listen, runtime_port, runtime_dir) = match &plan.shape {
        Shape::Serve { host, port, .. } => (format!("{host}:{port}"), None, None),
        Shape::Run {
            runtime_port, dir, ..
        } => ("127.0.0.1:0".to_owned(), *runtime_port, dir.clone()),
        Shape::Tui {
            runtime_port,
            project,
            ..
        } => ("127.0.0.1:0".to_owned(), *runtime_port, project.clone()),
    };
    let listen = args.listen.clone().unwrap_or(listen);
    let listener = bind(&listen).await?;
    let proxy_addr = listener
        .local_addr()
        .map_err(|source| WrapError::PortTaken {
            addr: listen.clone(),
            source,
        })?;
    let runtime_port = match runtime_port {
        // The user's own port: taken means the same clear error, before the runtime starts.
        Some(port) => {
            bind(&format!("127.0.0.1:{port}")).await?;
            port
        }
        None => free_port().await?,
    };
    let runtime_url = format!("http://127.0.0.1:{runtime_port}");
    let overrides = Overrides {
        listen: Some(proxy_addr.to_string()),
        upstream: Some(runtime_url.clone()),
        log_format: None,
    };
    let mut config = Config::load(args.config.as_deref(), &overrides)?;
    // The wrapped command owns the terminal: taskgate's own info lines would be mixed into it.
    if !args.verbose && config.log.filter == Config::defaults().log.filter {
        config.log.filter = "warn".to_owned();
    }
    let log = log_path();
    config.proxy.runtime_log = Some(log.clone());
    crate::cli::init_tracing(&config);

    let runtime_args = match &plan.shape {
        Shape::Serve { runtime_args, .. } | Shape::Tui { runtime_args, .. } => runtime_args.clone(),
        Shape::Run { .. } => Vec::new(),
    };
    let mut runtime = Runtime::start(
        &plan.prefix,
        runtime_port,
        &runtime_args,
        runtime_dir.as_deref(),
        log,
    )?;
    if args.verbose {
        eprintln!(
            "taskgate wrap: runtime {runtime_url} (pid {}), log {}",
            runtime.pid,
            runtime.log.display()
        );
    }
    if let Err(e) = runtime.wait_healthy(&config, &mut signals).await {
        runtime.stop().await;
        return Err(e);
    }

    let proxy_shutdown = CancellationToken::new();
    let proxy = tokio::spawn(crate::proxy::run(
        listener,
        config.clone(),
        proxy_shutdown.clone(),
    ));
    let proxy_url = format!("http://{proxy_addr}");
    if args.verbose {
        eprintln!("taskgate wrap: proxy {proxy_url} -> runtime {runtime_url}");
    }

    let outcome = match &plan.shape {
        Shape::Serve { .. } => {
            // Clients and scripts look for this line, as they do for `opencode serve`'s.
            println!(
                "taskgate listening on {proxy_url} (opencode runtime at {runtime_url}, log {})",
                runtime.log.display()
            );
            tokio::select! {
                _ = signals.recv() => Ok(0),
                status = runtime.child.wait() => Err(runtime.died(status)),
            }
        }
        Shape::Run {
            args: run_args,
            dir,
            session,
            ..
        } => {
            let started_ms = now_ms();
            let mut client_args = vec!["run".to_owned(), "--attach".to_owned(), proxy_url];
            if let Some(dir) = dir {
                client_args.push("--dir".to_owned());
                client_args.push(absolute(dir).display().to_string());
            }
            client_args.extend(run_args.iter().cloned());
            match attend(&plan.prefix, &client_args, &mut runtime, &mut signals).await {
                // An interrupted run was not meant to finish: there is nothing to judge.
                Ok(Ended::Exited(code)) if args.strict => {
                    Ok(
                        strict_check(&config, session.as_deref(), dir.as_deref(), started_ms)
                            .await
                            .unwrap_or(code),
                    )
                }
                other => other.map(Ended::code),
            }
        }
        Shape::Tui {
            attach_args,
            project,
            ignored,
            ..
        } => {
            if !ignored.is_empty() {
                eprintln!(
                    "taskgate wrap: ignoring {} (opencode attach has no such option)",
                    ignored.join(" ")
                );
            }
            let mut client_args = vec!["attach".to_owned(), proxy_url];
            client_args.extend(attach_args.iter().cloned());
            // `attach` asks for its own working directory unless told; the runtime runs in the
            // project, so say so.
            let has_dir = attach_args
                .iter()
                .any(|a| a == "--dir" || a.starts_with("--dir="));
            if let (Some(project), false) = (project, has_dir) {
                client_args.push("--dir".to_owned());
                client_args.push(absolute(project).display().to_string());
            }
            attend(&plan.prefix, &client_args, &mut runtime, &mut signals)
                .await
                .map(Ended::code)
        }
    };

    proxy_shutdown.cancel();
    let grace = config.proxy.shutdown_grace.0 + Duration::from_secs(1);
    match tokio::time::timeout(grace, proxy).await {
        Ok(Ok(Err(e))) => tracing::warn!(error = %e, "proxy ended with an error"),
        Ok(Err(e)) => tracing::warn!(error = %e, "proxy task failed"),
        Err(_) => tracing::warn!("proxy did not stop within its grace period"),
        Ok(Ok(Ok(()))) => {}
    }
    runtime.stop().await;
    outcome
}

/// Binds `addr` (a host name is resolved), or says plainly that it is taken.
async fn bind(addr: &str) -> Result<TcpListener, WrapError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| WrapError::PortTaken {
            addr: addr.to_owned(),
            source,
        })
}

/// A loopback port nobody uses now, for the private runtime. (Racy by nature, but the runtime's
/// own `--port 0` would first try 4096, the address `serve` users expect the proxy on.)
async fn free_port() -> Result<u16, WrapError> {
    let listener = bind("127.0.0.1:0").await?;
    listener
        .local_addr()
        .map(|a| a.port())
        .map_err(|source| WrapError::PortTaken {
            addr: "127.0.0.1:0".to_owned(),
            source,
        })
}

/// One log per wrapper process, in the temporary directory, kept after exit for a post-mortem.
fn log_path() -> PathBuf {
    std::env::temp_dir().join(format!("taskgate-wrap-{}.log", std::process::id()))
}

/// `path` from the wrapper's working directory (as given if that cannot be read).
fn absolute(path: &Path) -> PathBuf {
    std::path::absolute(path).unwrap_or_else(|_| path.to_owned())
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// The exit code a shell would report for `status`.
fn exit_code(status: ExitStatus) -> u8 {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(code), _) => u8::try_from(code).unwrap_or(1),
        (None, Some(sig)) => u8::try_from(128 + sig).unwrap_or(1),
        (None, None) => 1,
    }
}

/// SIGINT, SIGTERM and SIGHUP (the terminal went away), as one stream.
struct Signals {
    int: Signal,
    term: Signal,
    hup: Signal,
}

impl Signals {
    fn new() -> Result<Signals, WrapError> {
        let install = |kind| {
            signal(kind).map_err(|source| WrapError::Spawn {
                program: "signal handler".to_owned(),
                source,
            })
        };
        Ok(Signals {
            int: install(SignalKind::interrupt())?,
            term: install(SignalKind::terminate())?,
            hup: install(SignalKind::hangup())?,
        })
    }

    /// The next signal's number.
    async fn recv(&mut self) -> i32 {
        tokio::select! {
            _ = self.int.recv() => libc::SIGINT,
            _ = self.term.recv() => libc::SIGTERM,
            _ = self.hup.recv() => libc::SIGHUP,
        }
    }
}

/// Sends `sig` to a process (`pid`) or, negated, a process group.
fn kill(target: i32, sig: i32) {
    // SAFETY: a plain syscall; the worst a stale id can do is fail with ESRCH.
    unsafe {
        libc::kill(target, sig);
    }
}

fn child_pid(child: &Child) -> Option<i32> {
    child.id().and_then(|id| i32::try_from(id).ok())
}

/// Waits for `child` at most `grace`, then kills it (`group`: the whole process group).
async fn stop_child(child: &mut Child, group: bool, grace: Duration) -> Option<ExitStatus> {
    if let Ok(status) = tokio::time::timeout(grace, child.wait()).await {
        return status.ok();
    }
    if let Some(pid) = child_pid(child) {
        kill(if group { -pid } else { pid }, libc::SIGKILL);
    }
    child.wait().await.ok()
}

/// The private `opencode serve`.
struct Runtime {
    child: Child,
    pid: i32,
    log: PathBuf,
}

impl Runtime {
    fn start(
        prefix: &[String],
        port: u16,
        extra: &[String],
        dir: Option<&Path>,
        log: PathBuf,
    ) -> Result<Runtime, WrapError> {
        let file = std::fs::File::create(&log).map_err(|source| WrapError::Log {
            path: log.clone(),
            source,
        })?;
        let err_file = file.try_clone().map_err(|source| WrapError::Log {
            path: log.clone(),
            source,
        })?;
        let (program, prefix_args) = prefix.split_first().ok_or(ShapeError::Empty)?;
        let mut cmd = Command::new(program);
        cmd.args(prefix_args)
            .args([
                "serve",
                "--port",
                &port.to_string(),
                "--hostname",
                "127.0.0.1",
            ])
            .args(extra)
            .stdin(Stdio::null())
            .stdout(file)
            .stderr(err_file)
            .process_group(0)
            .kill_on_drop(true);
        if let Some(dir) = dir {
            cmd.current_dir(dir);
        }
        #[cfg(target_os = "linux")]
        // SAFETY: prctl is async-signal-safe; nothing else runs between fork and exec.
        // The death signal follows the *thread* that forks: this runs on the thread that
        // drives `wrap` to the end (the block_on thread), not a pool thread that may retire.
        unsafe {
            cmd.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM);
                Ok(())
            });
        }
        let child = cmd.spawn().map_err(|source| WrapError::Spawn {
            program: program.clone(),
            source,
        })?;
        let pid = child_pid(&child).unwrap_or(0);
        Ok(Runtime { child, pid, log })
    }

    /// Polls `/global/health` until it answers, the runtime exits, a signal comes or the
    /// start deadline passes.
    async fn wait_healthy(
        &mut self,
        config: &Config,
        signals: &mut Signals,
    ) -> Result<(), WrapError> {
        let oracle = Oracle::new(config);
        let deadline = Instant::now() + START_DEADLINE;
        loop {
            let probe = tokio::time::timeout(PROBE_TIMEOUT, oracle.client().health());
            tokio::select! {
                status = self.child.wait() => return Err(self.died(status)),
                sig = signals.recv() => {
                    return Err(self.failure(format!("was stopped during start-up (signal {sig})")))
                }
                answer = probe => {
                    if let Ok(Ok(_)) = answer {
                        return Ok(());
                    }
                }
            }
            if Instant::now() > deadline {
                return Err(self.failure(format!(
                    "did not answer GET /global/health within {START_DEADLINE:?}"
                )));
            }
            tokio::time::sleep(PROBE_INTERVAL).await;
        }
    }

    fn died(&self, status: std::io::Result<ExitStatus>) -> WrapError {
        let what = match status {
            Ok(s) => format!("exited unexpectedly ({s})"),
            Err(e) => format!("could not be waited for ({e})"),
        };
        self.failure(what)
    }

    fn failure(&self, what: String) -> WrapError {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        let tail = lines[lines.len().saturating_sub(TAIL_LINES)..].join("\n");
        WrapError::Runtime {
            what,
            log: self.log.clone(),
            tail,
        }
    }

    /// SIGTERM to the runtime's group, a bounded wait, then SIGKILL to whatever of the group is
    /// left (helpers included).
    async fn stop(&mut self) {
        if self.pid > 0 {
            kill(-self.pid, libc::SIGTERM);
        }
        stop_child(&mut self.child, true, STOP_GRACE).await;
        if self.pid > 0 {
            kill(-self.pid, libc::SIGKILL);
        }
    }
}

/// How the client ended, with its exit code.
enum Ended {
    Exited(u8),
    /// The wrapper was signalled and passed the signal on.
    Signalled(u8),
}

impl Ended {
    fn code(self) -> u8 {
        match self {
            Ended::Exited(code) | Ended::Signalled(code) => code,
        }
    }
}

/// Runs the client (`run --attach …` or `attach …`) on the user's terminal until it exits;
/// signals are passed on to it, and a dying runtime ends it.
async fn attend(
    prefix: &[String],
    client_args: &[String],
    runtime: &mut Runtime,
    signals: &mut Signals,
) -> Result<Ended, WrapError> {
    let (program, prefix_args) = prefix.split_first().ok_or(ShapeError::Empty)?;
    // Same process group as the wrapper: it keeps the terminal (the TUI needs it) and gets the
    // terminal's own Ctrl-C like any foreground program.
    let mut client = Command::new(program)
        .args(prefix_args)
        .args(client_args)
        .kill_on_drop(true)
        .spawn()
        .map_err(|source| WrapError::Spawn {
            program: program.clone(),
            source,
        })?;
    let pid = child_pid(&client);
    tokio::select! {
        status = client.wait() => Ok(Ended::Exited(status.map_or(EXIT_RUNTIME, exit_code))),
        sig = signals.recv() => {
            if let Some(pid) = pid {
                kill(pid, sig);
            }
            let status = stop_child(&mut client, false, STOP_GRACE).await;
            Ok(Ended::Signalled(status.map_or(128 + u8::try_from(sig).unwrap_or(0), exit_code)))
        }
        status = runtime.child.wait() => {
            let error = runtime.died(status);
            if let Some(pid) = pid {
                kill(pid, libc::SIGTERM);
            }
            stop_child(&mut client, false, STOP_GRACE).await;
            Err(error)
        }
    }
}

/// `--strict`: reads the run's session trees and, if a session in one failed or was aborted,
/// prints one line naming it and returns [`EXIT_STRICT`]. `None`: every tree completed.
async fn strict_check(
    config: &Config,
    session: Option<&str>,
    dir: Option<&Path>,
    started_ms: i64,
) -> Option<u8> {
    let oracle = Oracle::new(config);
    let directory = dir.map(|d| absolute(d).display().to_string());
    let roots: Vec<String> = match session {
        Some(id) => vec![id.to_owned()],
        None => match oracle.client().sessions(directory.as_deref()).await {
            // The run's sessions: roots touched since it started (a new one, or the one
            // `--continue` picked).
            Ok(sessions) => sessions
                .into_iter()
                .filter(|s| s.parent_id.is_none())
                .filter(|s| {
                    s.time
                        .as_ref()
                        .and_then(|t| t.updated.or(t.created))
                        .is_some_and(|t| t >= started_ms - 1000)
                })
                .map(|s| s.id)
                .collect(),
            Err(e) => {
                eprintln!("taskgate wrap: --strict: cannot list the run's sessions: {e}");
                return Some(EXIT_STRICT);
            }
        },
    };
    if roots.is_empty() {
        eprintln!("taskgate wrap: --strict: the run created no session to check");
        return Some(EXIT_STRICT);
    }
    for id in roots {
        let decision = oracle
            .decide(&SessionRef {
                id: id.clone(),
                directory: directory.clone(),
            })
            .await;
        let title = |session: &str| {
            decision
                .sessions
                .iter()
                .find(|s| s.id == session)
                .and_then(|s| s.title.clone())
                .map_or_else(String::new, |t| format!(" ({t:?})"))
        };
        let who = |session: &str| {
            let kind = if session == id { "session" } else { "child" };
            format!("{kind} {session}{}", title(session))
        };
        let line = match &decision.verdict {
            Verdict::Completed { .. } => continue,
            Verdict::Failed { session, message } => format!("{} failed: {message}", who(session)),
            Verdict::Aborted { session, message } => {
                format!("{} was aborted: {message}", who(session))
            }
            Verdict::Running { session, reason } => format!(
                "{} was still running when the run exited: {reason}",
                who(session)
            ),
            Verdict::Gone { session } => {
                format!("{} no longer exists at the runtime", who(session))
            }
            Verdict::Unknown { reason } => {
                format!("cannot tell how session {id} ended: {reason}")
            }
        };
        eprintln!("taskgate wrap: --strict: {line}");
        return Some(EXIT_STRICT);
    }
    None
}
