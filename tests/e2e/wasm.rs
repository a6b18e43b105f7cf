//! The `wasm` runtime: modules written as WAT, pushed to the loopback registry as wasm OCI
//! artifacts, pulled by real agents and run in wasmtime; their output through `kubectl logs`,
//! traps and bad references shown on the pod.

use std::time::Duration;

use darkcore_crds::{DevicePoolSpec, Runtime};
use k8s_openapi::api::core::v1::{LocalObjectReference, Pod};
use oci_client::secrets::RegistryAuth;

use crate::harness::wait_for;
use crate::images::{
    PRIVATE_PASSWORD, PRIVATE_USER, WAT_TRAP, private_registry, push_wasm, push_wasm_to, registry,
    wat_printing,
};
use crate::pods::{Bench, main_status};

fn wasm_pool() -> DevicePoolSpec {
    DevicePoolSpec {
        runtimes: vec![Runtime::Wasm],
        ..Default::default()
    }
}

/// A `darkcore-wasm` pod on the bench's pool running `image`.
fn wasm_pod(bench: &Bench, name: &str, image: &str) -> Pod {
    let container = serde_json::json!({ "image": image });
    bench.pod_in("darkcore-wasm", name, container, "Never")
}

/// The main container's waiting reason and message, if it is waiting.
fn waiting(pod: &Pod) -> Option<(String, String)> {
    let status = pod.status.as_ref()?.container_statuses.as_ref()?.first()?;
    let waiting = status.state.as_ref()?.waiting.clone()?;
    Some((waiting.reason?, waiting.message.unwrap_or_default()))
}

#[tokio::test]
async fn wasm_modules_run_from_the_registry_and_traps_fail_with_their_message() {
    let bench = Bench::start("wasmrun", 1, wasm_pool()).await;
    let (hello, _) = push_wasm("e2e/hello:v1", &wat_printing("hello from wasm\n", 0)).await;
    let (trap, _) = push_wasm("e2e/trap:v1", WAT_TRAP).await;
    bench.create(wasm_pod(&bench, "hello", &hello)).await;
    bench.create(wasm_pod(&bench, "trap", &trap)).await;

    let done = bench
        .phase_is("hello", "Succeeded", Duration::from_secs(90))
        .await;
    let status = main_status(&done);
    assert!(
        status.image_id.starts_with("sha256:"),
        "imageID carries the resolved digest: {:?}",
        status.image_id
    );
    let logs = bench
        .logs_show("hello", "hello from wasm", Duration::from_secs(10))
        .await;
    assert_eq!(logs, "hello from wasm\n");

    let trapped = bench
        .phase_is("trap", "Failed", Duration::from_secs(90))
        .await;
    let terminated = main_status(&trapped).state.unwrap().terminated.unwrap();
    let message = terminated.message.unwrap_or_default();
    assert!(
        message.contains("wasm trap") && message.contains("unreachable"),
        "the trap's message is on the pod: {message:?}"
    );
    bench.finish().await;
}

#[tokio::test]
async fn a_bad_image_reference_shows_err_image_pull_then_back_off_with_the_registry_message() {
    let bench = Bench::start("wasmpull", 1, wasm_pool()).await;
    let missing = format!("{}/e2e/missing:v1", registry());
    bench.create(wasm_pod(&bench, "missing", &missing)).await;
    bench
        .create(wasm_pod(&bench, "invalid", "UPPER/case:v1"))
        .await;
    for reason in ["ErrImagePull", "ImagePullBackOff"] {
        let pod = wait_for(
            &bench.pods(),
            "missing",
            move |p: Option<&Pod>| p.and_then(waiting).is_some_and(|(r, _)| r == reason),
            Duration::from_secs(60),
            reason,
        )
        .await
        .unwrap();
        let (_, message) = waiting(&pod).unwrap();
        assert!(
            message.contains("e2e/missing:v1") && message.to_lowercase().contains("unknown"),
            "the registry's message names the image and what is wrong: {message:?}"
        );
    }
    let described = bench.kubectl(&["describe", "pod", "missing"]);
    assert!(described.contains("ImagePullBackOff"), "{described}");
    let pod = wait_for(
        &bench.pods(),
        "invalid",
        |p: Option<&Pod>| {
            p.and_then(waiting)
                .is_some_and(|(r, _)| r == "InvalidImageName")
        },
        Duration::from_secs(60),
        "InvalidImageName",
    )
    .await
    .unwrap();
    assert_eq!(pod.status.unwrap().phase.as_deref(), Some("Pending"));
    bench.finish().await;
}

#[tokio::test]
async fn a_private_image_pulls_with_its_image_pull_secret_and_fails_without() {
    let bench = Bench::start("wasmauth", 1, wasm_pool()).await;
    let auth = RegistryAuth::Basic(PRIVATE_USER.into(), PRIVATE_PASSWORD.into());
    let (image, _) = push_wasm_to(
        &private_registry(),
        auth,
        "e2e/private:v1",
        &wat_printing("private hello\n", 0),
    )
    .await;
    bench.kubectl(&[
        "create",
        "secret",
        "docker-registry",
        "pull",
        &format!("--docker-server={}", private_registry()),
        &format!("--docker-username={PRIVATE_USER}"),
        &format!("--docker-password={PRIVATE_PASSWORD}"),
    ]);
    let mut with_secret = wasm_pod(&bench, "with-secret", &image);
    with_secret.spec.as_mut().unwrap().image_pull_secrets = Some(vec![LocalObjectReference {
        name: "pull".into(),
    }]);
    bench.create(with_secret).await;
    bench
        .phase_is("with-secret", "Succeeded", Duration::from_secs(90))
        .await;
    bench
        .logs_show("with-secret", "private hello", Duration::from_secs(10))
        .await;

    // The image is now on the device (one agent), pulled with the secret: a pod without the
    // secret must not be lent it.
    bench.create(wasm_pod(&bench, "without", &image)).await;
    let pod = wait_for(
        &bench.pods(),
        "without",
        |p: Option<&Pod>| {
            p.and_then(waiting)
                .is_some_and(|(r, _)| r == "ErrImagePull")
        },
        Duration::from_secs(60),
        "a failed pull",
    )
    .await
    .unwrap();
    let (_, message) = waiting(&pod).unwrap();
    assert!(
        message.to_lowercase().contains("not authorized"),
        "the registry's refusal is on the pod: {message:?}"
    );
    for log in [&bench.fx.operator.log, &bench.agents[0].log] {
        let text = std::fs::read_to_string(log).unwrap();
        assert!(
            !text.contains(PRIVATE_PASSWORD),
            "{} shows the pull secret's password",
            log.display()
        );
    }
    bench.finish().await;
}
