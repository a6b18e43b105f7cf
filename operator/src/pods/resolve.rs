//! A pod's containers and volumes as the device gets them (pure): env from values, fieldRef,
//! resourceFieldRef, ConfigMaps and Secrets, with `$(VAR)` expanded as the kubelet does; and
//! configMap, secret, emptyDir, downwardAPI and projected volumes as files.
//!
//! The ConfigMaps and Secrets a pod names are fetched first (`referenced`), then passed in as
//! `Lookups`, so that everything here is testable without a cluster.

use std::collections::{BTreeMap, HashMap, HashSet};

use darkcore_proto::agent::v1::{
    Container as TaskContainer, EnvVar, RegistryCredential, SecurityContext, Volume, VolumeFile,
    VolumeMount, container::PullPolicy,
};
use k8s_openapi::api::core::v1::{
    ConfigMap, Container, DownwardAPIVolumeFile, KeyToPath, ObjectFieldSelector, Pod,
    ResourceFieldSelector, Secret,
};

use super::demand::container_resources;
use super::pull_secrets;
use crate::domain::quantity::{cpu_millis, parse_memory};
use darkcore_crds::device_pool::{SecretPolicy, SecretRule};

/// Mode of volume files when the pod sets none (as the kubelet: 0644).
pub const DEFAULT_FILE_MODE: u32 = 0o644;
/// The annotation indexed Jobs set, which `JOB_COMPLETION_INDEX` reads through a fieldRef.
pub const JOB_COMPLETION_INDEX: &str = "batch.kubernetes.io/job-completion-index";

/// The ConfigMaps and Secrets of the pod's namespace, as fetched (`None`: not found), and
/// which Secrets the pod's pool lets its devices have.
#[derive(Default, Debug, Clone)]
pub struct Lookups {
    pub config_maps: HashMap<String, Option<ConfigMap>>,
    pub secrets: HashMap<String, Option<Secret>>,
    /// The pod's pool, by name, and its `spec.secrets` (none allowed when not known).
    pub pool: String,
    pub secret_policy: SecretPolicy,
}

/// What the pod looks like from the node it runs on, for fieldRef.
#[derive(Default, Debug, Clone)]
pub struct Placement {
    pub node_name: String,
    pub pod_ip: String,
    pub host_ip: String,
}

/// A problem worth a Warning Event: the kubelet's reasons.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Warning {
    pub reason: &'static str,
    pub message: String,
    /// Published as a Warning Event; otherwise as a Normal one (something to know, not to fix).
    pub warning: bool,
}

/// Why the pod cannot start now; it is retried, as the kubelet retries.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Blocked {
    /// `CreateContainerConfigError`, as the kubelet shows it on the container.
    pub message: String,
}

#[derive(Clone, Debug, Default, PartialEq)]
pub struct Resolved {
    pub init_containers: Vec<TaskContainer>,
    pub containers: Vec<TaskContainer>,
    pub volumes: Vec<Volume>,
    /// From the pod's `imagePullSecrets`, for the device that runs it only.
    pub pull_credentials: Vec<RegistryCredential>,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    ConfigMap,
    Secret(SecretUse),
}

/// How a pod uses a Secret, as a pool's `spec.secrets` tells the uses apart.
#[derive(Clone, Copy, PartialEq, Eq)]
enum SecretUse {
    Env,
    Volume,
    PullCredentials,
}

impl Kind {
    fn word(self) -> &'static str {
        match self {
            Kind::ConfigMap => "configmap",
            Kind::Secret(_) => "secret",
        }
    }
}

impl SecretUse {
    /// The field of a pool's `spec.secrets` that rules this use.
    fn field(self) -> &'static str {
        match self {
            SecretUse::Env => "env",
            SecretUse::Volume => "volumes",
            SecretUse::PullCredentials => "pullCredentials",
        }
    }

    /// The rule of `policy` for this use.
    fn rule(self, policy: &SecretPolicy) -> &SecretRule {
        match self {
            SecretUse::Env => &policy.env,
            SecretUse::Volume => &policy.volumes,
            SecretUse::PullCredentials => &policy.pull_credentials,
        }
    }
}

