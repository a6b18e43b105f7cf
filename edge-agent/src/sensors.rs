//! Reading the host for the owner policy: CPU busy from /proc/stat and battery state from
//! /sys/class/power_supply. Parsing is pure and tested; only `read_*` touch the system.

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
    let total = after.total.saturating_sub(before.total);
    if total == 0 {
        return 0.0;
    }
    after.busy.saturating_sub(before.busy) as f64 / total as f64
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
