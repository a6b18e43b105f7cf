//! The `oci` runtime: each container runs from its image's unpacked rootfs under the runc or
//! crun found on the device, sandboxed by the spec in `spec.rs`, as `<runtime> run` whose
//! stdout and stderr are the container's own.
//!
//! Per container start: `<task dir>/oci/<container>/` holds the bundle (config.json, rootfs,
//! hosts, hostname, resolv.conf); runc's state lives in `<state dir>/runc`, and the cgroup at
//! `<owner cgroup>/<container id>` (`cgroups.rs`), where the OOM killer's count is read once
//! the container ends.
//! The task's containers share its user and network namespaces (`sandbox.rs`): root in a
//! container is the task's unprivileged id slot on the device, and its files are shifted
//! into that slot as they are unpacked.

pub mod cgroups;
pub mod ids;
pub mod network;
pub mod rootfs;
pub mod sandbox;
mod seccomp;
pub mod spec;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use tokio::process::{Child, Command};

use crate::images::ImageStore;
use crate::policy::config::NetworkMode;
use crate::tasks::mounts;
use crate::tasks::runtime::{
    Ceiling, Exit, Launch, Output, Runtime, StartError, Workload, cpu_at_exit,
};
use cgroups::OwnerCgroup;
use rootfs::Owners;
use sandbox::{Sandboxes, TaskSandbox};
use spec::{Bind, SpecInput};

/// The container runners the agent looks for, in order of preference.
pub const RUNNERS: &[&str] = &["runc", "crun"];

/// Under a container's bundle: the bind mounts that stage its subPaths for the runner.
const STAGED: &str = "subpaths";

#[derive(Clone)]
pub struct OciRuntime {
    runner: Runner,
    images: Arc<ImageStore>,
    /// The owner's offer: a container's limits are capped by it, and it is their default.
    ceiling: Ceiling,
    /// The widest network the owner allows; a pool may narrow it.
    owner_network: NetworkMode,
    sandboxes: Sandboxes,
    /// The parent of every container's cgroup, capped at the offer.
    cgroup: OwnerCgroup,
}

/// Why the `oci` runtime cannot run on this device, if it cannot: the device then does not
/// offer it, and the agent says why at start.
pub fn unavailable() -> Option<String> {
    usable_runner().err()
}

/// The runc or crun on PATH, if the agent may use it (rootless containers are not supported).
fn usable_runner() -> Result<PathBuf, String> {
    let on_path = std::env::var_os("PATH").and_then(|paths| {
        RUNNERS.iter().find_map(|bin| {
            std::env::split_paths(&paths)
                .map(|dir| dir.join(bin))
                .find(|p| p.is_file())
        })
    });
    let runner = on_path.ok_or("neither runc nor crun is on PATH: install one (Debian: apt install runc) to run OCI containers")?;
    if !rustix::process::geteuid().is_root() {
        return Err("the agent does not run as root, and rootless containers are not supported yet: run the agent as root to run OCI containers".into());
    }
    Ok(runner)
}

/// The runner binary with this agent's state root: every runc or crun command goes through
/// here.
#[derive(Clone)]
struct Runner {
    bin: PathBuf,
    /// runc's `--root`: this agent's containers only, so agents sharing a machine never meet.
    root: PathBuf,
}

/// Deletes what an agent of `state_dir` that was killed left behind: its containers (killing
/// what still runs), the mounts under its state dir, and its parent cgroup. An agent does this
/// itself at its next start; tests call it for agents that will not start again.
pub fn clear_left_by(state_dir: &Path) {
    if let Ok(bin) = usable_runner() {
        Runner {
            bin,
            root: state_dir.join("runc"),
        }
        .delete_all();
    }
    mounts::unmount_under(state_dir);
    cgroups::remove(&cgroups::owner_cgroup_path(state_dir));
}

