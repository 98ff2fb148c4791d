//! `taskgate serve` with the model face on, as a process, on ports it picks itself.
//!
//! Both faces listen on port 0 and the test reads the model face's bound address from its
//! "model face serving" line. A port a test picked, freed and handed over could be taken by
//! another socket before taskgate binds it; taskgate would then exit and the test would wait
//! for a listener that never comes.

use std::net::SocketAddr;
use std::process::Stdio;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

/// Bound on the start (a hang, not a timing margin).
const START_PATIENCE: Duration = Duration::from_secs(20);

/// The proxy and certificate variables a user's shell may carry; each test sets its own.
const EGRESS_VARS: [&str; 10] = [
    "HTTP_PROXY",
    "HTTPS_PROXY",
    "ALL_PROXY",
    "NO_PROXY",
    "http_proxy",
    "https_proxy",
    "all_proxy",
    "no_proxy",
    "SSL_CERT_FILE",
    "SSL_CERT_DIR",
];

/// A running `taskgate serve` and where its model face listens.
pub struct ModelServe {
    pub child: Child,
    pub face: SocketAddr,
}

/// Starts `taskgate serve` with the gate off and the model face on, its OpenAI-chat provider
/// `provider`, with `env` (and none of [`EGRESS_VARS`] of the test's own environment), and
/// waits until the model face listens. Panics with what taskgate printed if it exits first.
pub async fn serve_model_face(provider: &str, env: &[(&str, &str)]) -> ModelServe {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("proxy.toml");
    std::fs::write(
        &path,
        format!(
            "[proxy]\nlisten = \"127.0.0.1:0\"\nshutdown_grace = \"2s\"\n[gate]\nenabled = false\n[model]\nenabled = true\nlisten = \"127.0.0.1:0\"\nopenai_chat = \"{provider}\"\n"
        ),
    )
    .unwrap();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_taskgate"));
    cmd.arg("serve").arg("--config").arg(&path);
    for var in EGRESS_VARS {
        cmd.env_remove(var);
    }
    let mut child = cmd
        .envs(env.iter().copied())
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let mut printed = Vec::new();
    let started = tokio::time::timeout(START_PATIENCE, async {
        while let Ok(Some(line)) = lines.next_line().await {
            if line.contains("model face serving") {
                let addr = line
                    .split_whitespace()
                    .find_map(|word| word.strip_prefix("listen="))
                    .unwrap_or_else(|| panic!("no listen= in {line:?}"));
                return addr.parse::<SocketAddr>().unwrap();
            }
            printed.push(line);
        }
        panic!("taskgate serve ended before its model face listened: {printed:#?}");
    })
    .await;
    let Ok(face) = started else {
        panic!("no model face within {START_PATIENCE:?}; taskgate printed {printed:#?}");
    };
    // The rest of stderr is read and dropped, so taskgate never blocks on a full pipe.
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    // The file is read at start; the folder may go.
    drop(dir);
    ModelServe { child, face }
}
