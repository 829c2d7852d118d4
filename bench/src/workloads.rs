//! The workloads. Each spreads its clients over the shared connections and
//! runs until the deadline (or the total number of operations), every
//! client with one request in flight.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, bail};
use etcd_client::{Client, Compare, CompareOp, GetOptions, PutOptions, Txn, TxnOp, WatchOptions};
use tokio::task::JoinSet;

use crate::Workload;
use crate::report::{ClientResult, Measured};

/// Connections, clients, how long to run and how keys look.
pub struct Run {
    pub connections: Vec<Client>,
    pub clients: usize,
    pub duration: Duration,
    /// Stop after this many operations in all (or at the deadline, if first).
    pub total: Option<u64>,
    /// Pad every key to at least this many bytes (0: no padding).
    pub key_size: usize,
}

impl Run {
    pub fn connection(&self, i: usize) -> Client {
        self.connections[i % self.connections.len()].clone()
    }
}

/// The key `base`, padded with `_` to `size` bytes. Padding at the end
/// keeps every key under its prefix and, for equal-length bases, in the
/// same order.
fn pad_key(mut base: String, size: usize) -> String {
    while base.len() < size {
        base.push('_');
    }
    base
}

/// What is left to send: time until the deadline and, with a total, a
/// count shared by all clients.
#[derive(Debug, Clone)]
pub struct Budget {
    deadline: Instant,
    left: Option<Arc<AtomicU64>>,
}

impl Budget {
    fn new(run: &Run, started: Instant) -> Self {
        Budget {
            deadline: started + run.duration,
            left: run.total.map(|t| Arc::new(AtomicU64::new(t))),
        }
    }

    /// Takes one operation from the budget; false once it is spent.
    pub fn more(&self) -> bool {
        if Instant::now() >= self.deadline {
            return false;
        }
        match &self.left {
            None => true,
            Some(left) => left
                .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1))
                .is_ok(),
        }
    }
}

pub async fn run(run: &Run, workload: &Workload) -> anyhow::Result<Measured> {
    match workload {
        Workload::Put {
            value_size,
            prefix,
            resources,
            tag,
            random_values,
        } => {
            let values = if *random_values {
                Values::Random
            } else {
                Values::Repeated
            };
            put(run, *value_size, prefix, *resources, tag, values).await
        }
        Workload::Range {
            keys,
            value_size,
            serializable,
            prefix,
        } => range(run, *keys, *value_size, *serializable, prefix).await,
        Workload::Txn {
            value_size,
            keys_per_client,
            prefix,
        } => txn(run, *value_size, *keys_per_client, prefix).await,
        Workload::List {
            keys,
            page,
            updates,
            value_size,
            prefix,
            existing,
        } => {
            if !existing {
                preload(run, prefix, *keys, *value_size, 1 + updates).await?;
            }
            list(run, *keys, *page, *updates, prefix).await
        }
        Workload::Watch {
            watchers,
            value_size,
            prefix,
        } => watch(run, *watchers, *value_size, prefix).await,
        Workload::Kube(_) => bail!("the kube workload speaks to kube-apiserver, not etcd"),
        Workload::WatchSelected { .. } | Workload::ListSelected { .. } => {
            bail!("the selected workloads run from their own modules")
        }
    }
}

/// Runs `client(i, connection, budget)` for every client and gathers the results.
pub async fn closed_loop<F, Fut>(
    run: &Run,
    workload: &'static str,
    unit: String,
    client: F,
) -> anyhow::Result<Measured>
where
    F: Fn(usize, Client, Budget) -> Fut,
    Fut: std::future::Future<Output = ClientResult> + Send + 'static,
{
    let started = Instant::now();
    let budget = Budget::new(run, started);
    let mut tasks = JoinSet::new();
    for i in 0..run.clients {
        tasks.spawn(client(i, run.connection(i), budget.clone()));
    }
    let mut measured = Measured {
        workload,
        unit,
        ..Default::default()
    };
    while let Some(result) = tasks.join_next().await {
        measured.absorb(result.context("a client task failed")?);
    }
    measured.elapsed = started.elapsed();
    Ok(measured)
}

