//! Servers under test, started as subprocesses: a real etcd and kubeshard.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use etcd_client::{Client, ConnectOptions};
use tempfile::TempDir;

use crate::env::{EtcdTools, free_port, log_tail, skip};

/// How long a started server may take to answer its first request.
pub const START_TIMEOUT: Duration = Duration::from_secs(30);

/// Something that speaks the etcd v3 API on a loopback port.
pub trait Server {
    /// `http://127.0.0.1:PORT`
    fn endpoint(&self) -> String;
    /// A short description for messages (`etcd 127.0.0.1:1234`).
    fn describe(&self) -> String;
    /// The tail of the server's log (stderr and stdout).
    fn log_tail(&self) -> String;
}

/// Connects the etcd client the way the tests use it: `hasleader` metadata on
/// (as kube-apiserver does), bounded connect.
pub async fn connect(endpoint: &str) -> Result<Client, etcd_client::Error> {
    Client::connect(
        [endpoint],
        Some(
            ConnectOptions::new()
                .with_require_leader(true)
                .with_connect_timeout(Duration::from_secs(5)),
        ),
    )
    .await
}

/// Waits until the server answers a linearizable Range, or its process exits,
/// or [`START_TIMEOUT`] passes.
async fn wait_ready(endpoint: &str, child: &mut Child) -> Result<(), String> {
    let deadline = Instant::now() + START_TIMEOUT;
    let mut last_err = String::from("no attempt yet");
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            return Err(format!("process exited with {status} before answering"));
        }
        if Instant::now() > deadline {
            return Err(format!(
                "did not answer within {START_TIMEOUT:?}; last error: {last_err}"
            ));
        }
        let attempt = async {
            let mut c = connect(endpoint).await?;
            c.get("/registry/health", None).await
        };
        match tokio::time::timeout(Duration::from_secs(2), attempt).await {
            Ok(Ok(_)) => return Ok(()),
            Ok(Err(e)) => last_err = e.to_string(),
            Err(_) => last_err = "request timed out after 2s".into(),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn kill(child: &mut Child) {
    let _ = child.kill();
    let _ = child.wait();
}

fn log_file(path: &Path) -> std::fs::File {
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .unwrap_or_else(|e| panic!("cannot create log file {}: {e}", path.display()))
}

// ------------------------------------------------------------------ etcd ---

/// A single-member etcd in a temporary directory, killed on drop.
#[derive(Debug)]
pub struct EtcdServer {
    child: Child,
    port: u16,
    log: PathBuf,
    _dir: TempDir,
}

impl EtcdServer {
    /// Starts etcd on free loopback ports and waits until it answers. Panics
    /// (with the log tail) if it cannot be started in three attempts.
    pub async fn start(tools: &EtcdTools) -> EtcdServer {
        let mut failures = Vec::new();
        for attempt in 1..=3 {
            let dir = tempfile::Builder::new()
                .prefix("kubeshard-etcd-")
                .tempdir()
                .expect("create a temporary directory for etcd");
            let (client, peer) = (free_port(), free_port());
            let client_url = format!("http://127.0.0.1:{client}");
            let peer_url = format!("http://127.0.0.1:{peer}");
            let log = dir.path().join("etcd.log");
            let mut child = Command::new(&tools.etcd)
                .arg("--name")
                .arg("default")
                .arg("--data-dir")
                .arg(dir.path().join("data"))
                .arg("--listen-client-urls")
                .arg(&client_url)
                .arg("--advertise-client-urls")
                .arg(&client_url)
                .arg("--listen-peer-urls")
                .arg(&peer_url)
                .arg("--initial-advertise-peer-urls")
                .arg(&peer_url)
                .arg("--initial-cluster")
                .arg(format!("default={peer_url}"))
                .stdin(Stdio::null())
                .stdout(log_file(&log))
                .stderr(log_file(&log))
                .spawn()
                .unwrap_or_else(|e| panic!("cannot spawn {}: {e}", tools.etcd.display()));
            match wait_ready(&client_url, &mut child).await {
                Ok(()) => {
                    return EtcdServer {
                        child,
                        port: client,
                        log,
                        _dir: dir,
                    };
                }
                Err(e) => {
                    kill(&mut child);
                    failures.push(format!(
                        "attempt {attempt}: etcd on {client_url}: {e}\n{}",
                        log_tail(&log, 40)
                    ));
                }
            }
        }
        panic!("cannot start etcd:\n{}", failures.join("\n"));
    }
}

impl Server for EtcdServer {
    fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }
    fn describe(&self) -> String {
        format!("etcd on 127.0.0.1:{}", self.port)
    }
    fn log_tail(&self) -> String {
        log_tail(&self.log, 60)
    }
}

