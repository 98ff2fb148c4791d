//! The performance benchmark (docs/performance.md): starts its own upstream, taskgate and nginx
//! on loopback, drives them with the same load, and prints one table with every figure also as
//! a ratio against the direct connection of the same run.
//!
//! ```text
//! bench/run.sh [--rounds N] [--only json,big,sse,holds,idle,lag]
//! ```
//!
//! `bench upstream --listen ADDR` is the minimal upstream itself (a process of its own, so its
//! CPU is not the load generator's).

mod holds;
mod lag;
mod load;
mod procs;
mod upstream;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use procs::{Nginx, Proc};

pub type Error = Box<dyn std::error::Error + Send + Sync>;

struct Args {
    rounds: usize,
    only: Option<Vec<String>>,
    taskgate: PathBuf,
}

fn parse_args() -> Result<Args, Error> {
    let mut args = std::env::args().skip(1);
    let exe = std::env::current_exe()?;
    // target/<profile>/examples/bench → target/<profile>/taskgate
    let default_taskgate = exe
        .parent()
        .and_then(|p| p.parent())
        .map(|p| p.join("taskgate"))
        .ok_or("cannot find the taskgate binary next to the benchmark")?;
    let mut parsed = Args {
        rounds: 5,
        only: None,
        taskgate: default_taskgate,
    };
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "upstream" => {
                let listen = match (args.next().as_deref(), args.next()) {
                    (Some("--listen"), Some(listen)) => listen,
                    _ => "127.0.0.1:0".to_owned(),
                };
                upstream::serve(&listen)?;
                std::process::exit(0);
            }
            "--rounds" => {
                parsed.rounds = args
                    .next()
                    .and_then(|n| n.parse().ok())
                    .ok_or("--rounds N")?
            }
            "--only" => {
                parsed.only = Some(
                    args.next()
                        .ok_or("--only json,big,sse,holds,idle,lag")?
                        .split(',')
                        .map(str::to_owned)
                        .collect(),
                )
            }
            "--taskgate" => parsed.taskgate = args.next().ok_or("--taskgate PATH")?.into(),
            other => return Err(format!("unknown argument {other}").into()),
        }
    }
    Ok(parsed)
}

fn main() -> Result<(), Error> {
    let args = parse_args()?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(run(args))
}

/// The three ways to reach the upstream, in table order.
#[derive(Clone, Copy)]
struct Targets {
    direct: SocketAddr,
    taskgate: SocketAddr,
    nginx: SocketAddr,
}

impl Targets {
    fn all(&self) -> [SocketAddr; 3] {
        [self.direct, self.taskgate, self.nginx]
    }
}

/// One table row: a value per target (direct, taskgate, nginx), `None` where it does not apply.
struct Row {
    name: String,
    unit: &'static str,
    values: [Option<f64>; 3],
    /// What taskgate and nginx add to the direct figure (latencies), median of the rounds.
    added: Option<[f64; 2]>,
}

async fn run(args: Args) -> Result<(), Error> {
    let wants = |part: &str| {
        args.only
            .as_ref()
            .is_none_or(|o| o.iter().any(|p| p == part))
    };
    println!("{}", procs::machine());
    let upstream = Proc::upstream()?;
    let taskgate = Proc::taskgate(&args.taskgate, upstream.addr, "pass")?;
    let nginx = Nginx::start(upstream.addr)?;
    let targets = Targets {
        direct: upstream.addr,
        taskgate: taskgate.addr,
        nginx: nginx.addr,
    };
    let rounds = args.rounds.max(1);
    let measured = async {
        let mut rows = Vec::new();
        if wants("json") {
            rows.extend(small_json(targets, rounds).await?);
        }
        if wants("big") {
            rows.extend(big(targets, rounds).await?);
        }
        if wants("sse") {
            rows.extend(sse(targets, rounds).await?);
        }
        if wants("idle") {
            rows.extend(idle(targets, &upstream, &taskgate, &nginx).await?);
        }
        Ok::<_, Error>(rows)
    };
    let rows = match measured.await {
        Ok(rows) => rows,
        Err(e) => {
            eprintln!(
                "direct {}, taskgate {}, nginx {}",
                targets.direct, targets.taskgate, targets.nginx
            );
            eprintln!("taskgate's log:\n{}", taskgate.log_tail());
            eprintln!("nginx's log:\n{}", nginx.log_tail());
            return Err(e);
        }
    };
    drop(nginx);
    drop(taskgate);
    drop(upstream);
    let holds = if wants("holds") {
        Some(holds::run(&args.taskgate, rounds).await?)
    } else {
        None
    };
    let lag = if wants("lag") {
        Some(lag::run(&args.taskgate, rounds).await?)
    } else {
        None
    };
    println!("{}", procs::load());
    println!();
    print_table(&rows, rounds);
    if let Some(holds) = holds {
        println!();
        println!("{holds}");
    }
    if let Some(lag) = lag {
        println!();
        println!("{lag}");
    }
    Ok(())
}

