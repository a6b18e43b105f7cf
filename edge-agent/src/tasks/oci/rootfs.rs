//! An image's root filesystem for the `oci` runtime: its layers (tar, gzip-compressed or not)
//! applied in order, with OCI whiteouts (`.wh.NAME` deletes NAME from lower layers, and
//! `.wh..wh..opq` empties its directory of them).
//!
//! Nothing a layer says may touch the device outside the rootfs. Every path is resolved by
//! libpathrs inside the rootfs, as if the rootfs were `/` (openat2 `RESOLVE_IN_ROOT`, as runc and
//! containerd resolve container paths): a symlink a layer made, absolute or full of `..`, can
//! only ever lead to another place in the rootfs, and the last component of what is removed,
//! replaced or linked is never followed.

use std::cell::Cell;
use std::collections::HashSet;
use std::ffi::OsStr;
use std::fs::{File, Permissions};
use std::io::{self, BufReader, Read};
use std::os::fd::AsFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::path::{Component, Path, PathBuf};

use flate2::read::GzDecoder;
use pathrs::flags::OpenFlags;
use pathrs::{InodeType, Root};
use rustix::fs::{AtFlags, Gid, Uid};

const WHITEOUT: &str = ".wh.";
const OPAQUE: &str = ".wh..wh..opq";

#[derive(Debug, thiserror::Error)]
pub enum UnpackError {
    #[error("layer {layer}: {}", chain(source))]
    Io { layer: String, source: io::Error },
    #[error(
        "layer {layer} is zstd-compressed, which this agent cannot unpack yet: push the image with gzip layers"
    )]
    Zstd { layer: String },
    #[error("layer {layer}: entry {path:?} leaves the root filesystem")]
    Escapes { layer: String, path: String },
    #[error(
        "layer {layer} unpacks to more than the {limit} bytes that the owner's max_disk leaves \
         for this container's root filesystem, beside the image cache and what the device's \
         tasks hold: use a smaller image, or ask for a device with more disk"
    )]
    TooLarge { layer: String, limit: u64 },
    #[error("layer {layer}: placing {path:?} in the root filesystem: {source}")]
    Place {
        layer: String,
        path: String,
        source: pathrs::error::Error,
    },
}

/// An error with its causes (tar wraps the io error that says what went wrong).
fn chain(error: &io::Error) -> String {
    let mut text = error.to_string();
    let mut cause = std::error::Error::source(error);
    while let Some(inner) = cause {
        text.push_str(": ");
        text.push_str(&inner.to_string());
        cause = inner.source();
    }
    text
}

/// What each entry costs beside its data: a header's worth, so that a layer of a million
/// empty files is bounded too.
pub const ENTRY_COST: u64 = 512;

/// Whose the unpacked files are.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Owners {
    /// The agent's, whatever the layers say.
    Agent,
    /// The ids the layers give, shifted into a user namespace's range: id n becomes
    /// `uid + n` (`gid + n`); an id past the namespace's 65536 becomes its nobody (65534).
    Shifted { uid: u32, gid: u32 },
}

/// How many ids a container's user namespace maps.
pub const NAMESPACE_IDS: u32 = 65536;

impl Owners {
    /// The host ids of a file the layer gives `(uid, gid)`, or `None` to leave it as made.
    fn of(self, uid: u64, gid: u64) -> Option<(u32, u32)> {
        let shift = |base: u32, n: u64| {
            let n = u32::try_from(n)
                .ok()
                .filter(|n| *n < NAMESPACE_IDS)
                .unwrap_or(65534);
            base + n
        };
        match self {
            Owners::Agent => None,
            Owners::Shifted { uid: u, gid: g } => Some((shift(u, uid), shift(g, gid))),
        }
    }
}

/// Applies `layers` (blob files, lowest first) onto the empty directory `rootfs`.
/// `owners`: whose the files become (the agent runs as root, so it can give any).
/// `limit`: the bytes the unpacked layers may take (file data, and `ENTRY_COST` an entry).
pub fn unpack(
    layers: &[PathBuf],
    rootfs: &Path,
    owners: Owners,
    limit: u64,
) -> Result<(), UnpackError> {
    let root = Root::open(rootfs).map_err(|source| UnpackError::Place {
        layer: String::new(),
        path: rootfs.display().to_string(),
        source,
    })?;
    let room = Cell::new(limit);
    for layer in layers {
        let name = layer
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let reader = open_layer(layer, &name)?;
        Layer {
            root: &root,
            name: &name,
            owners,
            room: &room,
            limit,
        }
        .apply(reader)?;
    }
    Ok(())
}

