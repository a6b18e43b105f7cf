//! Hostile workloads against the owner's device: images whose layers, and pods whose volumes,
//! try to reach the device's files through symlinks and hardlinks. Each test keeps a canary
//! directory beside (not inside) the agent's state dir and checks that it is exactly as it was.

use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;
use std::time::Duration;

use darkcore_crds::{DevicePoolSpec, Runtime};
use k8s_openapi::api::core::v1::Pod;

use crate::fleet::Agent;
use crate::harness::{node_ready_is, poll_until, wait_for};
use crate::images::{
    WAT_SPIN, push_busybox_with, push_wasm, registry, wat_escape_probe, wat_growing, wat_symlinking,
};
use crate::pods::{Bench, main_status};

fn hostile_pool() -> DevicePoolSpec {
    DevicePoolSpec {
        runtimes: vec![Runtime::Oci, Runtime::Wasm],
        ..Default::default()
    }
}

/// The owner's files the workloads aim at: `<home>/canary/precious` and
/// `<home>/canary/sub/keep`, where home holds the agent's state dir.
struct Canary {
    dir: PathBuf,
}

impl Canary {
    fn plant(bench: &Bench) -> Canary {
        let home = bench.agents[0].state_dir.parent().unwrap();
        let dir = home.join("canary");
        std::fs::create_dir_all(dir.join("sub")).unwrap();
        std::fs::write(dir.join("precious"), "owner's").unwrap();
        std::fs::write(dir.join("sub/keep"), "owner's too").unwrap();
        Canary { dir }
    }

    fn path(&self) -> String {
        self.dir.display().to_string()
    }

    /// The canary's path as seen from `/` without its leading slash.
    fn relative_to_root(&self) -> String {
        self.path().trim_start_matches('/').to_string()
    }

