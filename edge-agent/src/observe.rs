//! Reads the sensors into an `Observation` and applies the owner's policy to it. CPU load is
//! measured between two checks from /proc/stat, less what the agent's own tasks used (from
//! /proc/<pid>/stat), so a busy task never makes its device look busy; keyboard and mouse
//! idle time comes from `input`.

use std::path::Path;
use std::time::Duration;

use darkcore_proto::agent::v1::Capabilities;

use crate::input::InputSensor;
use crate::policy::schedule::LocalTime;
use crate::policy::{AgentConfig, Decision, InputIdle, Observation, decide};
use crate::sensors::{self, CpuTimes};

pub struct PolicyMonitor {
    pub config: AgentConfig,
    pub capabilities: Capabilities,
    last_cpu: Option<CpuTimes>,
    /// Ticks of the agent's tasks: at the last check, and when the agent started.
    last_task_ticks: u64,
    first_task_ticks: u64,
    input: InputSensor,
}

impl PolicyMonitor {
    pub fn new(config: AgentConfig, capabilities: Capabilities) -> PolicyMonitor {
        PolicyMonitor {
            config,
            capabilities,
            last_cpu: read_cpu(),
            last_task_ticks: sensors::read_task_ticks(),
            first_task_ticks: sensors::read_task_ticks(),
            input: InputSensor::start(Path::new("/sys/class/input"), Path::new("/dev/input")),
        }
    }

    /// Takes a first CPU sample and waits a moment, so the first decision has a load to
    /// judge by.
    pub async fn prime(&mut self) {
        self.last_cpu = read_cpu();
        self.last_task_ticks = sensors::read_task_ticks();
        tokio::time::sleep(Duration::from_millis(250)).await;
    }

    /// How often the policy is applied.
    pub fn interval(&self) -> Duration {
        Duration::from_secs(u64::from(self.config.policy.check_seconds))
    }

    /// Reads the sensors and decides.
    pub fn check(&mut self) -> Decision {
        let now_cpu = read_cpu();
        let task_ticks = sensors::read_task_ticks();
        let (host_cpu_busy, task_cpu_busy) = match (self.last_cpu, now_cpu) {
            (Some(before), Some(after)) => (
                sensors::busy_fraction(before, after),
                sensors::share_of(
                    task_ticks.saturating_sub(self.last_task_ticks),
                    before,
                    after,
                ),
            ),
            _ => (0.0, 0.0),
        };
        self.last_cpu = now_cpu;
        self.last_task_ticks = task_ticks;
        let observation = Observation {
            now: LocalTime::now(),
            input: self.input(),
            host_cpu_busy,
            task_cpu_busy,
            on_battery: sensors::on_battery(&sensors::read_power_supplies(Path::new(
                "/sys/class/power_supply",
            ))),
        };
        decide(&self.config.policy, &self.capabilities, &observation)
    }

    /// CPU time the agent's tasks have used since it started, in core-seconds (as of the
    /// last check).
    pub fn core_seconds_given(&self) -> f64 {
        sensors::ticks_to_duration(self.last_task_ticks.saturating_sub(self.first_task_ticks))
            .as_secs_f64()
    }

    fn input(&self) -> InputIdle {
        match &self.config.testing.owner_active_file {
            Some(file) if file.exists() => InputIdle::Since(Duration::ZERO),
            _ => self.input.idle(),
        }
    }
}

fn read_cpu() -> Option<CpuTimes> {
    sensors::parse_proc_stat(&std::fs::read_to_string("/proc/stat").ok()?)
}
