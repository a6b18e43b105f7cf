//! A task's namespaces, shared by its oci containers as a pod's are: a user namespace that
//! maps uid and gid 0 to the task's id slot (`ids.rs`), and a network namespace owned by it
//! (`network.rs` says what it reaches). Both are bind-mounted on files in the task directory,
//! which runc joins, and released when the task's last container ends.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use super::ids::{Slot, Slots};
use super::network::{self, Slirp};
use super::rootfs::NAMESPACE_IDS;
use crate::policy::config::NetworkMode;

/// How long the helper that makes the namespaces may take to make them.
const MADE_WITHIN: Duration = Duration::from_secs(5);

/// A task's user namespace, its network namespace (none in `host` mode), and what serves it.
pub struct TaskSandbox {
    slot: Slot,
    mode: NetworkMode,
    user: PathBuf,
    net: Option<PathBuf>,
    /// Dropped before the namespace files are released.
    slirp: Option<Slirp>,
}

impl TaskSandbox {
    /// Makes the namespaces at `<dir>/userns` and `<dir>/netns` (not in `host` mode).
    fn create(dir: &Path, mode: NetworkMode, slot: Slot) -> Result<TaskSandbox, String> {
        let user = dir.join("userns");
        let net = (mode != NetworkMode::Host).then(|| dir.join("netns"));
        for file in std::iter::once(&user).chain(&net) {
            // A namespace left here by an earlier sandbox of the task goes first.
            let _ = rustix::mount::unmount(file, rustix::mount::UnmountFlags::DETACH);
            std::fs::File::create(file).map_err(|e| format!("creating {}: {e}", file.display()))?;
        }
        // From here on, a failure drops `sandbox`, which releases what was made.
        let mut sandbox = TaskSandbox {
            slot,
            mode,
            user,
            net,
            slirp: None,
        };
        sandbox.make_namespaces()?;
        if let Some(net) = &sandbox.net {
            network::inside(net, &["ip", "link", "set", "lo", "up"], None, "iproute2")?;
            if mode == NetworkMode::Internet {
                let rules = network::filter_for_this_device();
                network::inside(net, &["nft", "-f", "-"], Some(&rules), "nftables")?;
                sandbox.slirp = Some(Slirp::start(net)?);
            }
        }
        Ok(sandbox)
    }

    /// A helper process enters new namespaces (util-linux's unshare), the agent maps the
    /// slot's ids into its user namespace and bind-mounts both namespaces on their files, and
    /// the helper goes.
    fn make_namespaces(&self) -> Result<(), String> {
        let mut helper = Command::new("unshare");
        helper.arg("--user");
        if self.net.is_some() {
            helper.arg("--net");
        }
        let mut helper = helper
            .args(["sleep", "60"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| network::missing_or("unshare", "util-linux", e))?;
        let made = self.adopt(helper.id());
        let _ = helper.kill();
        let _ = helper.wait();
        made
    }

    /// Maps and keeps the namespaces of process `pid` once it has entered them.
    fn adopt(&self, pid: u32) -> Result<(), String> {
        let proc = PathBuf::from(format!("/proc/{pid}"));
        let ours = std::fs::read_link("/proc/self/ns/user").ok();
        let deadline = Instant::now() + MADE_WITHIN;
        while std::fs::read_link(proc.join("ns/user")).ok() == ours {
            if Instant::now() > deadline {
                return Err(format!(
                    "unshare did not make the task's namespaces within {}s",
                    MADE_WITHIN.as_secs()
                ));
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        for (file, base) in [("uid_map", self.slot.uid), ("gid_map", self.slot.gid)] {
            let map = proc.join(file);
            std::fs::write(&map, format!("0 {base} {NAMESPACE_IDS}\n"))
                .map_err(|e| format!("writing {}: {e}", map.display()))?;
        }
        let keep = |kind: &str, file: &Path| {
            rustix::mount::mount_bind(proc.join("ns").join(kind), file).map_err(|e| {
                format!(
                    "keeping the task's {kind} namespace at {}: {e}",
                    file.display()
                )
            })
        };
        keep("user", &self.user)?;
        if let Some(net) = &self.net {
            keep("net", net)?;
        }
        Ok(())
    }

    /// The user namespace file, as the runtime spec names it.
    pub fn user_namespace(&self) -> &Path {
        &self.user
    }

    /// What the task may reach: the narrower of its pool's mode and its owner's.
    pub fn network_mode(&self) -> NetworkMode {
        self.mode
    }

    /// The network namespace file; `None`: the device's (`host` mode).
    pub fn network_namespace(&self) -> Option<&Path> {
        self.net.as_deref()
    }

    /// The host uid and gid that are 0 in the container.
    pub fn ids(&self) -> (u32, u32) {
        (self.slot.uid, self.slot.gid)
    }
}

impl Drop for TaskSandbox {
    fn drop(&mut self) {
        self.slirp.take();
        for file in std::iter::once(&self.user).chain(&self.net) {
            let _ = rustix::mount::unmount(file, rustix::mount::UnmountFlags::DETACH);
            let _ = std::fs::remove_file(file);
        }
    }
}

/// The live sandboxes of this agent's tasks, by task id: a task's containers share one, and it
/// goes when the last of them ends.
#[derive(Clone)]
pub struct Sandboxes {
    slots: Slots,
    live: Arc<Mutex<HashMap<String, Weak<TaskSandbox>>>>,
}

impl Sandboxes {
    pub fn new(slots: Slots) -> Sandboxes {
        Sandboxes {
            slots,
            live: Arc::default(),
        }
    }

    /// The sandbox of task `task_id` in `mode`, made in `dir` if no container of the task holds
    /// one now. Blocks while it sets one up.
    pub fn for_task(
        &self,
        task_id: &str,
        dir: &Path,
        mode: NetworkMode,
    ) -> Result<Arc<TaskSandbox>, String> {
        let mut live = self.live.lock().unwrap_or_else(|e| e.into_inner());
        live.retain(|_, sandbox| sandbox.strong_count() > 0);
        if let Some(sandbox) = live.get(task_id).and_then(Weak::upgrade) {
            return Ok(sandbox);
        }
        let started = Instant::now();
        let sandbox = Arc::new(TaskSandbox::create(dir, mode, self.slots.take()?)?);
        tracing::info!(
            task = task_id,
            network = ?mode,
            uid = sandbox.slot.uid,
            ms = started.elapsed().as_millis() as u64,
            "made the task's namespaces"
        );
        live.insert(task_id.to_string(), Arc::downgrade(&sandbox));
        Ok(sandbox)
    }
}
