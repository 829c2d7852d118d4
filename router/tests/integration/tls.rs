//! TLS on the etcd API and the metrics address: mutual TLS, refusals at the
//! handshake, and certificates rotated without a restart.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use etcd_client::{Certificate, Client, ConnectOptions, Identity, TlsOptions};
use kubeshard::RunningServer;
use kubeshard_config::ServerTls;
use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;

use crate::support::{Backend, Ctx, http};

/// A certificate authority of the test.
struct Ca {
    issuer: CertifiedIssuer<'static, KeyPair>,
}

impl Ca {
    fn new(name: &str) -> Ca {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        let issuer = CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap();
        Ca { issuer }
    }

    fn pem(&self) -> String {
        self.issuer.pem()
    }

    /// A leaf certificate and its key (PEM) for these names.
    fn issue(&self, names: &[&str]) -> (String, String) {
        let key = KeyPair::generate().unwrap();
        let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
        let cert = CertificateParams::new(names)
            .unwrap()
            .signed_by(&key, &self.issuer)
            .unwrap();
        (cert.pem(), key.serialize_pem())
    }
}

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path
}

/// Serving TLS from a certificate and key written to `dir` (server.crt,
/// server.key), client certificates required when `trusted` is given.
fn serving(dir: &Path, (cert, key): (&str, &str), trusted: Option<PathBuf>) -> ServerTls {
    ServerTls {
        cert_file: write(dir, "server.crt", cert),
        key_file: write(dir, "server.key", key),
        trusted_ca_file: trusted,
    }
}

/// A client that has made one request, or the error of connecting or of
/// that request.
async fn client(
    server: &RunningServer,
    scheme: &str,
    tls: Option<TlsOptions>,
) -> Result<Client, etcd_client::Error> {
    let options = tls.map(|tls| ConnectOptions::new().with_tls(tls));
    let url = format!(
        "{scheme}://127.0.0.1:{}",
        server.local_addr().expect("a TCP address").port()
    );
    let connect = Client::connect([url], options);
    let mut client = tokio::time::timeout(Duration::from_secs(10), connect)
        .await
        .expect("connect hung")?;
    let put = client.put("/tls/probe", "x", None);
    tokio::time::timeout(Duration::from_secs(10), put)
        .await
        .expect("put hung")?;
    Ok(client)
}

/// A TLS connection trusting `ca_pem`, without a client certificate.
async fn tls_connect(addr: SocketAddr, ca_pem: &str, alpn: &[u8]) -> TlsStream<TcpStream> {
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(CertificateDer::from_pem_slice(ca_pem.as_bytes()).unwrap())
        .unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![alpn.to_vec()];
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let tcp = TcpStream::connect(addr).await.unwrap();
    connector
        .connect(ServerName::IpAddress(addr.ip().into()), tcp)
        .await
        .unwrap()
}

/// The certificate a new connection to the etcd API is served.
async fn served(addr: SocketAddr, ca_pem: &str) -> CertificateDer<'static> {
    let stream = tls_connect(addr, ca_pem, b"h2").await;
    stream.get_ref().1.peer_certificates().unwrap()[0]
        .clone()
        .into_owned()
}

/// etcdctl from `ETCDCTL_BIN`; None (loudly) when it is not set, unless
/// every tool is required.
fn etcdctl() -> Option<PathBuf> {
    match std::env::var("ETCDCTL_BIN") {
        Ok(bin) if !bin.is_empty() => Some(bin.into()),
        _ if std::env::var("KUBESHARD_TEST_REQUIRE_ALL").as_deref() == Ok("1") => {
            panic!("ETCDCTL_BIN is not set but KUBESHARD_TEST_REQUIRE_ALL=1")
        }
        _ => {
            eprintln!("\n!!!!! etcdctl part SKIPPED: ETCDCTL_BIN is not set !!!!!\n");
            None
        }
    }
}

fn der(pem: &str) -> CertificateDer<'static> {
    CertificateDer::from_pem_slice(pem.as_bytes()).unwrap()
}