/// Writes `keys` keys `<prefix><n>` with `value_size` bytes, `rounds`
/// times each, over all connections; used to fill the store first.
async fn preload(
    run: &Run,
    prefix: &str,
    keys: usize,
    value_size: usize,
    rounds: usize,
) -> anyhow::Result<()> {
    for _ in 0..rounds.max(1) {
        write_keys(run, prefix, 0..keys, move |_| vec![b'v'; value_size]).await?;
    }
    Ok(())
}

/// Puts keys `<prefix><n>` (n zero-padded to 8 digits, the key padded to
/// `run.key_size`) for every n in `range`, with `value(n)`, over all
/// connections.
pub async fn write_keys<V>(
    run: &Run,
    prefix: &str,
    range: std::ops::Range<usize>,
    value: V,
) -> anyhow::Result<()>
where
    V: Fn(usize) -> Vec<u8> + Clone + Send + 'static,
{
    let workers = run.connections.len().max(1) * 4;
    let mut tasks = JoinSet::new();
    for w in 0..workers {
        let mut c = run.connection(w);
        let prefix = prefix.to_string();
        let value = value.clone();
        let (key_size, end) = (run.key_size, range.end);
        let mut n = range.start + w;
        tasks.spawn(async move {
            while n < end {
                let key = pad_key(format!("{prefix}{n:08}"), key_size);
                c.put(key.clone(), value(n), None)
                    .await
                    .with_context(|| format!("put {key}"))?;
                n += workers;
            }
            anyhow::Ok(())
        });
    }
    while let Some(done) = tasks.join_next().await {
        done.context("a writer task failed")??;
    }
    Ok(())
}

/// What the values of `put` hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Values {
    /// One byte repeated: compresses to nothing.
    Repeated,
    /// Pseudo-random bytes, different for every client: incompressible.
    Random,
}

/// `size` bytes: `b'x'` repeated, or an xorshift sequence seeded by `seed`.
fn value_bytes(values: Values, size: usize, seed: u64) -> Vec<u8> {
    match values {
        Values::Repeated => vec![b'x'; size],
        Values::Random => {
            let mut state = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
            (0..size)
                .map(|_| {
                    state ^= state << 13;
                    state ^= state >> 7;
                    state ^= state << 17;
                    (state >> 32) as u8
                })
                .collect()
        }
    }
}

async fn put(
    run: &Run,
    value_size: usize,
    prefix: &str,
    resources: usize,
    tag: &str,
    values: Values,
) -> anyhow::Result<Measured> {
    if resources == 0 {
        bail!("--resources must be at least 1");
    }
    let prefix = prefix.to_string();
    let key_size = run.key_size;
    let unit = match values {
        Values::Repeated => format!("{value_size} B values"),
        Values::Random => format!("{value_size} B random values"),
    };
    closed_loop(run, "put", unit, |i, mut c, budget| {
        let value = Arc::new(value_bytes(values, value_size, i as u64 + 1));
        let prefix = if resources > 1 {
            format!("{prefix}res{}/{tag}", i % resources)
        } else {
            format!("{prefix}{tag}")
        };
        async move {
            let mut r = ClientResult::default();
            let mut n: u64 = 0;
            while budget.more() {
                let sent = Instant::now();
                match c
                    .put(
                        pad_key(format!("{prefix}{i}/{n}"), key_size),
                        value.to_vec(),
                        None,
                    )
                    .await
                {
                    Ok(_) => r.ok(sent.elapsed()),
                    Err(e) => r.failed(e),
                }
                n += 1;
            }
            r
        }
    })
    .await
}

async fn range(
    run: &Run,
    keys: usize,
    value_size: usize,
    serializable: bool,
    prefix: &str,
) -> anyhow::Result<Measured> {
    if keys == 0 {
        bail!("--keys must be at least 1");
    }
    preload(run, prefix, keys, value_size, 1).await?;
    let prefix = prefix.to_string();
    let key_size = run.key_size;
    let kind = if serializable {
        "serializable"
    } else {
        "linearizable"
    };
    let workload = if serializable {
        "range-serializable"
    } else {
        "range"
    };
    closed_loop(
        run,
        workload,
        format!("{kind} get of 1 of {keys} keys"),
        |i, mut c, budget| {
            let prefix = prefix.clone();
            async move {
                let mut r = ClientResult::default();
                // A cheap, well-spread sequence per client (no RNG state shared).
                let mut n = i.wrapping_mul(2_654_435_761) % keys;
                while budget.more() {
                    let options = serializable.then(|| GetOptions::new().with_serializable());
                    let sent = Instant::now();
                    match c
                        .get(pad_key(format!("{prefix}{n:08}"), key_size), options)
                        .await
                    {
                        Ok(resp) if resp.kvs().len() == 1 => r.ok(sent.elapsed()),
                        Ok(resp) => r.failed(format!("{} keys for one get", resp.kvs().len())),
                        Err(e) => r.failed(e),
                    }
                    n = (n + 7919) % keys;
                }
                r
            }
        },
    )
    .await
}