fn print_table(rows: &[Row], rounds: usize) {
    println!("medians of {rounds} rounds; (×r) = ratio against direct in the same run");
    println!();
    println!("| measure | direct | taskgate | nginx | taskgate ÷ nginx | added by taskgate | added by nginx |");
    println!("|---|---:|---:|---:|---:|---:|---:|");
    for row in rows {
        let cell = |i: usize| match (row.values[i], row.values[0]) {
            (Some(v), Some(d)) if i > 0 && d > 0.0 => format!("{} (×{:.2})", fmt(v), v / d),
            (Some(v), _) => fmt(v),
            (None, _) => "–".to_owned(),
        };
        let vs_nginx = match (row.values[1], row.values[2]) {
            (Some(t), Some(n)) if n > 0.0 => format!("{:.2}", t / n),
            _ => "–".to_owned(),
        };
        let (at, an) = match row.added {
            Some([t, n]) => (
                format!("{} {}", fmt(t), row.unit),
                format!("{} {}", fmt(n), row.unit),
            ),
            None => ("".to_owned(), "".to_owned()),
        };
        println!(
            "| {} ({}) | {} | {} | {} | {} | {} | {} |",
            row.name,
            row.unit,
            cell(0),
            cell(1),
            cell(2),
            vs_nginx,
            at,
            an
        );
    }
}

fn fmt(v: f64) -> String {
    if v.abs() >= 100.0 {
        format!("{v:.0}")
    } else if v.abs() >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

pub fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    if v.is_empty() {
        return f64::NAN;
    }
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// The `p`-th percentile (0–100) of `sorted`.
pub fn percentile(sorted: &[u64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0) * (sorted.len() - 1) as f64).round() as usize;
    sorted[rank.min(sorted.len() - 1)] as f64
}

/// Per-round figures of the three targets, reduced to a row of medians.
struct Samples {
    per_target: [Vec<f64>; 3],
}

impl Samples {
    fn new() -> Samples {
        Samples {
            per_target: [Vec::new(), Vec::new(), Vec::new()],
        }
    }

    fn row(self, name: &str, unit: &'static str, with_added: bool) -> Row {
        // The added figure is the median of each round's difference, not the difference of
        // medians, so a slow round for every target cancels out.
        let added = with_added.then(|| {
            let diff = |i: usize| {
                median(
                    self.per_target[i]
                        .iter()
                        .zip(&self.per_target[0])
                        .map(|(t, d)| t - d)
                        .collect(),
                )
            };
            [diff(1), diff(2)]
        });
        let [d, t, n] = self.per_target;
        Row {
            name: name.to_owned(),
            unit,
            values: [Some(median(d)), Some(median(t)), Some(median(n))],
            added,
        }
    }
}

async fn small_json(targets: Targets, rounds: usize) -> Result<Vec<Row>, Error> {
    let mut rps1 = Samples::new();
    let mut p50 = Samples::new();
    let mut p99 = Samples::new();
    let mut rps32 = Samples::new();
    for round in 0..rounds {
        eprintln!("small JSON, round {}/{rounds}", round + 1);
        for (i, addr) in targets.all().into_iter().enumerate() {
            let mut lat = load::latencies(addr, Duration::from_secs(2)).await?;
            lat.sort_unstable();
            let total: u64 = lat.iter().sum();
            rps1.per_target[i].push(lat.len() as f64 / (total as f64 / 1e9));
            p50.per_target[i].push(percentile(&lat, 50.0) / 1000.0);
            p99.per_target[i].push(percentile(&lat, 99.0) / 1000.0);
            let rps =
                tokio::task::spawn_blocking(move || load::wrk(addr, "/json", 32, 3)).await??;
            rps32.per_target[i].push(rps);
        }
    }
    Ok(vec![
        rps1.row("GET /json requests/s, 1 connection", "req/s", false),
        rps32.row("GET /json requests/s, 32 connections (wrk)", "req/s", false),
        p50.row("GET /json latency p50, 1 connection", "µs", true),
        p99.row("GET /json latency p99, 1 connection", "µs", true),
    ])
}