impl Drop for EtcdServer {
    fn drop(&mut self) {
        kill(&mut self.child);
    }
}

// ------------------------------------------------------------- kubeshard ---

/// The SQL backend kubeshard runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
    Mysql,
}

impl Backend {
    pub fn name(self) -> &'static str {
        match self {
            Backend::Sqlite => "sqlite",
            Backend::Postgres => "postgres",
            Backend::Mysql => "mysql",
        }
    }

    /// The env var with the base URL of the database server, if any.
    pub fn url_env(self) -> Option<&'static str> {
        match self {
            Backend::Sqlite => None,
            Backend::Postgres => Some("KUBESHARD_TEST_POSTGRES_URL"),
            Backend::Mysql => Some("KUBESHARD_TEST_MYSQL_URL"),
        }
    }

    /// The `--endpoint` URL for a fresh database: `sqlite:///<dir>/state.db`,
    /// or the base URL from the env var with its path replaced by a new unique
    /// database name. `Err` explains why the backend is unavailable.
    pub fn fresh_endpoint(self, dir: &Path) -> Result<String, String> {
        let Some(var) = self.url_env() else {
            return Ok(format!("sqlite://{}", dir.join("state.db").display()));
        };
        let base = std::env::var(var).map_err(|_| format!("{var} is not set"))?;
        fresh_database_url(&base).map_err(|e| format!("{var}={base:?}: {e}"))
    }
}

/// `base` with its path replaced by `/ks_<16 random hex digits>`.
pub fn fresh_database_url(base: &str) -> Result<String, String> {
    let mut url = url::Url::parse(base).map_err(|e| format!("not a URL: {e}"))?;
    if url.cannot_be_a_base() {
        return Err("URL has no path to replace".into());
    }
    url.set_path(&format!("/ks_{:016x}", rand::random::<u64>()));
    Ok(url.to_string())
}

/// The kubeshard binary: `KUBESHARD_BIN`, or built once per test process with
/// `$CARGO build -p kubeshard --bin kubeshard` in the workspace root.
pub async fn kubeshard_binary() -> PathBuf {
    static BUILT: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    if let Ok(bin) = std::env::var("KUBESHARD_BIN") {
        return PathBuf::from(bin);
    }
    let built = tokio::task::spawn_blocking(|| BUILT.get_or_init(build_kubeshard).clone())
        .await
        .expect("the kubeshard build task panicked");
    match built {
        Ok(path) => path,
        Err(e) => panic!("{e}"),
    }
}

fn build_kubeshard() -> Result<PathBuf, String> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .ok_or("CARGO_MANIFEST_DIR has no parent")?
        .to_path_buf();
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let target_dir = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .map(|d| if d.is_absolute() { d } else { root.join(d) })
        .unwrap_or_else(|| root.join("target"));
    eprintln!(
        "building kubeshard: {cargo} build -p kubeshard --bin kubeshard (in {})",
        root.display()
    );
    let status = Command::new(&cargo)
        .args(["build", "-p", "kubeshard", "--bin", "kubeshard"])
        .current_dir(&root)
        .stdin(Stdio::null())
        .status()
        .map_err(|e| format!("cannot run {cargo}: {e}"))?;
    if !status.success() {
        return Err(format!(
            "`{cargo} build -p kubeshard --bin kubeshard` failed with {status} (set KUBESHARD_BIN to use a prebuilt binary)"
        ));
    }
    let bin = target_dir.join("debug").join("kubeshard");
    if !bin.exists() {
        return Err(format!(
            "build succeeded but {} does not exist",
            bin.display()
        ));
    }
    Ok(bin)
}

