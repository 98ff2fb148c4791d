//! Validation: every value checked once all layers are merged, with an error that names the key
//! and never repeats a secret.

use std::time::Duration;

use super::{Config, ConfigError};

impl Config {
    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        upstream_authority(&self.proxy.upstream)
            .map_err(|message| ConfigError::invalid("proxy.upstream", message))?;
        if self.proxy.connect_timeout.0.is_zero() {
            return Err(ConfigError::invalid(
                "proxy.connect_timeout",
                "must be more than 0s (a connect with no deadline can hang forever)",
            ));
        }
        if self.proxy.inspect_limit_bytes == 0 {
            return Err(ConfigError::invalid(
                "proxy.inspect_limit_bytes",
                "must be at least 1",
            ));
        }
        if self.proxy.inspect_concurrency == 0 {
            return Err(ConfigError::invalid(
                "proxy.inspect_concurrency",
                "must be at least 1 (a prompt reply over 256 KiB waits for a turn to be read)",
            ));
        }
        if self.proxy.header_read_timeout.0.is_zero() {
            return Err(ConfigError::invalid(
                "proxy.header_read_timeout",
                "must be more than 0s (without it a client can hold a connection forever)",
            ));
        }
        if self.proxy.idle_timeout.0.is_zero() {
            return Err(ConfigError::invalid(
                "proxy.idle_timeout",
                "must be more than 0s",
            ));
        }
        if self.proxy.max_connections == 0 {
            return Err(ConfigError::invalid(
                "proxy.max_connections",
                "must be at least 1",
            ));
        }
        if let Some(token) = &self.proxy.admin_token {
            // Compared with a header value: it must be sendable as one (never shown).
            if token.is_empty() || !token.bytes().all(|b| b.is_ascii_graphic()) {
                return Err(ConfigError::invalid(
                    "proxy.admin_token",
                    "must be non-empty visible ASCII without spaces (the value is not shown)",
                ));
            }
        }
        if self.oracle.poll_interval.0 < Duration::from_millis(10) {
            return Err(ConfigError::invalid(
                "oracle.poll_interval",
                "must be at least 10ms",
            ));
        }
        if self.oracle.request_timeout.0.is_zero() {
            return Err(ConfigError::invalid(
                "oracle.request_timeout",
                "must be more than 0s",
            ));
        }
        if self.gate.max_hold.0.is_zero() {
            return Err(ConfigError::invalid(
                "gate.max_hold",
                "must be more than 0s",
            ));
        }
        if self.gate.prompt_keepalive.0.is_zero() {
            return Err(ConfigError::invalid(
                "gate.prompt_keepalive",
                "must be more than 0s",
            ));
        }
        if self.gate.max_held_events == 0 {
            return Err(ConfigError::invalid(
                "gate.max_held_events",
                "must be at least 1",
            ));
        }
        if let Some(name) = self.gate.claim_tools.iter().find(|n| n.trim().is_empty()) {
            return Err(ConfigError::invalid(
                "gate.claim_tools",
                format!("tool names must not be empty (got {name:?})"),
            ));
        }
        self.validate_model()?;
        if self.upstream_auth.username.is_empty() {
            return Err(ConfigError::invalid(
                "upstream_auth.username",
                "must not be empty (the runtime's default user is \"opencode\")",
            ));
        }
        tracing_subscriber::EnvFilter::try_new(&self.log.filter)
            .map_err(|e| ConfigError::invalid("log.filter", format!("invalid filter: {e}")))?;
        Ok(())
    }

    fn validate_model(&self) -> Result<(), ConfigError> {
        let model = &self.model;
        if let Some(runtime) = &model.runtime {
            upstream_authority(runtime)
                .map_err(|message| ConfigError::invalid("model.runtime", message))?;
        }
        for (key, url) in [
            ("model.openai_chat", &model.openai_chat),
            ("model.openai_responses", &model.openai_responses),
            ("model.anthropic", &model.anthropic),
        ] {
            provider_url(url).map_err(|message| ConfigError::invalid(key, message))?;
        }
        for (id, url) in &model.providers {
            let key = format!("model.providers.{id}");
            if !provider_id_is_routable(id) {
                return Err(ConfigError::invalid(
                    &key,
                    "a provider id may hold only letters, digits, '.', '_' and '-' (it becomes the path /p/<id>)",
                ));
            }
            provider_url(url).map_err(|message| ConfigError::invalid(&key, message))?;
        }
        if model.max_hold.0.is_zero() {
            return Err(ConfigError::invalid(
                "model.max_hold",
                "must be more than 0s (and below the runtime's provider timeout, 300s by default)",
            ));
        }
        if model.inspect_limit_bytes == 0 {
            return Err(ConfigError::invalid(
                "model.inspect_limit_bytes",
                "must be at least 1",
            ));
        }
        if let Some(name) = model.claim_tools.iter().find(|n| n.trim().is_empty()) {
            return Err(ConfigError::invalid(
                "model.claim_tools",
                format!("tool names must not be empty (got {name:?})"),
            ));
        }
        Ok(())
    }
}

