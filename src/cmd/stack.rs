//! The one composition root: what `serve`, `wrap` and `demo` run in front of a runtime. One
//! oracle, started once and shared by both faces when they read the same runtime (one event
//! subscription, each tree read once per interval for both); the gate asking it; the proxy
//! carrying the gate; and the model face beside it when `[model] enabled`.
//!
//! Nothing else builds these parts together: a command binds its listeners, calls [`start`],
//! and later [`Stack::finish`].

use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::holds::Holds;
use crate::metrics::Metrics;
use crate::model::ModelError;
use crate::oracle::Oracle;
use crate::proxy::ServeError;

/// The running faces.
pub struct Stack {
    oracle: Oracle,
    client: JoinHandle<Result<(), ServeError>>,
    model: Option<JoinHandle<Result<(), ModelError>>>,
    shutdown: CancellationToken,
}

/// Why a face stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum StackError {
    #[error(transparent)]
    Client(#[from] ServeError),
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error("{face} stopped unexpectedly: {message}")]
    Task { face: &'static str, message: String },
}

/// Starts the client face on `listener` and, with `model`, the model face on it, until
/// `shutdown`. The oracle watches the runtime only when a face needs it (the gate is on, or the
/// model face reads the same runtime); otherwise it is only read on demand ([`Stack::oracle`]).
pub fn start(
    config: Config,
    listener: TcpListener,
    model: Option<TcpListener>,
    shutdown: CancellationToken,
) -> Stack {
    let oracle = Oracle::new(&config);
    // One registry of holds and metrics for both faces: the live view and `/_taskgate/metrics`
    // show the model face's beside the client face's.
    let holds = Holds::new(Metrics::new());
    let model_shares = config.model.runtime_url(&config.proxy) == config.proxy.upstream;
    if config.gate.enabled || (model.is_some() && model_shares) {
        oracle.start(shutdown.clone());
    }
    let model = model.map(|listener| {
        tokio::spawn(crate::model::run_holding(
            listener,
            config.clone(),
            Some(oracle.clone()),
            Some(holds.clone()),
            shutdown.clone(),
        ))
    });
    let gate_oracle = config.gate.enabled.then(|| oracle.clone());
    let client = tokio::spawn(crate::proxy::run_with_oracle(
        listener,
        config,
        gate_oracle,
        holds,
        shutdown.clone(),
    ));
    Stack {
        oracle,
        client,
        model,
        shutdown,
    }
}

/// The client face alone on `listener` until `shutdown` (what tests and embedders run).
pub async fn run(
    listener: TcpListener,
    config: Config,
    shutdown: CancellationToken,
) -> Result<(), ServeError> {
    let stack = start(config, listener, None, shutdown);
    match stack.client.await {
        Ok(result) => result,
        Err(e) => Err(ServeError::Io(std::io::Error::other(e))),
    }
}

impl Stack {
    /// The shared oracle: what the commands ask about the trees they ran.
    pub fn oracle(&self) -> &Oracle {
        &self.oracle
    }

    /// Waits for the client face to stop (the shutdown token, or an error), then stops the
    /// model face with it.
    pub async fn finish(self) -> Result<(), StackError> {
        let client = joined("client face", self.client.await);
        self.shutdown.cancel();
        let model = match self.model {
            Some(model) => joined("model face", model.await),
            None => Ok(()),
        };
        client.and(model)
    }
}

fn joined<E: Into<StackError>>(
    face: &'static str,
    outcome: Result<Result<(), E>, tokio::task::JoinError>,
) -> Result<(), StackError> {
    match outcome {
        Ok(result) => result.map_err(Into::into),
        Err(e) => Err(StackError::Task {
            face,
            message: e.to_string(),
        }),
    }
}
