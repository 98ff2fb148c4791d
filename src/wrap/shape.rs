//! What the wrapped command line asks for: which runtime binary, and which of the three shapes
//! (`serve`, `run`, the TUI). Pure: no I/O, so every rule is unit-tested.
//!
//! The runtime binary is "whatever `COMMAND` names": the prefix before the opencode subcommand.
//! That is one word (`opencode`, `./bin/opencode`), or a package runner and its package
//! (`npx opencode-ai`, `bunx opencode-ai@1.18.33`, `pnpm dlx opencode-ai`), so the same prefix
//! starts both the private runtime and the client.

use std::path::PathBuf;

/// The proxy's address when `serve` is given no `--port`/`--hostname`: the runtime's own default,
/// so clients keep the URL they already use.
pub const DEFAULT_SERVE_HOST: &str = "127.0.0.1";
pub const DEFAULT_SERVE_PORT: u16 = 4096;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ShapeError {
    #[error("no command given; try `taskgate wrap -- opencode run \"…\"`")]
    Empty,
    #[error("{flag} needs a value")]
    MissingValue { flag: String },
    #[error("{flag}: {value:?} is not a port number")]
    BadPort { flag: String, value: String },
    #[error("`{subcommand}` is not something taskgate can sit in front of; wrap `serve`, `run` or the TUI (no subcommand)")]
    Unsupported { subcommand: String },
    #[error("`run --attach` already talks to a server; point it at `taskgate serve` instead of wrapping it")]
    AlreadyAttached,
}

/// The wrapped command, split into the runtime's prefix and its shape.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    /// The words that start the runtime binary (`["opencode"]`, `["npx", "opencode-ai"]`).
    pub prefix: Vec<String>,
    pub shape: Shape,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Shape {
    /// `opencode serve [--port N] [--hostname H] [flags]`: the proxy takes `H:N`.
    Serve {
        host: String,
        port: u16,
        /// Every other flag, for the private runtime.
        runtime_args: Vec<String>,
    },
    /// `opencode run [ARGS…]`.
    Run {
        /// `run --port N`: the port of the runtime `run` would have started itself.
        runtime_port: Option<u16>,
        /// `run --dir D`: the runtime starts there, and `run` is given it as an absolute path.
        dir: Option<PathBuf>,
        /// `run --session S`: the session the run continues (for `--strict`).
        session: Option<String>,
        /// Everything after `run` but `--port` and `--dir`, as given.
        args: Vec<String>,
    },
    /// `opencode [project] [TUI args]`.
    Tui {
        /// The project positional: the runtime starts there.
        project: Option<PathBuf>,
        runtime_port: Option<u16>,
        /// Flags for the private runtime (`--print-logs`, `--log-level`, `--pure`, `--cors`).
        runtime_args: Vec<String>,
        /// Flags `opencode attach` understands (`--dir`, `--continue`, `--session`, …).
        attach_args: Vec<String>,
        /// Flags neither takes (`--model`, `--prompt`, …), reported, not silently dropped.
        ignored: Vec<String>,
    },
}

/// Subcommands of `opencode` that do not talk to a runtime taskgate could front.
const OTHER_SUBCOMMANDS: &[&str] = &[
    "completion",
    "acp",
    "mcp",
    "attach",
    "debug",
    "providers",
    "auth",
    "agent",
    "upgrade",
    "uninstall",
    "web",
    "models",
    "stats",
    "export",
    "import",
    "github",
    "pr",
    "session",
    "plugin",
    "plug",
    "db",
];

/// Splits `command` (everything after `--`) into a [`Plan`].
pub fn parse(command: &[String]) -> Result<Plan, ShapeError> {
    let split = prefix_len(command).ok_or(ShapeError::Empty)?;
    let (prefix, rest) = command.split_at(split);
    let shape = match rest.first().map(String::as_str) {
        Some("serve") => serve(&rest[1..])?,
        Some("run") => run(&rest[1..])?,
        Some(other) if OTHER_SUBCOMMANDS.contains(&other) => {
            return Err(ShapeError::Unsupported {
                subcommand: other.to_owned(),
            })
        }
        _ => tui(rest)?,
    };
    Ok(Plan {
        prefix: prefix.to_vec(),
        shape,
    })
}

/// How many words name the runtime binary: the program, and for a package runner its own
/// flags and the package.
fn prefix_len(command: &[String]) -> Option<usize> {
    let program = command.first()?;
    let name = program.rsplit('/').next().unwrap_or(program);
    let runner_words = match (name, command.get(1).map(String::as_str)) {
        ("npx" | "bunx", _) => 1,
        ("pnpm" | "yarn", Some("dlx")) | ("bun", Some("x")) => 2,
        _ => return Some(1),
    };
    // The runner's own flags (`npx -y`), then the package itself.
    let package = command
        .iter()
        .enumerate()
        .skip(runner_words)
        .find(|(_, word)| !word.starts_with('-'))
        .map_or(command.len(), |(i, _)| i + 1);
    Some(package)
}