/// Whether `id` can be one path segment of `/p/<id>` as written, with nothing to escape.
pub fn provider_id_is_routable(id: &str) -> bool {
    !id.is_empty()
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
        && id != "."
        && id != ".."
}

/// Checks that `upstream` is an `http://host:port` URL and returns its authority.
/// Only plain HTTP: the runtime listens on loopback without TLS. Credentials in the URL are
/// refused (they would show in every error body and in `/_taskgate/config`); the messages
/// never repeat them.
pub fn upstream_authority(upstream: &str) -> Result<http::uri::Authority, String> {
    let shown = without_userinfo(upstream);
    let uri: http::Uri = upstream.parse().map_err(|e| {
        format!("{shown:?} is not a URL ({e}); expected e.g. \"http://127.0.0.1:4096\"")
    })?;
    if uri.scheme_str() != Some("http") {
        return Err(format!(
            "{shown:?}: only http:// upstreams are supported (got scheme {:?})",
            uri.scheme_str().unwrap_or("none")
        ));
    }
    let authority = uri
        .authority()
        .cloned()
        .ok_or_else(|| format!("{shown:?} has no host"))?;
    check_authority(
        &authority,
        &shown,
        "[upstream_auth] or OPENCODE_SERVER_PASSWORD",
    )?;
    if uri.path() != "/" && !uri.path().is_empty() {
        return Err(format!(
            "{shown:?}: a path prefix is not supported; give only scheme, host and port"
        ));
    }
    Ok(authority)
}

/// No `user:pass@`, and a port, when given, in 1..=65535: `http::Uri` accepts `:99999` and
/// then reports no port at all, so the connection would silently go to port 80.
fn check_authority(
    authority: &http::uri::Authority,
    shown: &str,
    instead: &str,
) -> Result<(), String> {
    if authority.as_str().contains('@') {
        return Err(format!(
            "{shown:?}: credentials in the URL are not supported; use {instead}"
        ));
    }
    // The text after the host: `[::1]:4096` or `127.0.0.1:4096`.
    let after_host = match authority.as_str().rfind(']') {
        Some(end) => &authority.as_str()[end + 1..],
        None => authority.as_str(),
    };
    if let Some((_, port)) = after_host.rsplit_once(':') {
        if !matches!(port.parse::<u16>(), Ok(1..)) {
            return Err(format!("{shown:?}: port {port:?} is not in 1..65535"));
        }
    }
    Ok(())
}

/// `url` with any `user:pass@` replaced, for messages: a rejected URL is still not echoed.
fn without_userinfo(url: &str) -> String {
    let start = url.find("://").map_or(0, |i| i + 3);
    let end = url[start..]
        .find(['/', '?', '#'])
        .map_or(url.len(), |i| start + i);
    match url[start..end].rfind('@') {
        Some(at) => format!("{}<redacted>@{}", &url[..start], &url[start + at + 1..]),
        None => url.to_owned(),
    }
}

/// Checks that `url` is an `http://` or `https://` URL with a host (a path prefix such as `/v1`
/// is kept) and returns it parsed. Model providers are public HTTPS APIs as often as local
/// HTTP servers, unlike the runtime.
pub fn provider_url(url: &str) -> Result<http::Uri, String> {
    let shown = without_userinfo(url);
    let uri: http::Uri = url.parse().map_err(|e| {
        format!("{shown:?} is not a URL ({e}); expected e.g. \"https://api.openai.com/v1\"")
    })?;
    match uri.scheme_str() {
        Some("http" | "https") => {}
        other => {
            return Err(format!(
                "{shown:?}: only http:// and https:// providers are supported (got scheme {:?})",
                other.unwrap_or("none")
            ))
        }
    }
    let Some(authority) = uri.authority() else {
        return Err(format!("{shown:?} has no host"));
    };
    check_authority(authority, &shown, "the runtime's provider API key settings")?;
    if uri.query().is_some() {
        return Err(format!(
            "{shown:?}: a query is not supported in a provider URL"
        ));
    }
    Ok(uri)
}
