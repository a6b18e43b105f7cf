//! A task's private directory on the device: `<state>/tasks/<task id>/` (0700), holding its
//! volumes as the operator resolved them and the root its mounts appear under (see `mounts`).
//! Deleted when the operator releases the task.

use std::io;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};

use darkcore_proto::agent::v1::Volume;

/// Why a task's directory could not be laid out.
#[derive(Debug, thiserror::Error)]
pub enum WorkdirError {
    /// The task asked for something unsafe or inconsistent: its own failure.
    #[error("{0}")]
    Invalid(String),
    /// The device could not write it (a full disk, for example): not the task's failure.
    #[error("writing the task's directory {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
}

pub(crate) fn io_error(path: &Path) -> impl FnOnce(io::Error) -> WorkdirError + '_ {
    move |source| WorkdirError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// `path` (absolute inside the pod) placed under `root` on the device; `..` is refused.
pub fn under_root(root: &Path, path: &str) -> Result<PathBuf, String> {
    let mut placed = root.to_path_buf();
    for component in Path::new(path).components() {
        match component {
            Component::RootDir | Component::CurDir => {}
            Component::Normal(part) => placed.push(part),
            _ => return Err(format!("path {path:?} leaves the task's directory")),
        }
    }
    Ok(placed)
}

/// Task ids come from the operator; only plain names become directories.
pub fn valid_task_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 128
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.' || c == '_')
        && !id.starts_with('.')
}

pub(crate) fn resolve_error(path: &Path) -> impl FnOnce(pathrs::error::Error) -> WorkdirError + '_ {
    move |e| io_error(path)(io::Error::other(e))
}

pub(crate) fn private_dir(path: &Path) -> Result<(), WorkdirError> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(path)
        .map_err(io_error(path))
}

fn set_mode(path: &Path, mode: u32) -> Result<(), WorkdirError> {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).map_err(io_error(path))
}

/// Creates the task's directory and writes its volumes into it.
pub fn prepare(
    tasks_root: &Path,
    task_id: &str,
    volumes: &[Volume],
) -> Result<PathBuf, WorkdirError> {
    if !valid_task_id(task_id) {
        return Err(WorkdirError::Invalid(format!(
            "task id {task_id:?} is not a plain name"
        )));
    }
    let dir = tasks_root.join(task_id);
    private_dir(&dir)?;
    private_dir(&dir.join("root"))?;
    for volume in volumes {
        let volume_dir =
            under_root(&dir.join("volumes"), &volume.name).map_err(WorkdirError::Invalid)?;
        // Inside the private task directory, a volume is open to the container's user,
        // whoever that is (as on a kubelet: emptyDir 0777, the others 0755).
        private_dir(&volume_dir)?;
        let open = if volume.empty_dir { 0o777 } else { 0o755 };
        set_mode(&volume_dir, open)?;
        for file in &volume.files {
            let path = under_root(&volume_dir, &file.path).map_err(WorkdirError::Invalid)?;
            if let Some(parent) = path.parent()
                && !parent.exists()
            {
                private_dir(parent)?;
                for dir in parent
                    .ancestors()
                    .take_while(|d| d.starts_with(&volume_dir))
                {
                    set_mode(dir, open)?;
                }
            }
            std::fs::write(&path, &file.content).map_err(io_error(&path))?;
            let mode = if file.mode == 0 {
                0o644
            } else {
                file.mode & 0o777
            };
            set_mode(&path, mode)?;
        }
    }
    Ok(dir)
}

/// What the files under `dir` take, charged as the unpacker charges a layer (data, and
/// `ENTRY_COST` an entry), on `dir`'s own file system: the namespaces' files and anything else
/// mounted from elsewhere are not walked. Every task's unpacked roots and volumes count
/// against the owner's `max_disk` this way. The walk stops once it has counted more than
/// `bound`, so a task holding millions of entries costs no more than the room it may take.
pub fn disk_used(dir: &Path, bound: u64) -> u64 {
    use crate::tasks::oci::rootfs::ENTRY_COST;
    use std::os::unix::fs::MetadataExt;
    let Ok(top) = std::fs::symlink_metadata(dir) else {
        return 0;
    };
    let mut used: u64 = 0;
    let mut pending = vec![dir.to_path_buf()];
    while let Some(path) = pending.pop() {
        for entry in std::fs::read_dir(&path).into_iter().flatten().flatten() {
            // A DirEntry's metadata does not follow a symlink.
            let Ok(meta) = entry.metadata() else {
                continue;
            };
            if meta.dev() != top.dev() {
                continue;
            }
            used = used.saturating_add(ENTRY_COST + if meta.is_file() { meta.len() } else { 0 });
            if used > bound {
                return used;
            }
            if meta.is_dir() {
                pending.push(entry.path());
            }
        }
    }
    used
}

/// Remembers a process group a task started, so that an agent restarted after a crash can
/// stop what its predecessor left running.
pub fn record_process_group(dir: &Path, pgid: u32) {
    use std::io::Write as _;
    let path = dir.join("process-groups");
    let written = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .and_then(|mut f| writeln!(f, "{pgid}"));
    if let Err(error) = written {
        tracing::warn!(%error, path = %path.display(), "could not record a task's process group");
    }
}