/// A kubeshard process on one backend, killed on drop.
#[derive(Debug)]
pub struct KubeshardServer {
    child: Child,
    port: u16,
    backend: Backend,
    /// What the server was started with (`--endpoint URL` or `--config FILE`).
    args: String,
    /// Every database the server uses (dropped on drop).
    endpoint_urls: Vec<String>,
    log: PathBuf,
    _dir: TempDir,
}

/// The shards of the sharded differential runs (issue 3): pods on one
/// shard, events on another, everything else on the default shard.
pub const SHARDED_TOPOLOGY: [(&str, Option<&str>); 3] = [
    ("core", None),
    ("pods", Some("/registry/pods/")),
    ("events", Some("/registry/events/")),
];

/// Writes `dir/topology.toml`: [`SHARDED_TOPOLOGY`], shard i on a fresh
/// database of `backends[i]`. Returns the file and the databases' URLs, or
/// `None` like [`KubeshardServer::start`].
pub fn sharded_topology(
    test: &str,
    backends: [Backend; 3],
    dir: &Path,
) -> Option<(PathBuf, Vec<String>)> {
    let mut toml = String::from("default_shard = \"core\"\n");
    let mut urls = Vec::new();
    for ((name, _), backend) in SHARDED_TOPOLOGY.iter().zip(backends) {
        let url = match backend.fresh_endpoint(&dir.join(name)) {
            Ok(u) => u,
            Err(why) => {
                return skip(
                    test,
                    &format!("backend {} unavailable: {why}", backend.name()),
                );
            }
        };
        toml.push_str(&format!(
            "\n[[shards]]\nname = \"{name}\"\nendpoint = \"{url}\"\n"
        ));
        urls.push(url);
    }
    for (name, prefix) in SHARDED_TOPOLOGY {
        if let Some(prefix) = prefix {
            toml.push_str(&format!(
                "\n[[routes]]\nprefix = \"{prefix}\"\nshard = \"{name}\"\n"
            ));
        }
    }
    let config = dir.join("topology.toml");
    std::fs::write(&config, toml).expect("write the topology file");
    Some((config, urls))
}

impl KubeshardServer {
    /// Starts kubeshard on `backend` with a fresh database. Returns `None` (after
    /// a loud message) if the backend is not configured, unless REQUIRE_ALL is
    /// set, in which case it panics. Panics with the server's log tail if the
    /// server does not answer within [`START_TIMEOUT`].
    pub async fn start(test: &str, backend: Backend) -> Option<KubeshardServer> {
        let dir = tempfile::Builder::new()
            .prefix("kubeshard-server-")
            .tempdir()
            .expect("create a temporary directory for kubeshard");
        let endpoint_url = match backend.fresh_endpoint(dir.path()) {
            Ok(u) => u,
            Err(why) => {
                return skip(
                    test,
                    &format!("backend {} unavailable: {why}", backend.name()),
                );
            }
        };
        let args = vec!["--endpoint".to_string(), endpoint_url.clone()];
        Some(Self::spawn(backend, args, Vec::new(), vec![endpoint_url], dir).await)
    }

    /// Starts kubeshard with these arguments and environment variables (a
    /// kine command line), besides the listen and metrics addresses.
    /// `databases`: URLs of the databases to drop afterwards.
    pub async fn start_with(
        backend: Backend,
        args: Vec<String>,
        env: Vec<(String, String)>,
        databases: Vec<String>,
    ) -> KubeshardServer {
        let dir = tempfile::Builder::new()
            .prefix("kubeshard-server-")
            .tempdir()
            .expect("create a temporary directory for kubeshard");
        Self::spawn(backend, args, env, databases, dir).await
    }

