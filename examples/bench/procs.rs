//! The processes under test (the upstream, taskgate, nginx), and what /proc says about them.

use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, TcpListener};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::Error;

/// A child process, stopped with SIGTERM (then SIGKILL) when dropped.
pub struct Proc {
    child: Child,
    pub addr: SocketAddr,
    _dir: Option<TempDir>,
}

impl Proc {
    /// This benchmark's own upstream, `bench upstream`.
    pub fn upstream() -> Result<Proc, Error> {
        let mut child = Command::new(std::env::current_exe()?)
            .args(["upstream", "--listen", "127.0.0.1:0"])
            .stdout(Stdio::piped())
            .spawn()?;
        let addr = announced(&mut child, "listening on ")?;
        Ok(Proc {
            child,
            addr,
            _dir: None,
        })
    }

    /// `taskgate sim --time-scale SCALE`.
    pub fn sim(taskgate: &Path, scale: f64) -> Result<Proc, Error> {
        let mut child = Command::new(taskgate)
            .args(["sim", "--listen", "127.0.0.1:0", "--time-scale"])
            .arg(scale.to_string())
            .env("TASKGATE_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()?;
        let addr = announced(&mut child, "taskgate sim listening on http://")?;
        Ok(Proc {
            child,
            addr,
            _dir: None,
        })
    }

    /// `taskgate serve` in front of `upstream`, with the default configuration (gate on, log
    /// level info, to a file: what a user runs).
    pub fn taskgate(taskgate: &Path, upstream: SocketAddr, name: &str) -> Result<Proc, Error> {
        let dir = TempDir::new(&format!("taskgate-{name}"))?;
        let addr = free_port()?;
        let log = std::fs::File::create(dir.0.join("taskgate.log"))?;
        let child = Command::new(taskgate)
            .args(["serve", "--listen", &addr.to_string(), "--upstream"])
            .arg(format!("http://{upstream}"))
            .current_dir(&dir.0)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()?;
        let proc = Proc {
            child,
            addr,
            _dir: Some(dir),
        };
        wait_for_port(addr)?;
        Ok(proc)
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// taskgate's whole log so far.
    pub fn log(&self) -> String {
        self._dir
            .as_ref()
            .and_then(|d| std::fs::read_to_string(d.0.join("taskgate.log")).ok())
            .unwrap_or_default()
    }

    /// The last lines of taskgate's log.
    pub fn log_tail(&self) -> String {
        self._dir
            .as_ref()
            .map(|d| tail(&d.0.join("taskgate.log")))
            .unwrap_or_default()
    }
}

fn tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(20)..].join("\n")
}

impl Drop for Proc {
    fn drop(&mut self) {
        stop(&mut self.child);
    }
}

fn stop(child: &mut Child) {
    // SAFETY: kill(2) on our own child's pid.
    unsafe {
        libc::kill(child.id() as libc::pid_t, libc::SIGTERM);
    }
    let end = Instant::now() + Duration::from_secs(5);
    while Instant::now() < end {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// The address a child prints on its first stdout line after `prefix`.
fn announced(child: &mut Child, prefix: &str) -> Result<SocketAddr, Error> {
    let stdout = child.stdout.take().ok_or("no stdout")?;
    let mut lines = BufReader::new(stdout).lines();
    for line in lines.by_ref() {
        let line = line?;
        if let Some(rest) = line.strip_prefix(prefix) {
            let addr = rest.trim().parse()?;
            // Keep draining stdout so the child never blocks on a full pipe.
            std::thread::spawn(move || lines.for_each(drop));
            return Ok(addr);
        }
    }
    Err(format!("the child never said {prefix:?}").into())
}

fn free_port() -> Result<SocketAddr, Error> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?)
}

