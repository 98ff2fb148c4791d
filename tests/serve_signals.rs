//! `taskgate serve` as a process: signals, a closed stderr, and `config check`'s one-line errors.

#[path = "support/proxy.rs"]
mod support;

use std::net::SocketAddr;
use std::process::{ExitStatus, Stdio};

use axum::body::Body;
use http::{Response, StatusCode};
use http_body_util::BodyExt;
use support::{within, Upstream};
use tokio::io::{AsyncBufReadExt, BufReader, Lines};
use tokio::process::{Child, ChildStderr, Command};
use tokio::sync::{mpsc, oneshot};

const TASKGATE: &str = env!("CARGO_BIN_EXE_taskgate");

/// A running `taskgate serve` and the lines of its stderr.
struct Serve {
    child: Child,
    /// `None` once the test closed it (the reader of a pipe went away).
    stderr: Option<Lines<BufReader<ChildStderr>>>,
    addr: SocketAddr,
}

impl Serve {
    /// Starts `taskgate serve` on a free port in front of `upstream` and waits for its
    /// "taskgate serving" line, which carries the bound address.
    async fn start(upstream: &str, env: &[(&str, &str)]) -> Serve {
        Serve::start_with(upstream, env, None, None).await
    }

    /// [`Serve::start`] with a config file and an open-file limit.
    async fn start_with(
        upstream: &str,
        env: &[(&str, &str)],
        config: Option<&std::path::Path>,
        open_files: Option<u64>,
    ) -> Serve {
        let mut command = Command::new(TASKGATE);
        command.args(["serve", "--listen", "127.0.0.1:0", "--upstream", upstream]);
        if let Some(path) = config {
            command.arg("--config").arg(path);
        }
        if let Some(limit) = open_files {
            // SAFETY: setrlimit is async-signal-safe and touches only the child's limits.
            unsafe {
                command.pre_exec(move || {
                    let rlimit = libc::rlimit {
                        rlim_cur: limit as libc::rlim_t,
                        rlim_max: limit as libc::rlim_t,
                    };
                    if libc::setrlimit(libc::RLIMIT_NOFILE, &rlimit) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        }
        command
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        for (name, value) in env {
            command.env(name, value);
        }
        let mut child = command.spawn().unwrap();
        let mut stderr = BufReader::new(child.stderr.take().unwrap()).lines();
        let line = read_until(&mut stderr, "taskgate serving").await;
        let addr = line
            .split_whitespace()
            .find_map(|word| word.strip_prefix("listen="))
            .unwrap_or_else(|| panic!("no listen= in {line:?}"))
            .parse()
            .unwrap();
        Serve {
            child,
            stderr: Some(stderr),
            addr,
        }
    }

    fn signal(&self, number: i32) {
        let pid = self.child.id().expect("still running") as i32;
        // SAFETY: kill(2) on our own child's pid has no memory-safety preconditions.
        assert_eq!(unsafe { libc::kill(pid, number) }, 0);
    }

    async fn exited(&mut self) -> ExitStatus {
        within("taskgate to exit", self.child.wait()).await.unwrap()
    }
}

/// Reads stderr lines until one contains `needle`, and returns it.
async fn read_until(lines: &mut Lines<BufReader<ChildStderr>>, needle: &str) -> String {
    within(&format!("a log line with {needle:?}"), async {
        loop {
            match lines.next_line().await.unwrap() {
                Some(line) if line.contains(needle) => return line,
                Some(_) => {}
                None => panic!("stderr closed before {needle:?}"),
            }
        }
    })
    .await
}

async fn get(addr: SocketAddr, path: &str) -> Result<(StatusCode, bytes::Bytes), String> {
    let response = within(
        "the response",
        support::client().get(format!("http://{addr}{path}").parse().unwrap()),
    )
    .await
    .map_err(|e| e.to_string())?;
    let status = response.status();
    let body = response
        .into_body()
        .collect()
        .await
        .map_err(|e| e.to_string())?
        .to_bytes();
    Ok((status, body))
}

/// An upstream that answers each request only when the test sends on the request's oneshot.
async fn holding_upstream() -> (Upstream, mpsc::UnboundedReceiver<oneshot::Sender<()>>) {
    let (tx, rx) = mpsc::unbounded_channel();
    let upstream = Upstream::start(move |_req| {
        let tx = tx.clone();
        async move {
            let (release, released) = oneshot::channel();
            tx.send(release).unwrap();
            let _ = released.await;
            Response::new(Body::from("finished"))
        }
    })
    .await;
    (upstream, rx)
}

fn refused_url() -> String {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    format!("http://{}", listener.local_addr().unwrap())
}

/// `taskgate serve 2>&1 | head -2`: once the reader left, every log line failed with EPIPE and
/// the logger panicked in whichever task logged, the signal task included, so SIGTERM was
/// ignored for good.
#[tokio::test]
async fn closed_stderr_does_not_stop_serve_from_honouring_sigterm() {
    // A refused runtime: requests log a warning, and so does the oracle's watcher.
    let mut serve = Serve::start(&refused_url(), &[]).await;
    serve.stderr = None;
    for _ in 0..3 {
        let (status, _) = get(serve.addr, "/session").await.expect("an answer");
        assert_eq!(status, StatusCode::BAD_GATEWAY);
    }
    serve.signal(libc::SIGTERM);
    let status = serve.exited().await;
    assert!(status.success(), "{status:?}");
}

/// SIGHUP (the terminal went away, or a supervisor's stop) killed `serve` on the spot, cutting
/// in-flight requests; it is a graceful stop, as in `taskgate wrap`.
#[tokio::test]
async fn sighup_drains_in_flight_requests_and_exits_zero() {
    let (upstream, mut held) = holding_upstream().await;
    let mut serve = Serve::start(&upstream.url(), &[("TASKGATE_GATE", "false")]).await;
    let addr = serve.addr;
    let request = tokio::spawn(async move { get(addr, "/slow").await });
    let release = within("the request upstream", held.recv()).await.unwrap();
    serve.signal(libc::SIGHUP);
    read_until(serve.stderr.as_mut().unwrap(), "shutdown signal received").await;
    release.send(()).unwrap();
    let (status, body) = within("the drained response", request)
        .await
        .unwrap()
        .expect("the in-flight request finishes");
    assert_eq!(status, StatusCode::OK);
    assert_eq!(&body[..], b"finished");
    let status = serve.exited().await;
    assert_eq!(status.code(), Some(0), "{status:?}");
}

/// With an hour of shutdown grace and a request that never ends, a second Ctrl-C used to be
/// ignored: the operator had to wait out the grace or kill -9.
#[tokio::test]
async fn a_second_signal_forces_the_exit() {
    let (upstream, mut held) = holding_upstream().await;
    let mut serve = Serve::start(
        &upstream.url(),
        &[
            ("TASKGATE_GATE", "false"),
            ("TASKGATE_SHUTDOWN_GRACE", "1h"),
        ],
    )
    .await;
    let addr = serve.addr;
    let _request = tokio::spawn(async move { get(addr, "/forever").await });
    let _release = within("the request upstream", held.recv()).await.unwrap();
    serve.signal(libc::SIGINT);
    read_until(serve.stderr.as_mut().unwrap(), "shutdown signal received").await;
    serve.signal(libc::SIGINT);
    let status = serve.exited().await;
    assert_eq!(status.code(), Some(128 + libc::SIGINT), "{status:?}");
}

/// `config check` on a file whose duration overflows a clock reading: one line naming the key.
#[tokio::test]
async fn config_check_rejects_an_absurd_duration_in_one_line() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("proxy.toml");
    std::fs::write(&path, "[gate]\nmax_hold = \"300000000000y\"\n").unwrap();
    let out = Command::new(TASKGATE)
        .args(["config", "check", "--config"])
        .arg(&path)
        .output()
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(
        stderr.starts_with("taskgate: config: gate.max_hold: "),
        "{stderr}"
    );
}

/// `OPENCODE_SERVER_PASSWORD=123456` stopped taskgate with an error quoting the password.
#[tokio::test]
async fn config_check_accepts_an_all_digit_password_and_never_prints_it() {
    let out = Command::new(TASKGATE)
        .args(["config", "check"])
        .env("OPENCODE_SERVER_PASSWORD", "4815162342")
        .output()
        .await
        .unwrap();
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(out.status.success(), "{stderr}");
    assert!(!stdout.contains("4815162342") && !stderr.contains("4815162342"));
    assert!(stdout.contains("password = \"<redacted>\""), "{stdout}");
}

/// Under a low open-file limit, 90 silent connections used up the descriptors: every client,
/// `/_taskgate/health` included, was locked out for good and "accept failed" was logged 20
/// times a second. Now the cap keeps descriptors in hand, slow clients are cut by the header
/// timeout, and health answers once its turn comes.
#[tokio::test]
async fn low_descriptor_limit_neither_locks_out_health_nor_floods_the_log() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("proxy.toml");
    std::fs::write(
        &path,
        "[proxy]\nheader_read_timeout = \"500ms\"\nidle_timeout = \"500ms\"\n[gate]\nenabled = false\n",
    )
    .unwrap();
    let mut serve = Serve::start_with(&refused_url(), &[], Some(&path), Some(100)).await;
    let mut silent = Vec::new();
    for _ in 0..90 {
        silent.push(tokio::net::TcpStream::connect(serve.addr).await.unwrap());
    }
    let (status, body) = get(serve.addr, "/_taskgate/health")
        .await
        .expect("health answers");
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body:?}");
    drop(silent);
    serve.signal(libc::SIGTERM);
    let lines = serve.stderr.as_mut().unwrap();
    // One deadline for the whole rest: taskgate logs every few seconds while the runtime
    // cannot be reached, so a deadline per line would never run out if it did not stop.
    let log = within("the rest of the log", async {
        let mut log = Vec::new();
        while let Some(line) = lines.next_line().await.unwrap() {
            log.push(line);
        }
        log
    })
    .await;
    assert!(serve.exited().await.success());
    let failures = log.iter().filter(|l| l.contains("accept failed")).count();
    assert!(
        failures <= 1,
        "{failures} accept failures logged:\n{}",
        log.join("\n")
    );
    assert!(
        log.iter().any(|l| l.contains("max_connections lowered")),
        "{}",
        log.join("\n")
    );
}
