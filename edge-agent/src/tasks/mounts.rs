//! A container's mounts: each source resolved inside its volume once (a subPath as the kubelet
//! resolves it) and held open, staged for runc as a bind mount, and unmounted before deletion.

use std::collections::VecDeque;
use std::ffi::OsString;
use std::io;
use std::os::fd::{AsFd, AsRawFd};
use std::os::unix::ffi::OsStringExt;
use std::os::unix::fs::PermissionsExt;
use std::path::{Component, Path, PathBuf};
use std::sync::Arc;

use darkcore_proto::agent::v1::Container;

use crate::tasks::workdir::{WorkdirError, io_error, private_dir, resolve_error, under_root};

/// A container's mount with its source resolved inside its volume once and held open.
/// Runtimes reach a subPath through this handle, never by its path again, so nothing a
/// container does to the volume later (a symlink swapped in) can redirect it.
#[derive(Clone, Debug)]
pub struct MountSource {
    /// Where the pod mounts it.
    pub path_in_pod: String,
    handle: Arc<pathrs::Handle>,
    /// The volume's own directory, when the whole volume is mounted: a path only the agent
    /// made, so safe to name. `None` for a subPath, which only the handle names safely.
    whole_volume: Option<PathBuf>,
}

impl MountSource {
    /// The source as the agent's own process opens it (wasm preopens).
    pub fn in_agent(&self) -> PathBuf {
        PathBuf::from(format!("/proc/self/fd/{}", self.handle.as_fd().as_raw_fd()))
    }

    /// A path another process (runc, in a mount namespace of its own) can bind-mount: the
    /// volume's directory, or for a subPath a bind mount of the resolved handle that the agent
    /// makes at `staging`, as the kubelet does. `unmount_under` takes staged mounts away.
    pub fn for_runtime(&self, staging: &Path) -> io::Result<PathBuf> {
        if let Some(dir) = &self.whole_volume {
            return Ok(dir.clone());
        }
        let is_dir = crate::tasks::oci::rootfs::is_dir(&self.handle);
        if let Some(parent) = staging.parent() {
            std::fs::create_dir_all(parent)?;
        }
        if is_dir {
            std::fs::create_dir(staging)?;
        } else {
            std::fs::File::create_new(staging)?;
        }
        rustix::mount::mount_bind(self.in_agent(), staging)?;
        Ok(staging.to_path_buf())
    }
}

/// Unmounts every mount at or below `dir` (deepest first), so that deleting `dir` deletes
/// nothing through one. Mounts the agent staged for runc live there; a crash can leave them.
pub fn unmount_under(dir: &Path) {
    let Ok(table) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return;
    };
    let mut points: Vec<PathBuf> = table
        .lines()
        .filter_map(|line| line.split(' ').nth(4).map(unescape_mount_point))
        .filter(|point| point.starts_with(dir))
        .collect();
    points.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    for point in points {
        if let Err(error) = rustix::mount::unmount(&point, rustix::mount::UnmountFlags::DETACH) {
            tracing::warn!(%error, point = %point.display(), "could not unmount a staged volume");
        }
    }
}

/// A mount point as /proc/self/mountinfo writes it: space, tab, newline and backslash as
/// octal escapes.
fn unescape_mount_point(field: &str) -> PathBuf {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let octal = bytes.get(i + 1..i + 4).and_then(|d| {
            std::str::from_utf8(d)
                .ok()
                .and_then(|d| u8::from_str_radix(d, 8).ok())
        });
        match (bytes[i], octal) {
            (b'\\', Some(byte)) => {
                out.push(byte);
                i += 4;
            }
            (byte, _) => {
                out.push(byte);
                i += 1;
            }
        }
    }
    PathBuf::from(OsString::from_vec(out))
}

