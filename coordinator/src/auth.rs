//! Who may call what: every service but gRPC health sits behind a [`Guard`].
//!
//! - With credentials (an auth file), a call must carry `authorization: Bearer <token>`
//!   whose hash is in the file, or it is refused `UNAUTHENTICATED`.
//! - User tokens (roles `admin`, `user`) may call `JobService`, `ClusterService` and
//!   reflection; join tokens (role `worker`) only `WorkerService`. The wrong kind is
//!   refused `PERMISSION_DENIED`.
//! - With a client CA (mutual TLS), `WorkerService` also requires a client certificate
//!   that chains to it.
//! - Without credentials every caller is [`Principal::anonymous`], an admin: the
//!   coordinator then listens on loopback only unless started with `--insecure`
//!   (see [`crate::start`]).
//!
//! The guard puts the caller's [`Principal`] in the request's extensions; the services
//! read it with [`caller`] and check job ownership with [`check_job_access`].

use std::sync::Arc;

use tonic::service::Interceptor;
use tonic::{Request, Status};
use trainyard_auth::client::{parse_bearer, AUTHORIZATION};
use trainyard_auth::{Credentials, Principal, Role};

/// Which services a guard protects.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Audience {
    /// The user APIs (`JobService`, `ClusterService`, reflection): admins and users.
    Users,
    /// The worker protocol (`WorkerService`): join tokens only.
    Workers,
}

/// The authentication and role check in front of a service.
#[derive(Clone)]
pub struct Guard {
    credentials: Option<Arc<Credentials>>,
    audience: Audience,
    require_client_cert: bool,
}

impl Guard {
    /// A guard for `audience`; `credentials: None` lets everyone in as the anonymous
    /// admin; `require_client_cert` (mutual TLS) applies to [`Audience::Workers`].
    pub fn new(
        credentials: Option<Arc<Credentials>>,
        audience: Audience,
        require_client_cert: bool,
    ) -> Self {
        Guard {
            credentials,
            audience,
            require_client_cert,
        }
    }

    fn authenticate(&self, request: &Request<()>) -> Result<Principal, Status> {
        let Some(credentials) = &self.credentials else {
            return Ok(Principal::anonymous());
        };
        let hint = match self.audience {
            Audience::Users => "pass a token with --token-file or TRAINYARD_TOKEN",
            Audience::Workers => "start the worker with --join-token-file or TRAINYARD_JOIN_TOKEN",
        };
        let Some(value) = request.metadata().get(AUTHORIZATION) else {
            return Err(Status::unauthenticated(format!(
                "authorization: missing bearer token ({hint})"
            )));
        };
        let token =
            value.to_str().ok().and_then(parse_bearer).ok_or_else(|| {
                Status::unauthenticated("authorization: expected \"Bearer <token>\"")
            })?;
        credentials.authenticate(token).cloned().ok_or_else(|| {
            Status::unauthenticated(format!(
                "authorization: the token is not valid here (unknown or revoked; {hint})"
            ))
        })
    }
}

impl Interceptor for Guard {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        let principal = self.authenticate(&request)?;
        match self.audience {
            Audience::Users if !principal.role.is_user() => {
                return Err(Status::permission_denied(format!(
                    "worker join token {:?} cannot call the user APIs; use a user token",
                    principal.name
                )));
            }
            Audience::Workers if self.credentials.is_some() && principal.role != Role::Worker => {
                return Err(Status::permission_denied(format!(
                    "user {:?} cannot call the worker protocol (WorkerService); workers \
                     join with a join token",
                    principal.name
                )));
            }
            _ => {}
        }
        if self.audience == Audience::Workers && self.require_client_cert {
            let presented = request.peer_certs().is_some_and(|c| !c.is_empty());
            if !presented {
                return Err(Status::unauthenticated(
                    "WorkerService requires a client certificate (mutual TLS): start the \
                     worker with --tls-cert and --tls-key",
                ));
            }
        }
        request.extensions_mut().insert(principal);
        Ok(request)
    }
}

