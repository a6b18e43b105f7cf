//! The host ids containers run as: the subordinate range /etc/subuid and /etc/subgid reserve
//! for `darkcore` (the package adds it), cut into slots of 65536, one per running task, so that
//! uid 0 in a container is an unprivileged host uid no other task or user has.

use std::fs::File;
use std::path::{Path, PathBuf};

use super::rootfs::NAMESPACE_IDS;

/// The user whose subordinate ranges the agent uses.
pub const SUBID_USER: &str = "darkcore";
/// What the Debian package reserves: 64 slots from 2^31, far above the ranges `useradd`
/// hands out (from 100000, 65536 a user).
pub const PACKAGE_RANGE: &str = "darkcore:2147483648:4194304";
/// Where slots are locked, so that agents sharing a machine never hand out the same one.
const SLOT_LOCKS: &str = "/run/darkcore/id-slots";

/// A range of subordinate ids.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IdRange {
    pub start: u32,
    pub count: u32,
}

/// The first range `/etc/subuid`-style `text` gives `user` (`user:start:count` lines).
pub fn subordinate_range(text: &str, user: &str) -> Option<IdRange> {
    text.lines().find_map(|line| {
        let mut fields = line.trim().split(':');
        if fields.next()? != user {
            return None;
        }
        let start: u32 = fields.next()?.parse().ok()?;
        let count: u32 = fields.next()?.parse().ok()?;
        start.checked_add(count)?;
        Some(IdRange { start, count })
    })
}

/// The slots of this device's ranges.
#[derive(Clone, Debug)]
pub struct Slots {
    uids: IdRange,
    gids: IdRange,
    locks: PathBuf,
}

/// One task's ids, held until it is dropped.
#[derive(Debug)]
pub struct Slot {
    pub uid: u32,
    pub gid: u32,
    _lock: File,
}

impl Slots {
    /// The ranges /etc/subuid and /etc/subgid reserve for `darkcore`; why not, when they
    /// reserve none that holds a slot.
    pub fn of_this_device() -> Result<Slots, String> {
        let range = |file: &str| {
            let text = std::fs::read_to_string(file).unwrap_or_default();
            subordinate_range(&text, SUBID_USER)
                .filter(|r| r.count >= NAMESPACE_IDS)
                .ok_or_else(|| {
                    format!(
                        "{file} reserves no range of at least {NAMESPACE_IDS} ids for {SUBID_USER}, which containers run as: add the line {PACKAGE_RANGE} to /etc/subuid and /etc/subgid (the darkcore-agent package does)"
                    )
                })
        };
        Ok(Slots {
            uids: range("/etc/subuid")?,
            gids: range("/etc/subgid")?,
            locks: PathBuf::from(SLOT_LOCKS),
        })
    }

    /// How many tasks can run at once.
    pub fn count(&self) -> u32 {
        self.uids.count.min(self.gids.count) / NAMESPACE_IDS
    }

    /// A free slot, locked for the caller.
    pub fn take(&self) -> Result<Slot, String> {
        std::fs::create_dir_all(&self.locks)
            .map_err(|e| format!("creating {}: {e}", self.locks.display()))?;
        for index in 0..self.count() {
            let path = self.locks.join(index.to_string());
            let lock = lock(&path).map_err(|e| format!("locking {}: {e}", path.display()))?;
            if let Some(lock) = lock {
                return Ok(Slot {
                    uid: self.uids.start + index * NAMESPACE_IDS,
                    gid: self.gids.start + index * NAMESPACE_IDS,
                    _lock: lock,
                });
            }
        }
        Err(format!(
            "all {} id slots are in use by running containers: wait for one to end",
            self.count()
        ))
    }
}

/// An exclusive lock on `path`, or `None` when another holds it.
fn lock(path: &Path) -> std::io::Result<Option<File>> {
    use rustix::fs::{FlockOperation, flock};
    let file = File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)?;
    match flock(&file, FlockOperation::NonBlockingLockExclusive) {
        Ok(()) => Ok(Some(file)),
        Err(rustix::io::Errno::WOULDBLOCK) => Ok(None),
        Err(e) => Err(e.into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_range_is_read_for_darkcore_only() {
        let text = "alice:100000:65536\ndarkcore:2147483648:4194304\nbob:165536:65536\n";
        assert_eq!(
            subordinate_range(text, "darkcore"),
            Some(IdRange {
                start: 2_147_483_648,
                count: 4_194_304
            })
        );
        assert_eq!(subordinate_range(text, "dark"), None);
        assert_eq!(
            subordinate_range("darkcore:4294967295:2\n", "darkcore"),
            None
        );
        assert_eq!(subordinate_range("darkcore:x:1\n", "darkcore"), None);
        assert_eq!(
            subordinate_range(PACKAGE_RANGE, SUBID_USER).unwrap().count / NAMESPACE_IDS,
            64
        );
    }

    #[test]
    fn slots_are_handed_out_once_and_come_back_when_dropped() {
        let dir = crate::fresh_test_dir("id-slots");
        let range = IdRange {
            start: 1 << 20,
            count: 2 * NAMESPACE_IDS,
        };
        let slots = Slots {
            uids: range,
            gids: range,
            locks: dir,
        };
        let first = slots.take().unwrap();
        let second = slots.take().unwrap();
        assert_eq!(
            (first.uid, second.uid),
            (1 << 20, (1 << 20) + NAMESPACE_IDS)
        );
        assert!(slots.take().unwrap_err().contains("all 2 id slots"));
        drop(first);
        assert_eq!(slots.take().unwrap().uid, 1 << 20);
    }
}