impl Runner {
    /// Deletes every container under this runner's root, killing what still runs.
    fn delete_all(&self) {
        let Ok(entries) = std::fs::read_dir(&self.root) else {
            return;
        };
        for id in entries.flatten().map(|e| e.file_name()) {
            let id = id.to_string_lossy();
            tracing::info!(container = %id, "deleting a container left by an earlier agent");
            let _ = self.command(&["delete", "--force", &id]).status();
        }
    }

    /// `<runner> --root <root> <args>`, its output discarded unless the caller says otherwise.
    fn command(&self, args: &[&str]) -> std::process::Command {
        let mut command = std::process::Command::new(&self.bin);
        command
            .arg("--root")
            .arg(&self.root)
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        command
    }
}

impl OciRuntime {
    /// Why not, when the device cannot run containers (see `unavailable`).
    pub fn new(
        state_dir: &Path,
        images: Arc<ImageStore>,
        ceiling: Ceiling,
        owner_network: NetworkMode,
    ) -> Result<OciRuntime, String> {
        let slots = ids::Slots::of_this_device()?;
        // Root in a container is an unprivileged host uid, which runc's setup inside the user
        // namespace runs as: it must be able to pass through the state dir to the task's
        // bundle (0711: no listing; the files in it are 0600 and root's).
        traversable(state_dir)
            .map_err(|e| format!("opening {} to containers' root: {e}", state_dir.display()))?;
        let runtime = OciRuntime {
            runner: Runner {
                bin: usable_runner()?,
                root: state_dir.join("runc"),
            },
            images,
            ceiling,
            owner_network,
            sandboxes: Sandboxes::new(slots),
            cgroup: OwnerCgroup::create(state_dir, ceiling)?,
        };
        runtime.reap_stale();
        Ok(runtime)
    }

    /// Deletes the containers an earlier run of the agent left (killing what still runs).
    fn reap_stale(&self) {
        self.runner.delete_all();
    }

    /// The task's namespaces (made by its first container), with the task's directory opened
    /// to the container's root: owned by it, below a tasks directory it may pass through.
    fn sandbox(&self, launch: &Launch) -> Result<Arc<TaskSandbox>, StartError> {
        let create = |message: String| StartError {
            reason: "CreateContainerError",
            message,
        };
        let mode = network::effective(launch.pool_network, self.owner_network);
        let sandbox = self
            .sandboxes
            .for_task(&launch.task_id, &launch.task_dir, mode)
            .map_err(create)?;
        let dir = &launch.task_dir;
        let opened = dir
            .parent()
            .map_or(Ok(()), traversable)
            .and_then(|()| give(dir, sandbox.ids()))
            .and_then(|()| traversable_if_there(&dir.join("volumes")));
        opened.map_err(|e| {
            create(format!(
                "opening {} to the container's root: {e}",
                dir.display()
            ))
        })?;
        Ok(sandbox)
    }

