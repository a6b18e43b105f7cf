//! The OCI runtime spec (config.json) of one container (pure): the pod's command, env, user
//! and limits merged with the image config as Kubernetes merges them, inside a sandbox of
//! its own pid, mount, ipc and uts namespaces and a seccomp filter, in its task's network
//! namespace (or the host's, in `host` mode).

use std::collections::BTreeMap;

use darkcore_proto::agent::v1::Container;

use super::cgroups::CPU_PERIOD_US;
use serde::Deserialize;
use serde_json::{Value, json};

/// The PATH a container gets when neither the image nor the pod sets one.
const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
/// Processes a container may have: enough for any build, not enough for a fork bomb.
const PIDS_LIMIT: i64 = 4096;
/// Capabilities a container keeps (a subset of Docker's defaults): no raw sockets, no
/// privileged ports on the host's network, no mknod, no chroot.
const CAPABILITIES: &[&str] = &[
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_FOWNER",
    "CAP_FSETID",
    "CAP_KILL",
    "CAP_SETGID",
    "CAP_SETUID",
];

/// The part of an image config a container start needs (OCI image spec `config`).
#[derive(Debug, Default, Deserialize, PartialEq)]
pub struct ImageConfig {
    #[serde(rename = "Entrypoint", default)]
    pub entrypoint: Option<Vec<String>>,
    #[serde(rename = "Cmd", default)]
    pub cmd: Option<Vec<String>>,
    #[serde(rename = "Env", default)]
    pub env: Option<Vec<String>>,
    #[serde(rename = "WorkingDir", default)]
    pub working_dir: Option<String>,
    #[serde(rename = "User", default)]
    pub user: Option<String>,
}

/// Reads the `config` of an image config document; an image without one runs with defaults.
pub fn image_config(document: &str) -> Result<ImageConfig, String> {
    #[derive(Deserialize)]
    struct Document {
        #[serde(default)]
        config: Option<ImageConfig>,
    }
    serde_json::from_str::<Document>(document)
        .map(|d| d.config.unwrap_or_default())
        .map_err(|e| format!("the image config is not valid JSON: {e}"))
}

/// The argv Kubernetes runs: `command` replaces the Entrypoint (and drops Cmd), `args`
/// replace Cmd.
pub fn argv(image: &ImageConfig, command: &[String], args: &[String]) -> Vec<String> {
    let entrypoint = if command.is_empty() {
        image.entrypoint.clone().unwrap_or_default()
    } else {
        command.to_vec()
    };
    let rest = if !args.is_empty() {
        args.to_vec()
    } else if command.is_empty() {
        image.cmd.clone().unwrap_or_default()
    } else {
        Vec::new()
    };
    entrypoint.into_iter().chain(rest).collect()
}

/// The image's env with the pod's on top (a pod variable replaces the image's of that name).
pub fn env(image: &ImageConfig, container: &Container, hostname: &str, home: &str) -> Vec<String> {
    let mut merged: BTreeMap<String, String> = BTreeMap::new();
    let mut order: Vec<String> = Vec::new();
    let mut set = |name: &str, value: &str| {
        if merged.insert(name.to_string(), value.to_string()).is_none() {
            order.push(name.to_string());
        }
    };
    set("PATH", DEFAULT_PATH);
    set("HOSTNAME", hostname);
    set("HOME", home);
    for pair in image.env.iter().flatten() {
        let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
        set(name, value);
    }
    for var in &container.env {
        set(&var.name, &var.value);
    }
    order
        .into_iter()
        .map(|name| format!("{name}={}", merged[&name]))
        .collect()
}

/// Who the container runs as.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct User {
    pub uid: u32,
    pub gid: u32,
    pub home: String,
}

