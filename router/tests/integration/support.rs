//! The harness: backends, an in-process server, an etcd client, event
//! snapshots and a model of the key space that predicts etcd's answers.

use std::collections::BTreeMap;
use std::fmt::Debug;
use std::future::Future;
use std::process::{Command, Stdio};
use std::time::Duration;

use etcd_client::{
    Client, DeleteOptions, Event, EventType, GetOptions, KeyValue, PutOptions, ResponseHeader, Txn,
    TxnOp, WatchResponse, WatchResponseStream,
};
use kubeshard::RunningServer;
use kubeshard_config::{Endpoint, ServerOptions};
use tempfile::TempDir;
use tokio::time::Instant;

/// A scenario that has not finished by then has hung.
const SCENARIO_TIMEOUT: Duration = Duration::from_secs(150);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
    Mysql,
}

impl Backend {
    fn env_var(self) -> Option<&'static str> {
        match self {
            Backend::Sqlite => None,
            Backend::Postgres => Some("KUBESHARD_TEST_POSTGRES_URL"),
            Backend::Mysql => Some("KUBESHARD_TEST_MYSQL_URL"),
        }
    }
}

/// One test's database: a fresh SQLite file or a fresh PostgreSQL/MySQL
/// database (the server creates it).
#[derive(Debug)]
pub struct Ctx {
    pub backend: Backend,
    pub endpoint: Endpoint,
    /// The database name on PostgreSQL and MySQL.
    pub database: Option<String>,
    /// The URL from the environment (its database is an administrative one).
    pub admin_url: Option<String>,
    _dir: Option<TempDir>,
}

impl Ctx {
    /// None when the backend's variable is missing and not all are required.
    fn new(backend: Backend) -> Option<Ctx> {
        let Some(var) = backend.env_var() else {
            let dir = tempfile::tempdir().expect("temporary directory");
            let raw = format!("sqlite://{}/state.db", dir.path().display());
            let endpoint = Endpoint::parse(&raw).expect("sqlite endpoint");
            return Some(Ctx {
                backend,
                endpoint,
                database: None,
                admin_url: None,
                _dir: Some(dir),
            });
        };
        let base = match std::env::var(var) {
            Ok(url) if !url.trim().is_empty() => url,
            _ => {
                if std::env::var("KUBESHARD_TEST_REQUIRE_ALL").as_deref() == Ok("1") {
                    panic!("{var} is not set but KUBESHARD_TEST_REQUIRE_ALL=1");
                }
                eprintln!(
                    "\n!!!!! SKIPPED on {backend:?}: {var} is not set (source scripts/dev-env.sh) !!!!!\n"
                );
                return None;
            }
        };
        let database = format!("ks_it_{:016x}", rand::random::<u64>());
        let raw = with_database(&base, &database);
        let endpoint = Endpoint::parse(&raw).unwrap_or_else(|e| panic!("{var}: {e}"));
        Some(Ctx {
            backend,
            endpoint,
            database: Some(database),
            admin_url: Some(base),
            _dir: None,
        })
    }

    /// The options of a server on this database, with an HTTP endpoint.
    pub fn options(&self) -> ServerOptions {
        let mut options = ServerOptions::for_endpoint(self.endpoint.clone(), "127.0.0.1:0");
        options.metrics_address = Some("127.0.0.1:0".into());
        options
    }

    /// Starts a server on this database, its options changed by `configure`.
    pub async fn start_server(&self, configure: impl FnOnce(&mut ServerOptions)) -> RunningServer {
        let mut options = self.options();
        configure(&mut options);
        kubeshard::start(options)
            .await
            .unwrap_or_else(|e| panic!("server on {:?} did not start: {e}", self.backend))
    }

    /// Starts a server on this database and connects a client to it.
    pub async fn start(&self) -> Node {
        let server = self.start_server(|_| {}).await;
        let client = connect(&server).await;
        Node { server, client }
    }
}

/// `scheme://authority/anything` becomes `scheme://authority/database`.
pub fn with_database(url: &str, database: &str) -> String {
    let (scheme, rest) = url.split_once("://").expect("database URL with a scheme");
    let authority = rest.split('/').next().unwrap_or_default();
    format!("{scheme}://{authority}/{database}")
}

/// A running server and a client connected to it.
pub struct Node {
    pub server: RunningServer,
    pub client: Client,
}

impl Node {
    /// Drops the client and shuts the server down; a hang fails the test.
    pub async fn stop(self) {
        let Node { server, client } = self;
        drop(client);
        tokio::time::timeout(Duration::from_secs(20), server.shutdown())
            .await
            .expect("server shutdown hung")
            .expect("server shutdown failed");
    }
}