/// Mutual TLS: only clients with a certificate of the trusted CA get in;
/// plain text, no certificate and another CA's certificate are refused.
/// The metrics address serves HTTPS without asking for one.
pub async fn mutual_tls_refuses_other_clients(ctx: Ctx) {
    let dir = tempfile::tempdir().unwrap();
    let (ca, other) = (Ca::new("kubeshard test CA"), Ca::new("another CA"));
    let (cert, key) = ca.issue(&["localhost", "127.0.0.1"]);
    let tls = serving(
        dir.path(),
        (&cert, &key),
        Some(write(dir.path(), "ca.crt", &ca.pem())),
    );
    let server = ctx.start_server(|o| o.tls = Some(tls)).await;
    let (client_cert, client_key) = ca.issue(&["kube-apiserver-etcd-client"]);
    let (stranger_cert, stranger_key) = other.issue(&["kube-apiserver-etcd-client"]);
    let trust = || TlsOptions::new().ca_certificate(Certificate::from_pem(ca.pem()));

    let mut good = client(
        &server,
        "https",
        Some(trust().identity(Identity::from_pem(&client_cert, &client_key))),
    )
    .await
    .expect("a client with a certificate of the trusted CA");
    let got = good.get("/tls/probe", None).await.expect("get over TLS");
    assert_eq!(got.kvs()[0].value(), b"x");

    assert!(
        client(&server, "http", None).await.is_err(),
        "plain text accepted"
    );
    assert!(
        client(&server, "https", Some(trust())).await.is_err(),
        "a client without a certificate accepted"
    );
    let stranger = trust().identity(Identity::from_pem(&stranger_cert, &stranger_key));
    assert!(
        client(&server, "https", Some(stranger)).await.is_err(),
        "a certificate of another CA accepted"
    );

    // etcdctl, as operators use it against a TLS etcd.
    let client_files = [
        (
            "--cacert",
            write(dir.path(), "ca-for-etcdctl.crt", &ca.pem()),
        ),
        ("--cert", write(dir.path(), "client.crt", &client_cert)),
        ("--key", write(dir.path(), "client.key", &client_key)),
    ];
    if let Some(etcdctl) = etcdctl() {
        let endpoint = format!(
            "--endpoints=https://127.0.0.1:{}",
            server.local_addr().expect("a TCP address").port()
        );
        let run = |files: &[(&str, PathBuf)], args: &[&str]| {
            let mut command = std::process::Command::new(&etcdctl);
            command
                .env("ETCDCTL_API", "3")
                .arg(&endpoint)
                .arg("--dial-timeout=3s");
            for (flag, path) in files {
                command.arg(format!("{flag}={}", path.display()));
            }
            let output = command.args(args).output().expect("etcdctl runs");
            (
                output.status.success(),
                String::from_utf8_lossy(&output.stdout).into_owned(),
                String::from_utf8_lossy(&output.stderr).into_owned(),
            )
        };
        let (ok, _, err) = run(&client_files, &["put", "/tls/etcdctl", "v"]);
        assert!(ok, "etcdctl put over mutual TLS: {err}");
        let (ok, out, err) = run(
            &client_files,
            &["get", "/tls/etcdctl", "--print-value-only"],
        );
        assert!(
            ok && out.trim() == "v",
            "etcdctl get over mutual TLS: {out} {err}"
        );
        let (ok, _, _) = run(&client_files[..1], &["get", "/tls/etcdctl"]);
        assert!(!ok, "etcdctl without a client certificate got in");
    }

    // The metrics address: HTTPS with the same certificate, no client's.
    let metrics = server.metrics_addr().expect("metrics address");
    let mut stream = tls_connect(metrics, &ca.pem(), b"http/1.1").await;
    stream
        .write_all(b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut answer = String::new();
    stream.read_to_string(&mut answer).await.unwrap();
    assert!(
        answer.starts_with("HTTP/1.1 200") && answer.ends_with(r#"{"health":"true","reason":""}"#),
        "GET /health over HTTPS: {answer}"
    );
    drop(good);
    server.shutdown().await.unwrap();
}

/// --metrics-ignore-tls-config: the metrics address stays plain HTTP.
pub async fn metrics_can_stay_plain(ctx: Ctx) {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("kubeshard test CA");
    let (cert, key) = ca.issue(&["127.0.0.1"]);
    let tls = serving(dir.path(), (&cert, &key), None);
    let server = ctx
        .start_server(|o| {
            o.tls = Some(tls);
            o.metrics_tls = false;
        })
        .await;
    let addr = server.metrics_addr().expect("metrics address");
    assert_eq!(http(addr, "GET", "/livez").await.status, 200);
    // Without --trusted-ca-file a client needs no certificate.
    let trust = TlsOptions::new().ca_certificate(Certificate::from_pem(ca.pem()));
    let c = client(&server, "https", Some(trust))
        .await
        .expect("TLS without a client certificate");
    drop(c);
    server.shutdown().await.unwrap();
}

/// A certificate and key replaced on disk are served from the next
/// connection on; a broken pair leaves the last good one serving.
pub async fn rotated_certificates_need_no_restart(ctx: Ctx) {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("kubeshard test CA");
    let (first, first_key) = ca.issue(&["127.0.0.1"]);
    let tls = serving(dir.path(), (&first, &first_key), None);
    let (cert_file, key_file) = (tls.cert_file.clone(), tls.key_file.clone());
    let server = ctx.start_server(|o| o.tls = Some(tls)).await;
    let addr = server.local_addr().expect("a TCP address");
    assert_eq!(served(addr, &ca.pem()).await, der(&first));

    // Replaced in place, as a rotation script would.
    let (second, second_key) = ca.issue(&["127.0.0.1"]);
    std::fs::write(&key_file, &second_key).unwrap();
    std::fs::write(&cert_file, &second).unwrap();
    assert_eq!(
        served(addr, &ca.pem()).await,
        der(&second),
        "after rotation"
    );

    // Swapped by rename, as cert-manager and kubelet do.
    let (third, third_key) = ca.issue(&["127.0.0.1"]);
    let staged = write(dir.path(), "staged.key", &third_key);
    std::fs::rename(&staged, &key_file).unwrap();
    let staged = write(dir.path(), "staged.crt", &third);
    std::fs::rename(&staged, &cert_file).unwrap();
    assert_eq!(served(addr, &ca.pem()).await, der(&third), "after rename");

    // A key that does not fit: the last good pair keeps serving.
    let (_, stray_key) = ca.issue(&["127.0.0.1"]);
    std::fs::write(&key_file, &stray_key).unwrap();
    assert_eq!(
        served(addr, &ca.pem()).await,
        der(&third),
        "after a bad key"
    );
    server.shutdown().await.unwrap();
}

/// Start-up errors name the file and the problem.
pub async fn bad_tls_files_stop_the_start(ctx: Ctx) {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("kubeshard test CA");
    let (cert, _) = ca.issue(&["127.0.0.1"]);
    let (_, other_key) = ca.issue(&["127.0.0.1"]);
    let cert_file = write(dir.path(), "server.crt", &cert);
    let cases = [
        (
            ServerTls {
                cert_file: cert_file.clone(),
                key_file: dir.path().join("missing.key"),
                trusted_ca_file: None,
            },
            "cannot read key",
        ),
        (
            ServerTls {
                cert_file: cert_file.clone(),
                key_file: write(dir.path(), "other.key", &other_key),
                trusted_ca_file: None,
            },
            "does not fit the certificate",
        ),
        (
            ServerTls {
                cert_file: write(dir.path(), "empty.crt", "not a certificate\n"),
                key_file: write(dir.path(), "k.key", &other_key),
                trusted_ca_file: None,
            },
            "has no certificate",
        ),
    ];
    for (tls, expected) in cases {
        let mut options = ctx.options();
        options.tls = Some(tls);
        let Err(e) = kubeshard::start(options).await else {
            panic!("started with bad TLS files (expected {expected:?})");
        };
        assert!(e.to_string().contains(expected), "{e}");
    }
}

/// A gRPC channel over the Unix socket at `path`.
async fn unix_channel(path: PathBuf) -> tonic::transport::Channel {
    let connector = tower::service_fn(move |_: http::Uri| {
        let path = path.clone();
        async move {
            let stream = tokio::net::UnixStream::connect(&path).await?;
            Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(stream))
        }
    });
    channel_with(connector, "the Unix socket").await
}

/// A channel whose connections `connector` makes (the URI is not used).
async fn channel_with<C>(connector: C, over: &str) -> tonic::transport::Channel
where
    C: tower::Service<http::Uri> + Send + 'static,
    C::Response: hyper::rt::Read + hyper::rt::Write + Send + Unpin + 'static,
    C::Future: Send + 'static,
    C::Error: std::error::Error + Send + Sync + 'static,
{
    tonic::transport::Endpoint::try_from("http://kubeshard.sock")
        .unwrap()
        .connect_with_connector(connector)
        .await
        .unwrap_or_else(|e| panic!("connect over {over}: {e}"))
}

/// The same with TLS trusting `ca_pem` (what `unixs://PATH` means to etcd's
/// clients).
async fn unix_tls_channel(path: PathBuf, ca_pem: String) -> tonic::transport::Channel {
    let connector = tower::service_fn(move |_: http::Uri| {
        let (path, ca_pem) = (path.clone(), ca_pem.clone());
        async move {
            let stream = tokio::net::UnixStream::connect(&path).await?;
            let mut roots = rustls::RootCertStore::empty();
            roots
                .add(CertificateDer::from_pem_slice(ca_pem.as_bytes()).unwrap())
                .unwrap();
            let provider = Arc::new(rustls::crypto::ring::default_provider());
            let mut config = rustls::ClientConfig::builder_with_provider(provider)
                .with_safe_default_protocol_versions()
                .unwrap()
                .with_root_certificates(roots)
                .with_no_client_auth();
            config.alpn_protocols = vec![b"h2".to_vec()];
            let name = ServerName::try_from("localhost").unwrap();
            let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
                .connect(name, stream)
                .await?;
            Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(tls))
        }
    });
    channel_with(connector, "TLS on the Unix socket").await
}

