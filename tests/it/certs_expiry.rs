//! Certificate validity as the nodes see it: a QUIC handshake between two nodes succeeds with
//! certificates from `snapship certs` and fails once either side's certificate has expired
//! (made with `make_node_cert_with_validity`). Plain QUIC on loopback; needs no root.

use std::path::Path;
use std::time::{Duration, SystemTime};

use s2n_quic::client::Connect;
use s2n_quic::{Client, Server};
use snapship::config::TlsFiles;
use snapship::config::units::Name;
use snapship::ship::tls::{self, CertOptions};

const DAY: Duration = Duration::from_secs(86_400);

fn files(dir: &Path, node: &str) -> TlsFiles {
    TlsFiles { ca: dir.join("ca.pem"), cert: dir.join(format!("{node}.pem")), key: dir.join(format!("{node}.key")) }
}

fn expire(dir: &Path, node: &str) {
    let now = SystemTime::now();
    tls::make_node_cert_with_validity(dir, &node.parse::<Name>().unwrap(), now - DAY * 30, now - DAY).unwrap();
}

/// alpha connects to beta, opens a stream and waits for beta's one-byte answer: `Ok` only
/// when both ends accepted each other's certificate.
async fn exchange(dir: &Path) -> Result<(), String> {
    let mut server = Server::builder().with_tls(tls::server_tls(&files(dir, "beta")).unwrap()).unwrap().with_io("127.0.0.1:0").unwrap().start().unwrap();
    let addr = server.local_addr().unwrap();
    tokio::spawn(async move {
        while let Some(mut conn) = server.accept().await {
            tokio::spawn(async move {
                if let Ok(Some(mut stream)) = conn.accept_bidirectional_stream().await {
                    let _ = stream.send(bytes::Bytes::from_static(b"y")).await;
                    let _ = stream.finish();
                    let _ = stream.receive().await;
                }
            });
        }
    });
    let client = Client::builder().with_tls(tls::client_tls(&files(dir, "alpha")).unwrap()).unwrap().with_io("127.0.0.1:0").unwrap().start().unwrap();
    let attempt = async {
        let mut conn = client.connect(Connect::new(addr).with_server_name("beta")).await.map_err(|e| format!("connect: {e}"))?;
        let mut stream = conn.open_bidirectional_stream().await.map_err(|e| format!("open: {e}"))?;
        stream.send(bytes::Bytes::from_static(b"x")).await.map_err(|e| format!("send: {e}"))?;
        match stream.receive().await {
            Ok(Some(answer)) if &answer[..] == b"y" => Ok(()),
            other => Err(format!("receive: {other:?}")),
        }
    };
    tokio::time::timeout(Duration::from_secs(20), attempt).await.unwrap_or_else(|_| Err("timed out".into()))
}

fn cluster() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    tls::make_certs(dir.path(), &["alpha".parse().unwrap(), "beta".parse().unwrap()], &CertOptions::default()).unwrap();
    dir
}

#[tokio::test]
async fn fresh_certificates_connect() {
    let dir = cluster();
    exchange(dir.path()).await.unwrap();
}

#[tokio::test]
async fn an_expired_replica_certificate_is_refused() {
    let dir = cluster();
    expire(dir.path(), "beta");
    let e = exchange(dir.path()).await.unwrap_err();
    assert!(e.starts_with("connect") && e.contains("expired"), "{e}");
}

#[tokio::test]
async fn an_expired_origin_certificate_is_refused() {
    let dir = cluster();
    expire(dir.path(), "alpha");
    let e = exchange(dir.path()).await.unwrap_err();
    assert!(e.contains("HANDSHAKE_FAILURE"), "beta should have refused the handshake: {e}");
}

#[tokio::test]
async fn a_renewed_certificate_connects_again() {
    let dir = cluster();
    expire(dir.path(), "alpha");
    tls::make_certs(dir.path(), &["alpha".parse().unwrap()], &CertOptions { existing: tls::Existing::Renew, ..Default::default() }).unwrap();
    exchange(dir.path()).await.unwrap();
}