/// The names of the ConfigMaps and Secrets a pod refers to.
pub fn referenced(pod: &Pod) -> (HashSet<String>, HashSet<String>) {
    let mut maps = HashSet::new();
    let mut secrets = HashSet::new();
    let Some(spec) = &pod.spec else {
        return (maps, secrets);
    };
    for c in spec
        .init_containers
        .iter()
        .flatten()
        .chain(&spec.containers)
    {
        for e in c.env.iter().flatten() {
            if let Some(from) = &e.value_from {
                if let Some(r) = &from.config_map_key_ref {
                    maps.insert(r.name.clone());
                }
                if let Some(r) = &from.secret_key_ref {
                    secrets.insert(r.name.clone());
                }
            }
        }
        for from in c.env_from.iter().flatten() {
            if let Some(r) = &from.config_map_ref {
                maps.insert(r.name.clone());
            }
            if let Some(r) = &from.secret_ref {
                secrets.insert(r.name.clone());
            }
        }
    }
    for v in spec.volumes.iter().flatten() {
        if let Some(cm) = &v.config_map {
            maps.insert(cm.name.clone());
        }
        if let Some(s) = &v.secret
            && let Some(name) = &s.secret_name
        {
            secrets.insert(name.clone());
        }
        for source in v.projected.iter().flat_map(|p| p.sources.iter().flatten()) {
            if let Some(cm) = &source.config_map {
                maps.insert(cm.name.clone());
            }
            if let Some(s) = &source.secret {
                secrets.insert(s.name.clone());
            }
        }
    }
    for reference in spec.image_pull_secrets.iter().flatten() {
        secrets.insert(reference.name.clone());
    }
    (maps, secrets)
}

struct Resolver<'a> {
    pod: &'a Pod,
    lookups: &'a Lookups,
    placement: &'a Placement,
    warnings: Vec<Warning>,
}

/// Resolves the pod for a device. `Err` when a mandatory ConfigMap, Secret or key is missing;
/// the warnings are returned either way, to be published as Events.
pub fn resolve(
    pod: &Pod,
    lookups: &Lookups,
    placement: &Placement,
) -> (Result<Resolved, Blocked>, Vec<Warning>) {
    let mut resolver = Resolver {
        pod,
        lookups,
        placement,
        warnings: Vec::new(),
    };
    let result = resolver.pod();
    (result, resolver.warnings)
}