    /// Lays out the bundle: rootfs from the image's layers, the files the agent provides,
    /// and config.json.
    fn bundle(
        &self,
        launch: &Launch,
        bundle: &Path,
        id: &str,
        sandbox: &TaskSandbox,
    ) -> Result<(), StartError> {
        let create = |message: String| StartError {
            reason: "CreateContainerError",
            message,
        };
        let config_error = |message: String| StartError {
            reason: "CreateContainerConfigError",
            message,
        };
        let image = launch
            .image
            .as_ref()
            .ok_or_else(|| create("no image was pulled for this container".into()))?;
        if image.config_media_type.starts_with("application/vnd.wasm") {
            return Err(config_error(format!(
                "image {:?} is a WebAssembly module: run it with runtimeClassName darkcore-wasm",
                image.reference
            )));
        }
        mounts::unmount_under(bundle);
        match std::fs::remove_dir_all(bundle) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                return Err(create(format!("clearing {}: {e}", bundle.display())));
            }
            _ => {}
        }
        let rootfs = bundle.join("rootfs");
        let (uid, gid) = sandbox.ids();
        std::fs::create_dir_all(&rootfs)
            .and_then(|()| bundle.parent().map_or(Ok(()), traversable))
            .and_then(|()| traversable(bundle))
            .and_then(|()| give(&rootfs, (uid, gid)))
            .map_err(|e| create(format!("creating {}: {e}", rootfs.display())))?;
        let layers: Vec<PathBuf> = image
            .layers
            .iter()
            .filter_map(|l| self.images.blob_path(&l.digest))
            .collect();
        let owners = Owners::Shifted { uid, gid };
        // What every task holds on disk (roots, volumes) counts against max_disk too.
        let room_left = self.images.room_left();
        let held = launch.task_dir.parent().map_or(0, |tasks| {
            crate::tasks::workdir::disk_used(tasks, room_left)
        });
        let room = room_left.saturating_sub(held);
        rootfs::unpack(&layers, &rootfs, owners, room)
            .map_err(|e| create(format!("unpacking image {:?}: {e}", image.reference)))?;

        let container = &launch.container;
        let config = spec::image_config(&image.config).map_err(create)?;
        let read = |path: &str| std::fs::read_to_string(rootfs.join(path)).unwrap_or_default();
        let security = container.security_context.unwrap_or_default();
        let user = spec::user(
            config.user.as_deref().unwrap_or(""),
            &read("etc/passwd"),
            &read("etc/group"),
            security.run_as_user,
            security.run_as_group,
        )
        .map_err(create)?;
        let argv = spec::argv(&config, &container.command, &container.args);
        if argv.is_empty() {
            return Err(config_error(format!(
                "container {:?} has no command, and its image sets no Entrypoint or Cmd",
                container.name
            )));
        }
        let cwd = [
            container.working_dir.as_str(),
            config.working_dir.as_deref().unwrap_or(""),
        ]
        .into_iter()
        .find(|d| !d.is_empty())
        .unwrap_or("/")
        .to_string();
        if !cwd.starts_with('/') {
            return Err(config_error(format!("workingDir {cwd:?} is not absolute")));
        }

        let mut binds = Vec::new();
        for (index, (source, mount)) in launch.mounts.iter().zip(&container.mounts).enumerate() {
            let staging = bundle.join(STAGED).join(index.to_string());
            let path = source.for_runtime(&staging).map_err(|e| {
                create(format!(
                    "staging volume {:?} at {}: {e}",
                    mount.volume, source.path_in_pod
                ))
            })?;
            binds.push(Bind {
                source: path.display().to_string(),
                destination: source.path_in_pod.clone(),
                read_only: mount.read_only,
            });
        }
        traversable_if_there(&bundle.join(STAGED))
            .map_err(|e| create(format!("opening the staged subPaths: {e}")))?;
        for (name, content) in etc_files(&launch.pod_name, sandbox.network_mode()) {
            let path = bundle.join(name);
            std::fs::write(&path, content)
                .and_then(|()| {
                    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644))
                })
                .map_err(|e| create(format!("writing {}: {e}", path.display())))?;
            binds.push(Bind {
                source: path.display().to_string(),
                destination: format!("/etc/{name}"),
                read_only: false,
            });
        }
        let limits = container.resources.unwrap_or_default();
        let spec = spec::runtime_spec(&SpecInput {
            argv,
            env: spec::env(&config, container, &launch.pod_name, &user.home),
            cwd,
            user,
            hostname: &launch.pod_name,
            read_only_rootfs: security.read_only_root_filesystem,
            binds,
            cgroups_path: self.cgroup.container(id),
            memory_limit: self.ceiling.memory_bytes(limits.limit_memory_bytes),
            cpu_limit_millicores: self.ceiling.millicores(limits.limit_millicores),
            user_namespace: Some(spec::UserNamespace {
                path: sandbox.user_namespace().display().to_string(),
                uid,
                gid,
            }),
            network_namespace: sandbox.network_namespace().map(|n| n.display().to_string()),
        });
        let path = bundle.join("config.json");
        std::fs::write(&path, spec.to_string())
            .map_err(|e| create(format!("writing {}: {e}", path.display())))
    }
}