pub async fn connect(server: &RunningServer) -> Client {
    Client::connect(
        [format!(
            "http://{}",
            server.local_addr().expect("a TCP address")
        )],
        None,
    )
    .await
    .expect("connect to the in-process server")
}

/// Runs one scenario on one backend, bounded in time; drops the database
/// after a success.
pub async fn run<F, Fut>(backend: Backend, name: &str, scenario: F)
where
    F: FnOnce(Ctx) -> Fut,
    Fut: Future<Output = ()>,
{
    let Some(ctx) = Ctx::new(backend) else {
        return;
    };
    let cleanup = (ctx.admin_url.clone(), ctx.database.clone());
    let started = Instant::now();
    if tokio::time::timeout(SCENARIO_TIMEOUT, scenario(ctx))
        .await
        .is_err()
    {
        panic!("{name} on {backend:?}: not finished after {SCENARIO_TIMEOUT:?} (hung)");
    }
    eprintln!("{name} on {backend:?}: {:.2?}", started.elapsed());
    if let (Some(url), Some(database)) = cleanup {
        drop_database(backend, &url, &database);
    }
}

/// Best effort: the databases are uniquely named, a leftover harms nothing.
pub fn drop_database(backend: Backend, url: &str, database: &str) {
    let output = match backend {
        Backend::Sqlite => return,
        Backend::Postgres => Command::new("psql")
            .arg(url)
            .args(["-v", "ON_ERROR_STOP=1", "-qtAc"])
            .arg(format!(
                "DROP DATABASE IF EXISTS \"{database}\" WITH (FORCE)"
            ))
            .stdin(Stdio::null())
            .output(),
        Backend::Mysql => {
            let m = MysqlParts::of(url);
            Command::new("mysql")
                .args(["-h", &m.host, "-P", &m.port, "-u", &m.user])
                .env("MYSQL_PWD", &m.password)
                .arg("-e")
                .arg(format!("DROP DATABASE IF EXISTS `{database}`"))
                .stdin(Stdio::null())
                .output()
        }
    };
    match output {
        Ok(o) if o.status.success() => {}
        Ok(o) => eprintln!(
            "could not drop test database {database}: {}",
            String::from_utf8_lossy(&o.stderr)
        ),
        Err(e) => eprintln!("could not drop test database {database}: {e}"),
    }
}

struct MysqlParts {
    user: String,
    password: String,
    host: String,
    port: String,
}

impl MysqlParts {
    fn of(url: &str) -> Self {
        let rest = url.split_once("://").map_or(url, |(_, r)| r);
        let authority = rest.split('/').next().unwrap_or_default();
        let (userinfo, address) = authority.rsplit_once('@').unwrap_or(("root", authority));
        let (user, password) = userinfo.split_once(':').unwrap_or((userinfo, ""));
        let address = address
            .strip_prefix("tcp(")
            .and_then(|a| a.strip_suffix(')'))
            .unwrap_or(address);
        let (host, port) = address.rsplit_once(':').unwrap_or((address, "3306"));
        MysqlParts {
            user: user.into(),
            password: password.into(),
            host: host.into(),
            port: port.into(),
        }
    }
}

/// An HTTP/1.1 answer: status, headers (names lower-cased) and body.
#[derive(Debug)]
pub struct HttpAnswer {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl HttpAnswer {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

/// One request to the router's HTTP endpoint, on its own connection.
pub async fn http(addr: std::net::SocketAddr, method: &str, path: &str) -> HttpAnswer {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let exchange = async {
        let mut stream = tokio::net::TcpStream::connect(addr).await?;
        stream
            .write_all(
                format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
                    .as_bytes(),
            )
            .await?;
        let mut raw = Vec::new();
        stream.read_to_end(&mut raw).await?;
        Ok::<_, std::io::Error>(raw)
    };
    let raw = tokio::time::timeout(Duration::from_secs(20), exchange)
        .await
        .unwrap_or_else(|_| panic!("{method} {path}: no answer within 20 s"))
        .unwrap_or_else(|e| panic!("{method} {path}: {e}"));
    let text = String::from_utf8(raw).expect("UTF-8 answer");
    let (head, body) = text.split_once("\r\n\r\n").expect("an HTTP answer");
    let mut lines = head.split("\r\n");
    let status = lines
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("{method} {path}: no status line in {head:?}"));
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_lowercase(), v.trim().to_string()))
        .collect();
    HttpAnswer {
        status,
        headers,
        body: body.to_string(),
    }
}

