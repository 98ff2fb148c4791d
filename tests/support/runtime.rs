//! Harness for tests against the real OpenCode runtime (`opencode-ai` from npm).
//!
//! - [`runtime_or_skip`] finds or installs the runtime at [`runtime_version`] into a cache folder
//!   (never into the repository) with the pinned `tests/runtime/package.json` + lock file. When npm
//!   or the binary is unavailable a test skips with a printed reason, except under `CI=true`, where
//!   that is a failure: CI must prove the fix against the real runtime.
//! - [`Runtime::start`] runs `opencode serve` on a free loopback port with its own HOME, XDG dirs and
//!   project directory whose `opencode.json` points every model at the scripted provider.
//! - [`Runtime::run`] runs `opencode run --attach URL PROMPT` and captures what a user would see.
//!
//! Every process is started in its own process group and the whole group is killed on drop, so a
//! failing test leaves nothing behind.
//!
//! Environment:
//! - `TASKGATE_OPENCODE_VERSION`: the `opencode-ai` version to test (default [`PINNED_VERSION`]).
//! - `TASKGATE_RUNTIME_CACHE`: the cache folder (default `<target dir>/opencode-runtime`).
//! - `TASKGATE_OPENCODE_BIN`: use this binary instead of installing one.
//! - `TASKGATE_RUNTIME_LOGS`: start the runtime with `--print-logs` (shown in failure messages).
//! - `CI=true`: a missing runtime fails the test instead of skipping it.

#![allow(dead_code)] // Each test binary uses a different part of the support code.

use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use base64::Engine;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::StatusCode;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};
use tokio::process::{Child, Command};

/// The runtime version the suite is pinned to (`tests/runtime/package.json`).
pub const PINNED_VERSION: &str = "1.18.33";
/// How long a fresh runtime may take to answer `/global/health` (it may install a plugin first).
pub const START_DEADLINE: Duration = Duration::from_secs(120);
/// Upper bound for one `opencode run`; generous, the scenarios take seconds.
pub const RUN_DEADLINE: Duration = Duration::from_secs(180);

/// The `opencode-ai` version under test.
pub fn runtime_version() -> String {
    std::env::var("TASKGATE_OPENCODE_VERSION")
        .ok()
        .filter(|v| !v.trim().is_empty())
        .unwrap_or_else(|| PINNED_VERSION.to_string())
}

/// The oldest verified release that reports a failed background child as `state="error"`;
/// 1.15.0 through 1.18.3 inject `state="completed"` with an empty result instead (see
/// docs/compatibility.md).
pub const FAILURE_REPORTED_SINCE: &str = "1.18.33";

/// The oldest verified release whose in-process `opencode run` (no `--attach`) prints the final
/// answer of a plain prompt while a server shares its HOME; 1.15.0 exits without printing it.
pub const LOCAL_RUN_PRINTS_SINCE: &str = "1.17.0";

/// Whether dotted version `v` is at least `min` (numeric components; missing ones count as 0).
pub fn version_at_least(v: &str, min: &str) -> bool {
    let parse =
        |s: &str| -> Vec<u64> { s.split(['.', '-']).map_while(|p| p.parse().ok()).collect() };
    let (a, b) = (parse(v), parse(min));
    for i in 0..a.len().max(b.len()) {
        let (x, y) = (
            a.get(i).copied().unwrap_or(0),
            b.get(i).copied().unwrap_or(0),
        );
        if x != y {
            return x > y;
        }
    }
    true
}

