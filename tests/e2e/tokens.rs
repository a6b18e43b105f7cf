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

#[tokio::test]
async fn housekeeping_deletes_tokens_and_usage_past_their_retention() {
    use crate::devices::process_pool;
    use crate::fleet::{self, token};
    use crate::harness::{PoolFixture, poll_until};
    use darkcore_crds::{PoolUsage, PoolUsageSpec};
    use std::time::Duration;

    let fx = PoolFixture::start_with(
        "housekeep",
        process_pool(),
        &[
            "--token-retention",
            "1s",
            "--usage-retention",
            "1s",
            "--housekeeping-seconds",
            "1",
        ],
    )
    .await;
    let id = |token: &str| token.split('.').nth(1).unwrap().to_string();
    let expiring = id(&token(&fx.pool, &["--ttl", "1s"]));
    let once = token(&fx.pool, &["--uses", "1"]);
    let joined = fleet::join(fx.operator.gateway_port, &once, 1.0);
    assert!(joined.ok, "{}", joined.output);
    let used_up = id(&once);
    let usable = id(&token(&fx.pool, &["--ttl", "1h"]));

    // The usage of a pool long gone, and an old day of the fixture's own pool.
    let usage: Api<PoolUsage> = Api::all(fx.client.clone());
    let gone_pool = harness::unique("gone");
    for pool in [gone_pool.as_str(), fx.pool.as_str()] {
        let spec = PoolUsageSpec {
            pool: pool.to_string(),
            day: "2020-01-01".into(),
            shard: 0,
            device_count: 0,
            total: Default::default(),
            devices: Default::default(),
        };
        let name = format!("{pool}.2020-01-01.00");
        usage
            .create(&PostParams::default(), &PoolUsage::new(&name, spec))
            .await
            .unwrap();
    }

    let secrets: Api<Secret> = Api::namespaced(fx.client.clone(), "darkcore-system");
    let secret = |id: &str| format!("darkcore-token-{id}");
    poll_until(
        "the expired and used-up tokens and the gone pool's usage are deleted",
        Duration::from_secs(30),
        || async {
            let left = [
                secrets.get_opt(&secret(&expiring)).await.unwrap().is_some(),
                secrets.get_opt(&secret(&used_up)).await.unwrap().is_some(),
                usage
                    .get_opt(&format!("{gone_pool}.2020-01-01.00"))
                    .await
                    .unwrap()
                    .is_some(),
            ];
            match left {
                [false, false, false] => Ok(()),
                left => Err(format!("{left:?}")),
            }
        },
    )
    .await;
    // What may still be needed stays: a usable token, and the usage of a pool that exists.
    assert!(secrets.get_opt(&secret(&usable)).await.unwrap().is_some());
    let kept = format!("{}.2020-01-01.00", fx.pool);
    assert!(usage.get_opt(&kept).await.unwrap().is_some());
    usage.delete(&kept, &DeleteParams::default()).await.unwrap();
    fx.finish().await;
}
