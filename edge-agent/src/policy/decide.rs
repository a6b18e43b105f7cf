//! The owner's policy applied to one snapshot of the host: may tasks run now, why (or why
//! not), and how much of the device they may use. Pure: sensors fill in the `Observation`.

use std::time::Duration;

use darkcore_proto::agent::v1::{Capabilities, Offer, Runtime};

use crate::policy::config::{OwnerPolicy, RuntimeName};
use crate::policy::schedule::{LocalTime, WEEKDAYS};

/// What the input sensor knows about the owner's keyboard and mouse.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum InputIdle {
    /// The last input was this long ago.
    Since(Duration),
    /// The device has no keyboard or mouse (a board, a set-top box): load alone decides.
    NoInputDevices,
    /// Input is not measured on this device: load alone decides, and the reason says so.
    NotMeasured,
}

/// What the sensors saw.
#[derive(Clone, Debug, PartialEq)]
pub struct Observation {
    pub now: LocalTime,
    pub input: InputIdle,
    /// CPU busy across all cores over the last sample (0.0 to 1.0) ...
    pub host_cpu_busy: f64,
    /// ... and the part of it that darkcore's own tasks used, which never counts against
    /// the owner (otherwise a busy task would make its own device "unavailable").
    pub task_cpu_busy: f64,
    /// `None` where no battery can be read.
    pub on_battery: Option<bool>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Decision {
    pub available: bool,
    /// For people: why the device is or is not giving now.
    pub reason: String,
    /// What tasks may use while available (computed either way, to show what it would give).
    pub offer: Offer,
}

pub fn decide(policy: &OwnerPolicy, caps: &Capabilities, obs: &Observation) -> Decision {
    let offer = offer(policy, caps);
    let unavailable = |reason: String| Decision {
        available: false,
        reason,
        offer: offer.clone(),
    };

    if obs.on_battery == Some(true) && !policy.run_on_battery {
        return unavailable(
            "running on battery (set policy.run_on_battery = true to give anyway)".into(),
        );
    }
    if !policy.schedule.allows(obs.now) {
        return unavailable(format!(
            "outside the allowed hours (today, {}: {})",
            WEEKDAYS[obs.now.weekday],
            policy.schedule.describe(obs.now.weekday)
        ));
    }
    let owner_cpu = (obs.host_cpu_busy - obs.task_cpu_busy).clamp(0.0, 1.0);
    if policy.idle.only_when_idle {
        let wanted = Duration::from_secs(u64::from(policy.idle.input_idle_minutes) * 60);
        if let InputIdle::Since(idle) = obs.input
            && idle < wanted
        {
            return unavailable(format!(
                "the owner used the keyboard or mouse {} ago (waiting for {} min without input)",
                human(idle),
                policy.idle.input_idle_minutes
            ));
        }
        if owner_cpu * 100.0 > f64::from(policy.idle.max_owner_cpu_percent) {
            return unavailable(format!(
                "the owner's programs use {:.0}% of the CPU (the policy allows tasks below {}%)",
                owner_cpu * 100.0,
                policy.idle.max_owner_cpu_percent
            ));
        }
    }
    if offer.millicores == 0 || offer.memory_bytes == 0 {
        return unavailable("the policy offers no cores or no memory".into());
    }
    if offer.runtimes.is_empty() {
        return unavailable(format!(
            "none of the allowed runtimes ({}) is installed on this device",
            policy
                .runtimes
                .iter()
                .map(|r| format!("{r:?}").to_lowercase())
                .collect::<Vec<_>>()
                .join(", ")
        ));
    }
    let input = match obs.input {
        InputIdle::Since(idle) => format!("no input for {}", human(idle)),
        InputIdle::NoInputDevices => "no input devices".into(),
        InputIdle::NotMeasured => "input not measured".into(),
    };
    Decision {
        available: true,
        reason: format!(
            "idle ({input}, the owner's programs use {:.0}% of the CPU, darkcore's tasks {:.0}%)",
            owner_cpu * 100.0,
            obs.task_cpu_busy.clamp(0.0, 1.0) * 100.0
        ),
        offer,
    }
}

/// A decision as the owner state sent to the operator.
pub fn to_owner_state(decision: &Decision) -> darkcore_proto::agent::v1::OwnerState {
    darkcore_proto::agent::v1::OwnerState {
        available: decision.available,
        reason: decision.reason.clone(),
        offer: Some(decision.offer.clone()),
    }
}

/// The share of the device the policy gives: its limits, capped by what the device has.
pub fn offer(policy: &OwnerPolicy, caps: &Capabilities) -> Offer {
    let device_millis = u64::from(caps.cores) * 1000;
    let default_cores = caps.cores.saturating_sub(1).max(1);
    let wanted_millis = match policy.max_cores {
        Some(cores) => (cores * 1000.0).round() as u64,
        None => u64::from(default_cores) * 1000,
    };
    let memory = policy.max_memory.map_or(caps.memory_bytes / 2, |m| m.0);
    let installed: Vec<Runtime> = caps
        .runtimes
        .iter()
        .filter_map(|r| Runtime::try_from(*r).ok())
        .collect();
    let mut runtimes: Vec<i32> = policy
        .runtimes
        .iter()
        .map(|r| to_proto(*r))
        .filter(|r| installed.contains(r))
        .map(|r| r as i32)
        .collect();
    runtimes.sort();
    runtimes.dedup();
    Offer {
        millicores: wanted_millis.min(device_millis) as u32,
        memory_bytes: memory.min(caps.memory_bytes),
        disk_bytes: if caps.disk_bytes == 0 {
            policy.max_disk.0
        } else {
            policy.max_disk.0.min(caps.disk_bytes)
        },
        runtimes,
    }
}

pub fn to_proto(runtime: RuntimeName) -> Runtime {
    match runtime {
        RuntimeName::Process => Runtime::Process,
        RuntimeName::Oci => Runtime::Oci,
        RuntimeName::Wasm => Runtime::Wasm,
    }
}

fn human(d: Duration) -> String {
    let secs = d.as_secs();
    if secs < 120 {
        format!("{secs} s")
    } else {
        format!("{} min", secs / 60)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::config::AgentConfig;
    use std::path::Path;

    fn caps() -> Capabilities {
        Capabilities {
            os: "linux".into(),
            arch: "amd64".into(),
            cores: 8,
            memory_bytes: 16 << 30,
            disk_bytes: 100 << 30,
            runtimes: vec![Runtime::Process as i32, Runtime::Oci as i32],
        }
    }

    fn quiet_evening() -> Observation {
        Observation {
            now: LocalTime {
                weekday: 2,
                minute: 22 * 60,
            },
            input: InputIdle::Since(Duration::from_secs(3600)),
            host_cpu_busy: 0.05,
            task_cpu_busy: 0.0,
            on_battery: Some(false),
        }
    }

    fn policy(toml: &str) -> OwnerPolicy {
        AgentConfig::parse(toml, Path::new("agent.toml"))
            .unwrap()
            .policy
    }

    #[test]
    fn an_idle_device_gives_what_the_default_policy_allows() {
        let d = decide(&OwnerPolicy::default(), &caps(), &quiet_evening());
        assert!(d.available, "{}", d.reason);
        assert_eq!(d.offer.millicores, 7000, "all cores but one");
        assert_eq!(d.offer.memory_bytes, 8 << 30, "half the memory");
        assert_eq!(
            d.offer.runtimes,
            [Runtime::Oci as i32],
            "wasm is not installed, process is not allowed"
        );
    }

    #[test]
    fn limits_cap_the_offer_and_never_exceed_the_device() {
        let d = decide(
            &policy("[policy]\nmax_cores = 2.5\nmax_memory = \"64Gi\"\n"),
            &caps(),
            &quiet_evening(),
        );
        assert_eq!(d.offer.millicores, 2500);
        assert_eq!(d.offer.memory_bytes, 16 << 30);
        let d = decide(
            &policy("[policy]\nmax_cores = 32\n"),
            &caps(),
            &quiet_evening(),
        );
        assert_eq!(d.offer.millicores, 8000);
    }

    #[test]
    fn recent_input_makes_the_device_unavailable_and_says_when() {
        let mut obs = quiet_evening();
        obs.input = InputIdle::Since(Duration::from_secs(90));
        let d = decide(&OwnerPolicy::default(), &caps(), &obs);
        assert!(!d.available);
        assert!(
            d.reason.contains("90 s ago") && d.reason.contains("10 min"),
            "{}",
            d.reason
        );
    }

    #[test]
    fn a_device_without_input_devices_is_judged_by_load_alone() {
        let mut obs = quiet_evening();
        obs.input = InputIdle::NoInputDevices;
        let d = decide(&OwnerPolicy::default(), &caps(), &obs);
        assert!(
            d.available && d.reason.contains("no input devices"),
            "{}",
            d.reason
        );
        obs.host_cpu_busy = 0.8;
        let d = decide(&OwnerPolicy::default(), &caps(), &obs);
        assert!(!d.available && d.reason.contains("80%"), "{}", d.reason);
    }

    #[test]
    fn the_tasks_own_cpu_never_counts_against_the_owner() {
        let mut obs = quiet_evening();
        obs.host_cpu_busy = 0.9;
        obs.task_cpu_busy = 0.85;
        assert!(decide(&OwnerPolicy::default(), &caps(), &obs).available);
    }

    #[test]
    fn outside_the_schedule_the_device_rests_and_names_todays_hours() {
        let p = policy("[policy.schedule]\nweekdays = [\"21:00-07:00\"]\n");
        let mut obs = quiet_evening();
        obs.now.minute = 12 * 60;
        let d = decide(&p, &caps(), &obs);
        assert!(!d.available);
        assert!(d.reason.contains("wednesday: 21:00-07:00"), "{}", d.reason);
        obs.now.minute = 23 * 60;
        assert!(decide(&p, &caps(), &obs).available);
    }

    #[test]
    fn battery_stops_giving_unless_allowed() {
        let mut obs = quiet_evening();
        obs.on_battery = Some(true);
        assert!(!decide(&OwnerPolicy::default(), &caps(), &obs).available);
        assert!(decide(&policy("[policy]\nrun_on_battery = true\n"), &caps(), &obs).available);
        obs.on_battery = None;
        assert!(
            decide(&OwnerPolicy::default(), &caps(), &obs).available,
            "no battery to read"
        );
    }

    #[test]
    fn idle_rules_can_be_switched_off() {
        let mut obs = quiet_evening();
        obs.input = InputIdle::Since(Duration::from_secs(1));
        obs.host_cpu_busy = 0.99;
        assert!(
            decide(
                &policy("[policy.idle]\nonly_when_idle = false\n"),
                &caps(),
                &obs
            )
            .available
        );
    }

    #[test]
    fn no_installed_allowed_runtime_means_unavailable_with_the_reason() {
        let p = policy("[policy]\nruntimes = [\"wasm\"]\n");
        let d = decide(&p, &caps(), &quiet_evening());
        assert!(
            !d.available && d.reason.contains("(wasm) is installed"),
            "{}",
            d.reason
        );
    }

    #[test]
    fn process_is_given_only_when_the_owner_lists_it() {
        let d = decide(
            &policy("[policy]\nruntimes = [\"process\", \"oci\"]\n"),
            &caps(),
            &quiet_evening(),
        );
        assert_eq!(
            d.offer.runtimes,
            [Runtime::Process as i32, Runtime::Oci as i32]
        );
    }
}

#[cfg(test)]
mod unmeasured_input {
    use super::*;

    #[test]
    fn unmeasured_input_leaves_load_to_decide_and_says_so() {
        let caps = Capabilities {
            cores: 2,
            memory_bytes: 1 << 30,
            runtimes: vec![Runtime::Oci as i32],
            ..Default::default()
        };
        let obs = Observation {
            now: LocalTime {
                weekday: 0,
                minute: 0,
            },
            input: InputIdle::NotMeasured,
            host_cpu_busy: 0.0,
            task_cpu_busy: 0.0,
            on_battery: None,
        };
        let d = decide(&OwnerPolicy::default(), &caps, &obs);
        assert!(
            d.available && d.reason.contains("input not measured"),
            "{}",
            d.reason
        );
    }
}
