//! The interface every runtime plugs into (process, oci, wasm): start one container of
//! a task from a prepared `Launch` (its image already pulled), then wait for it, signal it, or
//! kill it.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use darkcore_proto::agent::v1::Container;
use tokio::io::AsyncRead;

use crate::images::{Image, ImageStore};
use crate::tasks::mounts::MountSource;

/// Everything a runtime needs to start one container, already resolved by the operator and
/// laid out on disk by the agent.
#[derive(Clone, Debug)]
pub struct Launch {
    pub task_id: String,
    pub pod_name: String,
    pub container: Container,
    /// The task's private directory (0700): volumes and the container's scratch space.
    pub task_dir: PathBuf,
    /// Each mount's content, resolved inside its volume and held open while the container
    /// starts and runs.
    pub mounts: Vec<MountSource>,
    /// The container's image, pulled before the start, for runtimes that use images.
    pub image: Option<Image>,
    /// What the task's pool lets it reach (`TaskAssign.network`), before the owner narrows it.
    pub pool_network: i32,
}

/// What the owner offers: no container gets more, whatever its pod asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ceiling {
    pub millicores: u32,
    pub memory_bytes: u64,
}

impl Ceiling {
    /// A container's CPU: its limit capped by the offer, or the offer when it sets none.
    pub fn millicores(&self, limit: u32) -> u32 {
        capped(u64::from(limit), u64::from(self.millicores)) as u32
    }

    /// A container's memory: its limit capped by the offer, or the offer when it sets none.
    pub fn memory_bytes(&self, limit: u64) -> u64 {
        capped(limit, self.memory_bytes)
    }
}

/// `limit` (0: none) under `offer` (0: none).
fn capped(limit: u64, offer: u64) -> u64 {
    match (limit, offer) {
        (0, offer) => offer,
        (limit, 0) => limit,
        (limit, offer) => limit.min(offer),
    }
}

/// How a container run ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Exit {
    pub code: i32,
    /// Kubernetes' words: Completed, Error, OOMKilled, ...
    pub reason: String,
    pub message: String,
}

impl Exit {
    /// An exit code in Kubernetes' words: 0 is Completed, anything else Error. A signal is
    /// reported as 128 + its number, as shells and the kubelet do.
    pub fn from_code(code: i32) -> Exit {
        Exit {
            code,
            reason: if code == 0 { "Completed" } else { "Error" }.into(),
            message: String::new(),
        }
    }
}

/// One of a container's outputs (stdout or stderr), read by the log pumps.
pub type Output = Box<dyn AsyncRead + Send + Unpin>;

/// The stdout and stderr of a child process, for [`Workload::take_output`] (once: later calls
/// get `None`).
pub fn child_output(child: &mut tokio::process::Child) -> (Option<Output>, Option<Output>) {
    (
        child.stdout.take().map(|s| Box::new(s) as Output),
        child.stderr.take().map(|s| Box::new(s) as Output),
    )
}

/// Waits until `child` has exited, without reaping it, and reads the CPU time its processes
/// used from the zombie's /proc/<pid>/stat: its own time and that of every child it waited
/// for (a shell's commands, or runc's container). The caller then reaps it with `wait`.
/// `None` when the child is reaped already. A waiting thread is held per running container.
pub async fn cpu_at_exit(child: &tokio::process::Child) -> Option<Duration> {
    use rustix::process::{Pid, WaitId, WaitIdOptions, waitid};
    let pid = Pid::from_raw(i32::try_from(child.id()?).ok()?)?;
    tokio::task::spawn_blocking(move || {
        // WNOWAIT leaves the child a zombie, whose stat still holds its times.
        waitid(
            WaitId::Pid(pid),
            WaitIdOptions::EXITED | WaitIdOptions::NOWAIT,
        )
        .ok()?;
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", pid.as_raw_nonzero())).ok()?;
        let ticks = crate::sensors::parse_pid_stat(&stat)?;
        Some(crate::sensors::ticks_to_duration(
            ticks.own + ticks.reaped_children,
        ))
    })
    .await
    .ok()
    .flatten()
}

/// A container that is running.
#[tonic::async_trait]
pub trait Workload: Send {
    /// Its standard output and error, taken once for the log pumps.
    fn take_output(&mut self) -> (Option<Output>, Option<Output>);
    /// Waits until it ends.
    async fn wait(&mut self) -> Exit;
    /// The CPU time it used, complete once `wait` has returned. It is charged to the task's
    /// owner-facing usage record (`crate::usage`).
    fn cpu_used(&self) -> Duration;
    /// What reads its CPU and memory while it runs, for `kubectl top`; `None`: not known.
    fn meter(&self) -> Option<Arc<dyn crate::tasks::stats::Meter>> {
        None
    }
    /// How `kubectl exec` starts a command in it.
    fn entrance(&self) -> crate::tasks::enter::Entrance;
    /// Asks it to stop (SIGTERM or the runtime's equivalent).
    fn terminate(&mut self);
    /// Stops it now (SIGKILL or equivalent).
    fn kill(&mut self);
}

/// Why a container could not start; shown on the pod as waiting with this reason.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{reason}: {message}")]
pub struct StartError {
    /// Kubernetes' words: CreateContainerError, RunContainerError, CreateContainerConfigError.
    pub reason: &'static str,
    pub message: String,
}

/// A way of running containers on this device.
#[tonic::async_trait]
pub trait Runtime: Send + Sync {
    /// As pods and RuntimeClasses name it: process, oci, wasm.
    fn name(&self) -> &'static str;
    /// Where this runtime's images come from; `None` for a runtime that runs no image.
    fn images(&self) -> Option<Arc<ImageStore>> {
        None
    }
    async fn start(&self, launch: &Launch) -> Result<Box<dyn Workload>, StartError>;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pods_limits_are_capped_by_the_offer_never_raised_by_them() {
        let ceiling = Ceiling {
            millicores: 500,
            memory_bytes: 256 << 20,
        };
        assert_eq!(
            ceiling.millicores(4000),
            500,
            "4 CPUs asked, half a core offered"
        );
        assert_eq!(ceiling.millicores(200), 200);
        assert_eq!(ceiling.millicores(0), 500, "no limit: the offer");
        assert_eq!(ceiling.memory_bytes(2 << 30), 256 << 20);
        assert_eq!(ceiling.memory_bytes(64 << 20), 64 << 20);
        assert_eq!(ceiling.memory_bytes(0), 256 << 20);
        let open = Ceiling {
            millicores: 0,
            memory_bytes: 0,
        };
        assert_eq!((open.millicores(0), open.memory_bytes(7)), (0, 7));
    }
}
