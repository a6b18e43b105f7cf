//! The `oci` runtime: a busybox-static image pushed to the loopback registry as a multi-arch
//! index, pulled by real agents and run under Debian's runc: the image config merged with the
//! pod, the layer cache reused, the memory limit enforced, and the device's files out of reach.

use std::time::Duration;

use darkcore_crds::{DevicePoolSpec, Runtime};
use k8s_openapi::api::core::v1::Pod;

use crate::images::{IMAGE_USER_UID, blob_fetches, push_busybox};
use crate::pods::{Bench, main_status};

pub(crate) fn oci_pool() -> DevicePoolSpec {
    DevicePoolSpec {
        runtimes: vec![Runtime::Oci],
        ..Default::default()
    }
}

/// A `darkcore-oci` pod on the bench's pool; `container` is JSON without its name.
pub(crate) fn oci_pod(bench: &Bench, name: &str, container: serde_json::Value) -> Pod {
    bench.pod_in("darkcore-oci", name, container, "Never")
}

/// The main container's terminated reason and exit code (its message goes to the test log).
fn terminated(pod: &Pod) -> (String, i32) {
    let state = main_status(pod).state.unwrap().terminated.unwrap();
    eprintln!(
        "{} terminated: {state:?}",
        pod.metadata.name.as_deref().unwrap_or_default()
    );
    (state.reason.unwrap_or_default(), state.exit_code)
}

#[tokio::test]
async fn containers_merge_the_image_config_with_the_pod_and_reuse_cached_layers() {
    let bench = Bench::start("ocirun", 1, oci_pool()).await;
    let repository = format!("e2e/{}/busybox", bench.ns.name);
    let (image, layer) = push_busybox(&format!("{repository}:v1")).await;

    // The image's own Cmd, Env and WorkingDir.
    let defaults = serde_json::json!({ "image": image });
    bench.create(oci_pod(&bench, "defaults", defaults)).await;
    let done = bench
        .phase_is("defaults", "Succeeded", Duration::from_secs(120))
        .await;
    assert!(main_status(&done).image_id.starts_with("sha256:"));
    assert_eq!(
        bench
            .logs_show("defaults", "image default", Duration::from_secs(10))
            .await,
        "image default\n"
    );
    assert_eq!(blob_fetches(&repository, &layer), 1);

    // The pod's command, env, workingDir and user win; its exit code is reported. Pulled
    // again (Always): the manifest is fetched, the layer comes from the device's cache.
    let script = "echo $FROM_IMAGE $SHARED; pwd; id -u; id -g; cat /etc/hostname; exit 3";
    let overrides = serde_json::json!({
        "image": image,
        "imagePullPolicy": "Always",
        "command": ["sh", "-c", script],
        "env": [{ "name": "SHARED", "value": "pod" }],
        "workingDir": "/tmp",
        "securityContext": { "runAsUser": IMAGE_USER_UID, "runAsGroup": 2000 },
    });
    bench.create(oci_pod(&bench, "overrides", overrides)).await;
    let failed = bench
        .phase_is("overrides", "Failed", Duration::from_secs(120))
        .await;
    assert_eq!(terminated(&failed), ("Error".to_string(), 3));
    let logs = bench
        .logs_show("overrides", "overrides", Duration::from_secs(10))
        .await;
    assert_eq!(
        logs,
        format!("yes pod\n/tmp\n{IMAGE_USER_UID}\n2000\noverrides\n")
    );
    assert_eq!(
        blob_fetches(&repository, &layer),
        1,
        "the second pod pulled no layer again"
    );

    // A read-only root filesystem, when the pod asks for one; the container is still
    // writable where the pod mounts a volume.
    let readonly = oci_pod(
        &bench,
        "readonly",
        serde_json::json!({
            "image": image,
            "command": ["sh", "-c", "echo ok > /scratch/file && cat /scratch/file; touch /etc/x"],
            "securityContext": { "readOnlyRootFilesystem": true },
            "volumeMounts": [{ "name": "scratch", "mountPath": "/scratch" }],
        }),
    );
    bench
        .create(Bench::with_empty_dir(readonly, "scratch"))
        .await;
    let failed = bench
        .phase_is("readonly", "Failed", Duration::from_secs(120))
        .await;
    assert_eq!(terminated(&failed).1, 1);
    let logs = bench
        .logs_show("readonly", "Read-only file system", Duration::from_secs(10))
        .await;
    // stdout and stderr are two streams: their lines may interleave either way.
    assert!(logs.lines().any(|l| l == "ok"), "{logs:?}");
    bench.finish().await;
}

#[tokio::test]
async fn a_container_over_its_memory_limit_is_oom_killed() {
    let bench = Bench::start("ocioom", 1, oci_pool()).await;
    let (image, _) = push_busybox(&format!("e2e/{}/busybox:v1", bench.ns.name)).await;
    // dd allocates its 64 MiB block and fills it: past a 32 MiB limit.
    let hog = serde_json::json!({
        "image": image,
        "command": ["dd", "if=/dev/zero", "of=/dev/null", "bs=64M", "count=1"],
        "resources": { "limits": { "memory": "32Mi" } },
    });
    bench.create(oci_pod(&bench, "hog", hog)).await;
    let failed = bench
        .phase_is("hog", "Failed", Duration::from_secs(120))
        .await;
    assert_eq!(terminated(&failed), ("OOMKilled".to_string(), 137));
    bench.finish().await;
}