/// One `--flag value` / `--flag=value` / boolean flag, as read from an argument list.
struct Flag<'a> {
    name: &'a str,
    /// The words the flag occupied, to pass on unchanged.
    words: Vec<String>,
    value: Option<String>,
}

/// Reads the flag at `args[i]` (which starts with `-`); `takes_value` says whether `name` takes
/// one. Returns the flag and the index after it.
fn read_flag<'a>(
    args: &'a [String],
    i: usize,
    takes_value: impl Fn(&str) -> bool,
) -> Result<(Flag<'a>, usize), ShapeError> {
    let word = &args[i];
    if let Some((name, value)) = word.split_once('=').filter(|_| word.starts_with("--")) {
        return Ok((
            Flag {
                name,
                words: vec![word.clone()],
                value: Some(value.to_owned()),
            },
            i + 1,
        ));
    }
    if takes_value(word) {
        let value = args
            .get(i + 1)
            .ok_or_else(|| ShapeError::MissingValue { flag: word.clone() })?;
        return Ok((
            Flag {
                name: word,
                words: vec![word.clone(), value.clone()],
                value: Some(value.clone()),
            },
            i + 2,
        ));
    }
    Ok((
        Flag {
            name: word,
            words: vec![word.clone()],
            value: None,
        },
        i + 1,
    ))
}

fn port(flag: &Flag<'_>) -> Result<u16, ShapeError> {
    let value = flag.value.clone().ok_or_else(|| ShapeError::MissingValue {
        flag: flag.name.to_owned(),
    })?;
    value.parse().map_err(|_| ShapeError::BadPort {
        flag: flag.name.to_owned(),
        value,
    })
}

fn serve(args: &[String]) -> Result<Shape, ShapeError> {
    let takes_value = |f: &str| {
        matches!(
            f,
            "--port" | "--hostname" | "--log-level" | "--mdns-domain" | "--cors"
        )
    };
    let (mut host, mut port_number) = (DEFAULT_SERVE_HOST.to_owned(), DEFAULT_SERVE_PORT);
    let mut runtime_args = Vec::new();
    let mut i = 0;
    while i < args.len() {
        if !args[i].starts_with('-') {
            runtime_args.push(args[i].clone());
            i += 1;
            continue;
        }
        let (flag, next) = read_flag(args, i, takes_value)?;
        match flag.name {
            "--port" => port_number = port(&flag)?,
            "--hostname" => {
                host = flag.value.clone().ok_or_else(|| ShapeError::MissingValue {
                    flag: "--hostname".into(),
                })?
            }
            _ => runtime_args.extend(flag.words),
        }
        i = next;
    }
    Ok(Shape::Serve {
        host,
        port: port_number,
        runtime_args,
    })
}

fn run(args: &[String]) -> Result<Shape, ShapeError> {
    // `run`'s flags that take a value, so that a value is never mistaken for a flag's name.
    let takes_value = |f: &str| {
        matches!(
            f,
            "--log-level"
                | "--command"
                | "-s"
                | "--session"
                | "-m"
                | "--model"
                | "--agent"
                | "--format"
                | "-f"
                | "--file"
                | "--title"
                | "--attach"
                | "-p"
                | "--password"
                | "-u"
                | "--username"
                | "--dir"
                | "--port"
                | "--variant"
        )
    };
    let (mut runtime_port, mut dir, mut session) = (None, None, None);
    let mut kept = Vec::new();
    let mut i = 0;
    while i < args.len() {
        if args[i] == "--" {
            // Everything after `--` is the message, whatever it looks like.
            kept.extend(args[i..].iter().cloned());
            break;
        }
        if !args[i].starts_with('-') {
            kept.push(args[i].clone());
            i += 1;
            continue;
        }
        let (flag, next) = read_flag(args, i, takes_value)?;
        match flag.name {
            "--attach" => return Err(ShapeError::AlreadyAttached),
            "--port" => runtime_port = Some(port(&flag)?),
            // Passed on by the caller as an absolute path: with `--attach` it names a
            // directory on the server, which resolves a relative one from its own cwd.
            "--dir" => dir = flag.value.clone().map(PathBuf::from),
            "-s" | "--session" => {
                session = flag.value.clone();
                kept.extend(flag.words);
            }
            _ => kept.extend(flag.words),
        }
        i = next;
    }
    Ok(Shape::Run {
        runtime_port,
        dir,
        session,
        args: kept,
    })
}