/// A layer blob as an uncompressed tar stream (gzip is recognised by its magic bytes).
fn open_layer(layer: &Path, name: &str) -> Result<Box<dyn Read>, UnpackError> {
    let io = |source| UnpackError::Io {
        layer: name.into(),
        source,
    };
    let mut file = BufReader::new(File::open(layer).map_err(io)?);
    let magic = {
        use std::io::BufRead;
        file.fill_buf().map_err(io)?.get(..4).map(<[u8]>::to_vec)
    };
    Ok(match magic.as_deref() {
        Some([0x1f, 0x8b, ..]) => Box::new(GzDecoder::new(file)),
        Some([0x28, 0xb5, 0x2f, 0xfd]) => return Err(UnpackError::Zstd { layer: name.into() }),
        _ => Box::new(file),
    })
}

/// The content of the regular file at `wanted` (absolute or relative) in one layer, if the
/// layer holds it.
pub fn read_file(layer: &Path, wanted: &str) -> Result<Option<Vec<u8>>, UnpackError> {
    let name = layer.display().to_string();
    let io = |source| UnpackError::Io {
        layer: name.clone(),
        source,
    };
    let Some(wanted) = relative(Path::new(wanted)) else {
        return Ok(None);
    };
    let mut archive = tar::Archive::new(open_layer(layer, &name)?);
    for entry in archive.entries().map_err(io)? {
        let mut entry = entry.map_err(io)?;
        let path = entry.path().map_err(io)?.into_owned();
        if entry.header().entry_type().is_file() && relative(&path).as_ref() == Some(&wanted) {
            let mut content = Vec::new();
            entry.read_to_end(&mut content).map_err(io)?;
            return Ok(Some(content));
        }
    }
    Ok(None)
}

/// One layer being applied to the rootfs.
struct Layer<'a> {
    root: &'a Root,
    name: &'a str,
    owners: Owners,
    /// What is left of `limit` for all the layers.
    room: &'a Cell<u64>,
    limit: u64,
}

