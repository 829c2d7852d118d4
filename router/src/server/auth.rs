//! etcd's Auth service: authentication is off, and the calls that would turn
//! it on or manage users answer Unimplemented with the reason.

use kubeshard_proto::etcdserverpb::auth_server::Auth;
use kubeshard_proto::etcdserverpb::*;
use tonic::{Request, Response, Status};

use crate::error::unimplemented;

const WHY: &str =
    "authentication is off; protect kubeshard with network policy or mutual TLS in front of it";

#[derive(Debug)]
pub struct AuthService;

/// The Auth impl: AuthStatus says auth is off, the rest answer Unimplemented.
/// (The impl is generated whole so that async_trait sees the expanded methods.)
macro_rules! auth_service {
    ($($method:ident: $req:ty => $resp:ty, $rpc:literal;)*) => {
        #[tonic::async_trait]
        impl Auth for AuthService {
            async fn auth_status(
                &self,
                _: Request<AuthStatusRequest>,
            ) -> Result<Response<AuthStatusResponse>, Status> {
                Ok(Response::new(AuthStatusResponse {
                    header: None,
                    enabled: false,
                    auth_revision: 0,
                }))
            }

            $(
                async fn $method(&self, _: Request<$req>) -> Result<Response<$resp>, Status> {
                    Err(unimplemented($rpc, WHY))
                }
            )*
        }
    };
}

auth_service! {
    auth_enable: AuthEnableRequest => AuthEnableResponse, "Auth.AuthEnable";
    auth_disable: AuthDisableRequest => AuthDisableResponse, "Auth.AuthDisable";
    authenticate: AuthenticateRequest => AuthenticateResponse, "Auth.Authenticate";
    user_add: AuthUserAddRequest => AuthUserAddResponse, "Auth.UserAdd";
    user_get: AuthUserGetRequest => AuthUserGetResponse, "Auth.UserGet";
    user_list: AuthUserListRequest => AuthUserListResponse, "Auth.UserList";
    user_delete: AuthUserDeleteRequest => AuthUserDeleteResponse, "Auth.UserDelete";
    user_change_password: AuthUserChangePasswordRequest => AuthUserChangePasswordResponse, "Auth.UserChangePassword";
    user_grant_role: AuthUserGrantRoleRequest => AuthUserGrantRoleResponse, "Auth.UserGrantRole";
    user_revoke_role: AuthUserRevokeRoleRequest => AuthUserRevokeRoleResponse, "Auth.UserRevokeRole";
    role_add: AuthRoleAddRequest => AuthRoleAddResponse, "Auth.RoleAdd";
    role_get: AuthRoleGetRequest => AuthRoleGetResponse, "Auth.RoleGet";
    role_list: AuthRoleListRequest => AuthRoleListResponse, "Auth.RoleList";
    role_delete: AuthRoleDeleteRequest => AuthRoleDeleteResponse, "Auth.RoleDelete";
    role_grant_permission: AuthRoleGrantPermissionRequest => AuthRoleGrantPermissionResponse, "Auth.RoleGrantPermission";
    role_revoke_permission: AuthRoleRevokePermissionRequest => AuthRoleRevokePermissionResponse, "Auth.RoleRevokePermission";
}
