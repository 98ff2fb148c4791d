//! `taskgate wait SESSION_ID`: block until the session's tree is terminal, for humans (a live
//! tree on a terminal) and for CI scripts (one JSON object, and an exit code that says how it
//! ended).

use std::collections::HashMap;
use std::io::{IsTerminal, Write};
use std::process::ExitCode;

use futures_util::StreamExt;
use serde_json::json;
use std::path::PathBuf;
use std::time::Duration;

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::config::{Config, Overrides};

use crate::oracle::client::ClientError;
use crate::oracle::{Decision, Oracle, OracleError, SessionRef, Verdict};

/// Exit codes, as documented for CI scripts.
#[derive(Debug, Clone, clap::Args)]
pub struct WaitArgs {
    /// The session whose tree to wait for (`ses_…`).
    pub session: String,
    /// Path to proxy.toml (for credentials, settle window, poll interval).
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// The runtime's URL.
    #[arg(long)]
    pub upstream: Option<String>,
    /// The session's directory, when the runtime serves several (`?directory=`).
    #[arg(long)]
    pub directory: Option<String>,
    /// Give up after this long (e.g. 30s, 2h); exit code 2.
    #[arg(long, value_parser = humantime::parse_duration)]
    pub timeout: Option<Duration>,
    /// Print one JSON object instead of the live tree.
    #[arg(long)]
    pub json: bool,
}

const EXIT_COMPLETED: u8 = 0;
const EXIT_FAILED: u8 = 1;
const EXIT_TIMEOUT: u8 = 2;
const EXIT_UPSTREAM: u8 = 3;

/// `taskgate wait`: 0 completed, 1 failed or aborted, 2 timeout, 3 the runtime unreachable or
/// refusing taskgate's credentials at the start (or a config that cannot be loaded, or a
/// session the runtime does not know).
pub async fn run(args: WaitArgs) -> ExitCode {
    let overrides = Overrides {
        upstream: args.upstream.clone(),
        ..Overrides::default()
    };
    let config = match Config::load(args.config.as_deref(), &overrides) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("taskgate: config: {e}");
            return ExitCode::from(EXIT_UPSTREAM);
        }
    };
    super::logging::init_tracing(&config);
    let oracle = Oracle::new(&config);
    if let Err(e) = oracle.client().health().await {
        eprintln!("taskgate: {e}");
        return ExitCode::from(EXIT_UPSTREAM);
    }
    let session = SessionRef {
        id: args.session.clone(),
        directory: args.directory.clone(),
    };
    // Anything but these (a transient failure) is waited out like any unknown verdict.
    match oracle.decide_checked(&session).await {
        Err(e @ (ClientError::NotFound { .. } | ClientError::Unauthorized { .. })) => {
            eprintln!("taskgate: {e}");
            return ExitCode::from(EXIT_UPSTREAM);
        }
        Ok(Decision {
            verdict: Verdict::Gone { session },
            ..
        }) => {
            eprintln!("taskgate: session {session}: not found (404)");
            return ExitCode::from(EXIT_UPSTREAM);
        }
        _ => {}
    }
    let shutdown = super::signals::shutdown_on_signal();
    oracle.start(shutdown.clone());
    let deadline = args.timeout.map(|t| Instant::now() + t);
    let live = !args.json && std::io::stdout().is_terminal();
    let result = if live {
        let drawing = CancellationToken::new();
        let painter = tokio::spawn(draw_live(oracle.clone(), session.clone(), drawing.clone()));
        let result = oracle.wait_terminal(&session, deadline).await;
        drawing.cancel();
        let _ = painter.await;
        result
    } else {
        oracle.wait_terminal(&session, deadline).await
    };
    shutdown.cancel();
    let (decision, code) = match result {
        Ok(d) => {
            let code = match d.verdict {
                Verdict::Completed { .. } => EXIT_COMPLETED,
                _ => EXIT_FAILED,
            };
            (d, code)
        }
        Err(OracleError::Deadline(d)) => (*d, EXIT_TIMEOUT),
        Err(OracleError::Unverifiable(d)) => (*d, EXIT_UPSTREAM),
        Err(OracleError::Cancelled) => {
            eprintln!("taskgate: interrupted");
            return ExitCode::from(EXIT_TIMEOUT);
        }
    };
    if live {
        print_human(&decision, code == EXIT_TIMEOUT);
    } else {
        println!("{}", report(&decision));
    }
    ExitCode::from(code)
}

/// The one JSON object `--json` (or a pipe) gets.
pub fn report(decision: &Decision) -> serde_json::Value {
    let (reason, session) = match &decision.verdict {
        Verdict::Running { session, reason } => (Some(reason.clone()), Some(session.clone())),
        Verdict::Failed { session, message } | Verdict::Aborted { session, message } => {
            (Some(message.clone()), Some(session.clone()))
        }
        Verdict::Gone { session } => (
            Some(crate::claims::render::reason(&decision.verdict)),
            Some(session.clone()),
        ),
        Verdict::Unknown { reason } => (Some(reason.clone()), None),
        Verdict::Completed { .. } => (None, None),
    };
    let text = match &decision.verdict {
        Verdict::Completed { text } => text.clone(),
        _ => None,
    };
    json!({
        "verdict": decision.verdict.name(),
        "reason": reason,
        "session": session,
        "text": text,
        "background": decision.background,
        "unmatched": decision.unmatched,
        "sessions": decision.sessions,
    })
}

fn print_human(decision: &Decision, timed_out: bool) {
    let mut out = std::io::stdout().lock();
    let _ = match &decision.verdict {
        _ if timed_out => writeln!(out, "timed out: {}", describe(&decision.verdict)),
        Verdict::Completed { text } => writeln!(out, "completed")
            .and_then(|_| text.as_ref().map_or(Ok(()), |t| writeln!(out, "{t}"))),
        v => writeln!(out, "{}", describe(v)),
    };
}

fn describe(verdict: &Verdict) -> String {
    match verdict {
        Verdict::Completed { .. } => "completed".to_owned(),
        other => format!("{}: {}", other.name(), crate::claims::render::reason(other)),
    }
}

/// Redraws the tree (session, agent, status, elapsed) on every verdict change and every second,
/// each line cut to the terminal's width ([`super::term::Frame`]).
async fn draw_live(oracle: Oracle, session: SessionRef, stop: CancellationToken) {
    let started = Instant::now();
    let mut first_seen: HashMap<String, Instant> = HashMap::new();
    let mut frame = super::term::Frame::default();
    let mut decisions = Box::pin(oracle.watch(session));
    let mut current: Option<Decision> = None;
    let mut tick = tokio::time::interval(std::time::Duration::from_secs(1));
    loop {
        tokio::select! {
            d = decisions.next() => match d {
                Some(d) => current = Some(d),
                None => return,
            },
            _ = tick.tick() => {}
            _ = stop.cancelled() => {
                frame.clear();
                return;
            }
        }
        let Some(d) = &current else { continue };
        let mut text = format!(
            "{}  ({}s)\n",
            describe(&d.verdict),
            started.elapsed().as_secs()
        );
        for s in &d.sessions {
            let seen = *first_seen.entry(s.id.clone()).or_insert_with(Instant::now);
            let indent = if s.parent.is_some() { "  └ " } else { "" };
            text.push_str(&format!(
                "{indent}{}  {}  {}  {}s  {}\n",
                s.id,
                s.agent.as_deref().unwrap_or("-"),
                s.status,
                seen.elapsed().as_secs(),
                s.title.as_deref().unwrap_or("")
            ));
        }
        frame.draw(&text);
    }
}