/// Kills the process groups that tasks of an earlier agent run left behind, then deletes
/// their directories. A group is killed only if its leader still names that task's root in
/// its environment, so a reused pid is never hit.
pub fn reap_stale(tasks_root: &Path) {
    let Ok(dirs) = std::fs::read_dir(tasks_root) else {
        return;
    };
    for dir in dirs.flatten().map(|d| d.path()) {
        let groups = std::fs::read_to_string(dir.join("process-groups")).unwrap_or_default();
        let marker = format!("DARKCORE_TASK_ROOT={}", dir.join("root").display());
        for pgid in groups.lines().filter_map(|l| l.trim().parse::<i32>().ok()) {
            let environ = std::fs::read(format!("/proc/{pgid}/environ")).unwrap_or_default();
            let ours = environ
                .split(|b| *b == 0)
                .any(|var| var == marker.as_bytes());
            if let (true, Some(group)) = (ours, rustix::process::Pid::from_raw(pgid)) {
                tracing::info!(pgid, dir = %dir.display(), "stopping a task left running by an earlier agent");
                let _ = rustix::process::kill_process_group(group, rustix::process::Signal::KILL);
            }
        }
    }
    super::mounts::unmount_under(tasks_root);
    if let Err(error) = std::fs::remove_dir_all(tasks_root)
        && error.kind() != io::ErrorKind::NotFound
    {
        tracing::warn!(%error, dir = %tasks_root.display(), "could not clear old task directories");
    }
}

/// Deletes a released task's directory; a failure is logged, the task is forgotten anyway.
pub fn remove(tasks_root: &Path, task_id: &str) {
    if !valid_task_id(task_id) {
        return;
    }
    let dir = tasks_root.join(task_id);
    super::mounts::unmount_under(&dir);
    if let Err(error) = std::fs::remove_dir_all(&dir)
        && error.kind() != io::ErrorKind::NotFound
    {
        tracing::warn!(%error, dir = %dir.display(), "could not delete a released task's directory");
    }
}

#[cfg(test)]
mod tests {

    #[test]
    fn disk_used_counts_files_and_entries_and_follows_no_link() {
        use crate::tasks::oci::rootfs::ENTRY_COST;
        let dir = crate::fresh_test_dir("disk-used");
        std::fs::create_dir_all(dir.join("a/b")).unwrap();
        std::fs::write(dir.join("a/b/data"), vec![0u8; 10_000]).unwrap();
        std::os::unix::fs::symlink("/usr", dir.join("a/usr")).unwrap();
        // a, a/b, a/b/data, a/usr: four entries, 10000 bytes of data; /usr is not walked.
        assert_eq!(disk_used(&dir, u64::MAX), 4 * ENTRY_COST + 10_000);
        assert_eq!(disk_used(&dir.join("missing"), u64::MAX), 0);
        // A bound stops the walk soon after it is passed.
        assert!(disk_used(&dir, 1) <= ENTRY_COST + 10_000);
    }

    use super::*;
    use darkcore_proto::agent::v1::{Container, VolumeFile, VolumeMount};
    use std::os::unix::fs::MetadataExt;

    fn scratch(name: &str) -> PathBuf {
        crate::fresh_test_dir(&format!("workdir-{name}"))
    }

    #[test]
    fn paths_stay_under_the_task_root() {
        let root = Path::new("/t/root");
        assert_eq!(
            under_root(root, "/etc/config").unwrap(),
            Path::new("/t/root/etc/config")
        );
        assert_eq!(under_root(root, "data").unwrap(), Path::new("/t/root/data"));
        assert!(under_root(root, "/etc/../../secret").is_err());
    }

    #[test]
    fn volumes_are_written_privately_and_linked_under_the_root() {
        let tasks = scratch("ok");
        let volumes = vec![Volume {
            name: "config".into(),
            files: vec![VolumeFile {
                path: "sub/key".into(),
                content: b"value".to_vec(),
                mode: 0o400,
            }],
            empty_dir: false,
            ..Default::default()
        }];
        let dir = prepare(&tasks, "uid-1", &volumes).unwrap();
        assert_eq!(std::fs::metadata(&dir).unwrap().mode() & 0o777, 0o700);
        let container = Container {
            mounts: vec![VolumeMount {
                volume: "config".into(),
                mount_path: "/etc/config".into(),
                ..Default::default()
            }],
            ..Default::default()
        };
        crate::tasks::mounts::mounts(&dir, &container).unwrap();
        let through_root = dir.join("root/etc/config/sub/key");
        assert_eq!(std::fs::read(&through_root).unwrap(), b"value");
        assert_eq!(
            std::fs::metadata(&through_root).unwrap().mode() & 0o777,
            0o400
        );
        remove(&tasks, "uid-1");
        assert!(!dir.exists());
        let _ = std::fs::remove_dir_all(&tasks);
    }

    #[test]
    fn escaping_paths_and_odd_task_ids_are_refused() {
        let tasks = scratch("bad");
        let volumes = vec![Volume {
            name: "v".into(),
            files: vec![VolumeFile {
                path: "../../outside".into(),
                content: vec![],
                mode: 0,
            }],
            empty_dir: false,
            ..Default::default()
        }];
        assert!(matches!(
            prepare(&tasks, "t", &volumes),
            Err(WorkdirError::Invalid(_))
        ));
        assert!(matches!(
            prepare(&tasks, "../t", &[]),
            Err(WorkdirError::Invalid(_))
        ));
        let _ = std::fs::remove_dir_all(&tasks);
    }
}
