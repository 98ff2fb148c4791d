//! `taskgate demo`: the bug and the fix side by side, on the simulated runtime.
//!
//! It starts the simulated runtime and a taskgate proxy in front of it, in-process on free
//! loopback ports, then runs the same client (what `opencode run --attach` does: create,
//! subscribe, prompt, stop at the first idle) twice at once: straight at the runtime, and
//! through taskgate. An oracle watching the direct run's session tree marks when the work
//! really finished. The two timelines are printed side by side in 80 columns.
//!
//! Exit status 0 only when the proxied client saw the truth: it stopped after its tree was
//! terminal and printed the tree's final answer.

use std::process::ExitCode;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::oracle::{SessionRef, Verdict};
use crate::sim::client::{run_like_opencode_run, Entry, RunReport, Seen};
use crate::sim::{scenario, SimOptions};

/// Width of one timeline column (two columns plus the time fit in 80).
const COLUMN: usize = 33;

#[derive(Debug, Clone, clap::Args)]
pub struct DemoArgs {
    /// Multiply every scenario delay by this (0.1 = ten times faster).
    #[arg(long, default_value_t = 1.0)]
    pub time_scale: f64,
    /// The scenario to show (see `taskgate sim`); defaults to the native background child.
    #[arg(long)]
    pub scenario: Option<String>,
}

pub async fn run(args: DemoArgs) -> ExitCode {
    let name = args.scenario.as_deref().unwrap_or("bg-child");
    let Some(chosen) = scenario::all().into_iter().find(|s| s.name == name) else {
        let names: Vec<&str> = scenario::all().iter().map(|s| s.name).collect();
        eprintln!(
            "taskgate demo: no scenario {name:?}; choose one of {}",
            names.join(", ")
        );
        return ExitCode::from(2);
    };
    match demo(chosen.name, chosen.summary, args.time_scale).await {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(e) => {
            eprintln!("taskgate demo: {e}");
            ExitCode::from(1)
        }
    }
}

