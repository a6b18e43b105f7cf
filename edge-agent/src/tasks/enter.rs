//! How a command gets into a running container, for `kubectl exec`: each runtime says how when a
//! container starts (an [`Entrance`]), and the running ones are kept by task and container.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::Mutex;

use tokio::process::Command;

/// util-linux's setsid, which starts a command in a new session.
const SETSID: &str = "/usr/bin/setsid";

/// How to start a command in one running container.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Entrance {
    /// A plain process with the task's environment and working directory, in the task's
    /// process group, so it ends with the task.
    Process {
        env: Vec<(String, String)>,
        cwd: PathBuf,
        group: Option<i32>,
    },
    /// `<runner> --root <root> exec <id> <command>`: in the container's namespaces and cgroup,
    /// as its user, with its capabilities, seccomp filter and environment.
    Runner {
        bin: PathBuf,
        root: PathBuf,
        id: String,
        /// The task's network namespace (its file), where port-forward connects; `None`
        /// when the task shares the device's network.
        network: Option<PathBuf>,
    },
    /// Exec cannot work in this container; why, for the user.
    Unsupported(String),
}

impl Entrance {
    /// The command that runs `argv` in the container, stdio still to be set. With `tty` (its
    /// stdio a terminal of the agent's), it starts in a session of its own with that terminal
    /// as the controlling one (util-linux `setsid --ctty`, where the device has it): a shell can
    /// do job control, and a terminal resize signals it. A runner given `--tty` makes the
    /// container's own terminal and relays it to the agent's, resizes included.
    pub fn command(&self, argv: &[String], tty: bool) -> Result<Command, String> {
        let Some((program, args)) = argv.split_first() else {
            return Err("no command to run".into());
        };
        match self {
            Entrance::Process { env, cwd, group } => {
                let mut command = in_session(tty, program);
                command
                    .args(args)
                    .env_clear()
                    .envs(env.iter().map(|(k, v)| (k, v)))
                    .current_dir(cwd);
                if let Some(group) = group {
                    command.process_group(*group);
                }
                Ok(command)
            }
            Entrance::Runner { bin, root, id, .. } => {
                let mut command = in_session(tty, bin);
                command.arg("--root").arg(root).arg("exec");
                if tty {
                    command.arg("--tty");
                } else {
                    // Its own group: killing it takes what runc started too.
                    command.process_group(0);
                }
                command
                    // Flags end at the id: what follows is the command, whatever it looks like.
                    .arg(id)
                    .arg(program)
                    .args(args);
                Ok(command)
            }
            Entrance::Unsupported(why) => Err(why.clone()),
        }
    }

    /// The network namespace a port-forward connects in, or why there is none to use: never
    /// the device's own network, whose ports are the owner's.
    pub fn network(&self) -> Result<&std::path::Path, String> {
        match self {
            Entrance::Runner {
                network: Some(network),
                ..
            } => Ok(network),
            Entrance::Runner { network: None, .. } => Err(
                "port-forward is refused: this pod shares the device's network (host mode), so its ports are the device's own".into(),
            ),
            Entrance::Process { .. } => Err(
                "port-forward is refused in the process runtime: a process shares the device's network, so its ports are the device's own".into(),
            ),
            Entrance::Unsupported(_) => {
                Err("port-forward is not supported by the wasm runtime: a module has no network of its own".into())
            }
        }
    }
}

/// `program` as a command, in a new session with its terminal when `tty` and setsid is here.
fn in_session(tty: bool, program: impl AsRef<std::ffi::OsStr>) -> Command {
    match tty
        .then_some(SETSID)
        .filter(|s| std::path::Path::new(s).exists())
    {
        Some(setsid) => {
            let mut command = Command::new(setsid);
            command.arg("--ctty").arg(program);
            command
        }
        None => Command::new(program),
    }
}

/// The entrances of the containers running now, by task id and container name.
#[derive(Default)]
pub struct Entrances {
    running: Mutex<BTreeMap<(String, String), Entrance>>,
}

impl Entrances {
    pub fn started(&self, task: &str, container: &str, entrance: Entrance) {
        crate::tasks::lock(&self.running).insert((task.into(), container.into()), entrance);
    }

    pub fn ended(&self, task: &str, container: &str) {
        crate::tasks::lock(&self.running).remove(&(task.to_string(), container.to_string()));
    }

    /// How to enter `container` of `task`, if it runs here now.
    pub fn get(&self, task: &str, container: &str) -> Option<Entrance> {
        crate::tasks::lock(&self.running)
            .get(&(task.to_string(), container.to_string()))
            .cloned()
    }
}

/// Stdio of an exec'd command: piped where the user asked for the stream, else nothing.
pub fn stdio(wanted: bool) -> Stdio {
    if wanted {
        Stdio::piped()
    } else {
        Stdio::null()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_process_entrance_runs_with_the_tasks_environment_and_directory() {
        let dir = std::env::temp_dir();
        let entrance = Entrance::Process {
            env: vec![("GREETING".into(), "hello".into())],
            cwd: dir.clone(),
            group: None,
        };
        let argv: Vec<String> = ["/bin/sh", "-c", "echo $GREETING; pwd; echo ${HOME:-unset}"]
            .map(String::from)
            .to_vec();
        let output = entrance
            .command(&argv, false)
            .unwrap()
            .output()
            .await
            .unwrap();
        let text = String::from_utf8(output.stdout).unwrap();
        assert_eq!(
            text,
            format!("hello\n{}\nunset\n", dir.display()),
            "only the task's environment, not the agent's"
        );
    }

    #[test]
    fn a_runner_entrance_execs_in_the_container_by_id() {
        let entrance = Entrance::Runner {
            bin: "/usr/bin/runc".into(),
            root: "/state/runc".into(),
            id: "c1".into(),
            network: None,
        };
        let argv: Vec<String> = ["ls", "-l"].map(String::from).to_vec();
        let command = entrance.command(&argv, false).unwrap();
        let args: Vec<_> = command.as_std().get_args().collect();
        assert_eq!(args, ["--root", "/state/runc", "exec", "c1", "ls", "-l"]);
        let command = entrance.command(&argv, true).unwrap();
        let args: Vec<_> = command.as_std().get_args().collect();
        let wanted = ["--root", "/state/runc", "exec", "--tty", "c1", "ls", "-l"];
        assert!(
            args.ends_with(&wanted.map(std::ffi::OsStr::new)),
            "{args:?}"
        );
    }

    #[test]
    fn unsupported_and_empty_commands_say_why() {
        let wasm = Entrance::Unsupported("exec is not supported by the wasm runtime".into());
        assert_eq!(
            wasm.command(&["sh".into()], false).err().unwrap(),
            "exec is not supported by the wasm runtime"
        );
        let process = Entrance::Process {
            env: vec![],
            cwd: "/".into(),
            group: None,
        };
        assert!(process.command(&[], false).is_err());
    }

    #[test]
    fn entrances_are_kept_while_their_container_runs() {
        let entrances = Entrances::default();
        let wasm = Entrance::Unsupported("no".into());
        entrances.started("t1", "app", wasm.clone());
        assert_eq!(entrances.get("t1", "app"), Some(wasm));
        assert_eq!(entrances.get("t1", "other"), None);
        entrances.ended("t1", "app");
        assert_eq!(entrances.get("t1", "app"), None);
    }
}
