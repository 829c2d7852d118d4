//! Runs operations against a store and the model side by side and compares
//! every answer, then reads everything back.

use kubeshard_proto::etcdserverpb::response_op::Response;
use kubeshard_proto::etcdserverpb::{RangeRequest, ResponseHeader, TxnResponse};
use kubeshard_proto::mvccpb::Event;
use kubeshard_shard_worker::{
    KeyRange, RevisionClass, ShardError, ShardStore, WriteRequest, WriteResponse,
};

use super::model::{Fail, Model, Resp};
use super::ops::{self, Case, Op};
use super::show;

pub fn fail(e: &ShardError) -> Fail {
    match e {
        ShardError::Compacted { compact_revision } => Fail::Compacted(*compact_revision),
        ShardError::FutureRevision => Fail::FutureRevision,
        ShardError::LeaseNotFound => Fail::LeaseNotFound,
        ShardError::LeaseExists => Fail::LeaseExists,
        ShardError::KeyNotFound => Fail::KeyNotFound,
        ShardError::KeyTooLong { .. } => Fail::KeyTooLong,
        other => Fail::Other(other.to_string()),
    }
}

/// Keeps only the revision of a header (the router adds the rest).
fn norm_header(h: &mut Option<ResponseHeader>) {
    if let Some(h) = h {
        *h = ResponseHeader {
            revision: h.revision,
            ..Default::default()
        };
    }
}

fn norm_txn(t: &mut TxnResponse) {
    norm_header(&mut t.header);
    for op in &mut t.responses {
        match &mut op.response {
            Some(Response::ResponseRange(r)) => norm_header(&mut r.header),
            Some(Response::ResponsePut(r)) => norm_header(&mut r.header),
            Some(Response::ResponseDeleteRange(r)) => norm_header(&mut r.header),
            Some(Response::ResponseTxn(r)) => norm_txn(r),
            None => {}
        }
    }
}

pub fn norm(r: &Result<WriteResponse, ShardError>) -> Result<Resp, Fail> {
    match r {
        Err(e) => Err(fail(e)),
        Ok(WriteResponse::Put(p)) => {
            let mut p = p.clone();
            norm_header(&mut p.header);
            Ok(Resp::Put(p))
        }
        Ok(WriteResponse::DeleteRange(d)) => {
            let mut d = d.clone();
            norm_header(&mut d.header);
            Ok(Resp::DeleteRange(d))
        }
        Ok(WriteResponse::Txn(t)) => {
            let mut t = t.clone();
            norm_txn(&mut t);
            Ok(Resp::Txn(t))
        }
        Ok(WriteResponse::LeaseGrant { id, ttl, revision }) => Ok(Resp::LeaseGrant {
            id: *id,
            ttl: *ttl,
            revision: *revision,
        }),
        Ok(WriteResponse::LeaseRevoke { revision }) => Ok(Resp::LeaseRevoke {
            revision: *revision,
        }),
        Ok(WriteResponse::LeaseExpire { expired, revision }) => Ok(Resp::LeaseExpire {
            expired: *expired,
            revision: *revision,
        }),
        Ok(WriteResponse::Compact { revision }) => Ok(Resp::Compact {
            revision: *revision,
        }),
        Ok(WriteResponse::Bump { revision }) => Ok(Resp::Bump {
            revision: *revision,
        }),
    }
}

fn event_rev(e: &Event) -> i64 {
    e.kv.as_ref().map_or(0, |kv| kv.mod_revision)
}

/// A store and the model, driven together.
pub struct Runner<'s> {
    pub store: &'s dyn ShardStore,
    pub model: Model,
    /// What ran so far, for failure messages.
    pub steps: Vec<String>,
    batch: Vec<WriteRequest>,
    expected: Vec<Result<Resp, Fail>>,
}

impl<'s> Runner<'s> {
    pub fn new(store: &'s dyn ShardStore) -> Self {
        Self::in_class(store, RevisionClass::ALL)
    }

