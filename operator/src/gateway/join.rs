//! `Enrollment.Join`: trades a join token and a certificate request for a device identity.
//! Every refusal names its reason and the fix, and counts in `darkcore_operator_joins_total`.

use std::sync::Arc;

use darkcore_crds::DevicePool;
use darkcore_proto::agent::v1::enrollment_server::Enrollment;
use darkcore_proto::agent::v1::{JoinRequest, JoinResponse};
use darkcore_proto::{PROTOCOL_VERSION, UnsupportedVersion, check_version};
use kube::{Api, Client};
use tonic::{Request, Response, Status};

use crate::enroll::ca::CaMaterial;
use crate::enroll::redeem::{RedeemError, Redeemer};
use crate::enroll::token::{JoinToken, MalformedToken};
use crate::gateway::join_limit::JoinLimiter;
use crate::metrics::Metrics;
use crate::tls::{self, DeviceIdentity, TlsError};

pub struct JoinService {
    pub client: Client,
    /// Counts uses of the join tokens in the operator's namespace.
    pub redeemer: Redeemer,
    pub ca: CaMaterial,
    /// How long the device certificates it signs are valid.
    pub cert_validity: std::time::Duration,
    pub metrics: Arc<Metrics>,
    /// How fast devices may join, checked first.
    pub limiter: JoinLimiter,
}

#[derive(Debug, thiserror::Error)]
enum JoinError {
    #[error(transparent)]
    Version(#[from] UnsupportedVersion),
    #[error(transparent)]
    Malformed(#[from] MalformedToken),
    #[error(transparent)]
    Token(#[from] RedeemError),
    #[error(
        "the token is for pool {0:?}, which no longer exists: ask the platform team for a token of an existing pool"
    )]
    NoPool(String),
    #[error(transparent)]
    Certificate(#[from] TlsError),
    #[error("checking the pool: {0}")]
    Api(#[source] kube::Error),
}

impl JoinError {
    fn label(&self) -> &'static str {
        match self {
            JoinError::Version(_) => "unsupported_version",
            JoinError::Malformed(_) => "malformed",
            JoinError::Token(e) => e.label(),
            JoinError::NoPool(_) => "no_pool",
            JoinError::Certificate(TlsError::BadRequest(_)) => "bad_csr",
            JoinError::Certificate(_) => "signing",
            JoinError::Api(_) => "api",
        }
    }

    fn status(&self) -> Status {
        let message = self.to_string();
        match self {
            JoinError::Version(_) | JoinError::NoPool(_) => Status::failed_precondition(message),
            JoinError::Malformed(_) | JoinError::Certificate(TlsError::BadRequest(_)) => {
                Status::invalid_argument(message)
            }
            JoinError::Token(RedeemError::Store(_)) | JoinError::Api(_) => {
                Status::unavailable(message)
            }
            JoinError::Token(_) => Status::permission_denied(message),
            JoinError::Certificate(_) => Status::internal(message),
        }
    }
}

#[tonic::async_trait]
impl Enrollment for JoinService {
    async fn join(&self, request: Request<JoinRequest>) -> Result<Response<JoinResponse>, Status> {
        let peer = request.remote_addr();
        if let Err(throttled) = self
            .limiter
            .admit(peer.map(|p| p.ip()), std::time::Instant::now())
        {
            self.metrics.join("throttled");
            tracing::debug!(?peer, "join throttled");
            return Err(Status::resource_exhausted(throttled.message()));
        }
        let request = request.into_inner();
        match self.admit(&request).await {
            Ok(response) => {
                self.metrics.join("accepted");
                tracing::info!(device = %response.device_id, pool = %response.pool, hostname = %request.hostname, ?peer, "device joined");
                Ok(Response::new(response))
            }
            Err(error) => {
                self.metrics.join(error.label());
                // The token itself is never logged; its id is enough to find it.
                let token_id = request
                    .token
                    .parse::<JoinToken>()
                    .map(|t| t.id)
                    .unwrap_or_else(|_| "<malformed>".into());
                tracing::warn!(%error, token = %token_id, hostname = %request.hostname, ?peer, "join refused");
                Err(error.status())
            }
        }
    }
}

impl JoinService {
    async fn admit(&self, request: &JoinRequest) -> Result<JoinResponse, JoinError> {
        check_version(request.version, "operator")?;
        let token: JoinToken = request.token.parse()?;
        // A bad request must not use up the token.
        tls::check_request(&request.csr_der)?;
        let record = self.redeemer.redeem(token).await?;
        let pools: Api<DevicePool> = Api::all(self.client.clone());
        if pools
            .get_opt(&record.pool)
            .await
            .map_err(JoinError::Api)?
            .is_none()
        {
            return Err(JoinError::NoPool(record.pool));
        }
        let identity = DeviceIdentity {
            device_id: tls::new_device_id()?,
            pool: record.pool,
            owner: record.owner,
        };
        let certificate_pem =
            tls::sign_device(&self.ca, &request.csr_der, &identity, self.cert_validity)?;
        Ok(JoinResponse {
            version: PROTOCOL_VERSION as i32,
            device_id: identity.device_id,
            pool: identity.pool,
            certificate_pem,
            ca_pem: self.ca.cert_pem.clone(),
        })
    }
}