impl Layer<'_> {
    fn io(&self, source: io::Error) -> UnpackError {
        UnpackError::Io {
            layer: self.name.into(),
            source,
        }
    }

    /// Takes `bytes` from the room left, or fails the layer.
    fn spend(&self, bytes: u64) -> Result<(), UnpackError> {
        let left = self
            .room
            .get()
            .checked_sub(bytes)
            .ok_or(UnpackError::TooLarge {
                layer: self.name.into(),
                limit: self.limit,
            })?;
        self.room.set(left);
        Ok(())
    }

    fn place(&self, path: &Path) -> impl FnOnce(pathrs::error::Error) -> UnpackError + '_ {
        let path = path.display().to_string();
        move |source| UnpackError::Place {
            layer: self.name.into(),
            path,
            source,
        }
    }

    /// Applies one uncompressed tar layer.
    fn apply(&self, reader: impl Read) -> Result<(), UnpackError> {
        let mut archive = tar::Archive::new(reader);
        // What this layer itself put in place: an opaque whiteout keeps these.
        let mut ours: HashSet<PathBuf> = HashSet::new();
        for entry in archive.entries().map_err(|e| self.io(e))? {
            let mut entry = entry.map_err(|e| self.io(e))?;
            let raw = entry.path().map_err(|e| self.io(e))?.into_owned();
            let relative = relative(&raw).ok_or_else(|| UnpackError::Escapes {
                layer: self.name.into(),
                path: raw.display().to_string(),
            })?;
            let Some(file_name) = relative.file_name().map(OsStr::to_string_lossy) else {
                continue; // the layer's root directory itself
            };
            let parent = relative.parent().unwrap_or(Path::new(""));
            if file_name == OPAQUE {
                self.empty_except(parent, &ours)?;
            } else if let Some(hidden) = file_name.strip_prefix(WHITEOUT) {
                self.remove(&parent.join(hidden))?;
            } else if self.entry(&mut entry, &relative)? {
                ours.insert(relative);
            }
        }
        Ok(())
    }

    /// Puts one entry in place; false for kinds a rootfs does not take (devices: the runtime
    /// makes /dev).
    fn entry<R: Read>(
        &self,
        entry: &mut tar::Entry<'_, R>,
        at: &Path,
    ) -> Result<bool, UnpackError> {
        self.spend(ENTRY_COST)?;
        let header = entry.header();
        let kind = header.entry_type();
        let mode = header.mode().map_err(|e| self.io(e))? & 0o7777;
        let owner = match self.owners {
            Owners::Agent => None,
            shifted => shifted.of(
                header.uid().map_err(|e| self.io(e))?,
                header.gid().map_err(|e| self.io(e))?,
            ),
        };
        let mtime = header.mtime().unwrap_or(0);
        let path = in_root(at);
        let perm = Permissions::from_mode(mode);
        if kind.is_dir() {
            // A directory merges with one below it; anything else at its place goes.
            let existing = self.root.resolve_nofollow(&path).ok();
            if existing.is_some_and(|h| !is_dir(&h)) {
                self.remove(at)?;
            }
            let handle = self
                .root
                .mkdir_all(&path, &perm)
                .map_err(self.place(&path))?;
            let dir = handle
                .reopen(OpenFlags::O_RDONLY | OpenFlags::O_DIRECTORY)
                .map_err(self.place(&path))?;
            self.own_and_mode(&dir, owner, Some(mode))?;
            return Ok(true);
        }
        if !(kind.is_file()
            || kind.is_symlink()
            || kind.is_hard_link()
            || kind.is_fifo()
            || kind == tar::EntryType::Continuous)
        {
            if !(kind.is_pax_global_extensions() || kind.is_pax_local_extensions()) {
                tracing::debug!(layer = self.name, path = %path.display(), ?kind, "skipped");
            }
            return Ok(false);
        }
        if let Some(parent) = at.parent() {
            self.root
                .mkdir_all(in_root(parent), &Permissions::from_mode(0o755))
                .map_err(self.place(parent))?;
        }
        self.remove(at)?;
        if kind.is_symlink() || kind.is_hard_link() {
            let target = entry
                .link_name()
                .map_err(|e| self.io(e))?
                .ok_or_else(|| self.io(io::Error::other(format!("{path:?} links to nothing"))))?
                .into_owned();
            let inode = if kind.is_symlink() {
                // Stored as written: it is only ever followed inside the rootfs.
                InodeType::Symlink(target)
            } else {
                let target = relative(&target).ok_or_else(|| UnpackError::Escapes {
                    layer: self.name.into(),
                    path: target.display().to_string(),
                })?;
                InodeType::Hardlink(in_root(&target))
            };
            self.root.create(&path, &inode).map_err(self.place(&path))?;
            if kind.is_symlink() {
                let link = self
                    .root
                    .resolve_nofollow(&path)
                    .map_err(self.place(&path))?;
                self.own_and_mode(&link, owner, None)?;
            }
            return Ok(true);
        }
        if kind.is_fifo() {
            self.root
                .create(&path, &InodeType::Fifo(perm))
                .map_err(self.place(&path))?;
            let fifo = self
                .root
                .resolve_nofollow(&path)
                .map_err(self.place(&path))?;
            self.own_and_mode(&fifo, owner, None)?;
            return Ok(true);
        }
        let flags = OpenFlags::O_WRONLY
            | OpenFlags::O_CREAT
            | OpenFlags::O_EXCL
            | OpenFlags::O_NOFOLLOW
            | OpenFlags::O_CLOEXEC;
        let mut file = self
            .root
            .create_file(&path, flags, &perm)
            .map_err(self.place(&path))?;
        // One byte past the room tells a layer that does not fit from one that just fits.
        let room = self.room.get();
        let copied =
            io::copy(&mut entry.take(room.saturating_add(1)), &mut file).map_err(|e| self.io(e))?;
        self.spend(copied)?;
        self.own_and_mode(&file, owner, Some(mode))?;
        let modified = std::time::UNIX_EPOCH + std::time::Duration::from_secs(mtime);
        file.set_modified(modified).map_err(|e| self.io(e))?;
        Ok(true)
    }

    /// Ownership first: a chown clears the set-id bits the mode then restores. `fd` may be
    /// an `O_PATH` handle (for a symlink itself); the mode needs an open file or directory.
    fn own_and_mode(
        &self,
        fd: impl AsFd,
        owner: Option<(u32, u32)>,
        mode: Option<u32>,
    ) -> Result<(), UnpackError> {
        if let Some((uid, gid)) = owner {
            let (uid, gid) = (Uid::from_raw(uid), Gid::from_raw(gid));
            rustix::fs::chownat(&fd, "", Some(uid), Some(gid), AtFlags::EMPTY_PATH)
                .map_err(|e| self.io(e.into()))?;
        }
        if let Some(mode) = mode {
            rustix::fs::fchmod(&fd, rustix::fs::Mode::from_raw_mode(mode))
                .map_err(|e| self.io(e.into()))?;
        }
        Ok(())
    }

    /// Removes whatever is at `relative` (a file, a symlink itself, a directory tree); absent
    /// is fine, and so is a parent that is not a directory.
    fn remove(&self, relative: &Path) -> Result<(), UnpackError> {
        let path = in_root(relative);
        match self.root.remove_all(&path) {
            Err(e) if !absent(&e) => Err(self.place(&path)(e)),
            _ => Ok(()),
        }
    }

    /// Deletes what lower layers put in the directory `relative`, keeping `ours`.
    fn empty_except(&self, relative: &Path, ours: &HashSet<PathBuf>) -> Result<(), UnpackError> {
        let path = in_root(relative);
        let dir = match self.root.resolve(&path) {
            Ok(dir) if is_dir(&dir) => dir,
            Ok(_) => return Ok(()),
            Err(e) if absent(&e) => return Ok(()),
            Err(e) => return Err(self.place(&path)(e)),
        };
        let listing = dir
            .reopen(OpenFlags::O_RDONLY | OpenFlags::O_DIRECTORY)
            .map_err(self.place(&path))?;
        let mut names = Vec::new();
        for entry in rustix::fs::Dir::read_from(&listing).map_err(|e| self.io(e.into()))? {
            let entry = entry.map_err(|e| self.io(e.into()))?;
            let name = OsStr::from_bytes(entry.file_name().to_bytes()).to_os_string();
            if name != "." && name != ".." {
                names.push(name);
            }
        }
        // Removal goes through the directory already resolved: no path is looked up again.
        let inside = Root::from_fd(dir);
        for name in names {
            let child = relative.join(&name);
            if !ours.iter().any(|p| p.starts_with(&child)) {
                match inside.remove_all(&name) {
                    Err(e) if !absent(&e) => return Err(self.place(&child)(e)),
                    _ => {}
                }
            }
        }
        Ok(())
    }
}

