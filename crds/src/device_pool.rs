//! `DevicePool`: a set of volunteer devices that darkcore publishes as virtual Nodes.
//! The schema carries its own validation so the API server refuses nonsense by field name.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Seconds of silence after which a device counts as lost, when the pool does not say.
pub const DEFAULT_DEVICE_LOST_AFTER_SECONDS: u32 = 15;

/// What a pool enlists and how its virtual nodes look.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "darkcore.io",
    version = "v1alpha1",
    kind = "DevicePool",
    plural = "devicepools",
    singular = "devicepool",
    shortname = "dp",
    category = "darkcore",
    status = "DevicePoolStatus",
    derive = "PartialEq",
    doc = "A pool of volunteer devices, published as one virtual Node per os/arch.",
    validation = Rule::new("self.metadata.name.size() <= 63").message("metadata.name of a DevicePool is at most 63 characters: it becomes the darkcore.io/pool label value on the pool's nodes"),
    scale(
        spec_replicas_path = ".spec.replicas",
        status_replicas_path = ".status.replicas",
        label_selector_path = ".status.selector"
    ),
    printcolumn(name = "Replicas", type_ = "integer", json_path = ".spec.replicas", description = "devices wanted; empty means every eligible device"),
    printcolumn(name = "Enlisted", type_ = "integer", json_path = ".status.replicas", description = "devices enlisted now"),
    printcolumn(name = "Ready", type_ = "integer", json_path = ".status.readyDevices", description = "enlisted devices that can take work now"),
    printcolumn(name = "Online", type_ = "integer", json_path = ".status.onlineDevices", priority = 1, description = "devices of the pool whose agent is connected"),
    printcolumn(name = "Busy", type_ = "integer", json_path = ".status.busyDevices", priority = 1, description = "enlisted devices running tasks"),
    printcolumn(name = "Unavailable", type_ = "integer", json_path = ".status.unavailableDevices", priority = 1, description = "enlisted devices whose owner does not allow work now"),
    printcolumn(name = "Cores", type_ = "string", json_path = ".status.cores", description = "CPU cores the ready devices offer"),
    printcolumn(name = "Memory", type_ = "string", json_path = ".status.memory", description = "memory the ready devices offer"),
    printcolumn(name = "Nodes", type_ = "string", json_path = ".status.nodes", priority = 1, description = "virtual nodes of this pool"),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp")
)]
#[serde(rename_all = "camelCase")]
pub struct DevicePoolSpec {
    /// How many devices to enlist. Absent means every eligible device.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0))]
    pub replicas: Option<i32>,

    /// Which devices are eligible for this pool.
    #[serde(default)]
    pub selector: DeviceSelector,

    /// Runtimes that pods may use on this pool. `process` runs pod commands directly on the
    /// device, so it is only listed by default for no pool.
    #[serde(default = "default_runtimes")]
    #[schemars(length(min = 1, max = 3))]
    #[x_kube(validation = Rule::new("self.all(r, self.exists_one(x, x == r))").message("spec.runtimes lists a runtime twice; list each once"))]
    pub runtimes: Vec<Runtime>,

    /// Extra labels and taints for the pool's virtual nodes.
    #[serde(default)]
    pub node: NodeTemplate,

    /// Namespaces whose pods may run on this pool. Empty means every namespace.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(
        inner(regex(pattern = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"), length(max = 63)),
        length(max = 256)
    )]
    pub allowed_namespaces: Vec<String>,

    /// Seconds without a heartbeat after which a device counts as lost and its tasks run
    /// elsewhere.
    #[serde(default = "default_device_lost_after_seconds")]
    #[schemars(range(min = 5, max = 3600))]
    pub device_lost_after_seconds: u32,

    /// How many times a pod's task is run again after its device was lost or its owner took
    /// it back. One more loss fails the pod with that reason.
    #[serde(default = "default_max_redispatches")]
    #[schemars(range(min = 0, max = 100))]
    pub max_redispatches: u32,

    /// The most one device may offer. A device that claims more, or more than the hardware it
    /// reports, is not enlisted (a lying device would otherwise draw every pod of the pool, and
    /// their Secrets); `kubectl get` of its listing and a `DevicesImplausible` Event say why.
    #[serde(default)]
    pub device_limits: DeviceLimits,

