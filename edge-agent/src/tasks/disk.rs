//! What tasks hold on disk, measured at every policy check, and whom that evicts: a task whose
//! emptyDir passes its `sizeLimit`, and, while all tasks together hold more than the owner's
//! `max_disk` leaves beside the image cache, the running task that holds the most.

use std::path::Path;

use crate::tasks::workdir::disk_used;

/// One task's emptyDir: what it holds and its `sizeLimit` (0: none).
#[derive(Debug, Clone, PartialEq)]
pub struct VolumeHeld {
    pub name: String,
    pub used: u64,
    pub limit: u64,
}

/// What one task's directory holds: its roots and volumes.
#[derive(Debug, Clone, PartialEq)]
pub struct Held {
    pub task_id: String,
    pub total: u64,
    pub volumes: Vec<VolumeHeld>,
    /// Still running: a finished task's files still count until it is released, but
    /// evicting it would free nothing.
    pub running: bool,
}

/// A task to stop, and the message its pod shows (reason `Evicted`).
#[derive(Debug, Clone, PartialEq)]
pub struct Eviction {
    pub task_id: String,
    pub message: String,
}

/// A task the watch measures: its emptyDirs with their `sizeLimit`s (0: none), and whether
/// it still runs.
#[derive(Debug, Clone, PartialEq)]
pub struct Watched {
    pub task_id: String,
    pub volume_limits: Vec<(String, u64)>,
    pub running: bool,
}

/// Measures a task's directory under `tasks_root`. No walk counts past `bound` (a task
/// holding that much is evicted whatever its exact size).
pub fn measure(task: &Watched, tasks_root: &Path, bound: u64) -> Held {
    let dir = tasks_root.join(&task.task_id);
    let volumes = task
        .volume_limits
        .iter()
        .filter(|(_, limit)| *limit > 0)
        .map(|(name, limit)| VolumeHeld {
            name: name.clone(),
            used: disk_used(&dir.join("volumes").join(name), limit.saturating_add(1)),
            limit: *limit,
        })
        .collect();
    Held {
        task_id: task.task_id.clone(),
        total: disk_used(&dir, bound),
        volumes,
        running: task.running,
    }
}

/// Whom to evict, given what tasks hold and the `room` the owner's `max_disk` leaves them.
pub fn evictions(held: &[Held], room: u64) -> Vec<Eviction> {
    let mut evicted: Vec<Eviction> = held
        .iter()
        .filter(|h| h.running)
        .filter_map(|h| {
            let over = h.volumes.iter().find(|v| v.limit > 0 && v.used > v.limit)?;
            Some(Eviction {
                task_id: h.task_id.clone(),
                message: format!(
                    "Usage of EmptyDir volume {:?} exceeds the limit {:?}.",
                    over.name,
                    size(over.limit)
                ),
            })
        })
        .collect();
    let all: u64 = held.iter().fold(0, |sum, h| sum.saturating_add(h.total));
    let named = |id: &str, evicted: &[Eviction]| evicted.iter().any(|e| e.task_id == id);
    let mut left = held
        .iter()
        .filter(|h| named(&h.task_id, &evicted))
        .fold(all, |left, h| left.saturating_sub(h.total));
    let mut candidates: Vec<&Held> = held
        .iter()
        .filter(|h| h.running && !named(&h.task_id, &evicted))
        .collect();
    candidates.sort_by(|a, b| b.total.cmp(&a.total).then(a.task_id.cmp(&b.task_id)));
    for h in candidates {
        if left <= room {
            break;
        }
        left = left.saturating_sub(h.total);
        evicted.push(Eviction {
            task_id: h.task_id.clone(),
            message: format!(
                "The device was low on disk: its owner's max_disk leaves tasks {}, and they held \
                 {}; this task held the most ({}).",
                size(room),
                size(all),
                size(h.total)
            ),
        });
    }
    evicted
}