/// A tar path as a plain relative path (`./a/b` and `/a/b` become `a/b`); `None` with `..`.
fn relative(path: &Path) -> Option<PathBuf> {
    let mut out = PathBuf::new();
    for component in path.components() {
        match component {
            Component::Normal(part) => out.push(part),
            Component::CurDir | Component::RootDir => {}
            Component::ParentDir | Component::Prefix(_) => return None,
        }
    }
    Some(out)
}

/// A relative path as libpathrs takes it: from the root's `/`.
fn in_root(relative: &Path) -> PathBuf {
    Path::new("/").join(relative)
}

/// Whether a resolved handle is a directory (not a symlink to one: handles are not followed).
pub(crate) fn is_dir(handle: &pathrs::Handle) -> bool {
    rustix::fs::fstat(handle).is_ok_and(|s| {
        rustix::fs::FileType::from_raw_mode(s.st_mode) == rustix::fs::FileType::Directory
    })
}

/// A lookup that found nothing: the path, or a directory on its way, is not there.
fn absent(error: &pathrs::error::Error) -> bool {
    let not_there = [rustix::io::Errno::NOENT, rustix::io::Errno::NOTDIR].map(|e| e.raw_os_error());
    matches!(error.kind(), pathrs::error::ErrorKind::OsError(Some(n)) if not_there.contains(&n))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    /// One entry of a test layer.
    #[derive(Clone, Debug)]
    pub(super) enum Entry {
        Regular(String, String),
        Dir(String),
        Symlink(String, String),
        Hardlink(String, String),
    }
    use Entry::*;

    fn file(path: &str, content: &str) -> Entry {
        Regular(path.into(), content.into())
    }
    fn directory(path: &str) -> Entry {
        Dir(path.into())
    }
    fn symlink(path: &str, target: impl AsRef<Path>) -> Entry {
        Symlink(path.into(), target.as_ref().display().to_string())
    }
    fn hardlink(path: &str, target: impl AsRef<Path>) -> Entry {
        Hardlink(path.into(), target.as_ref().display().to_string())
    }

    /// A plain tar of `entries`, as a layer blob would hold it.
    pub(super) fn tar_of(entries: &[Entry]) -> Vec<u8> {
        let mut builder = tar::Builder::new(Vec::new());
        for entry in entries {
            let mut header = tar::Header::new_gnu();
            header.set_size(0);
            header.set_mode(0o755);
            // `append_data` refuses `..` in a name; the raw name goes in as the header says.
            let (path, kind, data, link) = match entry {
                Regular(path, text) => (path, tar::EntryType::Regular, text.as_bytes(), None),
                Dir(path) => (path, tar::EntryType::Directory, &b""[..], None),
                Symlink(path, to) => (path, tar::EntryType::Symlink, &b""[..], Some(to)),
                Hardlink(path, to) => (path, tar::EntryType::Link, &b""[..], Some(to)),
            };
            header.set_entry_type(kind);
            header.set_size(data.len() as u64);
            header.as_gnu_mut().unwrap().name[..path.len()].copy_from_slice(path.as_bytes());
            if let Some(to) = link {
                header.as_gnu_mut().unwrap().linkname[..to.len()].copy_from_slice(to.as_bytes());
            }
            header.set_cksum();
            builder.append(&header, data).unwrap();
        }
        builder.into_inner().unwrap()
    }

    fn layer(dir: &Path, name: &str, entries: &[Entry]) -> PathBuf {
        let path = dir.join(name);
        std::fs::write(&path, tar_of(entries)).unwrap();
        path
    }

    /// A scratch directory with an empty `rootfs` and, beside it, an `outside` directory
    /// holding the owner's `precious` file.
    fn scratch(name: &str) -> (PathBuf, PathBuf, PathBuf) {
        let dir = crate::fresh_test_dir(&format!("rootfs-{name}"));
        std::fs::create_dir_all(dir.join("rootfs")).unwrap();
        let outside = dir.join("outside");
        std::fs::create_dir_all(&outside).unwrap();
        std::fs::write(outside.join("precious"), "owner's").unwrap();
        (dir.clone(), dir.join("rootfs"), outside)
    }

    fn untouched(outside: &Path) {
        let names: Vec<_> = std::fs::read_dir(outside)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, ["precious"], "something was made or removed outside");
        let precious = outside.join("precious");
        assert_eq!(std::fs::read_to_string(&precious).unwrap(), "owner's");
        assert_eq!(
            std::fs::metadata(&precious).unwrap().nlink(),
            1,
            "hardlinked"
        );
    }

    #[test]
    fn layers_apply_in_order_with_whiteouts_and_opaque_directories() {
        let (dir, rootfs, _) = scratch("whiteouts");
        let lower = layer(
            &dir,
            "lower",
            &[
                directory("etc"),
                file("etc/keep", "1"),
                file("etc/gone", "2"),
                directory("opaque"),
                file("opaque/old", "3"),
                file("./replaced", "file"),
                directory("usr"),
                directory("usr/lib"),
                symlink("lib", "usr/lib"),
            ],
        );
        let upper = layer(
            &dir,
            "upper",
            &[
                file("etc/.wh.gone", ""),
                file("opaque/new", "4"),
                file("opaque/.wh..wh..opq", ""),
                directory("replaced"),
                file("replaced/inside", "5"),
                file("lib/libc.so", "6"),
                hardlink("etc/same", "/etc/keep"),
            ],
        );
        unpack(&[lower, upper], &rootfs, Owners::Agent, u64::MAX).unwrap();
        let read = |p: &str| std::fs::read_to_string(rootfs.join(p)).unwrap();
        assert_eq!(read("etc/keep"), "1");
        assert!(!rootfs.join("etc/gone").exists());
        assert!(!rootfs.join("etc/.wh.gone").exists());
        assert!(
            !rootfs.join("opaque/old").exists(),
            "the opaque directory hides lower entries"
        );
        assert_eq!(read("opaque/new"), "4");
        assert!(rootfs.join("replaced").is_dir());
        assert_eq!(read("replaced/inside"), "5");
        assert_eq!(
            read("usr/lib/libc.so"),
            "6",
            "written through lib -> usr/lib"
        );
        assert_eq!(read("etc/same"), "1");
        assert_eq!(
            std::fs::metadata(rootfs.join("etc/keep")).unwrap().nlink(),
            2
        );
    }

    #[test]
    fn one_file_is_read_out_of_a_layer() {
        let (dir, _, _) = scratch("read");
        let layer = layer(
            &dir,
            "app",
            &[directory("app"), file("app/main.wasm", "\0asm")],
        );
        assert_eq!(
            read_file(&layer, "/app/main.wasm").unwrap().unwrap(),
            b"\0asm"
        );
        assert_eq!(read_file(&layer, "app/other.wasm").unwrap(), None);
    }

    #[test]
    fn gzip_layers_unpack_and_zstd_is_refused_by_name() {
        let (dir, rootfs, _) = scratch("gzip");
        let plain = layer(&dir, "plain", &[file("hello", "hi")]);
        let gz = dir.join("gz");
        let mut encoder =
            flate2::write::GzEncoder::new(File::create(&gz).unwrap(), flate2::Compression::fast());
        io::copy(&mut File::open(&plain).unwrap(), &mut encoder).unwrap();
        encoder.finish().unwrap();
        unpack(&[gz], &rootfs, Owners::Agent, u64::MAX).unwrap();
        assert_eq!(std::fs::read_to_string(rootfs.join("hello")).unwrap(), "hi");

        let zstd = dir.join("zstd");
        std::fs::write(&zstd, [0x28, 0xb5, 0x2f, 0xfd, 0, 0]).unwrap();
        let error = unpack(&[zstd], &rootfs, Owners::Agent, u64::MAX).unwrap_err();
        assert!(error.to_string().contains("gzip"), "{error}");
    }

    /// The review's proof of concept: a symlink as the last component, then an opaque marker
    /// or a whiteout under it, with absolute and relative targets.
    #[test]
    fn whiteouts_through_a_layer_symlink_stay_in_the_rootfs() {
        let (dir, rootfs, outside) = scratch("whiteout-escape");
        let relative_way =
            "../../../../../../../../../..".to_string() + &outside.display().to_string();
        let links = layer(
            &dir,
            "links",
            &[
                symlink("abs", &outside),
                symlink("rel", &relative_way),
                directory("mid"),
                symlink("mid/link", &outside),
            ],
        );
        let whiteouts = layer(
            &dir,
            "whiteouts",
            &[
                file("abs/.wh..wh..opq", ""),
                file("rel/.wh..wh..opq", ""),
                file("abs/.wh.precious", ""),
                file("rel/.wh.precious", ""),
                file("mid/link/.wh.precious", ""),
                file("mid/link/.wh..wh..opq", ""),
            ],
        );
        unpack(&[links, whiteouts], &rootfs, Owners::Agent, u64::MAX).unwrap();
        untouched(&outside);
    }

    #[test]
    fn writes_and_links_through_symlinks_land_inside_the_rootfs() {
        let (dir, rootfs, outside) = scratch("write-escape");
        let precious = outside.join("precious");
        let in_root = outside.strip_prefix("/").unwrap().display().to_string();
        let first = layer(
            &dir,
            "first",
            &[
                directory(&in_root),
                symlink("out", &outside),
                symlink("up", "../../../../../../.."),
                symlink("precious-link", &precious),
                symlink("dangling", "/no/such/dir"),
            ],
        );
        let second = layer(
            &dir,
            "second",
            &[
                file("out/planted", "x"),
                file("up/planted", "y"),
                file("out/precious", "overwritten"),
                file("precious-link", "through the last component"),
                hardlink("hard", &precious),
            ],
        );
        unpack(&[first, second], &rootfs, Owners::Agent, u64::MAX).unwrap();
        untouched(&outside);
        // Every way out was a way to the same place inside.
        let inside = rootfs.join(&in_root);
        assert_eq!(
            std::fs::read_to_string(inside.join("planted")).unwrap(),
            "x"
        );
        let copy = inside.join("precious");
        assert_eq!(std::fs::read_to_string(&copy).unwrap(), "overwritten");
        assert_eq!(std::fs::metadata(&copy).unwrap().nlink(), 2, "the hardlink");
        assert_eq!(
            std::fs::read_to_string(rootfs.join("planted")).unwrap(),
            "y"
        );
        assert!(
            std::fs::symlink_metadata(rootfs.join("precious-link"))
                .unwrap()
                .is_file(),
            "the link itself was replaced"
        );
        // Through a link to nowhere inside, the layer fails.
        let dangling = layer(&dir, "dangling", &[file("dangling/x", "z")]);
        let error = unpack(&[dangling], &rootfs, Owners::Agent, u64::MAX).unwrap_err();
        assert!(error.to_string().contains("dangling"), "{error}");
        assert!(!Path::new("/no/such/dir").exists());
    }

    #[test]
    fn a_tar_bomb_stops_at_the_limit() {
        let (dir, rootfs, _) = scratch("bomb");
        let zeros = "\0".repeat(1 << 20);
        let big = layer(&dir, "big", &[file("zeros", &zeros)]);
        let gz = dir.join("big.gz");
        let mut encoder =
            flate2::write::GzEncoder::new(File::create(&gz).unwrap(), flate2::Compression::best());
        io::copy(&mut File::open(&big).unwrap(), &mut encoder).unwrap();
        encoder.finish().unwrap();
        assert!(
            std::fs::metadata(&gz).unwrap().len() < 4096,
            "compresses well"
        );
        let error =
            unpack(std::slice::from_ref(&gz), &rootfs, Owners::Agent, 64 << 10).unwrap_err();
        assert!(
            matches!(error, UnpackError::TooLarge { limit, .. } if limit == 64 << 10),
            "{error}"
        );
        assert!(error.to_string().contains("max_disk"), "{error}");
        let written = std::fs::metadata(rootfs.join("zeros")).unwrap().len();
        assert!(written <= (64 << 10) + 1, "stopped at the limit: {written}");

        // Many empty entries cost their headers.
        let names: Vec<String> = (0..200).map(|i| format!("f{i}")).collect();
        let entries: Vec<Entry> = names.iter().map(|n| file(n, "")).collect();
        let many = layer(&dir, "many", &entries);
        let fresh = dir.join("fresh");
        std::fs::create_dir_all(&fresh).unwrap();
        let error = unpack(
            std::slice::from_ref(&many),
            &fresh,
            Owners::Agent,
            100 * ENTRY_COST,
        )
        .unwrap_err();
        assert!(matches!(error, UnpackError::TooLarge { .. }), "{error}");
        let roomy = dir.join("roomy");
        std::fs::create_dir_all(&roomy).unwrap();
        unpack(
            &[many, gz],
            &roomy,
            Owners::Agent,
            200 * ENTRY_COST + ENTRY_COST + (1 << 20),
        )
        .unwrap();
    }

    #[test]
    fn owners_are_shifted_into_the_namespaces_range() {
        use std::os::unix::fs::MetadataExt;
        let (dir, rootfs, _) = scratch("shift");
        let mut builder = tar::Builder::new(Vec::new());
        for (name, uid, gid) in [
            ("root-file", 0, 0),
            ("app-file", 1000, 50),
            ("far", 70000, 0),
        ] {
            let mut header = tar::Header::new_gnu();
            header.set_size(1);
            header.set_mode(0o644);
            header.set_uid(uid);
            header.set_gid(gid);
            header.set_entry_type(tar::EntryType::Regular);
            builder.append_data(&mut header, name, &b"x"[..]).unwrap();
        }
        let path = dir.join("owned");
        std::fs::write(&path, builder.into_inner().unwrap()).unwrap();
        let shifted = Owners::Shifted {
            uid: 200_000,
            gid: 300_000,
        };
        unpack(&[path], &rootfs, shifted, u64::MAX).unwrap();
        let ids = |name: &str| {
            let meta = std::fs::metadata(rootfs.join(name)).unwrap();
            (meta.uid(), meta.gid())
        };
        assert_eq!(
            ids("root-file"),
            (200_000, 300_000),
            "root in the container"
        );
        assert_eq!(ids("app-file"), (201_000, 300_050));
        assert_eq!(ids("far"), (265_534, 300_000), "past the range: nobody");
    }

    #[test]
    fn parent_directory_names_are_refused() {
        let (dir, rootfs, outside) = scratch("dotdot");
        let bad = layer(&dir, "bad", &[file("../outside/precious", "x")]);
        let error = unpack(&[bad], &rootfs, Owners::Agent, u64::MAX).unwrap_err();
        assert!(matches!(error, UnpackError::Escapes { .. }), "{error}");
        let bad_link = layer(&dir, "bad-link", &[hardlink("h", "../outside/precious")]);
        let error = unpack(&[bad_link], &rootfs, Owners::Agent, u64::MAX).unwrap_err();
        assert!(matches!(error, UnpackError::Escapes { .. }), "{error}");
        untouched(&outside);
    }

    /// A path a hostile layer might use: a few names, links' names, whiteouts, `.` and `..`.
    fn hostile_path() -> impl proptest::strategy::Strategy<Value = String> {
        use proptest::prelude::*;
        let part = prop::sample::select(vec![
            "a",
            "b",
            "l",
            "m",
            ".",
            "..",
            ".wh.a",
            ".wh.l",
            ".wh..wh..opq",
            "precious",
        ]);
        (any::<bool>(), prop::collection::vec(part, 1..4)).prop_map(|(absolute, parts)| {
            format!("{}{}", if absolute { "/" } else { "" }, parts.join("/"))
        })
    }

    fn hostile_layer(
        outside: String,
        scratch: String,
    ) -> impl proptest::strategy::Strategy<Value = Vec<Entry>> {
        use proptest::prelude::*;
        let targets = prop::sample::select(vec![
            outside.clone(),
            format!("{outside}/precious"),
            scratch,
            "/".into(),
            "../../../../../../..".into(),
            format!("../../../../../../..{outside}"),
            "a".into(),
            "l/a".into(),
            "..".into(),
        ]);
        let entry = prop_oneof![
            (hostile_path(), "[a-z]{0,3}").prop_map(|(p, c)| Regular(p, c)),
            hostile_path().prop_map(Dir),
            (hostile_path(), targets.clone()).prop_map(|(p, t)| Symlink(p, t)),
            (hostile_path(), targets).prop_map(|(p, t)| Hardlink(p, t)),
        ];
        prop::collection::vec(entry, 1..10)
    }

    static CASE: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

    proptest::proptest! {
        #![proptest_config(proptest::test_runner::Config {
            cases: 200,
            failure_persistence: None,
            ..Default::default()
        })]

        /// Whatever the layers say, nothing is created, changed or removed outside the rootfs.
        #[test]
        fn no_layer_reaches_outside_the_rootfs(
            layers in proptest::collection::vec(
                hostile_layer(
                    std::env::temp_dir().join("darkcore-fuzz-outside").display().to_string(),
                    std::env::temp_dir().display().to_string(),
                ),
                1..4,
            )
        ) {
            let case = CASE.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let dir = crate::fresh_test_dir(&format!("rootfs-fuzz-{case}"));
            let rootfs = dir.join("rootfs");
            std::fs::create_dir_all(&rootfs).unwrap();
            // The targets name one shared `outside`: the cases run one after another.
            let outside = std::env::temp_dir().join("darkcore-fuzz-outside");
            std::fs::create_dir_all(&outside).unwrap();
            std::fs::write(outside.join("precious"), "owner's").unwrap();
            let blobs: Vec<PathBuf> = layers
                .iter()
                .enumerate()
                .map(|(i, entries)| layer(&dir, &format!("layer{i}"), entries))
                .collect();
            let _ = unpack(&blobs, &rootfs, Owners::Agent, u64::MAX);
            untouched(&outside);
            let mut beside: Vec<String> = std::fs::read_dir(&dir)
                .unwrap()
                .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect();
            beside.sort();
            let mut expected: Vec<String> = (0..blobs.len()).map(|i| format!("layer{i}")).collect();
            expected.push("rootfs".into());
            expected.sort();
            proptest::prop_assert_eq!(beside, expected);
            std::fs::remove_dir_all(&dir).unwrap();
        }
    }
}
