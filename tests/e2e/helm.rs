//! The Helm chart as the tests use it: the helm binary, the release every test's operator runs
//! under, and a kubeconfig that impersonates the release's ServiceAccount, so that each test
//! proves the chart's RBAC is enough.

use std::path::PathBuf;
use std::process::{Command, Output};
use std::sync::OnceLock;

use crate::harness::{OPERATOR_NAMESPACE, log_dir, workspace};

/// The release the tests install, and the names the chart derives from it.
pub const RELEASE: &str = "darkcore";
pub const SERVICE_ACCOUNT: &str = "darkcore-operator";
pub const CLUSTER_ROLE: &str = "darkcore-operator";
pub const GATEWAY_SERVICE: &str = "darkcore-gateway";

/// The ServiceAccount's user name, as `kubectl auth can-i --as` and impersonation take it.
pub fn service_account_user() -> String {
    format!("system:serviceaccount:{OPERATOR_NAMESPACE}:{SERVICE_ACCOUNT}")
}

pub fn chart_dir() -> PathBuf {
    workspace().join("charts/darkcore")
}

/// A pinned version from tests/cluster/versions.env (`K8S_VERSION`, `HELM_VERSION`).
pub fn pinned(key: &str) -> String {
    let versions = std::fs::read_to_string(workspace().join("tests/cluster/versions.env"))
        .expect("tests/cluster/versions.env");
    versions
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{key}=")))
        .unwrap_or_else(|| panic!("{key} in tests/cluster/versions.env"))
        .trim()
        .to_string()
}

/// `helm` on PATH, else the one tests/cluster/build made.
pub fn helm_bin() -> PathBuf {
    if let Some(path) = std::env::var_os("PATH")
        && let Some(found) = std::env::split_paths(&path)
            .map(|dir| dir.join("helm"))
            .find(|p| p.is_file())
    {
        return found;
    }
    let home = std::env::var_os("HOME").expect("HOME");
    PathBuf::from(home).join(format!(
        ".cache/darkcore/helm-{}/helm",
        pinned("HELM_VERSION")
    ))
}

/// Runs helm against the test cluster (KUBECONFIG) and returns what it printed.
pub fn helm(args: &[&str]) -> Output {
    let bin = helm_bin();
    Command::new(&bin).args(args).output().unwrap_or_else(|e| {
        panic!(
            "running {} (tests/cluster/up builds it): {e}",
            bin.display()
        )
    })
}

/// Panics with helm's output unless it succeeded; returns its stdout.
pub fn helm_ok(args: &[&str]) -> String {
    let out = helm(args);
    assert!(
        out.status.success(),
        "helm {} failed: {}{}",
        args.join(" "),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Installs (or upgrades to) the working tree's chart as [`RELEASE`], once per test process.
/// No replica runs in the cluster (it has no kubelet): the tests run the operator binary
/// themselves, as the release's ServiceAccount.
pub fn ensure_release() {
    static INSTALLED: OnceLock<()> = OnceLock::new();
    INSTALLED.get_or_init(|| {
        let chart = chart_dir();
        helm_ok(&[
            "upgrade",
            "--install",
            RELEASE,
            chart.to_str().unwrap(),
            "--namespace",
            OPERATOR_NAMESPACE,
            "--create-namespace",
            "--set",
            "operator.replicas=0",
        ]);
    });
}

/// A copy of the admin kubeconfig whose user impersonates the release's ServiceAccount.
pub fn impersonating_kubeconfig() -> PathBuf {
    static PATH: OnceLock<PathBuf> = OnceLock::new();
    PATH.get_or_init(|| {
        let admin = std::env::var_os("KUBECONFIG").expect("KUBECONFIG");
        let text = std::fs::read_to_string(&admin).expect("the admin kubeconfig");
        let mut config: serde_norway::Value = serde_norway::from_str(&text).unwrap();
        for user in config["users"].as_sequence_mut().expect("kubeconfig users") {
            user["user"]["as"] = service_account_user().into();
        }
        let path = log_dir().join(format!("operator-sa-{}.kubeconfig", std::process::id()));
        std::fs::write(&path, serde_norway::to_string(&config).unwrap()).unwrap();
        path
    })
    .clone()
}
