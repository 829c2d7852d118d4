//! Lists selected by label over many objects (kubeshard's selector
//! push-down): the proof that a selected list reads O(matches) rows, not
//! O(objects). Objects `<prefix><n>` are Kubernetes-shaped JSON labelled
//! `app=a<n / matches>`, so every label value has `matches` objects however
//! many there are; every request lists one label value's objects,
//! paginated at the first page's revision as kube-apiserver lists. The
//! time of a list should not grow with the objects.
//!
//! `--filter server` sends `label_selector` (kubeshard's extension);
//! `--filter client` lists every object and filters here, which is what a
//! client of etcd (kube-apiserver with its watch cache off) must do. The
//! same store can be grown between runs (`--from`) and measured again.

use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::ValueEnum;
use kubeshard_proto::etcdserverpb::RangeRequest;
use kubeshard_proto::etcdserverpb::kv_client::KvClient;
use tonic::transport::Channel;

use crate::report::{ClientResult, Measured};
use crate::workloads::{Budget, Run, closed_loop, prefix_end, write_keys};

/// Where the selection happens.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Filter {
    /// The server, given `label_selector`.
    Server,
    /// This client, after listing every object.
    Client,
}

/// The shape of one measurement.
#[derive(Debug, Clone)]
pub struct Shape {
    pub objects: usize,
    pub from: usize,
    pub matches: usize,
    pub page: i64,
    pub value_size: usize,
    pub prefix: String,
    pub filter: Filter,
}

/// How long the label index may take to catch up before measuring.
const WARM_UP_LIMIT: Duration = Duration::from_secs(900);

pub async fn run(run: &Run, endpoint: &str, shape: &Shape) -> anyhow::Result<Measured> {
    if shape.matches == 0 || shape.page < 1 || shape.objects < shape.matches {
        bail!("--matches and --page must be at least 1, --objects at least --matches");
    }
    let written = Instant::now();
    write_objects(run, shape).await?;
    let written = written.elapsed();
    let mut kv = Vec::new();
    for _ in 0..run.connections.len() {
        kv.push(
            KvClient::connect(endpoint.to_string())
                .await
                .with_context(|| format!("cannot connect to {endpoint}"))?
                .max_decoding_message_size(256 << 20),
        );
    }
    // kubeshard builds its label index when the first selected list
    // arrives; until it has caught up, lists are slower. Measure after.
    let warmed = Instant::now();
    if shape.filter == Filter::Server {
        warm_up(&mut kv[0], shape).await?;
    }
    let warmed = warmed.elapsed();
    let shape_ = shape.clone();
    let measured = closed_loop(
        run,
        "list-selected",
        format!(
            "list of {} of {} objects by label ({:?} filter) in pages of {}; writing took {:.0} s, warm-up {:.0} s",
            shape.matches,
            shape.objects,
            shape.filter,
            shape.page,
            written.as_secs_f64(),
            warmed.as_secs_f64()
        )
        .to_lowercase(),
        move |i, _, budget: Budget| {
            let mut kv = kv[i % kv.len()].clone();
            let shape = shape_.clone();
            async move {
                let mut r = ClientResult::default();
                let mut n = i.wrapping_mul(7919);
                while budget.more() {
                    // Whole label values only: the last may be partial.
                    let group = n % (shape.objects / shape.matches);
                    let sent = Instant::now();
                    match list(&mut kv, &shape, group).await {
                        Ok(got) if got == shape.matches => r.ok(sent.elapsed()),
                        Ok(got) => r.failed(format!(
                            "app=a{group}: {got} objects, want {}",
                            shape.matches
                        )),
                        Err(e) => r.failed(e),
                    }
                    n = n.wrapping_add(104_729);
                }
                r
            }
        },
    )
    .await?;
    Ok(measured)
}

fn object(n: usize, matches: usize, value_size: usize) -> String {
    let head = format!(
        r#"{{"apiVersion":"bench.kubeshard.io/v1","kind":"Thing","metadata":{{"name":"o{n}","namespace":"bench","labels":{{"app":"a{}","tier":"t{}"}}}},"spec":{{"pad":""#,
        n / matches,
        n % 7
    );
    let pad = value_size.saturating_sub(head.len() + 3);
    format!("{head}{}\"}}}}", "p".repeat(pad))
}

/// Puts objects `from..objects`, over every connection.
async fn write_objects(run: &Run, shape: &Shape) -> anyhow::Result<()> {
    let (matches, value_size) = (shape.matches, shape.value_size);
    write_keys(run, &shape.prefix, shape.from..shape.objects, move |n| {
        object(n, matches, value_size).into_bytes()
    })
    .await
}

/// Lists until three lists in a row take about as long, or the limit.
async fn warm_up(kv: &mut KvClient<Channel>, shape: &Shape) -> anyhow::Result<()> {
    let started = Instant::now();
    let mut last: Vec<f64> = Vec::new();
    while started.elapsed() < WARM_UP_LIMIT {
        let sent = Instant::now();
        list(kv, shape, 0).await.context("warm-up list")?;
        last.push(sent.elapsed().as_secs_f64());
        if let [.., a, b, c] = last[..] {
            let (lo, hi) = (a.min(b).min(c), a.max(b).max(c));
            if hi <= lo * 1.25 + 0.002 {
                return Ok(());
            }
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    Ok(())
}

/// One whole list of `app=a<group>`; returns how many objects it found.
async fn list(kv: &mut KvClient<Channel>, shape: &Shape, group: usize) -> anyhow::Result<usize> {
    let end = prefix_end(&shape.prefix);
    let selector = format!("app=a{group}");
    // The label as it appears in an object, with the closing quote.
    let needle = format!(r#""app":"a{group}""#);
    let mut key = shape.prefix.as_bytes().to_vec();
    let mut revision = 0;
    let mut found = 0;
    loop {
        let request = RangeRequest {
            key: key.clone(),
            range_end: end.clone(),
            limit: shape.page,
            revision,
            label_selector: match shape.filter {
                Filter::Server => selector.clone(),
                Filter::Client => String::new(),
            },
            ..Default::default()
        };
        let resp = kv.range(request).await.context("range")?.into_inner();
        if revision == 0 {
            revision = resp.header.as_ref().map_or(0, |h| h.revision);
        }
        found += match shape.filter {
            Filter::Server => resp.kvs.len(),
            Filter::Client => resp
                .kvs
                .iter()
                .filter(|kv| contains(&kv.value, needle.as_bytes()))
                .count(),
        };
        match resp.kvs.last() {
            Some(last) if resp.more => {
                key = last.key.clone();
                key.push(0);
            }
            _ => return Ok(found),
        }
    }
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn objects_have_their_size_and_label() -> serde_json::Result<()> {
        let o = object(1234, 100, 1024);
        assert_eq!(o.len(), 1024);
        let v: serde_json::Value = serde_json::from_str(&o)?;
        assert_eq!(v["metadata"]["labels"]["app"], "a12");
        assert!(contains(o.as_bytes(), br#""app":"a12""#));
        assert!(!contains(o.as_bytes(), br#""app":"a1""#));
        Ok(())
    }
}
