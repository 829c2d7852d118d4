//! etcd's KV service: Range, Put, DeleteRange, Txn, Compact.

use std::sync::Arc;

use kubeshard_proto::etcdserverpb::kv_server::Kv;
use kubeshard_proto::etcdserverpb::{
    CompactionRequest, CompactionResponse, DeleteRangeRequest, DeleteRangeResponse, PutRequest,
    PutResponse, RangeRequest, RangeResponse, RangeStreamResponse, TxnRequest, TxnResponse,
};
use kubeshard_shard_worker::{WriteRequest, WriteResponse};
use tonic::{Request, Response, Status};
use tracing::warn;

use super::Core;
use crate::error::{shard_status, unimplemented};
use crate::validate;

#[derive(Debug)]
pub struct KvService {
    core: Arc<Core>,
}

impl KvService {
    pub fn new(core: Arc<Core>) -> Self {
        KvService { core }
    }

    async fn write(&self, request: WriteRequest) -> Result<WriteResponse, Status> {
        self.core
            .shard
            .writer
            .write(request)
            .await
            .map_err(shard_status)
    }
}

fn unexpected(what: &str) -> Status {
    Status::internal(format!(
        "kubeshard: shard answered {what} with another response type"
    ))
}

#[tonic::async_trait]
impl Kv for KvService {
    async fn range(
        &self,
        request: Request<RangeRequest>,
    ) -> Result<Response<RangeResponse>, Status> {
        let request = request.into_inner();
        self.core.limits.check_size(&request)?;
        validate::check_range(&request)?;
        let mut response = self
            .core
            .shard
            .store
            .range(&request)
            .await
            .map_err(shard_status)?;
        self.core.fill(&mut response.header);
        Ok(Response::new(response))
    }

    type RangeStreamStream =
        futures::stream::BoxStream<'static, Result<RangeStreamResponse, Status>>;

    async fn range_stream(
        &self,
        _request: Request<RangeRequest>,
    ) -> Result<Response<Self::RangeStreamStream>, Status> {
        Err(unimplemented(
            "KV.RangeStream",
            "use Range with limit and pagination",
        ))
    }

    async fn put(&self, request: Request<PutRequest>) -> Result<Response<PutResponse>, Status> {
        let request = request.into_inner();
        self.core.limits.check_size(&request)?;
        validate::check_put(&request)?;
        match self.write(WriteRequest::Put(request)).await? {
            WriteResponse::Put(mut r) => {
                self.core.fill(&mut r.header);
                Ok(Response::new(r))
            }
            _ => Err(unexpected("Put")),
        }
    }

    async fn delete_range(
        &self,
        request: Request<DeleteRangeRequest>,
    ) -> Result<Response<DeleteRangeResponse>, Status> {
        let request = request.into_inner();
        self.core.limits.check_size(&request)?;
        validate::check_delete(&request)?;
        match self.write(WriteRequest::DeleteRange(request)).await? {
            WriteResponse::DeleteRange(mut r) => {
                self.core.fill(&mut r.header);
                Ok(Response::new(r))
            }
            _ => Err(unexpected("DeleteRange")),
        }
    }

    async fn txn(&self, request: Request<TxnRequest>) -> Result<Response<TxnResponse>, Status> {
        let request = request.into_inner();
        self.core.limits.check_size(&request)?;
        validate::check_txn(&request, self.core.limits.max_txn_ops)?;
        match self.write(WriteRequest::Txn(request)).await? {
            WriteResponse::Txn(mut r) => {
                self.core.fill(&mut r.header);
                Ok(Response::new(r))
            }
            _ => Err(unexpected("Txn")),
        }
    }

    async fn compact(
        &self,
        request: Request<CompactionRequest>,
    ) -> Result<Response<CompactionResponse>, Status> {
        let request = request.into_inner();
        let revision = request.revision;
        let current = match self.write(WriteRequest::Compact { revision }).await? {
            WriteResponse::Compact { revision } => revision,
            _ => return Err(unexpected("Compact")),
        };
        // The compaction mark is committed: reads below it already fail.
        // Removing the rows can take a while; `physical` waits for it.
        let store = self.core.shard.store.clone();
        let batch = self.core.options.compaction_batch_revisions;
        let purge = async move {
            match store.purge_compacted(revision, batch).await {
                Ok(rows) => tracing::info!(revision, rows, "compaction removed history"),
                Err(e) => warn!(revision, error = %e, "compaction could not remove history yet"),
            }
        };
        if request.physical {
            purge.await;
        } else {
            tokio::spawn(purge);
        }
        Ok(Response::new(CompactionResponse {
            header: self.core.header(current),
        }))
    }
}