    fn assert_untouched(&self, after: &str) {
        let mut names: Vec<String> = std::fs::read_dir(&self.dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        assert_eq!(names, ["precious", "sub"], "after {after}: made or removed");
        let precious = self.dir.join("precious");
        assert_eq!(
            std::fs::read_to_string(&precious).unwrap(),
            "owner's",
            "after {after}"
        );
        assert_eq!(std::fs::metadata(&precious).unwrap().nlink(), 1, "{after}");
        assert_eq!(
            std::fs::read_to_string(self.dir.join("sub/keep")).unwrap(),
            "owner's too",
            "after {after}"
        );
    }
}

/// One entry of a hostile layer, written with its raw name and link target.
enum Entry<'a> {
    File(&'a str, &'a str),
    Dir(&'a str),
    Symlink(&'a str, &'a str),
    Hardlink(&'a str, &'a str),
}

/// A plain tar layer holding `entries` exactly as named (the tar crate's builder would refuse
/// or rewrite some of these names); names and link targets longer than a header holds go
/// first in a GNU long-name or long-link entry, as GNU tar writes them.
fn layer(entries: &[Entry<'_>]) -> Vec<u8> {
    let mut builder = tar::Builder::new(Vec::new());
    for entry in entries {
        let (name, kind, data, link) = match entry {
            Entry::File(name, text) => (name, tar::EntryType::Regular, text.as_bytes(), None),
            Entry::Dir(name) => (name, tar::EntryType::Directory, &b""[..], None),
            Entry::Symlink(name, to) => (name, tar::EntryType::Symlink, &b""[..], Some(to)),
            Entry::Hardlink(name, to) => (name, tar::EntryType::Link, &b""[..], Some(to)),
        };
        let mut header = plain_header(kind, data.len() as u64);
        let gnu = header.as_gnu_mut().unwrap();
        if name.len() < gnu.name.len() {
            gnu.name[..name.len()].copy_from_slice(name.as_bytes());
        } else {
            long_name(&mut builder, tar::EntryType::GNULongName, name);
        }
        if let Some(to) = link {
            if to.len() < gnu.linkname.len() {
                gnu.linkname[..to.len()].copy_from_slice(to.as_bytes());
            } else {
                long_name(&mut builder, tar::EntryType::GNULongLink, to);
            }
        }
        header.set_cksum();
        builder.append(&header, data).unwrap();
    }
    builder.into_inner().unwrap()
}

/// A GNU long-name or long-link entry: the name of the entry that follows it.
fn long_name(builder: &mut tar::Builder<Vec<u8>>, kind: tar::EntryType, name: &str) {
    let text = format!("{name}\0");
    let mut long = plain_header(kind, text.len() as u64);
    let marker = b"././@LongLink";
    long.as_gnu_mut().unwrap().name[..marker.len()].copy_from_slice(marker);
    long.set_cksum();
    builder.append(&long, text.as_bytes()).unwrap();
}

/// A header owned by root, mode 0755, dated 0.
fn plain_header(kind: tar::EntryType, size: u64) -> tar::Header {
    let mut header = tar::Header::new_gnu();
    header.set_entry_type(kind);
    header.set_mode(0o755);
    header.set_uid(0);
    header.set_gid(0);
    header.set_mtime(0);
    header.set_size(size);
    header
}

/// The tests' image: busybox, pushed for this bench's namespace.
pub(crate) async fn busybox(bench: &Bench) -> String {
    let repo = format!("e2e/{}/busybox:v1", bench.ns.name);
    push_busybox_with(&registry(), &repo, &[]).await.0
}

/// A bench of one agent whose owner offers half a core and 48Mi, and its busybox image.
async fn small_offer(prefix: &str) -> (Bench, String) {
    let mut bench = Bench::start(prefix, 1, hostile_pool()).await;
    offers(
        &mut bench.agents[0],
        &[("max_cores", "0.5"), ("max_memory", "\"48Mi\"")],
    )
    .await;
    let image = busybox(&bench).await;
    (bench, image)
}

/// Restarts the agent with its owner's policy changed: each (key, value) replaces that key
/// in `[policy]` (the agent reads its policy's offer at start).
pub(crate) async fn offers(agent: &mut Agent, policy: &[(&str, &str)]) {
    agent.stop().await;
    let config = std::fs::read_to_string(&agent.config).unwrap();
    let mut lines: Vec<String> = config
        .lines()
        .filter(|line| {
            !policy
                .iter()
                .any(|(key, _)| line.starts_with(&format!("{key} =")))
        })
        .map(str::to_string)
        .collect();
    let at = lines.iter().position(|l| l == "[policy]").unwrap() + 1;
    for (key, value) in policy {
        lines.insert(at, format!("{key} = {value}"));
    }
    std::fs::write(&agent.config, lines.join("\n") + "\n").unwrap();
    agent.run();
}

/// CPU time a process has used (user and system), from /proc/<pid>/stat.
fn process_cpu(pid: u32) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let ticks = darkcore_agent::sensors::parse_pid_stat(&stat).unwrap();
    darkcore_agent::sensors::ticks_to_duration(ticks.own)
}

/// Cores used over `window`, as the difference of two readings of `cpu`.
async fn cores_over(window: Duration, cpu: impl Fn() -> Duration) -> f64 {
    let before = cpu();
    tokio::time::sleep(window).await;
    (cpu() - before).as_secs_f64() / window.as_secs_f64()
}

/// The cgroup of a pod's `main` container (its first attempt) under `agent`, or of all of
/// the agent's containers (`pod` None).
fn cgroup_of(agent: &Agent, pod: Option<&Pod>) -> String {
    use darkcore_agent::tasks::oci::{cgroups::owner_cgroup_path, container_id};
    let parent = owner_cgroup_path(&agent.state_dir);
    match pod {
        Some(pod) => {
            let task = format!("{}.1", pod.metadata.uid.as_deref().unwrap());
            format!("{parent}/{}", container_id(&task, "main"))
        }
        None => parent,
    }
}

/// The CPU time a cgroup has used.
fn cgroup_cpu(cgroup: &str) -> Duration {
    darkcore_agent::tasks::oci::cgroups::cpu_used(cgroup).expect("the cgroup exists")
}

/// `..` enough times to climb from any task directory to the device's `/`.
fn climb_to_root() -> String {
    vec![".."; 40].join("/")
}

fn terminated(pod: &Pod) -> (String, String) {
    let state = main_status(pod).state.unwrap().terminated.unwrap();
    eprintln!(
        "{} terminated: {state:?}",
        pod.metadata.name.as_deref().unwrap_or_default()
    );
    (
        state.reason.unwrap_or_default(),
        state.message.unwrap_or_default(),
    )
}

/// The pod ends, one way or the other.
async fn ends(bench: &Bench, name: &str) -> Pod {
    crate::harness::wait_for(
        &bench.pods(),
        name,
        |p: Option<&Pod>| {
            matches!(
                p.and_then(|p| p.status.as_ref()?.phase.as_deref()),
                Some("Succeeded" | "Failed")
            )
        },
        Duration::from_secs(120),
        "Succeeded or Failed",
    )
    .await
    .unwrap()
}

#[tokio::test]
async fn image_layers_cannot_reach_the_device_through_symlinks_or_hardlinks() {
    let bench = Bench::start("hostlayer", 1, hostile_pool()).await;
    let canary = Canary::plant(&bench);
    let outside = canary.path();
    let relative_way = format!("{}{outside}", climb_to_root());
    let sub = format!("{outside}/sub");

    // Whiteouts and opaque markers through symlinks a lower layer made: at the last
    // component and in the middle, absolute and relative; and a write through one.
    let in_root = canary.relative_to_root();
    let links = layer(&[
        Entry::Dir(&in_root),
        Entry::Symlink("abs", &outside),
        Entry::Symlink("rel", &relative_way),
        Entry::Dir("mid"),
        Entry::Symlink("mid/link", &outside),
        Entry::Symlink("sub", &sub),
    ]);
    let whiteouts = layer(&[
        Entry::File("abs/.wh..wh..opq", ""),
        Entry::File("rel/.wh..wh..opq", ""),
        Entry::File("mid/link/.wh.precious", ""),
        Entry::File("sub/.wh.keep", ""),
        Entry::File("abs/planted", "by a layer"),
    ]);
    let (image, _) = push_busybox_with(
        &registry(),
        &format!("e2e/{}/whiteouts:v1", bench.ns.name),
        &[links, whiteouts],
    )
    .await;
    let container = serde_json::json!({ "image": image, "command": ["sh", "-c", "echo ran"] });
    bench
        .create(bench.pod_in("darkcore-oci", "whiteouts", container, "Never"))
        .await;
    let ended = ends(&bench, "whiteouts").await;
    canary.assert_untouched("whiteouts through layer symlinks");
    let (reason, message) = terminated(&ended);
    assert_eq!(reason, "Completed", "the container then ran: {message}");

    // A hardlink to a device file, directly and through a symlink; the container then
    // writes through whatever it got.
    let hardlinks = layer(&[
        Entry::Symlink("abs", &outside),
        Entry::Hardlink("through", "abs/precious"),
    ]);
    let direct = layer(&[Entry::Hardlink(
        "direct",
        &format!("{}/precious", canary.relative_to_root()),
    )]);
    for (name, extra) in [("through", hardlinks), ("direct", direct)] {
        let (image, _) = push_busybox_with(
            &registry(),
            &format!("e2e/{}/{name}:v1", bench.ns.name),
            &[extra],
        )
        .await;
        let script = format!("echo pwned > /{name}; echo wrote");
        let container = serde_json::json!({ "image": image, "command": ["sh", "-c", script] });
        bench
            .create(bench.pod_in("darkcore-oci", name, container, "Never"))
            .await;
        let ended = ends(&bench, name).await;
        eprintln!("{name}: {:?}", main_status(&ended).state);
        canary.assert_untouched(&format!("a hardlink {name}"));
    }
    bench.finish().await;
}

/// A subPath names a symlink that an init container made in an emptyDir: the kubelet's
/// CVE-2017-1002101. The container must fail with a reason that names the subPath.
fn sub_path_pod(
    bench: &Bench,
    name: &str,
    class: &str,
    init: serde_json::Value,
    main: serde_json::Value,
) -> Pod {
    let mut init = init;
    init["name"] = "link".into();
    init["volumeMounts"] = serde_json::json!([{ "name": "data", "mountPath": "/data" }]);
    let mut pod = bench.pod_in(class, name, main, "Never");
    let spec = pod.spec.as_mut().unwrap();
    spec.init_containers = Some(vec![serde_json::from_value(init).unwrap()]);
    Bench::with_empty_dir(pod, "data")
}

async fn refused_with_sub_path(bench: &Bench, name: &str) {
    let ended = ends(bench, name).await;
    let (reason, message) = terminated(&ended);
    assert_eq!(reason, "CreateContainerConfigError", "{name}: {message}");
    assert!(message.contains("subPath"), "{name}: {message}");
}

#[tokio::test]
async fn a_sub_path_stays_inside_its_volume() {
    let bench = Bench::start("hostsubpath", 1, hostile_pool()).await;
    let canary = Canary::plant(&bench);
    let image = busybox(&bench).await;
    let make_links = format!("ln -s {} /data/up && ln -s / /data/abs", climb_to_root());
    let precious = format!("/host/{}/precious", canary.relative_to_root());
    let attack = format!("cat {precious} && echo READ; echo pwned > {precious}; echo tried");
    let made = format!("up/{}/made", canary.relative_to_root());
    for (name, sub_path) in [
        ("relative", "up"),
        ("absolute", "abs"),
        ("made", made.as_str()),
    ] {
        let init = serde_json::json!({ "image": image, "command": ["sh", "-c", make_links] });
        let main = serde_json::json!({
            "image": image,
            "command": ["sh", "-c", attack],
            "volumeMounts": [{ "name": "data", "mountPath": "/host", "subPath": sub_path }],
        });
        bench
            .create(sub_path_pod(&bench, name, "darkcore-oci", init, main))
            .await;
    }
    // A link that stays inside the volume is followed, as on a kubelet; the subPath is
    // staged for runc as a bind mount, gone once the container is.
    let init = serde_json::json!({
        "image": image,
        "command": ["sh", "-c", "mkdir /data/v2 && echo in-v2 > /data/v2/file && ln -s v2 /data/current"],
    });
    let main = serde_json::json!({
        "image": image,
        "command": ["cat", "/mnt/file"],
        "volumeMounts": [{ "name": "data", "mountPath": "/mnt", "subPath": "current" }],
    });
    bench
        .create(sub_path_pod(&bench, "inside", "darkcore-oci", init, main))
        .await;
    for name in ["relative", "absolute", "made"] {
        refused_with_sub_path(&bench, name).await;
        canary.assert_untouched(&format!("subPath pod {name}"));
    }
    bench
        .phase_is("inside", "Succeeded", Duration::from_secs(120))
        .await;
    assert_eq!(bench.kubectl(&["logs", "inside", "-c", "main"]), "in-v2\n");
    let state_dir = bench.agents[0].state_dir.display().to_string();
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    assert!(
        !mounts.contains(&state_dir),
        "a staged subPath outlived its container: {mounts}"
    );

    // The same through WASI: a module makes the link (relative, as WASI allows), and the
    // next module mounts it as a subPath and tries to open the owner's file.
    let (linker, _) = push_wasm(
        &format!("e2e/{}/linker:v1", bench.ns.name),
        &wat_symlinking(&climb_to_root(), "up"),
    )
    .await;
    let from_root = format!("{}/precious", canary.relative_to_root());
    let (probe, _) = push_wasm(
        &format!("e2e/{}/probe:v1", bench.ns.name),
        &wat_escape_probe(&[&from_root]),
    )
    .await;
    let main = serde_json::json!({
        "image": probe,
        "volumeMounts": [{ "name": "data", "mountPath": "/host", "subPath": "up" }],
    });
    let init = serde_json::json!({ "image": linker });
    bench
        .create(sub_path_pod(&bench, "wasm", "darkcore-wasm", init, main))
        .await;
    refused_with_sub_path(&bench, "wasm").await;
    canary.assert_untouched("the wasm subPath pod");
    bench.finish().await;
}

#[tokio::test]
async fn a_tar_bomb_stops_at_the_owners_disk_offer() {
    let mut bench = Bench::start("hostbomb", 1, hostile_pool()).await;
    offers(&mut bench.agents[0], &[("max_disk", "\"48Mi\"")]).await;

    // 64 MiB of zeros, about 64 KiB once gzipped.
    let zeros = vec![0u8; 64 << 20];
    let mut builder = tar::Builder::new(Vec::new());
    let mut header = plain_header(tar::EntryType::Regular, zeros.len() as u64);
    builder
        .append_data(&mut header, "zeros", zeros.as_slice())
        .unwrap();
    let bomb = builder.into_inner().unwrap();
    let (image, _) = push_busybox_with(
        &registry(),
        &format!("e2e/{}/bomb:v1", bench.ns.name),
        &[bomb],
    )
    .await;
    let container = serde_json::json!({ "image": image, "command": ["sh", "-c", "echo ran"] });
    bench
        .create(bench.pod_in("darkcore-oci", "bomb", container, "Never"))
        .await;
    let ended = ends(&bench, "bomb").await;
    let (reason, message) = terminated(&ended);
    assert_eq!(reason, "CreateContainerError", "{message}");
    assert!(message.contains("max_disk"), "{message}");
    bench.finish().await;
}

#[tokio::test]
async fn what_running_tasks_hold_on_disk_counts_against_the_owners_offer() {
    let mut bench = Bench::start("hostdisk", 1, hostile_pool()).await;
    offers(&mut bench.agents[0], &[("max_disk", "\"48Mi\"")]).await;
    let image = busybox(&bench).await;
    // One task fills 44Mi of its emptyDir, and holds it.
    let fill = "dd if=/dev/zero of=/data/fill bs=1M count=44 && echo full; sleep 600";
    let hog = serde_json::json!({
        "image": image, "command": ["sh", "-c", fill],
        "volumeMounts": [{ "name": "data", "mountPath": "/data" }],
    });
    bench
        .create(Bench::with_empty_dir(
            bench.pod_in("darkcore-oci", "hog", hog, "Never"),
            "data",
        ))
        .await;
    bench
        .logs_show("hog", "full", Duration::from_secs(120))
        .await;
    // The next container's root (about 2Mi of busybox) no longer fits beside it.
    let next = serde_json::json!({ "image": image, "command": ["sh", "-c", "echo ran"] });
    bench
        .create(bench.pod_in("darkcore-oci", "next", next, "Never"))
        .await;
    let ended = ends(&bench, "next").await;
    let (reason, message) = terminated(&ended);
    assert_eq!(reason, "CreateContainerError", "{message}");
    assert!(message.contains("max_disk"), "{message}");
    // With the hog gone, the same container runs.
    bench.delete_and_time("hog").await;
    let again = serde_json::json!({ "image": image, "command": ["sh", "-c", "echo ran"] });
    bench
        .create(bench.pod_in("darkcore-oci", "again", again, "Never"))
        .await;
    bench
        .phase_is("again", "Succeeded", Duration::from_secs(120))
        .await;
    bench.finish().await;
}

/// Waits until the pod is Failed with reason Evicted and an Event says so; returns the message.
async fn evicted(bench: &Bench, name: &str) -> String {
    let pod = bench
        .phase_is(name, "Failed", Duration::from_secs(120))
        .await;
    let status = pod.status.unwrap();
    assert_eq!(status.reason.as_deref(), Some("Evicted"), "{status:?}");
    let message = status.message.unwrap_or_default();
    crate::harness::poll_until("an Evicted event", Duration::from_secs(30), || async {
        let events = bench.events(name).await;
        match events
            .iter()
            .any(|(reason, note)| reason == "Evicted" && *note == message)
        {
            true => Ok(()),
            false => Err(format!("{events:?}")),
        }
    })
    .await;
    message
}

#[tokio::test]
async fn a_task_writing_past_its_size_limit_or_the_owners_disk_is_evicted() {
    let mut bench = Bench::start("hostfill", 1, hostile_pool()).await;
    offers(
        &mut bench.agents[0],
        &[("max_disk", "\"48Mi\""), ("check_seconds", "1")],
    )
    .await;
    let image = busybox(&bench).await;
    let writer = |mib: u32| {
        serde_json::json!({
            "image": image,
            "command": ["sh", "-c", format!("dd if=/dev/zero of=/data/fill bs=1M count={mib}; sleep 600")],
            "volumeMounts": [{ "name": "data", "mountPath": "/data" }],
        })
    };
    // An emptyDir with a sizeLimit of 4Mi, written to 8Mi.
    let mut capped = bench.pod_in("darkcore-oci", "capped", writer(8), "Never");
    capped.spec.as_mut().unwrap().volumes = Some(vec![
        serde_json::from_value(
            serde_json::json!({ "name": "data", "emptyDir": { "sizeLimit": "4Mi" } }),
        )
        .unwrap(),
    ]);
    bench.create(capped).await;
    let message = evicted(&bench, "capped").await;
    assert_eq!(
        message,
        "Usage of EmptyDir volume \"data\" exceeds the limit \"4.0Mi\"."
    );
    // No sizeLimit, but 60Mi is more than the owner's 48Mi max_disk.
    bench
        .create(Bench::with_empty_dir(
            bench.pod_in("darkcore-oci", "flood", writer(60), "Never"),
            "data",
        ))
        .await;
    let message = evicted(&bench, "flood").await;
    assert!(
        message.contains("low on disk") && message.contains("max_disk"),
        "{message}"
    );
    // What they wrote is gone from the device.
    let tasks = bench.agents[0].state_dir.join("tasks");
    crate::harness::poll_until(
        "the evicted tasks' files deleted",
        Duration::from_secs(30),
        || async {
            let held = std::fs::read_dir(&tasks).map(|d| d.count()).unwrap_or(0);
            if held == 0 {
                Ok(())
            } else {
                Err(format!("{held} task directories"))
            }
        },
    )
    .await;
    bench.finish().await;
}

#[tokio::test]
async fn a_blob_longer_than_its_descriptor_says_is_cut_off_there() {
    let bench = Bench::start("hostlong", 1, hostile_pool()).await;
    let image = crate::images::push_understated_busybox(
        &registry(),
        &format!("e2e/{}/busybox:v1", bench.ns.name),
        4096,
    )
    .await;
    let container = serde_json::json!({ "image": image, "command": ["true"] });
    bench
        .create(bench.pod_in("darkcore-oci", "long", container, "Never"))
        .await;
    let (message, _) = crate::wasm::waits_with(&bench, "long", "ErrImagePull").await;
    assert!(
        message.contains("larger than the") && message.contains("its descriptor declares"),
        "{message}"
    );
    bench.finish().await;
}

#[tokio::test]
async fn a_busy_module_is_held_to_the_offer_and_never_holds_up_the_agent() {
    let mut bench = Bench::start("hostspin", 1, hostile_pool()).await;
    // A stopping agent gives its tasks the owner's stop grace: 3 s here.
    offers(
        &mut bench.agents[0],
        &[("max_cores", "0.5"), ("stop_grace_seconds", "3")],
    )
    .await;
    let (spin, _) = push_wasm(&format!("e2e/{}/spin:v1", bench.ns.name), WAT_SPIN).await;
    let container = serde_json::json!({ "image": spin });
    bench
        .create(bench.pod_in("darkcore-wasm", "spin", container, "Never"))
        .await;
    bench
        .phase_is("spin", "Running", Duration::from_secs(120))
        .await;
    let pid = bench.agents[0].pid().unwrap();
    let cores = cores_over(Duration::from_secs(5), || process_cpu(pid)).await;
    eprintln!("a spinning module on a 0.5-core offer: the agent used {cores:.3} cores");
    assert!(cores < 0.6, "held to the offer: {cores:.3} cores");
    assert!(cores > 0.05, "the module ran: {cores:.3} cores");
    // A second one: the two split the offer, and together stay within it.
    let container = serde_json::json!({ "image": spin });
    bench
        .create(bench.pod_in("darkcore-wasm", "spin-2", container, "Never"))
        .await;
    bench
        .phase_is("spin-2", "Running", Duration::from_secs(120))
        .await;
    let cores = cores_over(Duration::from_secs(5), || process_cpu(pid)).await;
    eprintln!("two spinning modules on a 0.5-core offer: the agent used {cores:.3} cores");
    assert!(cores < 0.6, "held to the offer together: {cores:.3} cores");
    bench.delete_and_time("spin-2").await;
    // The agent kept talking to the operator all along.
    let node = bench.fx.ready_node().await;
    wait_for(
        &bench.fx.nodes(),
        node.metadata.name.as_deref().unwrap(),
        node_ready_is("True"),
        Duration::from_secs(5),
        "Ready",
    )
    .await;
    let took = bench.delete_and_time("spin").await;
    eprintln!("deleting the spinning module took {took:?}");
    assert!(
        took < Duration::from_secs(15),
        "stopped after its 5 s grace: {took:?}"
    );
    // The device gives the module its own 5 s grace from the release, then ends it.
    let released = std::time::Instant::now();
    poll_until(
        "the module ends after its grace",
        Duration::from_secs(15),
        || async {
            let cores = cores_over(Duration::from_secs(1), || process_cpu(pid)).await;
            if cores < 0.1 {
                Ok(())
            } else {
                Err(format!("{cores:.3} cores"))
            }
        },
    )
    .await;
    eprintln!(
        "the module stopped within {:?} of its pod's deletion",
        released.elapsed()
    );

    // With no memory limit, the owner's max_memory (1Gi in the tests' config) is the limit.
    let (grow, _) = push_wasm(
        &format!("e2e/{}/grow:v1", bench.ns.name),
        &wat_growing(17_000),
    )
    .await;
    bench
        .create(bench.pod_in(
            "darkcore-wasm",
            "grow",
            serde_json::json!({ "image": grow }),
            "Never",
        ))
        .await;
    let ended = ends(&bench, "grow").await;
    assert_eq!(terminated(&ended).0, "OOMKilled");

    // A spinning module does not keep the agent from stopping: it ends after the grace.
    let container = serde_json::json!({ "image": spin });
    bench
        .create(bench.pod_in("darkcore-wasm", "spin-again", container, "Never"))
        .await;
    bench
        .phase_is("spin-again", "Running", Duration::from_secs(120))
        .await;
    bench.agents[0].stop().await;
    bench.finish().await;
}

#[tokio::test]
async fn a_containers_limits_are_capped_by_the_owners_offer() {
    let (bench, image) = small_offer("hostcap").await;
    // The pod's limits are 2Gi and 4 CPUs (its requests fit); the owner offers 48Mi and
    // half a core.
    let limits = serde_json::json!({
        "requests": { "memory": "16Mi", "cpu": "100m" },
        "limits": { "memory": "2Gi", "cpu": "4" },
    });
    let hog = serde_json::json!({
        "image": image,
        "command": ["dd", "if=/dev/zero", "of=/dev/null", "bs=64M", "count=1"],
        "resources": limits,
    });
    bench
        .create(bench.pod_in("darkcore-oci", "hog", hog, "Never"))
        .await;
    let spin = serde_json::json!({
        "image": image,
        "command": ["sh", "-c", "echo spinning; while :; do :; done"],
        "resources": limits,
    });
    bench
        .create(bench.pod_in("darkcore-oci", "spin", spin, "Never"))
        .await;
    let ended = ends(&bench, "hog").await;
    assert_eq!(terminated(&ended), ("OOMKilled".to_string(), String::new()));
    bench
        .logs_show("spin", "spinning", Duration::from_secs(120))
        .await;
    let pod = bench.pods().get("spin").await.unwrap();
    let cgroup = cgroup_of(&bench.agents[0], Some(&pod));
    let cores = cores_over(Duration::from_secs(5), || cgroup_cpu(&cgroup)).await;
    eprintln!("a spinning container asking 4 CPUs on a 0.5-core offer used {cores:.3} cores");
    assert!(cores < 0.6, "held to the offer: {cores:.3} cores");
    assert!(cores > 0.05, "the container ran: {cores:.3} cores");
    bench.finish().await;
}

#[tokio::test]
async fn all_containers_together_are_held_to_the_owners_offer() {
    let (bench, image) = small_offer("hostsum").await;
    let small = serde_json::json!({ "requests": { "memory": "8Mi", "cpu": "10m" } });
    let run = |name: &str, script: &str| {
        let container = serde_json::json!({
            "image": image, "command": ["sh", "-c", script], "resources": small,
        });
        bench.pod_in("darkcore-oci", name, container, "Never")
    };

    // Two spinning containers, each allowed the whole half core: together they get half.
    for name in ["spin-1", "spin-2"] {
        bench
            .create(run(name, "echo spinning; while :; do :; done"))
            .await;
    }
    for name in ["spin-1", "spin-2"] {
        bench
            .logs_show(name, "spinning", Duration::from_secs(120))
            .await;
    }
    let all = cgroup_of(&bench.agents[0], None);
    let cores = cores_over(Duration::from_secs(5), || cgroup_cpu(&all)).await;
    eprintln!("two spinning containers on a 0.5-core offer used {cores:.3} cores together");
    assert!(cores < 0.6, "held to the offer together: {cores:.3} cores");
    assert!(cores > 0.05, "they ran: {cores:.3} cores");
    for name in ["spin-1", "spin-2"] {
        bench.delete_and_time(name).await;
    }

    // 16Mi held by one container, then 36Mi by another: each fits the 48Mi offer alone, not
    // together. dd blocks writing its buffer into a pipe nobody reads, so it holds it.
    let holder = bench
        .create(run("holder", "dd if=/dev/zero bs=16M count=1 | sleep 600"))
        .await;
    bench
        .phase_is("holder", "Running", Duration::from_secs(120))
        .await;
    let held = cgroup_of(&bench.agents[0], Some(&holder));
    poll_until("the holder holds 16Mi", Duration::from_secs(30), || async {
        use darkcore_agent::tasks::oci::cgroups::memory_used;
        match memory_used(&held) {
            Some(bytes) if bytes >= 16 << 20 => Ok(()),
            other => Err(format!("{other:?}")),
        }
    })
    .await;
    let grab = "dd if=/dev/zero of=/dev/null bs=36M count=1";
    bench.create(run("grab", grab)).await;
    let ended = ends(&bench, "grab").await;
    assert_eq!(terminated(&ended), ("OOMKilled".to_string(), String::new()));
    // The same container alone fits.
    bench.delete_and_time("holder").await;
    bench.create(run("grab-alone", grab)).await;
    bench
        .phase_is("grab-alone", "Succeeded", Duration::from_secs(120))
        .await;
    bench.finish().await;
}

#[tokio::test]
async fn root_in_a_container_is_an_unprivileged_uid_on_the_device() {
    let bench = Bench::start("hostuser", 1, hostile_pool()).await;
    let image = busybox(&bench).await;
    let script = "id -u; touch /data/made /made-in-root && echo wrote; \
                  cat /proc/self/uid_map; sleep 600";
    let container = serde_json::json!({
        "image": image, "command": ["sh", "-c", script],
        "volumeMounts": [{ "name": "data", "mountPath": "/data" }],
    });
    let pod = Bench::with_empty_dir(
        bench.pod_in("darkcore-oci", "rooted", container, "Never"),
        "data",
    );
    let pod = bench.create(pod).await;
    let logs = bench
        .logs_show("rooted", "wrote", Duration::from_secs(120))
        .await;
    assert_eq!(logs.lines().next(), Some("0"), "root inside: {logs}");
    // What the package reserves in /etc/subuid (tests/cluster/up reserves it too).
    let (start, end) = (2_147_483_648u32, 2_147_483_648u32 + 4_194_304);
    let task = bench.agents[0]
        .state_dir
        .join("tasks")
        .join(format!("{}.1", pod.metadata.uid.as_deref().unwrap()));
    for made in [
        task.join("volumes/data/made"),
        task.join("oci/main/rootfs/made-in-root"),
        task.join("oci/main/rootfs/bin/busybox"),
    ] {
        let meta = std::fs::symlink_metadata(&made).unwrap();
        assert!(
            (start..end).contains(&meta.uid()) && (start..end).contains(&meta.gid()),
            "{} belongs to {}:{}, not to the darkcore range",
            made.display(),
            meta.uid(),
            meta.gid()
        );
    }
    bench.finish().await;
}

#[tokio::test]
async fn a_fork_bomb_is_held_by_the_owners_limits_and_ends_with_its_pod() {
    let (bench, image) = small_offer("hostbomb").await;
    let bomb = serde_json::json!({
        "image": image,
        "command": ["sh", "-c", "echo lit; b() { b | b & }; b; sleep 600"],
    });
    let pod = bench
        .create(bench.pod_in("darkcore-oci", "bomb", bomb, "Never"))
        .await;
    bench
        .logs_show("bomb", "lit", Duration::from_secs(120))
        .await;
    // The bomb runs into the owner-wide pids or memory limit, and the device takes no harm:
    // this machine still starts processes, and the agent still reports.
    let all = cgroup_of(&bench.agents[0], None);
    // The container's limits equal the offer's, so it meets its own or the parent's.
    let its = cgroup_of(&bench.agents[0], Some(&pod));
    poll_until(
        "the bomb meets a limit",
        Duration::from_secs(120),
        || async {
            use darkcore_agent::tasks::oci::cgroups::limit_hits;
            match limit_hits(&its) + limit_hits(&all) {
                0 => Err("no limit met yet".to_string()),
                hits => {
                    eprintln!("the bomb met its limits {hits} times");
                    Ok(())
                }
            }
        },
    )
    .await;
    assert!(
        std::process::Command::new("true")
            .status()
            .unwrap()
            .success(),
        "this machine still forks"
    );
    assert!(bench.agents[0].status().contains("(connected)"));
    bench.delete_and_time("bomb").await;
    // Thousands of processes exit inside the owner's CPU share: that takes a while.
    let deleted = std::time::Instant::now();
    poll_until(
        "nothing of the bomb is left",
        Duration::from_secs(180),
        || async {
            use darkcore_agent::tasks::oci::cgroups::pids_in;
            match pids_in(&all) {
                0 => Ok(()),
                n => Err(format!("{n} processes")),
            }
        },
    )
    .await;
    eprintln!(
        "the bomb's last process ended {:.1} s after its pod was gone",
        deleted.elapsed().as_secs_f64()
    );
    bench.finish().await;
}

#[tokio::test]
async fn calls_the_default_profiles_refuse_are_refused_in_containers() {
    let bench = Bench::start("hostcalls", 1, hostile_pool()).await;
    let image = busybox(&bench).await;
    // A user namespace needs no capability, only the filter stops it; the others would
    // also need capabilities the container lacks.
    let script = "unshare -U true && echo MADE-USERNS; unshare -r true && echo MADE-ROOT-USERNS; \
                  nsenter -t 1 -m true && echo ENTERED; echo tried";
    let container = serde_json::json!({ "image": image, "command": ["sh", "-c", script] });
    bench
        .create(bench.pod_in("darkcore-oci", "calls", container, "Never"))
        .await;
    bench
        .phase_is("calls", "Succeeded", Duration::from_secs(120))
        .await;
    let logs = bench
        .logs_show("calls", "tried", Duration::from_secs(10))
        .await;
    for made in ["MADE-USERNS", "MADE-ROOT-USERNS", "ENTERED"] {
        assert!(!logs.contains(made), "{made}: {logs}");
    }
    assert!(logs.contains("Operation not permitted"), "{logs}");
    bench.finish().await;
}

/// Processes on this machine whose command line is exactly `words`.
fn processes_running(words: &[&str]) -> Vec<u32> {
    let wanted: Vec<u8> = words
        .iter()
        .flat_map(|w| [w.as_bytes(), b"\0"].concat())
        .collect();
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|c| c == wanted))
        .collect()
}

