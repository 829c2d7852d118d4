//! One watch stream with several watches, recorded deterministically.
//!
//! What is compared, per watch (in watch-ID order): its control responses
//! (created / canceled, with header revision, compact_revision and
//! cancel_reason) and its events, each with kv and prev_kv, in arrival order.
//! What is NOT compared: how events are grouped into responses (timing
//! dependent in etcd too) and the interleaving of different watches on the
//! stream (etcd sends a revision's events to its watchers in random order).
//! Two grouping rules every client relies on are checked instead and recorded
//! as `ANOMALY` lines when broken: a revision's events are never split across
//! responses, and a response's header revision is not below its events'.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::Duration;

use etcd_client::{Client, EventType, WatchOptions, WatchResponse, WatchStream};
use tokio::time::Instant;

use crate::format::{self, RPC_TIMEOUT, header, rpc};
use crate::transcript::{Transcript, rev};

/// An event as seen by one watch, for completion conditions.
#[derive(Debug, Clone)]
pub struct Seen {
    pub watch_id: i64,
    pub kind: EventType,
    pub key: Vec<u8>,
    pub mod_revision: i64,
}

#[derive(Debug)]
pub struct Watcher {
    stream: WatchStream,
    items: BTreeMap<i64, Vec<String>>,
    progress: Vec<String>,
    problems: Vec<String>,
    seen: Vec<Seen>,
    created: Vec<i64>,
    canceled: HashSet<i64>,
    notify_ids: HashSet<i64>,
    last_event_rev: HashMap<i64, i64>,
    broken: bool,
    ignored_progress: usize,
}

impl Watcher {
    /// Opens a stream with its first watch and waits for its `created`
    /// response. Returns the watcher and the new watch's ID.
    pub async fn open(
        client: &mut Client,
        t: &mut Transcript,
        key: &str,
        opts: WatchOptions,
        progress_notify: bool,
    ) -> Result<(Watcher, i64), String> {
        let opts = if progress_notify {
            opts.with_progress_notify()
        } else {
            opts
        };
        let stream = rpc(client.watch(key, Some(opts))).await?;
        let mut w = Watcher {
            stream,
            items: BTreeMap::new(),
            progress: Vec::new(),
            problems: Vec::new(),
            seen: Vec::new(),
            created: Vec::new(),
            canceled: HashSet::new(),
            notify_ids: HashSet::new(),
            last_event_rev: HashMap::new(),
            broken: false,
            ignored_progress: 0,
        };
        let id = w.await_created(t, progress_notify).await?;
        Ok((w, id))
    }

    /// Adds a watch to the stream and waits for its `created` response.
    pub async fn create(
        &mut self,
        t: &mut Transcript,
        key: &str,
        opts: WatchOptions,
        progress_notify: bool,
    ) -> Result<i64, String> {
        let opts = if progress_notify {
            opts.with_progress_notify()
        } else {
            opts
        };
        rpc(self.stream.watch(key, Some(opts))).await?;
        self.await_created(t, progress_notify).await
    }

    async fn await_created(
        &mut self,
        t: &mut Transcript,
        progress_notify: bool,
    ) -> Result<i64, String> {
        let before = self.created.len();
        if !self
            .pump_until(t, RPC_TIMEOUT, |w| w.created.len() > before)
            .await
        {
            return Err(format!("no created response within {RPC_TIMEOUT:?}"));
        }
        let id = self.created[before];
        if progress_notify {
            self.notify_ids.insert(id);
        }
        Ok(id)
    }

    /// Cancels a watch and waits for its `canceled` response.
    pub async fn cancel(&mut self, t: &mut Transcript, id: i64) -> bool {
        if rpc(self.stream.cancel(id)).await.is_err() {
            self.problems
                .push(format!("cannot send cancel of watch {id}"));
            return false;
        }
        self.pump_until(t, RPC_TIMEOUT, |w| w.canceled.contains(&id))
            .await
    }

    /// Sends a progress request and waits for the next progress response
    /// (a response that is neither created nor canceled and has no events).
    pub async fn request_progress(&mut self, t: &mut Transcript) -> bool {
        if rpc(self.stream.request_progress()).await.is_err() {
            self.problems.push("cannot send progress request".into());
            return false;
        }
        let before = self.progress.len();
        let saved = std::mem::take(&mut self.notify_ids);
        let ok = self
            .pump_until(t, RPC_TIMEOUT, |w| w.progress.len() > before)
            .await;
        self.notify_ids = saved;
        ok
    }

