//! What ties the objects the operator makes at run time (nodes, their leases) to its Helm
//! installation: they are owned by the chart's ClusterRole, so `helm uninstall` removes them.

use k8s_openapi::api::rbac::v1::ClusterRole;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use kube::{Api, Client, Resource};

/// The owner reference to the ClusterRole `name`, for the nodes darkcore publishes.
pub async fn anchor(client: &Client, name: &str) -> kube::Result<Option<OwnerReference>> {
    let role = Api::<ClusterRole>::all(client.clone()).get(name).await?;
    Ok(role.owner_ref(&()))
}