async fn txn(
    run: &Run,
    value_size: usize,
    keys_per_client: usize,
    prefix: &str,
) -> anyhow::Result<Measured> {
    let keys_per_client = keys_per_client.max(1);
    let value = Arc::new(vec![b't'; value_size]);
    let prefix = format!("{prefix}{}/", unique_suffix());
    let key_size = run.key_size;
    closed_loop(
        run,
        "txn",
        "create or update guarded by mod_revision".into(),
        |i, mut c, budget| {
            let value = value.clone();
            let prefix = prefix.clone();
            async move {
                let mut r = ClientResult::default();
                // The mod_revision this client last wrote to each key (0: none).
                let mut revisions = vec![0i64; keys_per_client];
                let mut n = 0;
                while budget.more() {
                    let slot = n % keys_per_client;
                    let key = pad_key(format!("{prefix}{i}/{slot}"), key_size);
                    let txn = Txn::new()
                        .when([Compare::mod_revision(
                            key.as_str(),
                            CompareOp::Equal,
                            revisions[slot],
                        )])
                        .and_then([TxnOp::put(key.as_str(), value.to_vec(), None)])
                        .or_else([TxnOp::get(key.as_str(), None)]);
                    let sent = Instant::now();
                    match c.txn(txn).await {
                        Ok(resp) if resp.succeeded() => {
                            r.ok(sent.elapsed());
                            revisions[slot] = resp.header().map_or(0, |h| h.revision());
                        }
                        Ok(_) => r.failed(format!("{key}: conflict (mod_revision moved)")),
                        Err(e) => r.failed(e),
                    }
                    n += 1;
                }
                r
            }
        },
    )
    .await
}

/// Lists the `keys` keys under `prefix`, written by the caller.
async fn list(
    run: &Run,
    keys: usize,
    page: i64,
    updates: usize,
    prefix: &str,
) -> anyhow::Result<Measured> {
    if page < 1 {
        bail!("--page must be at least 1");
    }
    let prefix = prefix.to_string();
    let end = prefix_end(&prefix);
    closed_loop(
        run,
        "list",
        format!("list of {keys} keys in pages of {page}, {updates} updates per key"),
        |_, mut c, budget| {
            let prefix = prefix.clone();
            let end = end.clone();
            async move {
                let mut r = ClientResult::default();
                while budget.more() {
                    let sent = Instant::now();
                    match list_once(&mut c, &prefix, &end, page).await {
                        Ok(n) if n == keys => r.ok(sent.elapsed()),
                        Ok(n) => r.failed(format!("listed {n} keys of {keys}")),
                        Err(e) => r.failed(e),
                    }
                }
                r
            }
        },
    )
    .await
}

/// Lists `[prefix, end)` page by page at the first page's revision; returns
/// how many keys it saw.
async fn list_once(
    c: &mut Client,
    prefix: &str,
    end: &[u8],
    page: i64,
) -> Result<usize, etcd_client::Error> {
    let mut key = prefix.as_bytes().to_vec();
    let mut revision = 0;
    let mut seen = 0;
    loop {
        let mut options = GetOptions::new().with_range(end.to_vec()).with_limit(page);
        if revision != 0 {
            options = options.with_revision(revision);
        }
        let resp = c.get(key.clone(), Some(options)).await?;
        if revision == 0 {
            revision = resp.header().map_or(0, |h| h.revision());
        }
        seen += resp.kvs().len();
        match resp.kvs().last() {
            Some(last) if resp.more() => {
                key = last.key().to_vec();
                key.push(0);
            }
            _ => return Ok(seen),
        }
    }
}

