//! Release lag through the real runtime (issue 18, item 6): `opencode run --attach URL PROMPT`
//! against the pinned `opencode-ai` (`opencode serve`, the scripted model provider of the tests),
//! straight at the runtime and through `taskgate serve` (release build, default configuration).
//!
//! For a plain prompt, a foreground child and a background child, each round measures the wall
//! time of `run` from spawn to exit, and its exit time minus the runtime's last busy moment: the
//! moment the last session of the run's tree went idle, from the runtime's own `/event` stream
//! read directly (never through taskgate). Negative means `run` exited while the tree still
//! worked (the bug taskgate answers). The runtime is installed the way the tests install it
//! (npm, the version pinned in `tests/runtime/package.json`, cached under the target dir).

use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::Value;

// Shared with the tests (each file allows the parts a user of it leaves unused).
#[path = "../../tests/support/provider.rs"]
mod provider;
#[path = "../../tests/support/runtime.rs"]
mod runtime;

use crate::procs::Proc;
use crate::{median, Error};
use provider::{ScriptedProvider, PARENT_FINAL, PLAIN_ANSWER};
use runtime::{EventStream, Runtime, RuntimeOptions};

/// taskgate's default settle window, which the background target is stated against.
const SETTLE_WINDOW_MS: f64 = 1000.0;
/// Bound on waiting for a run's tree to finish after `run` exited; only a hang reaches it.
const STEP: Duration = Duration::from_secs(120);

/// The three trees: name, prompt, and the root's last answer once the whole tree is done.
const SCENARIOS: [(&str, &str, &str); 3] = [
    ("plain prompt", "Say hello.", PLAIN_ANSWER),
    (
        "foreground child",
        "Do it now. @fg(CHILD-WORK-1S quick job)",
        PARENT_FINAL,
    ),
    (
        "background child",
        "Delegate this. @bg(CHILD-WORK-1S do the work)",
        PARENT_FINAL,
    ),
];

/// One `run`: its wall time and its exit minus the tree's last busy moment, in ms.
struct Sample {
    wall_ms: f64,
    lag_ms: f64,
    /// Through taskgate: the longest hold on the root it logged released (`held_ms`).
    held_ms: Option<f64>,
}

pub async fn run(taskgate: &Path, rounds: usize) -> Result<String, Error> {
    let version = runtime::runtime_version();
    eprintln!("lag: finding or installing opencode-ai@{version}");
    // Without npm (or a runtime binary) this part is reported as not measured, so the parts
    // measured before it still print.
    let bin = match tokio::task::spawn_blocking(move || runtime::install(&version)).await? {
        Ok(bin) => bin,
        Err(e) => {
            return Ok(format!(
                "Release lag through the real runtime: not measured: {e}"
            ))
        }
    };
    let provider = ScriptedProvider::start().await;
    let rt = Runtime::start(&bin, &provider.base_url(), RuntimeOptions::default()).await;
    let upstream: SocketAddr = rt
        .url()
        .trim_start_matches("http://")
        .parse()
        .map_err(|e| format!("runtime URL {}: {e}", rt.url()))?;
    let gate = Proc::taskgate(taskgate, upstream, "lag")?;
    let gate_url = format!("http://{}", gate.addr);
    let events = EventStream::connect(&format!("{}/event", rt.url()), None).await;
    // The first runs of a fresh runtime and CLI are slower (caches, the plugin); one untimed
    // plain prompt each way first.
    for url in [rt.url(), gate_url.as_str()] {
        one_run(&rt, &events, url, SCENARIOS[0].1, SCENARIOS[0].2, None).await?;
    }

    // [scenario][direct, taskgate]
    let mut samples: Vec<[Vec<Sample>; 2]> = SCENARIOS.iter().map(|_| [vec![], vec![]]).collect();
    for round in 0..rounds {
        eprintln!("lag, round {}/{rounds}", round + 1);
        for (s, (name, prompt, answer)) in SCENARIOS.iter().enumerate() {
            for (t, (url, proc)) in [(rt.url(), None), (gate_url.as_str(), Some(&gate))]
                .into_iter()
                .enumerate()
            {
                let sample = one_run(&rt, &events, url, prompt, answer, proc)
                    .await
                    .map_err(|e| {
                        format!(
                            "{name} via {url}: {e}\ntaskgate's log:\n{}",
                            gate.log_tail()
                        )
                    })?;
                samples[s][t].push(sample);
            }
        }
    }
    // taskgate's log goes with its temporary directory; with `RUST_LOG=info,taskgate=trace`
    // it holds every tree read and request of each release (docs/performance.md).
    if let Some(path) = std::env::var_os("BENCH_LAG_LOG") {
        std::fs::write(&path, gate.log())
            .map_err(|e| format!("BENCH_LAG_LOG {}: {e}", Path::new(&path).display()))?;
    }
    Ok(table(&bin.version, rounds, &samples))
}