    /// Seconds a device may go without word from the operator before it stops its tasks
    /// itself (fencing). The operator runs a silent device's tasks elsewhere only once this,
    /// and a 10 s margin, have passed since it last heard from the device, so that no task
    /// runs on two devices at once. Network blips shorter than this cost nothing.
    #[serde(default = "default_fence_seconds")]
    #[schemars(range(min = 5, max = 86400))]
    pub fence_seconds: u32,

    /// What a device's tasks do once it has been cut off for `fenceSeconds`: `Stop` (the
    /// default: a task never runs on two devices at once), or `KeepRunning` (they run on
    /// through long outages, as KubeEdge's autonomy does; a task may then run twice at once,
    /// and is at least once, not at most once).
    #[serde(default)]
    pub when_cut_off: WhenCutOff,

    /// What `oci` containers may reach: `internet` (public addresses only, through a user-mode
    /// network; no loopback, private, link-local, multicast or metadata ranges of the device's
    /// network), `none` (loopback only), or `host` (the device's own network, for trusted
    /// fleets; used only where the device's owner allows `host` too). An owner may narrow it.
    #[serde(default)]
    pub network: NetworkMode,

    /// Which Secrets this pool's devices may receive. None by default: a device owner with root
    /// can read anything sent to the device. A pod that needs a Secret the pool withholds does
    /// not start, and its container says which rule to change.
    #[serde(default)]
    pub secrets: SecretPolicy,

    /// Results checked by agreement between devices: the quorum every pod of the pool needs
    /// unless it sets `darkcore.io/quorum`, where replicas may run, and when a device is trusted
    /// to run alone.
    #[serde(default)]
    pub validation: ValidationPolicy,

    /// What validated work earns: prices per core-hour used and per GiB-hour of memory held,
    /// for `darkcore-operator usage statement`. Without prices, statements show usage only.
    #[serde(default, skip_serializing_if = "CreditPrices::is_empty")]
    pub credit: CreditPrices,
}

/// A pool's prices, as decimals with at most six places ("0.02"), in `currency`.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct CreditPrices {
    /// Per hour of one core's CPU time, on validated or unverified results.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^[0-9]{1,12}(\.[0-9]{1,6})?$"))]
    pub price_per_core_hour: Option<String>,
    /// Per hour of one GiB of memory held (the pods' requests).
    #[serde(
        default,
        rename = "pricePerGiBHour",
        skip_serializing_if = "Option::is_none"
    )]
    #[schemars(regex(pattern = r"^[0-9]{1,12}(\.[0-9]{1,6})?$"))]
    pub price_per_gib_hour: Option<String>,
    /// A currency code or unit name, printed with amounts (EUR, USD, points).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 16))]
    pub currency: Option<String>,
}

impl CreditPrices {
    pub fn is_empty(&self) -> bool {
        *self == CreditPrices::default()
    }
}

/// The highest quorum and replica count a pool, or a pod's annotations, may ask for.
pub const MAX_QUORUM: u32 = 10;
pub const MAX_MAX_REPLICAS: u32 = 20;

/// How a pool checks results by agreement between devices (BOINC's redundant computing).
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("self.maxReplicas >= self.quorum").message("spec.validation.maxReplicas is below spec.validation.quorum, so no quorum could ever be reached: raise maxReplicas"))]
pub struct ValidationPolicy {
    /// Agreeing results each pod needs unless it says otherwise (`darkcore.io/quorum`). 1, the
    /// default, takes each result as it comes.
    #[serde(default = "default_quorum")]
    #[schemars(range(min = 1, max = MAX_QUORUM))]
    pub quorum: u32,
    /// The most replicas of one pod, counting those started after a disagreement; without a
    /// quorum by then, the pod fails with reason `NoQuorum`.
    #[serde(default = "default_max_replicas")]
    #[schemars(range(min = 1, max = MAX_MAX_REPLICAS))]
    pub max_replicas: u32,
    /// Which replicas of one pod must share a platform, for floating-point determinism:
    /// `none` (the default), `arch`, or `os-arch`.
    #[serde(default)]
    pub homogeneous: Homogeneous,
    /// When a device is trusted to run a quorum pod alone, and when it is quarantined.
    #[serde(default)]
    pub adaptive: AdaptiveReplication,
    /// Seconds a replica reissued after a disagreement has to return its result before it
    /// runs on another device (BOINC gives reissued jobs shorter deadlines, so an answer
    /// already late does not wait on a slow device). Absent: no deadline.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 10, max = 86400))]
    pub reissue_deadline_seconds: Option<u32>,
}