/// Where each of a container's mounts lives on the device, and (for runtimes that cannot
/// mount) a link from the task root to it.
pub fn mounts(dir: &Path, container: &Container) -> Result<Vec<MountSource>, WorkdirError> {
    let root = dir.join("root");
    let mut placed = Vec::new();
    for mount in &container.mounts {
        let volume_dir =
            under_root(&dir.join("volumes"), &mount.volume).map_err(WorkdirError::Invalid)?;
        let volume = pathrs::Root::open(&volume_dir).map_err(resolve_error(&volume_dir))?;
        let (handle, whole_volume) = if mount.sub_path.is_empty() {
            let handle = volume.resolve("/").map_err(resolve_error(&volume_dir))?;
            (handle, Some(volume_dir.clone()))
        } else {
            let handle = sub_path(&volume, &volume_dir, &mount.volume, &mount.sub_path)?;
            (handle, None)
        };
        let source = MountSource {
            path_in_pod: mount.mount_path.clone(),
            handle: Arc::new(handle),
            whole_volume,
        };
        let link = under_root(&root, &mount.mount_path).map_err(WorkdirError::Invalid)?;
        if link == root {
            return Err(WorkdirError::Invalid(format!(
                "volume {:?} is mounted at the root",
                mount.volume
            )));
        }
        if let Some(parent) = link.parent() {
            private_dir(parent)?;
        }
        if link.symlink_metadata().is_ok() {
            std::fs::remove_file(&link).map_err(io_error(&link))?;
        }
        let target = std::fs::read_link(source.in_agent()).map_err(io_error(&link))?;
        std::os::unix::fs::symlink(&target, &link).map_err(io_error(&link))?;
        placed.push(source);
    }
    Ok(placed)
}

/// The longest chain of symlinks a subPath may follow, as the kernel's limit.
const MAX_LINKS: usize = 40;

/// A mount's subPath, opened inside its volume (made as a directory, with the volume's mode,
/// when missing). As on a kubelet, a symlink on the way may lead elsewhere in the volume but
/// never out of it: such a subPath is refused and names the link. libpathrs resolves the path
/// inside the volume whatever the check saw, so a link swapped in after it leads nowhere else.
fn sub_path(
    volume: &pathrs::Root,
    volume_dir: &Path,
    name: &str,
    sub_path: &str,
) -> Result<pathrs::Handle, WorkdirError> {
    let refuse = |why: String| {
        WorkdirError::Invalid(format!(
            "subPath {sub_path:?} of volume {name:?} {why}: a subPath must stay inside its volume"
        ))
    };
    let given = Path::new(sub_path);
    if given.is_absolute()
        || given
            .components()
            .any(|c| matches!(c, Component::ParentDir))
    {
        return Err(refuse("is absolute or has '..'".into()));
    }
    if let Some((link, target)) = link_out_of(volume, given) {
        return Err(refuse(format!(
            "goes through the symlink {link:?} -> {target:?}, which leads out of the volume"
        )));
    }
    let in_volume = Path::new("/").join(given);
    match volume.resolve(&in_volume) {
        Ok(handle) => Ok(handle),
        Err(e) if not_found(&e) => {
            let mode = std::fs::metadata(volume_dir)
                .map_err(io_error(volume_dir))?
                .permissions()
                .mode()
                & 0o7777;
            let handle = volume
                .mkdir_all(&in_volume, &std::fs::Permissions::from_mode(mode))
                .map_err(resolve_error(volume_dir))?;
            let made = handle
                .reopen(pathrs::flags::OpenFlags::O_RDONLY | pathrs::flags::OpenFlags::O_DIRECTORY)
                .map_err(resolve_error(volume_dir))?;
            made.set_permissions(std::fs::Permissions::from_mode(mode))
                .map_err(io_error(volume_dir))?;
            Ok(handle)
        }
        Err(e) => Err(resolve_error(volume_dir)(e)),
    }
}

/// The first symlink on `relative`'s way (inside `volume`) whose target leads out of the
/// volume, with that target: an absolute one, or one with more `..` than there are
/// directories above it. Links inside the volume are followed as the kernel would.
fn link_out_of(volume: &pathrs::Root, relative: &Path) -> Option<(PathBuf, PathBuf)> {
    let mut ahead: VecDeque<OsString> = relative
        .components()
        .map(|c| c.as_os_str().to_os_string())
        .collect();
    let mut at = PathBuf::new();
    let mut links = 0;
    // The given path has no `..`: any comes from a link, the latest one followed.
    let mut last_link = (PathBuf::new(), PathBuf::new());
    while let Some(part) = ahead.pop_front() {
        if part == "." {
            continue;
        }
        if part == ".." {
            if !at.pop() {
                return Some(last_link);
            }
            continue;
        }
        let here = at.join(&part);
        let Ok(handle) = volume.resolve_nofollow(Path::new("/").join(&here)) else {
            at = here; // not there (yet): nothing further can be a link
            continue;
        };
        let Ok(target) = rustix::fs::readlinkat(&handle, "", Vec::new()) else {
            at = here; // not a symlink
            continue;
        };
        let target = PathBuf::from(OsString::from_vec(target.into_bytes()));
        links += 1;
        if target.is_absolute() || links > MAX_LINKS {
            return Some((here, target));
        }
        for part in target.components().rev() {
            ahead.push_front(part.as_os_str().to_os_string());
        }
        last_link = (here, target);
    }
    None
}

