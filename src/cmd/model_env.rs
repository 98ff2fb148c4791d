//! `taskgate model-env [-- COMMAND…]`: the model face with no configuration for `taskgate
//! serve` users, in one line (docs/model-side.md):
//!
//! ```sh
//! eval "$(taskgate model-env)"    # then, in the same shell: opencode serve & taskgate serve
//! ```
//!
//! It finds the providers the runtime resolves here, as `taskgate wrap` does (a throwaway
//! `COMMAND serve`, default `opencode`, asked `GET /config/providers`), and prints shell
//! `export` lines: `OPENCODE_CONFIG_CONTENT` pointing each provider at the face, and the
//! `TASKGATE_MODEL*` variables that turn the face on with each provider's real URL.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use crate::config::{Config, Overrides};
use crate::model::providers::overlay;
use crate::wrap::{discover_providers, log_path, Signals, WrapError};

#[derive(Debug, Clone, clap::Args)]
pub struct ModelEnvArgs {
    /// Path to proxy.toml (for `[upstream_auth]` and `model.listen`).
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Where `taskgate serve` will run the model face. Default: `model.listen` (127.0.0.1:4098).
    #[arg(long)]
    pub model_listen: Option<SocketAddr>,
    /// How opencode is started (`npx -y opencode-ai` works too). Default: `opencode`.
    #[arg(last = true, value_name = "COMMAND")]
    pub command: Vec<String>,
}

/// The variable the runtime merges over every configuration file.
const CONFIG_CONTENT_ENV: &str = "OPENCODE_CONFIG_CONTENT";

pub async fn run(args: ModelEnvArgs) -> ExitCode {
    match model_env(args).await {
        Ok(lines) => {
            use std::io::Write as _;
            let _ = std::io::stdout().write_all(lines.as_bytes());
            ExitCode::SUCCESS
        }
        Err(e) => {
            say!("taskgate model-env: {e}");
            ExitCode::from(e.exit_code())
        }
    }
}

async fn model_env(args: ModelEnvArgs) -> Result<String, WrapError> {
    let config = Config::load(args.config.as_deref(), &Overrides::default())?;
    let listen = args.model_listen.unwrap_or(config.model.listen);
    let prefix = if args.command.is_empty() {
        vec!["opencode".to_owned()]
    } else {
        args.command
    };
    let mut signals = Signals::new()?;
    let log = log_path();
    let resolved = discover_providers(&prefix, &[], None, &config, &mut signals, log.clone())
        .await?
        .ok_or_else(|| WrapError::Runtime {
            what: "lists no providers (GET /config/providers)".to_owned(),
            log: log.clone(),
            tail: String::new(),
        })?;
    let mut routed = resolved.routed;
    // TASKGATE_MODEL_PROVIDERS separates pairs with commas.
    routed.retain(|id, url| {
        let fits = !url.contains(',');
        if !fits {
            say!("taskgate model-env: {id} left direct: its URL holds a comma");
        }
        fits
    });
    for (id, why) in &resolved.direct {
        say!("taskgate model-env: {id} left direct: {why}");
    }
    let existing = std::env::var(CONFIG_CONTENT_ENV).ok();
    let content = overlay(&format!("http://{listen}"), &routed, existing.as_deref())
        .map_err(|e| WrapError::Usage(e.to_string()))?;
    let pairs: Vec<String> = routed
        .iter()
        .map(|(id, url)| format!("{id}={url}"))
        .collect();
    Ok(format!(
        "export {CONFIG_CONTENT_ENV}={}\nexport TASKGATE_MODEL=true\nexport TASKGATE_MODEL_LISTEN={}\nexport TASKGATE_MODEL_PROVIDERS={}\n",
        shell_quote(&content),
        shell_quote(&listen.to_string()),
        shell_quote(&pairs.join(",")),
    ))
}

/// `text` in single quotes for a POSIX shell (a `'` inside becomes `'\''`).
fn shell_quote(text: &str) -> String {
    format!("'{}'", text.replace('\'', r"'\''"))
}

#[cfg(test)]
mod tests {
    use super::shell_quote;

    #[test]
    fn quotes_survive_a_shell() {
        assert_eq!(shell_quote(r#"{"a":"it's"}"#), r#"'{"a":"it'\''s"}'"#);
    }
}
