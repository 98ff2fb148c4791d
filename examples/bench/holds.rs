//! Holds against the simulated runtime: 100 root sessions each with a background child that
//! works until aborted (`SCENARIO:child-abort`), watched by enough `/event` streams through
//! taskgate that 10,000 claims are held at once (each root's `session.status` idle and
//! `session.idle`, on every stream). Then every child is aborted at once: the trees turn
//! terminal, and every held idle must be released.
//!
//! A counting pass-through between taskgate and the sim counts taskgate's reads of the runtime
//! (no client sends anything through it while the claims are held).

use std::collections::{BTreeMap, HashSet};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::{json, Value};
use taskgate::sim::client::EventStream;
use tokio::net::TcpListener;

use crate::procs::{cpu_seconds, peak_rss_mib, Proc};
use crate::{median, Error};

const ROOTS: usize = 100;
/// Two held idles per root per stream.
const STREAMS: usize = 50;
const HOLDS: u64 = (ROOTS * STREAMS * 2) as u64;
/// Slows the scenario so a child works 30 s unless aborted.
const TIME_SCALE: f64 = 5.0;
const STEADY: Duration = Duration::from_secs(5);
/// taskgate's defaults, which the targets are stated against.
const POLL_INTERVAL_S: f64 = 0.5;
const SETTLE_WINDOW_MS: f64 = 1000.0;

struct Round {
    held: u64,
    peak_rss: f64,
    reads_per_s: f64,
    lag_ms: f64,
    first_ms: f64,
    /// The runtime's last child idle, after the last abort was answered.
    runtime_last_ms: f64,
    /// The longest a tree's held idles waited after the runtime sent its child's idle.
    tree_lag_ms: f64,
    /// The same for the median tree.
    tree_lag_median_ms: f64,
    /// CPU seconds taskgate, the sim and the benchmark itself (its 51 readers) used from the
    /// aborts to the last release: on 2 cores the release is CPU-bound, so these say who
    /// the time went to.
    cpu: [f64; 3],
    /// Holds started by kind, as taskgate counts them.
    kinds: String,
    /// Requests by route while the claims were held.
    steady_reads: BTreeMap<String, u64>,
}

pub async fn run(taskgate: &Path, rounds: usize) -> Result<String, Error> {
    let mut results = Vec::new();
    for round in 0..rounds {
        eprintln!("holds, round {}/{rounds}", round + 1);
        results.push(one_round(taskgate).await?);
    }
    let m = |f: fn(&Round) -> f64| median(results.iter().map(f).collect());
    let (held, rss, reads, lag) = (
        m(|r| r.held as f64),
        m(|r| r.peak_rss),
        m(|r| r.reads_per_s),
        m(|r| r.lag_ms),
    );
    let lags: Vec<String> = results.iter().map(|r| format!("{:.0}", r.lag_ms)).collect();
    let firsts: Vec<String> = results
        .iter()
        .map(|r| format!("{:.0}", r.first_ms))
        .collect();
    let steady: Vec<String> = results[0]
        .steady_reads
        .iter()
        .map(|(route, n)| format!("{route} {:.0}/s", *n as f64 / STEADY.as_secs_f64()))
        .collect();
    let tree_reads = results
        .iter()
        .map(|r| {
            r.steady_reads
                .get("/session/:id/message")
                .copied()
                .unwrap_or(0) as f64
        })
        .map(|n| n / STEADY.as_secs_f64())
        .collect();
    let tree_reads = median(tree_reads);
    // Every root and every child is waited on (held idles of the roots, held claim parts
    // naming the children): 2 × ROOTS trees, a root's holding its child too. A tree read
    // reads each session's history once: 3 × ROOTS session reads per round of tree reads.
    let sessions = 3 * ROOTS;
    let reads_bound = sessions as f64 / POLL_INTERVAL_S;
    Ok(format!(
        "holds against `taskgate sim` ({ROOTS} roots, each with one busy background child; \
         {STREAMS} event streams; medians of {rounds} rounds)\n\n\
         | measure | taskgate | target |\n|---|---:|---|\n\
         | claims held at once | {held:.0} | {HOLDS} |\n\
         | peak RSS | {rss:.1} MiB | ≤ 100 MB |\n\
         | runtime requests/s while held | {reads:.0} | |\n\
         | session reads/s while held (one history read per session of a tree read) | {tree_reads:.0} | ≤ {reads_bound:.0} ({sessions} sessions in the trees ÷ {POLL_INTERVAL_S} s) |\n\
         | first release after the last abort was answered | {:.0} ms (rounds: {}) | |\n\
         | last release after the last abort was answered | {lag:.0} ms (rounds: {}) | |\n\
         | the runtime's last child idle after the last abort answered | {:.0} ms (rounds: {}) | |\n\
         | last release after the runtime's last child idle (the last tree turning terminal) | {:.0} ms (rounds: {}) | ≤ {:.0} ms (settle window + 100 ms) |\n\
         | longest wait of a tree's releases after the runtime sent its child's idle | {:.0} ms (rounds: {}) | ≤ {:.0} ms |\n\
         | the same for the median tree | {:.0} ms (rounds: {}) | |\n\
         | CPU from the aborts to the last release: taskgate, sim, benchmark | {:.2} s, {:.2} s, {:.2} s | |",
        median(results.iter().map(|r| r.first_ms).collect()),
        firsts.join(", "),
        lags.join(", "),
        median(results.iter().map(|r| r.runtime_last_ms).collect()),
        rounds_of(&results, |r| r.runtime_last_ms),
        median(results.iter().map(|r| r.lag_ms - r.runtime_last_ms).collect()),
        rounds_of(&results, |r| r.lag_ms - r.runtime_last_ms),
        SETTLE_WINDOW_MS + 100.0,
        median(results.iter().map(|r| r.tree_lag_ms).collect()),
        rounds_of(&results, |r| r.tree_lag_ms),
        SETTLE_WINDOW_MS + 100.0,
        median(results.iter().map(|r| r.tree_lag_median_ms).collect()),
        rounds_of(&results, |r| r.tree_lag_median_ms),
        m(|r| r.cpu[0]),
        m(|r| r.cpu[1]),
        m(|r| r.cpu[2]),
    ) + &format!(
        "\n\nrequests by route while held (round 1): {}\nholds by kind (round 1): {}",
        steady.join(", "),
        results[0].kinds
    ))
}