    /// A runner whose model hands out the revisions of `class`, as the store does.
    pub fn in_class(store: &'s dyn ShardStore, class: RevisionClass) -> Self {
        Runner {
            store,
            model: Model::new(class.stride(), class.offset()),
            steps: Vec::new(),
            batch: Vec::new(),
            expected: Vec::new(),
        }
    }

    /// Adds a write to the pending batch (the model applies it right away).
    pub fn write(&mut self, request: WriteRequest) {
        self.expected.push(self.model.apply(&request));
        self.batch.push(request);
    }

    /// Applies the pending batch in one `apply_batch` and compares each answer.
    pub async fn flush(&mut self) -> Result<Vec<Result<Resp, Fail>>, String> {
        if self.batch.is_empty() {
            return Ok(Vec::new());
        }
        let batch = std::mem::take(&mut self.batch);
        let expected = std::mem::take(&mut self.expected);
        self.steps.push(format!(
            "apply_batch of {} (model at revision {} after it):",
            batch.len(),
            self.model.rev
        ));
        for (req, exp) in batch.iter().zip(&expected) {
            self.steps.push(format!(
                "    {}\n        -> {}",
                show::request(req),
                show::answer(exp)
            ));
        }
        let got = self
            .store
            .apply_batch(&batch)
            .await
            .map_err(|e| format!("apply_batch failed as a whole: {e}"))?;
        if got.len() != batch.len() {
            return Err(format!(
                "apply_batch answered {} of {} requests",
                got.len(),
                batch.len()
            ));
        }
        let got: Vec<Result<Resp, Fail>> = got.iter().map(norm).collect();
        for (i, (g, e)) in got.iter().zip(&expected).enumerate() {
            if g != e {
                return Err(format!(
                    "request {i} of the last batch: {}\n  store: {}\n  model: {}",
                    show::request(&batch[i]),
                    show::answer(g),
                    show::answer(e)
                ));
            }
        }
        Ok(got)
    }

    /// A Range through `ShardStore::range`, compared with the model.
    pub async fn range(&mut self, req: &RangeRequest) -> Result<(), String> {
        let want = self.model.range(req, self.model.rev);
        let got = self.store.range(req).await.map(|mut r| {
            norm_header(&mut r.header);
            r
        });
        let got = got.map_err(|e| fail(&e));
        let render = |r: &Result<_, Fail>| match r {
            Ok(r) => show::range_resp(r),
            Err(e) => format!("error {e:?}"),
        };
        self.steps.push(format!(
            "{}\n        -> {}",
            show::range_req(req),
            render(&want)
        ));
        if got != want {
            return Err(format!(
                "{}\n  store: {}\n  model: {}",
                show::range_req(req),
                render(&got),
                render(&want)
            ));
        }
        Ok(())
    }

    async fn read(&mut self, op: &Op) -> Result<(), String> {
        match op {
            Op::Range(g) => self.range(&ops::range_req(g, self.model.rev)).await,
            Op::Renew { id, now } => {
                let want = self.model.renew(*id, *now);
                self.steps
                    .push(format!("lease_renew({id}, {now}) -> {want:?}"));
                let got = self
                    .store
                    .lease_renew(*id, *now)
                    .await
                    .map_err(|e| format!("lease_renew: {e}"))?;
                if got != want {
                    return Err(format!(
                        "lease_renew({id}, {now}): store {got:?}, model {want:?}"
                    ));
                }
                Ok(())
            }
            Op::Purge { batch } => self.purge(*batch).await,
            Op::IndexLabels => self.index_labels().await,
            _ => Err(format!("not a read: {op:?}")),
        }
    }

    /// Physically removes what compaction made unreachable.
    pub async fn purge(&mut self, batch: i64) -> Result<(), String> {
        let upto = self.model.compacted;
        self.steps
            .push(format!("purge_compacted({upto}, batch {batch})"));
        self.store
            .purge_compacted(upto, batch)
            .await
            .map_err(|e| format!("purge_compacted({upto}, {batch}): {e}"))?;
        self.model.purged_at = Some(upto);
        Ok(())
    }

