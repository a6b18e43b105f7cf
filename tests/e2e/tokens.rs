//! Join tokens through the real `darkcore-operator token` commands and the real API server:
//! printed once, stored only as a hash, listed without secrets, revocable, pinned to one CA.

use darkcore_crds::{DevicePool, DevicePoolSpec};
use k8s_openapi::api::core::v1::Secret;
use kube::Api;
use kube::api::{DeleteParams, ListParams, PostParams};

use crate::harness::{self, TestNamespace, operator_cli};

fn stdout(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn stderr(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[tokio::test]
async fn join_tokens_are_printed_once_stored_hashed_listed_and_revoked() {
    let client = harness::client().await;
    harness::ensure_crds(&client).await;
    let ns = TestNamespace::create(&client, "tokens").await;
    let pool = harness::unique("tokens");
    let pools: Api<DevicePool> = Api::all(client.clone());
    pools
        .create(
            &PostParams::default(),
            &harness::pool(&pool, &pool, DevicePoolSpec::default()),
        )
        .await
        .unwrap();

    let create = operator_cli(&[
        "token", "create", "--pool", &pool, "--ttl", "1h", "--uses", "2", "-n", &ns.name,
    ]);
    assert!(
        create.status.success(),
        "token create failed: {}",
        stderr(&create)
    );
    let token = stdout(&create).trim().to_string();
    let parts: Vec<&str> = token.split('.').collect();
    assert_eq!(parts.len(), 4, "dct1.<id>.<secret>.<ca-pin>: {token}");
    let (id, secret, pin) = (parts[1], parts[2], parts[3]);
    assert!(
        stderr(&create).contains("darkcore-agent join"),
        "{}",
        stderr(&create)
    );

    // Only the hash is stored; the CA it pins is the operator's.
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &ns.name);
    let stored = secrets
        .list(&ListParams::default().labels("darkcore.io/join-token=true"))
        .await
        .unwrap();
    assert_eq!(stored.items.len(), 1);
    for value in stored.items[0].data.as_ref().unwrap().values() {
        assert!(
            !String::from_utf8_lossy(&value.0).contains(secret),
            "the token secret is stored in plain text"
        );
    }
    assert!(
        secrets.get_opt("darkcore-ca").await.unwrap().is_some(),
        "the CA is created with the first token"
    );

    let second = operator_cli(&["token", "create", "--pool", &pool, "-n", &ns.name]);
    assert!(second.status.success(), "{}", stderr(&second));
    assert!(
        stdout(&second).trim().ends_with(pin),
        "every token pins the same CA"
    );

    let list = operator_cli(&["token", "list", "-n", &ns.name]);
    let listing = stdout(&list);
    let line = listing
        .lines()
        .find(|l| l.starts_with(id))
        .unwrap_or_else(|| panic!("{id} not listed:\n{listing}"));
    assert!(
        line.contains(&pool) && line.contains("active") && line.contains("0/2"),
        "{line}"
    );
    assert!(!listing.contains(secret), "token list shows a secret");

    let revoke = operator_cli(&["token", "revoke", id, "-n", &ns.name]);
    assert!(revoke.status.success(), "{}", stderr(&revoke));
    let listing = stdout(&operator_cli(&["token", "list", "-n", &ns.name]));
    assert!(
        listing
            .lines()
            .any(|l| l.starts_with(id) && l.contains("revoked")),
        "{listing}"
    );

    let no_pool = operator_cli(&["token", "create", "--pool", "no-such-pool", "-n", &ns.name]);
    assert!(!no_pool.status.success());
    assert!(
        stderr(&no_pool).contains("no DevicePool named \"no-such-pool\""),
        "{}",
        stderr(&no_pool)
    );

    let unknown = operator_cli(&["token", "revoke", "0123456789ab", "-n", &ns.name]);
    assert!(!unknown.status.success());
    assert!(
        stderr(&unknown).contains("token list"),
        "{}",
        stderr(&unknown)
    );

    let _ = pools.delete(&pool, &DeleteParams::default()).await;
    ns.delete().await;
}