async fn big(targets: Targets, rounds: usize) -> Result<Vec<Row>, Error> {
    let mut down = Samples::new();
    let mut up = Samples::new();
    for round in 0..rounds {
        eprintln!("10 MiB transfers, round {}/{rounds}", round + 1);
        for (i, addr) in targets.all().into_iter().enumerate() {
            down.per_target[i].push(load::download(addr, 20).await?);
            up.per_target[i].push(load::upload(addr, 20).await?);
        }
    }
    Ok(vec![
        down.row("10 MiB response throughput", "MiB/s", false),
        up.row("10 MiB upload throughput", "MiB/s", false),
    ])
}

/// Event rates tried for the highest sustained rate, events/s.
const RATES: [u64; 9] = [
    1_000, 2_000, 5_000, 10_000, 20_000, 50_000, 100_000, 200_000, 400_000,
];

async fn sse(targets: Targets, rounds: usize) -> Result<Vec<Row>, Error> {
    let mut p50 = Samples::new();
    let mut p99 = Samples::new();
    for round in 0..rounds {
        eprintln!("SSE at 1,000 events/s, round {}/{rounds}", round + 1);
        for (i, addr) in targets.all().into_iter().enumerate() {
            let mut events = load::events(addr, 1_000, 3).await?;
            if (events.latencies.len() as u64) < events.expected {
                return Err(format!(
                    "SSE: {} of {} events arrived",
                    events.latencies.len(),
                    events.expected
                )
                .into());
            }
            events.latencies.sort_unstable();
            p50.per_target[i].push(percentile(&events.latencies, 50.0) / 1000.0);
            p99.per_target[i].push(percentile(&events.latencies, 99.0) / 1000.0);
        }
    }
    // The highest rate each target keeps up with: every event arrives and the p90 latency stays
    // under 100 ms (beyond that events queue up: the stream falls behind). A rate gets a second
    // try, so one stall of a busy machine does not end the climb.
    eprintln!("SSE highest sustained rate");
    let mut max = [0.0f64; 3];
    for (i, addr) in targets.all().into_iter().enumerate() {
        'rates: for rate in RATES {
            for _try in 0..2 {
                let mut events = load::events(addr, rate, 2).await?;
                events.latencies.sort_unstable();
                if events.latencies.len() as u64 >= events.expected
                    && percentile(&events.latencies, 90.0) < 100e6
                {
                    max[i] = rate as f64;
                    continue 'rates;
                }
            }
            break;
        }
    }
    let mut rows = vec![
        p50.row("SSE event latency p50 at 1,000 events/s", "µs", true),
        p99.row("SSE event latency p99 at 1,000 events/s", "µs", true),
    ];
    rows.push(Row {
        name: format!(
            "SSE highest sustained rate (of {})",
            RATES.map(|r| r.to_string()).join(", ")
        ),
        unit: "events/s",
        values: max.map(Some),
        added: None,
    });
    Ok(rows)
}

/// RSS and CPU with 1,000 open, silent event streams.
async fn idle(
    targets: Targets,
    upstream: &Proc,
    taskgate: &Proc,
    nginx: &Nginx,
) -> Result<Vec<Row>, Error> {
    const STREAMS: usize = 1_000;
    const WINDOW: Duration = Duration::from_secs(10);
    let pids = [vec![upstream.pid()], vec![taskgate.pid()], nginx.pids()];
    let mut rss_before = [0.0; 3];
    let mut rss = [0.0; 3];
    let mut cpu = [0.0; 3];
    for (i, addr) in targets.all().into_iter().enumerate() {
        eprintln!("idle: {STREAMS} event streams, target {}", i + 1);
        rss_before[i] = procs::rss_mib(&pids[i]);
        let streams = load::open_streams(addr, STREAMS).await?;
        tokio::time::sleep(Duration::from_secs(1)).await;
        let t0 = procs::cpu_seconds(&pids[i]);
        tokio::time::sleep(WINDOW).await;
        let t1 = procs::cpu_seconds(&pids[i]);
        rss[i] = procs::rss_mib(&pids[i]);
        cpu[i] = (t1 - t0) / WINDOW.as_secs_f64() * 100.0;
        drop(streams);
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    // Direct is the upstream alone; the proxies' own figures exclude it.
    Ok(vec![
        Row {
            name: "RSS before the idle streams (process itself)".to_owned(),
            unit: "MiB",
            values: rss_before.map(Some),
            added: None,
        },
        Row {
            name: format!("RSS with {STREAMS} idle event streams (process itself)"),
            unit: "MiB",
            values: rss.map(Some),
            added: None,
        },
        Row {
            name: format!(
                "CPU with {STREAMS} idle event streams, {}s",
                WINDOW.as_secs()
            ),
            unit: "% of a core",
            values: cpu.map(Some),
            added: None,
        },
    ])
}
