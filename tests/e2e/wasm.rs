//! The `wasm` runtime: modules written as WAT, pushed to the loopback registry as wasm OCI
//! artifacts, pulled by real agents and run in wasmtime; their output through `kubectl logs`,
//! traps and bad references shown on the pod.

use std::time::Duration;

use darkcore_crds::{DevicePoolSpec, Runtime};
use k8s_openapi::api::core::v1::{LocalObjectReference, Pod};
use oci_client::secrets::RegistryAuth;

use crate::harness::wait_for;
use crate::images::{
    PRIVATE_PASSWORD, PRIVATE_USER, WAT_SPIN, WAT_TRAP, private_registry, push_wasm,
    push_wasm_in_layer, push_wasm_to, registry, wat_escape_probe, wat_growing, wat_printing,
};
use crate::pods::{Bench, main_status, pin_arch, placed_on};

pub(crate) fn wasm_pool() -> DevicePoolSpec {
    DevicePoolSpec {
        runtimes: vec![Runtime::Wasm],
        ..Default::default()
    }
}

/// A `darkcore-wasm` pod on the bench's pool running `image`.
pub(crate) fn wasm_pod(bench: &Bench, name: &str, image: &str) -> Pod {
    let container = serde_json::json!({ "image": image });
    bench.pod_in("darkcore-wasm", name, container, "Never")
}

/// The main container's waiting reason and message, if it is waiting.
fn waiting(pod: &Pod) -> Option<(String, String)> {
    let status = pod.status.as_ref()?.container_statuses.as_ref()?.first()?;
    let waiting = status.state.as_ref()?.waiting.clone()?;
    Some((waiting.reason?, waiting.message.unwrap_or_default()))
}

/// Waits until the pod's main container waits with `reason`; returns its message and the pod.
pub(crate) async fn waits_with(bench: &Bench, pod: &str, reason: &'static str) -> (String, Pod) {
    let pod = wait_for(
        &bench.pods(),
        pod,
        move |p: Option<&Pod>| p.and_then(waiting).is_some_and(|(r, _)| r == reason),
        Duration::from_secs(60),
        reason,
    )
    .await
    .unwrap();
    (waiting(&pod).unwrap().1, pod)
}

#[tokio::test]
async fn wasm_modules_run_from_artifacts_and_image_layers_and_traps_fail_with_their_message() {
    let bench = Bench::start("wasmrun", 1, wasm_pool()).await;
    let (hello, _) = push_wasm("e2e/hello:v1", &wat_printing("hello from wasm\n", 0)).await;
    let (trap, _) = push_wasm("e2e/trap:v1", WAT_TRAP).await;
    let in_layer = push_wasm_in_layer(
        "e2e/in-layer:v1",
        &wat_printing("hello from a layer\n", 0),
        "/app/hello.wasm",
    )
    .await;
    bench.create(wasm_pod(&bench, "hello", &hello)).await;
    bench.create(wasm_pod(&bench, "trap", &trap)).await;
    bench.create(wasm_pod(&bench, "in-layer", &in_layer)).await;

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

    // A plain image whose one layer holds the .wasm file its Entrypoint names.
    bench
        .phase_is("in-layer", "Succeeded", Duration::from_secs(90))
        .await;
    bench
        .logs_show("in-layer", "hello from a layer", Duration::from_secs(10))
        .await;

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
        let (message, _) = waits_with(&bench, "missing", reason).await;
        assert!(
            message.contains("e2e/missing:v1") && message.to_lowercase().contains("unknown"),
            "the registry's message names the image and what is wrong: {message:?}"
        );
    }
    let described = bench.kubectl(&["describe", "pod", "missing"]);
    assert!(described.contains("ImagePullBackOff"), "{described}");
    let (_, pod) = waits_with(&bench, "invalid", "InvalidImageName").await;
    assert_eq!(pod.status.unwrap().phase.as_deref(), Some("Pending"));
    bench.finish().await;
}