/// Resolves the image's `User` (`uid`, `name`, `uid:gid`, `name:group`) against the rootfs'
/// passwd and group files, then applies the pod's runAsUser and runAsGroup.
pub fn user(
    image_user: &str,
    passwd: &str,
    group: &str,
    run_as_user: Option<i64>,
    run_as_group: Option<i64>,
) -> Result<User, String> {
    let (user_part, group_part) = match image_user.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (image_user, None),
    };
    // passwd lines: name:x:uid:gid:gecos:home:shell
    let accounts: Vec<Vec<&str>> = passwd
        .lines()
        .map(|l| l.split(':').collect::<Vec<_>>())
        .filter(|f| f.len() >= 6)
        .collect();
    let account_by = |pick: &dyn Fn(&Vec<&str>) -> bool| accounts.iter().find(|f| pick(f));
    let (mut uid, mut gid, mut home) = (0, 0, "/".to_string());
    if !user_part.is_empty() {
        let found = match user_part.parse::<u32>() {
            Ok(n) => {
                uid = n;
                account_by(&|f| f[2].parse() == Ok(n))
            }
            Err(_) => Some(account_by(&|f| f[0] == user_part).ok_or_else(|| {
                format!("the image's user {user_part:?} is not in its /etc/passwd")
            })?),
        };
        if let Some(f) = found {
            uid = f[2].parse().unwrap_or(uid);
            gid = f[3].parse().unwrap_or(0);
            home = f[5].to_string();
        }
    }
    if let Some(g) = group_part.filter(|g| !g.is_empty()) {
        gid = match g.parse::<u32>() {
            Ok(n) => n,
            Err(_) => group
                .lines()
                .map(|l| l.split(':').collect::<Vec<_>>())
                .find(|f| f.len() >= 3 && f[0] == g)
                .and_then(|f| f[2].parse().ok())
                .ok_or_else(|| format!("the image's group {g:?} is not in its /etc/group"))?,
        };
    }
    if let Some(n) = run_as_user {
        uid = u32::try_from(n).map_err(|_| format!("runAsUser {n} is out of range"))?;
        if let Some(f) = account_by(&|f| f[2].parse() == Ok(uid)) {
            home = f[5].to_string();
        }
    }
    if let Some(n) = run_as_group {
        gid = u32::try_from(n).map_err(|_| format!("runAsGroup {n} is out of range"))?;
    }
    Ok(User { uid, gid, home })
}

/// A bind mount from the device into the container.
#[derive(Clone, Debug)]
pub struct Bind {
    pub source: String,
    pub destination: String,
    pub read_only: bool,
}

/// Everything the spec is made from.
pub struct SpecInput<'a> {
    pub argv: Vec<String>,
    pub env: Vec<String>,
    pub cwd: String,
    pub user: User,
    pub hostname: &'a str,
    pub read_only_rootfs: bool,
    /// The pod's volumes, then the files the agent writes (hosts, hostname, resolv.conf).
    pub binds: Vec<Bind>,
    pub cgroups_path: String,
    /// 0: no limit.
    pub memory_limit: u64,
    pub cpu_limit_millicores: u32,
    /// The task's user namespace; `None`: the host's (root is root).
    pub user_namespace: Option<UserNamespace>,
    /// The task's network namespace (a bind-mounted nsfs file); `None`: the host's.
    pub network_namespace: Option<String>,
}

/// A user namespace the container joins (a bind-mounted nsfs file), which maps its ids 0..65536
/// to the host's `uid..` and `gid..`; runc wants the mappings said again.
pub struct UserNamespace {
    pub path: String,
    pub uid: u32,
    pub gid: u32,
}