fn rounds_of(results: &[Round], f: fn(&Round) -> f64) -> String {
    results
        .iter()
        .map(|r| format!("{:.0}", f(r)))
        .collect::<Vec<_>>()
        .join(", ")
}

type Http = Client<HttpConnector, Full<Bytes>>;

/// Per stream, each `session.idle` that reached it: session id, when.
type Arrivals = Arc<Mutex<Vec<Vec<(String, Instant)>>>>;

async fn call(http: &Http, method: &str, url: String, body: Value) -> Result<Value, Error> {
    let req = Request::builder()
        .method(method)
        .uri(&url)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body.to_string())))?;
    let response = http.request(req).await?;
    let status = response.status();
    let bytes = response.into_body().collect().await?.to_bytes();
    if !status.is_success() {
        return Err(format!("{method} {url}: {status}").into());
    }
    if bytes.is_empty() {
        return Ok(Value::Null);
    }
    Ok(serde_json::from_slice(&bytes)?)
}

async fn one_round(taskgate: &Path) -> Result<Round, Error> {
    let sim = Proc::sim(taskgate, TIME_SCALE)?;
    let reads = Arc::new(AtomicU64::new(0));
    let routes: Routes = Arc::default();
    let counter = counting_proxy(sim.addr, reads.clone(), routes.clone()).await?;
    let gate = Proc::taskgate(taskgate, counter, "holds")?;
    let http: Http = Client::builder(TokioExecutor::new()).build_http();
    let sim_url = format!("http://{}", sim.addr);
    let gate_url = format!("http://{}", gate.addr);

    // Every stream records when each session's `session.idle` reached it.
    // The last entry is one stream straight from the sim: when each root really went idle.
    let arrivals: Arrivals = Arc::new(Mutex::new(vec![Vec::new(); STREAMS + 1]));
    let mut readers = Vec::new();
    for i in 0..=STREAMS {
        let url = if i == STREAMS { &sim_url } else { &gate_url };
        let mut stream = EventStream::open(url).await?;
        let arrivals = arrivals.clone();
        readers.push(tokio::spawn(async move {
            while let Ok(Some(event)) = stream.next().await {
                if event["type"] == "session.idle" {
                    if let Some(id) = event["properties"]["sessionID"].as_str() {
                        let mut a = arrivals.lock().unwrap_or_else(|e| e.into_inner());
                        a[i].push((id.to_owned(), Instant::now()));
                    }
                }
            }
        }));
    }

    let mut roots = Vec::new();
    for _ in 0..ROOTS {
        let session = call(&http, "POST", format!("{sim_url}/session"), json!({})).await?;
        let id = session["id"].as_str().ok_or("no session id")?.to_owned();
        call(
            &http,
            "POST",
            format!("{sim_url}/session/{id}/prompt_async"),
            json!({"parts": [{"type": "text", "text": "SCENARIO:child-abort"}]}),
        )
        .await?;
        roots.push(id);
    }
    let held = wait_for_holds(&http, &gate_url).await?;
    let kinds = metrics(&http, &gate_url)
        .await?
        .lines()
        .filter(|l| l.starts_with("taskgate_holds_total{"))
        .map(str::to_owned)
        .collect::<Vec<_>>()
        .join(", ");
    let mut children = Vec::new();
    for root in &roots {
        let list = call(
            &http,
            "GET",
            format!("{sim_url}/session/{root}/children"),
            Value::Null,
        )
        .await?;
        let child = list[0]["id"].as_str().ok_or("a root has no child")?;
        children.push(child.to_owned());
    }

    let before = reads.load(Ordering::SeqCst);
    let routes_before = routes.lock().unwrap_or_else(|e| e.into_inner()).clone();
    tokio::time::sleep(STEADY).await;
    let reads_per_s = (reads.load(Ordering::SeqCst) - before) as f64 / STEADY.as_secs_f64();
    let reads_in_window: BTreeMap<String, u64> = routes
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .iter()
        .map(|(k, v)| (k.clone(), v - routes_before.get(k).copied().unwrap_or(0)))
        .collect();

    let cpu = || [gate.pid(), sim.pid(), std::process::id()].map(|pid| cpu_seconds(&[pid]));
    let cpu_before = cpu();
    let aborts = children.iter().map(|child| {
        call(
            &http,
            "POST",
            format!("{sim_url}/session/{child}/abort"),
            json!({}),
        )
    });
    for result in futures_util::future::join_all(aborts).await {
        result?;
    }
    let terminal = Instant::now();

    // Wait until every stream has every root's idle, released.
    let roots_list = roots.clone();
    let roots: HashSet<String> = roots.into_iter().collect();
    let deadline = terminal + Duration::from_secs(60);
    let (first, last) = loop {
        let done = {
            let a = arrivals.lock().unwrap_or_else(|e| e.into_inner());
            a[..STREAMS]
                .iter()
                .map(|stream| {
                    let seen: HashSet<&String> = stream
                        .iter()
                        .filter(|(id, at)| *at >= terminal && roots.contains(id))
                        .map(|(id, _)| id)
                        .collect();
                    (seen.len() == roots.len()).then(|| {
                        stream
                            .iter()
                            .filter(|(id, _)| roots.contains(id))
                            .map(|(_, at)| *at)
                            .max()
                    })
                })
                .collect::<Option<Vec<_>>>()
        };
        if let Some(lasts) = done {
            let first = {
                let a = arrivals.lock().unwrap_or_else(|e| e.into_inner());
                a[..STREAMS]
                    .iter()
                    .flatten()
                    .filter(|(id, at)| *at >= terminal && roots.contains(id))
                    .map(|(_, at)| *at)
                    .min()
            };
            let last = lasts.into_iter().flatten().max().ok_or("no release")?;
            break (first.unwrap_or(last), last);
        }
        if Instant::now() > deadline {
            return Err("held idles were not all released within 60 s".into());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let cpu_after = cpu();
    let peak_rss = peak_rss_mib(gate.pid());
    // Per tree: when the runtime itself sent the child's idle (the tree turned terminal),
    // and the last release of the root's held idles after it.
    let (runtime_last_ms, tree_lag_ms, tree_lag_median_ms) = {
        let a = arrivals.lock().unwrap_or_else(|e| e.into_inner());
        let ms = |t: Instant| {
            if t >= terminal {
                t.duration_since(terminal).as_secs_f64() * 1000.0
            } else {
                -(terminal.duration_since(t).as_secs_f64() * 1000.0)
            }
        };
        let mut runtime_last = f64::MIN;
        let mut lags = Vec::new();
        for (root, child) in roots_list.iter().zip(&children) {
            let idle = a[STREAMS]
                .iter()
                .filter(|(id, _)| id == child)
                .map(|(_, at)| *at)
                .max();
            let released = a[..STREAMS]
                .iter()
                .flatten()
                .filter(|(id, at)| id == root && *at >= terminal)
                .map(|(_, at)| *at)
                .max();
            if let (Some(idle), Some(released)) = (idle, released) {
                runtime_last = runtime_last.max(ms(idle));
                lags.push(ms(released) - ms(idle));
            }
        }
        let longest = lags.iter().copied().fold(0.0, f64::max);
        (runtime_last, longest, median(lags))
    };
    for reader in readers {
        reader.abort();
    }
    Ok(Round {
        held,
        peak_rss,
        reads_per_s,
        lag_ms: last.duration_since(terminal).as_secs_f64() * 1000.0,
        kinds,
        first_ms: first.duration_since(terminal).as_secs_f64() * 1000.0,
        runtime_last_ms,
        tree_lag_ms,
        tree_lag_median_ms,
        cpu: [0, 1, 2].map(|i| cpu_after[i] - cpu_before[i]),
        steady_reads: reads_in_window,
    })
}

async fn metrics(http: &Http, gate_url: &str) -> Result<String, Error> {
    let req = Request::get(format!("{gate_url}/_taskgate/metrics")).body(Full::default())?;
    let text = http
        .request(req)
        .await?
        .into_body()
        .collect()
        .await?
        .to_bytes();
    Ok(String::from_utf8_lossy(&text).into_owned())
}

/// Polls taskgate's hold gauge until it reaches [`HOLDS`] (or stops growing for 3 s).
async fn wait_for_holds(http: &Http, gate_url: &str) -> Result<u64, Error> {
    let deadline = Instant::now() + Duration::from_secs(60);
    let (mut last, mut since) = (0, Instant::now());
    loop {
        let held = metrics(http, gate_url)
            .await?
            .lines()
            .find_map(|l| l.strip_prefix("taskgate_holds_open{face=\"client\"} "))
            .and_then(|v| v.trim().parse::<u64>().ok())
            // The gauge is listed from the first hold on; before it, nothing is held yet.
            .unwrap_or(0);
        if held >= HOLDS {
            return Ok(held);
        }
        if held != last {
            (last, since) = (held, Instant::now());
        } else if held > 0 && since.elapsed() > Duration::from_secs(3) {
            return Ok(held);
        }
        if Instant::now() > deadline {
            return Err(format!("only {held} claims held after 60 s").into());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A pass-through to `sim` that counts the requests it forwards.
type Routes = Arc<Mutex<BTreeMap<String, u64>>>;

/// `/session/ses_…/message?limit=20` → `/session/:id/message`.
fn route(path: &str) -> String {
    let path = path.split('?').next().unwrap_or(path);
    path.split('/')
        .map(|s| {
            if s.starts_with("ses_") || s.starts_with("msg_") {
                ":id"
            } else {
                s
            }
        })
        .collect::<Vec<_>>()
        .join("/")
}

async fn counting_proxy(
    sim: SocketAddr,
    count: Arc<AtomicU64>,
    routes: Routes,
) -> Result<SocketAddr, Error> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let client: Client<HttpConnector, Incoming> =
        Client::builder(TokioExecutor::new()).build_http();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let _ = stream.set_nodelay(true);
            let (client, count, routes) = (client.clone(), count.clone(), routes.clone());
            tokio::spawn(async move {
                let service = service_fn(move |mut req: Request<Incoming>| {
                    let client = client.clone();
                    count.fetch_add(1, Ordering::SeqCst);
                    *routes
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .entry(route(req.uri().path()))
                        .or_default() += 1;
                    async move {
                        let path = req.uri().path_and_query().map_or("/", |p| p.as_str());
                        let uri = format!("http://{sim}{path}");
                        *req.uri_mut() = match uri.parse() {
                            Ok(uri) => uri,
                            Err(_) => return Ok::<_, Infallible>(bad_gateway()),
                        };
                        Ok(match client.request(req).await {
                            Ok(r) => r.map(|b| b.map_err(Error::from).boxed_unsync()),
                            Err(_) => bad_gateway(),
                        })
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    Ok(addr)
}

type Boxed = http_body_util::combinators::UnsyncBoxBody<Bytes, Error>;

fn bad_gateway() -> Response<Boxed> {
    let mut r = Response::new(Full::new(Bytes::new()).map_err(Error::from).boxed_unsync());
    *r.status_mut() = hyper::StatusCode::BAD_GATEWAY;
    r
}