    /// The label indexer brings the index to the current revision.
    pub async fn index_labels(&mut self) -> Result<(), String> {
        let upto = self.model.rev;
        self.steps.push(format!("index labels up to {upto}"));
        kubeshard_shard_worker::labels::catch_up(self.store, upto)
            .await
            .map_err(|e| format!("index labels up to {upto}: {e}"))
    }

    /// Every selector over every key at some of the revisions kept.
    pub async fn check_selected(&mut self) -> Result<(), String> {
        let (cur, compacted) = (self.model.rev, self.model.compacted);
        let from = compacted.max(1);
        let mut revisions: Vec<i64> = (0..5).map(|i| from + (cur - from) * i / 4).collect();
        revisions.dedup();
        let pairs = ops::LABEL_SELECTORS
            .iter()
            .map(|l| (*l, ""))
            .chain(ops::FIELD_SELECTORS.iter().map(|f| ("", *f)))
            .chain([("app in (web,db)", "metadata.name=a")]);
        for (labels, fields) in pairs {
            {
                for &at in &revisions {
                    self.range(&RangeRequest {
                        key: vec![0],
                        range_end: vec![0],
                        revision: at,
                        label_selector: labels.to_string(),
                        field_selector: fields.to_string(),
                        ..Default::default()
                    })
                    .await?;
                }
            }
        }
        Ok(())
    }

    /// Runs a generated case, then reads everything back, before and after
    /// purging compacted history, with selectors before and after the
    /// label index caught up.
    pub async fn run(&mut self, case: &Case) -> Result<(), String> {
        for (op, split) in &case.ops {
            if *split || !op.is_write() {
                self.flush().await?;
            }
            match ops::write_req(op, self.model.rev) {
                Some(req) => self.write(req),
                None => self.read(op).await?,
            }
        }
        self.flush().await?;
        self.check_all(case.page).await?;
        self.check_selected().await?;
        self.purge(2).await?;
        self.check_all(case.page).await?;
        self.index_labels().await?;
        self.check_selected().await
    }

    /// Every revision's full snapshot, the history and the leases.
    pub async fn check_all(&mut self, page: usize) -> Result<(), String> {
        let (cur, compacted) = (self.model.rev, self.model.compacted);
        self.steps.push(format!(
            "check_all (revision {cur}, compacted {compacted}, page {page})"
        ));
        let revs = self
            .store
            .revisions()
            .await
            .map_err(|e| format!("revisions: {e}"))?;
        if (revs.current, revs.compacted) != (cur, compacted) {
            return Err(format!(
                "revisions: store {revs:?}, model current {cur} compacted {compacted}"
            ));
        }
        let all = |revision: i64| RangeRequest {
            key: vec![0],
            range_end: vec![0],
            revision,
            ..Default::default()
        };
        let from = compacted.max(1);
        for at in (from..=cur + 1).chain([0, from - 1]) {
            self.range(&all(at)).await?;
        }

        let whole = KeyRange::new(b"\0", b"\0");
        let want = self.model.events(b"\0", b"\0", from, cur);
        let got = self.history(&whole, from, cur, page).await?;
        compare_events("history of everything", &got, &want)?;
        let prefix = KeyRange::new(b"d/", b"d0");
        let want_prefix = self.model.events(b"d/", b"d0", from, cur);
        let got = self.history(&prefix, from, cur, page).await?;
        compare_events("history of [d/, d0)", &got, &want_prefix)?;
        let got = self.poll(from - 1, page).await?;
        compare_events("poll_events", &got, &want)?;
        if compacted >= 2 {
            match self.store.history(&whole, compacted - 1, cur, page).await {
                Err(ShardError::Compacted { compact_revision })
                    if compact_revision == compacted => {}
                other => {
                    return Err(format!(
                        "history from {} (below compaction {compacted}): {:?}",
                        compacted - 1,
                        other.map(|p| p.events.len())
                    ));
                }
            }
        }

        let leases = self
            .store
            .lease_list()
            .await
            .map_err(|e| format!("lease_list: {e}"))?;
        let want: Vec<i64> = self.model.leases.keys().copied().collect();
        if leases != want {
            return Err(format!("lease_list: store {leases:?}, model {want:?}"));
        }
        for id in [1, 2, 3, 9] {
            let got = self
                .store
                .lease_get(id)
                .await
                .map_err(|e| format!("lease_get: {e}"))?
                .map(|l| (l.id, l.ttl, l.expires_at_ms));
            let want = self
                .model
                .leases
                .get(&id)
                .map(|l| (id, l.ttl, l.expires_at_ms));
            if got != want {
                return Err(format!("lease_get({id}): store {got:?}, model {want:?}"));
            }
            let got = self
                .store
                .lease_keys(id)
                .await
                .map_err(|e| format!("lease_keys: {e}"))?;
            let want = self.model.lease_keys(id);
            if got != want {
                return Err(format!("lease_keys({id}): store {got:?}, model {want:?}"));
            }
        }
        Ok(())
    }