impl Default for ValidationPolicy {
    fn default() -> Self {
        ValidationPolicy {
            quorum: default_quorum(),
            max_replicas: default_max_replicas(),
            homogeneous: Homogeneous::default(),
            adaptive: AdaptiveReplication::default(),
            reissue_deadline_seconds: None,
        }
    }
}

fn default_quorum() -> u32 {
    1
}

fn default_max_replicas() -> u32 {
    5
}

/// The platform class replicas of one pod share.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
#[serde(rename_all = "kebab-case")]
pub enum Homogeneous {
    /// Any platform.
    #[default]
    None,
    /// One CPU architecture.
    Arch,
    /// One operating system and CPU architecture.
    OsArch,
}

/// BOINC's adaptive replication: a device whose error rate is low after enough validated
/// results runs quorum pods alone, but for random spot checks; one whose error rate passes the
/// quarantine limit is no longer enlisted. Error rates start at 10%, shrink by 5% with each
/// validated result and grow by 5 points with each invalid one.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("self.trustedErrorRatePercent < self.quarantineErrorRatePercent").message("spec.validation.adaptive.trustedErrorRatePercent must be below quarantineErrorRatePercent: a device cannot be trusted and quarantined at once"))]
pub struct AdaptiveReplication {
    /// Whether trusted devices run quorum pods alone. Off: every quorum pod is replicated.
    #[serde(default = "default_true")]
    pub enabled: bool,
    /// Validated results a device needs before it may be trusted.
    #[serde(default = "default_min_validated")]
    #[schemars(range(max = 1000000))]
    pub min_validated: u32,
    /// The highest error rate, in percent, at which a device is trusted.
    #[serde(default = "default_trusted_error_rate_percent")]
    #[schemars(range(max = 100))]
    pub trusted_error_rate_percent: u32,
    /// The share, in percent, of a trusted device's quorum pods that are replicated anyway.
    #[serde(default = "default_spot_check_percent")]
    #[schemars(range(max = 100))]
    pub spot_check_percent: u32,
    /// The error rate, in percent, past which a device is quarantined.
    #[serde(default = "default_quarantine_error_rate_percent")]
    #[schemars(range(min = 1, max = 100))]
    pub quarantine_error_rate_percent: u32,
}

impl Default for AdaptiveReplication {
    fn default() -> Self {
        AdaptiveReplication {
            enabled: true,
            min_validated: default_min_validated(),
            trusted_error_rate_percent: default_trusted_error_rate_percent(),
            spot_check_percent: default_spot_check_percent(),
            quarantine_error_rate_percent: default_quarantine_error_rate_percent(),
        }
    }
}

fn default_true() -> bool {
    true
}

fn default_min_validated() -> u32 {
    10
}

fn default_trusted_error_rate_percent() -> u32 {
    5
}

fn default_spot_check_percent() -> u32 {
    10
}

fn default_quarantine_error_rate_percent() -> u32 {
    30
}

/// Which Secrets a pool sends to its devices, for each way a pod can use one.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct SecretPolicy {
    /// As environment variables (`env[].valueFrom.secretKeyRef`, `envFrom[].secretRef`).
    #[serde(default)]
    pub env: SecretRule,
    /// As files (`secret` volumes, `projected` volumes' `secret` sources).
    #[serde(default)]
    pub volumes: SecretRule,
    /// As image pull credentials (`imagePullSecrets`).
    #[serde(default)]
    pub pull_credentials: SecretRule,
}