/// /etc/hosts, /etc/hostname and /etc/resolv.conf as the container sees them: written by the
/// agent (resolv.conf as the network mode has it), so no device file is mounted in.
fn etc_files(hostname: &str, mode: NetworkMode) -> Vec<(&'static str, String)> {
    let device = std::fs::read_to_string("/etc/resolv.conf").unwrap_or_default();
    let resolv = network::resolv_conf(mode, &device);
    vec![
        (
            "hosts",
            format!("127.0.0.1\tlocalhost {hostname}\n::1\tlocalhost ip6-localhost ip6-loopback\n"),
        ),
        ("hostname", format!("{hostname}\n")),
        ("resolv.conf", resolv),
    ]
}

/// Lets anyone pass through `dir` (0711), without listing it.
fn traversable(dir: &Path) -> std::io::Result<()> {
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o711))
}

/// [`traversable`], for a directory a task may not have.
fn traversable_if_there(dir: &Path) -> std::io::Result<()> {
    match traversable(dir) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        other => other,
    }
}

/// Gives `path` to the host ids `(uid, gid)`: a task's slot, root in its containers.
fn give(path: &Path, (uid, gid): (u32, u32)) -> std::io::Result<()> {
    use rustix::fs::{Gid, Uid, chown};
    chown(path, Some(Uid::from_raw(uid)), Some(Gid::from_raw(gid))).map_err(Into::into)
}

/// The runner's name for a container: task id and container name, in its alphabet.
pub fn container_id(task_id: &str, container: &str) -> String {
    format!("{task_id}-{container}")
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.') {
                c
            } else {
                '_'
            }
        })
        .collect()
}

#[tonic::async_trait]
impl Runtime for OciRuntime {
    fn name(&self) -> &'static str {
        "oci"
    }

    fn images(&self) -> Option<Arc<ImageStore>> {
        Some(self.images.clone())
    }

    async fn start(&self, launch: &Launch) -> Result<Box<dyn Workload>, StartError> {
        let id = container_id(&launch.task_id, &launch.container.name);
        let bundle = launch.task_dir.join("oci").join(&launch.container.name);
        // A container of this id whose delete failed at its end would block `run`.
        let _ = Command::from(self.runner.command(&["delete", "--force", &id]))
            .status()
            .await;
        let prepared = {
            let (runtime, launch, bundle, id) =
                (self.clone(), launch.clone(), bundle.clone(), id.clone());
            tokio::task::spawn_blocking(move || {
                let sandbox = runtime.sandbox(&launch)?;
                runtime.bundle(&launch, &bundle, &id, &sandbox)?;
                Ok::<_, StartError>(sandbox)
            })
            .await
        };
        let sandbox = prepared.map_err(|e| StartError {
            reason: "CreateContainerError",
            message: format!("preparing the bundle: {e}"),
        })??;
        let mut command = Command::from(self.runner.command(&[]));
        command
            .arg("--log")
            .arg(bundle.join("runc.log"))
            .args(["--log-format", "json", "run", "--keep", "--pid-file"])
            .arg(bundle.join("pid"))
            .arg("--bundle")
            .arg(&bundle)
            .arg(&id)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let child = command.spawn().map_err(|e| StartError {
            reason: "RunContainerError",
            message: format!("starting {}: {e}", self.runner.bin.display()),
        })?;
        Ok(Box::new(Container {
            child,
            cgroup: self.cgroup.container(&id),
            id,
            bundle,
            runner: self.runner.clone(),
            cpu: Duration::ZERO,
            sandbox,
        }))
    }
}

/// A container that is running under the runner.
struct Container {
    /// `<runner> run`, which lives as long as the container and exits with its status.
    child: Child,
    id: String,
    bundle: PathBuf,
    runner: Runner,
    /// Its cgroupsPath.
    cgroup: String,
    cpu: Duration,
    /// The task's namespaces, held while the container runs.
    sandbox: Arc<TaskSandbox>,
}

impl Container {
    /// `<runner> <verb> <this container> <rest>`.
    fn command(&self, verb: &[&str], rest: &[&str]) -> Command {
        let mut command = Command::from(self.runner.command(verb));
        command.arg(&self.id).args(rest);
        command
    }

