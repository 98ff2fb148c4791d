//! `taskgate serve` starts the model face beside the client face when `[model] enabled`, and
//! stops both on SIGTERM.

#[path = "support/model.rs"]
mod model;
#[path = "support/model_serve.rs"]
mod model_serve;

use bytes::Bytes;
use http_body_util::Full;
use model::{client, Provider, PATIENCE};
use model_serve::{serve_model_face, ModelServe};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_starts_the_model_face_when_enabled_and_stops_it_on_sigterm() {
    let mut provider = Provider::start(false).await;
    let ModelServe { mut child, face } =
        serve_model_face(&format!("{}/v1", provider.url), &[]).await;

    let request = http::Request::get(format!("http://{face}/openai-chat/models"))
        .body(Full::new(Bytes::new()))
        .unwrap();
    let response = tokio::time::timeout(PATIENCE, client().request(request))
        .await
        .expect("the model face answered")
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(provider.next().await.target, "/v1/models");

    let pid = child.id().unwrap().to_string();
    let killed = std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap();
    assert!(killed.success());
    let status = tokio::time::timeout(PATIENCE, child.wait())
        .await
        .expect("taskgate stopped after SIGTERM")
        .unwrap();
    assert!(status.success(), "{status:?}");
}