/// Where installed runtimes live, one sub-folder per version.
pub fn cache_root() -> PathBuf {
    if let Ok(dir) = std::env::var("TASKGATE_RUNTIME_CACHE") {
        if !dir.is_empty() {
            return PathBuf::from(dir);
        }
    }
    let target = std::env::var("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|_| Path::new(env!("CARGO_MANIFEST_DIR")).join("target"));
    target.join("opencode-runtime")
}

/// An installed runtime binary.
#[derive(Debug, Clone)]
pub struct RuntimeBinary {
    pub path: PathBuf,
    pub version: String,
}

/// The runtime binary, installed at most once per test process; `None` (with a printed reason)
/// when it is unavailable outside CI. Panics under `CI=true`.
pub fn runtime_or_skip(test: &str) -> Option<RuntimeBinary> {
    static INSTALLED: OnceLock<Result<RuntimeBinary, String>> = OnceLock::new();
    match INSTALLED.get_or_init(|| install(&runtime_version())) {
        Ok(bin) => Some(bin.clone()),
        Err(reason) if std::env::var("CI").as_deref() == Ok("true") => {
            panic!("{test}: the real OpenCode runtime is required in CI (CI=true): {reason}")
        }
        Err(reason) => {
            // Written to the stderr handle, not with `eprintln!`, which the test harness captures
            // (and hides) for passing tests: a skip must be visible.
            use std::io::Write;
            let _ = writeln!(
                std::io::stderr(),
                "SKIPPED {test}: real OpenCode runtime unavailable: {reason}. \
                 Install node + npm (or set TASKGATE_OPENCODE_BIN) to run it."
            );
            None
        }
    }
}

/// Candidate binary paths inside an npm prefix, most specific first.
fn binary_candidates(prefix: &Path) -> Vec<PathBuf> {
    let os = match std::env::consts::OS {
        "macos" => "darwin",
        other => other,
    };
    let arch = match std::env::consts::ARCH {
        "x86_64" => "x64",
        "aarch64" => "arm64",
        other => other,
    };
    let nm = prefix.join("node_modules");
    vec![
        nm.join(format!("opencode-{os}-{arch}/bin/opencode")),
        nm.join(format!("opencode-{os}-{arch}-baseline/bin/opencode")),
        nm.join(format!("opencode-{os}-{arch}-musl/bin/opencode")),
        nm.join(".bin/opencode"),
    ]
}

/// The version a binary reports, if it runs at all.
fn binary_version(path: &Path) -> Option<String> {
    let out = std::process::Command::new(path)
        .arg("--version")
        .stdin(Stdio::null())
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
}

fn find_in(prefix: &Path, version: &str) -> Option<RuntimeBinary> {
    binary_candidates(prefix).into_iter().find_map(|path| {
        (path.exists() && binary_version(&path).as_deref() == Some(version)).then(|| {
            RuntimeBinary {
                path,
                version: version.to_string(),
            }
        })
    })
}

/// Finds `opencode-ai@version` in the cache or installs it there with npm.
///
/// The install goes to a private folder renamed into place at the end, so concurrent test
/// binaries never see a half-installed runtime.
pub fn install(version: &str) -> Result<RuntimeBinary, String> {
    if let Ok(bin) = std::env::var("TASKGATE_OPENCODE_BIN") {
        let path = PathBuf::from(bin);
        let found = binary_version(&path)
            .ok_or_else(|| format!("TASKGATE_OPENCODE_BIN={} does not run", path.display()))?;
        return Ok(RuntimeBinary {
            path,
            version: found,
        });
    }
    let root = cache_root();
    let dir = root.join(version);
    if let Some(bin) = find_in(&dir, version) {
        return Ok(bin);
    }
    npm_available()?;
    let partial = root.join(format!("{version}.partial-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&partial);
    std::fs::create_dir_all(&partial).map_err(|e| format!("{}: {e}", partial.display()))?;
    let pinned = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/runtime");
    if version == PINNED_VERSION {
        for f in ["package.json", "package-lock.json"] {
            std::fs::copy(pinned.join(f), partial.join(f)).map_err(|e| format!("{f}: {e}"))?;
        }
    } else {
        let pkg = json!({"name": "taskgate-test-runtime", "private": true,
                         "dependencies": {"opencode-ai": version}});
        std::fs::write(partial.join("package.json"), pkg.to_string()).map_err(|e| e.to_string())?;
    }
    npm_install(&partial, &dir, &format!("opencode-ai@{version}"))?;
    find_in(&dir, version).ok_or_else(|| {
        format!(
            "opencode-ai@{version} installed into {} but no runnable binary reports that version",
            dir.display()
        )
    })
}

fn npm_available() -> Result<(), String> {
    let npm_ok = std::process::Command::new("npm")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    if npm_ok {
        Ok(())
    } else {
        Err("npm is not on PATH".into())
    }
}

/// Runs `npm install` in `partial` (which holds a package.json and, when pinned, its lock) and
/// renames it to `dir`, so concurrent test binaries never see a half-installed package.
fn npm_install(partial: &Path, dir: &Path, what: &str) -> Result<(), String> {
    // `npm ci` cannot be used: the lock lists only the platform packages the registry had when it
    // was written, and `ci` rejects a lock missing optional dependencies. `install` with the lock
    // still pins the versions and checks integrity. Scripts are not needed: the platform package
    // carries the runtime binary itself, and the plugin's postinstall only checks versions and
    // deletes cached plugin copies under the user's own `~/.cache/opencode`, which a test must
    // not touch.
    let started = Instant::now();
    let out = std::process::Command::new("npm")
        .args(["install", "--no-audit", "--no-fund", "--ignore-scripts"])
        .current_dir(partial)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("running npm: {e}"))?;
    if !out.status.success() {
        let _ = std::fs::remove_dir_all(partial);
        return Err(format!(
            "npm install {what} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    use std::io::Write;
    let _ = writeln!(
        std::io::stderr(),
        "installed {what} into {} in {:.1?}",
        dir.display(),
        started.elapsed()
    );
    if std::fs::rename(partial, dir).is_err() {
        // Another test binary won the race; use its copy.
        let _ = std::fs::remove_dir_all(partial);
    }
    Ok(())
}

/// The `oh-my-opencode` version the plugin tests load (`tests/runtime-omo/package.json`).
pub const OMO_VERSION: &str = "4.19.4";

/// The installed `oh-my-opencode` package folder (`…/node_modules/oh-my-opencode`), installed at
/// most once per test process into `<cache>/oh-my-opencode-<version>` with the pinned
/// `tests/runtime-omo` lock; `None` (with a printed reason) when unavailable outside CI. Panics
/// under `CI=true`, like [`runtime_or_skip`].
pub fn omo_plugin_or_skip(test: &str) -> Option<PathBuf> {
    static INSTALLED: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    match INSTALLED.get_or_init(install_omo) {
        Ok(dir) => Some(dir.clone()),
        Err(reason) if std::env::var("CI").as_deref() == Ok("true") => {
            panic!("{test}: the oh-my-opencode plugin is required in CI (CI=true): {reason}")
        }
        Err(reason) => {
            use std::io::Write;
            let _ = writeln!(
                std::io::stderr(),
                "SKIPPED {test}: oh-my-opencode@{OMO_VERSION} unavailable: {reason}. \
                 Install node + npm to run it."
            );
            None
        }
    }
}

fn install_omo() -> Result<PathBuf, String> {
    install_pinned("tests/runtime-omo", "oh-my-opencode", OMO_VERSION)
}

/// The folder holding `node_modules` with the official SDK (`@opencode-ai/sdk`, pinned in
/// `tests/sdk/`) and `undici`, installed at most once per test process; `None` (with a printed
/// reason) when unavailable outside CI. Panics under `CI=true`.
pub fn sdk_or_skip(test: &str) -> Option<PathBuf> {
    static INSTALLED: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    let installed = INSTALLED.get_or_init(|| {
        install_pinned("tests/sdk", "@opencode-ai/sdk", SDK_VERSION)
            .map(|package| package.join("../../.."))
    });
    match installed {
        Ok(dir) => Some(dir.clone()),
        Err(reason) if std::env::var("CI").as_deref() == Ok("true") => {
            panic!("{test}: the OpenCode SDK is required in CI (CI=true): {reason}")
        }
        Err(reason) => {
            use std::io::Write;
            let _ = writeln!(
                std::io::stderr(),
                "SKIPPED {test}: @opencode-ai/sdk@{SDK_VERSION} unavailable: {reason}. \
                 Install node + npm to run it."
            );
            None
        }
    }
}

/// The pinned SDK version (`tests/sdk/package.json`).
pub const SDK_VERSION: &str = "1.18.33";

/// Installs the npm packages pinned in `pinned` (a folder of the repository holding
/// `package.json` and `package-lock.json`) into `<cache>/<name>-<version>`, unless already
/// there; returns the folder of `package` inside its `node_modules`.
fn install_pinned(pinned: &str, package: &str, version: &str) -> Result<PathBuf, String> {
    let root = cache_root();
    let folder = format!(
        "{}-{version}",
        package.trim_start_matches('@').replace('/', "-")
    );
    let dir = root.join(&folder);
    let package_dir = |d: &Path| d.join("node_modules").join(package);
    let installed = |d: &Path| {
        std::fs::read_to_string(package_dir(d).join("package.json"))
            .ok()
            .and_then(|s| serde_json::from_str::<Value>(&s).ok())
            .is_some_and(|v| v["version"] == version)
    };
    if installed(&dir) {
        return Ok(package_dir(&dir));
    }
    npm_available()?;
    let partial = root.join(format!("{folder}.partial-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&partial);
    std::fs::create_dir_all(&partial).map_err(|e| format!("{}: {e}", partial.display()))?;
    let pinned = Path::new(env!("CARGO_MANIFEST_DIR")).join(pinned);
    for f in ["package.json", "package-lock.json"] {
        std::fs::copy(pinned.join(f), partial.join(f)).map_err(|e| format!("{f}: {e}"))?;
    }
    npm_install(&partial, &dir, &format!("{package}@{version}"))?;
    if installed(&dir) {
        Ok(package_dir(&dir))
    } else {
        Err(format!(
            "{package}@{version} installed into {} but its package.json says otherwise",
            dir.display()
        ))
    }
}

/// Kills a whole process group; the runtime spawns helpers that must not outlive a test.
fn kill_group(pid: u32) {
    // SAFETY: plain syscall on a process group we created (process_group(0) makes pgid == pid).
    unsafe {
        libc::kill(-(pid as i32), libc::SIGKILL);
    }
}

/// The `opencode.json` every test project gets: every model is the scripted provider at
/// `provider_base_url`, nothing shared or auto-updated.
pub fn sandbox_config(provider_base_url: &str) -> Value {
    json!({
        "$schema": "https://opencode.ai/config.json",
        "share": "disabled",
        "autoupdate": false,
        "model": "mock/scripted",
        "small_model": "mock/scripted",
        "provider": {
            "mock": {
                "npm": "@ai-sdk/openai-compatible",
                "name": "Scripted mock",
                "options": {"baseURL": provider_base_url, "apiKey": "not-a-secret"},
                "models": {"scripted": {"name": "Scripted"}}
            }
        }
    })
}

/// A fresh test folder: `home/`, `tmp/` and `project/` holding `config` as its `opencode.json`.
pub fn sandbox_with(config: &Value) -> tempfile::TempDir {
    let dir = tempfile::Builder::new()
        .prefix("taskgate-real-")
        .tempdir()
        .unwrap();
    for sub in ["home", "project", "tmp"] {
        std::fs::create_dir_all(dir.path().join(sub)).unwrap();
    }
    std::fs::write(
        dir.path().join("project/opencode.json"),
        serde_json::to_string_pretty(config).unwrap(),
    )
    .unwrap();
    dir
}

/// [`sandbox_with`] the default [`sandbox_config`] (for tests that start the runtime through
/// another program, e.g. `taskgate wrap`).
pub fn sandbox_dir(provider_base_url: &str) -> tempfile::TempDir {
    sandbox_with(&sandbox_config(provider_base_url))
}

/// The folder [`Runtime::start`] runs in for `opts`: [`sandbox_config`] with the plugins and
/// extra keys of `opts`, and oh-my-opencode's `.omo/omo.json` when given (also for tests that
/// start the runtime through `taskgate wrap`).
pub fn sandbox_for(provider_base_url: &str, opts: &RuntimeOptions) -> tempfile::TempDir {
    let mut config = sandbox_config(provider_base_url);
    if !opts.plugins.is_empty() {
        config["plugin"] = json!(opts.plugins);
    }
    if let Some(Value::Object(extra)) = &opts.config {
        for (k, v) in extra {
            config[k] = v.clone();
        }
    }
    let dir = sandbox_with(&config);
    if let Some(omo) = &opts.omo_config {
        std::fs::create_dir_all(dir.path().join("project/.omo")).unwrap();
        std::fs::write(
            dir.path().join("project/.omo/omo.json"),
            serde_json::to_string_pretty(omo).unwrap(),
        )
        .unwrap();
    }

    dir
}

/// How to start a runtime.
#[derive(Debug, Clone, Default)]
pub struct RuntimeOptions {
    /// Sets `OPENCODE_SERVER_PASSWORD` (Basic auth, user `opencode`).
    pub password: Option<String>,
    /// Extra environment for the runtime.
    pub env: Vec<(String, String)>,
    /// Plugins for the project's `opencode.json` (`"plugin": [...]`), e.g. a `file:///…` URL of
    /// an installed package folder ([`omo_plugin_or_skip`]).
    pub plugins: Vec<String>,
    /// Written to the project's `.omo/omo.json`: oh-my-opencode's own config (agents and
    /// categories pointed at the scripted model; see [`omo_config`]).
    pub omo_config: Option<Value>,
    /// Top-level keys merged into the project's `opencode.json` (e.g. `subagent_depth`,
    /// `agent`), over the sandbox's own.
    pub config: Option<Value>,
}

/// An oh-my-opencode config naming the scripted model for every agent and category a plugin
/// scenario touches: the plugin otherwise falls back to hosted models, which fail offline
/// (`ProviderModelNotFoundError`). Plugin-only keys sit under `"[opencode]"`; at the top level
/// they fail its validation and the agent overrides are lost with them.
pub fn omo_config() -> Value {
    let model = json!({"model": "mock/scripted"});
    json!({
        "agents": {
            "explore": model, "librarian": model, "sisyphus-junior": model, "oracle": model
        },
        "categories": {"quick": model},
        "[opencode]": {
            "telemetry": false,
            "auto_update": false,
            "disabled_mcps": ["websearch", "context7", "grep_app"]
        }
    })
}

/// Starts taskgate's model face on `listener` for the runtime at `runtime_url`, its
/// `openai_chat` provider at `provider_url`, holding at most `max_hold` (e.g. `"60s"`); runs
/// until the returned token is cancelled.
pub fn start_model_face(
    listener: tokio::net::TcpListener,
    runtime_url: &str,
    provider_url: &str,
    max_hold: &str,
) -> tokio_util::sync::CancellationToken {
    let config = taskgate::config::Config::from_toml_str(
        "test",
        &format!(
            "[proxy]\nupstream = \"{runtime_url}\"\n[model]\nenabled = true\nopenai_chat = \"{provider_url}\"\nmax_hold = \"{max_hold}\"\n"
        ),
    )
    .unwrap();
    let shutdown = tokio_util::sync::CancellationToken::new();
    tokio::spawn(taskgate::model::run(
        listener,
        config,
        None,
        shutdown.clone(),
    ));
    shutdown
}

/// The `file://` URL a project's `opencode.json` loads an installed plugin folder by.
pub fn plugin_url(path: &Path) -> String {
    format!("file://{}", path.display())
}

/// A running `opencode serve`, killed (with its process group) on drop.
pub struct Runtime {
    pub binary: RuntimeBinary,
    url: String,
    child: Child,
    pid: u32,
    dir: tempfile::TempDir,
    password: Option<String>,
    log: Arc<Mutex<String>>,
    /// How long the runtime took from spawn to a healthy `/global/health`.
    pub startup: Duration,
}

impl Runtime {
    /// Starts the runtime with its model pointed at `provider_base_url` (ending in `/v1`) and
    /// waits until `/global/health` answers.
    pub async fn start(
        binary: &RuntimeBinary,
        provider_base_url: &str,
        opts: RuntimeOptions,
    ) -> Runtime {
        let started = Instant::now();
        let dir = sandbox_for(provider_base_url, &opts);

        let mut cmd = Command::new(&binary.path);
        cmd.args(["serve", "--port", "0", "--hostname", "127.0.0.1"]);
        if std::env::var_os("TASKGATE_RUNTIME_LOGS").is_some() {
            // The runtime's own log in `logs()`, for diagnosing a failing scenario.
            cmd.args(["--print-logs", "--log-level", "DEBUG"]);
        }
        isolate(&mut cmd, dir.path(), opts.password.as_deref());
        for (k, v) in &opts.env {
            cmd.env(k, v);
        }
        cmd.current_dir(dir.path().join("project"))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0)
            .kill_on_drop(true);
        let mut child = cmd.spawn().unwrap();
        let pid = child.id().unwrap();
        let log = Arc::new(Mutex::new(String::new()));
        let (url_tx, mut url_rx) = tokio::sync::mpsc::unbounded_channel();
        pump(child.stdout.take().unwrap(), log.clone(), Some(url_tx));
        pump(child.stderr.take().unwrap(), log.clone(), None);

        let mut rt = Runtime {
            binary: binary.clone(),
            url: String::new(),
            child,
            pid,
            dir,
            password: opts.password,
            log,
            startup: Duration::ZERO,
        };
        let deadline = Instant::now() + START_DEADLINE;
        rt.url = match tokio::time::timeout(START_DEADLINE, url_rx.recv()).await {
            Ok(Some(url)) => url,
            _ => panic!(
                "runtime printed no listening URL within {START_DEADLINE:?}; exit: {:?}\n{}",
                rt.child.try_wait(),
                rt.logs()
            ),
        };
        // A request sent the instant the port opens can hang forever: poll with a short
        // per-request timeout until one answers.
        loop {
            let auth = rt.basic_auth();
            let health = tokio::time::timeout(
                Duration::from_secs(3),
                http_get(&format!("{}/global/health", rt.url), auth.as_deref()),
            )
            .await;
            if let Ok(Ok((StatusCode::OK, _))) = health {
                break;
            }
            if Instant::now() > deadline {
                panic!(
                    "runtime at {} not healthy within {START_DEADLINE:?}: {health:?}\n{}",
                    rt.url,
                    rt.logs()
                );
            }
            if let Ok(Some(status)) = rt.child.try_wait() {
                panic!("runtime exited during start: {status}\n{}", rt.logs());
            }
            tokio::time::sleep(Duration::from_millis(100)).await; // poll interval, not a sync
        }
        rt.startup = started.elapsed();
        rt
    }

    /// Starts the runtime with oh-my-opencode (`plugin`, a `file://` URL) and `omo` as its
    /// `.omo/omo.json`, and checks the plugin is loaded: its agents are listed only once it
    /// registered them.
    pub async fn start_with_omo(
        binary: &RuntimeBinary,
        plugin: &str,
        provider_base_url: &str,
        omo: Value,
    ) -> Runtime {
        let opts = RuntimeOptions {
            env: vec![("OMO_DISABLE_POSTHOG".into(), "1".into())],
            plugins: vec![plugin.to_string()],
            omo_config: Some(omo),
            ..RuntimeOptions::default()
        };
        let rt = Runtime::start(binary, provider_base_url, opts).await;
        let agents = rt.get_json("/agent").await;
        let names: Vec<&str> = agents
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|a| a["name"].as_str())
            .collect();
        assert!(
            names.contains(&"Sisyphus-Junior") && names.contains(&"explore"),
            "oh-my-opencode is not loaded: agents {names:?}\n{}",
            rt.logs()
        );
        rt
    }

    /// Base URL, e.g. `http://127.0.0.1:4096`.
    pub fn url(&self) -> &str {
        &self.url
    }

    pub fn project_dir(&self) -> PathBuf {
        self.dir.path().join("project")
    }

    pub fn home_dir(&self) -> PathBuf {
        self.dir.path().join("home")
    }

    /// The runtime's `TMPDIR`; oh-my-opencode writes its log there (`oh-my-opencode.log`).
    pub fn tmp_dir(&self) -> PathBuf {
        self.dir.path().join("tmp")
    }

    /// Everything the runtime printed so far (for failure messages).
    pub fn logs(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    /// The `Authorization` header value the runtime expects, if a password is set.
    pub fn basic_auth(&self) -> Option<String> {
        self.password.as_ref().map(|p| basic_auth("opencode", p))
    }

    /// `GET path` on the runtime with its credentials.
    pub async fn get_json(&self, path: &str) -> Value {
        let (status, body) = http_get(&format!("{}{path}", self.url), self.basic_auth().as_deref())
            .await
            .unwrap_or_else(|e| panic!("GET {path}: {e}"));
        assert_eq!(status, StatusCode::OK, "GET {path}: {body:?}");
        serde_json::from_slice(&body).unwrap_or_else(|e| panic!("GET {path}: {e}: {body:?}"))
    }

    /// Sessions the runtime lists as not idle (`GET /session/status`).
    pub async fn busy_sessions(&self) -> Vec<String> {
        match self.get_json("/session/status").await {
            Value::Object(m) => m
                .into_iter()
                .filter(|(_, s)| s.get("type").and_then(Value::as_str) != Some("idle"))
                .map(|(id, _)| id)
                .collect(),
            other => panic!("unexpected /session/status: {other}"),
        }
    }

    /// All sessions, newest first (`GET /session`).
    pub async fn sessions(&self) -> Vec<Value> {
        match self.get_json("/session").await {
            Value::Array(a) => a,
            other => panic!("unexpected /session: {other}"),
        }
    }

    /// Sessions without a parent (`GET /session`, newest first).
    pub async fn root_sessions(&self) -> Vec<Value> {
        self.sessions()
            .await
            .into_iter()
            .filter(|s| s.get("parentID").is_none())
            .collect()
    }

    /// Direct children of `parent` (`GET /session/:id/children`).
    pub async fn children(&self, parent: &str) -> Vec<Value> {
        match self.get_json(&format!("/session/{parent}/children")).await {
            Value::Array(a) => a,
            other => panic!("unexpected children of {parent}: {other}"),
        }
    }

    /// Every text part of every assistant message of `session`, oldest first.
    pub async fn assistant_texts(&self, session: &str) -> Vec<String> {
        let msgs = self.get_json(&format!("/session/{session}/message")).await;
        msgs.as_array()
            .into_iter()
            .flatten()
            .filter(|m| m.pointer("/info/role").and_then(Value::as_str) == Some("assistant"))
            .flat_map(|m| m["parts"].as_array().cloned().unwrap_or_default())
            .filter(|p| p["type"] == "text")
            .filter_map(|p| p["text"].as_str().map(str::to_string))
            .collect()
    }

    /// Polls until `session`'s assistant texts contain `needle`, panicking after `deadline`.
    pub async fn wait_for_text(&self, session: &str, needle: &str, deadline: Duration) {
        let end = Instant::now() + deadline;
        loop {
            let texts = self.assistant_texts(session).await;
            if texts.iter().any(|t| t.contains(needle)) {
                return;
            }
            if Instant::now() > end {
                panic!("{session} never answered {needle:?} within {deadline:?}; texts: {texts:?}");
            }
            tokio::time::sleep(Duration::from_millis(100)).await; // poll interval
        }
    }

    /// The password the runtime was started with, if any.
    pub fn password(&self) -> Option<&str> {
        self.password.as_deref()
    }

    /// Polls `GET /session/status` until no session is busy, panicking after `deadline`.
    pub async fn wait_all_idle(&self, deadline: Duration) {
        let end = Instant::now() + deadline;
        loop {
            let busy = self.busy_sessions().await;
            if busy.is_empty() {
                return;
            }
            if Instant::now() > end {
                panic!("sessions still busy after {deadline:?}: {busy:?}");
            }
            tokio::time::sleep(Duration::from_millis(200)).await; // poll interval
        }
    }

    /// Runs `opencode run --attach ATTACH_URL [args…] PROMPT` from the project directory, with the
    /// same isolated HOME, and waits (at most [`RUN_DEADLINE`]) for it to exit.
    pub async fn run(&self, attach_url: &str, args: &[&str], prompt: &str) -> RunOutput {
        let mut argv = vec!["run", "--attach", attach_url];
        argv.extend_from_slice(args);
        argv.push(prompt);
        self.run_cli(&argv).await
    }

    /// Runs `opencode run [args…] PROMPT` *without* `--attach`: the CLI starts its own in-process
    /// server on the same HOME and project. Unlike `--attach`, this mode drains the event stream
    /// before exiting, so it shows what the model answered.
    pub async fn run_local(&self, args: &[&str], prompt: &str) -> RunOutput {
        let mut argv = vec!["run"];
        argv.extend_from_slice(args);
        argv.push(prompt);
        self.run_cli(&argv).await
    }

    /// Runs the runtime's CLI with `argv` from the project directory, isolated like the server.
    pub async fn run_cli(&self, argv: &[&str]) -> RunOutput {
        let mut cmd = Command::new(&self.binary.path);
        cmd.args(argv);
        isolate(&mut cmd, self.dir.path(), self.password.as_deref());
        cmd.current_dir(self.project_dir())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0)
            .kill_on_drop(true);
        let started = Instant::now();
        let child = cmd.spawn().unwrap();
        let pid = child.id().unwrap();
        let out = match tokio::time::timeout(RUN_DEADLINE, child.wait_with_output()).await {
            Ok(out) => out.unwrap(),
            Err(_) => {
                kill_group(pid);
                panic!(
                    "opencode run did not exit within {RUN_DEADLINE:?}\nruntime log:\n{}",
                    self.logs()
                );
            }
        };
        kill_group(pid);
        RunOutput {
            status: out.status,
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
            elapsed: started.elapsed(),
        }
    }
}

impl Drop for Runtime {
    fn drop(&mut self) {
        kill_group(self.pid);
    }
}

/// The environment both the server and `run` get: nothing of the developer's own OpenCode set-up
/// leaks in, and nothing the runtime writes escapes the test's folder.
pub fn isolate(cmd: &mut Command, root: &Path, password: Option<&str>) {
    let home = root.join("home");
    cmd.env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("HOME", &home)
        .env("XDG_CONFIG_HOME", home.join(".config"))
        .env("XDG_DATA_HOME", home.join(".local/share"))
        .env("XDG_STATE_HOME", home.join(".local/state"))
        .env("XDG_CACHE_HOME", home.join(".cache"))
        .env("TMPDIR", root.join("tmp"))
        // At the first project request the runtime installs `@opencode-ai/plugin` into
        // $HOME/.config/opencode with npm, in the background (about 3 s, ~25 MB). A shared npm
        // cache makes that a local copy after the first test instead of a download per test.
        .env("npm_config_cache", cache_root().join("npm-cache"))
        .env("OPENCODE_DISABLE_MODELS_FETCH", "1")
        .env("OPENCODE_DISABLE_AUTOUPDATE", "1")
        .env("OPENCODE_EXPERIMENTAL_BACKGROUND_SUBAGENTS", "true");
    // Network and registry settings of the machine (CI proxies, mirrors, CA bundles) still apply.
    for (key, value) in std::env::vars_os() {
        let k = key.to_string_lossy();
        let keep = (k.starts_with("npm_config_") && k != "npm_config_cache")
            || matches!(
                k.to_ascii_uppercase().as_str(),
                "HTTP_PROXY" | "HTTPS_PROXY" | "NO_PROXY" | "SSL_CERT_FILE" | "NODE_EXTRA_CA_CERTS"
            );
        if keep {
            cmd.env(&key, value);
        }
    }
    if let Some(p) = password {
        cmd.env("OPENCODE_SERVER_PASSWORD", p);
    }
}

/// Copies a child's output into `log`; the first `http://` URL on a "listening" line goes to `url`.
fn pump(
    reader: impl AsyncRead + Unpin + Send + 'static,
    log: Arc<Mutex<String>>,
    url: Option<tokio::sync::mpsc::UnboundedSender<String>>,
) {
    tokio::spawn(async move {
        let mut lines = BufReader::new(reader).lines();
        while let Ok(Some(line)) = lines.next_line().await {
            if let Some(tx) = &url {
                if line.contains("listening on") {
                    if let Some(u) = line.split_whitespace().find(|w| w.starts_with("http://")) {
                        let _ = tx.send(u.trim_end_matches('/').to_string());
                    }
                }
            }
            let mut l = log.lock().unwrap();
            l.push_str(&line);
            l.push('\n');
        }
    });
}

/// What `opencode run` did, as its user saw it.
#[derive(Debug)]
pub struct RunOutput {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
    pub elapsed: Duration,
}

impl RunOutput {
    /// stdout and stderr together (`run` prints the answer to stdout, its chrome to stderr).
    pub fn all(&self) -> String {
        format!("{}\n{}", self.stdout, self.stderr)
    }
}

/// `Basic base64(user:pass)`.
pub fn basic_auth(user: &str, password: &str) -> String {
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"))
    )
}

/// A plain GET over loopback, returning status and the whole body.
pub async fn http_get(
    url: &str,
    authorization: Option<&str>,
) -> Result<(StatusCode, Bytes), String> {
    let client: Client<HttpConnector, Full<Bytes>> =
        Client::builder(TokioExecutor::new()).build_http();
    let mut req = hyper::Request::get(url);
    if let Some(a) = authorization {
        req = req.header("authorization", a);
    }
    let resp = client
        .request(req.body(Full::new(Bytes::new())).unwrap())
        .await
        .map_err(|e| e.to_string())?;
    let status = resp.status();
    let body = resp
        .into_body()
        .collect()
        .await
        .map_err(|e| e.to_string())?
        .to_bytes();
    Ok((status, body))
}

/// A JSON `POST` over loopback, returning status and the whole body (e.g. a prompt to
/// `/session/:id/message`, which answers when the turn ends).
pub async fn http_post_json(
    url: &str,
    authorization: Option<&str>,
    body: &Value,
) -> Result<(StatusCode, Bytes), String> {
    let (status, _, body) = http_post_json_with_headers(url, authorization, body).await?;
    Ok((status, body))
}

/// [`http_post_json`], also returning the response headers.
pub async fn http_post_json_with_headers(
    url: &str,
    authorization: Option<&str>,
    body: &Value,
) -> Result<(StatusCode, hyper::HeaderMap, Bytes), String> {
    let client: Client<HttpConnector, Full<Bytes>> =
        Client::builder(TokioExecutor::new()).build_http();
    let mut req = hyper::Request::post(url).header("content-type", "application/json");
    if let Some(a) = authorization {
        req = req.header("authorization", a);
    }
    let resp = client
        .request(req.body(Full::new(Bytes::from(body.to_string()))).unwrap())
        .await
        .map_err(|e| e.to_string())?;
    let (parts, body) = resp.into_parts();
    let body = body.collect().await.map_err(|e| e.to_string())?.to_bytes();
    Ok((parts.status, parts.headers, body))
}

/// taskgate serving in front of a [`Runtime`] on 127.0.0.1:0, stopped on drop. For the
/// through-taskgate tests (`real_taskgate.rs`): `rt.run(gate.url(), &[], prompt)`.
pub struct Taskgate {
    url: String,
    shutdown: tokio_util::sync::CancellationToken,
    task: Option<tokio::task::JoinHandle<Result<(), taskgate::proxy::ServeError>>>,
}

impl Taskgate {
    /// Starts `taskgate::cmd::stack::run` with the defaults, upstream = `rt`, and the runtime's
    /// password as taskgate's own upstream credentials; `tweak` adjusts the config first.
    pub async fn start(
        rt: &Runtime,
        tweak: impl FnOnce(&mut taskgate::config::Config),
    ) -> Taskgate {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let mut config = taskgate::config::Config::defaults();
        config.proxy.listen = addr;
        config.proxy.upstream = rt.url().to_string();
        config.upstream_auth.password = rt.password.clone();
        tweak(&mut config);
        let shutdown = tokio_util::sync::CancellationToken::new();
        let task = tokio::spawn(taskgate::cmd::stack::run(
            listener,
            config,
            shutdown.clone(),
        ));
        Taskgate {
            url: format!("http://{addr}"),
            shutdown,
            task: Some(task),
        }
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    /// What taskgate holds right now (`GET /_taskgate/holds`), one JSON object per hold.
    pub async fn holds(&self) -> Vec<Value> {
        let (status, body) = http_get(&format!("{}/_taskgate/holds", self.url), None)
            .await
            .unwrap_or_else(|e| panic!("GET /_taskgate/holds: {e}"));
        assert_eq!(status, StatusCode::OK, "GET /_taskgate/holds: {body:?}");
        let v: Value = serde_json::from_slice(&body).unwrap();
        v["holds"].as_array().cloned().unwrap_or_default()
    }

    /// Polls `/_taskgate/holds` until `pred` holds for the list, panicking after `deadline`.
    pub async fn wait_for_holds(
        &self,
        what: &str,
        deadline: Duration,
        pred: impl Fn(&[Value]) -> bool,
    ) {
        let end = Instant::now() + deadline;
        loop {
            let holds = self.holds().await;
            if pred(&holds) {
                return;
            }
            if Instant::now() > end {
                panic!("taskgate never held {what} within {deadline:?}; holds: {holds:?}");
            }
            tokio::time::sleep(Duration::from_millis(50)).await; // poll interval
        }
    }

    /// Stops the proxy and returns how `run` ended (a panic inside it fails the test here).
    pub async fn stop(mut self) -> Result<(), taskgate::proxy::ServeError> {
        self.shutdown.cancel();
        match self.task.take() {
            Some(task) => task.await.unwrap(),
            None => Ok(()),
        }
    }
}

impl Drop for Taskgate {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// A subscriber to a server-sent event stream (`/event`, `/global/event`), for asserting what a
/// client sees: every `data:` line is parsed as JSON and kept in arrival order.
pub struct EventStream {
    events: Arc<Mutex<Vec<Value>>>,
    /// When each event arrived, in step with `events`.
    arrivals: Arc<Mutex<Vec<Instant>>>,
    arrived: Arc<tokio::sync::Notify>,
    task: tokio::task::JoinHandle<()>,
}

impl EventStream {
    /// Opens `GET url` (with `authorization`, if any) and reads it until dropped.
    pub async fn connect(url: &str, authorization: Option<&str>) -> EventStream {
        let client: Client<HttpConnector, Full<Bytes>> =
            Client::builder(TokioExecutor::new()).build_http();
        let mut req = hyper::Request::get(url).header("accept", "text/event-stream");
        if let Some(a) = authorization {
            req = req.header("authorization", a);
        }
        let resp = client
            .request(req.body(Full::new(Bytes::new())).unwrap())
            .await
            .unwrap_or_else(|e| panic!("GET {url}: {e}"));
        assert_eq!(resp.status(), StatusCode::OK, "GET {url}");
        let events = Arc::new(Mutex::new(Vec::new()));
        let arrivals = Arc::new(Mutex::new(Vec::new()));
        let arrived = Arc::new(tokio::sync::Notify::new());
        let (ev, at, notify) = (events.clone(), arrivals.clone(), arrived.clone());
        let task = tokio::spawn(async move {
            let mut body = resp.into_body();
            let mut buf = Vec::new();
            while let Some(Ok(frame)) = body.frame().await {
                let Ok(data) = frame.into_data() else {
                    continue;
                };
                buf.extend_from_slice(&data);
                while let Some(pos) = buf.iter().position(|b| *b == b'\n') {
                    let line: Vec<u8> = buf.drain(..=pos).collect();
                    let line = String::from_utf8_lossy(&line);
                    if let Some(json) = line.trim_end().strip_prefix("data:") {
                        if let Ok(v) = serde_json::from_str::<Value>(json.trim()) {
                            let mut ev = ev.lock().unwrap();
                            at.lock().unwrap().push(Instant::now());
                            ev.push(v);
                            notify.notify_waiters();
                        }
                    }
                }
            }
        });
        EventStream {
            events,
            arrivals,
            arrived,
            task,
        }
    }

    /// Every event so far, oldest first.
    pub fn events(&self) -> Vec<Value> {
        self.events.lock().unwrap().clone()
    }

    /// Every event so far with the moment it arrived, oldest first.
    pub fn timed_events(&self) -> Vec<(Instant, Value)> {
        let events = self.events.lock().unwrap();
        let arrivals = self.arrivals.lock().unwrap();
        arrivals
            .iter()
            .copied()
            .zip(events.iter().cloned())
            .collect()
    }

    /// Waits until `pred` holds for the events so far, panicking after `deadline`.
    pub async fn wait_for(&self, what: &str, deadline: Duration, pred: impl Fn(&[Value]) -> bool) {
        let end = Instant::now() + deadline;
        loop {
            let notified = self.arrived.notified();
            if pred(&self.events.lock().unwrap()) {
                return;
            }
            let left = end.saturating_duration_since(Instant::now());
            if left.is_zero() || tokio::time::timeout(left, notified).await.is_err() {
                panic!("events: timed out after {deadline:?} waiting for {what}");
            }
        }
    }
}

impl Drop for EventStream {
    fn drop(&mut self) {
        self.task.abort();
    }
}