#[tokio::test]
async fn a_private_image_pulls_with_its_image_pull_secret_and_fails_without() {
    // The pool sends its devices the pull secret "pull", and only as pull credentials.
    let spec = darkcore_crds::DevicePoolSpec {
        secrets: darkcore_crds::device_pool::SecretPolicy {
            pull_credentials: darkcore_crds::device_pool::SecretRule {
                names: vec!["pull".into()],
                ..Default::default()
            },
            ..Default::default()
        },
        ..wasm_pool()
    };
    let bench = Bench::start("wasmauth", 1, spec).await;
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
    let (message, _) = waits_with(&bench, "without", "ErrImagePull").await;
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

/// What examples/pi.wat prints for one piece: its xorshift64* and seed, in Rust.
pub(crate) fn pi_piece(index: u64, darts: u64) -> String {
    let mut seed = (index + 1)
        .wrapping_mul(0x9E37_79B9_7F4A_7C15)
        .wrapping_add(1);
    let mut uniform = move || {
        seed ^= seed >> 12;
        seed ^= seed << 25;
        seed ^= seed >> 27;
        (seed.wrapping_mul(2_685_821_657_736_338_717) >> 11) as f64 * 2f64.powi(-53)
    };
    let inside = (0..darts)
        .filter(|_| {
            let (x, y) = (uniform(), uniform());
            x * x + y * y <= 1.0
        })
        .count();
    format!("piece {index}: {inside} of {darts} darts inside\n")
}

#[tokio::test]
async fn an_indexed_job_on_darkcore_wasm_completes_across_three_agents() {
    let bench = Bench::start("wasmjob", 3, wasm_pool()).await;
    // The demo's module (make demo runs it with more darts).
    let wat = std::fs::read_to_string(crate::harness::workspace().join("examples/pi.wat")).unwrap();
    let (module, _) = push_wasm(&format!("e2e/{}/pi:v1", bench.ns.name), &wat).await;
    let container = serde_json::json!({
        "image": module,
        "args": ["$(JOB_COMPLETION_INDEX)", "20000"],
    });
    let pod = bench.pod_in("darkcore-wasm", "pieces", container, "Never");
    let jobs = bench.indexed_job_of("pieces", 9, 9, pod).await;
    let pods = bench
        .job_succeeds(&jobs, "pieces", 9, Duration::from_secs(180))
        .await;
    let devices = bench
        .indexed_outputs_are(&pods, 9, |index| pi_piece(index, 20000))
        .await;
    assert_eq!(
        devices.len(),
        3,
        "the pieces spread over all three agents: {devices:?}"
    );
    bench.finish().await;
}

#[tokio::test]
async fn a_module_over_its_memory_limit_is_oom_killed_and_cannot_leave_its_volumes() {
    let bench = Bench::start("wasmbox", 1, wasm_pool()).await;
    let (grow, _) = push_wasm(&format!("e2e/{}/grow:v1", bench.ns.name), &wat_growing(256)).await;
    let hog = serde_json::json!({
        "image": grow,
        "resources": { "limits": { "memory": "4Mi" } },
    });
    bench.create(wasm_pod(&bench, "hog", &grow)).await;
    bench
        .create(bench.pod_in("darkcore-wasm", "capped", hog, "Never"))
        .await;

    // The device's files: the agent's identity beside the task directories, and a file of
    // the owner's beside the agent's state.
    let agent = &bench.agents[0];
    let secret = agent.state_dir.parent().unwrap().join("owner-secret.txt");
    std::fs::write(&secret, "the owner's").unwrap();
    let secret = secret.display().to_string();
    // The volume is <state>/tasks/<task>/volumes/data: three levels up is the state dir.
    let probe_module = wat_escape_probe(&[
        "../../../device.key",
        "../../../../owner-secret.txt",
        &secret,
        "/etc/passwd",
    ]);
    let (probe, _) = push_wasm(&format!("e2e/{}/probe:v1", bench.ns.name), &probe_module).await;
    let pod = bench.pod_in(
        "darkcore-wasm",
        "probe",
        serde_json::json!({
            "image": probe,
            "volumeMounts": [{ "name": "data", "mountPath": "/data" }],
        }),
        "Never",
    );
    bench.create(Bench::with_empty_dir(pod, "data")).await;

    bench
        .phase_is("hog", "Succeeded", Duration::from_secs(90))
        .await;
    let capped = bench
        .phase_is("capped", "Failed", Duration::from_secs(90))
        .await;
    let state = main_status(&capped).state.unwrap().terminated.unwrap();
    assert_eq!(
        (state.reason.as_deref(), state.exit_code),
        (Some("OOMKilled"), 137),
        "{state:?}"
    );
    bench
        .phase_is("probe", "Succeeded", Duration::from_secs(90))
        .await;
    bench
        .logs_show(
            "probe",
            "escape refused, volume written",
            Duration::from_secs(10),
        )
        .await;
    bench.finish().await;
}

#[tokio::test]
async fn wasm_pods_run_on_devices_of_any_arch() {
    let (bench, mut arm, _) = Bench::start_two_arches("wasmarch", wasm_pool()).await;
    let (module, _) = push_wasm(
        &format!("e2e/{}/anywhere:v1", bench.ns.name),
        &wat_printing("hello from any arch\n", 0),
    )
    .await;
    // The RuntimeClass does not pin an arch, so a pod may ask for either node; each runs on
    // a device of its node's arch.
    let amd = bench.agents[0].device_id.clone();
    for (name, arch, device) in [
        ("on-arm", "arm64", &arm.device_id),
        ("on-amd", "amd64", &amd),
    ] {
        let mut pod = wasm_pod(&bench, name, &module);
        pin_arch(&mut pod, arch);
        bench.create(pod).await;
        let done = bench
            .phase_is(name, "Succeeded", Duration::from_secs(90))
            .await;
        assert_eq!(placed_on(&done).as_ref(), Some(device), "{name}");
        bench
            .logs_show(name, "hello from any arch", Duration::from_secs(10))
            .await;
    }
    arm.kill().await;
    bench.finish().await;
}

/// A module that spins for ever: its thread's CPU and its linear memory show on its node's
/// stats.
#[tokio::test]
async fn a_spinning_modules_cpu_and_memory_show_in_the_nodes_stats() {
    let bench = Bench::start("wasmstats", 1, wasm_pool()).await;
    let (module, _) = push_wasm(&format!("e2e/{}/spin:v1", bench.ns.name), WAT_SPIN).await;
    crate::kubelet_api::busy_pod_shows_in_stats(&bench, wasm_pod(&bench, "busy", &module)).await;
    bench.finish().await;
}