/// The end of the range of keys starting with `prefix`.
pub fn prefix_end(prefix: &str) -> Vec<u8> {
    let mut end = prefix.as_bytes().to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

pub fn unique_suffix() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos())
}

pub fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX))
}

/// How long watchers may take, after the last write, to deliver the rest.
const WATCH_DRAIN_LIMIT: Duration = Duration::from_secs(60);
/// How often a watcher behind the last write asks for a progress report.
const PROGRESS_EVERY: Duration = Duration::from_millis(200);

/// What one watcher saw.
struct Watched {
    result: ClientResult,
    /// Events received.
    events: usize,
    /// The stream reported progress at or past the last write's revision,
    /// which promises that every event up to it was sent. A confirmed
    /// watcher still short of events when it gives up lost them; an
    /// unconfirmed one only had not delivered them yet. (etcd before 3.4.25
    /// could report progress ahead of its events, so a watcher keeps
    /// reading after the report rather than stopping there.)
    confirmed: bool,
}

async fn watch(
    run: &Run,
    watchers: usize,
    value_size: usize,
    prefix: &str,
) -> anyhow::Result<Measured> {
    let prefix = format!("{prefix}{}/", unique_suffix());
    // The revision of the last write and the number of acknowledged puts
    // (events each watcher must see), once the writers are done.
    let (last_write, last_write_known) = tokio::sync::watch::channel::<Option<(i64, usize)>>(None);
    // Watchers first; each measures every event's latency from the send
    // time the writer put at the start of the value.
    let mut watching = JoinSet::new();
    for w in 0..watchers {
        let mut c = run.connection(w);
        let (mut sender, mut stream) = c
            .watch(prefix.as_str(), Some(WatchOptions::new().with_prefix()))
            .await
            .context("create a watch")?
            .split();
        let mut last_write_known = last_write_known.clone();
        watching.spawn(async move {
            let mut seen = Watched {
                result: ClientResult::default(),
                events: 0,
                confirmed: false,
            };
            let mut last: Option<(i64, usize)> = None;
            let mut give_up = tokio::time::Instant::now() + Duration::from_secs(24 * 3600);
            let mut ask = tokio::time::interval(PROGRESS_EVERY);
            loop {
                tokio::select! {
                    known = last_write_known.changed(), if last.is_none() => {
                        if known.is_err() {
                            break;
                        }
                        last = *last_write_known.borrow();
                        give_up = tokio::time::Instant::now() + WATCH_DRAIN_LIMIT;
                        if last.is_some_and(|(_, expected)| seen.events >= expected) {
                            break;
                        }
                    }
                    _ = ask.tick(), if last.is_some() => {
                        if let Err(e) = sender.request_progress().await {
                            seen.result.failed(format!("progress request: {e}"));
                            break;
                        }
                    }
                    message = tokio::time::timeout_at(give_up, stream.message()) => {
                        let Ok(Ok(Some(resp))) = message else { break };
                        if resp.canceled() {
                            // Compacted past it while it lagged, for one:
                            // what it misses then is not lost by the server.
                            seen.result.failed(format!(
                                "watch canceled: {} (compact revision {})",
                                resp.cancel_reason(),
                                resp.compact_revision()
                            ));
                            break;
                        }
                        let now = now_us();
                        for e in resp.events() {
                            seen.events += 1;
                            let sent = e
                                .kv()
                                .and_then(|kv| kv.value().get(..20))
                                .and_then(|v| std::str::from_utf8(v).ok())
                                .and_then(|v| v.trim().parse::<u64>().ok());
                            match sent {
                                Some(sent) => seen.result.ok(Duration::from_micros(now.saturating_sub(sent))),
                                None => seen.result.failed("an event without a send time"),
                            }
                        }
                        let progress = resp.events().is_empty() && !resp.created() && !resp.canceled();
                        if let Some((revision, expected)) = last {
                            if progress && resp.header().is_some_and(|h| h.revision() >= revision) {
                                seen.confirmed = true;
                            }
                            if seen.events >= expected {
                                break;
                            }
                        }
                    }
                }
            }
            seen
        });
    }
    let pad = value_size.saturating_sub(20);
    let key_size = run.key_size;
    let writers = closed_loop(run, "watch-writes", String::new(), |i, mut c, budget| {
        let prefix = prefix.clone();
        async move {
            let mut r = ClientResult::default();
            let mut n: u64 = 0;
            while budget.more() {
                let mut value = format!("{:>20}", now_us()).into_bytes();
                value.resize(20 + pad, b'w');
                let sent = Instant::now();
                match c
                    .put(
                        pad_key(format!("{prefix}{i}/{n}"), key_size),
                        value,
                        Some(PutOptions::new()),
                    )
                    .await
                {
                    Ok(_) => r.ok(sent.elapsed()),
                    Err(e) => r.failed(e),
                }
                n += 1;
            }
            r
        }
    })
    .await?;
    // Every acknowledged put is at or below the revision of a read made
    // after all of them.
    let after = run
        .connection(0)
        .get(
            prefix.as_str(),
            Some(GetOptions::new().with_prefix().with_count_only()),
        )
        .await
        .context("read the revision after the writes")?;
    let last_revision = after.header().map_or(0, |h| h.revision());
    let per_watcher = writers.latencies_us.len();
    let _ = last_write.send(Some((last_revision, per_watcher)));
    let mut measured = Measured {
        workload: "watch",
        unit: format!(
            "event latency, {watchers} watchers, {} puts/s by {} writers",
            (writers.latencies_us.len() as f64 / writers.elapsed.as_secs_f64().max(1e-9)) as u64,
            run.clients
        ),
        ..Default::default()
    };
    let (mut lost, mut undelivered) = (0, 0);
    while let Some(watched) = watching.join_next().await {
        let watched = watched.context("a watcher task failed")?;
        let short = per_watcher.saturating_sub(watched.events);
        if watched.confirmed {
            lost += short;
        } else {
            undelivered += short;
        }
        measured.absorb(watched.result);
    }
    measured.missing_events(lost, undelivered, per_watcher * watchers, last_revision);
    // Events per second delivered over the writing time.
    measured.elapsed = writers.elapsed;
    Ok(measured)
}

