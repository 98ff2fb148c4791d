//! `taskgate wrap -- COMMAND…`: put taskgate in front of an opencode command with no ports to
//! juggle (docs/wrap.md). It starts a private runtime, the same stack `taskgate serve` runs
//! ([`super::stack`], in-process) in front of it, and, for `run` and the TUI, the user's client
//! attached to the proxy; `--strict` then reports how the run's trees ended.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::config::{Config, Overrides};
use crate::model::providers::overlay;
use crate::oracle::{Oracle, SessionRef, Verdict};
use crate::wrap::{
    absolute, attend, bind, discover_providers, free_port, log_path, now_ms, parse, Ended, Runtime,
    Shape, Signals, WrapError, EXIT_STRICT,
};

#[derive(Debug, Clone, clap::Args)]
pub struct WrapArgs {
    /// Path to proxy.toml (defaults are used when absent).
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Where the proxy listens. Default: for `serve`, the address given to the runtime
    /// (127.0.0.1:4096 when none); for `run` and the TUI, a free loopback port.
    #[arg(long)]
    pub listen: Option<String>,
    /// `run` only: exit 1, with one line on stderr, when a session of the run's tree failed or
    /// was aborted (for CI).
    #[arg(long)]
    pub strict: bool,
    /// Leave the model face off: the runtime's providers are not pointed at it (one runtime
    /// start instead of two; the client face still holds every claim it carries).
    #[arg(long)]
    pub no_model: bool,
    /// Print where the runtime, the proxy and the runtime's log are.
    #[arg(short, long)]
    pub verbose: bool,
    /// The opencode command, after `--`: `opencode serve …`, `opencode run …`, `opencode [dir]`
    /// (`npx opencode-ai …` and paths work too).
    #[arg(last = true, required = true, value_name = "COMMAND")]
    pub command: Vec<String>,
}

/// `taskgate wrap`: runs the plan and returns the exit code (docs/wrap.md lists them).
pub async fn run(args: WrapArgs) -> ExitCode {
    match wrap(args).await {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("taskgate wrap: {e}");
            ExitCode::from(e.exit_code())
        }
    }
}

async fn wrap(args: WrapArgs) -> Result<u8, WrapError> {
    let plan = parse(&args.command)?;
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
    super::logging::init_tracing(&config);

    let runtime_args = match &plan.shape {
        Shape::Serve { runtime_args, .. } | Shape::Tui { runtime_args, .. } => runtime_args.clone(),
        Shape::Run { .. } => Vec::new(),
    };
    let model = if args.no_model {
        None
    } else {
        model_side(
            &plan.prefix,
            &runtime_args,
            runtime_dir.as_deref(),
            &mut config,
            &mut signals,
            args.verbose,
        )
        .await?
    };
    let (model_listener, runtime_env) = match model {
        Some((listener, overlay)) => (Some(listener), vec![(CONFIG_CONTENT_ENV, overlay)]),
        None => (None, Vec::new()),
    };
    let mut runtime = Runtime::start(
        &plan.prefix,
        runtime_port,
        &runtime_args,
        runtime_dir.as_deref(),
        &runtime_env,
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
    let stack = super::stack::start(
        config.clone(),
        listener,
        model_listener,
        proxy_shutdown.clone(),
    );
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
                Ok(Ended::Exited(code)) if args.strict => Ok(strict_check(
                    stack.oracle(),
                    session.as_deref(),
                    dir.as_deref(),
                    started_ms,
                )
                .await
                .unwrap_or(code)),
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
    match tokio::time::timeout(grace, stack.finish()).await {
        Ok(Err(e)) => tracing::warn!(error = %e, "proxy ended with an error"),
        Err(_) => tracing::warn!("proxy did not stop within its grace period"),
        Ok(Ok(())) => {}
    }
    runtime.stop().await;
    outcome
}

/// The variable the runtime merges over every configuration file (present in 1.18.33).
const CONFIG_CONTENT_ENV: &str = "OPENCODE_CONFIG_CONTENT";

/// Turns the model face on for the runtime about to start: finds its providers
/// ([`discover_providers`]), binds the face on a free loopback port, routes each provider
/// through it (`config.model`), and returns the listener with the `OPENCODE_CONFIG_CONTENT`
/// that points the providers there. `None` (said on stderr): nothing can be routed; the client
/// face runs alone, as with `--no-model`.
async fn model_side(
    prefix: &[String],
    runtime_args: &[String],
    dir: Option<&Path>,
    config: &mut Config,
    signals: &mut Signals,
    verbose: bool,
) -> Result<Option<(TcpListener, String)>, WrapError> {
    let started = std::time::Instant::now();
    let Some(resolved) =
        discover_providers(prefix, runtime_args, dir, config, signals, log_path()).await?
    else {
        eprintln!("taskgate wrap: this opencode lists no providers (GET /config/providers); the model face stays off");
        return Ok(None);
    };
    for (id, why) in &resolved.direct {
        tracing::info!(provider = %id, why = %why, "model face: provider left direct");
    }
    if resolved.routed.is_empty() {
        eprintln!("taskgate wrap: no provider can be routed through the model face; it stays off");
        return Ok(None);
    }
    let listener = bind("127.0.0.1:0").await?;
    let face = listener
        .local_addr()
        .map_err(|source| WrapError::PortTaken {
            addr: "127.0.0.1:0".to_owned(),
            source,
        })?;
    let existing = std::env::var(CONFIG_CONTENT_ENV).ok();
    let overlay = match overlay(
        &format!("http://{face}"),
        &resolved.routed,
        existing.as_deref(),
    ) {
        Ok(overlay) => overlay,
        Err(e) => {
            eprintln!("taskgate wrap: {e}; the model face stays off");
            return Ok(None);
        }
    };
    if verbose {
        let routes: Vec<String> = resolved
            .routed
            .iter()
            .map(|(id, url)| format!("{id} -> {url}"))
            .collect();
        eprintln!(
            "taskgate wrap: model face http://{face} ({}; found in {:.1?}){}",
            routes.join(", "),
            started.elapsed(),
            if resolved.direct.is_empty() {
                String::new()
            } else {
                format!(
                    "; direct: {}",
                    resolved
                        .direct
                        .iter()
                        .map(|(id, why)| format!("{id} ({why})"))
                        .collect::<Vec<_>>()
                        .join(", ")
                )
            }
        );
    }
    config.model.enabled = true;
    config.model.listen = face;
    config.model.providers = resolved.routed;
    Ok(Some((listener, overlay)))
}

/// `--strict`: reads the run's session trees and, if a session in one failed or was aborted,
/// prints one line naming it and returns [`EXIT_STRICT`]. `None`: every tree completed.
async fn strict_check(
    oracle: &Oracle,
    session: Option<&str>,
    dir: Option<&Path>,
    started_ms: i64,
) -> Option<u8> {
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