fn tui(args: &[String]) -> Result<Shape, ShapeError> {
    let takes_value = |f: &str| {
        matches!(
            f,
            "--log-level"
                | "--port"
                | "--hostname"
                | "--mdns-domain"
                | "--cors"
                | "-m"
                | "--model"
                | "-s"
                | "--session"
                | "--prompt"
                | "--agent"
                | "--replay-limit"
                | "--dir"
        )
    };
    let mut project = None;
    let mut runtime_port = None;
    let (mut runtime_args, mut attach_args, mut ignored) = (Vec::new(), Vec::new(), Vec::new());
    let mut i = 0;
    while i < args.len() {
        if !args[i].starts_with('-') {
            if project.is_none() {
                project = Some(PathBuf::from(&args[i]));
            } else {
                ignored.push(args[i].clone());
            }
            i += 1;
            continue;
        }
        let (flag, next) = read_flag(args, i, takes_value)?;
        match flag.name {
            "--port" => runtime_port = Some(port(&flag)?),
            "--print-logs" | "--log-level" | "--pure" | "--cors" => runtime_args.extend(flag.words),
            "--dir" | "-c" | "--continue" | "-s" | "--session" | "--fork" | "--mini"
            | "--no-replay" | "--replay-limit" => attach_args.extend(flag.words),
            _ => ignored.extend(flag.words),
        }
        i = next;
    }
    Ok(Shape::Tui {
        project,
        runtime_port,
        runtime_args,
        attach_args,
        ignored,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn words(s: &str) -> Vec<String> {
        s.split_whitespace().map(String::from).collect()
    }

    fn plan(s: &str) -> Plan {
        parse(&words(s)).unwrap()
    }

    #[test]
    fn serve_takes_the_address_the_user_gave_the_runtime() {
        let p = plan("opencode serve --port 5000 --hostname=0.0.0.0 --cors http://x --print-logs");
        assert_eq!(p.prefix, ["opencode"]);
        assert_eq!(
            p.shape,
            Shape::Serve {
                host: "0.0.0.0".into(),
                port: 5000,
                runtime_args: words("--cors http://x --print-logs"),
            }
        );
        let p = plan("/opt/oc/bin/opencode serve");
        assert_eq!(p.prefix, ["/opt/oc/bin/opencode"]);
        assert_eq!(
            p.shape,
            Shape::Serve {
                host: "127.0.0.1".into(),
                port: 4096,
                runtime_args: vec![],
            }
        );
    }

    #[test]
    fn run_keeps_its_flags_but_port_and_remembers_dir_and_session() {
        let p = plan("opencode run --format json --port 7000 --dir /p -s ses_1 hello world");
        assert_eq!(
            p.shape,
            Shape::Run {
                runtime_port: Some(7000),
                dir: Some(PathBuf::from("/p")),
                session: Some("ses_1".into()),
                args: words("--format json -s ses_1 hello world"),
            }
        );
        let p = plan("opencode run --model a/b -- --port 1 is text");
        assert!(
            matches!(p.shape, Shape::Run { runtime_port: None, ref args, .. } if args == &words("--model a/b -- --port 1 is text"))
        );
        // A flag's value that looks like a subcommand is not one.
        let p = plan("opencode run --title serve do it");
        assert!(
            matches!(p.shape, Shape::Run { ref args, .. } if args == &words("--title serve do it"))
        );
    }

    #[test]
    fn run_with_attach_is_refused() {
        assert_eq!(
            parse(&words("opencode run --attach http://x hi")),
            Err(ShapeError::AlreadyAttached)
        );
    }

    #[test]
    fn package_runners_are_part_of_the_prefix() {
        assert_eq!(
            plan("npx opencode-ai run hi").prefix,
            ["npx", "opencode-ai"]
        );
        assert_eq!(
            plan("npx -y opencode-ai@1.18.33 serve").prefix,
            ["npx", "-y", "opencode-ai@1.18.33"]
        );
        assert_eq!(
            plan("pnpm dlx opencode-ai").prefix,
            ["pnpm", "dlx", "opencode-ai"]
        );
        assert!(matches!(plan("bunx opencode-ai").shape, Shape::Tui { .. }));
    }

    #[test]
    fn tui_splits_its_flags_between_runtime_and_attach() {
        let p = plan("opencode ./proj --continue --print-logs --model a/b --port 9000 -s ses_2");
        assert_eq!(
            p.shape,
            Shape::Tui {
                project: Some(PathBuf::from("./proj")),
                runtime_port: Some(9000),
                runtime_args: words("--print-logs"),
                attach_args: words("--continue -s ses_2"),
                ignored: words("--model a/b"),
            }
        );
        assert!(matches!(
            plan("opencode").shape,
            Shape::Tui { project: None, .. }
        ));
    }

    #[test]
    fn errors_say_what_is_wrong() {
        assert_eq!(parse(&[]), Err(ShapeError::Empty));
        assert!(matches!(
            parse(&words("opencode models")),
            Err(ShapeError::Unsupported { .. })
        ));
        assert!(matches!(
            parse(&words("opencode serve --port lots")),
            Err(ShapeError::BadPort { .. })
        ));
        assert!(matches!(
            parse(&words("opencode run --port")),
            Err(ShapeError::MissingValue { .. })
        ));
    }
}