impl Measured {
    /// Counts events that never arrived as errors, saying which kind:
    /// `lost` ones the stream had already confirmed sending (a bug in the
    /// server), `undelivered` ones still missing when the watcher gave up.
    fn missing_events(&mut self, lost: usize, undelivered: usize, expected: usize, last: i64) {
        self.errors += (lost + undelivered) as u64;
        if lost > 0 {
            self.first_error.get_or_insert_with(|| {
                format!(
                    "{lost} of {expected} events lost: their watch streams reported progress \
                     at or past revision {last} without them"
                )
            });
        }
        if undelivered > 0 {
            self.first_error.get_or_insert_with(|| {
                format!(
                    "{undelivered} of {expected} events not delivered within {} s after the \
                     last write (revision {last})",
                    WATCH_DRAIN_LIMIT.as_secs()
                )
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{Values, pad_key, prefix_end, value_bytes};

    #[test]
    fn keys_are_padded_at_the_end() {
        assert_eq!(pad_key("/p/1".into(), 0), "/p/1");
        assert_eq!(pad_key("/p/1".into(), 7), "/p/1___");
        assert_eq!(pad_key("/p/12345".into(), 4), "/p/12345");
        assert!(pad_key("/p/00000001".into(), 64) < pad_key("/p/00000002".into(), 64));
    }

    #[test]
    fn random_values_differ_between_clients_and_do_not_repeat() {
        let a = value_bytes(Values::Random, 4096, 1);
        let b = value_bytes(Values::Random, 4096, 2);
        assert_eq!(a.len(), 4096);
        assert_ne!(a, b);
        // Every byte value occurs: nothing for a compressor to fold.
        let mut seen = [false; 256];
        a.iter().for_each(|&x| seen[x as usize] = true);
        assert!(
            seen.iter().all(|&s| s),
            "a value uses only some byte values"
        );
        assert_eq!(value_bytes(Values::Repeated, 3, 1), b"xxx".to_vec());
    }

    #[test]
    fn prefix_ends() {
        assert_eq!(prefix_end("/a/"), b"/a0".to_vec());
        assert_eq!(prefix_end("a\u{7f}"), b"a\x80".to_vec());
    }
}