/// The Secrets one use allows: those named, and those carrying all of the labels. Empty
/// allows none.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct SecretRule {
    /// Secrets allowed by name (in the pod's namespace).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 256))]
    pub names: Vec<String>,
    /// Secrets allowed because they carry every one of these labels with these values.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub match_labels: BTreeMap<String, String>,
}

impl SecretRule {
    /// Whether the rule allows the Secret named `name` with `labels`.
    pub fn allows(&self, name: &str, labels: &BTreeMap<String, String>) -> bool {
        self.names.iter().any(|n| n == name)
            || (!self.match_labels.is_empty()
                && self
                    .match_labels
                    .iter()
                    .all(|(key, value)| labels.get(key) == Some(value)))
    }
}

/// The most one device of a pool may offer.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct DeviceLimits {
    /// Cores. Default 256.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 1000000))]
    pub max_cores: Option<u32>,
    /// Memory, as a Kubernetes quantity. Default 4Ti.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("isQuantity(string(self))").message("spec.deviceLimits.maxMemory must be a Kubernetes quantity such as 64Gi"))]
    pub max_memory: Option<Quantity>,
}

/// Cores one device may offer when a pool sets no `deviceLimits.maxCores`.
pub const DEFAULT_MAX_DEVICE_CORES: u32 = 256;
/// Memory one device may offer when a pool sets no `deviceLimits.maxMemory`: 4 TiB.
pub const DEFAULT_MAX_DEVICE_MEMORY: u64 = 4 << 40;

/// What a cut-off device does with its tasks.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum WhenCutOff {
    /// Stop them at the fence time: at most one copy of a task runs at once.
    #[default]
    Stop,
    /// Keep them running: availability over fencing, at-least-once.
    KeepRunning,
}

/// Which devices may join a pool.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct DeviceSelector {
    /// Operating systems admitted. Empty means `linux`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub os: Vec<Os>,
    /// CPU architectures admitted, as Kubernetes names them. Empty means `amd64`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub arch: Vec<Arch>,
    /// Fewest CPU cores a device must offer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub min_cores: Option<u32>,
    /// Least memory a device must offer, as a Kubernetes quantity such as `2Gi`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("isQuantity(string(self))").message("spec.selector.minMemory must be a Kubernetes quantity such as 512Mi or 2Gi"))]
    pub min_memory: Option<Quantity>,
    /// Labels a device must carry (set by its owner in the agent config).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub match_labels: BTreeMap<String, String>,
}

/// Extra metadata for the pool's virtual nodes.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct NodeTemplate {
    /// Labels added to every node of the pool. Keys under `kubernetes.io/`, `k8s.io/` and
    /// `darkcore.io/` are darkcore's and Kubernetes' own and cannot be set here.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schemars(extend("maxProperties" = 64))]
    #[x_kube(validation = Rule::new("self.all(k, !(k.startsWith('kubernetes.io/') || k.contains('.kubernetes.io/') || k.startsWith('k8s.io/') || k.contains('.k8s.io/') || k.startsWith('darkcore.io/') || k.contains('.darkcore.io/') || k == 'type'))").message("spec.node.labels may not set keys under kubernetes.io/, k8s.io/ or darkcore.io/, nor 'type': those are set by darkcore and Kubernetes"))]
    pub labels: BTreeMap<String, String>,
    /// Taints added to every node of the pool, beside darkcore's own
    /// `virtual-kubelet.io/provider=darkcore:NoSchedule`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 32))]
    pub taints: Vec<PoolTaint>,
}

/// A taint for the pool's nodes.
#[derive(
    KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord,
)]
#[serde(rename_all = "camelCase")]
pub struct PoolTaint {
    /// The taint key, a qualified name such as `example.com/gpu`.
    #[schemars(
        regex(
            pattern = r"^([a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$"
        ),
        length(min = 1, max = 316)
    )]
    pub key: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(
        regex(pattern = r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$"),
        length(max = 63)
    )]
    pub value: Option<String>,
    pub effect: TaintEffect,
}

/// What a taint does to pods that do not tolerate it.
#[derive(
    JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord,
)]
pub enum TaintEffect {
    NoSchedule,
    PreferNoSchedule,
    NoExecute,
}

