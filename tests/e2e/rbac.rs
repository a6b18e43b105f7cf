//! The chart's RBAC, asked of the real API server with `kubectl auth can-i --as` the release's
//! ServiceAccount. That it is enough is proven by every other test: their operators run as it.

use crate::helm::{ensure_release, service_account_user};

/// `kubectl auth can-i ARGS --as <the ServiceAccount>`: "yes" or "no".
fn can_i(args: &[&str]) -> String {
    let user = service_account_user();
    let out = std::process::Command::new("kubectl")
        .args(["auth", "can-i"])
        .args(args)
        .args(["--as", &user])
        .output()
        .expect("kubectl");
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// The questions whose answer is not `expected`, as command lines.
fn answered_otherwise(questions: &[&[&str]], expected: &str) -> Vec<String> {
    questions
        .iter()
        .filter(|args| can_i(args) != expected)
        .map(|args| args.join(" "))
        .collect()
}

#[tokio::test]
async fn the_service_account_cannot_do_what_the_operator_does_not_need() {
    ensure_release();
    let refused: &[&[&str]] = &[
        &["delete", "secrets", "--all-namespaces"],
        &["list", "secrets", "--all-namespaces"],
        &["watch", "secrets", "-n", "default"],
        &["update", "secrets", "-n", "default"],
        &["create", "pods", "-n", "default"],
        &["update", "pods", "-n", "default"],
        &["patch", "pods", "-n", "default"],
        &["update", "pods", "--subresource=status", "-n", "default"],
        &["create", "pods", "--subresource=eviction", "-n", "default"],
        &["create", "pods", "--subresource=exec", "-n", "default"],
        &[
            "create",
            "serviceaccounts",
            "--subresource=token",
            "-n",
            "default",
        ],
        &["delete", "configmaps", "-n", "kube-system"],
        &["list", "configmaps", "-n", "default"],
        &["create", "devicepools.darkcore.io"],
        &["delete", "devicepools.darkcore.io"],
        &["update", "devicepools.darkcore.io"],
        &["create", "clusterroles"],
        &["escalate", "clusterroles"],
        &["create", "rolebindings", "-n", "darkcore-system"],
        &["delete", "runtimeclasses"],
        &["patch", "deployments", "-n", "darkcore-system"],
        &["create", "leases", "-n", "default"],
        &["update", "leases/someone-else", "-n", "darkcore-system"],
        &["patch", "configmaps/someone-elses", "-n", "darkcore-system"],
        &["get", "clusterroles/cluster-admin"],
        &["create", "customresourcedefinitions"],
        &["impersonate", "users"],
    ];
    let refused_but_granted = answered_otherwise(refused, "no");
    assert!(
        refused_but_granted.is_empty(),
        "the operator's ServiceAccount may: {refused_but_granted:?}"
    );

    // What it needs, so that the refusals above are not the API server refusing everything.
    let needed: &[&[&str]] = &[
        &["get", "secrets", "-n", "default"],
        &["patch", "pods", "--subresource=status", "-n", "default"],
        &["delete", "pods", "-n", "default"],
        &["create", "nodes"],
        &["patch", "nodes", "--subresource=status"],
        &["patch", "leases", "-n", "kube-node-lease"],
        &[
            "update",
            "leases/darkcore-operator",
            "-n",
            "darkcore-system",
        ],
        &["create", "tokenreviews"],
        &["create", "subjectaccessreviews"],
        &["patch", "devicepools.darkcore.io", "--subresource=status"],
        &["create", "poolusages.darkcore.io"],
        &["update", "poolusages.darkcore.io"],
        // Housekeeping: usage of deleted pools, and tokens that can admit no one.
        &["list", "poolusages.darkcore.io"],
        &["delete", "poolusages.darkcore.io"],
        &["list", "devicereputations.darkcore.io"],
        &["create", "devicereputations.darkcore.io"],
        &["update", "devicereputations.darkcore.io"],
        &[
            "patch",
            "configmaps/darkcore-statement-key",
            "-n",
            "darkcore-system",
        ],
        &["list", "secrets", "-n", "darkcore-system"],
        &["delete", "secrets", "-n", "darkcore-system"],
        &[
            "get",
            "configmaps/extension-apiserver-authentication",
            "-n",
            "kube-system",
        ],
    ];
    let needed_but_refused = answered_otherwise(needed, "yes");
    assert!(
        needed_but_refused.is_empty(),
        "the operator's ServiceAccount may not: {needed_but_refused:?}"
    );
}