/// The caller the guard let in.
pub fn caller<T>(request: &Request<T>) -> Result<Principal, Status> {
    request
        .extensions()
        .get::<Principal>()
        .cloned()
        .ok_or_else(|| Status::unauthenticated("no authenticated caller"))
}

/// Whether `caller` may read and cancel a job of `owner`: its own, or any as an admin.
pub fn may_access(caller: &Principal, owner: &str) -> bool {
    caller.role == Role::Admin || (caller.role == Role::User && caller.name == owner)
}

/// [`may_access`] as a gRPC error naming the job and its owner.
pub fn check_job_access(caller: &Principal, job_id: &str, owner: &str) -> Result<(), Status> {
    if may_access(caller, owner) {
        Ok(())
    } else {
        Err(Status::permission_denied(format!(
            "job {job_id} belongs to {owner:?}; user {:?} may only read and cancel their own \
             jobs (the admin role may read and cancel any)",
            caller.name
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn creds() -> Arc<Credentials> {
        Arc::new(Credentials::from_tokens([
            (
                "tyu_alice",
                Principal {
                    name: "alice".into(),
                    role: Role::User,
                },
            ),
            (
                "tyw_pool",
                Principal {
                    name: "pool".into(),
                    role: Role::Worker,
                },
            ),
        ]))
    }

    fn call(guard: &mut Guard, token: Option<&str>) -> Result<Principal, Status> {
        let mut req = Request::new(());
        if let Some(t) = token {
            req.metadata_mut()
                .insert(AUTHORIZATION, format!("Bearer {t}").parse().unwrap());
        }
        let req = guard.call(req)?;
        caller(&req)
    }

    #[test]
    fn tokens_and_roles_are_checked() {
        let mut users = Guard::new(Some(creds()), Audience::Users, false);
        let mut workers = Guard::new(Some(creds()), Audience::Workers, false);
        assert_eq!(call(&mut users, Some("tyu_alice")).unwrap().name, "alice");
        assert_eq!(
            call(&mut users, None).unwrap_err().code(),
            tonic::Code::Unauthenticated
        );
        assert_eq!(
            call(&mut users, Some("tyu_bogus")).unwrap_err().code(),
            tonic::Code::Unauthenticated
        );
        assert_eq!(
            call(&mut users, Some("tyw_pool")).unwrap_err().code(),
            tonic::Code::PermissionDenied
        );
        assert_eq!(
            call(&mut workers, Some("tyu_alice")).unwrap_err().code(),
            tonic::Code::PermissionDenied
        );
        assert_eq!(
            call(&mut workers, Some("tyw_pool")).unwrap().role,
            Role::Worker
        );
        // mTLS required: a valid join token over a connection without a client cert.
        let mut strict = Guard::new(Some(creds()), Audience::Workers, true);
        let err = call(&mut strict, Some("tyw_pool")).unwrap_err();
        assert_eq!(err.code(), tonic::Code::Unauthenticated);
        assert!(err.message().contains("client certificate"), "{err}");
    }

    #[test]
    fn without_credentials_everyone_is_the_anonymous_admin() {
        let mut open = Guard::new(None, Audience::Workers, false);
        assert_eq!(call(&mut open, None).unwrap(), Principal::anonymous());
        let alice = Principal {
            name: "alice".into(),
            role: Role::User,
        };
        assert!(may_access(&alice, "alice"));
        assert!(!may_access(&alice, "bob"));
        assert!(!may_access(&alice, ""));
        assert!(may_access(&Principal::anonymous(), "bob"));
        let err = check_job_access(&alice, "j1", "bob").unwrap_err();
        assert_eq!(err.code(), tonic::Code::PermissionDenied);
        assert!(err.message().contains("j1"), "{err}");
    }
}
