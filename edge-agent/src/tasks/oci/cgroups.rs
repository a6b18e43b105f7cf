//! The owner-wide cgroup: one parent per agent that holds all of its containers and is capped
//! at the owner's offer (cores, memory, processes), so their sum never exceeds it, whatever
//! each one's own limits. A child's limit can never raise its parent's. cgroup v2 or v1.

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::tasks::runtime::Ceiling;

/// Where cgroup file systems are mounted.
const CGROUP_ROOT: &str = "/sys/fs/cgroup";
/// The CFS period the cpu limits are shares of (the kubelet's).
pub const CPU_PERIOD_US: u64 = 100_000;
/// Processes all of an agent's containers may have together: enough for builds, too few for a
/// fork bomb to starve the owner's machine.
pub const OWNER_PIDS: u64 = 4096;
/// The v1 controllers darkcore limits or reads.
const V1_CONTROLLERS: [&str; 4] = ["cpu", "cpuacct", "memory", "pids"];

/// The agent's parent cgroup, as runc's `cgroupsPath` names it: `/darkcore/<key>`, with a key
/// of the state dir so that agents sharing a machine never share a parent.
#[derive(Clone, Debug)]
pub struct OwnerCgroup {
    path: String,
}

/// One file write that sets a limit, relative to the cgroup root.
#[derive(Debug, PartialEq, Eq)]
pub struct Setting {
    pub file: PathBuf,
    pub value: String,
}

/// Which cgroup layout the machine has.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Layout {
    /// cgroup v2 alone (`/sys/fs/cgroup/cgroup.controllers` exists).
    Unified,
    /// v1 controllers, each its own hierarchy (hybrid included).
    Legacy,
}

impl Layout {
    pub fn of_this_machine() -> Layout {
        if Path::new(CGROUP_ROOT).join("cgroup.controllers").exists() {
            Layout::Unified
        } else {
            Layout::Legacy
        }
    }
}

/// The parent of `state_dir`'s containers, e.g. `/darkcore/3f9c0a1b2d4e5f60`.
pub fn owner_cgroup_path(state_dir: &Path) -> String {
    let digest = ring::digest::digest(
        &ring::digest::SHA256,
        state_dir.as_os_str().as_encoded_bytes(),
    );
    let key: String = digest.as_ref()[..8]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    format!("/darkcore/{key}")
}

/// The writes that cap `path` at `ceiling` and [`OWNER_PIDS`] (pure). An offer of 0 is none.
pub fn settings(layout: Layout, path: &str, ceiling: Ceiling) -> Vec<Setting> {
    let path = path.trim_start_matches('/');
    let at = |controller: &str, file: &str| match layout {
        Layout::Unified => Path::new(path).join(file),
        Layout::Legacy => Path::new(controller).join(path).join(file),
    };
    let set = |file: PathBuf, value: String| Setting { file, value };
    let quota = (ceiling.millicores > 0)
        .then(|| (u64::from(ceiling.millicores) * CPU_PERIOD_US / 1000).max(1000));
    let memory = (ceiling.memory_bytes > 0).then_some(ceiling.memory_bytes);
    match layout {
        Layout::Unified => vec![
            set(
                at("cpu", "cpu.max"),
                format!(
                    "{} {CPU_PERIOD_US}",
                    quota.map_or("max".into(), |q| q.to_string())
                ),
            ),
            set(
                at("memory", "memory.max"),
                memory.map_or("max".into(), |m| m.to_string()),
            ),
            set(at("memory", "memory.swap.max"), "0".into()),
            set(at("pids", "pids.max"), OWNER_PIDS.to_string()),
        ],
        Layout::Legacy => vec![
            set(at("cpu", "cpu.cfs_period_us"), CPU_PERIOD_US.to_string()),
            set(
                at("cpu", "cpu.cfs_quota_us"),
                quota.map_or("-1".into(), |q| q.to_string()),
            ),
            set(
                at("memory", "memory.limit_in_bytes"),
                memory.map_or("-1".into(), |m| m.to_string()),
            ),
            set(at("pids", "pids.max"), OWNER_PIDS.to_string()),
        ],
    }
}