impl TaintEffect {
    pub fn as_str(self) -> &'static str {
        match self {
            TaintEffect::NoSchedule => "NoSchedule",
            TaintEffect::PreferNoSchedule => "PreferNoSchedule",
            TaintEffect::NoExecute => "NoExecute",
        }
    }
}

/// How a pod's containers run on a device.
#[derive(
    JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord,
)]
#[serde(rename_all = "lowercase")]
pub enum Runtime {
    /// Plain host processes: for trusted fleets only.
    Process,
    /// OCI containers through runc or crun.
    Oci,
    /// WebAssembly (WASI) through wasmtime.
    Wasm,
}

impl Runtime {
    pub const ALL: [Runtime; 3] = [Runtime::Process, Runtime::Oci, Runtime::Wasm];

    pub fn as_str(self) -> &'static str {
        match self {
            Runtime::Process => "process",
            Runtime::Oci => "oci",
            Runtime::Wasm => "wasm",
        }
    }
}

/// What a task's containers may reach, from narrowest to widest.
#[derive(
    JsonSchema,
    Serialize,
    Deserialize,
    Clone,
    Copy,
    Debug,
    Default,
    PartialEq,
    Eq,
    Hash,
    PartialOrd,
    Ord,
)]
#[serde(rename_all = "lowercase")]
pub enum NetworkMode {
    /// Loopback only.
    None,
    /// Public addresses, through a user-mode network; nothing of the device's own networks.
    #[default]
    Internet,
    /// The device's own network namespace: its loopback and LAN. Trusted fleets only.
    Host,
}

impl NetworkMode {
    pub fn as_str(self) -> &'static str {
        match self {
            NetworkMode::None => "none",
            NetworkMode::Internet => "internet",
            NetworkMode::Host => "host",
        }
    }
}

/// Operating systems, named as `kubernetes.io/os` names them.
#[derive(
    JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord,
)]
#[serde(rename_all = "lowercase")]
pub enum Os {
    Linux,
    Windows,
    Darwin,
    Freebsd,
}

impl Os {
    pub fn as_str(self) -> &'static str {
        match self {
            Os::Linux => "linux",
            Os::Windows => "windows",
            Os::Darwin => "darwin",
            Os::Freebsd => "freebsd",
        }
    }
}

/// CPU architectures, named as `kubernetes.io/arch` (Go's GOARCH) names them.
#[derive(
    JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord,
)]
#[serde(rename_all = "lowercase")]
pub enum Arch {
    Amd64,
    Arm64,
    Arm,
    Riscv64,
    #[serde(rename = "386")]
    I386,
    Ppc64le,
    S390x,
}

impl Arch {
    pub fn as_str(self) -> &'static str {
        match self {
            Arch::Amd64 => "amd64",
            Arch::Arm64 => "arm64",
            Arch::Arm => "arm",
            Arch::Riscv64 => "riscv64",
            Arch::I386 => "386",
            Arch::Ppc64le => "ppc64le",
            Arch::S390x => "s390x",
        }
    }
}

/// What the operator last observed of a pool.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct DevicePoolStatus {
    /// Devices enlisted in the pool now.
    #[serde(default)]
    pub replicas: i32,
    /// Enlisted devices whose owner policy lets them take work now.
    #[serde(default)]
    pub ready_devices: i32,
    /// Devices of this pool whose agent is connected (enlisted or not).
    #[serde(default)]
    pub online_devices: i32,
    /// Enlisted devices running at least one task.
    #[serde(default)]
    pub busy_devices: i32,
    /// Enlisted devices whose owner's policy does not allow work now.
    #[serde(default)]
    pub unavailable_devices: i32,
    /// CPU cores the ready devices offer, as a quantity.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cores: Option<Quantity>,
    /// Memory the ready devices offer, as a quantity.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory: Option<Quantity>,
    /// Label selector (in string form) for the scale subresource.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<String>,
    /// Names of the pool's virtual nodes.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub nodes: Vec<String>,
    /// The `metadata.generation` this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
}

