//! An image's root filesystem for the `oci` runtime: its layers (tar, gzip-compressed or not)
//! applied in order, with OCI whiteouts (`.wh.NAME` deletes NAME from lower layers, and
//! `.wh..wh..opq` empties its directory of them).
//!
//! Nothing a layer says may touch the device outside the rootfs: paths with `..` are refused,
//! and no path is followed through a symlink a layer made.

use std::collections::HashSet;
use std::fs::File;
use std::io::{self, BufReader, Read};
use std::path::{Component, Path, PathBuf};

use flate2::read::GzDecoder;

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

/// Applies `layers` (blob files, lowest first) onto the empty directory `rootfs`.
/// `owners`: keep the uid and gid the layers give their files (the agent runs as root).
pub fn unpack(layers: &[PathBuf], rootfs: &Path, owners: bool) -> Result<(), UnpackError> {
    for layer in layers {
        let name = layer
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let reader = open_layer(layer, &name)?;
        apply(reader, rootfs, owners, &name)?;
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

/// Applies one uncompressed tar layer.
fn apply(reader: impl Read, rootfs: &Path, owners: bool, layer: &str) -> Result<(), UnpackError> {
    let io = |source| UnpackError::Io {
        layer: layer.into(),
        source,
    };
    let mut archive = tar::Archive::new(reader);
    archive.set_preserve_permissions(true);
    archive.set_preserve_ownerships(owners);
    archive.set_preserve_mtime(true);
    archive.set_unpack_xattrs(false);
    archive.set_overwrite(true);
    // What this layer itself put in place: an opaque whiteout keeps these.
    let mut ours: HashSet<PathBuf> = HashSet::new();
    for entry in archive.entries().map_err(io)? {
        let mut entry = entry.map_err(io)?;
        let raw = entry.path().map_err(io)?.into_owned();
        let relative = relative(&raw).ok_or_else(|| UnpackError::Escapes {
            layer: layer.into(),
            path: raw.display().to_string(),
        })?;
        let Some(file_name) = relative
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
        else {
            continue; // the layer's root directory itself
        };
        let parent = relative.parent().unwrap_or(Path::new(""));
        if file_name == OPAQUE {
            if let Some(dir) = inside(rootfs, parent) {
                empty_except(&dir, parent, &ours).map_err(io)?;
            }
            continue;
        }
        if let Some(hidden) = file_name.strip_prefix(WHITEOUT) {
            if let Some(target) = inside(rootfs, &parent.join(hidden)) {
                remove_any(&target).map_err(io)?;
            }
            continue;
        }
        let Some(target) = inside(rootfs, &relative) else {
            // A parent is a symlink: following it could write anywhere.
            return Err(UnpackError::Escapes {
                layer: layer.into(),
                path: raw.display().to_string(),
            });
        };
        // A directory replacing a file, or anything replacing a directory, goes in cleanly.
        if let Ok(existing) = target.symlink_metadata() {
            let is_dir = entry.header().entry_type().is_dir();
            if existing.is_dir() != is_dir || (!is_dir && existing.file_type().is_symlink()) {
                remove_any(&target).map_err(io)?;
            }
        }
        entry.unpack_in(rootfs).map_err(io)?;
        ours.insert(relative);
    }
    Ok(())
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

/// `relative` under `rootfs`, if no directory on the way is a symlink.
fn inside(rootfs: &Path, relative: &Path) -> Option<PathBuf> {
    let mut path = rootfs.to_path_buf();
    let mut components = relative.components().peekable();
    while let Some(component) = components.next() {
        path.push(component);
        if components.peek().is_some()
            && path
                .symlink_metadata()
                .is_ok_and(|m| m.file_type().is_symlink())
        {
            return None;
        }
    }
    Some(path)
}

/// Removes a file, symlink or directory tree; absent is fine.
fn remove_any(path: &Path) -> io::Result<()> {
    let result = match path.symlink_metadata() {
        Ok(meta) if meta.is_dir() => std::fs::remove_dir_all(path),
        Ok(_) => std::fs::remove_file(path),
        Err(e) => Err(e),
    };
    match result {
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        other => other,
    }
}

/// Deletes what lower layers put in `dir` (`relative` inside the rootfs), keeping `ours`.
fn empty_except(dir: &Path, relative: &Path, ours: &HashSet<PathBuf>) -> io::Result<()> {
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    for entry in entries.flatten() {
        let child = relative.join(entry.file_name());
        if !ours.iter().any(|p| p.starts_with(&child)) {
            remove_any(&entry.path())?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A layer file in `dir` holding `entries`: (path, Some(content)) for files, None for
    /// directories; `links` are (path, target) symlinks.
    fn layer(
        dir: &Path,
        name: &str,
        entries: &[(&str, Option<&str>)],
        links: &[(&str, &str)],
    ) -> PathBuf {
        let path = dir.join(name);
        let mut builder = tar::Builder::new(File::create(&path).unwrap());
        for (entry, content) in entries {
            let mut header = tar::Header::new_gnu();
            match content {
                Some(text) => {
                    header.set_entry_type(tar::EntryType::Regular);
                    header.set_size(text.len() as u64);
                    header.set_mode(0o644);
                    builder
                        .append_data(&mut header, entry, text.as_bytes())
                        .unwrap();
                }
                None => {
                    header.set_entry_type(tar::EntryType::Directory);
                    header.set_size(0);
                    header.set_mode(0o755);
                    builder
                        .append_data(&mut header, entry, io::empty())
                        .unwrap();
                }
            }
        }
        for (entry, target) in links {
            let mut header = tar::Header::new_gnu();
            header.set_entry_type(tar::EntryType::Symlink);
            header.set_size(0);
            builder.append_link(&mut header, entry, target).unwrap();
        }
        builder.finish().unwrap();
        path
    }

    fn scratch(name: &str) -> PathBuf {
        let dir = crate::fresh_test_dir(&format!("rootfs-{name}"));
        std::fs::create_dir_all(dir.join("rootfs")).unwrap();
        dir
    }

    #[test]
    fn layers_apply_in_order_with_whiteouts_and_opaque_directories() {
        let dir = scratch("whiteouts");
        let lower = layer(
            &dir,
            "lower",
            &[
                ("etc", None),
                ("etc/keep", Some("1")),
                ("etc/gone", Some("2")),
                ("opaque", None),
                ("opaque/old", Some("3")),
                ("./replaced", Some("file")),
            ],
            &[],
        );
        let upper = layer(
            &dir,
            "upper",
            &[
                ("etc/.wh.gone", Some("")),
                ("opaque/new", Some("4")),
                ("opaque/.wh..wh..opq", Some("")),
                ("replaced", None),
                ("replaced/inside", Some("5")),
            ],
            &[],
        );
        let rootfs = dir.join("rootfs");
        unpack(&[lower, upper], &rootfs, false).unwrap();
        assert_eq!(
            std::fs::read_to_string(rootfs.join("etc/keep")).unwrap(),
            "1"
        );
        assert!(!rootfs.join("etc/gone").exists());
        assert!(!rootfs.join("etc/.wh.gone").exists());
        assert!(
            !rootfs.join("opaque/old").exists(),
            "the opaque directory hides lower entries"
        );
        assert_eq!(
            std::fs::read_to_string(rootfs.join("opaque/new")).unwrap(),
            "4"
        );
        assert!(rootfs.join("replaced").is_dir());
        assert_eq!(
            std::fs::read_to_string(rootfs.join("replaced/inside")).unwrap(),
            "5"
        );
    }

    #[test]
    fn one_file_is_read_out_of_a_layer() {
        let dir = scratch("read");
        let layer = layer(
            &dir,
            "app",
            &[("app", None), ("app/main.wasm", Some("\0asm"))],
            &[],
        );
        assert_eq!(
            read_file(&layer, "/app/main.wasm").unwrap().unwrap(),
            b"\0asm"
        );
        assert_eq!(read_file(&layer, "app/other.wasm").unwrap(), None);
    }

    #[test]
    fn gzip_layers_unpack_and_zstd_is_refused_by_name() {
        let dir = scratch("gzip");
        let plain = layer(&dir, "plain", &[("hello", Some("hi"))], &[]);
        let gz = dir.join("gz");
        let mut encoder =
            flate2::write::GzEncoder::new(File::create(&gz).unwrap(), flate2::Compression::fast());
        io::copy(&mut File::open(&plain).unwrap(), &mut encoder).unwrap();
        encoder.finish().unwrap();
        unpack(&[gz], &dir.join("rootfs"), false).unwrap();
        assert_eq!(
            std::fs::read_to_string(dir.join("rootfs/hello")).unwrap(),
            "hi"
        );

        let zstd = dir.join("zstd");
        std::fs::write(&zstd, [0x28, 0xb5, 0x2f, 0xfd, 0, 0]).unwrap();
        let error = unpack(&[zstd], &dir.join("rootfs"), false).unwrap_err();
        assert!(error.to_string().contains("gzip"), "{error}");
    }

    #[test]
    fn nothing_is_written_or_deleted_through_a_symlink_out_of_the_rootfs() {
        let dir = scratch("escape");
        let outside = dir.join("outside");
        std::fs::create_dir_all(&outside).unwrap();
        std::fs::write(outside.join("precious"), "owner's").unwrap();
        let links = layer(&dir, "links", &[], &[("out", outside.to_str().unwrap())]);
        let whiteout = layer(&dir, "whiteout", &[("out/.wh.precious", Some(""))], &[]);
        let write = layer(&dir, "write", &[("out/planted", Some("x"))], &[]);
        let rootfs = dir.join("rootfs");
        unpack(&[links.clone(), whiteout], &rootfs, false).unwrap();
        assert!(
            outside.join("precious").exists(),
            "a whiteout through a symlink is ignored"
        );
        let error = unpack(&[write], &rootfs, false).unwrap_err();
        assert!(matches!(error, UnpackError::Escapes { .. }), "{error}");
        assert!(!outside.join("planted").exists());
    }
}
