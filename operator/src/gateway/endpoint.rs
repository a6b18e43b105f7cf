//! Points the gateway Service at the leader. The chart's gateway Service has no selector: the
//! leader writes its one EndpointSlice with its own address, so agents reach only the replica
//! that acts, and a standby that took over rewrites it before it serves.

use std::collections::BTreeMap;
use std::net::IpAddr;

use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::{Endpoint, EndpointConditions, EndpointPort, EndpointSlice};
use kube::api::{ObjectMeta, Patch, PatchParams};
use kube::{Api, Client, Resource, ResourceExt};

use crate::pool::FIELD_MANAGER;

/// The port name the chart's gateway Service uses; the slice's port must carry the same name.
pub const PORT_NAME: &str = "grpc";
/// Annotation naming the replica that wrote the slice.
pub const LEADER_ANNOTATION: &str = "darkcore.io/leader";

/// The slice that sends `service`'s traffic to `address:port` (pure). It is owned by the
/// Service, so deleting the Service (`helm uninstall`) deletes it too.
pub fn leader_slice(service: &Service, address: &str, port: u16, leader: &str) -> EndpointSlice {
    let address_type = match address.parse::<IpAddr>() {
        Ok(IpAddr::V4(_)) => "IPv4",
        Ok(IpAddr::V6(_)) => "IPv6",
        Err(_) => "FQDN",
    };
    let service_name = service.name_any();
    EndpointSlice {
        metadata: ObjectMeta {
            name: Some(format!("{service_name}-leader")),
            namespace: service.namespace(),
            labels: Some(BTreeMap::from([
                ("kubernetes.io/service-name".into(), service_name.clone()),
                (
                    "endpointslice.kubernetes.io/managed-by".into(),
                    "darkcore.io-operator".into(),
                ),
            ])),
            annotations: Some(BTreeMap::from([(LEADER_ANNOTATION.into(), leader.into())])),
            owner_references: service.owner_ref(&()).map(|r| vec![r]),
            ..ObjectMeta::default()
        },
        address_type: address_type.into(),
        endpoints: vec![Endpoint {
            addresses: vec![address.into()],
            conditions: Some(EndpointConditions {
                ready: Some(true),
                serving: Some(true),
                terminating: Some(false),
            }),
            ..Endpoint::default()
        }],
        ports: Some(vec![EndpointPort {
            name: Some(PORT_NAME.into()),
            port: Some(port.into()),
            protocol: Some("TCP".into()),
            ..EndpointPort::default()
        }]),
    }
}

/// Applies the leader's slice for the Service `namespace/service`.
pub async fn publish(
    client: &Client,
    namespace: &str,
    service: &str,
    address: &str,
    port: u16,
    leader: &str,
) -> kube::Result<()> {
    let owner = Api::<Service>::namespaced(client.clone(), namespace)
        .get(service)
        .await?;
    // k8s-openapi serializes apiVersion and kind, as server-side apply needs.
    let slice = leader_slice(&owner, address, port, leader);
    Api::<EndpointSlice>::namespaced(client.clone(), namespace)
        .patch(
            &slice.name_any(),
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(&slice),
        )
        .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn service() -> Service {
        Service {
            metadata: ObjectMeta {
                name: Some("darkcore-gateway".into()),
                namespace: Some("darkcore-system".into()),
                uid: Some("u-1".into()),
                ..ObjectMeta::default()
            },
            ..Service::default()
        }
    }

    #[test]
    fn the_slice_names_the_service_the_leader_and_its_port() {
        let slice = leader_slice(&service(), "10.0.0.7", 7443, "operator-a");
        assert_eq!(slice.name_any(), "darkcore-gateway-leader");
        assert_eq!(
            slice.labels()["kubernetes.io/service-name"],
            "darkcore-gateway"
        );
        assert_eq!(slice.annotations()[LEADER_ANNOTATION], "operator-a");
        assert_eq!(slice.address_type, "IPv4");
        assert_eq!(slice.endpoints[0].addresses, ["10.0.0.7"]);
        let port = &slice.ports.as_ref().unwrap()[0];
        assert_eq!(
            (port.name.as_deref(), port.port),
            (Some(PORT_NAME), Some(7443))
        );
        assert_eq!(slice.owner_references()[0].uid, "u-1");
    }

    #[test]
    fn the_address_type_follows_the_address() {
        assert_eq!(
            leader_slice(&service(), "fd00::7", 1, "a").address_type,
            "IPv6"
        );
        assert_eq!(
            leader_slice(&service(), "op.example", 1, "a").address_type,
            "FQDN"
        );
    }
}