    /// All events of `range` in [from, to] through `history`, page by page.
    pub async fn history(
        &self,
        range: &KeyRange,
        from: i64,
        to: i64,
        page: usize,
    ) -> Result<Vec<Event>, String> {
        let mut out = Vec::new();
        let mut next = from;
        for _ in 0..10_000 {
            let p = self
                .store
                .history(range, next, to, page)
                .await
                .map_err(|e| format!("history({range:?}, {next}, {to}, {page}): {e}"))?;
            check_page("history", &p.events, next - 1, p.closed, page)?;
            out.extend(p.events);
            if !p.more {
                if p.closed != to {
                    return Err(format!("history ended at {} instead of {to}", p.closed));
                }
                return Ok(out);
            }
            if p.closed < next {
                return Err(format!("history from {next} made no progress"));
            }
            next = p.closed + 1;
        }
        Err("history did not finish".into())
    }

    /// All events after `after` through `poll_events`, page by page.
    pub async fn poll(&self, after: i64, page: usize) -> Result<Vec<Event>, String> {
        let mut out = Vec::new();
        let mut after = after;
        for _ in 0..10_000 {
            let p = self
                .store
                .poll_events(after, page)
                .await
                .map_err(|e| format!("poll_events({after}, {page}): {e}"))?;
            check_page("poll_events", &p.events, after, p.closed, page)?;
            out.extend(p.events);
            if !p.more {
                if p.closed != self.model.rev {
                    return Err(format!(
                        "poll_events closed at {} instead of {}",
                        p.closed, self.model.rev
                    ));
                }
                return Ok(out);
            }
            if p.closed <= after {
                return Err(format!("poll_events after {after} made no progress"));
            }
            after = p.closed;
        }
        Err("poll_events did not finish".into())
    }
}

/// A page holds events in (after, closed], in order, and at most `page` of
/// them unless they all belong to one revision (revisions are not split).
fn check_page(
    what: &str,
    events: &[Event],
    after: i64,
    closed: i64,
    page: usize,
) -> Result<(), String> {
    let revs: Vec<i64> = events.iter().map(event_rev).collect();
    let bad = revs.iter().any(|&r| r <= after || r > closed)
        || revs.windows(2).any(|w| w[0] > w[1])
        || (revs.len() > page && revs.first() != revs.last());
    if bad {
        return Err(format!(
            "{what} page after {after} closed at {closed} (page {page}) has revisions {revs:?}"
        ));
    }
    Ok(())
}

fn compare_events(what: &str, got: &[Event], want: &[Event]) -> Result<(), String> {
    if got != want {
        return Err(format!(
            "{what}:\n store:\n{}\n model:\n{}",
            show::events(got),
            show::events(want)
        ));
    }
    Ok(())
}

/// Runs one generated case on a fresh store.
pub async fn run_case(
    store: &dyn ShardStore,
    class: RevisionClass,
    case: &Case,
) -> Result<(), String> {
    let mut runner = Runner::in_class(store, class);
    let outcome = runner.run(case).await;
    outcome.map_err(|e| {
        format!(
            "{e}\n--- what ran (model answers shown):\n{}",
            runner.steps.join("\n")
        )
    })
}