    /// Starts kubeshard with `--config` on [`SHARDED_TOPOLOGY`], shard i on
    /// a fresh database of `backends[i]`. Returns `None` like
    /// [`KubeshardServer::start`].
    pub async fn start_sharded(test: &str, backends: [Backend; 3]) -> Option<KubeshardServer> {
        let dir = tempfile::Builder::new()
            .prefix("kubeshard-server-")
            .tempdir()
            .expect("create a temporary directory for kubeshard");
        let (config, urls) = sharded_topology(test, backends, dir.path())?;
        let args = vec!["--config".to_string(), config.display().to_string()];
        Some(Self::spawn(backends[0], args, Vec::new(), urls, dir).await)
    }

    async fn spawn(
        backend: Backend,
        args: Vec<String>,
        env: Vec<(String, String)>,
        endpoint_urls: Vec<String>,
        dir: TempDir,
    ) -> KubeshardServer {
        let bin = kubeshard_binary().await;
        let log = dir.path().join("kubeshard.log");
        let mut failures = Vec::new();
        for attempt in 1..=3 {
            let port = free_port();
            let listen = format!("127.0.0.1:{port}");
            let mut child = Command::new(&bin)
                .arg("--listen-address")
                .arg(&listen)
                .args(&args)
                // Several servers run at once: each gets its own metrics port.
                .arg("--metrics-bind-address")
                .arg("127.0.0.1:0")
                .envs(env.iter().map(|(k, v)| (k, v)))
                // Plain logs in the captured file (tracing-subscriber honours it).
                .env("NO_COLOR", "1")
                .stdin(Stdio::null())
                .stdout(log_file(&log))
                .stderr(log_file(&log))
                .spawn()
                .unwrap_or_else(|e| panic!("cannot spawn {}: {e}", bin.display()));
            let endpoint = format!("http://{listen}");
            match wait_ready(&endpoint, &mut child).await {
                Ok(()) => {
                    return KubeshardServer {
                        child,
                        port,
                        backend,
                        args: args.join(" "),
                        endpoint_urls,
                        log,
                        _dir: dir,
                    };
                }
                Err(e) => {
                    kill(&mut child);
                    failures.push(format!("attempt {attempt}: kubeshard on {listen}: {e}"));
                    // Only a lost port race is worth another attempt.
                    if !std::fs::read_to_string(&log)
                        .unwrap_or_default()
                        .to_lowercase()
                        .contains("address already in use")
                    {
                        break;
                    }
                }
            }
        }
        panic!(
            "cannot start kubeshard ({} --listen-address 127.0.0.1:PORT {}):\n{}\n{}",
            bin.display(),
            args.join(" "),
            failures.join("\n"),
            log_tail(&log, 60)
        );
    }

    pub fn backend(&self) -> Backend {
        self.backend
    }

    /// Sends SIGTERM and waits up to `limit` for the process to exit; its
    /// exit status, or why there is none.
    pub fn terminate(&mut self, limit: Duration) -> Result<std::process::ExitStatus, String> {
        let sent = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .map_err(|e| format!("cannot run kill: {e}"))?;
        if !sent.success() {
            return Err(format!("kill -TERM failed: {sent}"));
        }
        let started = Instant::now();
        loop {
            match self.child.try_wait() {
                Ok(Some(status)) => return Ok(status),
                Ok(None) if started.elapsed() < limit => {
                    std::thread::sleep(Duration::from_millis(20))
                }
                Ok(None) => return Err(format!("still running {limit:?} after SIGTERM")),
                Err(e) => return Err(format!("cannot wait for kubeshard: {e}")),
            }
        }
    }

    /// Whether the process still runs (it has not exited or crashed).
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// The whole log so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The databases the server uses (one per shard).
    pub fn endpoint_urls(&self) -> &[String] {
        &self.endpoint_urls
    }
}

impl Server for KubeshardServer {
    fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }
    fn describe(&self) -> String {
        format!(
            "kubeshard on 127.0.0.1:{} ({} backend, {})",
            self.port,
            self.backend.name(),
            self.args
        )
    }
    fn log_tail(&self) -> String {
        log_tail(&self.log, 60)
    }
}