/// Bytes as a person reads them, in binary units (`44.0Mi`).
fn size(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["Ki", "Mi", "Gi", "Ti", "Pi"];
    if bytes < 1024 {
        return format!("{bytes}");
    }
    let mut value = bytes as f64 / 1024.0;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    format!("{value:.1}{}", UNITS[unit])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn held(id: &str, total: u64, volumes: &[(u64, u64)], running: bool) -> Held {
        Held {
            task_id: id.into(),
            total,
            volumes: volumes
                .iter()
                .enumerate()
                .map(|(i, (used, limit))| VolumeHeld {
                    name: format!("v{i}"),
                    used: *used,
                    limit: *limit,
                })
                .collect(),
            running,
        }
    }

    #[test]
    fn a_volume_past_its_size_limit_evicts_its_task_alone() {
        let tasks = [
            held("a", 3 << 20, &[(2 << 20, 1 << 20)], true),
            held("b", 9 << 20, &[(8 << 20, 0)], true),
        ];
        let evicted = evictions(&tasks, 100 << 20);
        assert_eq!(evicted.len(), 1);
        assert_eq!(evicted[0].task_id, "a");
        assert_eq!(
            evicted[0].message,
            "Usage of EmptyDir volume \"v0\" exceeds the limit \"1.0Mi\"."
        );
        // At the limit is still within it.
        assert!(evictions(&[held("a", 1 << 20, &[(1 << 20, 1 << 20)], true)], 1 << 30).is_empty());
    }

    #[test]
    fn over_the_room_the_largest_running_tasks_go_until_the_rest_fits() {
        let tasks = [
            held("small", 10, &[], true),
            held("big", 60, &[], true),
            held("middle", 40, &[], true),
            held("done", 30, &[], false),
        ];
        // 140 held, room 90: the big one goes (80 left); that is enough.
        let evicted = evictions(&tasks, 90);
        let ids: Vec<_> = evicted.iter().map(|e| e.task_id.as_str()).collect();
        assert_eq!(ids, ["big"]);
        assert!(
            evicted[0].message.contains("max_disk"),
            "{}",
            evicted[0].message
        );
        // Room 50: big and middle go; a finished task is never picked (nothing to stop).
        let ids: Vec<_> = evictions(&tasks, 50)
            .into_iter()
            .map(|e| e.task_id)
            .collect();
        assert_eq!(ids, ["big", "middle"]);
        assert!(evictions(&tasks, 140).is_empty());
    }

    #[test]
    fn a_task_evicted_for_its_volume_is_not_named_twice_and_frees_its_share() {
        let tasks = [held("a", 100, &[(90, 50)], true), held("b", 10, &[], true)];
        let evicted = evictions(&tasks, 50);
        assert_eq!(evicted.len(), 1, "{evicted:?}");
        assert!(evicted[0].message.contains("EmptyDir"));
        // The small one goes for its volume; what it frees leaves the big one within room.
        let tasks = [
            held("big", 60, &[], true),
            held("small", 20, &[(20, 5)], true),
        ];
        let ids: Vec<_> = evictions(&tasks, 70)
            .into_iter()
            .map(|e| e.task_id)
            .collect();
        assert_eq!(ids, ["small"]);
    }

    #[test]
    fn sizes_read_in_binary_units() {
        assert_eq!(size(512), "512");
        assert_eq!(size(44 << 20), "44.0Mi");
        assert_eq!(size(3 << 29), "1.5Gi");
    }

    #[test]
    fn measuring_counts_the_task_and_its_limited_volumes() {
        let root = crate::fresh_test_dir("disk-measure");
        let dir = root.join("t");
        std::fs::create_dir_all(dir.join("volumes/data")).unwrap();
        std::fs::write(dir.join("volumes/data/f"), vec![0u8; 4096]).unwrap();
        let task = Watched {
            task_id: "t".into(),
            volume_limits: vec![("data".into(), 1000), ("open".into(), 0)],
            running: true,
        };
        let held = measure(&task, &root, u64::MAX);
        assert_eq!(
            held.volumes.len(),
            1,
            "a volume without a limit is not walked twice"
        );
        assert!(held.volumes[0].used > 1000, "{held:?}");
        assert!(held.total > held.volumes[0].used, "{held:?}");
    }
}
