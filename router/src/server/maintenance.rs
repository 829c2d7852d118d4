//! etcd's Maintenance service: Status (with a 3.6 version), Alarm, Defragment.

use std::sync::Arc;

use kubeshard_proto::etcdserverpb::alarm_request::AlarmAction;
use kubeshard_proto::etcdserverpb::maintenance_server::Maintenance;
use kubeshard_proto::etcdserverpb::{
    AlarmMember, AlarmRequest, AlarmResponse, AlarmType, DefragmentRequest, DefragmentResponse,
    DowngradeRequest, DowngradeResponse, HashKvRequest, HashKvResponse, HashRequest, HashResponse,
    MoveLeaderRequest, MoveLeaderResponse, SnapshotRequest, SnapshotResponse, StatusRequest,
    StatusResponse,
};
use tonic::{Request, Response, Status};

use super::Core;
use crate::error::{shard_status, unimplemented};

#[derive(Debug)]
pub struct MaintenanceService {
    core: Arc<Core>,
}

impl MaintenanceService {
    pub fn new(core: Arc<Core>) -> Self {
        MaintenanceService { core }
    }
}

impl MaintenanceService {
    fn nospace(&self) -> AlarmMember {
        AlarmMember {
            member_id: self.core.member_id,
            alarm: AlarmType::Nospace.into(),
        }
    }

    /// Status's `errors`: the raised alarms, in etcd's words.
    fn alarms(&self) -> Vec<String> {
        let shards = self.core.views.current();
        let raised = shards.all().any(|(_, shard)| shard.writer.out_of_space());
        let text = format!("memberID:{} alarm:NOSPACE ", self.core.member_id);
        raised.then_some(text).into_iter().collect()
    }
}

#[tonic::async_trait]
impl Maintenance for MaintenanceService {
    /// NOSPACE is raised by a shard whose database had no space for a
    /// write batch, and lowered by its next batch that commits (writes are
    /// tried as they come, so writing resumes once space is freed) or by
    /// DEACTIVATE. Each router raises its own: the alarm is listed under
    /// this router's member id. There is no raft state to corrupt (CORRUPT);
    /// ACTIVATE is accepted and changes nothing.
    async fn alarm(
        &self,
        request: Request<AlarmRequest>,
    ) -> Result<Response<AlarmResponse>, Status> {
        let request = request.into_inner();
        let shards = self.core.views.current();
        let raised = shards.all().any(|(_, shard)| shard.writer.out_of_space());
        let alarms = match (request.action(), request.alarm()) {
            (AlarmAction::Get, _) => raised.then(|| self.nospace()).into_iter().collect(),
            (AlarmAction::Deactivate, AlarmType::Nospace | AlarmType::None) => {
                let mut lowered = false;
                for (_, shard) in shards.all() {
                    lowered |= shard.writer.clear_out_of_space();
                }
                lowered.then(|| self.nospace()).into_iter().collect()
            }
            _ => Vec::new(),
        };
        let revision = self.core.current_revision().await?;
        Ok(Response::new(AlarmResponse {
            header: self.core.header(revision),
            alarms,
        }))
    }

    async fn status(&self, _: Request<StatusRequest>) -> Result<Response<StatusResponse>, Status> {
        let revision = self.core.current_revision().await?;
        // The store is every shard's database together.
        let shards = self.core.views.current();
        let sizes = shards.all().map(|(_, shard)| shard.store.db_size());
        let mut db_size = 0;
        for size in futures::future::join_all(sizes).await {
            db_size += size.map_err(shard_status)?;
        }
        Ok(Response::new(StatusResponse {
            header: self.core.header(revision),
            version: self.core.options.etcd_version.clone(),
            db_size,
            leader: self.core.member_id,
            raft_index: u64::try_from(revision).unwrap_or(0),
            raft_term: 1,
            raft_applied_index: u64::try_from(revision).unwrap_or(0),
            errors: self.alarms(),
            db_size_in_use: db_size,
            is_learner: false,
            storage_version: String::new(),
            db_size_quota: 0,
            downgrade_info: None,
        }))
    }

    async fn defragment(
        &self,
        _: Request<DefragmentRequest>,
    ) -> Result<Response<DefragmentResponse>, Status> {
        for (_, shard) in self.core.views.current().all() {
            shard.store.defragment().await.map_err(shard_status)?;
        }
        let revision = self.core.current_revision().await?;
        Ok(Response::new(DefragmentResponse {
            header: self.core.header(revision),
        }))
    }

    async fn hash(&self, _: Request<HashRequest>) -> Result<Response<HashResponse>, Status> {
        Err(unimplemented(
            "Maintenance.Hash",
            "there is no raft backend file to hash; the SQL database is the state",
        ))
    }

    async fn hash_kv(&self, _: Request<HashKvRequest>) -> Result<Response<HashKvResponse>, Status> {
        Err(unimplemented(
            "Maintenance.HashKV",
            "there are no replicas to compare; the SQL database is the state",
        ))
    }

    type SnapshotStream = futures::stream::BoxStream<'static, Result<SnapshotResponse, Status>>;

    async fn snapshot(
        &self,
        _: Request<SnapshotRequest>,
    ) -> Result<Response<Self::SnapshotStream>, Status> {
        Err(unimplemented(
            "Maintenance.Snapshot",
            "back up the SQL databases with their own tools (sqlite3 .backup, pg_dump, mariadb-dump)",
        ))
    }

    async fn move_leader(
        &self,
        _: Request<MoveLeaderRequest>,
    ) -> Result<Response<MoveLeaderResponse>, Status> {
        Err(unimplemented(
            "Maintenance.MoveLeader",
            "routers have no leader; every router serves reads and writes",
        ))
    }

    async fn downgrade(
        &self,
        _: Request<DowngradeRequest>,
    ) -> Result<Response<DowngradeResponse>, Status> {
        Err(unimplemented(
            "Maintenance.Downgrade",
            "the storage format is versioned by kubeshard's schema, not etcd's",
        ))
    }
}