impl Drop for KubeshardServer {
    fn drop(&mut self) {
        kill(&mut self.child);
        // Each run creates a fresh database: remove it so runs do not pile up
        // databases on the shared PostgreSQL and MariaDB (best effort).
        for url in &self.endpoint_urls {
            drop_database(url);
        }
    }
}

/// Drops the PostgreSQL or MySQL database named by `endpoint_url`, if any.
pub fn drop_database(endpoint_url: &str) {
    let Ok(url) = url::Url::parse(endpoint_url) else {
        return;
    };
    let database = url.path().trim_start_matches('/').to_string();
    if !database.starts_with("ks_") {
        return;
    }
    let output = match url.scheme() {
        "postgres" | "postgresql" => {
            let mut server = url.clone();
            server.set_path("/postgres");
            Command::new("psql")
                .arg(server.as_str())
                .args([
                    "-qtAc",
                    &format!("DROP DATABASE IF EXISTS \"{database}\" WITH (FORCE)"),
                ])
                .stdin(Stdio::null())
                .output()
        }
        "mysql" => Command::new("mysql")
            .args(["-h", url.host_str().unwrap_or("127.0.0.1")])
            .args(["-P", &url.port().unwrap_or(3306).to_string()])
            .args(["-u", url.username()])
            .env("MYSQL_PWD", url.password().unwrap_or_default())
            .args(["-e", &format!("DROP DATABASE IF EXISTS `{database}`")])
            .stdin(Stdio::null())
            .output(),
        _ => return,
    };
    if let Ok(o) = output
        && !o.status.success()
    {
        eprintln!(
            "could not drop test database {database}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
    }
}

/// Starts kubeshard with `args` (a listen address and no metrics are
/// added) and tells whether it serves or refuses: `Err(stderr)` when it
/// exits, `Ok(())` once its port accepts (it is then stopped with SIGTERM,
/// so that it removes its record from the default shard at once). A router
/// that neither serves nor exits within 30 s fails the test, instead of
/// hanging it.
pub async fn serves_or_refuses(args: &[&str]) -> Result<(), String> {
    let bin = kubeshard_binary().await;
    let port = free_port();
    let dir = tempfile::tempdir().expect("temporary directory");
    let log = dir.path().join("kubeshard.log");
    let mut child = Command::new(&bin)
        .args(args)
        .args(["--metrics-bind-address", ""])
        .arg("--listen-address")
        .arg(format!("127.0.0.1:{port}"))
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log_file(&log))
        .spawn()
        .unwrap_or_else(|e| panic!("cannot spawn {}: {e}", bin.display()));
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(Some(_)) = child.try_wait() {
            return Err(std::fs::read_to_string(&log).unwrap_or_default());
        }
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            let _ = Command::new("kill")
                .args(["-TERM", &child.id().to_string()])
                .status();
            let _ = child.wait();
            return Ok(());
        }
        if Instant::now() > deadline {
            kill(&mut child);
            panic!(
                "kubeshard {} neither served nor refused in 30 s",
                args.join(" ")
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fresh_database_url_replaces_the_path() {
        let u = fresh_database_url("postgres://kubeshard:kubeshard@127.0.0.1:5432/postgres")
            .expect("valid URL");
        assert!(
            u.starts_with("postgres://kubeshard:kubeshard@127.0.0.1:5432/ks_"),
            "{u}"
        );
        assert_eq!(
            u.len(),
            "postgres://kubeshard:kubeshard@127.0.0.1:5432/ks_".len() + 16
        );
        let m = fresh_database_url(
            "mysql://kubeshard:kubeshard@127.0.0.1:3306/mysql?ssl-mode=disabled",
        )
        .expect("valid URL");
        assert!(
            m.starts_with("mysql://kubeshard:kubeshard@127.0.0.1:3306/ks_"),
            "{m}"
        );
        assert!(m.ends_with("?ssl-mode=disabled"), "{m}");
    }

    #[test]
    fn sqlite_endpoint_is_absolute() {
        let e = Backend::Sqlite
            .fresh_endpoint(Path::new("/tmp/x"))
            .expect("sqlite is always available");
        assert_eq!(e, "sqlite:///tmp/x/state.db");
    }
}