/// Runs a SQL statement with psql on the administrative database; its output.
pub async fn psql(url: &str, sql: &str) -> String {
    let url = url.to_string();
    let sql = sql.to_string();
    let output = tokio::task::spawn_blocking(move || {
        Command::new("psql")
            .arg(&url)
            .args(["-v", "ON_ERROR_STOP=1", "-qtAc", &sql])
            .stdin(Stdio::null())
            .output()
    })
    .await
    .expect("psql task")
    .expect("psql runs");
    assert!(
        output.status.success(),
        "psql failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).trim().to_string()
}

/// Instantiates scenarios for every backend: `name::sqlite`, `name::postgres`,
/// `name::mysql`.
#[macro_export]
macro_rules! on_all_backends {
    ($($module:ident :: $name:ident),* $(,)?) => {$(
        mod $name {
            use $crate::support::{Backend, run};

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn sqlite() {
                run(Backend::Sqlite, stringify!($name), $crate::$module::$name).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn postgres() {
                run(Backend::Postgres, stringify!($name), $crate::$module::$name).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn mysql() {
                run(Backend::Mysql, stringify!($name), $crate::$module::$name).await;
            }
        }
    )*};
}

/// Instantiates scenarios for SQLite only (what does not depend on the
/// database).
#[macro_export]
macro_rules! on_sqlite {
    ($($module:ident :: $name:ident),* $(,)?) => {$(
        mod $name {
            use $crate::support::{Backend, run};

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn sqlite() {
                run(Backend::Sqlite, stringify!($name), $crate::$module::$name).await;
            }
        }
    )*};
}

/// Instantiates scenarios for PostgreSQL only.
#[macro_export]
macro_rules! on_postgres {
    ($($module:ident :: $name:ident),* $(,)?) => {$(
        mod $name {
            use $crate::support::{Backend, run};

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn postgres() {
                run(Backend::Postgres, stringify!($name), $crate::$module::$name).await;
            }
        }
    )*};
}

// ---------------------------------------------------------------------------
// Events and comparisons

/// A key-value as a client sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Kv {
    pub key: String,
    pub value: String,
    pub create: i64,
    pub modified: i64,
    pub version: i64,
    pub lease: i64,
}

impl Kv {
    pub fn of(kv: &KeyValue) -> Self {
        Kv {
            key: String::from_utf8_lossy(kv.key()).into_owned(),
            value: String::from_utf8_lossy(kv.value()).into_owned(),
            create: kv.create_revision(),
            modified: kv.mod_revision(),
            version: kv.version(),
            lease: kv.lease(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Put,
    Delete,
}

/// A watch event with every field a client can see.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ev {
    pub kind: Kind,
    pub kv: Kv,
    pub prev: Option<Kv>,
}

impl Ev {
    pub fn of(e: &Event) -> Self {
        Ev {
            kind: kind_of(e),
            kv: Kv::of(e.kv().expect("event without kv")),
            prev: e.prev_kv().map(Kv::of),
        }
    }

    pub fn short(&self) -> Short {
        Short {
            kind: self.kind,
            key: self.kv.key.clone(),
            value: self.kv.value.clone(),
            revision: self.kv.modified,
        }
    }

    pub fn without_prev(&self) -> Ev {
        Ev {
            prev: None,
            ..self.clone()
        }
    }
}

/// The part of an event that concurrent writers can predict.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Short {
    pub kind: Kind,
    pub key: String,
    pub value: String,
    pub revision: i64,
}

pub fn kind_of(e: &Event) -> Kind {
    match e.event_type() {
        EventType::Put => Kind::Put,
        EventType::Delete => Kind::Delete,
    }
}

/// Equal lists, or a panic naming the first difference.
pub fn assert_same<T: PartialEq + Debug>(what: &str, got: &[T], want: &[T]) {
    if got == want {
        return;
    }
    let i = got
        .iter()
        .zip(want)
        .position(|(a, b)| a != b)
        .unwrap_or(got.len().min(want.len()));
    panic!(
        "{what}: received {} events, expected {}; first difference at #{i}:\n  got:  {:?}\n  want: {:?}",
        got.len(),
        want.len(),
        got.get(i),
        want.get(i)
    );
}

pub fn header_revision(header: Option<&ResponseHeader>) -> i64 {
    header.expect("response without header").revision()
}

/// The store's current revision, from a Range's header.
pub async fn current_revision(client: &mut Client) -> i64 {
    let r = client
        .get("/kubeshard-it/none", None)
        .await
        .expect("get for the revision");
    header_revision(r.header())
}

/// The next watch response, or a panic after `deadline`.
pub async fn next_response(
    stream: &mut WatchResponseStream,
    deadline: Instant,
    what: &str,
) -> WatchResponse {
    match tokio::time::timeout_at(deadline, stream.message()).await {
        Err(_) => panic!("{what}: no watch response before the deadline"),
        Ok(Err(e)) => panic!("{what}: watch stream failed: {e:?}"),
        Ok(Ok(None)) => panic!("{what}: watch stream ended"),
        Ok(Ok(Some(r))) => r,
    }
}

/// The answer to a progress request: watch_id -1, nothing else.
pub fn is_progress(r: &WatchResponse) -> bool {
    r.watch_id() == -1 && r.events().is_empty() && !r.created() && !r.canceled()
}

/// Reads until a created response (of any watch); panics on anything else.
pub async fn expect_created(stream: &mut WatchResponseStream, deadline: Instant) -> WatchResponse {
    let r = next_response(stream, deadline, "watch creation").await;
    assert!(
        r.created() && !r.canceled() && r.events().is_empty(),
        "expected a created response, got {r:?}"
    );
    r
}

/// What a watch stream delivered up to the answer of a progress request.
#[derive(Debug, Default)]
pub struct Collected {
    /// Events per watch id, in the order received.
    pub events: BTreeMap<i64, Vec<Ev>>,
    /// Ids of the created responses, in the order received.
    pub created: Vec<i64>,
    /// Header revision of the progress answer.
    pub progress: i64,
}

impl Collected {
    pub fn of(&self, id: i64) -> Vec<Ev> {
        self.events.get(&id).cloned().unwrap_or_default()
    }

    pub fn short(&self, id: i64) -> Vec<Short> {
        self.of(id).iter().map(Ev::short).collect()
    }
}

/// Collects events per watch until the answer to a progress request (which
/// the caller sends); a canceled response or an empty one fails.
pub async fn events_until_progress(
    mut stream: WatchResponseStream,
    deadline: Instant,
    what: &str,
) -> Collected {
    let mut got = Collected::default();
    loop {
        let r = next_response(&mut stream, deadline, what).await;
        if is_progress(&r) {
            got.progress = header_revision(r.header());
            return got;
        }
        assert!(!r.canceled(), "{what}: unexpected cancellation {r:?}");
        if r.created() {
            assert!(
                r.events().is_empty(),
                "{what}: created response with events"
            );
            assert!(
                !got.created.contains(&r.watch_id()),
                "{what}: watch {} created twice",
                r.watch_id()
            );
            got.created.push(r.watch_id());
            continue;
        }
        assert!(
            !r.events().is_empty(),
            "{what}: response without events: {r:?}"
        );
        let header = header_revision(r.header());
        for e in r.events() {
            let ev = Ev::of(e);
            assert!(
                ev.kv.modified <= header,
                "{what}: event at {} in a response with header {header}",
                ev.kv.modified
            );
            got.events.entry(r.watch_id()).or_default().push(ev);
        }
    }
}

/// [`events_until_progress`] in a task, so the stream is drained while the
/// test writes.
pub fn collect(
    stream: WatchResponseStream,
    deadline: Instant,
    what: &str,
) -> tokio::task::JoinHandle<Collected> {
    let what = what.to_string();
    tokio::spawn(async move { events_until_progress(stream, deadline, &what).await })
}

/// The gRPC status of a failed call: its code and message must be exact.
pub fn assert_status<T: Debug>(
    what: &str,
    result: Result<T, etcd_client::Error>,
    code: tonic::Code,
    message: &str,
) {
    match result {
        Err(etcd_client::Error::GRpcStatus(s)) => assert_eq!(
            (s.code(), s.message()),
            (code, message),
            "{what}: wrong gRPC status"
        ),
        other => panic!("{what}: expected {code:?} {message:?}, got {other:?}"),
    }
}

// ---------------------------------------------------------------------------
// A model of the key space

/// Predicts revisions, versions and the events of a single client's writes
/// (nobody else may write in its keys), and checks each response against it.
#[derive(Debug)]
pub struct Model {
    pub live: BTreeMap<String, Kv>,
    pub revision: i64,
    pub events: Vec<Ev>,
}

impl Model {
    pub async fn new(client: &mut Client) -> Model {
        Model {
            live: BTreeMap::new(),
            revision: current_revision(client).await,
            events: Vec::new(),
        }
    }

    fn record_put(&mut self, key: &str, value: &str, lease: i64, revision: i64) {
        let prev = self.live.get(key).cloned();
        let kv = Kv {
            key: key.into(),
            value: value.into(),
            create: prev.as_ref().map_or(revision, |p| p.create),
            modified: revision,
            version: prev.as_ref().map_or(1, |p| p.version + 1),
            lease,
        };
        self.live.insert(key.into(), kv.clone());
        self.events.push(Ev {
            kind: Kind::Put,
            kv,
            prev,
        });
    }

    /// etcd's delete event: a tombstone with only the key and the revision.
    fn record_delete(&mut self, key: &str, revision: i64) -> bool {
        let Some(prev) = self.live.remove(key) else {
            return false;
        };
        self.events.push(Ev {
            kind: Kind::Delete,
            kv: Kv {
                key: key.into(),
                value: String::new(),
                create: 0,
                modified: revision,
                version: 0,
                lease: 0,
            },
            prev: Some(prev),
        });
        true
    }

    fn check_revision(&mut self, what: &str, header: Option<&ResponseHeader>, changed: bool) {
        if changed {
            self.revision += 1;
        }
        assert_eq!(
            header_revision(header),
            self.revision,
            "{what}: header revision (changed: {changed})"
        );
    }

    pub async fn put(&mut self, client: &mut Client, key: &str, value: &str, lease: i64) -> i64 {
        let options = (lease != 0).then(|| PutOptions::new().with_lease(lease));
        let r = client
            .put(key, value, options)
            .await
            .unwrap_or_else(|e| panic!("put {key}: {e:?}"));
        self.check_revision(&format!("put {key}"), r.header(), true);
        self.record_put(key, value, lease, self.revision);
        self.revision
    }

    pub async fn delete(&mut self, client: &mut Client, key: &str) {
        let r = client
            .delete(key, None)
            .await
            .unwrap_or_else(|e| panic!("delete {key}: {e:?}"));
        let existed = self.live.contains_key(key);
        assert_eq!(
            r.deleted(),
            i64::from(existed),
            "delete {key}: deleted count"
        );
        self.check_revision(&format!("delete {key}"), r.header(), existed);
        self.record_delete(key, self.revision);
    }

    pub async fn delete_prefix(&mut self, client: &mut Client, prefix: &str) {
        let r = client
            .delete(prefix, Some(DeleteOptions::new().with_prefix()))
            .await
            .unwrap_or_else(|e| panic!("delete prefix {prefix}: {e:?}"));
        let keys: Vec<String> = self
            .live
            .keys()
            .filter(|k| k.starts_with(prefix))
            .cloned()
            .collect();
        assert_eq!(
            r.deleted(),
            keys.len() as i64,
            "delete prefix {prefix}: count"
        );
        self.check_revision(
            &format!("delete prefix {prefix}"),
            r.header(),
            !keys.is_empty(),
        );
        // etcd deletes a range in key order.
        for key in keys {
            self.record_delete(&key, self.revision);
        }
    }

    /// One Txn (no compares) of puts then deletes, in one revision.
    pub async fn txn(&mut self, client: &mut Client, puts: &[(&str, &str)], deletes: &[&str]) {
        let mut ops: Vec<TxnOp> = puts.iter().map(|(k, v)| TxnOp::put(*k, *v, None)).collect();
        ops.extend(deletes.iter().map(|k| TxnOp::delete(*k, None)));
        let r = client
            .txn(Txn::new().and_then(ops))
            .await
            .unwrap_or_else(|e| panic!("txn {puts:?} {deletes:?}: {e:?}"));
        assert!(r.succeeded(), "txn without compares must succeed");
        let changed = !puts.is_empty() || deletes.iter().any(|k| self.live.contains_key(*k));
        self.check_revision("txn", r.header(), changed);
        for (k, v) in puts {
            self.record_put(k, v, 0, self.revision);
        }
        for k in deletes {
            self.record_delete(k, self.revision);
        }
    }

    /// The events at or after `revision`.
    pub fn since(&self, revision: i64) -> Vec<Ev> {
        self.events
            .iter()
            .filter(|e| e.kv.modified >= revision)
            .cloned()
            .collect()
    }

    /// Checks a prefix read against the model.
    pub async fn check_live(&self, client: &mut Client, prefix: &str) {
        let r = client
            .get(prefix, Some(GetOptions::new().with_prefix()))
            .await
            .expect("get prefix");
        let got: Vec<Kv> = r.kvs().iter().map(Kv::of).collect();
        let want: Vec<Kv> = self
            .live
            .values()
            .filter(|kv| kv.key.starts_with(prefix))
            .cloned()
            .collect();
        assert_same(&format!("live keys under {prefix}"), &got, &want);
        assert_eq!(header_revision(r.header()), self.revision, "get header");
    }
}
