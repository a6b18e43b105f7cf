//! What ties the objects the operator makes at run time (nodes, their leases) to its Helm
//! installation: they are owned by the chart's ClusterRole, so `helm uninstall` removes them.

use k8s_openapi::api::rbac::v1::ClusterRole;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use kube::{Api, Client, Resource, ResourceExt};

/// The owner reference to the ClusterRole `name`, for the nodes darkcore publishes.
pub async fn anchor(client: &Client, name: &str) -> kube::Result<OwnerReference> {
    let role = Api::<ClusterRole>::all(client.clone()).get(name).await?;
    Ok(OwnerReference {
        api_version: ClusterRole::api_version(&()).into(),
        kind: ClusterRole::kind(&()).into(),
        name: role.name_any(),
        uid: role.uid().unwrap_or_default(),
        ..OwnerReference::default()
    })
}