/// The runtime spec, as runc and crun read it.
pub fn runtime_spec(input: &SpecInput<'_>) -> Value {
    let capabilities = json!(CAPABILITIES);
    let mut mounts = vec![
        json!({ "destination": "/proc", "type": "proc", "source": "proc" }),
        json!({ "destination": "/dev", "type": "tmpfs", "source": "tmpfs",
                "options": ["nosuid", "strictatime", "mode=755", "size=65536k"] }),
        json!({ "destination": "/dev/pts", "type": "devpts", "source": "devpts",
                "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620"] }),
        json!({ "destination": "/dev/shm", "type": "tmpfs", "source": "shm",
                "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"] }),
        json!({ "destination": "/dev/mqueue", "type": "mqueue", "source": "mqueue",
                "options": ["nosuid", "noexec", "nodev"] }),
        json!({ "destination": "/sys", "type": "sysfs", "source": "sysfs",
                "options": ["nosuid", "noexec", "nodev", "ro"] }),
    ];
    for bind in &input.binds {
        let mut options = vec!["rbind", "rprivate", "nosuid", "nodev"];
        if bind.read_only {
            options.push("ro");
        }
        mounts.push(json!({
            "destination": bind.destination,
            "type": "bind",
            "source": bind.source,
            "options": options,
        }));
    }
    let mut resources = json!({
        "devices": [{ "allow": false, "access": "rwm" }],
        "pids": { "limit": PIDS_LIMIT },
    });
    if input.memory_limit > 0 {
        // Swap equal to the limit: none beyond it.
        resources["memory"] = json!({ "limit": input.memory_limit, "swap": input.memory_limit });
    }
    if input.cpu_limit_millicores > 0 {
        let quota = u64::from(input.cpu_limit_millicores) * CPU_PERIOD_US / 1000;
        resources["cpu"] = json!({ "quota": quota.max(1000), "period": CPU_PERIOD_US });
    }
    let mut namespaces = vec![
        json!({ "type": "pid" }),
        json!({ "type": "mount" }),
        json!({ "type": "ipc" }),
        json!({ "type": "uts" }),
    ];
    if let Some(path) = &input.network_namespace {
        namespaces.push(json!({ "type": "network", "path": path }));
    }
    let ids = |base: u32| json!([{ "containerID": 0, "hostID": base, "size": super::rootfs::NAMESPACE_IDS }]);
    if let Some(user) = &input.user_namespace {
        namespaces.push(json!({ "type": "user", "path": user.path }));
        // sysfs mounts only in a network namespace the user namespace owns: with the host's
        // network (`host` mode), the host's /sys is bound read-only instead, as Podman does.
        if input.network_namespace.is_none() {
            let sys = mounts
                .iter_mut()
                .find(|m| m["destination"] == "/sys")
                .expect("the spec mounts /sys");
            *sys = json!({ "destination": "/sys", "type": "bind", "source": "/sys",
                           "options": ["rbind", "nosuid", "noexec", "nodev", "ro"] });
        }
    }
    let mut spec = json!({
        "ociVersion": "1.0.2",
        "process": {
            "terminal": false,
            "user": { "uid": input.user.uid, "gid": input.user.gid },
            "args": input.argv,
            "env": input.env,
            "cwd": input.cwd,
            "capabilities": {
                "bounding": capabilities,
                "effective": capabilities,
                "permitted": capabilities,
            },
            "noNewPrivileges": true,
            // The owner's programs win: under memory pressure the kernel kills tasks first.
            "oomScoreAdj": 1000,
        },
        "root": { "path": "rootfs", "readonly": input.read_only_rootfs },
        "hostname": input.hostname,
        "mounts": mounts,
        "linux": {
            "namespaces": namespaces,
            "cgroupsPath": input.cgroups_path,
            "resources": resources,
            "seccomp": super::seccomp::profile(),
            "maskedPaths": [
                "/proc/acpi", "/proc/asound", "/proc/kcore", "/proc/keys", "/proc/latency_stats",
                "/proc/timer_list", "/proc/timer_stats", "/proc/sched_debug", "/proc/scsi",
                "/sys/firmware", "/sys/devices/virtual/powercap",
            ],
            "readonlyPaths": [
                "/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger",
            ],
        },
    });
    if let Some(user) = &input.user_namespace {
        spec["linux"]["uidMappings"] = ids(user.uid);
        spec["linux"]["gidMappings"] = ids(user.gid);
    }
    spec
}

#[cfg(test)]
mod tests {
    use super::*;
    use darkcore_proto::agent::v1::EnvVar;

    fn strings(words: &[&str]) -> Vec<String> {
        words.iter().map(|w| w.to_string()).collect()
    }

    #[test]
    fn command_and_args_merge_with_entrypoint_and_cmd_as_kubernetes_does() {
        let image = ImageConfig {
            entrypoint: Some(strings(&["/entry"])),
            cmd: Some(strings(&["default"])),
            ..Default::default()
        };
        assert_eq!(argv(&image, &[], &[]), strings(&["/entry", "default"]));
        assert_eq!(
            argv(&image, &[], &strings(&["mine"])),
            strings(&["/entry", "mine"])
        );
        assert_eq!(
            argv(&image, &strings(&["/bin/sh"]), &[]),
            strings(&["/bin/sh"])
        );
        assert_eq!(
            argv(&image, &strings(&["/bin/sh"]), &strings(&["-c", "x"])),
            strings(&["/bin/sh", "-c", "x"])
        );
    }

    #[test]
    fn pod_env_overrides_the_image_env() {
        let image = ImageConfig {
            env: Some(strings(&["PATH=/image/bin", "A=image", "B=image"])),
            ..Default::default()
        };
        let container = Container {
            env: vec![EnvVar {
                name: "B".into(),
                value: "pod".into(),
            }],
            ..Default::default()
        };
        let env = env(&image, &container, "web-1", "/root");
        assert_eq!(
            env,
            strings(&[
                "PATH=/image/bin",
                "HOSTNAME=web-1",
                "HOME=/root",
                "A=image",
                "B=pod"
            ])
        );
    }