/// The same defaults the API server applies to an empty spec.
impl Default for DevicePoolSpec {
    fn default() -> Self {
        DevicePoolSpec {
            replicas: None,
            selector: DeviceSelector::default(),
            runtimes: default_runtimes(),
            node: NodeTemplate::default(),
            allowed_namespaces: Vec::new(),
            device_lost_after_seconds: default_device_lost_after_seconds(),
            max_redispatches: default_max_redispatches(),
            device_limits: DeviceLimits::default(),
            fence_seconds: default_fence_seconds(),
            when_cut_off: WhenCutOff::default(),
            network: NetworkMode::default(),
            secrets: SecretPolicy::default(),
            validation: ValidationPolicy::default(),
            credit: CreditPrices::default(),
        }
    }
}

fn default_runtimes() -> Vec<Runtime> {
    vec![Runtime::Oci, Runtime::Wasm]
}

/// Redispatches of a pod's task after device losses, by default.
pub const DEFAULT_MAX_REDISPATCHES: u32 = 3;

fn default_max_redispatches() -> u32 {
    DEFAULT_MAX_REDISPATCHES
}

/// Seconds a cut-off device keeps its tasks, by default.
pub const DEFAULT_FENCE_SECONDS: u32 = 30;
/// What the operator waits past a pool's fence before running a silent device's tasks
/// elsewhere: the agent's stop grace when it fences (5 s), and slack.
pub const FENCE_MARGIN_SECONDS: u32 = 10;

fn default_fence_seconds() -> u32 {
    DEFAULT_FENCE_SECONDS
}

fn default_device_lost_after_seconds() -> u32 {
    DEFAULT_DEVICE_LOST_AFTER_SECONDS
}

impl DevicePoolSpec {
    /// The operating systems the selector admits, `linux` when it names none.
    pub fn admitted_os(&self) -> Vec<Os> {
        non_empty_or(&self.selector.os, Os::Linux)
    }

    /// The architectures the selector admits, `amd64` when it names none.
    pub fn admitted_arch(&self) -> Vec<Arch> {
        non_empty_or(&self.selector.arch, Arch::Amd64)
    }
}

fn non_empty_or<T: Copy + Ord>(listed: &[T], default: T) -> Vec<T> {
    let mut out: Vec<T> = if listed.is_empty() {
        vec![default]
    } else {
        listed.to_vec()
    };
    out.sort();
    out.dedup();
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_rust_default_is_what_an_empty_spec_means() {
        let empty: DevicePoolSpec = serde_json::from_str("{}").unwrap();
        assert_eq!(empty, DevicePoolSpec::default());
        assert_eq!(empty.runtimes, [Runtime::Oci, Runtime::Wasm]);
    }

    #[test]
    fn an_empty_selector_admits_linux_amd64() {
        let spec = DevicePoolSpec::default();
        assert_eq!(
            (spec.admitted_os(), spec.admitted_arch()),
            (vec![Os::Linux], vec![Arch::Amd64])
        );
    }

    #[test]
    fn arch_names_round_trip_as_kubernetes_spells_them() {
        for arch in [
            Arch::Amd64,
            Arch::Arm64,
            Arch::Arm,
            Arch::Riscv64,
            Arch::I386,
            Arch::Ppc64le,
            Arch::S390x,
        ] {
            assert_eq!(serde_json::to_value(arch).unwrap(), arch.as_str());
        }
    }

    #[test]
    fn a_secret_rule_allows_by_name_or_by_every_label_and_nothing_when_empty() {
        let labels = BTreeMap::from([("darkcore.io/devices".to_string(), "ok".to_string())]);
        assert!(!SecretRule::default().allows("any", &labels));
        let named = SecretRule {
            names: vec!["registry".into()],
            ..Default::default()
        };
        assert!(named.allows("registry", &BTreeMap::new()));
        assert!(!named.allows("other", &labels));
        let labelled = SecretRule {
            match_labels: labels.clone(),
            ..Default::default()
        };
        assert!(labelled.allows("anything", &labels));
        let mut wrong = labels.clone();
        wrong.insert("darkcore.io/devices".into(), "no".into());
        assert!(!labelled.allows("anything", &wrong));
    }
}
