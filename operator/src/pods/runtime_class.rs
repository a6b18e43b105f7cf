//! The RuntimeClasses that choose darkcore: `darkcore-process`, `darkcore-oci` and
//! `darkcore-wasm`. Their scheduling tolerates darkcore's taint and selects nodes whose pool
//! allows the runtime, so `runtimeClassName` alone lands a pod on a pool. No arch is selected:
//! `wasm` runs on any arch, and the other two go to the node of the pod's own arch as usual.
//! The Helm chart installs them (so `helm uninstall` removes them); the operator only checks
//! that what is installed is what it expects.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::Toleration;
use k8s_openapi::api::node::v1::{RuntimeClass, Scheduling};
use kube::api::ObjectMeta;
use kube::{Api, Client};

use crate::pods::admission::RUNTIME_CLASSES;
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

/// What differs between the installed classes and [`desired`], one line per problem (pure).
pub fn differences(installed: &[Option<RuntimeClass>]) -> Vec<String> {
    desired()
        .into_iter()
        .zip(installed)
        .filter_map(|(want, have)| {
            let name = want.metadata.name.clone().unwrap_or_default();
            match have {
                None => Some(format!("RuntimeClass {name} is missing")),
                Some(have) if have.handler != want.handler || have.scheduling != want.scheduling => {
                    Some(format!(
                        "RuntimeClass {name} differs from what this operator expects (handler {:?}, scheduling {:?})",
                        have.handler, have.scheduling
                    ))
                }
                Some(_) => None,
            }
        })
        .collect()
}

/// Reads the three RuntimeClasses and reports, in the log, any that the chart should have
/// installed and did not. Pods naming a missing class are refused by the API server, so this
/// only explains the refusal in advance.
pub async fn check(client: &Client) -> Result<Vec<String>, kube::Error> {
    let api: Api<RuntimeClass> = Api::all(client.clone());
    let mut installed = Vec::new();
    for class in desired() {
        installed.push(
            api.get_opt(&class.metadata.name.unwrap_or_default())
                .await?,
        );
    }
    Ok(differences(&installed))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn installed_classes_as_desired_show_no_difference() {
        let installed: Vec<_> = desired().into_iter().map(Some).collect();
        assert!(differences(&installed).is_empty());
    }

    #[test]
    fn a_missing_or_changed_class_is_named() {
        let mut installed: Vec<_> = desired().into_iter().map(Some).collect();
        installed[0] = None;
        installed[2].as_mut().unwrap().scheduling = None;
        let found = differences(&installed);
        assert_eq!(found.len(), 2);
        assert!(found[0].contains("darkcore-process is missing"));
        assert!(found[1].contains("darkcore-wasm differs"));
    }
}