/// Runs `prompt` attached to `url`, waits until the runtime finished the whole tree, and reads
/// the tree's last busy moment off the runtime's event stream.
async fn one_run(
    rt: &Runtime,
    events: &EventStream,
    url: &str,
    prompt: &str,
    answer: &str,
    gate: Option<&Proc>,
) -> Result<Sample, Error> {
    let from = events.events().len();
    let out = rt.run(url, &[], prompt).await;
    let exit = Instant::now();
    if !out.status.success() {
        return Err(format!("run failed: {out:?}").into());
    }
    let root = {
        let evs = events.events();
        evs[from..]
            .iter()
            .find(|e| {
                e["type"] == "session.created" && e["properties"]["info"]["parentID"].is_null()
            })
            .and_then(|e| e["properties"]["info"]["id"].as_str())
            .map(str::to_owned)
            .ok_or("no root session created during the run")?
    };
    // The root's last answer is written only once every child reported; after it the tree
    // goes idle and stays idle.
    rt.wait_for_text(&root, answer, STEP).await;
    events
        .wait_for("the run's tree idle", STEP, |evs| {
            busy_timeline(&evs[from..], &root).0.is_empty()
        })
        .await;
    let timed = events.timed_events();
    let (_, last_idle) = busy_timeline(
        &timed[from..]
            .iter()
            .map(|(_, e)| e.clone())
            .collect::<Vec<_>>(),
        &root,
    );
    let last_busy = last_idle
        .map(|i| timed[from + i].0)
        .ok_or("the tree was never seen busy")?;
    let lag_ms = if exit >= last_busy {
        exit.duration_since(last_busy).as_secs_f64() * 1e3
    } else {
        -(last_busy.duration_since(exit).as_secs_f64() * 1e3)
    };
    Ok(Sample {
        wall_ms: out.elapsed.as_secs_f64() * 1e3,
        lag_ms,
        held_ms: gate.and_then(|g| longest_hold(&g.log(), &root)),
    })
}

/// The longest `held_ms` of the `hold released` lines taskgate logged for `session`.
fn longest_hold(log: &str, session: &str) -> Option<f64> {
    let on_session = format!("session={session}");
    log.lines()
        .filter(|l| l.contains("hold released") && l.contains(&on_session))
        .filter_map(|l| {
            let rest = &l[l.find("held_ms=")? + "held_ms=".len()..];
            let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
            digits.parse::<f64>().ok()
        })
        .reduce(f64::max)
}

/// Replays `events` for the tree of `root` (the root and every session created under a session
/// of the tree): the sessions still busy at the end, and the index of the last event that left
/// no session of the tree busy (the tree's last busy moment).
fn busy_timeline(events: &[Value], root: &str) -> (HashSet<String>, Option<usize>) {
    let mut tree: HashSet<String> = HashSet::from([root.to_owned()]);
    let mut busy = HashSet::new();
    let mut last_idle = None;
    for (i, e) in events.iter().enumerate() {
        let p = &e["properties"];
        match e["type"].as_str() {
            Some("session.created") => {
                if let (Some(id), Some(parent)) =
                    (p["info"]["id"].as_str(), p["info"]["parentID"].as_str())
                {
                    if tree.contains(parent) {
                        tree.insert(id.to_owned());
                    }
                }
            }
            Some(kind @ ("session.status" | "session.idle")) => {
                let Some(id) = p["sessionID"].as_str().filter(|id| tree.contains(*id)) else {
                    continue;
                };
                let idle = kind == "session.idle" || p["status"]["type"] == "idle";
                if !idle {
                    busy.insert(id.to_owned());
                } else if busy.remove(id) && busy.is_empty() {
                    last_idle = Some(i);
                }
            }
            _ => {}
        }
    }
    (busy, last_idle)
}

fn table(version: &str, rounds: usize, samples: &[[Vec<Sample>; 2]]) -> String {
    let m = |v: &[Sample], f: fn(&Sample) -> f64| median(v.iter().map(f).collect());
    let ms = |v: f64| format!("{v:.0}");
    let mut out = format!(
        "Release lag through the real runtime (opencode-ai@{version}, scripted model), medians of \
         {rounds} rounds; lag = run's exit − the tree's last busy moment (from the runtime's own \
         /event), negative = exited while the tree still worked; added = median of the rounds' taskgate − \
         direct\n\n\
         | tree | wall direct (ms) | wall taskgate (ms) | added wall (ms) | lag direct (ms) | lag taskgate (ms) | added lag (ms) | taskgate lags per round (ms) | held by taskgate (ms) | target |\n\
         |---|---:|---:|---:|---:|---:|---:|---|---:|---|\n"
    );
    for ((name, _, _), [direct, through]) in SCENARIOS.iter().zip(samples) {
        // The added figure is the median of each round's difference, so a slow round for both
        // cancels out.
        let added = |f: fn(&Sample) -> f64| {
            median(
                through
                    .iter()
                    .zip(direct)
                    .map(|(t, d)| f(t) - f(d))
                    .collect(),
            )
        };
        let (added_wall, added_lag) = (added(|s| s.wall_ms), added(|s| s.lag_ms));
        let lag = m(through, |s| s.lag_ms);
        // The CLI's own start-up varies by seconds between runs on a busy machine, far more
        // than the 50 ms target, while what taskgate adds is at the end (the hold) plus
        // microseconds per forwarded request: the plain and foreground targets are judged on
        // the added exit lag, which the start-up does not touch.
        let target = if name.starts_with("background") {
            let bound = SETTLE_WINDOW_MS + 250.0;
            verdict(lag <= bound, &format!("lag ≤ {bound:.0} ms"))
        } else {
            verdict(added_lag <= 50.0, "added lag ≤ 50 ms")
        };
        let per_round: Vec<String> = through.iter().map(|s| ms(s.lag_ms)).collect();
        let held: Vec<f64> = through.iter().filter_map(|s| s.held_ms).collect();
        let held = if held.is_empty() {
            "–".to_owned()
        } else {
            ms(median(held))
        };
        out.push_str(&format!(
            "| {name} | {} | {} | {} | {} | {} | {} | {} | {held} | {target} |\n",
            ms(m(direct, |s| s.wall_ms)),
            ms(m(through, |s| s.wall_ms)),
            ms(added_wall),
            ms(m(direct, |s| s.lag_ms)),
            ms(lag),
            ms(added_lag),
            per_round.join(", "),
        ));
    }
    out
}

fn verdict(met: bool, what: &str) -> String {
    if met {
        format!("{what}: met")
    } else {
        format!("{what}: **not met**")
    }
}
