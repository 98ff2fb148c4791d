//! The model face's way out, as users behind a corporate CA or an egress proxy need it: the
//! real `taskgate serve` binary, its environment set as a user's shell would.
//!
//! - A provider whose certificate is signed by a CA named in `SSL_CERT_FILE` (a corporate CA
//!   installed in the system store) is trusted; without it the same provider is refused.
//! - `HTTP_PROXY`/`HTTPS_PROXY` send provider requests through a `CONNECT` tunnel (with the
//!   proxy URL's credentials); `NO_PROXY` keeps a host direct.

#[path = "support/model_serve.rs"]
mod model_serve;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use model_serve::serve_model_face;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Bound on each wait (a hang, not a timing margin).
const PATIENCE: Duration = Duration::from_secs(20);

/// `GET /openai-chat/models` through a `taskgate serve` whose OpenAI-chat provider is
/// `provider`, started with `env` (every proxy and certificate variable of the test's own
/// environment removed) and stopped afterwards: the status and the whole reply.
async fn models_via_face(provider: &str, env: &[(&str, &str)]) -> (u16, String) {
    let mut taskgate = serve_model_face(provider, env).await;
    let answer = get_models(taskgate.face).await;
    taskgate.child.kill().await.unwrap();
    answer
}

/// `GET http://face/openai-chat/models`: the status and the body.
async fn get_models(face: SocketAddr) -> (u16, String) {
    let mut stream = TcpStream::connect(face).await.unwrap();
    stream
        .write_all(b"GET /openai-chat/models HTTP/1.1\r\nhost: face\r\nconnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut reply = Vec::new();
    tokio::time::timeout(PATIENCE, stream.read_to_end(&mut reply))
        .await
        .expect("the face answered")
        .unwrap();
    let reply = String::from_utf8_lossy(&reply).into_owned();
    let status = reply
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    (status, reply)
}

/// Reads one request head from `stream`.
async fn read_head(stream: &mut (impl AsyncReadExt + Unpin)) -> String {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if stream.read(&mut byte).await.unwrap_or(0) == 0 {
            break;
        }
        head.push(byte[0]);
    }
    String::from_utf8_lossy(&head).into_owned()
}

/// A provider answering every request with `200 {"data":[]}`, over `tls` when given; the
/// request lines it got.
async fn provider(tls: Option<tokio_rustls::TlsAcceptor>) -> (SocketAddr, Arc<Mutex<Vec<String>>>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let record = seen.clone();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let (tls, record) = (tls.clone(), record.clone());
            tokio::spawn(async move {
                match tls {
                    Some(tls) => {
                        if let Ok(s) = tls.accept(tcp).await {
                            answer(s, &record).await;
                        }
                    }
                    None => answer(tcp, &record).await,
                }
            });
        }
    });
    (addr, seen)
}

