//! A task's result for validation by quorum: one SHA-256 over its containers' exit codes, their
//! last runs' stdout and the files the pod declared, each file resolved inside its own volume.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use darkcore_proto::agent::v1::{Container, ResultSpec};
use ring::digest::{Context, SHA256};

use crate::digest::{hex, sha256_hex, sha256_read};
use crate::tasks::lock;
use crate::tasks::workdir::under_root;

/// What the digest is computed over starts with this, so a later layout cannot collide with it.
const LAYOUT: &str = "darkcore-result-v1\n";

/// The SHA-256 of each container's latest run's stdout, fed as the output is read.
#[derive(Default)]
pub struct StdoutDigests {
    /// By container: the digest of its last run that ended, or `None` while a run is being read.
    runs: Mutex<HashMap<String, Option<String>>>,
}

/// One run's stdout being hashed; its digest counts once the whole output has been read.
pub struct StdoutHasher {
    digests: Arc<StdoutDigests>,
    container: String,
    context: Context,
}

impl StdoutDigests {
    /// A run of `container` starts: its stdout is hashed from here, replacing the last run's.
    pub fn start(self: &Arc<Self>, container: &str) -> StdoutHasher {
        lock(&self.runs).insert(container.to_string(), None);
        StdoutHasher {
            digests: self.clone(),
            container: container.to_string(),
            context: Context::new(&SHA256),
        }
    }

    /// The digest of the container's last run's stdout; `None` when it was not read to its end.
    fn of(&self, container: &str) -> Option<String> {
        lock(&self.runs).get(container).cloned().flatten()
    }
}

impl StdoutHasher {
    pub fn update(&mut self, bytes: &[u8]) {
        self.context.update(bytes);
    }

    /// The run's stdout was read to its end.
    pub fn finish(self) {
        let digest = hex(self.context.finish().as_ref());
        lock(&self.digests.runs).insert(self.container, Some(digest));
    }
}

/// Stands for stdout that was not read to its end: drawn at random, so that it agrees with no
/// other device's result (a constant would let every such device agree, whatever it printed).
fn unread() -> String {
    use ring::rand::SecureRandom as _;
    let mut bytes = [0u8; 16];
    let _ = ring::rand::SystemRandom::new().fill(&mut bytes);
    format!("unread-{}", hex(&bytes))
}

/// The digest of the task's result: `sha256:` and 64 hex digits. `exits` are the regular
/// containers' final exit codes, in order; `task_dir` holds the task's volumes.
pub fn digest(
    spec: &ResultSpec,
    containers: &[Container],
    exits: &[i32],
    stdout: &StdoutDigests,
    task_dir: &Path,
) -> String {
    let mut text = String::from(LAYOUT);
    for (container, exit) in containers.iter().zip(exits) {
        let out = match spec.stdout {
            true => stdout.of(&container.name).unwrap_or_else(unread),
            false => "-".into(),
        };
        text.push_str(&format!(
            "container {:?} exit {exit} stdout {out}\n",
            container.name
        ));
    }
    for path in &spec.paths {
        let file = file_digest(task_dir, containers, path);
        text.push_str(&format!("file {path:?} {file}\n"));
    }
    format!("sha256:{}", sha256_hex(text.as_bytes()))
}

/// Where `path` (inside the pod) lives on the device: the volume of the deepest mount that
/// holds it, and the path inside that volume. `None` when no container mounts a volume there.
fn on_volume(task_dir: &Path, containers: &[Container], path: &str) -> Option<(PathBuf, String)> {
    let within = |mount_path: &str| {
        let mount_path = mount_path.trim_end_matches('/');
        let rest = path.strip_prefix(mount_path)?;
        (rest.is_empty() || rest.starts_with('/')).then_some(rest)
    };
    let (mount, rest) = containers
        .iter()
        .flat_map(|c| &c.mounts)
        .filter_map(|m| Some((m, within(&m.mount_path)?)))
        .max_by_key(|(m, _)| m.mount_path.trim_end_matches('/').len())?;
    let volume = under_root(&task_dir.join("volumes"), &mount.volume).ok()?;
    let inside = format!(
        "/{}/{}",
        mount.sub_path.trim_matches('/'),
        rest.trim_start_matches('/')
    );
    Some((volume, inside))
}