#[tokio::test]
async fn nothing_the_agent_started_outlives_it() {
    let spec = DevicePoolSpec {
        runtimes: vec![Runtime::Process, Runtime::Oci, Runtime::Wasm],
        ..Default::default()
    };
    let mut bench = Bench::start("hoststop", 1, spec).await;
    // A pool that allows `process` says so on its status.
    let sandboxed = bench
        .fx
        .pool_status()
        .await
        .conditions
        .into_iter()
        .find(|c| c.type_ == "Sandboxed")
        .expect("a Sandboxed condition");
    assert_eq!(
        (sandboxed.status.as_str(), sandboxed.reason.as_str()),
        ("False", "ProcessRuntimeAllowed")
    );
    // sleep ignores SIGTERM as a container's first process: the grace must run out.
    offers(&mut bench.agents[0], &[("stop_grace_seconds", "3")]).await;
    let image = busybox(&bench).await;
    let (spin, _) = push_wasm(&format!("e2e/{}/spin:v1", bench.ns.name), WAT_SPIN).await;

    // A process task that leaves a child behind when it ends: the child goes with it.
    bench
        .create(bench.pod("leaver", "sleep 31337 & echo left", "Never"))
        .await;
    bench
        .phase_is("leaver", "Succeeded", Duration::from_secs(120))
        .await;
    poll_until(
        "the left child is gone",
        Duration::from_secs(10),
        || async {
            match processes_running(&["sleep", "31337"]).as_slice() {
                [] => Ok(()),
                left => Err(format!("{left:?}")),
            }
        },
    )
    .await;

    // One long task in each runtime, then SIGTERM to the agent, as systemd stops it.
    bench
        .create(bench.pod("process", "sleep 31338 & sleep 31339; echo done", "Never"))
        .await;
    let container = serde_json::json!({ "image": image, "command": ["sleep", "31340"] });
    bench
        .create(bench.pod_in("darkcore-oci", "oci", container, "Never"))
        .await;
    let container = serde_json::json!({ "image": spin });
    bench
        .create(bench.pod_in("darkcore-wasm", "wasm", container, "Never"))
        .await;
    for name in ["process", "oci", "wasm"] {
        bench
            .phase_is(name, "Running", Duration::from_secs(120))
            .await;
    }
    poll_until(
        "the oci container runs",
        Duration::from_secs(30),
        || async {
            match processes_running(&["sleep", "31340"]).len() {
                1 => Ok(()),
                n => Err(format!("{n} found")),
            }
        },
    )
    .await;
    let agent = &mut bench.agents[0];
    let pid = agent.pid().unwrap();
    agent.stop().await;
    assert!(!std::path::Path::new(&format!("/proc/{pid}")).exists());
    for sleep in ["31338", "31339", "31340"] {
        assert_eq!(
            processes_running(&["sleep", sleep]),
            Vec::<u32>::new(),
            "sleep {sleep} outlived the agent"
        );
    }
    let listed = std::process::Command::new("runc")
        .arg("--root")
        .arg(agent.state_dir.join("runc"))
        .args(["list", "-q"])
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&listed.stdout).trim(), "");
    // The oci task's network went too: no slirp4netns serves a namespace of this agent's.
    let state_dir = agent.state_dir.display().to_string();
    let serving: Vec<String> = std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| std::fs::read(e.path().join("cmdline")).ok())
        .map(|c| String::from_utf8_lossy(&c).replace('\0', " "))
        .filter(|c| c.starts_with("slirp4netns ") && c.contains(&state_dir))
        .collect();
    assert_eq!(serving, Vec::<String>::new());
    bench.finish().await;
}

