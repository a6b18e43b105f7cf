//! Keyboard and mouse idle time, from the kernel's input devices (/dev/input/event*). One
//! blocked thread per keyboard or pointer notes when an event arrives: no CPU while the owner
//! is away, and the events are only read (never grabbed), so the owner's input is untouched.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::policy::InputIdle;

/// Event types in `capabilities/ev` (a hex bitmask): keys, relative and absolute axes, and
/// autorepeat, which keyboards have and power buttons do not.
const EV_KEY: u64 = 1 << 0x01;
const EV_REL: u64 = 1 << 0x02;
const EV_ABS: u64 = 1 << 0x03;
const EV_REP: u64 = 1 << 0x14;

/// Whether an input device with this `capabilities/ev` mask is one a person types or points
/// with: keys plus a pointer axis (mouse, touchpad) or autorepeat (keyboard).
pub fn is_human_input(ev_mask_hex: &str) -> bool {
    let Ok(mask) = u64::from_str_radix(ev_mask_hex.trim(), 16) else {
        return false;
    };
    mask & EV_KEY != 0 && mask & (EV_REL | EV_ABS | EV_REP) != 0
}

/// What the agent knows about input on this machine.
pub enum InputSensor {
    /// Keyboards or pointers are watched; seconds since the epoch of the last event (0: none
    /// since the agent started, which counts from the start).
    Watching {
        last_event: Arc<AtomicU64>,
        started: u64,
    },
    /// No keyboard or mouse: CPU load alone decides.
    NoDevices,
    /// There are input devices the agent may not read (run it as root or in group `input`).
    Unreadable,
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

impl InputSensor {
    /// Finds the keyboards and pointers under `sys_input` (normally /sys/class/input) and
    /// starts a reader for each that can be opened.
    pub fn start(sys_input: &Path, dev_input: &Path) -> InputSensor {
        let devices = human_input_devices(sys_input, dev_input);
        if devices.is_empty() {
            return InputSensor::NoDevices;
        }
        let last_event = Arc::new(AtomicU64::new(0));
        let mut watching = 0;
        for path in devices {
            let Ok(file) = std::fs::File::open(&path) else {
                continue;
            };
            let last_event = last_event.clone();
            let spawned = std::thread::Builder::new()
                .name("input".into())
                .stack_size(64 * 1024)
                .spawn(move || read_events(file, &last_event));
            if spawned.is_ok() {
                watching += 1;
            }
        }
        if watching == 0 {
            return InputSensor::Unreadable;
        }
        InputSensor::Watching {
            last_event,
            started: now_secs(),
        }
    }

    pub fn idle(&self) -> InputIdle {
        match self {
            InputSensor::Watching {
                last_event,
                started,
            } => {
                let last = last_event.load(Ordering::Relaxed).max(*started);
                InputIdle::Since(Duration::from_secs(now_secs().saturating_sub(last)))
            }
            InputSensor::NoDevices => InputIdle::NoInputDevices,
            InputSensor::Unreadable => InputIdle::NotMeasured,
        }
    }
}

fn human_input_devices(sys_input: &Path, dev_input: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(sys_input) else {
        return Vec::new();
    };
    let mut devices: Vec<PathBuf> = entries
        .flatten()
        .filter_map(|entry| {
            let name = entry.file_name().to_string_lossy().into_owned();
            if !name.starts_with("event") {
                return None;
            }
            let mask = std::fs::read_to_string(entry.path().join("device/capabilities/ev")).ok()?;
            is_human_input(&mask).then(|| dev_input.join(&name))
        })
        .collect();
    devices.sort();
    devices
}

/// Blocks on the device and stamps the time of every event; ends if the device goes away.
fn read_events(mut file: std::fs::File, last_event: &AtomicU64) {
    let mut buf = [0u8; 24 * 16];
    while let Ok(n) = file.read(&mut buf) {
        if n == 0 {
            return;
        }
        last_event.store(now_secs(), Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keyboards_and_mice_count_and_buttons_do_not() {
        assert!(
            is_human_input("120013"),
            "a keyboard: syn, key, msc, led, rep"
        );
        assert!(is_human_input("17"), "a mouse: syn, key, rel, msc");
        assert!(is_human_input("b"), "a touchpad: syn, key, abs");
        assert!(!is_human_input("3"), "a power button: syn, key");
        assert!(!is_human_input("21"), "a lid switch: syn, sw");
        assert!(!is_human_input("not hex"));
    }

    #[test]
    fn a_machine_without_input_devices_is_judged_by_load() {
        let sensor = InputSensor::start(Path::new("/nonexistent/sys"), Path::new("/dev/input"));
        assert!(matches!(sensor.idle(), InputIdle::NoInputDevices));
    }

    #[test]
    fn input_devices_are_found_by_their_capabilities() {
        let root = std::env::temp_dir().join(format!("darkcore-input-{}", std::process::id()));
        for (name, mask) in [("event0", "3"), ("event1", "120013"), ("mouse0", "17")] {
            let caps = root.join(name).join("device/capabilities");
            std::fs::create_dir_all(&caps).unwrap();
            std::fs::write(caps.join("ev"), format!("{mask}\n")).unwrap();
        }
        let found = human_input_devices(&root, Path::new("/dev/input"));
        assert_eq!(found, [PathBuf::from("/dev/input/event1")]);
        std::fs::remove_dir_all(&root).unwrap();
    }
}