    #[test]
    fn users_resolve_from_the_image_and_the_security_context_wins() {
        let passwd = "root:x:0:0:root:/root:/bin/sh\napp:x:1000:1001::/home/app:/bin/sh\n";
        let group = "root:x:0:\nstaff:x:50:\n";
        let resolve = |u: &str, ru, rg| user(u, passwd, group, ru, rg);
        assert_eq!(
            resolve("", None, None).unwrap(),
            User {
                uid: 0,
                gid: 0,
                home: "/".into()
            }
        );
        assert_eq!(
            resolve("app", None, None).unwrap(),
            User {
                uid: 1000,
                gid: 1001,
                home: "/home/app".into()
            }
        );
        assert_eq!(resolve("1000:staff", None, None).unwrap().gid, 50);
        assert_eq!(resolve("4242", None, None).unwrap().uid, 4242);
        let overridden = resolve("app", Some(2000), Some(3000)).unwrap();
        assert_eq!((overridden.uid, overridden.gid), (2000, 3000));
        assert!(
            resolve("nobody-here", None, None)
                .unwrap_err()
                .contains("/etc/passwd")
        );
        assert!(
            resolve("app:nogroup", None, None)
                .unwrap_err()
                .contains("/etc/group")
        );
    }

    #[test]
    fn with_the_hosts_network_a_user_namespace_binds_sys_read_only() {
        let spec = runtime_spec(&SpecInput {
            argv: strings(&["/bin/true"]),
            env: Vec::new(),
            cwd: "/".into(),
            user: User {
                uid: 0,
                gid: 0,
                home: "/".into(),
            },
            hostname: "pod",
            read_only_rootfs: false,
            binds: Vec::new(),
            cgroups_path: "/darkcore/k/t".into(),
            memory_limit: 0,
            cpu_limit_millicores: 0,
            user_namespace: Some(UserNamespace {
                path: "/state/tasks/t/userns".into(),
                uid: 1 << 31,
                gid: 1 << 31,
            }),
            network_namespace: None,
        });
        let sys = spec["mounts"]
            .as_array()
            .unwrap()
            .iter()
            .find(|m| m["destination"] == "/sys")
            .unwrap();
        assert_eq!(
            sys["type"], "bind",
            "sysfs needs a network namespace of the user's"
        );
        assert!(sys["options"].as_array().unwrap().contains(&json!("ro")));
    }

    #[test]
    fn the_spec_sandboxes_and_limits() {
        let spec = runtime_spec(&SpecInput {
            argv: strings(&["/bin/true"]),
            env: strings(&["PATH=/bin"]),
            cwd: "/".into(),
            user: User {
                uid: 1000,
                gid: 1000,
                home: "/".into(),
            },
            hostname: "pod",
            read_only_rootfs: true,
            binds: vec![Bind {
                source: "/state/tasks/t/volumes/data".into(),
                destination: "/data".into(),
                read_only: true,
            }],
            cgroups_path: "/darkcore/t".into(),
            memory_limit: 64 << 20,
            cpu_limit_millicores: 500,
            user_namespace: Some(UserNamespace {
                path: "/state/tasks/t/userns".into(),
                uid: 1 << 31,
                gid: 1 << 31,
            }),
            network_namespace: Some("/state/tasks/t/netns".into()),
        });
        let namespaces: Vec<&str> = spec["linux"]["namespaces"]
            .as_array()
            .unwrap()
            .iter()
            .map(|n| n["type"].as_str().unwrap())
            .collect();
        assert_eq!(
            namespaces,
            ["pid", "mount", "ipc", "uts", "network", "user"]
        );
        assert_eq!(
            spec["linux"]["uidMappings"],
            json!([{ "containerID": 0, "hostID": 1u32 << 31, "size": 65536 }]),
            "root in the container is the task's slot on the host"
        );
        assert_eq!(spec["linux"]["gidMappings"][0]["hostID"], 1u32 << 31);
        assert_eq!(
            spec["linux"]["namespaces"][4]["path"], "/state/tasks/t/netns",
            "the task's, shared by its containers"
        );
        assert_eq!(spec["root"]["readonly"], true);
        assert_eq!(spec["process"]["noNewPrivileges"], true);
        assert_eq!(spec["linux"]["seccomp"]["defaultAction"], "SCMP_ACT_ALLOW");
        assert!(spec["linux"]["seccomp"]["syscalls"][0]["names"].is_array());
        assert_eq!(spec["process"]["user"]["uid"], 1000);
        assert_eq!(spec["linux"]["resources"]["memory"]["limit"], 64 << 20);
        assert_eq!(spec["linux"]["resources"]["cpu"]["quota"], 50_000);
        let bounding = spec["process"]["capabilities"]["bounding"]
            .as_array()
            .unwrap();
        assert!(
            !bounding
                .iter()
                .any(|c| c == "CAP_SYS_ADMIN" || c == "CAP_NET_RAW")
        );
        let binds: Vec<&Value> = spec["mounts"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|m| m["type"] == "bind")
            .collect();
        assert_eq!(
            binds.len(),
            1,
            "the volumes are the only mounts from the device"
        );
        assert!(
            binds[0]["options"]
                .as_array()
                .unwrap()
                .contains(&json!("ro"))
        );
    }
}