#[derive(Debug, thiserror::Error)]
enum DemoError {
    #[error("cannot listen on loopback: {0}")]
    Listen(#[from] std::io::Error),
    #[error("{0}")]
    Config(#[from] crate::config::ConfigError),
    #[error("the {which} client failed: {source}")]
    Client {
        which: &'static str,
        source: crate::sim::client::RunError,
    },
}

async fn demo(name: &str, summary: &str, time_scale: f64) -> Result<bool, DemoError> {
    let shutdown = CancellationToken::new();
    let _stop = shutdown.clone().drop_guard();

    let sim_listener = TcpListener::bind("127.0.0.1:0").await?;
    let sim_url = format!("http://{}", sim_listener.local_addr()?);
    tokio::spawn(crate::sim::run(
        sim_listener,
        SimOptions {
            time_scale,
            ..SimOptions::default()
        },
        shutdown.clone(),
    ));

    let overrides = crate::config::Overrides {
        upstream: Some(sim_url.clone()),
        ..Default::default()
    };
    let config = Config::load_with_env(None, &overrides, |_| None)?;
    let settle = config.gate.settle_window.0;
    let proxy_listener = TcpListener::bind("127.0.0.1:0").await?;
    let proxy_url = format!("http://{}", proxy_listener.local_addr()?);
    // One stack, one oracle: the proxy's gate and the demo's own truth share its reads.
    let stack = super::stack::start(config, proxy_listener, None, shutdown.clone());
    let oracle = stack.oracle();

    println!("taskgate demo, scenario {name}:");
    for line in wrap(summary, 76) {
        println!("  {line}");
    }
    println!("simulated runtime {sim_url}\ntaskgate in front of it {proxy_url}");
    println!("Both clients do what `opencode run --attach URL` does.\n");

    let prompt = format!("{}{name} please", scenario::MARKER);
    let start = Instant::now();
    let proxied = async {
        let report = run_like_opencode_run(&proxy_url, &prompt)
            .await
            .map_err(|source| DemoError::Client {
                which: "proxied",
                source,
            })?;
        // The runtime's truth for the proxied run's own tree, the moment its client stopped.
        let at_exit = oracle
            .decide(&SessionRef {
                id: report.session_id.clone(),
                directory: None,
            })
            .await
            .verdict;
        Ok::<_, DemoError>((report, at_exit))
    };
    let direct = async {
        let report = run_like_opencode_run(&sim_url, &prompt)
            .await
            .map_err(|source| DemoError::Client {
                which: "direct",
                source,
            })?;
        // The runtime's own truth for the direct run's tree: when it became terminal.
        let mut verdicts = Box::pin(oracle.watch(SessionRef {
            id: report.session_id.clone(),
            directory: None,
        }));
        let mut truth = None;
        while let Some(decision) = verdicts.next().await {
            if decision.verdict.is_terminal() {
                truth = Some((start.elapsed(), decision.verdict));
                break;
            }
        }
        Ok::<_, DemoError>((report, truth))
    };
    let (proxied, direct) = tokio::join!(proxied, direct);
    let ((proxied, at_exit), (direct, truth)) = (proxied?, direct?);

    let finished = truth.as_ref().map(|(at, _)| *at);
    print_timelines(&direct, &proxied, finished);
    Ok(print_verdict(&direct, &proxied, &at_exit, truth, settle))
}

fn print_timelines(direct: &RunReport, proxied: &RunReport, finished: Option<Duration>) {
    println!(
        "{:>7}  {:<COLUMN$}  {:<COLUMN$}",
        "time", "direct to the runtime", "through taskgate"
    );
    println!("{:>7}  {:-<COLUMN$}  {:-<COLUMN$}", "", "", "");
    let mut rows: Vec<(u64, usize, String)> = Vec::new();
    for (column, report) in [(0, direct), (1, proxied)] {
        for entry in &report.timeline {
            if let Some(text) = describe(entry) {
                rows.push((entry.at_ms, column, text));
            }
        }
    }
    if let Some(at) = finished {
        rows.push((
            at.as_millis() as u64,
            2,
            "the work really finished".to_owned(),
        ));
    }
    rows.sort_by_key(|(at, column, _)| (*at, *column));
    for (at, column, text) in rows {
        let time = format!("{:.2}s", at as f64 / 1000.0);
        let line = match column {
            0 => format!("{time:>7}  {}", clip(&text)),
            1 => format!("{time:>7}  {:<COLUMN$}  {}", "", clip(&text)),
            _ => format!("{time:>7}  ---------- {text} ----------"),
        };
        println!("{line}");
    }
    println!();
}

fn describe(entry: &Entry) -> Option<String> {
    Some(match &entry.seen {
        Seen::Text(text) => format!("prints \"{}\"", text.replace('\n', " ")),
        Seen::Tool { tool, status, .. } => format!("{tool} part: {status}"),
        Seen::Idle { .. } => "sees its session idle".to_owned(),
        Seen::Returned { .. } => "prompt reply returned".to_owned(),
        Seen::Done => "EXITS: believes the work is done".to_owned(),
    })
}

/// Cuts `text` to one column, marking the cut.
fn clip(text: &str) -> String {
    clip_to(text, COLUMN)
}

fn clip_to(text: &str, width: usize) -> String {
    if text.chars().count() <= width {
        return text.to_owned();
    }
    let mut cut: String = text.chars().take(width - 1).collect();
    cut.push('…');
    cut
}

/// Splits `text` into lines of at most `width` characters at spaces.
fn wrap(text: &str, width: usize) -> Vec<String> {
    let mut lines = vec![String::new()];
    for word in text.split_whitespace() {
        let last = lines.last_mut().map(|l| l.chars().count()).unwrap_or(0);
        if last > 0 && last + 1 + word.chars().count() > width {
            lines.push(String::new());
        }
        if let Some(line) = lines.last_mut() {
            if !line.is_empty() {
                line.push(' ');
            }
            line.push_str(word);
        }
    }
    lines
}

/// Prints what each client believed and returns whether the proxied one saw the truth.
fn print_verdict(
    direct: &RunReport,
    proxied: &RunReport,
    at_exit: &Verdict,
    truth: Option<(Duration, Verdict)>,
    settle: Duration,
) -> bool {
    let Some((finished, verdict)) = truth else {
        println!("The runtime could not be read to its end: no verdict.");
        return false;
    };
    let finished_ms = finished.as_millis() as u64;
    let answer = match &verdict {
        Verdict::Completed { text } => text.clone(),
        _ => None,
    };
    let answer_shown = answer.as_deref().unwrap_or("(no final text)");
    let gap = |ms: u64| format!("{:.1} s", ms as f64 / 1000.0);
    println!(
        "The work really finished at {} ({}).",
        gap(finished_ms),
        verdict.name()
    );
    println!("Its last answer: \"{}\"", clip_to(answer_shown, 60));
    if direct.done_at_ms < finished_ms {
        println!(
            "Direct:  exited {} too early; the last thing it printed was",
            gap(finished_ms - direct.done_at_ms)
        );
        println!(
            "         \"{}\"",
            clip_to(direct.last_text().unwrap_or("nothing"), 68)
        );
    } else {
        println!("Direct:  exited after the work finished (this scenario did not mislead it).");
    }
    // The proxied run's own tree must have been terminal when its client stopped, and the
    // client must have printed that tree's last answer.
    let own_answer = match at_exit {
        Verdict::Completed { text } => text.as_deref(),
        _ => None,
    };
    let truthful =
        at_exit.is_terminal() && (own_answer.is_none() || proxied.last_text() == own_answer);
    if truthful {
        println!(
            "taskgate: exited at {} (settle window {} ms) and printed the last answer.",
            gap(proxied.done_at_ms),
            settle.as_millis()
        );
    } else {
        println!(
            "taskgate: FAILED to hold the claim: exited at {} while its tree was {}, last printed {:?}.",
            gap(proxied.done_at_ms),
            at_exit.name(),
            proxied.last_text()
        );
    }
    truthful
}