impl Resolver<'_> {
    fn pod(&mut self) -> Result<Resolved, Blocked> {
        let Some(spec) = &self.pod.spec else {
            return Ok(Resolved::default());
        };
        let mut resolved = Resolved::default();
        for c in spec.init_containers.iter().flatten() {
            resolved.init_containers.push(self.container(c)?);
        }
        for c in &spec.containers {
            resolved.containers.push(self.container(c)?);
        }
        for v in spec.volumes.iter().flatten() {
            resolved.volumes.push(self.volume(v)?);
        }
        for reference in spec.image_pull_secrets.iter().flatten() {
            resolved
                .pull_credentials
                .extend(self.pull_secret(&reference.name));
        }
        Ok(resolved)
    }

    /// The credentials of one pull secret. Like the kubelet, a secret that is missing or
    /// unreadable is a warning, and the pull goes ahead without it.
    fn pull_secret(&mut self, name: &str) -> Vec<RegistryCredential> {
        let namespace = self.pod.metadata.namespace.as_deref().unwrap_or("default");
        let problem = match self.lookups.secrets.get(name).cloned().flatten() {
            None => "it was not found".to_string(),
            Some(secret) if !self.allowed(SecretUse::PullCredentials, name, &secret) => format!(
                "DevicePool {:?} withholds it from its devices (its spec.secrets.pullCredentials allows Secrets by name or label)",
                self.lookups.pool
            ),
            Some(secret) => match pull_secrets::credentials(&secret) {
                Ok(found) => return found,
                Err(problem) => problem,
            },
        };
        self.warnings.push(Warning {
            reason: "FailedToRetrieveImagePullSecret",
            message: format!(
                "image pull secret {namespace}/{name} is not used, because {problem}; pulls go ahead without it"
            ),
            warning: true,
        });
        Vec::new()
    }

    /// Whether the pool's `spec.secrets` lets devices have this Secret for this use.
    fn allowed(&self, used: SecretUse, name: &str, secret: &Secret) -> bool {
        let labels = secret.metadata.labels.clone().unwrap_or_default();
        used.rule(&self.lookups.secret_policy).allows(name, &labels)
    }

    /// A Secret the pool withholds: a mandatory one blocks the pod, naming the rule to change;
    /// an optional one is left out, with a Warning.
    fn withheld(&mut self, used: SecretUse, name: &str, optional: bool) -> Result<(), Blocked> {
        let namespace = self.pod.metadata.namespace.as_deref().unwrap_or("default");
        let pool = &self.lookups.pool;
        let field = used.field();
        let why = format!(
            "secret {namespace}/{name} is withheld from devices by DevicePool {pool:?}: a device owner with root can read anything sent to the device; to send it, name it in the pool's spec.secrets.{field}.names or give it a label in spec.secrets.{field}.matchLabels"
        );
        self.warnings.push(Warning {
            reason: "SecretWithheld",
            message: match optional {
                true => format!("{why}; the pod starts without it (it is optional)"),
                false => why.clone(),
            },
            warning: true,
        });
        match optional {
            true => Ok(()),
            false => Err(Blocked { message: why }),
        }
    }

    /// The data of a ConfigMap or Secret as bytes per key, or what to do when it is missing.
    fn source(
        &mut self,
        kind: Kind,
        name: &str,
        optional: bool,
    ) -> Result<Option<BTreeMap<String, Vec<u8>>>, Blocked> {
        let data = match kind {
            Kind::ConfigMap => self
                .lookups
                .config_maps
                .get(name)
                .cloned()
                .flatten()
                .map(|cm| {
                    let mut data: BTreeMap<String, Vec<u8>> = cm
                        .data
                        .unwrap_or_default()
                        .into_iter()
                        .map(|(k, v)| (k, v.into_bytes()))
                        .collect();
                    data.extend(
                        cm.binary_data
                            .unwrap_or_default()
                            .into_iter()
                            .map(|(k, v)| (k, v.0)),
                    );
                    data
                }),
            Kind::Secret(used) => match self.lookups.secrets.get(name).cloned().flatten() {
                Some(secret) if !self.allowed(used, name, &secret) => {
                    return self.withheld(used, name, optional).map(|()| None);
                }
                secret => secret.as_ref().map(secret_data),
            },
        };
        if data.is_some() {
            return Ok(data);
        }
        let namespace = self.pod.metadata.namespace.as_deref().unwrap_or("default");
        let (mandatory_reason, optional_reason) = match kind {
            Kind::ConfigMap => ("MandatoryConfigMapNotFound", "OptionalConfigMapNotFound"),
            Kind::Secret(_) => ("MandatorySecretNotFound", "OptionalSecretNotFound"),
        };
        let message = format!("{} \"{name}\" not found", kind.word());
        if optional {
            self.warnings.push(Warning {
                reason: optional_reason,
                message: format!(
                    "optional {} {namespace}/{name} not found; the pod starts without it",
                    kind.word()
                ),
                warning: true,
            });
            Ok(None)
        } else {
            self.warnings.push(Warning {
                reason: mandatory_reason,
                message: format!(
                    "{} {namespace}/{name} not found: create it, or mark the reference optional",
                    kind.word()
                ),
                warning: true,
            });
            Err(Blocked { message })
        }
    }

    fn key(
        &mut self,
        kind: Kind,
        name: &str,
        key: &str,
        optional: bool,
    ) -> Result<Option<Vec<u8>>, Blocked> {
        let Some(data) = self.source(kind, name, optional)? else {
            return Ok(None);
        };
        match data.get(key) {
            Some(value) => Ok(Some(value.clone())),
            None if optional => Ok(None),
            None => Err(Blocked {
                message: format!(
                    "couldn't find key {key} in {} {}/{name}",
                    kind.word(),
                    self.pod.metadata.namespace.as_deref().unwrap_or("default")
                ),
            }),
        }
    }

    fn container(&mut self, c: &Container) -> Result<TaskContainer, Blocked> {
        let mut env: Vec<EnvVar> = Vec::new();
        let set = |env: &mut Vec<EnvVar>, name: String, value: String| {
            env.retain(|e| e.name != name);
            env.push(EnvVar { name, value });
        };
        for from in c.env_from.iter().flatten() {
            let prefix = from.prefix.clone().unwrap_or_default();
            let data = if let Some(r) = &from.config_map_ref {
                self.source(Kind::ConfigMap, &r.name, r.optional == Some(true))?
            } else if let Some(r) = &from.secret_ref {
                self.source(
                    Kind::Secret(SecretUse::Env),
                    &r.name,
                    r.optional == Some(true),
                )?
            } else {
                None
            };
            for (key, value) in data.unwrap_or_default() {
                set(
                    &mut env,
                    format!("{prefix}{key}"),
                    String::from_utf8_lossy(&value).into_owned(),
                );
            }
        }
        for e in c.env.iter().flatten() {
            let value = match &e.value_from {
                None => Some(expand(e.value.as_deref().unwrap_or(""), &env)),
                Some(from) => {
                    if let Some(r) = &from.config_map_key_ref {
                        self.key(Kind::ConfigMap, &r.name, &r.key, r.optional == Some(true))?
                            .map(|v| String::from_utf8_lossy(&v).into_owned())
                    } else if let Some(r) = &from.secret_key_ref {
                        self.key(
                            Kind::Secret(SecretUse::Env),
                            &r.name,
                            &r.key,
                            r.optional == Some(true),
                        )?
                        .map(|v| String::from_utf8_lossy(&v).into_owned())
                    } else if let Some(r) = &from.field_ref {
                        Some(self.field(r)?)
                    } else if let Some(r) = &from.resource_field_ref {
                        Some(resource_field(c, r)?)
                    } else {
                        None
                    }
                }
            };
            if let Some(value) = value {
                set(&mut env, e.name.clone(), value);
            }
        }
        let expand_all = |list: &Option<Vec<String>>| -> Vec<String> {
            list.iter().flatten().map(|s| expand(s, &env)).collect()
        };
        let security = c.security_context.as_ref();
        let pod_security = self
            .pod
            .spec
            .as_ref()
            .and_then(|s| s.security_context.as_ref());
        Ok(TaskContainer {
            name: c.name.clone(),
            image: c.image.clone().unwrap_or_default(),
            command: expand_all(&c.command),
            args: expand_all(&c.args),
            working_dir: c.working_dir.clone().unwrap_or_default(),
            resources: Some(container_resources(c)),
            mounts: c
                .volume_mounts
                .iter()
                .flatten()
                .map(|m| VolumeMount {
                    volume: m.name.clone(),
                    mount_path: m.mount_path.clone(),
                    read_only: m.read_only == Some(true),
                    sub_path: m.sub_path.clone().unwrap_or_default(),
                })
                .collect(),
            pull_policy: match c.image_pull_policy.as_deref() {
                Some("Always") => PullPolicy::Always,
                Some("Never") => PullPolicy::Never,
                Some("IfNotPresent") => PullPolicy::IfNotPresent,
                _ => PullPolicy::Unspecified,
            } as i32,
            security_context: Some(SecurityContext {
                run_as_user: security
                    .and_then(|s| s.run_as_user)
                    .or(pod_security.and_then(|s| s.run_as_user)),
                run_as_group: security
                    .and_then(|s| s.run_as_group)
                    .or(pod_security.and_then(|s| s.run_as_group)),
                read_only_root_filesystem: security.and_then(|s| s.read_only_root_filesystem)
                    == Some(true),
            }),
            env,
        })
    }

    fn field(&self, selector: &ObjectFieldSelector) -> Result<String, Blocked> {
        let meta = &self.pod.metadata;
        let path = selector.field_path.as_str();
        let from_map = |map: &Option<BTreeMap<String, String>>, prefix: &str| -> Option<String> {
            let key = path.strip_prefix(prefix)?.strip_suffix("']")?;
            Some(
                map.as_ref()
                    .and_then(|m| m.get(key))
                    .cloned()
                    .unwrap_or_default(),
            )
        };
        let value = match path {
            "metadata.name" => meta.name.clone().unwrap_or_default(),
            "metadata.namespace" => meta.namespace.clone().unwrap_or_default(),
            "metadata.uid" => meta.uid.clone().unwrap_or_default(),
            "spec.nodeName" => self.placement.node_name.clone(),
            "spec.serviceAccountName" => self
                .pod
                .spec
                .as_ref()
                .and_then(|s| s.service_account_name.clone())
                .unwrap_or_default(),
            "status.podIP" | "status.podIPs" => self.placement.pod_ip.clone(),
            "status.hostIP" | "status.hostIPs" => self.placement.host_ip.clone(),
            "metadata.labels" => render_map(meta.labels.as_ref()),
            "metadata.annotations" => render_map(meta.annotations.as_ref()),
            _ => from_map(&meta.labels, "metadata.labels['")
                .or_else(|| from_map(&meta.annotations, "metadata.annotations['"))
                .ok_or_else(|| Blocked {
                    message: format!("unsupported fieldRef path {path:?}"),
                })?,
        };
        Ok(value)
    }

    fn volume(&mut self, v: &k8s_openapi::api::core::v1::Volume) -> Result<Volume, Blocked> {
        let mut volume = Volume {
            name: v.name.clone(),
            ..Default::default()
        };
        if let Some(empty_dir) = &v.empty_dir {
            volume.empty_dir = true;
            volume.size_limit_bytes = match &empty_dir.size_limit {
                None => 0,
                Some(limit) => parse_memory(&limit.0).ok_or_else(|| Blocked {
                    message: format!(
                        "emptyDir volume {:?} has sizeLimit {:?}, which is not a size \
                         (write it as a quantity such as 500Mi)",
                        v.name, limit.0
                    ),
                })?,
            };
        } else if let Some(cm) = &v.config_map {
            let mode = mode_or_default(cm.default_mode);
            volume.files = self.files(
                Kind::ConfigMap,
                &cm.name,
                cm.items.as_deref(),
                mode,
                cm.optional,
            )?;
        } else if let Some(secret) = &v.secret {
            let name = secret.secret_name.clone().unwrap_or_default();
            let mode = mode_or_default(secret.default_mode);
            volume.files = self.files(
                Kind::Secret(SecretUse::Volume),
                &name,
                secret.items.as_deref(),
                mode,
                secret.optional,
            )?;
        } else if let Some(downward) = &v.downward_api {
            let mode = mode_or_default(downward.default_mode);
            volume.files = self.downward(downward.items.as_deref().unwrap_or_default(), mode)?;
        } else if let Some(projected) = &v.projected {
            let mode = mode_or_default(projected.default_mode);
            for source in projected.sources.iter().flatten() {
                if let Some(cm) = &source.config_map {
                    let files = self.files(
                        Kind::ConfigMap,
                        &cm.name,
                        cm.items.as_deref(),
                        mode,
                        cm.optional,
                    )?;
                    volume.files.extend(files);
                }
                if let Some(secret) = &source.secret {
                    let files = self.files(
                        Kind::Secret(SecretUse::Volume),
                        &secret.name,
                        secret.items.as_deref(),
                        mode,
                        secret.optional,
                    )?;
                    volume.files.extend(files);
                }
                if let Some(d) = &source.downward_api {
                    volume
                        .files
                        .extend(self.downward(d.items.as_deref().unwrap_or_default(), mode)?);
                }
                if source.service_account_token.is_some() {
                    // The token volume Kubernetes adds to every pod is expected to go without:
                    // a Normal Event says so; one the pod asks for itself is a Warning.
                    self.warnings.push(Warning {
                        reason: "ServiceAccountTokenNotProjected",
                        message: format!(
                            "volume {:?}: service account tokens are not projected onto devices (they would carry cluster credentials off the cluster)",
                            v.name
                        ),
                        warning: !v.name.starts_with("kube-api-access-"),
                    });
                }
            }
        }
        Ok(volume)
    }

    /// A ConfigMap's or Secret's keys as volume files; none when it is optional and missing.
    fn files(
        &mut self,
        kind: Kind,
        name: &str,
        items: Option<&[KeyToPath]>,
        mode: u32,
        optional: Option<bool>,
    ) -> Result<Vec<VolumeFile>, Blocked> {
        let optional = optional == Some(true);
        match self.source(kind, name, optional)? {
            Some(data) => self.project(kind, name, &data, items, mode, optional),
            None => Ok(Vec::new()),
        }
    }

    fn project(
        &self,
        kind: Kind,
        name: &str,
        data: &BTreeMap<String, Vec<u8>>,
        items: Option<&[KeyToPath]>,
        mode: u32,
        optional: bool,
    ) -> Result<Vec<VolumeFile>, Blocked> {
        let Some(items) = items else {
            return Ok(data
                .iter()
                .map(|(key, content)| VolumeFile {
                    path: key.clone(),
                    content: content.clone(),
                    mode,
                })
                .collect());
        };
        let mut files = Vec::new();
        for item in items {
            match data.get(&item.key) {
                Some(content) => files.push(VolumeFile {
                    path: item.path.clone(),
                    content: content.clone(),
                    mode: item.mode.map_or(mode, |m| m as u32),
                }),
                None if optional => {}
                None => {
                    return Err(Blocked {
                        message: format!(
                            "couldn't find key {} in {} {name}",
                            item.key,
                            kind.word()
                        ),
                    });
                }
            }
        }
        Ok(files)
    }

    fn downward(
        &self,
        items: &[DownwardAPIVolumeFile],
        mode: u32,
    ) -> Result<Vec<VolumeFile>, Blocked> {
        let spec = self.pod.spec.as_ref();
        let mut files = Vec::new();
        for item in items {
            let content = if let Some(field) = &item.field_ref {
                self.field(field)?
            } else if let Some(resource) = &item.resource_field_ref {
                let container = resource
                    .container_name
                    .as_deref()
                    .and_then(|n| spec?.containers.iter().find(|c| c.name == n))
                    .or_else(|| spec.and_then(|s| s.containers.first()));
                match container {
                    Some(c) => resource_field(c, resource)?,
                    None => String::new(),
                }
            } else {
                String::new()
            };
            files.push(VolumeFile {
                path: item.path.clone(),
                content: content.into_bytes(),
                mode: item.mode.map_or(mode, |m| m as u32),
            });
        }
        Ok(files)
    }
}

