//! How the model face reaches a provider: the operating system's trust store and the
//! environment's egress proxy, as users behind a corporate CA or proxy need (and as `curl` and
//! the runtime itself behave).
//!
//! - Trust: the certificates of the operating system's store (`SSL_CERT_FILE` and
//!   `SSL_CERT_DIR` name others, as with OpenSSL) and, beside them, Mozilla's roots, so a
//!   container without `ca-certificates` still reaches the public APIs.
//! - Proxy: `HTTPS_PROXY`, `HTTP_PROXY`, `ALL_PROXY` and `NO_PROXY` (either case), read once at
//!   start with curl's rules. A provider the rules send to a proxy is reached through an HTTP
//!   `CONNECT` tunnel (RFC 9110 §9.3.6), `Proxy-Authorization` from the proxy URL's
//!   `user:password@`; TLS to the provider then runs inside the tunnel, end to end. A plain
//!   `http://` provider goes through the tunnel too. A provider on loopback is always direct.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use http::Uri;
use hyper_util::client::legacy::connect::proxy::Tunnel;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::proxy::matcher::Matcher;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tower::Service;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The TCP leg to a provider: straight there, or through the proxy the environment names.
#[derive(Clone)]
pub(super) struct Egress {
    direct: HttpConnector,
    proxies: Arc<Matcher>,
}

impl Egress {
    /// `direct` connects (timeouts, `TCP_NODELAY` already set); proxies from the environment.
    pub(super) fn from_env(direct: HttpConnector) -> Egress {
        Egress {
            direct,
            proxies: Arc::new(Matcher::from_env()),
        }
    }
}

impl Service<Uri> for Egress {
    type Response = TokioIo<TcpStream>;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, BoxError>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        // HttpConnector is always ready; each call clones what it needs.
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, dst: Uri) -> Self::Future {
        let mut direct = self.direct.clone();
        let proxy = (!is_loopback(&dst))
            .then(|| self.proxies.intercept(&dst))
            .flatten();
        match proxy {
            None => Box::pin(async move { direct.call(dst).await.map_err(Into::into) }),
            Some(proxy) => {
                let mut tunnel = Tunnel::new(proxy.uri().clone(), direct);
                if let Some(auth) = proxy.basic_auth() {
                    tunnel = tunnel.with_auth(auth.clone());
                }
                // The tunnel asks for port 443 when the URL names none; say 80 for http.
                let dst = with_default_port(dst);
                Box::pin(async move { tunnel.call(dst).await.map_err(Into::into) })
            }
        }
    }
}

/// A provider on this machine (`localhost`, `127.0.0.0/8`, `::1`): no proxy can reach the user's
/// loopback, so these are always direct, whatever `NO_PROXY` says (Go's rule, too).
fn is_loopback(dst: &Uri) -> bool {
    let Some(host) = dst.host() else { return false };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    host.eq_ignore_ascii_case("localhost")
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// `dst` with its scheme's port written out (`http://h/` → `http://h:80/`).
fn with_default_port(dst: Uri) -> Uri {
    if dst.port().is_some() || dst.scheme_str() != Some("http") {
        return dst;
    }
    let Some(host) = dst.host() else { return dst };
    let mut parts = dst.clone().into_parts();
    match format!("{host}:80").parse() {
        Ok(authority) => {
            parts.authority = Some(authority);
            Uri::from_parts(parts).unwrap_or(dst)
        }
        Err(_) => dst,
    }
}

/// TLS settings for providers: the system's roots and Mozilla's, HTTP/1.1 only.
pub(super) fn tls_config() -> Result<rustls::ClientConfig, rustls::Error> {
    let mut roots = rustls::RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    let native = rustls_native_certs::load_native_certs();
    for error in &native.errors {
        tracing::debug!(%error, "model face: a system certificate could not be read");
    }
    let (added, ignored) = roots.add_parsable_certificates(native.certs);
    tracing::debug!(added, ignored, "model face: system certificates trusted");
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    Ok(rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tunnel_to_a_plain_http_provider_asks_for_port_80() {
        let uri = with_default_port("http://api.example.com/v1/x?y".parse().unwrap());
        assert_eq!(uri, "http://api.example.com:80/v1/x?y");
        let tls: Uri = "https://api.example.com/v1".parse().unwrap();
        assert_eq!(with_default_port(tls.clone()), tls);
    }

    #[test]
    fn loopback_providers_never_go_through_a_proxy() {
        for url in [
            "http://127.0.0.1:9/v1",
            "http://localhost/v1",
            "http://[::1]:8/v1",
        ] {
            assert!(is_loopback(&url.parse().unwrap()), "{url}");
        }
        assert!(!is_loopback(&"https://api.openai.com/v1".parse().unwrap()));
    }
}