/// A declared file's SHA-256, or why it has none: `absent`, `not-a-file`, `unreadable`, or
/// `not-on-a-volume`. The path is resolved inside its volume: no symlink leads out of it, and a
/// FIFO or device there is named, never opened.
fn file_digest(task_dir: &Path, containers: &[Container], path: &str) -> String {
    let Some((volume, inside)) = on_volume(task_dir, containers, path) else {
        return "not-on-a-volume".into();
    };
    let Ok(root) = pathrs::Root::open(&volume) else {
        return "unreadable".into();
    };
    let handle = match root.resolve(&inside) {
        Ok(handle) => handle,
        Err(_) => return "absent".into(),
    };
    let is_file = handle
        .reopen(pathrs::flags::OpenFlags::O_PATH)
        .ok()
        .and_then(|f| f.metadata().ok())
        .is_some_and(|m| m.is_file());
    if !is_file {
        return "not-a-file".into();
    }
    let read = handle.reopen(pathrs::flags::OpenFlags::O_RDONLY);
    match read.map(sha256_read) {
        Ok(Ok(digest)) => digest,
        _ => "unreadable".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use darkcore_proto::agent::v1::VolumeMount;

    fn container(name: &str, mounts: &[(&str, &str, &str)]) -> Container {
        Container {
            name: name.into(),
            mounts: mounts
                .iter()
                .map(|(volume, mount_path, sub_path)| VolumeMount {
                    volume: volume.to_string(),
                    mount_path: mount_path.to_string(),
                    sub_path: sub_path.to_string(),
                    read_only: false,
                })
                .collect(),
            ..Default::default()
        }
    }

    /// A task directory of the test's own, whose volume `out` holds `result.json` and
    /// `sub/part`.
    fn task_dir(name: &str) -> PathBuf {
        let dir = crate::fresh_test_dir(&format!("result-{name}"));
        std::fs::create_dir_all(dir.join("volumes/out/sub")).unwrap();
        std::fs::write(dir.join("volumes/out/result.json"), b"{\"pi\":3.14}").unwrap();
        std::fs::write(dir.join("volumes/out/sub/part"), b"part").unwrap();
        dir
    }

    fn spec(paths: &[&str], stdout: bool) -> ResultSpec {
        ResultSpec {
            paths: paths.iter().map(|p| p.to_string()).collect(),
            stdout,
        }
    }

    fn printed(digests: &Arc<StdoutDigests>, container: &str, text: &str) {
        let mut hasher = digests.start(container);
        hasher.update(text.as_bytes());
        hasher.finish();
    }

    #[test]
    fn the_same_exit_output_and_files_give_the_same_digest_and_any_difference_another() {
        let dir = task_dir("same");
        let containers = [container("main", &[("out", "/out", "")])];
        let spec = spec(&["/out/result.json"], true);
        let digest_of = |text: &str, exit: i32| {
            let stdout = Arc::new(StdoutDigests::default());
            printed(&stdout, "main", text);
            digest(&spec, &containers, &[exit], &stdout, dir.as_path())
        };
        let honest = digest_of("3.14\n", 0);
        assert!(
            honest.starts_with("sha256:") && honest.len() == 71,
            "{honest}"
        );
        assert_eq!(honest, digest_of("3.14\n", 0));
        assert_ne!(honest, digest_of("3.15\n", 0));
        assert_ne!(honest, digest_of("3.14\n", 1));
        let stdout = Arc::new(StdoutDigests::default());
        printed(&stdout, "main", "3.14\n");
        std::fs::write(dir.as_path().join("volumes/out/result.json"), b"{\"pi\":3}").unwrap();
        assert_ne!(
            honest,
            digest(&spec, &containers, &[0], &stdout, dir.as_path())
        );
    }

    #[test]
    fn only_the_last_run_of_a_container_counts_and_an_unread_one_is_named() {
        let containers = [container("main", &[])];
        let spec = spec(&[], true);
        let dir = task_dir("runs");
        let once = Arc::new(StdoutDigests::default());
        printed(&once, "main", "ok\n");
        let twice = Arc::new(StdoutDigests::default());
        printed(&twice, "main", "crashed\n");
        printed(&twice, "main", "ok\n");
        let digest_of =
            |stdout: &Arc<StdoutDigests>| digest(&spec, &containers, &[0], stdout, dir.as_path());
        assert_eq!(digest_of(&once), digest_of(&twice));
        let unread = Arc::new(StdoutDigests::default());
        drop(unread.start("main"));
        assert_ne!(digest_of(&once), digest_of(&unread));
        assert_ne!(
            digest_of(&unread),
            digest_of(&unread),
            "stdout not read to its end agrees with nothing, not even itself"
        );
    }

    #[test]
    fn stdout_left_out_does_not_count() {
        let containers = [container("main", &[])];
        let dir = task_dir("stdout");
        let (a, b) = (
            Arc::new(StdoutDigests::default()),
            Arc::new(StdoutDigests::default()),
        );
        printed(&a, "main", "took 3 s\n");
        printed(&b, "main", "took 4 s\n");
        let spec = spec(&[], false);
        assert_eq!(
            digest(&spec, &containers, &[0], &a, dir.as_path()),
            digest(&spec, &containers, &[0], &b, dir.as_path())
        );
    }

    #[test]
    fn files_resolve_on_the_deepest_mount_and_through_sub_paths() {
        let dir = task_dir("mounts");
        let containers = [
            container("main", &[("out", "/data", "")]),
            container("side", &[("out", "/data/deep", "sub")]),
        ];
        assert_eq!(
            on_volume(dir.as_path(), &containers, "/data/deep/part"),
            Some((dir.as_path().join("volumes/out"), "/sub/part".into()))
        );
        assert_eq!(on_volume(dir.as_path(), &containers, "/database"), None);
        let part = file_digest(dir.as_path(), &containers, "/data/deep/part");
        assert_eq!(part, sha256_hex(b"part"));
        assert_eq!(
            file_digest(dir.as_path(), &containers, "/data/none"),
            "absent"
        );
        assert_eq!(
            file_digest(dir.as_path(), &containers, "/data/sub"),
            "not-a-file"
        );
        assert_eq!(
            file_digest(dir.as_path(), &containers, "/etc/passwd"),
            "not-on-a-volume"
        );
    }

    #[test]
    fn a_symlink_out_of_the_volume_is_not_followed_and_a_fifo_is_not_opened() {
        let dir = task_dir("escape");
        let out = dir.as_path().join("volumes/out");
        let secret = dir.as_path().join("secret");
        std::fs::write(&secret, b"the owner's").unwrap();
        std::os::unix::fs::symlink(&secret, out.join("escape")).unwrap();
        std::os::unix::fs::symlink("../../secret", out.join("climb")).unwrap();
        rustix::fs::mknodat(
            rustix::fs::CWD,
            out.join("fifo"),
            rustix::fs::FileType::Fifo,
            rustix::fs::Mode::from_raw_mode(0o644),
            0,
        )
        .unwrap();
        let containers = [container("main", &[("out", "/out", "")])];
        let secret_digest = sha256_hex(b"the owner's");
        for path in ["/out/escape", "/out/climb"] {
            assert_ne!(
                file_digest(dir.as_path(), &containers, path),
                secret_digest,
                "{path}"
            );
        }
        assert_eq!(
            file_digest(dir.as_path(), &containers, "/out/fifo"),
            "not-a-file"
        );
    }
}
