//! `taskgate holds`: what a running taskgate holds, in a terminal. It reads the same snapshot
//! the page at `/_taskgate/` draws: on a terminal it follows `/_taskgate/events` and redraws
//! in place within the terminal's size (ages move on once a second); with `--json`, or when
//! stdout is not a terminal, it prints one snapshot (`/_taskgate/view`) and exits.

use std::io::{IsTerminal, Write};
use std::process::ExitCode;
use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde_json::Value;

use super::term::Frame;

/// Exit code when taskgate cannot be asked (down, refused, not a taskgate).
const EXIT_UNREACHABLE: u8 = 3;
/// The most of one snapshot read (a snapshot is a few kilobytes; 30 trees of 500 sessions at
/// worst a few megabytes).
const SNAPSHOT_LIMIT: usize = 32 * 1024 * 1024;
/// How long to wait for taskgate to answer at all.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, clap::Args)]
pub struct HoldsArgs {
    /// The running taskgate (its `proxy.listen`).
    #[arg(long, default_value = "http://127.0.0.1:4097")]
    pub url: String,
    /// `proxy.admin_token`, when the taskgate asked has one (default: $TASKGATE_ADMIN_TOKEN).
    #[arg(long)]
    pub token: Option<String>,
    /// Print one snapshot as JSON and exit (also what a pipe gets, as text, without it).
    #[arg(long)]
    pub json: bool,
}

/// Why taskgate could not be read.
#[derive(Debug, thiserror::Error)]
enum HoldsError {
    #[error("{0:?} is not a URL taskgate listens on: {1}")]
    Url(String, String),
    #[error("cannot reach taskgate at {0}: {1}")]
    Connect(String, String),
    #[error("taskgate at {0} did not answer within {CONNECT_TIMEOUT:?}")]
    Timeout(String),
    #[error("taskgate answered {status}: {body}")]
    Status { status: StatusCode, body: String },
    #[error("taskgate's answer could not be read: {0}")]
    Body(String),
    #[error("taskgate's answer is not a snapshot: {0}")]
    Json(#[from] serde_json::Error),
}

pub async fn run(mut args: HoldsArgs) -> ExitCode {
    // The variable `serve` reads the token from, so one export serves both.
    args.token = args
        .token
        .or_else(|| std::env::var("TASKGATE_ADMIN_TOKEN").ok());
    let live = !args.json && std::io::stdout().is_terminal();
    let outcome = if live {
        follow(&args).await
    } else {
        once(&args).await
    };
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            say!("taskgate holds: {e}");
            ExitCode::from(EXIT_UNREACHABLE)
        }
    }
}

/// One snapshot: JSON with `--json`, else the text a terminal would show.
async fn once(args: &HoldsArgs) -> Result<(), HoldsError> {
    let response = get(args, "view").await?;
    let body = Box::pin(http_body_util::Limited::new(
        response.into_body(),
        SNAPSHOT_LIMIT,
    ))
    .collect()
    .await
    .map_err(|e| HoldsError::Body(e.to_string()))?
    .to_bytes();
    let snapshot: Value = serde_json::from_slice(&body)?;
    let text = if args.json {
        format!("{snapshot:#}\n")
    } else {
        render(&snapshot, ms(&snapshot, "now_ms").unwrap_or(0))
    };
    // `taskgate holds | head` closes stdout early; that is not an error.
    let _ = std::io::stdout().lock().write_all(text.as_bytes());
    Ok(())
}

/// Follows the event stream, redrawing on every snapshot and every second, until Ctrl-C or
/// until taskgate stops.
async fn follow(args: &HoldsArgs) -> Result<(), HoldsError> {
    let shutdown = super::signals::shutdown_on_signal();
    let mut body = get(args, "events").await?.into_body();
    let mut frame = Frame::default();
    let mut buffer = String::new();
    // The snapshot and when it came (this clock): ages move on from taskgate's `now_ms`.
    let mut current: Option<(Value, tokio::time::Instant)> = None;
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tokio::select! {
            chunk = body.frame() => match chunk {
                Some(Ok(chunk)) => {
                    if let Ok(data) = chunk.into_data() {
                        buffer.push_str(&String::from_utf8_lossy(&data));
                        if let Some(snapshot) = last_snapshot(&mut buffer)? {
                            current = Some((snapshot, tokio::time::Instant::now()));
                        }
                    }
                }
                Some(Err(e)) => return Err(HoldsError::Body(e.to_string())),
                None => {
                    frame.clear();
                    say!("taskgate holds: taskgate at {} stopped", args.url);
                    return Ok(());
                }
            },
            _ = tick.tick() => {}
            () = shutdown.cancelled() => {
                frame.clear();
                return Ok(());
            }
        }
        if let Some((snapshot, came)) = &current {
            let then = ms(snapshot, "now_ms").unwrap_or(0);
            frame.draw(&render(snapshot, then + came.elapsed().as_millis() as u64));
        }
    }
}