#[tokio::test]
async fn a_container_cannot_reach_the_devices_files() {
    let bench = Bench::start("ocibox", 1, oci_pool()).await;
    let (image, _) = push_busybox(&format!("e2e/{}/busybox:v1", bench.ns.name)).await;
    let agent = &bench.agents[0];
    let home = agent.state_dir.parent().unwrap();
    let secret = home.join("owner-secret.txt");
    std::fs::write(&secret, "the owner's").unwrap();
    let planted = home.join("planted.txt");
    // device.key by every way in we could think of: its path, through /proc's views of roots
    // and working directories, through a symlink and a hardlink made in a volume, and by name
    // anywhere in what the container sees.
    let script = "cat $SECRET && echo READ-SECRET; \
                  ln -s $STATE/device.key /data/link; ln $STATE/device.key /data/hard; \
                  for key in $STATE/device.key /proc/1/root$STATE/device.key \
                    /proc/self/root$STATE/device.key /proc/1/cwd$STATE/device.key \
                    /data/link /data/hard; do cat $key && echo READ-KEY $key; done; \
                  find / -xdev -name device.key 2>/dev/null | grep . && echo FOUND-KEY; \
                  ls $STATE && echo SAW-STATE; echo x > $PLANT && echo PLANTED; \
                  echo ok > /data/inside && echo VOLUME-OK";
    let probe = oci_pod(
        &bench,
        "probe",
        serde_json::json!({
            "image": image,
            "command": ["sh", "-c", script],
            "env": [
                { "name": "SECRET", "value": secret.display().to_string() },
                { "name": "STATE", "value": agent.state_dir.display().to_string() },
                { "name": "PLANT", "value": planted.display().to_string() },
            ],
            "volumeMounts": [{ "name": "data", "mountPath": "/data" }],
        }),
    );
    bench.create(Bench::with_empty_dir(probe, "data")).await;
    bench
        .phase_is("probe", "Succeeded", Duration::from_secs(120))
        .await;
    let logs = bench
        .logs_show("probe", "VOLUME-OK", Duration::from_secs(10))
        .await;
    for leak in [
        "READ-SECRET",
        "READ-KEY",
        "FOUND-KEY",
        "SAW-STATE",
        "PLANTED",
        "the owner's",
    ] {
        assert!(!logs.contains(leak), "{leak} in {logs:?}");
    }
    assert!(!planted.exists(), "the container wrote a device file");
    bench.finish().await;
}

#[tokio::test]
async fn a_deleted_container_gets_sigterm_then_sigkill_after_its_grace() {
    let bench = Bench::start("ocistop", 1, oci_pool()).await;
    let (image, _) = push_busybox(&format!("e2e/{}/busybox:v1", bench.ns.name)).await;
    // Traps SIGTERM and takes 2 s to finish, well inside its 5 s grace.
    let polite =
        "trap 'echo stopping; sleep 2; exit 0' TERM; echo ready; while true; do sleep 0.1; done";
    // The first process of a pid namespace ignores a signal it has no handler for, as
    // `sleep` as a container's PID 1 ignores SIGTERM: killed when the grace runs out.
    for (name, command) in [
        ("polite", serde_json::json!(["sh", "-c", polite])),
        (
            "stubborn",
            serde_json::json!(["sh", "-c", "echo ready; exec sleep 3600"]),
        ),
    ] {
        let container = serde_json::json!({ "image": image, "command": command });
        bench.create(oci_pod(&bench, name, container)).await;
        bench
            .logs_show(name, "ready", Duration::from_secs(120))
            .await;
    }
    let (polite_took, stubborn_took) = tokio::join!(
        bench.delete_and_time("polite"),
        bench.delete_and_time("stubborn")
    );
    assert!(
        polite_took >= Duration::from_secs(2) && polite_took < Duration::from_secs(15),
        "the polite container got its 2 s handler: {polite_took:?}"
    );
    assert!(
        stubborn_took >= Duration::from_secs(5) && stubborn_took < Duration::from_secs(15),
        "the stubborn container was killed after its 5 s grace: {stubborn_took:?}"
    );
    let listed = std::process::Command::new("runc")
        .arg("--root")
        .arg(bench.agents[0].state_dir.join("runc"))
        .args(["list", "-q"])
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&listed.stdout).trim(),
        "",
        "no container is left once its pod is gone"
    );
    bench.finish().await;
}

/// A busy container's CPU and memory, read from its cgroup, show on its node's stats.
#[tokio::test]
async fn a_busy_containers_cpu_and_memory_show_in_the_nodes_stats() {
    let bench = Bench::start("ocistats", 1, oci_pool()).await;
    let (image, _) = push_busybox(&format!("e2e/{}/busybox:v1", bench.ns.name)).await;
    let spin =
        serde_json::json!({ "image": image, "command": ["sh", "-c", "while :; do :; done"] });
    crate::kubelet_api::busy_pod_shows_in_stats(&bench, oci_pod(&bench, "busy", spin)).await;
    bench.finish().await;
}
