//! Node heartbeats: a Lease per node in `kube-node-lease`, renewed every 10 s, as a kubelet
//! does. While these are fresh, Kubernetes' node-lifecycle controller keeps the node Ready.

use std::sync::Arc;
use std::time::Duration;

use darkcore_crds::DevicePool;
use futures::{StreamExt, stream};
use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::api::core::v1::Node;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use k8s_openapi::jiff::Timestamp;
use kube::api::{ObjectMeta, Patch, PatchParams, PostParams};
use kube::runtime::reflector::{ObjectRef, Store};
use kube::{Api, Client, Resource, ResourceExt};
use serde_json::json;

use crate::metrics::Metrics;
use crate::pool::POOL_LABEL;

pub const NODE_LEASE_NAMESPACE: &str = "kube-node-lease";
/// How long a lease holds without renewal: virtual-kubelet's and the kubelet's 40 s.
pub const LEASE_DURATION_SECONDS: i32 = 40;
/// A quarter of the lease duration, as the kubelet renews.
pub const RENEW_INTERVAL: Duration = Duration::from_secs(10);
/// Renewals in flight at once, so thousands of nodes never open thousands of requests.
const CONCURRENT_RENEWALS: usize = 16;

/// The lease for `node`, owned by it so that Kubernetes deletes it with the node.
pub fn node_lease(node: &Node, now: Timestamp) -> Lease {
    let name = node.name_any();
    Lease {
        metadata: ObjectMeta {
            name: Some(name.clone()),
            namespace: Some(NODE_LEASE_NAMESPACE.into()),
            owner_references: node.owner_ref(&()).map(|r| vec![r]),
            ..ObjectMeta::default()
        },
        spec: Some(LeaseSpec {
            holder_identity: Some(name),
            lease_duration_seconds: Some(LEASE_DURATION_SECONDS),
            renew_time: Some(MicroTime(now)),
            ..LeaseSpec::default()
        }),
    }
}

/// Whether `node` belongs to a pool this operator serves that is not being deleted.
pub fn is_served(node: &Node, pools: &Store<DevicePool>) -> bool {
    let Some(pool) = node.labels().get(POOL_LABEL) else {
        return false;
    };
    pools
        .get(&ObjectRef::new(pool))
        .is_some_and(|p| p.meta().deletion_timestamp.is_none())
}

/// Renews the lease of every served node every [`RENEW_INTERVAL`], until the task is dropped.
pub async fn renew_loop(
    client: Client,
    pools: Store<DevicePool>,
    nodes: Store<Node>,
    metrics: Arc<Metrics>,
) {
    let leases: Api<Lease> = Api::namespaced(client, NODE_LEASE_NAMESPACE);
    let mut tick = tokio::time::interval(RENEW_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let served: Vec<Arc<Node>> = nodes
            .state()
            .into_iter()
            .filter(|n| is_served(n, &pools))
            .collect();
        metrics.virtual_nodes.set(served.len() as i64);
        stream::iter(served)
            .for_each_concurrent(CONCURRENT_RENEWALS, |node| {
                let leases = leases.clone();
                let metrics = metrics.clone();
                async move {
                    let result = renew(&leases, &node, &metrics).await;
                    metrics.lease_renewal(result.is_ok());
                    if let Err(error) = result {
                        tracing::warn!(node = %node.name_any(), %error, "renewing node lease failed; retrying next tick");
                    }
                }
            })
            .await;
    }
}

/// Renews `node`'s lease, creating it (owned by the node) when it is missing.
pub async fn renew(leases: &Api<Lease>, node: &Node, metrics: &Metrics) -> kube::Result<()> {
    let now = Timestamp::now();
    let patch = json!({ "spec": {
        "holderIdentity": node.name_any(),
        "leaseDurationSeconds": LEASE_DURATION_SECONDS,
        "renewTime": MicroTime(now),
    }});
    metrics.api_write("Lease", "patch");
    match leases
        .patch(
            &node.name_any(),
            &PatchParams::default(),
            &Patch::Merge(&patch),
        )
        .await
    {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(status)) if status.code == 404 => {
            metrics.api_write("Lease", "create");
            match leases
                .create(&PostParams::default(), &node_lease(node, now))
                .await
            {
                Ok(_) => Ok(()),
                Err(kube::Error::Api(status)) if status.code == 409 => Ok(()),
                Err(e) => Err(e),
            }
        }
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_node_lease_is_owned_by_its_node_and_held_by_it() {
        let mut node = Node::default();
        node.metadata.name = Some("darkcore-lab-linux-amd64".into());
        node.metadata.uid = Some("u-1".into());
        let lease = node_lease(&node, Timestamp::from_second(1_800_000_000).unwrap());
        assert_eq!(lease.metadata.namespace.as_deref(), Some("kube-node-lease"));
        let owner = &lease.metadata.owner_references.as_ref().unwrap()[0];
        assert_eq!((owner.kind.as_str(), owner.uid.as_str()), ("Node", "u-1"));
        let spec = lease.spec.unwrap();
        assert_eq!(
            spec.holder_identity.as_deref(),
            Some("darkcore-lab-linux-amd64")
        );
        assert_eq!(spec.lease_duration_seconds, Some(40));
    }
}