/// Takes the complete frames off the front of `buffer` and returns the newest snapshot among
/// them (a burst of changes is drawn once).
fn last_snapshot(buffer: &mut String) -> Result<Option<Value>, HoldsError> {
    let mut newest = None;
    while let Some(end) = buffer.find("\n\n") {
        let frame: String = buffer.drain(..end + 2).collect();
        let data: Vec<&str> = frame
            .lines()
            .filter_map(|l| l.strip_prefix("data:"))
            .map(|l| l.strip_prefix(' ').unwrap_or(l))
            .collect();
        if !data.is_empty() {
            newest = Some(serde_json::from_str(&data.join("\n"))?);
        }
    }
    Ok(newest)
}

async fn get(
    args: &HoldsArgs,
    endpoint: &str,
) -> Result<http::Response<hyper::body::Incoming>, HoldsError> {
    let base = args.url.trim_end_matches('/');
    let url = format!("{base}/_taskgate/{endpoint}");
    let mut request = Request::get(&url)
        .body(Empty::<Bytes>::new())
        .map_err(|e| HoldsError::Url(args.url.clone(), e.to_string()))?;
    if let Some(token) = &args.token {
        let value = HeaderValue::from_str(&format!("Bearer {token}")).map_err(|_| {
            HoldsError::Url(
                args.url.clone(),
                "the token is not valid in a header".into(),
            )
        })?;
        request.headers_mut().insert(header::AUTHORIZATION, value);
    }
    let client = Client::builder(TokioExecutor::new()).build_http::<Empty<Bytes>>();
    let response = tokio::time::timeout(CONNECT_TIMEOUT, client.request(request))
        .await
        .map_err(|_| HoldsError::Timeout(args.url.clone()))?
        .map_err(|e| HoldsError::Connect(args.url.clone(), e.to_string()))?;
    if !response.status().is_success() {
        let status = response.status();
        let body = Box::pin(http_body_util::Limited::new(
            response.into_body(),
            64 * 1024,
        ))
        .collect()
        .await
        .map(|b| String::from_utf8_lossy(&b.to_bytes()).into_owned())
        .unwrap_or_default();
        return Err(HoldsError::Status { status, body });
    }
    Ok(response)
}

/// "42s", "3m05s", "2h04m".
fn span(ms: u64) -> String {
    let s = ms / 1000;
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m{:02}s", s / 60, s % 60),
        _ => format!("{}h{:02}m", s / 3600, s / 60 % 60),
    }
}

fn text<'a>(value: &'a Value, key: &str) -> &'a str {
    value.get(key).and_then(Value::as_str).unwrap_or("")
}

fn ms(value: &Value, key: &str) -> Option<u64> {
    value.get(key).and_then(Value::as_u64)
}

