//! Reading the host for the owner policy: CPU busy from /proc/stat, the CPU of the agent's
//! tasks from /proc/<pid>/stat, and battery state from /sys/class/power_supply. Parsing is
//! pure and tested; only `read_*` touch the system.

use std::path::Path;
use std::time::Duration;

/// Cumulative CPU time from the first line of /proc/stat, in clock ticks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CpuTimes {
    pub busy: u64,
    pub total: u64,
}

/// The aggregate `cpu` line of /proc/stat. Idle time is `idle` plus `iowait`.
pub fn parse_proc_stat(text: &str) -> Option<CpuTimes> {
    let line = text.lines().find(|l| l.starts_with("cpu "))?;
    let fields: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .map(|f| f.parse().ok())
        .collect::<Option<_>>()?;
    if fields.len() < 4 {
        return None;
    }
    // user nice system idle iowait irq softirq steal; guest time is already in user.
    let total: u64 = fields.iter().take(8).sum();
    let idle = fields[3] + fields.get(4).copied().unwrap_or(0);
    Some(CpuTimes {
        busy: total - idle,
        total,
    })
}

/// The fraction of all cores that was busy between two samples (0.0 to 1.0).
pub fn busy_fraction(before: CpuTimes, after: CpuTimes) -> f64 {
    share_of(after.busy.saturating_sub(before.busy), before, after)
}

/// `ticks` as a fraction of all cores' ticks between two samples (0.0 to 1.0).
pub fn share_of(ticks: u64, before: CpuTimes, after: CpuTimes) -> f64 {
    let total = after.total.saturating_sub(before.total);
    if total == 0 {
        return 0.0;
    }
    (ticks as f64 / total as f64).min(1.0)
}

/// Samples /proc/stat twice, `over` apart.
pub fn read_cpu_busy(over: Duration) -> std::io::Result<f64> {
    let read = || -> std::io::Result<CpuTimes> {
        let text = std::fs::read_to_string("/proc/stat")?;
        parse_proc_stat(&text)
            .ok_or_else(|| std::io::Error::other("/proc/stat has no aggregate cpu line"))
    };
    let before = read()?;
    std::thread::sleep(over);
    Ok(busy_fraction(before, read()?))
}

/// A process's line of /proc/<pid>/stat: its parent, its CPU ticks (user + system) spent
/// by itself and by the children it has reaped, and its resident memory.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ProcessTicks {
    pub pid: i32,
    pub ppid: i32,
    pub own: u64,
    pub reaped_children: u64,
    /// Resident set, in pages.
    pub rss_pages: u64,
}

/// Parses /proc/<pid>/stat. The command name may hold spaces and parentheses, so fields are
/// counted from the last `)`.
pub fn parse_pid_stat(text: &str) -> Option<ProcessTicks> {
    let (head, tail) = text.rsplit_once(')')?;
    let pid = head.split_whitespace().next()?.parse().ok()?;
    let fields: Vec<&str> = tail.split_whitespace().collect();
    let number = |i: usize| fields.get(i)?.parse::<u64>().ok();
    Some(ProcessTicks {
        pid,
        ppid: fields.get(1)?.parse().ok()?,
        own: number(11)? + number(12)?,
        reaped_children: number(13)? + number(14)?,
        rss_pages: number(21).unwrap_or(0),
    })
}

/// The living descendants of `root` (not `root` itself).
fn descendants(root: i32, processes: &[ProcessTicks]) -> Vec<&ProcessTicks> {
    let mut found = Vec::new();
    let mut parents = vec![root];
    while let Some(parent) = parents.pop() {
        for p in processes
            .iter()
            .filter(|p| p.ppid == parent && p.pid != root)
        {
            found.push(p);
            parents.push(p.pid);
        }
    }
    found
}

/// `root`'s own line, if it is still there.
fn process(root: i32, processes: &[ProcessTicks]) -> Option<&ProcessTicks> {
    processes.iter().find(|p| p.pid == root)
}

/// CPU ticks used by everything `root` started: its reaped children, and every living
/// descendant with what that descendant reaped. A descendant's ticks move to its parent's
/// reaped count when it ends, so the sum only grows (unless a descendant is orphaned).
pub fn descendant_ticks(root: i32, processes: &[ProcessTicks]) -> u64 {
    let living: u64 = descendants(root, processes)
        .iter()
        .map(|p| p.own + p.reaped_children)
        .sum();
    living + process(root, processes).map_or(0, |p| p.reaped_children)
}

/// Clock ticks (as /proc counts CPU time) as a duration.
pub fn ticks_to_duration(ticks: u64) -> Duration {
    let per_second = rustix::param::clock_ticks_per_second().max(1);
    Duration::from_nanos(ticks.saturating_mul(1_000_000_000) / per_second)
}

/// The resident pages of `root` and every living descendant of it.
pub fn tree_rss_pages(root: i32, processes: &[ProcessTicks]) -> u64 {
    let below: u64 = descendants(root, processes)
        .iter()
        .map(|p| p.rss_pages)
        .sum();
    below + process(root, processes).map_or(0, |p| p.rss_pages)
}