impl OwnerCgroup {
    /// Makes the agent's parent cgroup and caps it at `ceiling`. Why not, if it cannot: then
    /// the device does not run containers, for their sum would be unbounded.
    pub fn create(state_dir: &Path, ceiling: Ceiling) -> Result<OwnerCgroup, String> {
        let path = owner_cgroup_path(state_dir);
        let layout = Layout::of_this_machine();
        let root = Path::new(CGROUP_ROOT);
        let relative = path.trim_start_matches('/');
        let fail = |what: &Path, e: std::io::Error| {
            format!(
                "setting up the cgroup that caps all containers at the owner's offer ({}): {e}",
                what.display()
            )
        };
        match layout {
            Layout::Unified => {
                // Each level hands the cpu, memory and pids controllers down to the next.
                let mut dir = root.to_path_buf();
                for level in std::iter::once("").chain(relative.split('/')) {
                    dir.push(level);
                    std::fs::create_dir_all(&dir).map_err(|e| fail(&dir, e))?;
                    let control = dir.join("cgroup.subtree_control");
                    std::fs::write(&control, "+cpu +memory +pids")
                        .map_err(|e| fail(&control, e))?;
                }
            }
            Layout::Legacy => {
                for controller in V1_CONTROLLERS {
                    let dir = root.join(controller).join(relative);
                    std::fs::create_dir_all(&dir).map_err(|e| fail(&dir, e))?;
                }
            }
        }
        for setting in settings(layout, &path, ceiling) {
            let file = root.join(&setting.file);
            // memory.swap.max is absent where swap accounting is off: nothing to cap then.
            match std::fs::write(&file, &setting.value) {
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                written => written.map_err(|e| fail(&file, e))?,
            }
        }
        Ok(OwnerCgroup { path })
    }

    /// A container's `cgroupsPath`, under the parent.
    pub fn container(&self, container_id: &str) -> String {
        format!("{}/{container_id}", self.path)
    }
}

/// Removes an empty cgroup from v2 and from every v1 hierarchy (runc makes its path in all of
/// them); what is not there or not empty stays.
pub fn remove(cgroup: &str) {
    let cgroup = cgroup.trim_start_matches('/');
    let root = Path::new(CGROUP_ROOT);
    let hierarchies = std::fs::read_dir(root).into_iter().flatten().flatten();
    for dir in std::iter::once(root.join(cgroup)).chain(hierarchies.map(|h| h.path().join(cgroup)))
    {
        let _ = std::fs::remove_dir(dir);
    }
}

/// A cgroup's file (`cgroupsPath` as runc names it): v2's `<root>/<cgroup>/<v2>`, then v1's
/// `<root>/<controller>/<cgroup>/<v1>`. Each reader below tries both, so it serves either
/// layout.
fn files(cgroup: &str, controller: &str, v2: &str, v1: &str) -> [PathBuf; 2] {
    let cgroup = cgroup.trim_start_matches('/');
    let root = Path::new(CGROUP_ROOT);
    [
        root.join(cgroup).join(v2),
        root.join(controller).join(cgroup).join(v1),
    ]
}

/// The first of `files` that can be read, read by `parse`.
fn read_first<T>(files: &[PathBuf], parse: impl Fn(&str) -> Option<T>) -> Option<T> {
    files
        .iter()
        .filter_map(|f| std::fs::read_to_string(f).ok())
        .find_map(|text| parse(&text))
}

/// The number on the line `<key> <number>` of a flat-keyed cgroup file (cpu.stat,
/// memory.events, memory.oom_control, pids.events).
fn keyed(text: &str, key: &str) -> Option<u64> {
    text.lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix(' '))
        .and_then(|n| n.trim().parse().ok())
}

/// A file that holds one number (memory.current, pids.current, cpuacct.usage, ...).
fn number(text: &str) -> Option<u64> {
    text.trim().parse().ok()
}

/// The CPU time of everything in a cgroup, orphans included: v2's cpu.stat, or v1's cpuacct.
pub fn cpu_used(cgroup: &str) -> Option<Duration> {
    let [v2, v1] = files(cgroup, "cpuacct", "cpu.stat", "cpuacct.usage");
    read_first(&[v2], |t| keyed(t, "usage_usec").map(Duration::from_micros))
        .or_else(|| read_first(&[v1], |t| number(t).map(Duration::from_nanos)))
}

/// The memory a cgroup holds now (v2's memory.current, or v1's memory.usage_in_bytes).
pub fn memory_used(cgroup: &str) -> Option<u64> {
    read_first(
        &files(cgroup, "memory", "memory.current", "memory.usage_in_bytes"),
        number,
    )
}

/// The memory a cgroup holds that cannot be reclaimed at once, as the kubelet counts its
/// working set: what it holds less its inactive file pages.
pub fn working_set(cgroup: &str) -> Option<u64> {
    let used = memory_used(cgroup)?;
    let [v2, v1] = files(cgroup, "memory", "memory.stat", "memory.stat");
    let inactive = read_first(&[v2], |t| keyed(t, "inactive_file"))
        .or_else(|| read_first(&[v1], |t| keyed(t, "total_inactive_file")))
        .unwrap_or(0);
    Some(used.saturating_sub(inactive))
}

/// A container's figures for `kubectl top`, read from its cgroup.
pub struct CgroupMeter(pub String);

impl crate::tasks::stats::Meter for CgroupMeter {
    fn sample(&self) -> Option<crate::tasks::stats::Sample> {
        Some(crate::tasks::stats::Sample {
            cpu: cpu_used(&self.0)?,
            memory_working_set: working_set(&self.0)?,
        })
    }
}

/// How many processes a cgroup and those below it hold now (pids.current, v1 or v2).
pub fn pids_in(cgroup: &str) -> u64 {
    read_first(
        &files(cgroup, "pids", "pids.current", "pids.current"),
        number,
    )
    .unwrap_or(0)
}

