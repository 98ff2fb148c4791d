//! The model face: a second listener between the runtime and its model provider.
//!
//! Tools such as oh-my-opencode's `background_output` run inside the runtime; their text reaches
//! the dispatching model only in the next request to the model provider, never through a client
//! route. With the runtime's provider `baseURL` pointed here, that request is the last point
//! where a false "the child is done" can be corrected before the model reads it.
//!
//! Each request is forwarded to the real provider chosen by its path prefix (`/openai-chat`,
//! `/openai-responses`, `/anthropic`). A `POST` of JSON to `…/chat/completions`, `…/responses`
//! or `…/messages` is read; if its newest tool results (or user texts: injected results, plugin
//! wakes) claim a child is done and the runtime does not confirm it, the request is held until
//! the child's tree is terminal (at most `model.max_hold`) and forwarded with those results
//! replaced by the truth. Everything else, and every response, streams through untouched.
//!
//! Module map: [`format`](mod@format) (the three request formats, pure), `check` (claims →
//! verdicts → truthful text), [`truth`] (the oracle behind a trait), `forward` (the HTTP path),
//! [`providers`] (every provider of the runtime routed through `/p/<id>`, for `taskgate wrap`),
//! `egress` (the trust store and the environment's proxy on the way to a provider).

mod check;
mod egress;
pub mod format;
mod forward;
pub mod providers;
pub mod truth;

use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::serve::ListenerExt;
use axum::Router;
use http::uri::{Authority, Scheme};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::claims::ClaimTools;
use crate::config::Config;
use crate::holds::Holds;
use crate::oracle::Oracle;
use egress::Egress;

pub use truth::{Finding, Recorded, Truth};

/// Idle pooled connections to a provider are closed after this, below common keep-alive
/// timeouts (the "connection closed before message completed" race, hyper#2136).
const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(30);

/// The path prefixes of this listener, one per provider kind (`openai_chat`, `openai_responses`,
/// `anthropic` in `[model]`).
pub const PREFIXES: [&str; 3] = ["/openai-chat", "/openai-responses", "/anthropic"];

type ProviderClient = Client<HttpsConnector<Egress>, Body>;

