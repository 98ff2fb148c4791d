//! Process supervision for `taskgate wrap -- COMMAND…` (docs/wrap.md): the private runtime
//! (`<COMMAND prefix> serve` on a free loopback port, its output in a log file) and the user's
//! client attached to the proxy. The command itself (`src/cmd/wrap.rs`) puts these together
//! with the same stack `taskgate serve` runs; nothing about claims is decided here.
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
use std::process::{ExitStatus, Stdio};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::net::TcpListener;
use tokio::process::{Child, Command};
use tokio::signal::unix::{signal, Signal, SignalKind};
use tokio::time::Instant;

use crate::config::{Config, ConfigError};
use crate::model::providers::Resolved;
use crate::opencode::ProviderList;
use crate::oracle::client::{ClientError, RuntimeClient};

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
pub(crate) const EXIT_STRICT: u8 = 1;
const EXIT_USAGE: u8 = 2;
const EXIT_RUNTIME: u8 = 3;

#[derive(Debug, thiserror::Error)]
pub enum WrapError {
    #[error("{0}")]
    Shape(#[from] ShapeError),
    #[error("{0}")]
    Usage(String),
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
    pub(crate) fn exit_code(&self) -> u8 {
        match self {
            WrapError::Shape(_)
            | WrapError::Usage(_)
            | WrapError::Config(_)
            | WrapError::PortTaken { .. } => EXIT_USAGE,
            WrapError::Log { .. } | WrapError::Spawn { .. } | WrapError::Runtime { .. } => {
                EXIT_RUNTIME
            }
        }
    }
}

/// Binds `addr` (a host name is resolved), or says plainly that it is taken.
pub(crate) async fn bind(addr: &str) -> Result<TcpListener, WrapError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| WrapError::PortTaken {
            addr: addr.to_owned(),
            source,
        })
}

/// A loopback port nobody uses now, for the private runtime. (Racy by nature, but the runtime's
/// own `--port 0` would first try 4096, the address `serve` users expect the proxy on.)
pub(crate) async fn free_port() -> Result<u16, WrapError> {
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
pub(crate) fn log_path() -> PathBuf {
    std::env::temp_dir().join(format!("taskgate-wrap-{}.log", std::process::id()))
}

/// `path` from the wrapper's working directory (as given if that cannot be read).
pub(crate) fn absolute(path: &Path) -> PathBuf {
    std::path::absolute(path).unwrap_or_else(|_| path.to_owned())
}

pub(crate) fn now_ms() -> i64 {
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
pub(crate) struct Signals {
    int: Signal,
    term: Signal,
    hup: Signal,
}

impl Signals {
    pub(crate) fn new() -> Result<Signals, WrapError> {
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
    pub(crate) async fn recv(&mut self) -> i32 {
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
pub(crate) struct Runtime {
    pub(crate) child: Child,
    pub(crate) pid: i32,
    pub(crate) log: PathBuf,
}

impl Runtime {
    /// Starts `<prefix> serve` on `port` with `extra` flags, in `dir`, with `env` added to the
    /// wrapper's own environment.
    pub(crate) fn start(
        prefix: &[String],
        port: u16,
        extra: &[String],
        dir: Option<&Path>,
        env: &[(&str, String)],
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
            .envs(env.iter().map(|(k, v)| (k, v)))
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
    pub(crate) async fn wait_healthy(
        &mut self,
        config: &Config,
        signals: &mut Signals,
    ) -> Result<(), WrapError> {
        let client = RuntimeClient::new(config);
        let deadline = Instant::now() + START_DEADLINE;
        loop {
            let probe = tokio::time::timeout(PROBE_TIMEOUT, client.health());
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

    /// `GET /config/providers`, asked until it answers (the first request of a fresh runtime
    /// loads its configuration and plugins), the runtime exits, a signal comes or the start
    /// deadline passes. `Ok(None)`: the runtime answers but has no such route (an older
    /// release), so there is nothing to route.
    pub(crate) async fn providers(
        &mut self,
        config: &Config,
        signals: &mut Signals,
    ) -> Result<Option<ProviderList>, WrapError> {
        let client = RuntimeClient::new(config);
        let deadline = Instant::now() + START_DEADLINE;
        loop {
            tokio::select! {
                status = self.child.wait() => return Err(self.died(status)),
                sig = signals.recv() => {
                    return Err(self.failure(format!("was stopped during start-up (signal {sig})")))
                }
                answer = client.providers(None) => match answer {
                    Ok(list) => return Ok(Some(list)),
                    Err(ClientError::NotFound { .. } | ClientError::BadReply { .. }) => {
                        return Ok(None)
                    }
                    Err(e) => tracing::debug!(error = %e, "provider list not read yet"),
                },
            }
            if Instant::now() > deadline {
                return Err(self.failure(format!(
                    "did not answer GET /config/providers within {START_DEADLINE:?}"
                )));
            }
            tokio::time::sleep(PROBE_INTERVAL).await;
        }
    }

    pub(crate) fn died(&self, status: std::io::Result<ExitStatus>) -> WrapError {
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
    pub(crate) async fn stop(&mut self) {
        if self.pid > 0 {
            kill(-self.pid, libc::SIGTERM);
        }
        stop_child(&mut self.child, true, STOP_GRACE).await;
        if self.pid > 0 {
            kill(-self.pid, libc::SIGKILL);
        }
    }
}

/// Which of the providers the runtime resolves can go through the model face, and where each
/// really goes: a throwaway runtime, started as the real one will be (same command, flags,
/// directory and environment), is asked `GET /config/providers` and stopped. Its log goes to
/// `log` (the real runtime's start overwrites it). `Ok(None)`: the runtime has no provider list
/// to read (an older release).
pub(crate) async fn discover_providers(
    prefix: &[String],
    runtime_args: &[String],
    dir: Option<&Path>,
    config: &Config,
    signals: &mut Signals,
    log: PathBuf,
) -> Result<Option<Resolved>, WrapError> {
    let port = free_port().await?;
    let mut config = config.clone();
    config.proxy.upstream = format!("http://127.0.0.1:{port}");
    let mut runtime = Runtime::start(prefix, port, runtime_args, dir, &[], log)?;
    let list = match runtime.wait_healthy(&config, signals).await {
        Ok(()) => runtime.providers(&config, signals).await,
        Err(e) => Err(e),
    };
    runtime.stop().await;
    Ok(list?.map(|list| crate::model::providers::resolve(&list)))
}

/// How the client ended, with its exit code.
pub(crate) enum Ended {
    Exited(u8),
    /// The wrapper was signalled and passed the signal on.
    Signalled(u8),
}

impl Ended {
    pub(crate) fn code(self) -> u8 {
        match self {
            Ended::Exited(code) | Ended::Signalled(code) => code,
        }
    }
}

/// Runs the client (`run --attach …` or `attach …`) on the user's terminal until it exits;
/// signals are passed on to it, and a dying runtime ends it.
pub(crate) async fn attend(
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