/// kine's `unix://PATH`: the etcd API on a Unix socket, plain and with TLS;
/// a stale socket file is replaced, anything else at the path refused, and
/// the socket removed when the router stops.
pub async fn unix_socket_serves_the_etcd_api(ctx: Ctx) {
    use kubeshard_proto::etcdserverpb::kv_client::KvClient;
    use kubeshard_proto::etcdserverpb::{PutRequest, RangeRequest};
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("kubeshard.sock");
    // A socket file left by a router that did not stop cleanly.
    drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
    let listen = format!("unix://{}", path.display());
    let server = ctx
        .start_server(|o| o.listen_address = listen.clone())
        .await;
    assert_eq!(server.local_addr(), None);
    assert_eq!(
        server.listening(),
        &kubeshard::Listening::Unix(path.clone())
    );
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600, "socket mode {mode:o}");
    }
    let mut kv = KvClient::new(unix_channel(path.clone()).await);
    let put = PutRequest {
        key: b"/unix/a".to_vec(),
        value: b"1".to_vec(),
        ..Default::default()
    };
    kv.put(put).await.expect("put over the Unix socket");
    let got = kv
        .range(RangeRequest {
            key: b"/unix/a".to_vec(),
            ..Default::default()
        })
        .await
        .expect("range over the Unix socket")
        .into_inner();
    assert_eq!(got.kvs[0].value, b"1");
    // A socket a router serves on is not taken over by another.
    let mut second = ctx.options();
    second.listen_address = listen.clone();
    let Err(e) = kubeshard::start(second).await else {
        panic!("a second router took over a served socket");
    };
    assert!(e.to_string().contains("served by another process"), "{e}");
    kv.put(PutRequest {
        key: b"/unix/b".to_vec(),
        ..Default::default()
    })
    .await
    .expect("the first router still serves");
    server.shutdown().await.unwrap();
    assert!(!path.exists(), "socket left behind after the stop");

    // TLS on the socket.
    let ca = Ca::new("kubeshard test CA");
    let (cert, key) = ca.issue(&["localhost"]);
    let tls = serving(dir.path(), (&cert, &key), None);
    let server = ctx
        .start_server(|o| {
            o.listen_address = listen.clone();
            o.tls = Some(tls);
        })
        .await;
    let mut kv = KvClient::new(unix_tls_channel(path.clone(), ca.pem()).await);
    let got = kv
        .range(RangeRequest {
            key: b"/unix/a".to_vec(),
            ..Default::default()
        })
        .await
        .expect("range over TLS on the Unix socket")
        .into_inner();
    assert_eq!(got.kvs[0].value, b"1");
    server.shutdown().await.unwrap();

    // A file that is not a socket is not kubeshard's to replace.
    std::fs::write(&path, "data").unwrap();
    let mut options = ctx.options();
    options.listen_address = listen;
    let Err(e) = kubeshard::start(options).await else {
        panic!("started over a regular file");
    };
    assert!(e.to_string().contains("exists and is not a socket"), "{e}");
}