/// Records the request line of one request on `s` and answers it `200 {"data":[]}`.
async fn answer(mut s: impl AsyncReadExt + AsyncWriteExt + Unpin, record: &Mutex<Vec<String>>) {
    const REPLY: &[u8] = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 11\r\nconnection: close\r\n\r\n{\"data\":[]}";
    let head = read_head(&mut s).await;
    record
        .lock()
        .unwrap()
        .push(head.lines().next().unwrap_or("").to_owned());
    let _ = s.write_all(REPLY).await;
    let _ = s.shutdown().await;
}

/// An egress proxy that tunnels every `CONNECT` to `target`, whatever host it names (the
/// provider's host need not resolve: only the proxy reaches it); the request heads it got.
async fn connect_proxy(target: SocketAddr) -> (SocketAddr, Arc<Mutex<Vec<String>>>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let record = seen.clone();
    tokio::spawn(async move {
        while let Ok((mut client, _)) = listener.accept().await {
            let record = record.clone();
            tokio::spawn(async move {
                let head = read_head(&mut client).await;
                record.lock().unwrap().push(head.clone());
                if !head.starts_with("CONNECT ") {
                    let _ = client
                        .write_all(b"HTTP/1.1 405 Method Not Allowed\r\ncontent-length: 0\r\n\r\n")
                        .await;
                    return;
                }
                let Ok(mut upstream) = TcpStream::connect(target).await else {
                    return;
                };
                let _ = client
                    .write_all(b"HTTP/1.1 200 Connection established\r\n\r\n")
                    .await;
                let _ = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
            });
        }
    });
    (addr, seen)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_proxy_from_the_environment_carries_provider_requests_through_connect() {
    let (provider_addr, provider_seen) = provider(None).await;
    let (proxy, proxy_seen) = connect_proxy(provider_addr).await;
    // A host only the proxy can reach: a direct attempt fails to resolve.
    let provider_url = format!("http://provider.invalid:{}/v1", provider_addr.port());
    let proxy_url = format!("http://user:pw@{proxy}");

    let (status, reply) = models_via_face(&provider_url, &[("HTTP_PROXY", &proxy_url)]).await;
    assert_eq!(status, 200, "{reply}");
    assert!(reply.ends_with("{\"data\":[]}"), "{reply}");
    let heads = proxy_seen.lock().unwrap().clone();
    assert_eq!(heads.len(), 1, "{heads:?}");
    assert!(
        heads[0].starts_with(&format!(
            "CONNECT provider.invalid:{} HTTP/1.1\r\n",
            provider_addr.port()
        )),
        "{heads:?}"
    );
    // base64("user:pw")
    assert!(
        heads[0]
            .to_ascii_lowercase()
            .contains("proxy-authorization: basic dxnlcjpwdw=="),
        "{heads:?}"
    );
    assert_eq!(
        provider_seen.lock().unwrap().clone(),
        vec!["GET /v1/models HTTP/1.1".to_owned()]
    );

    // NO_PROXY names the host: taskgate goes direct, which cannot resolve it.
    let (status, reply) = models_via_face(
        &provider_url,
        &[("HTTP_PROXY", &proxy_url), ("NO_PROXY", "provider.invalid")],
    )
    .await;
    assert_eq!(status, 502, "{reply}");
    assert_eq!(
        proxy_seen.lock().unwrap().len(),
        1,
        "the proxy was asked again"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_provider_signed_by_a_ca_in_the_system_store_is_trusted() {
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca = rcgen::CertifiedIssuer::self_signed(ca_params, ca_key).unwrap();
    let leaf_key = rcgen::KeyPair::generate().unwrap();
    let leaf = rcgen::CertificateParams::new(vec!["localhost".to_owned()])
        .unwrap()
        .signed_by(&leaf_key, &ca)
        .unwrap();
    let server = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(
        vec![leaf.der().clone()],
        rustls::pki_types::PrivateKeyDer::Pkcs8(leaf_key.serialize_der().into()),
    )
    .unwrap();
    let (addr, seen) = provider(Some(tokio_rustls::TlsAcceptor::from(Arc::new(server)))).await;
    let provider_url = format!("https://localhost:{}/v1", addr.port());
    let dir = tempfile::tempdir().unwrap();
    let ca_file = dir.path().join("corporate-ca.pem");
    std::fs::write(&ca_file, ca.pem()).unwrap();

    // The CA is in the store taskgate reads (SSL_CERT_FILE, as OpenSSL and curl use it).
    let (status, reply) = models_via_face(
        &provider_url,
        &[("SSL_CERT_FILE", ca_file.to_str().unwrap())],
    )
    .await;
    assert_eq!(status, 200, "{reply}");
    assert_eq!(
        seen.lock().unwrap().clone(),
        vec!["GET /v1/models HTTP/1.1".to_owned()]
    );

    // Without it, the same provider is not trusted: an error, never an unverified connection.
    let (status, reply) =
        models_via_face(&provider_url, &[("SSL_CERT_FILE", "/nonexistent/ca.pem")]).await;
    assert_eq!(status, 502, "{reply}");
    assert_eq!(seen.lock().unwrap().len(), 1);
}
