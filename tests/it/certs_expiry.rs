//! Certificate validity as the nodes see it: a QUIC handshake between two nodes succeeds with
//! certificates from `snapship certs` and fails once either side's certificate has expired
//! (made with `make_node_cert_with_validity`). Plain QUIC on loopback; needs no root.
//!
//! Then the refusals as an admin meets them, through the real transport (`quic::bind`,
//! `quic::serve`, `Connector`): what the origin's error says to do, and what the replica
//! logged (captured per test: a current-thread runtime runs both ends on the test's thread).

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

/// A writer into a shared buffer, for capturing what beta logs.
#[derive(Clone, Default)]
struct Captured(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

impl std::io::Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Captured {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
}

/// Answers every request with an empty listing.
struct EmptyListing;

#[async_trait::async_trait]
impl snapship::ship::Handler for EmptyListing {
    async fn handle(&self, _peer: String, stream: snapship::ship::RequestStream) {
        use tokio::io::AsyncWriteExt;
        let mut send = stream.send;
        let epoch = snapship::store::Epoch { number: 0, origin: "alpha".into() };
        let listing = snapship::ship::protocol::Message::Snapshots { snapshots: vec![], compact: false, partial: None, epoch, downstream: vec![], free: None };
        let _ = snapship::ship::transfer::write_message(&mut send, &listing).await;
        let _ = send.shutdown().await;
    }
}

/// beta listens (as `snapship run` does) listing `peers`; alpha, with `alpha_files`, asks
/// it for a listing. Returns alpha's error as the origin would report it (`Ok` if beta
/// answered) and what beta logged.
async fn ask_beta(dir: &Path, alpha_files: TlsFiles, peers: &[&str]) -> (Result<(), String>, String) {
    use snapship::ship::Dialer;
    use snapship::ship::protocol::{Message, VERSION};
    let log = Captured::default();
    let writer = log.clone();
    let subscriber = tracing_subscriber::fmt().with_writer(move || writer.clone()).with_ansi(false).finish();
    let _guard = tracing::subscriber::set_default(subscriber);
    let beta = files(dir, "beta");
    let tls = snapship::ship::tls::LiveTls::load(&beta).unwrap();
    let server = snapship::ship::quic::bind(&tls, &beta, "127.0.0.1:0".parse().unwrap(), std::time::Duration::from_secs(120)).unwrap();
    let addr = server.local_addr().unwrap();
    let shutdown = tokio_util::sync::CancellationToken::new();
    let (_peers, peers) = tokio::sync::watch::channel(peers.iter().map(|p| p.to_string()).collect());
    let served = tokio::spawn(snapship::ship::quic::serve(server, peers, std::sync::Arc::new(EmptyListing), shutdown.clone()));
    let text = format!(
        "node: alpha\nstate_dir: state\ntls:\n  ca: {}\n  cert: {}\n  key: {}\n",
        alpha_files.ca.display(),
        alpha_files.cert.display(),
        alpha_files.key.display()
    );
    let node = snapship::config::parse_node_text(&dir.join("alpha.yaml"), &text).unwrap();
    let connector = std::sync::Arc::new(snapship::ship::quic::Connector::new(&node).unwrap());
    let dialer = snapship::ship::quic::QuicDialer::new("beta".into(), addr.to_string(), connector);
    let attempt = async {
        let mut stream = dialer.open().await?;
        snapship::ship::transfer::write_message(&mut stream.send, &Message::Hello { version: VERSION }).await?;
        snapship::ship::transfer::write_message(
            &mut stream.send,
            &Message::List { fileset: "projects".into(), epoch: snapship::store::Epoch { number: 0, origin: "alpha".into() } },
        )
        .await?;
        let mut frames = snapship::ship::frame::FrameReader::new(stream.recv);
        match snapship::ship::transfer::read_message(&mut frames).await? {
            Message::Snapshots { .. } => Ok(()),
            other => anyhow::bail!("unexpected {other:?}"),
        }
    };
    let result = match tokio::time::timeout(Duration::from_secs(20), attempt).await {
        Ok(r) => r.map_err(|e| format!("{:#}", dialer.explain(e))),
        Err(_) => Err("timed out".into()),
    };
    // Give beta a moment to log the end of a handshake it refused.
    tokio::time::sleep(Duration::from_millis(200)).await;
    shutdown.cancel();
    let _ = served.await;
    (result, log.text())
}

#[tokio::test]
async fn a_listed_peer_with_a_good_certificate_is_answered() {
    let dir = cluster();
    let (result, log) = ask_beta(dir.path(), files(dir.path(), "alpha"), &["alpha"]).await;
    result.unwrap_or_else(|e| panic!("{e}\n{log}"));
}

#[tokio::test]
async fn a_node_not_listed_under_peers_is_told_where_to_add_it() {
    let dir = cluster();
    let (result, log) = ask_beta(dir.path(), files(dir.path(), "alpha"), &["gamma"]).await;
    let e = result.unwrap_err();
    eprintln!("origin: {e}\nreplica: {log}");
    assert!(e.contains("`alpha` is not listed under `peers` on `beta`: add it there"), "{e}");
    assert!(log.contains("refusing node \"alpha\": it is not listed under `peers`"), "{log}");
}

#[tokio::test]
async fn an_expired_origin_certificate_is_named_with_how_to_renew_it() {
    let dir = cluster();
    expire(dir.path(), "alpha");
    let (result, log) = ask_beta(dir.path(), files(dir.path(), "alpha"), &["alpha"]).await;
    let e = result.unwrap_err();
    eprintln!("origin: {e}\nreplica: {log}");
    let cert = dir.path().join("alpha.pem").display().to_string();
    assert!(e.contains(&format!("this node's certificate {cert} expired on")), "{e}");
    assert!(e.contains("snapship certs --renew alpha") && e.contains("openssl x509 -enddate"), "{e}");
    assert!(log.contains("refused a connection during its TLS handshake") && log.contains("certificate has expired or is not valid yet"), "{log}");
}

#[tokio::test]
async fn an_expired_replica_certificate_is_named_on_the_origin() {
    let dir = cluster();
    expire(dir.path(), "beta");
    let (result, _log) = ask_beta(dir.path(), files(dir.path(), "alpha"), &["alpha"]).await;
    let e = result.unwrap_err();
    eprintln!("origin: {e}");
    assert!(e.contains("`beta`'s certificate has expired or is not valid yet") && e.contains("snapship certs --renew beta"), "{e}");
}

#[test]
fn a_key_that_does_not_match_its_certificate_is_refused_at_start_up() {
    let dir = cluster();
    let wrong = TlsFiles { key: dir.path().join("beta.key"), ..files(dir.path(), "alpha") };
    for e in [tls::client_tls(&wrong).err().unwrap(), tls::server_tls(&wrong).err().unwrap()] {
        let e = format!("{e:#}");
        assert!(e.contains("beta.key is not the key of the certificate") && e.contains("alpha.pem"), "{e}");
    }
}