fn not_found(error: &pathrs::error::Error) -> bool {
    matches!(error.kind(), pathrs::error::ErrorKind::OsError(Some(n)) if n == rustix::io::Errno::NOENT.raw_os_error())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tasks::workdir::prepare;
    use darkcore_proto::agent::v1::{Volume, VolumeMount};
    use std::os::unix::fs::MetadataExt;

    fn scratch(name: &str) -> PathBuf {
        crate::fresh_test_dir(&format!("mounts-{name}"))
    }

    /// A task whose emptyDir `data` holds what an init container left: `links` are
    /// (name, target) symlinks made inside it.
    fn volume_with_links(name: &str, links: &[(&str, &str)]) -> (PathBuf, PathBuf) {
        let tasks = scratch(name);
        let volumes = vec![Volume {
            name: "data".into(),
            empty_dir: true,
            ..Default::default()
        }];
        let dir = prepare(&tasks, "t", &volumes).unwrap();
        std::fs::create_dir_all(dir.join("volumes/data/v2")).unwrap();
        for (link, target) in links {
            std::os::unix::fs::symlink(target, dir.join("volumes/data").join(link)).unwrap();
        }
        (tasks, dir)
    }

    fn mount_sub_path(sub_path: &str) -> Container {
        Container {
            mounts: vec![VolumeMount {
                volume: "data".into(),
                mount_path: "/mnt".into(),
                sub_path: sub_path.into(),
                ..Default::default()
            }],
            ..Default::default()
        }
    }

    /// CVE-2017-1002101's shape: a link made in a volume by one container, mounted as a
    /// subPath by the next.
    #[test]
    fn a_sub_path_through_a_link_out_of_its_volume_is_refused() {
        let (tasks, dir) = volume_with_links(
            "subpath-escape",
            &[
                ("up", "../../../../../../.."),
                ("abs", "/etc"),
                ("chain", "inner/../../.."),
                ("inner", "v2"),
            ],
        );
        for sub_path in ["up", "abs", "up/made", "abs/made", "chain", "../x", "/etc"] {
            let error = mounts(&dir, &mount_sub_path(sub_path)).unwrap_err();
            assert!(
                matches!(&error, WorkdirError::Invalid(m) if m.contains("subPath")),
                "{sub_path}: {error}"
            );
        }
        assert!(!Path::new("/made").exists() && !Path::new("/etc/made").exists());
        let _ = std::fs::remove_dir_all(&tasks);
    }

    #[test]
    fn a_sub_path_may_follow_links_inside_its_volume_and_is_made_when_missing() {
        let (tasks, dir) =
            volume_with_links("subpath-ok", &[("current", "v2"), ("self", "./v2/../v2")]);
        std::fs::write(dir.join("volumes/data/v2/file"), "in v2").unwrap();
        for sub_path in ["current", "self", "v2"] {
            let placed = mounts(&dir, &mount_sub_path(sub_path)).unwrap();
            assert_eq!(
                std::fs::read_to_string(placed[0].in_agent().join("file")).unwrap(),
                "in v2",
                "{sub_path}"
            );
        }
        let placed = mounts(&dir, &mount_sub_path("new/deeper")).unwrap();
        let made = dir.join("volumes/data/new/deeper");
        assert!(made.is_dir());
        assert_eq!(std::fs::metadata(&made).unwrap().mode() & 0o777, 0o777);
        assert_eq!(std::fs::read_link(placed[0].in_agent()).unwrap(), made);
        assert_eq!(std::fs::read_link(dir.join("root/mnt")).unwrap(), made);
        let _ = std::fs::remove_dir_all(&tasks);
    }
}
