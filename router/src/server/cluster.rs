//! etcd's Cluster service: this router presents itself as the one member.

use std::sync::Arc;

use kubeshard_proto::etcdserverpb::cluster_server::Cluster;
use kubeshard_proto::etcdserverpb::{
    Member, MemberAddRequest, MemberAddResponse, MemberListRequest, MemberListResponse,
    MemberPromoteRequest, MemberPromoteResponse, MemberRemoveRequest, MemberRemoveResponse,
    MemberUpdateRequest, MemberUpdateResponse,
};
use tonic::{Request, Response, Status};

use super::Core;
use crate::error::unimplemented;

const WHY: &str = "membership is the set of kubeshard routers, configured outside etcd's API";

#[derive(Debug)]
pub struct ClusterService {
    core: Arc<Core>,
}

impl ClusterService {
    pub fn new(core: Arc<Core>) -> Self {
        ClusterService { core }
    }
}

#[tonic::async_trait]
impl Cluster for ClusterService {
    async fn member_add(
        &self,
        _: Request<MemberAddRequest>,
    ) -> Result<Response<MemberAddResponse>, Status> {
        Err(unimplemented("Cluster.MemberAdd", WHY))
    }

    async fn member_remove(
        &self,
        _: Request<MemberRemoveRequest>,
    ) -> Result<Response<MemberRemoveResponse>, Status> {
        Err(unimplemented("Cluster.MemberRemove", WHY))
    }

    async fn member_update(
        &self,
        _: Request<MemberUpdateRequest>,
    ) -> Result<Response<MemberUpdateResponse>, Status> {
        Err(unimplemented("Cluster.MemberUpdate", WHY))
    }

    async fn member_list(
        &self,
        _: Request<MemberListRequest>,
    ) -> Result<Response<MemberListResponse>, Status> {
        let revision = self.core.current_revision().await?;
        Ok(Response::new(MemberListResponse {
            header: self.core.header(revision),
            members: vec![Member {
                id: self.core.member_id,
                name: "kubeshard".to_string(),
                peer_ur_ls: Vec::new(),
                client_ur_ls: vec![self.core.client_url.clone()],
                is_learner: false,
            }],
        }))
    }

    async fn member_promote(
        &self,
        _: Request<MemberPromoteRequest>,
    ) -> Result<Response<MemberPromoteResponse>, Status> {
        Err(unimplemented("Cluster.MemberPromote", WHY))
    }
}