fn wait_for_port(addr: SocketAddr) -> Result<(), Error> {
    let end = Instant::now() + Duration::from_secs(20);
    while Instant::now() < end {
        if std::net::TcpStream::connect(addr).is_ok() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Err(format!("nothing listens on {addr}").into())
}

/// A scratch directory, removed when dropped.
pub struct TempDir(pub std::path::PathBuf);

impl TempDir {
    pub fn new(name: &str) -> Result<TempDir, Error> {
        let dir = std::env::temp_dir().join(format!("bench-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        Ok(TempDir(dir))
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// nginx as the issue configures it: one worker, `proxy_pass` with keep-alive connections to the
/// upstream, no response or request buffering; its own prefix, config and pid file.
pub struct Nginx {
    child: Child,
    pub addr: SocketAddr,
    _dir: TempDir,
}

impl Nginx {
    pub fn start(upstream: SocketAddr) -> Result<Nginx, Error> {
        let dir = TempDir::new("nginx")?;
        let addr = free_port()?;
        let d = dir.0.display();
        let conf = format!(
            r#"worker_processes 1;
daemon off;
pid {d}/nginx.pid;
error_log {d}/error.log warn;
worker_rlimit_nofile 16384;
events {{ worker_connections 8192; }}
http {{
    access_log off;
    # nginx closes a keep-alive connection after 1,000 requests by default; taskgate does not.
    keepalive_requests 10000000;
    client_body_temp_path {d}/client_body;
    proxy_temp_path {d}/proxy;
    fastcgi_temp_path {d}/fastcgi;
    uwsgi_temp_path {d}/uwsgi;
    scgi_temp_path {d}/scgi;
    upstream up {{
        server {upstream};
        keepalive 64;
        keepalive_requests 10000000;
    }}
    server {{
        listen {addr};
        location / {{
            proxy_pass http://up;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_buffering off;
            proxy_request_buffering off;
            client_max_body_size 0;
            proxy_read_timeout 1h;
        }}
    }}
}}
"#
        );
        let path = dir.0.join("nginx.conf");
        std::fs::write(&path, conf)?;
        let child = Command::new("nginx")
            .arg("-p")
            .arg(&dir.0)
            .arg("-c")
            .arg(&path)
            .arg("-e")
            .arg(dir.0.join("error.log"))
            .stdout(Stdio::null())
            .spawn()
            .map_err(|e| format!("cannot run nginx (apt-get install nginx): {e}"))?;
        let nginx = Nginx {
            child,
            addr,
            _dir: dir,
        };
        wait_for_port(addr)?;
        Ok(nginx)
    }

    pub fn log_tail(&self) -> String {
        tail(&self._dir.0.join("error.log"))
    }

    /// The master and its worker.
    pub fn pids(&self) -> Vec<u32> {
        let master = self.child.id();
        let children = std::fs::read_to_string(format!("/proc/{master}/task/{master}/children"))
            .unwrap_or_default();
        std::iter::once(master)
            .chain(children.split_whitespace().filter_map(|p| p.parse().ok()))
            .collect()
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        stop(&mut self.child);
    }
}

fn status_kib(pid: u32, field: &str) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(f64::NAN)
}

/// Resident memory of these processes together, MiB.
pub fn rss_mib(pids: &[u32]) -> f64 {
    pids.iter().map(|p| status_kib(*p, "VmRSS:")).sum::<f64>() / 1024.0
}

/// Peak resident memory of one process, MiB.
pub fn peak_rss_mib(pid: u32) -> f64 {
    status_kib(pid, "VmHWM:") / 1024.0
}

/// User + system CPU time of these processes so far, seconds.
pub fn cpu_seconds(pids: &[u32]) -> f64 {
    // SAFETY: sysconf has no preconditions.
    let tick = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    pids.iter()
        .map(|pid| {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            // Fields after the command name, which is in parentheses and may hold spaces.
            let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
            let f: Vec<&str> = rest.split_whitespace().collect();
            let field = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
            // utime and stime are fields 14 and 15 of the whole line: 11 and 12 after ')'.
            (field(11) + field(12)) / tick
        })
        .sum()
}

/// The machine, for the record.
pub fn machine() -> String {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .map(|m| m.trim_start_matches([' ', '\t', ':']).to_owned())
        .unwrap_or_else(|| "unknown CPU".to_owned());
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    format!("machine: {cpus} CPUs, {model}\n{}", load())
}

/// The load average now (other work on the machine skews absolute figures, not ratios).
pub fn load() -> String {
    let avg = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let now = std::process::Command::new("date")
        .args(["-u", "+%H:%M:%S"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default();
    format!(
        "load average (1, 5, 15 min) at {now} UTC: {}",
        avg.split_whitespace().take(3).collect::<Vec<_>>().join(" ")
    )
}
