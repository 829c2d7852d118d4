//! A shard as the router sees it: its store (reads), its writer actor
//! (writes) and its watch hub (events).

use std::sync::Arc;
use std::time::Duration;

use kubeshard_config::{Endpoint, PoolSettings, SlowSql};
use tokio::task::JoinHandle;

use crate::bulk::ImportPhase;
use crate::error::{Result, ShardError};
use crate::labels::{LabelIndexer, run_label_indexer};
use crate::observe::ShardObserver;
use crate::store::fence::Serving;
use crate::store::{Bounded, Observed, ShardStore};
use crate::watch::{WatchHub, run_poller};
use crate::writer::ShardWriter;

/// How a shard is run (from the command line).
#[derive(Debug, Clone)]
pub struct ShardSettings {
    /// How often the watch poller looks for writes of other routers.
    pub poll_interval: Duration,
    /// Events read per poll.
    pub poll_batch: usize,
    pub pool: PoolSettings,
    pub slow_sql: SlowSql,
}

/// One running shard.
#[derive(Debug)]
pub struct Shard {
    pub name: String,
    pub store: Arc<dyn ShardStore>,
    pub writer: ShardWriter,
    pub hub: Arc<WatchHub>,
    /// Keeps the label index of selected ranges; started by the first one.
    pub labels: Arc<LabelIndexer>,
    poller: JoinHandle<()>,
    indexer: JoinHandle<()>,
}

impl Shard {
    /// Opens the database (creating it when missing) and starts the writer
    /// actor and the watch poller; `observer` hears of their work.
    /// `serving`: the topology version served and the shard's revision
    /// class in it (`store/fence.rs`).
    pub async fn open(
        name: &str,
        endpoint: &Endpoint,
        serving: Serving,
        settings: &ShardSettings,
        observer: Option<Arc<dyn ShardObserver>>,
    ) -> Result<Self> {
        let store = Self::connect(name, endpoint, settings, observer.clone()).await?;
        Self::start(name, store, serving, settings, observer).await
    }

    /// The first half of [`Shard::open`]: opens the database, creating it
    /// and its schema when missing, and refuses one whose data move is
    /// unfinished. The store serves topology version 0 until `start`.
    pub async fn connect(
        name: &str,
        endpoint: &Endpoint,
        settings: &ShardSettings,
        observer: Option<Arc<dyn ShardObserver>>,
    ) -> Result<Arc<dyn ShardStore>> {
        let serving = Serving {
            version: 0,
            class: crate::RevisionClass::ALL,
        };
        let opened = async {
            let store = crate::connect::open_store_with(endpoint, serving, &settings.pool).await?;
            refuse_unfinished_import(endpoint).await?;
            Ok(store)
        };
        // Opening creates and checks the schema: bounded as every call is.
        let limit = settings.pool.call_timeout;
        let store = crate::deadline::bounded(limit, opened)
            .await
            .unwrap_or(Err(ShardError::TimedOut))?;
        let store = Bounded::wrap(store, limit);
        Ok(Observed::wrap(store, name, settings.slow_sql, observer))
    }

    /// The second half of [`Shard::open`]: serves the connected `store` as
    /// `serving` says and starts its writer, poller and label indexer.
    pub async fn start(
        name: &str,
        store: Arc<dyn ShardStore>,
        serving: Serving,
        settings: &ShardSettings,
        observer: Option<Arc<dyn ShardObserver>>,
    ) -> Result<Self> {
        store.serve(serving.version, serving.class);
        let start = store.revisions().await?.current;
        let hub = WatchHub::new(start);
        let limit = settings.pool.call_timeout;
        let writer = ShardWriter::spawn(name, store.clone(), hub.clone(), observer, limit).await?;
        let (poll_interval, poll_batch) = (settings.poll_interval, settings.poll_batch);
        let poller = tokio::spawn(run_poller(
            store.clone(),
            hub.clone(),
            poll_interval,
            poll_batch,
        ));
        let labels = Arc::new(LabelIndexer::default());
        let indexer = tokio::spawn(run_label_indexer(
            store.clone(),
            hub.clone(),
            labels.clone(),
        ));
        Ok(Shard {
            name: name.to_string(),
            store,
            writer,
            hub,
            labels,
            poller,
            indexer,
        })
    }

    /// Whether the writer and the watch poller run: a shard without them
    /// cannot serve until the router restarts (the liveness check).
    pub fn is_running(&self) -> bool {
        self.writer.is_running() && !self.poller.is_finished()
    }

    /// Stops the writer, the poller and the label indexer.
    pub fn stop(&self) {
        self.writer.stop();
        self.poller.abort();
        self.indexer.abort();
    }
}

/// An import that did not finish left a shard without all its data.
async fn refuse_unfinished_import(endpoint: &Endpoint) -> Result<()> {
    let bulk = crate::connect::open_bulk(endpoint).await?;
    match bulk.import_state().await? {
        Some(state) if state.phase != ImportPhase::Done => Err(ShardError::ImportUnfinished {
            source_name: state.source,
            phase: state.phase.as_str(),
            revision: state.revision,
        }),
        _ => Ok(()),
    }
}