/// TLS to a database that requires it: scripts/test.sh gives PostgreSQL and
/// MariaDB a server certificate of a CA it makes, and a user that may only
/// log in over TLS with a client certificate of that CA. kine's flags get
/// kubeshard in; without TLS, or trusting another CA, the start fails with
/// an error naming the shard. `--skip-verify` (MySQL only, as in kine)
/// encrypts without verifying.
pub async fn database_requiring_tls(backend: Backend) {
    use kubeshard_config::{DatabaseTls, Endpoint, ServerOptions};
    let (var, plain) = match backend {
        Backend::Postgres => ("KUBESHARD_TEST_POSTGRES_TLS_URL", "sslmode=disable"),
        Backend::Mysql => ("KUBESHARD_TEST_MYSQL_TLS_URL", "ssl-mode=DISABLED"),
        Backend::Sqlite => unreachable!("SQLite has no TLS"),
    };
    let (Ok(base), Ok(dir)) = (std::env::var(var), std::env::var("KUBESHARD_TEST_TLS_DIR")) else {
        if std::env::var("KUBESHARD_TEST_REQUIRE_ALL").as_deref() == Ok("1") {
            panic!("{var} or KUBESHARD_TEST_TLS_DIR is not set but KUBESHARD_TEST_REQUIRE_ALL=1");
        }
        eprintln!("\n!!!!! SKIPPED: {var} is not set (scripts/test.sh sets it) !!!!!\n");
        return;
    };
    let dir = PathBuf::from(dir);
    let database = format!("ks_it_tls_{:016x}", rand::random::<u64>());
    let raw = crate::support::with_database(&base, &database);
    let tls = DatabaseTls {
        ca_file: Some(dir.join("ca.crt")),
        cert_file: Some(dir.join("client.crt")),
        key_file: Some(dir.join("client.key")),
        skip_verify: false,
    };
    let start = |endpoint: Endpoint| {
        let mut options = ServerOptions::for_endpoint(endpoint, "127.0.0.1:0");
        options.slow_sql = kubeshard_config::SlowSql::default();
        kubeshard::start(options)
    };

    let endpoint = Endpoint::parse(&raw).unwrap().with_database_tls(&tls);
    let server = start(endpoint)
        .await
        .unwrap_or_else(|e| panic!("over TLS with the test CA: {e}"));
    let mut client = crate::support::connect(&server).await;
    client.put("/dbtls/a", "1", None).await.expect("put");
    let got = client.get("/dbtls/a", None).await.expect("get");
    assert_eq!(got.kvs()[0].value(), b"1");
    drop(client);
    server.shutdown().await.unwrap();

    let refused = |what: &str, e: kubeshard::ServeError, expected: &[&str]| {
        let text = e.to_string();
        assert!(text.contains("shard default"), "{what}: {text}");
        assert!(
            expected.iter().any(|x| text.to_lowercase().contains(x)),
            "{what}: {text}"
        );
    };
    let without = Endpoint::parse(&format!("{raw}?{plain}")).unwrap();
    let Err(e) = start(without).await else {
        panic!("logged in without TLS");
    };
    refused(
        "without TLS",
        e,
        &["ssl", "tls", "denied", "reject", "authentication"],
    );

    let other = DatabaseTls {
        ca_file: Some(dir.join("other-ca.crt")),
        ..tls.clone()
    };
    let Err(e) = start(Endpoint::parse(&raw).unwrap().with_database_tls(&other)).await else {
        panic!("trusted a server certificate of another CA");
    };
    refused("another CA", e, &["certificate", "unknownissuer"]);

    if backend == Backend::Mysql {
        let skip = DatabaseTls {
            skip_verify: true,
            ..other
        };
        let server = start(Endpoint::parse(&raw).unwrap().with_database_tls(&skip))
            .await
            .unwrap_or_else(|e| panic!("--skip-verify: {e}"));
        server.shutdown().await.unwrap();
    }
    let admin = match backend {
        Backend::Postgres => std::env::var("KUBESHARD_TEST_POSTGRES_URL"),
        _ => std::env::var("KUBESHARD_TEST_MYSQL_URL"),
    };
    if let Ok(admin) = admin {
        crate::support::drop_database(backend, &admin, &database);
    }
}