/// Every process's line of /proc/<pid>/stat.
pub fn read_processes() -> Vec<ProcessTicks> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter(|e| {
            e.file_name()
                .to_str()
                .is_some_and(|n| n.bytes().all(|b| b.is_ascii_digit()))
        })
        .filter_map(|e| parse_pid_stat(&std::fs::read_to_string(e.path().join("stat")).ok()?))
        .collect()
}

/// The CPU ticks of everything this process started (its tasks), read from /proc.
pub fn read_task_ticks() -> u64 {
    descendant_ticks(std::process::id() as i32, &read_processes())
}

/// One entry of /sys/class/power_supply: its `type`, and `status` or `online`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PowerSupply {
    pub kind: String,
    pub status: Option<String>,
    pub online: Option<bool>,
}

/// Whether the device runs on battery: `None` where it has no battery to read.
pub fn on_battery(supplies: &[PowerSupply]) -> Option<bool> {
    let batteries: Vec<&PowerSupply> = supplies.iter().filter(|s| s.kind == "Battery").collect();
    if batteries.is_empty() {
        return None;
    }
    if supplies
        .iter()
        .any(|s| s.kind == "Mains" && s.online == Some(true))
    {
        return Some(false);
    }
    Some(
        batteries
            .iter()
            .any(|b| b.status.as_deref() == Some("Discharging")),
    )
}

pub fn read_power_supplies(root: &Path) -> Vec<PowerSupply> {
    let Ok(entries) = std::fs::read_dir(root) else {
        return Vec::new();
    };
    let field = |dir: &Path, name: &str| {
        std::fs::read_to_string(dir.join(name))
            .ok()
            .map(|s| s.trim().to_string())
    };
    entries
        .flatten()
        .filter_map(|entry| {
            let dir = entry.path();
            Some(PowerSupply {
                kind: field(&dir, "type")?,
                status: field(&dir, "status"),
                online: field(&dir, "online").map(|o| o == "1"),
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proc_stat_gives_busy_and_total_ticks() {
        let text = "cpu  100 5 50 800 20 3 2 0 0 0\ncpu0 50 2 25 400 10 1 1 0 0 0\n";
        assert_eq!(
            parse_proc_stat(text),
            Some(CpuTimes {
                busy: 160,
                total: 980
            })
        );
        assert_eq!(parse_proc_stat("intr 1 2 3\n"), None);
    }

    #[test]
    fn busy_fraction_is_the_share_of_ticks_spent_busy() {
        let before = CpuTimes {
            busy: 100,
            total: 1000,
        };
        let after = CpuTimes {
            busy: 150,
            total: 1200,
        };
        assert_eq!(busy_fraction(before, after), 0.25);
        assert_eq!(busy_fraction(after, after), 0.0);
    }

    #[test]
    fn pid_stat_gives_parent_and_ticks_even_with_odd_command_names() {
        let text = "4242 (my (odd) cmd) S 17 4242 4242 0 -1 4194304 100 0 0 0 30 12 5 3 20 0 1 0 99 1000 50 18446744073709551615\n";
        assert_eq!(
            parse_pid_stat(text),
            Some(ProcessTicks {
                pid: 4242,
                ppid: 17,
                own: 42,
                reaped_children: 8,
                rss_pages: 50,
            })
        );
        assert_eq!(parse_pid_stat("4242 (truncated) S 17 1 2"), None);
    }

    #[test]
    fn descendant_ticks_sum_the_tree_below_the_agent_and_what_it_reaped() {
        let p = |pid, ppid, own, reaped_children| ProcessTicks {
            pid,
            ppid,
            own,
            reaped_children,
            rss_pages: own,
        };
        let processes = [
            p(1, 0, 1000, 0),
            p(10, 1, 500, 7), // the agent: its own ticks are not its tasks'
            p(11, 10, 30, 2), // a task's shell
            p(12, 11, 40, 0), // the shell's child
            p(13, 10, 5, 0),  // another task
            p(20, 1, 900, 0), // the owner's program
        ];
        assert_eq!(descendant_ticks(10, &processes), 7 + 32 + 40 + 5);
        assert_eq!(descendant_ticks(99, &processes), 0);
        assert_eq!(
            tree_rss_pages(11, &processes),
            30 + 40,
            "a task's shell and its child"
        );
        assert_eq!(tree_rss_pages(99, &processes), 0);
    }

    fn supply(kind: &str, status: Option<&str>, online: Option<bool>) -> PowerSupply {
        PowerSupply {
            kind: kind.into(),
            status: status.map(Into::into),
            online,
        }
    }

    #[test]
    fn a_discharging_battery_without_mains_is_on_battery() {
        assert_eq!(
            on_battery(&[supply("Battery", Some("Discharging"), None)]),
            Some(true)
        );
        let plugged = [
            supply("Battery", Some("Discharging"), None),
            supply("Mains", None, Some(true)),
        ];
        assert_eq!(on_battery(&plugged), Some(false));
        assert_eq!(
            on_battery(&[supply("Battery", Some("Charging"), None)]),
            Some(false)
        );
    }

    #[test]
    fn no_battery_means_unknown() {
        assert_eq!(on_battery(&[supply("Mains", None, Some(true))]), None);
        assert_eq!(on_battery(&[]), None);
    }

    #[test]
    fn this_machine_can_be_read() {
        let busy = read_cpu_busy(Duration::from_millis(50)).unwrap();
        assert!((0.0..=1.0).contains(&busy));
    }
}
