//! The RuntimeClasses that choose darkcore: `darkcore-process`, `darkcore-oci` and
//! `darkcore-wasm`. Their scheduling tolerates darkcore's taint and selects nodes whose pool
//! allows the runtime, so `runtimeClassName` alone lands a pod on a pool. No arch is selected:
//! `wasm` runs on any arch, and the other two go to the node of the pod's own arch as usual.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::Toleration;
use k8s_openapi::api::node::v1::{RuntimeClass, Scheduling};
use kube::api::{ObjectMeta, Patch, PatchParams};
use kube::{Api, Client};

use crate::pods::admission::RUNTIME_CLASSES;
use crate::pool::FIELD_MANAGER;
use crate::pool::node::{PROVIDER_TAINT_KEY, PROVIDER_TAINT_VALUE, RUNTIME_LABEL_PREFIX};

pub fn desired() -> Vec<RuntimeClass> {
    RUNTIME_CLASSES
        .iter()
        .map(|(name, runtime)| RuntimeClass {
            metadata: ObjectMeta {
                name: Some((*name).into()),
                labels: Some(BTreeMap::from([(
                    "app.kubernetes.io/managed-by".into(),
                    "darkcore".into(),
                )])),
                ..Default::default()
            },
            handler: (*name).into(),
            overhead: None,
            scheduling: Some(Scheduling {
                node_selector: Some(BTreeMap::from([(
                    format!("{RUNTIME_LABEL_PREFIX}{}", runtime.as_str()),
                    "true".into(),
                )])),
                tolerations: Some(vec![Toleration {
                    key: Some(PROVIDER_TAINT_KEY.into()),
                    operator: Some("Equal".into()),
                    value: Some(PROVIDER_TAINT_VALUE.into()),
                    effect: Some("NoSchedule".into()),
                    toleration_seconds: None,
                }]),
            }),
        })
        .collect()
}

/// Creates or updates the three RuntimeClasses.
pub async fn ensure(client: &Client) -> Result<(), kube::Error> {
    let api: Api<RuntimeClass> = Api::all(client.clone());
    for class in desired() {
        let name = class.metadata.name.clone().unwrap_or_default();
        let mut body = serde_json::to_value(&class).unwrap_or_default();
        body["apiVersion"] = "node.k8s.io/v1".into();
        body["kind"] = "RuntimeClass".into();
        api.patch(
            &name,
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(&body),
        )
        .await?;
    }
    Ok(())
}