#[tokio::test]
async fn a_result_file_that_links_out_of_its_volume_is_never_read_by_the_device() {
    use crate::validation::{VALIDATED, condition, validated_digest};
    let spec = DevicePoolSpec {
        validation: darkcore_crds::ValidationPolicy {
            adaptive: darkcore_crds::AdaptiveReplication {
                enabled: false,
                ..Default::default()
            },
            ..Default::default()
        },
        ..hostile_pool()
    };
    let bench = Bench::start("hostresult", 2, spec).await;
    let canary = Canary::plant(&bench);
    let image = busybox(&bench).await;
    // The declared result file is a link to the owner's file (absolute, or climbing out; made,
    // or the pod fails), or is not there at all. The agent, root on the device, hashes result files for the quorum:
    // had it followed either link, that digest would hold the owner's file, and differ.
    let precious = format!("{}/precious", canary.path());
    let climbing = format!("{}/{}/precious", climb_to_root(), canary.relative_to_root());
    for (name, script) in [
        (
            "absolute",
            format!("ln -s {precious} /out/result && echo done"),
        ),
        (
            "climbing",
            format!("ln -s {climbing} /out/result && echo done"),
        ),
        ("absent", "echo done".to_string()),
    ] {
        let container = serde_json::json!({
            "image": image,
            "command": ["sh", "-c", script],
            "volumeMounts": [{ "name": "out", "mountPath": "/out" }],
        });
        let mut pod = bench.pod_in("darkcore-oci", name, container, "Never");
        pod.metadata.annotations = Some(
            [
                ("darkcore.io/quorum".to_string(), "2".to_string()),
                (
                    "darkcore.io/result-paths".to_string(),
                    "/out/result".to_string(),
                ),
            ]
            .into(),
        );
        bench.create(Bench::with_empty_dir(pod, "out")).await;
    }
    let mut digests = Vec::new();
    for name in ["absolute", "climbing", "absent"] {
        let pod = bench
            .phase_is(name, "Succeeded", Duration::from_secs(120))
            .await;
        let message = condition(&pod, VALIDATED)
            .and_then(|c| c.message.clone())
            .unwrap_or_else(|| panic!("{name}: {pod:?}"));
        digests.push((name, validated_digest(&message)));
    }
    assert!(!digests[2].1.is_empty(), "{digests:?}");
    assert!(
        digests.iter().all(|(_, d)| *d == digests[2].1),
        "a linked result differs from an absent one, so the owner's file was read: {digests:?}"
    );
    canary.assert_untouched("result files linking out");
    bench.finish().await;
}