/// The snapshot as lines for a terminal: each tree with its sessions indented under their
/// parents, the holds on it, then holds on trees not read yet, then recent releases.
/// `clock`: taskgate's clock now (its `now_ms` when the snapshot came, plus the time since).
pub fn render(snapshot: &Value, clock: u64) -> String {
    let empty = Vec::new();
    let list = |key: &str| {
        snapshot
            .get(key)
            .and_then(Value::as_array)
            .unwrap_or(&empty)
    };
    let (trees, holds, releases) = (list("trees"), list("holds"), list("releases"));
    let mut out = format!(
        "taskgate: {} held, {} trees read lately\n",
        holds.len(),
        trees.len()
    );
    if snapshot.get("gate") == Some(&Value::Bool(false)) {
        out.push_str("the gate is off: taskgate is a plain proxy and holds nothing\n");
    }
    let mut shown = vec![false; holds.len()];
    for tree in trees {
        let root = text(tree, "root");
        let sessions = tree
            .get("sessions")
            .and_then(Value::as_array)
            .unwrap_or(&empty);
        let ids: Vec<&str> = sessions.iter().map(|s| text(s, "id")).collect();
        out.push_str(&format!("\n{} {root}", text(tree, "verdict")));
        if let Some(title) = sessions
            .iter()
            .find(|s| text(s, "id") == root)
            .map(|s| text(s, "title"))
            .filter(|t| !t.is_empty())
        {
            out.push_str(&format!("  {title}"));
        }
        out.push('\n');
        draw_sessions(&mut out, sessions, root, None, 1, clock);
        for (n, hold) in holds.iter().enumerate() {
            if ids.contains(&text(hold, "session")) || ids.contains(&text(hold, "child")) {
                shown[n] = true;
                draw_hold(&mut out, hold, clock);
            }
        }
    }
    let unread: Vec<&Value> = holds
        .iter()
        .zip(&shown)
        .filter(|(_, shown)| !**shown)
        .map(|(h, _)| h)
        .collect();
    if !unread.is_empty() {
        out.push_str("\nheld, tree not read yet\n");
        for hold in unread {
            draw_hold(&mut out, hold, clock);
        }
    }
    if !releases.is_empty() {
        out.push_str("\nrecent releases\n");
        for r in releases.iter().take(10) {
            let child = text(r, "child");
            let about = if child == text(r, "session") {
                String::new()
            } else {
                format!(" for {child}")
            };
            out.push_str(&format!(
                "  {} {} {} {}{about}, held {}, {} ago\n",
                text(r, "verdict"),
                text(r, "face"),
                text(r, "kind"),
                text(r, "session"),
                span(ms(r, "held_ms").unwrap_or(0)),
                span(clock.saturating_sub(ms(r, "at_ms").unwrap_or(0))),
            ));
            if r.get("contradiction") == Some(&Value::Bool(true)) {
                out.push_str("    ! the claim said done: rewritten to the truth\n");
            }
        }
    }
    out
}

/// The sessions under `parent` (the root itself when `parent` is `None`), indented by depth.
fn draw_sessions(
    out: &mut String,
    sessions: &[Value],
    root: &str,
    parent: Option<&str>,
    depth: usize,
    clock: u64,
) {
    for s in sessions {
        let id = text(s, "id");
        let here = match parent {
            None => id == root,
            Some(parent) => s.get("parent").and_then(Value::as_str) == Some(parent) && id != root,
        };
        if !here {
            continue;
        }
        let busy = ms(s, "busy_since_ms")
            .map(|since| format!(" {}", span(clock.saturating_sub(since))))
            .unwrap_or_default();
        let agent = text(s, "agent");
        out.push_str(&format!(
            "{}{}{busy}  {}  {}{}\n",
            "  ".repeat(depth),
            text(s, "status"),
            id,
            if agent.is_empty() { "-" } else { agent },
            match text(s, "title") {
                "" => String::new(),
                title => format!("  {title}"),
            },
        ));
        if depth < 64 {
            draw_sessions(out, sessions, root, Some(id), depth + 1, clock);
        }
    }
}

fn draw_hold(out: &mut String, hold: &Value, clock: u64) {
    out.push_str(&format!(
        "  > held {} {} in {} for {}: {}\n",
        text(hold, "face"),
        text(hold, "kind"),
        text(hold, "session"),
        span(clock.saturating_sub(ms(hold, "since_ms").unwrap_or(0))),
        text(hold, "reason"),
    ));
    if let Some(blocking) = hold.get("blocking").filter(|b| b.is_object()) {
        let mut who = vec![text(blocking, "id").to_owned()];
        for key in ["title", "agent", "status"] {
            if !text(blocking, key).is_empty() {
                who.push(text(blocking, key).to_owned());
            }
        }
        out.push_str(&format!("    blocked by {}\n", who.join(", ")));
    }
    if let Some(deadline) = ms(hold, "rest_deadline_ms") {
        out.push_str(&format!(
            "    at rest: the liveness bound releases it in {}\n",
            span(deadline.saturating_sub(clock))
        ));
    }
}