    /// Signals the container's first process, as the kubelet does; with it gone, the kernel
    /// ends the rest of the pid namespace. Fire and forget: tokio reaps the child, and a
    /// container already gone is fine.
    fn signal(&self, signal: &str) {
        let _ = self.command(&["kill"], &[signal]).spawn();
    }
}

/// The runner's own error (from its JSON log), when it failed before the container ran.
fn runner_error(log: &str) -> Option<String> {
    log.lines()
        .rev()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["level"] == "error")
        .find_map(|v| v["msg"].as_str().map(str::to_string))
}

#[tonic::async_trait]
impl Workload for Container {
    fn take_output(&mut self) -> (Option<Output>, Option<Output>) {
        crate::tasks::runtime::child_output(&mut self.child)
    }

    async fn wait(&mut self) -> Exit {
        // runc waits for the container's init, so its own reaped time is the fallback.
        let runner_cpu = cpu_at_exit(&self.child).await;
        let status = self.child.wait().await;
        let started = self.bundle.join("pid").exists();
        let oom = cgroups::oom_kills(&self.cgroup);
        if let Some(cpu) = cgroups::cpu_used(&self.cgroup).or(runner_cpu) {
            self.cpu = cpu;
        }
        let log = std::fs::read_to_string(self.bundle.join("runc.log")).unwrap_or_default();
        let _ = self.command(&["delete", "--force"], &[]).status().await;
        mounts::unmount_under(&self.bundle.join(STAGED));
        let code = match status {
            Ok(status) => {
                use std::os::unix::process::ExitStatusExt;
                status
                    .code()
                    .or(status.signal().map(|s| 128 + s))
                    .unwrap_or(1)
            }
            Err(e) => {
                return Exit {
                    code: 1,
                    reason: "Error".into(),
                    message: format!("waiting for the container: {e}"),
                };
            }
        };
        if oom > 0 {
            return Exit {
                code: if code == 0 { 137 } else { code },
                reason: "OOMKilled".into(),
                message: String::new(),
            };
        }
        match runner_error(&log) {
            // The runner failed before or at exec: Kubernetes' StartError, exit code 128.
            Some(error) if code != 0 && (!started || error.contains("unable to start")) => Exit {
                code: 128,
                reason: "StartError".into(),
                message: error,
            },
            _ => Exit::from_code(code),
        }
    }

    fn meter(&self) -> Option<Arc<dyn crate::tasks::stats::Meter>> {
        Some(Arc::new(cgroups::CgroupMeter(self.cgroup.clone())))
    }

    fn entrance(&self) -> crate::tasks::enter::Entrance {
        crate::tasks::enter::Entrance::Runner {
            bin: self.runner.bin.clone(),
            root: self.runner.root.clone(),
            id: self.id.clone(),
            network: self.sandbox.network_namespace().map(Path::to_path_buf),
        }
    }

    fn cpu_used(&self) -> Duration {
        self.cpu
    }

    fn terminate(&mut self) {
        self.signal("TERM");
    }

    /// SIGKILL to every process in the container's cgroup (runc freezes it, signals each,
    /// thaws it), not only its first, whose exit would have to reap them all inside the
    /// container's CPU quota; and that quota lifted, so they can exit.
    fn kill(&mut self) {
        cgroups::release_cpu(&self.cgroup);
        let _ = self.command(&["kill", "--all"], &["KILL"]).spawn();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn container_ids_are_plain() {
        assert_eq!(container_id("0b1c.1", "main"), "0b1c.1-main");
        assert_eq!(container_id("t.2", "a/b c"), "t.2-a_b_c");
    }

    #[test]
    fn the_runners_last_error_is_its_message() {
        let log = r#"{"level":"warning","msg":"ignored","time":"t"}
{"level":"error","msg":"runc run failed: unable to start container process: exec: \"/nope\": stat /nope: no such file or directory","time":"t"}"#;
        assert!(runner_error(log).unwrap().contains("exec: \"/nope\""));
        assert_eq!(runner_error(""), None);
    }
}