#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("{key}: {message}")]
    Config { key: &'static str, message: String },
    #[error("model face: {0}")]
    Io(#[from] std::io::Error),
    #[error("model face: TLS settings refused: {0}")]
    Tls(#[from] rustls::Error),
}

/// The prefix of the named providers of `[model.providers]`: `/p/<id>`.
pub const NAMED_PREFIX: &str = "/p";

/// One provider: where requests under `prefix` go.
#[derive(Debug, Clone)]
struct Route {
    /// `/openai-chat`, `/openai-responses`, `/anthropic` or `/p/<id>`.
    prefix: String,
    scheme: Scheme,
    authority: Authority,
    /// The provider URL's path (`/v1`), without a trailing slash.
    base_path: String,
    /// As configured, for error bodies (it holds no secret: credentials travel in headers).
    url: String,
}

impl Route {
    fn new(prefix: String, key: &'static str, url: &str) -> Result<Route, ModelError> {
        let uri = crate::config::provider_url(url)
            .map_err(|message| ModelError::Config { key, message })?;
        let (Some(scheme), Some(authority)) = (uri.scheme().cloned(), uri.authority().cloned())
        else {
            return Err(ModelError::Config {
                key,
                message: format!("{url:?} has no scheme or host"),
            });
        };
        Ok(Route {
            prefix,
            scheme,
            authority,
            base_path: uri.path().trim_end_matches('/').to_owned(),
            url: url.to_owned(),
        })
    }
}

/// The model face's handle; cheap to clone.
#[derive(Clone)]
pub struct ModelFace {
    inner: Arc<Inner>,
}

struct Inner {
    routes: Vec<Route>,
    client: ProviderClient,
    tools: ClaimTools,
    truth: Arc<dyn Truth>,
    max_hold: Duration,
    inspect_limit: usize,
    shutdown_grace: Duration,
}

impl ModelFace {
    /// Builds the face from `config.model` (providers, claim tools, max hold), asking `truth`
    /// about children.
    pub fn new(config: &Config, truth: Arc<dyn Truth>) -> Result<ModelFace, ModelError> {
        let model = &config.model;
        let mut routes = Vec::new();
        for (prefix, key, url) in [
            (PREFIXES[0], "model.openai_chat", &model.openai_chat),
            (
                PREFIXES[1],
                "model.openai_responses",
                &model.openai_responses,
            ),
            (PREFIXES[2], "model.anthropic", &model.anthropic),
        ] {
            routes.push(Route::new(prefix.to_owned(), key, url)?);
        }
        for (id, url) in &model.providers {
            routes.push(Route::new(
                format!("{NAMED_PREFIX}/{id}"),
                "model.providers",
                url,
            )?);
        }
        let mut http = HttpConnector::new();
        http.enforce_http(false);
        http.set_nodelay(true);
        http.set_connect_timeout(Some(config.proxy.connect_timeout.0));
        let https = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(egress::tls_config()?)
            .https_or_http()
            .enable_http1()
            .wrap_connector(Egress::from_env(http));
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(POOL_IDLE_TIMEOUT)
            .pool_timer(TokioTimer::new())
            .build(https);
        Ok(ModelFace {
            inner: Arc::new(Inner {
                routes,
                client,
                tools: ClaimTools::new(&model.claim_tools),
                truth,
                max_hold: model.max_hold.0,
                inspect_limit: model.inspect_limit_bytes,
                shutdown_grace: config.proxy.shutdown_grace.0,
            }),
        })
    }
}

/// Serves the model face on `listener` until `shutdown`, with an [`Oracle`] reading
/// `model.runtime` (default `proxy.upstream`): `shared` (the client face's, already started)
/// when it reads that same runtime, else one of its own.
pub async fn run(
    listener: TcpListener,
    config: Config,
    shared: Option<Oracle>,
    shutdown: CancellationToken,
) -> Result<(), ModelError> {
    run_holding(listener, config, shared, None, shutdown).await
}

/// [`run`], listing what it holds in `holds` (the registry the live view and
/// `/_taskgate/holds` show, shared with the client face).
pub async fn run_holding(
    listener: TcpListener,
    config: Config,
    shared: Option<Oracle>,
    holds: Option<Holds>,
    shutdown: CancellationToken,
) -> Result<(), ModelError> {
    let runtime = config.model.runtime_url(&config.proxy).to_owned();
    let oracle = match shared.filter(|_| runtime == config.proxy.upstream) {
        Some(oracle) => oracle,
        None => {
            let mut oracle_config = config.clone();
            oracle_config.proxy.upstream = runtime;
            let oracle = Oracle::new(&oracle_config);
            oracle.start(shutdown.clone());
            oracle
        }
    };
    let truth: Arc<dyn Truth> = match holds {
        Some(holds) => Arc::new(Recorded::new(oracle, holds)),
        None => Arc::new(oracle),
    };
    let face = ModelFace::new(&config, truth)?;
    serve(listener, face, shutdown).await
}

/// Serves `face` on `listener` until `shutdown`; then in-flight requests (held ones are
/// released by the oracle's own shutdown) get `proxy.shutdown_grace` to finish.
pub async fn serve(
    listener: TcpListener,
    face: ModelFace,
    shutdown: CancellationToken,
) -> Result<(), ModelError> {
    let grace = face.inner.shutdown_grace;
    let app = Router::new().fallback(forward::handle).with_state(face);
    // Without TCP_NODELAY, Nagle can hold back a small streamed chunk until the next one.
    let listener = listener.tap_io(|stream| {
        if let Err(e) = stream.set_nodelay(true) {
            tracing::debug!(error = %e, "cannot set TCP_NODELAY");
        }
    });
    let stop = shutdown.clone();
    let served =
        axum::serve(listener, app).with_graceful_shutdown(async move { stop.cancelled().await });
    let served = std::future::IntoFuture::into_future(served);
    tokio::select! {
        result = served => result?,
        () = async {
            shutdown.cancelled().await;
            tokio::time::sleep(grace).await;
        } => {
            tracing::warn!(?grace, "model face: shutdown grace over; closing what is still open");
        }
    }
    tracing::info!("model face stopped");
    Ok(())
}
