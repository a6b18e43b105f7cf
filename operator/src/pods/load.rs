//! What each device carries: the requests of the attempts it has not finished. Kept up to date
//! as attempts come, end and go, so placing a pod looks up its candidates instead of walking
//! every pod (a burst of n pods would otherwise cost n² steps).

use std::collections::HashMap;

/// The requests a device carries, and how many tasks.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Carried {
    pub millicores: u64,
    pub memory: u64,
    pub tasks: usize,
}

/// One attempt's share of its device's load.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Share<'a> {
    pub device: &'a str,
    pub millicores: u64,
    pub memory: u64,
}

#[derive(Debug, Default, PartialEq, Eq)]
pub struct Load {
    by_device: HashMap<String, Carried>,
}

impl Load {
    pub fn add(&mut self, share: Share<'_>) {
        let carried = self.by_device.entry(share.device.to_string()).or_default();
        carried.millicores += share.millicores;
        carried.memory += share.memory;
        carried.tasks += 1;
    }

    pub fn remove(&mut self, share: Share<'_>) {
        let Some(carried) = self.by_device.get_mut(share.device) else {
            return;
        };
        carried.millicores = carried.millicores.saturating_sub(share.millicores);
        carried.memory = carried.memory.saturating_sub(share.memory);
        carried.tasks = carried.tasks.saturating_sub(1);
        if carried.tasks == 0 {
            self.by_device.remove(share.device);
        }
    }

    /// What `device` carries now.
    pub fn of(&self, device: &str) -> Carried {
        self.by_device.get(device).copied().unwrap_or_default()
    }

    /// Changes `slot` through `change`, moving the share of what it held before (if counted)
    /// out of the load and the share of what it holds after (if counted) in.
    pub fn track<T, R>(
        &mut self,
        slot: &mut Option<T>,
        share: impl Fn(&T) -> Option<Share<'_>>,
        change: impl FnOnce(&mut Option<T>) -> R,
    ) -> R {
        if let Some(before) = slot.as_ref().and_then(&share) {
            self.remove(before);
        }
        let result = change(slot);
        if let Some(after) = slot.as_ref().and_then(&share) {
            self.add(after);
        }
        result
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn share(device: &str, millicores: u64) -> Share<'_> {
        Share {
            device,
            millicores,
            memory: millicores * 2,
        }
    }

    #[test]
    fn shares_add_up_per_device_and_leave_nothing_behind() {
        let mut load = Load::default();
        load.add(share("a", 100));
        load.add(share("a", 50));
        load.add(share("b", 10));
        assert_eq!(
            load.of("a"),
            Carried {
                millicores: 150,
                memory: 300,
                tasks: 2
            }
        );
        load.remove(share("a", 100));
        load.remove(share("a", 50));
        load.remove(share("b", 10));
        load.remove(share("c", 10));
        assert_eq!(load, Load::default());
    }

    /// A run that counts while it is not finished, as attempts do.
    struct Run {
        device: &'static str,
        millicores: u64,
        finished: bool,
    }

    fn counted(run: &Run) -> Option<Share<'_>> {
        (!run.finished).then_some(Share {
            device: run.device,
            millicores: run.millicores,
            memory: 0,
        })
    }

    #[test]
    fn tracking_follows_a_run_from_start_to_end_and_removal() {
        let mut load = Load::default();
        let mut slot = None;
        load.track(&mut slot, counted, |s| {
            *s = Some(Run {
                device: "a",
                millicores: 250,
                finished: false,
            })
        });
        assert_eq!(load.of("a").millicores, 250);
        load.track(&mut slot, counted, |s| {
            s.as_mut().expect("a run").finished = true
        });
        assert_eq!(load.of("a"), Carried::default());
        load.track(&mut slot, counted, |s| *s = None);
        assert_eq!(load, Load::default());

        // Taken away while still running (a lost device): its share goes with it.
        load.track(&mut slot, counted, |s| {
            *s = Some(Run {
                device: "b",
                millicores: 5,
                finished: false,
            })
        });
        let taken = load.track(&mut slot, counted, Option::take);
        assert!(taken.is_some());
        assert_eq!(load, Load::default());
    }
}
