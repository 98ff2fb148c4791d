//! `taskgate serve` starts the model face beside the client face when `[model] enabled`, and
//! stops both on SIGTERM.

#[path = "support/model.rs"]
mod model;

use std::process::Stdio;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use model::{client, Provider, PATIENCE};

fn free_port() -> std::net::SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_starts_the_model_face_when_enabled_and_stops_it_on_sigterm() {
    let mut provider = Provider::start(false).await;
    let (listen, model_listen) = (free_port(), free_port());
    let dir = std::env::temp_dir().join(format!("taskgate-model-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("proxy.toml");
    std::fs::write(
        &path,
        format!(
            "[proxy]\nlisten = \"{listen}\"\nshutdown_grace = \"2s\"\n[gate]\nenabled = false\n[model]\nenabled = true\nlisten = \"{model_listen}\"\nopenai_chat = \"{}/v1\"\n",
            provider.url
        ),
    )
    .unwrap();
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_taskgate"))
        .arg("serve")
        .arg("--config")
        .arg(&path)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();

    let http = client();
    let deadline = tokio::time::Instant::now() + PATIENCE;
    let response = loop {
        let request = http::Request::get(format!("http://{model_listen}/openai-chat/models"))
            .body(Full::new(Bytes::new()))
            .unwrap();
        match http.request(request).await {
            Ok(r) => break r,
            Err(e) => {
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "model face never answered: {e}"
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    };
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
    let _ = std::fs::remove_dir_all(&dir);
}
