//! The `process` runtime: a container's command runs as a plain process of the agent's user,
//! in its own process group. For trusted fleets only: it isolates nothing (see the README).
//!
//! Volumes cannot be mounted without privileges, so each mount appears under the task's root
//! (`$DARKCORE_TASK_ROOT` + mountPath), which is also the default working directory.

use std::os::unix::process::ExitStatusExt;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use rustix::process::{Pid, Signal, kill_process_group};
use tokio::process::{Child, Command};

use crate::tasks::enter::Entrance;
use crate::tasks::runtime::{Exit, Launch, Output, Runtime, StartError, Workload, cpu_at_exit};
use crate::tasks::stats::{Meter, Sample};
use crate::tasks::workdir::under_root;

/// The PATH a task gets when its pod sets none.
const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

pub struct ProcessRuntime;

/// The task root of a launch: what `$DARKCORE_TASK_ROOT` names.
pub fn task_root(launch: &Launch) -> PathBuf {
    launch.task_dir.join("root")
}

#[tonic::async_trait]
impl Runtime for ProcessRuntime {
    fn name(&self) -> &'static str {
        "process"
    }

    async fn start(&self, launch: &Launch) -> Result<Box<dyn Workload>, StartError> {
        let container = &launch.container;
        let config_error = |message: String| StartError {
            reason: "CreateContainerConfigError",
            message,
        };
        let Some((program, leading)) = container.command.split_first() else {
            return Err(config_error(format!(
                "container {:?} has no command: the process runtime runs the command on the device and does not pull the image",
                container.name
            )));
        };
        let root = task_root(launch);
        let workdir = match container.working_dir.as_str() {
            "" => root.clone(),
            dir => under_root(&root, dir).map_err(config_error)?,
        };
        std::fs::create_dir_all(&workdir).map_err(|e| StartError {
            reason: "CreateContainerError",
            message: format!("creating the working directory {}: {e}", workdir.display()),
        })?;
        let root_text = root.to_string_lossy().into_owned();
        let env: Vec<(String, String)> = [
            ("PATH", DEFAULT_PATH),
            ("HOSTNAME", launch.pod_name.as_str()),
            ("HOME", root_text.as_str()),
            ("DARKCORE_TASK_ROOT", root_text.as_str()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .chain(
            container
                .env
                .iter()
                .map(|e| (e.name.clone(), e.value.clone())),
        )
        .collect();
        let mut command = Command::new(program);
        command
            .args(leading)
            .args(&container.args)
            .env_clear()
            .envs(env.iter().map(|(k, v)| (k, v)))
            .current_dir(&workdir)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0)
            .kill_on_drop(true);
        let child = command.spawn().map_err(|e| StartError {
            reason: "RunContainerError",
            message: format!("starting {program:?}: {e}"),
        })?;
        if let Some(id) = child.id() {
            crate::tasks::workdir::record_process_group(&launch.task_dir, id);
        }
        let group = child.id().and_then(|id| Pid::from_raw(id as i32));
        Ok(Box::new(Process {
            child,
            group,
            cpu: Duration::ZERO,
            entrance: Entrance::Process {
                env,
                cwd: workdir,
                group: group.map(|g| g.as_raw_nonzero().get()),
            },
        }))
    }
}

struct Process {
    child: Child,
    group: Option<Pid>,
    cpu: Duration,
    entrance: Entrance,
}

impl Process {
    fn signal(&self, signal: Signal) {
        if let Some(group) = self.group {
            // The group may be gone already; that is what we wanted.
            let _ = kill_process_group(group, signal);
        }
    }
}

#[tonic::async_trait]
impl Workload for Process {
    fn take_output(&mut self) -> (Option<Output>, Option<Output>) {
        crate::tasks::runtime::child_output(&mut self.child)
    }

    async fn wait(&mut self) -> Exit {
        if let Some(cpu) = cpu_at_exit(&self.child).await {
            self.cpu = cpu;
        }
        // The task ends with its first process, as a container ends with its pid namespace:
        // whatever it left running in its group goes too. The unreaped leader still holds
        // the group's id, so no other group can have it yet.
        if self.child.id().is_some() {
            self.signal(Signal::KILL);
        }
        match self.child.wait().await {
            Ok(status) => match (status.code(), status.signal()) {
                (Some(code), _) => Exit::from_code(code),
                (None, Some(signal)) => Exit::from_code(128 + signal),
                (None, None) => Exit::from_code(1),
            },
            Err(e) => Exit {
                code: 1,
                reason: "Error".into(),
                message: format!("waiting for the process: {e}"),
            },
        }
    }

    fn meter(&self) -> Option<Arc<dyn Meter>> {
        let root = i32::try_from(self.child.id()?).ok()?;
        Some(Arc::new(ProcessMeter { root }))
    }

    fn cpu_used(&self) -> Duration {
        self.cpu
    }

    fn entrance(&self) -> Entrance {
        self.entrance.clone()
    }

    fn terminate(&mut self) {
        self.signal(Signal::TERM);
    }

    fn kill(&mut self) {
        self.signal(Signal::KILL);
    }
}

/// A process task's figures for `kubectl top`, from /proc: the CPU of its first process and of
/// everything below it (living, or reaped by it), and their resident memory.
struct ProcessMeter {
    root: i32,
}

impl Meter for ProcessMeter {
    fn sample(&self) -> Option<Sample> {
        let processes = crate::sensors::read_processes();
        let root = processes.iter().find(|p| p.pid == self.root)?;
        let ticks = root.own + crate::sensors::descendant_ticks(self.root, &processes);
        let page = rustix::param::page_size() as u64;
        Some(Sample {
            cpu: crate::sensors::ticks_to_duration(ticks),
            memory_working_set: crate::sensors::tree_rss_pages(self.root, &processes) * page,
        })
    }
}