/// Lifts a cgroup's own CPU quota (its parent's still holds), so that what is in it can exit
/// when killed: thousands of killed processes under a small quota (a fork bomb's) were seen to
/// make no progress at all.
pub fn release_cpu(cgroup: &str) {
    let [v2, v1] = files(cgroup, "cpu", "cpu.max", "cpu.cfs_quota_us");
    let _ = std::fs::write(v1, "-1");
    let _ = std::fs::write(v2, "max");
}

/// How often a cgroup met its pids or memory limit: forks refused, and charges that hit the
/// memory limit (whether the kernel then reclaimed, refused or OOM-killed), v1 or v2.
pub fn limit_hits(cgroup: &str) -> u64 {
    let forks = files(cgroup, "pids", "pids.events", "pids.events");
    let [v2, v1] = files(cgroup, "memory", "memory.events", "memory.failcnt");
    [
        read_first(&forks, |t| keyed(t, "max")),
        read_first(&[v2], |t| keyed(t, "max")),
        read_first(&[v1], number),
    ]
    .into_iter()
    .flatten()
    .sum()
}

/// How many processes the kernel's OOM killer took from a cgroup.
pub fn oom_kills(cgroup: &str) -> u64 {
    read_first(
        &files(cgroup, "memory", "memory.events", "memory.oom_control"),
        |t| keyed(t, "oom_kill"),
    )
    .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn written(settings: &[Setting]) -> Vec<(String, String)> {
        settings
            .iter()
            .map(|s| (s.file.display().to_string(), s.value.clone()))
            .collect()
    }

    fn pairs(expected: &[(&str, &str)]) -> Vec<(String, String)> {
        expected
            .iter()
            .map(|(f, v)| (f.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn the_parent_is_capped_at_the_offer_in_either_layout() {
        let offer = Ceiling {
            millicores: 1500,
            memory_bytes: 512 << 20,
        };
        assert_eq!(
            written(&settings(Layout::Legacy, "/darkcore/k", offer)),
            pairs(&[
                ("cpu/darkcore/k/cpu.cfs_period_us", "100000"),
                ("cpu/darkcore/k/cpu.cfs_quota_us", "150000"),
                ("memory/darkcore/k/memory.limit_in_bytes", "536870912"),
                ("pids/darkcore/k/pids.max", "4096"),
            ])
        );
        assert_eq!(
            written(&settings(Layout::Unified, "/darkcore/k", offer)),
            pairs(&[
                ("darkcore/k/cpu.max", "150000 100000"),
                ("darkcore/k/memory.max", "536870912"),
                ("darkcore/k/memory.swap.max", "0"),
                ("darkcore/k/pids.max", "4096"),
            ])
        );
    }

    #[test]
    fn no_offer_is_no_cap_but_processes_stay_bounded() {
        let open = Ceiling {
            millicores: 0,
            memory_bytes: 0,
        };
        let legacy = written(&settings(Layout::Legacy, "/darkcore/k", open));
        assert!(legacy.contains(&pairs(&[("cpu/darkcore/k/cpu.cfs_quota_us", "-1")])[0]));
        assert!(legacy.contains(&pairs(&[("pids/darkcore/k/pids.max", "4096")])[0]));
        let unified = written(&settings(Layout::Unified, "/darkcore/k", open));
        assert!(unified.contains(&pairs(&[("darkcore/k/cpu.max", "max 100000")])[0]));
    }

    #[test]
    fn agents_sharing_a_machine_get_parents_of_their_own() {
        let one = owner_cgroup_path(Path::new("/var/lib/darkcore"));
        let other = owner_cgroup_path(Path::new("/tmp/agent-2"));
        assert!(one.starts_with("/darkcore/") && one.len() == "/darkcore/".len() + 16);
        assert_ne!(one, other);
        assert_eq!(one, owner_cgroup_path(Path::new("/var/lib/darkcore")));
    }

    #[test]
    fn keyed_files_are_read_by_their_keys() {
        let cpu_stat = "usage_usec 1234567\nuser_usec 1000000\nsystem_usec 234567\n";
        assert_eq!(keyed(cpu_stat, "usage_usec"), Some(1_234_567));
        assert_eq!(keyed("user_usec 1\n", "usage_usec"), None);
        let v1 = "oom_kill_disable 0\nunder_oom 0\noom_kill 2\n";
        let v2 = "low 0\nhigh 0\nmax 4\noom 1\noom_kill 1\n";
        assert_eq!(keyed(v1, "oom_kill"), Some(2));
        assert_eq!(keyed(v2, "oom_kill"), Some(1));
        assert_eq!(keyed(v2, "max"), Some(4));
        assert_eq!(keyed("oom 1\n", "oom_kill"), None, "a key is a whole word");
        assert_eq!(keyed("oom_kill_disable 1\n", "oom_kill"), None);
        assert_eq!(number("42\n"), Some(42));
    }
}