    pub fn seen(&self) -> &[Seen] {
        &self.seen
    }

    pub fn is_canceled(&self, id: i64) -> bool {
        self.canceled.contains(&id)
    }

    /// Whether watch `id` saw an event of `kind` at revision `mod_revision`.
    pub fn saw(&self, id: i64, kind: EventType, mod_revision: i64) -> bool {
        self.seen
            .iter()
            .any(|s| s.watch_id == id && s.kind == kind && s.mod_revision == mod_revision)
    }

    /// Reads responses until `done` holds, the stream ends, or `timeout`
    /// passes. Returns whether `done` holds.
    pub async fn pump_until(
        &mut self,
        t: &mut Transcript,
        timeout: Duration,
        done: impl Fn(&Watcher) -> bool,
    ) -> bool {
        let deadline = Instant::now() + timeout;
        while !done(self) {
            if self.broken {
                return false;
            }
            match tokio::time::timeout_at(deadline, self.stream.message()).await {
                Err(_) => return false,
                Ok(Ok(Some(resp))) => self.absorb(t, resp),
                Ok(Ok(None)) => {
                    self.problems.push("stream ended by the server".into());
                    self.broken = true;
                }
                Ok(Err(e)) => {
                    self.problems
                        .push(format!("stream error: {}", format::error(&e)));
                    self.broken = true;
                }
            }
        }
        true
    }

    fn absorb(&mut self, t: &mut Transcript, resp: WatchResponse) {
        let id = resp.watch_id();
        let control = resp.created() || resp.canceled() || resp.compact_revision() != 0;
        let events = resp.events();
        if control {
            self.items.entry(id).or_default().push(format!(
                "control created={} canceled={} compact_revision={} cancel_reason={:?} {} events_in_same_response={}",
                resp.created(),
                resp.canceled(),
                rev(resp.compact_revision()),
                resp.cancel_reason(),
                header(resp.header()),
                events.len()
            ));
            if resp.created() {
                self.created.push(id);
            }
            if resp.canceled() {
                self.canceled.insert(id);
            }
        } else if events.is_empty() {
            if self.notify_ids.contains(&id) {
                // A periodic notification on a watch that asked for them
                // (etcd sends them every 10 minutes; a server may send more).
                self.ignored_progress += 1;
                return;
            }
            self.progress.push(format!(
                "progress watch_id={id} {} events=0",
                header(resp.header())
            ));
            return;
        }
        let hdr = resp.header().map(|h| h.revision());
        let mut max_rev = 0;
        for (i, e) in events.iter().enumerate() {
            let line = format::event(t, e);
            let (key, mod_revision) = e
                .kv()
                .map(|k| (k.key().to_vec(), k.mod_revision()))
                .unwrap_or_default();
            if i == 0 && self.last_event_rev.get(&id) == Some(&mod_revision) {
                self.problems.push(format!(
                    "ANOMALY watch {id}: events of revision {} split across responses",
                    rev(mod_revision)
                ));
            }
            max_rev = max_rev.max(mod_revision);
            self.items.entry(id).or_default().push(line);
            self.seen.push(Seen {
                watch_id: id,
                kind: e.event_type(),
                key,
                mod_revision,
            });
        }
        if let Some(last) = events.last().and_then(|e| e.kv()) {
            self.last_event_rev.insert(id, last.mod_revision());
        }
        if hdr.is_some_and(|h| h < max_rev) {
            self.problems.push(format!(
                "ANOMALY watch {id}: header revision below its events' revision {}",
                rev(max_rev)
            ));
        }
    }

    /// Records everything collected since the last flush under `step` and
    /// clears it: per watch ID (ascending) its items, then progress
    /// responses, then problems.
    pub fn flush(&mut self, t: &mut Transcript, step: &str) {
        for (id, items) in std::mem::take(&mut self.items) {
            for item in items {
                t.push(step, format!("watch {id}: {item}"));
            }
        }
        for p in std::mem::take(&mut self.progress) {
            t.push(step, p);
        }
        for p in std::mem::take(&mut self.problems) {
            t.push(step, p);
        }
        if self.ignored_progress > 0 {
            t.note(
                step,
                format!(
                    "ignored {} periodic progress notifications",
                    self.ignored_progress
                ),
            );
            self.ignored_progress = 0;
        }
    }
}