/// A Secret's data as bytes per key, `stringData` over `data` as the apiserver merges them.
pub fn secret_data(secret: &Secret) -> BTreeMap<String, Vec<u8>> {
    let mut data: BTreeMap<String, Vec<u8>> = secret
        .data
        .iter()
        .flatten()
        .map(|(k, v)| (k.clone(), v.0.clone()))
        .collect();
    data.extend(
        secret
            .string_data
            .iter()
            .flatten()
            .map(|(k, v)| (k.clone(), v.clone().into_bytes())),
    );
    data
}

fn mode_or_default(mode: Option<i32>) -> u32 {
    mode.map_or(DEFAULT_FILE_MODE, |m| m as u32)
}

/// `key="value"` lines, as the downward API renders labels and annotations.
fn render_map(map: Option<&BTreeMap<String, String>>) -> String {
    map.into_iter()
        .flatten()
        .map(|(k, v)| format!("{k}={v:?}"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// A container's resource in units of the divisor, rounded up as the kubelet does. An unset
/// limit reads as the request (the kubelet would use the node's allocatable).
fn resource_field(c: &Container, selector: &ResourceFieldSelector) -> Result<String, Blocked> {
    let resources = c.resources.as_ref();
    let (which, name) = selector.resource.split_once('.').ok_or_else(|| Blocked {
        message: format!("unsupported resourceFieldRef {:?}", selector.resource),
    })?;
    let get = |which: &str| {
        resources
            .and_then(|r| {
                if which == "limits" {
                    r.limits.as_ref()
                } else {
                    r.requests.as_ref()
                }
            })
            .and_then(|m| m.get(name))
            .map(|q| q.0.clone())
    };
    let quantity = get(which).or_else(|| get("requests"));
    let divisor = selector.divisor.as_ref().map(|q| q.0.clone());
    let value = match name {
        "cpu" => {
            let millis = quantity.and_then(|q| cpu_millis(&q)).unwrap_or(0);
            let per = divisor
                .and_then(|d| cpu_millis(&d))
                .filter(|d| *d > 0)
                .unwrap_or(1000);
            millis.div_ceil(per)
        }
        "memory" | "ephemeral-storage" => {
            let bytes = quantity.and_then(|q| parse_memory(&q)).unwrap_or(0);
            let per = divisor
                .and_then(|d| parse_memory(&d))
                .filter(|d| *d > 0)
                .unwrap_or(1);
            bytes.div_ceil(per)
        }
        other => {
            return Err(Blocked {
                message: format!("unsupported resourceFieldRef resource {other:?}"),
            });
        }
    };
    Ok(value.to_string())
}

/// Expands `$(NAME)` from `env` as the kubelet does: `$$` is a literal `$`, and unknown
/// references are left as written.
pub fn expand(text: &str, env: &[EnvVar]) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(at) = rest.find('$') {
        out.push_str(&rest[..at]);
        let after = &rest[at + 1..];
        if let Some(tail) = after.strip_prefix('$') {
            out.push('$');
            rest = tail;
        } else if let Some(inner) = after.strip_prefix('(')
            && let Some(close) = inner.find(')')
        {
            let name = &inner[..close];
            match env.iter().rev().find(|e| e.name == name) {
                Some(e) => out.push_str(&e.value),
                None => {
                    out.push_str("$(");
                    out.push_str(name);
                    out.push(')');
                }
            }
            rest = &inner[close + 1..];
        } else {
            out.push('$');
            rest = after;
        }
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::ByteString;
    use k8s_openapi::api::core::v1::{
        ConfigMapKeySelector, ConfigMapVolumeSource, EmptyDirVolumeSource, EnvFromSource,
        EnvVar as KEnvVar, EnvVarSource, PodSpec, SecretKeySelector, SecretVolumeSource,
        Volume as KVolume,
    };
    use k8s_openapi::apimachinery::pkg::api::resource::Quantity;

    fn pod(env: Vec<KEnvVar>, volumes: Vec<KVolume>) -> Pod {
        let mut pod = Pod::default();
        pod.metadata.name = Some("job-3".into());
        pod.metadata.namespace = Some("ns".into());
        pod.metadata.annotations =
            Some(BTreeMap::from([(JOB_COMPLETION_INDEX.into(), "3".into())]));
        pod.spec = Some(PodSpec {
            containers: vec![Container {
                name: "main".into(),
                command: Some(vec!["echo".into(), "$(GREETING) $$(HOME)".into()]),
                env: Some(env),
                resources: Some(k8s_openapi::api::core::v1::ResourceRequirements {
                    limits: Some(BTreeMap::from([
                        ("cpu".into(), Quantity("1500m".into())),
                        ("memory".into(), Quantity("64Mi".into())),
                    ])),
                    ..Default::default()
                }),
                ..Default::default()
            }],
            volumes: Some(volumes),
            ..Default::default()
        });
        pod
    }

    fn var(name: &str, value: Option<&str>, from: Option<EnvVarSource>) -> KEnvVar {
        KEnvVar {
            name: name.into(),
            value: value.map(Into::into),
            value_from: from,
        }
    }

    fn lookups() -> Lookups {
        let cm = ConfigMap {
            data: Some(BTreeMap::from([("greeting".into(), "hello".into())])),
            ..Default::default()
        };
        let secret = Secret {
            data: Some(BTreeMap::from([(
                "token".into(),
                ByteString(b"s3cret".to_vec()),
            )])),
            ..Default::default()
        };
        let allow_creds = SecretRule {
            names: vec!["creds".into()],
            ..Default::default()
        };
        Lookups {
            config_maps: HashMap::from([("settings".into(), Some(cm)), ("gone".into(), None)]),
            secrets: HashMap::from([("creds".into(), Some(secret))]),
            pool: "lab".into(),
            secret_policy: SecretPolicy {
                env: allow_creds.clone(),
                volumes: allow_creds.clone(),
                pull_credentials: allow_creds,
            },
        }
    }

    fn env_of(resolved: &Resolved) -> BTreeMap<String, String> {
        resolved.containers[0]
            .env
            .iter()
            .map(|e| (e.name.clone(), e.value.clone()))
            .collect()
    }

    #[test]
    fn env_comes_from_values_configmaps_secrets_fields_and_resources() {
        let env = vec![
            var(
                "GREETING",
                None,
                Some(EnvVarSource {
                    config_map_key_ref: Some(ConfigMapKeySelector {
                        name: "settings".into(),
                        key: "greeting".into(),
                        optional: None,
                    }),
                    ..Default::default()
                }),
            ),
            var(
                "TOKEN",
                None,
                Some(EnvVarSource {
                    secret_key_ref: Some(SecretKeySelector {
                        name: "creds".into(),
                        key: "token".into(),
                        optional: None,
                    }),
                    ..Default::default()
                }),
            ),
            var(
                "INDEX",
                None,
                Some(EnvVarSource {
                    field_ref: Some(ObjectFieldSelector {
                        field_path: format!("metadata.annotations['{JOB_COMPLETION_INDEX}']"),
                        api_version: None,
                    }),
                    ..Default::default()
                }),
            ),
            var(
                "CPUS",
                None,
                Some(EnvVarSource {
                    resource_field_ref: Some(ResourceFieldSelector {
                        resource: "limits.cpu".into(),
                        ..Default::default()
                    }),
                    ..Default::default()
                }),
            ),
            var("MESSAGE", Some("$(GREETING) from $(NODE)"), None),
        ];
        let placement = Placement {
            node_name: "darkcore-lab-linux-amd64".into(),
            ..Default::default()
        };
        let (resolved, warnings) = resolve(&pod(env, vec![]), &lookups(), &placement);
        let resolved = resolved.unwrap();
        assert!(warnings.is_empty());
        let env = env_of(&resolved);
        assert_eq!(env["GREETING"], "hello");
        assert_eq!(env["TOKEN"], "s3cret");
        assert_eq!(env["INDEX"], "3");
        assert_eq!(env["CPUS"], "2", "1500m rounds up to 2 cores");
        assert_eq!(env["MESSAGE"], "hello from $(NODE)");
        assert_eq!(resolved.containers[0].command, ["echo", "hello $(HOME)"]);
        let resources = resolved.containers[0].resources.unwrap();
        assert_eq!(
            (resources.request_millicores, resources.request_memory_bytes),
            (1500, 64 << 20)
        );
    }

    fn token_from_creds(optional: Option<bool>) -> Vec<KEnvVar> {
        vec![var(
            "TOKEN",
            None,
            Some(EnvVarSource {
                secret_key_ref: Some(SecretKeySelector {
                    name: "creds".into(),
                    key: "token".into(),
                    optional,
                }),
                ..Default::default()
            }),
        )]
    }

    #[test]
    fn a_pool_withholds_secrets_it_does_not_allow_for_that_use() {
        // A pool that allows nothing: the mandatory Secret blocks, naming the rule to change.
        let nothing = Lookups {
            secret_policy: SecretPolicy::default(),
            ..lookups()
        };
        let (result, warnings) = resolve(
            &pod(token_from_creds(None), vec![]),
            &nothing,
            &Placement::default(),
        );
        let message = result.unwrap_err().message;
        assert!(
            message.contains("withheld from devices by DevicePool \"lab\"")
                && message.contains("spec.secrets.env.names"),
            "{message}"
        );
        assert_eq!(warnings[0].reason, "SecretWithheld");
        // Optional: the pod starts without it.
        let (result, warnings) = resolve(
            &pod(token_from_creds(Some(true)), vec![]),
            &nothing,
            &Placement::default(),
        );
        assert!(!env_of(&result.unwrap()).contains_key("TOKEN"));
        assert!(warnings[0].message.contains("starts without it"));
        // Allowed as files is not allowed as env.
        let volumes_only = Lookups {
            secret_policy: SecretPolicy {
                volumes: lookups().secret_policy.volumes,
                ..Default::default()
            },
            ..lookups()
        };
        let (result, _) = resolve(
            &pod(token_from_creds(None), vec![]),
            &volumes_only,
            &Placement::default(),
        );
        assert!(result.unwrap_err().message.contains("spec.secrets.env"));
        // Allowed by a label the Secret carries.
        let mut labelled = lookups();
        let secret = labelled.secrets.get_mut("creds").unwrap().as_mut().unwrap();
        secret.metadata.labels = Some(BTreeMap::from([("share".into(), "devices".into())]));
        labelled.secret_policy = SecretPolicy {
            env: SecretRule {
                match_labels: BTreeMap::from([("share".into(), "devices".into())]),
                ..Default::default()
            },
            ..Default::default()
        };
        let (result, _) = resolve(
            &pod(token_from_creds(None), vec![]),
            &labelled,
            &Placement::default(),
        );
        assert_eq!(env_of(&result.unwrap())["TOKEN"], "s3cret");
    }

    #[test]
    fn a_withheld_pull_secret_is_a_warning_and_the_pull_goes_ahead_without_it() {
        let mut with_pull = pod(vec![], vec![]);
        with_pull.spec.as_mut().unwrap().image_pull_secrets =
            Some(vec![k8s_openapi::api::core::v1::LocalObjectReference {
                name: "creds".into(),
            }]);
        let nothing = Lookups {
            secret_policy: SecretPolicy::default(),
            ..lookups()
        };
        let (result, warnings) = resolve(&with_pull, &nothing, &Placement::default());
        assert!(result.unwrap().pull_credentials.is_empty());
        assert!(
            warnings[0].message.contains("spec.secrets.pullCredentials"),
            "{:?}",
            warnings[0]
        );
    }

    #[test]
    fn a_missing_mandatory_configmap_blocks_and_an_optional_one_warns() {
        let mandatory = vec![var(
            "X",
            None,
            Some(EnvVarSource {
                config_map_key_ref: Some(ConfigMapKeySelector {
                    name: "gone".into(),
                    key: "k".into(),
                    optional: None,
                }),
                ..Default::default()
            }),
        )];
        let (result, warnings) =
            resolve(&pod(mandatory, vec![]), &lookups(), &Placement::default());
        assert_eq!(result.unwrap_err().message, "configmap \"gone\" not found");
        assert_eq!(warnings[0].reason, "MandatoryConfigMapNotFound");

        let optional = EnvFromSource {
            config_map_ref: Some(k8s_openapi::api::core::v1::ConfigMapEnvSource {
                name: "gone".into(),
                optional: Some(true),
            }),
            ..Default::default()
        };
        let mut p = pod(vec![], vec![]);
        p.spec.as_mut().unwrap().containers[0].env_from = Some(vec![optional]);
        let (result, warnings) = resolve(&p, &lookups(), &Placement::default());
        assert!(result.is_ok());
        assert_eq!(warnings[0].reason, "OptionalConfigMapNotFound");
    }

    #[test]
    fn configmap_and_secret_volumes_become_files_with_their_modes() {
        let volumes = vec![
            KVolume {
                name: "config".into(),
                config_map: Some(ConfigMapVolumeSource {
                    name: "settings".into(),
                    ..Default::default()
                }),
                ..Default::default()
            },
            KVolume {
                name: "creds".into(),
                secret: Some(SecretVolumeSource {
                    secret_name: Some("creds".into()),
                    default_mode: Some(0o400),
                    items: Some(vec![KeyToPath {
                        key: "token".into(),
                        path: "api/token".into(),
                        mode: None,
                    }]),
                    ..Default::default()
                }),
                ..Default::default()
            },
        ];
        let (resolved, _) = resolve(&pod(vec![], volumes), &lookups(), &Placement::default());
        let resolved = resolved.unwrap();
        assert_eq!(resolved.volumes[0].files[0].path, "greeting");
        assert_eq!(resolved.volumes[0].files[0].mode, 0o644);
        let token = &resolved.volumes[1].files[0];
        assert_eq!(
            (token.path.as_str(), token.content.as_slice(), token.mode),
            ("api/token", b"s3cret".as_slice(), 0o400)
        );
    }

    #[test]
    fn the_token_kubernetes_adds_is_a_normal_event_one_asked_for_a_warning() {
        use k8s_openapi::api::core::v1::{
            ProjectedVolumeSource, ServiceAccountTokenProjection, VolumeProjection,
        };
        let token = |name: &str| KVolume {
            name: name.into(),
            projected: Some(ProjectedVolumeSource {
                sources: Some(vec![VolumeProjection {
                    service_account_token: Some(ServiceAccountTokenProjection {
                        path: "token".into(),
                        ..Default::default()
                    }),
                    ..Default::default()
                }]),
                ..Default::default()
            }),
            ..Default::default()
        };
        let volumes = vec![token("kube-api-access-x7k2p"), token("vault-token")];
        let (resolved, warnings) =
            resolve(&pod(vec![], volumes), &lookups(), &Placement::default());
        assert!(resolved.is_ok());
        let kinds: Vec<_> = warnings.iter().map(|w| (w.reason, w.warning)).collect();
        assert_eq!(
            kinds,
            [
                ("ServiceAccountTokenNotProjected", false),
                ("ServiceAccountTokenNotProjected", true)
            ]
        );
    }

    #[test]
    fn an_empty_dirs_size_limit_goes_to_the_device_in_bytes() {
        let empty_dir = |name: &str, limit: Option<&str>| KVolume {
            name: name.into(),
            empty_dir: Some(EmptyDirVolumeSource {
                size_limit: limit.map(|l| Quantity(l.into())),
                ..Default::default()
            }),
            ..Default::default()
        };
        let volumes = vec![empty_dir("capped", Some("8Mi")), empty_dir("open", None)];
        let (resolved, _) = resolve(&pod(vec![], volumes), &lookups(), &Placement::default());
        let resolved = resolved.unwrap();
        let limits: Vec<_> = resolved
            .volumes
            .iter()
            .map(|v| (v.empty_dir, v.size_limit_bytes))
            .collect();
        assert_eq!(limits, [(true, 8 << 20), (true, 0)]);
    }

    #[test]
    fn expansion_follows_the_kubelet() {
        let env = [EnvVar {
            name: "A".into(),
            value: "1".into(),
        }];
        assert_eq!(expand("$(A)-$(B)-$$(A)-$", &env), "1-$(B)-$(A)-$");
    }
}
