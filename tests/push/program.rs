//! Images of one program each, built without a Docker engine: the program, the shared
//! libraries it loads, a passwd, and /tmp (the real node's sandbox image, metrics-server).

use crate::images::{Layer, client, oci_arch, push_image};
use oci_client::Reference;

/// The shared libraries `ldd` lists (the loader too), as absolute paths; none for a static
/// program.
pub fn libraries_in(ldd_output: &str) -> Vec<String> {
    ldd_output
        .lines()
        .filter_map(|line| {
            let line = line.trim();
            let path = match line.split_once(" => ") {
                Some((_, rest)) => rest.split_whitespace().next()?,
                None => line.split_whitespace().next()?,
            };
            path.starts_with('/').then(|| path.to_string())
        })
        .collect()
}

/// The uid and gid of `nonroot` in [`push_program_to`]'s images, as distroless names it.
pub const NONROOT_UID: u32 = 65532;

/// Pushes an image of one program, built without a Docker engine: `binary` at
/// /usr/local/bin/NAME with the shared libraries `ldd` names for it at their paths, a passwd
/// with root and `nonroot`, and /tmp. Its entrypoint runs the program with `args`. Returns the
/// reference.
pub async fn push_program_to(
    registry: &str,
    repository_and_tag: &str,
    binary: &std::path::Path,
    args: &[String],
) -> String {
    let name = binary
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or_else(|| panic!("{} names no file", binary.display()));
    let program =
        std::fs::read(binary).unwrap_or_else(|e| panic!("reading {}: {e}", binary.display()));
    let ldd = std::process::Command::new("ldd")
        .arg(binary)
        .output()
        .expect("ldd runs");
    let mut layer = Layer::new();
    for (path, mode) in [("etc", 0o755), ("tmp", 0o1777), ("usr", 0o755)] {
        layer.dir(path, mode, 0);
    }
    layer.dir("usr/local", 0o755, 0);
    layer.dir("usr/local/bin", 0o755, 0);
    layer.file(&format!("usr/local/bin/{name}"), 0o755, &program);
    let mut dirs = std::collections::BTreeSet::new();
    for library in libraries_in(&String::from_utf8_lossy(&ldd.stdout)) {
        let relative = library.trim_start_matches('/');
        let mut dir = std::path::Path::new(relative).parent();
        let mut missing = Vec::new();
        while let Some(d) = dir.filter(|d| !d.as_os_str().is_empty()) {
            if dirs.insert(d.to_path_buf()) {
                missing.push(d.to_string_lossy().into_owned());
            }
            dir = d.parent();
        }
        for d in missing.iter().rev() {
            layer.dir(d, 0o755, 0);
        }
        // The library's content at the path the loader looks for, symlinks followed.
        let content = std::fs::read(&library).unwrap_or_else(|e| panic!("reading {library}: {e}"));
        layer.file(relative, 0o755, &content);
    }
    layer.accounts("/sbin/nologin", ("nonroot", NONROOT_UID, "/tmp"));
    let (layer, diff_id) = layer.finish();
    let mut entrypoint = vec![format!("/usr/local/bin/{name}")];
    entrypoint.extend(args.iter().cloned());
    let config = serde_json::json!({
        "architecture": oci_arch(),
        "os": "linux",
        "config": { "Entrypoint": entrypoint, "Env": ["PATH=/usr/local/bin"] },
        "rootfs": { "type": "layers", "diff_ids": [diff_id] },
    });
    let reference = format!("{registry}/{repository_and_tag}");
    let parsed: Reference = reference
        .parse()
        .unwrap_or_else(|e| panic!("{reference}: {e}"));
    push_image(&client(), &parsed, vec![layer], &config).await;
    reference
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_libraries_ldd_names_are_found_with_the_loader_and_without_the_vdso() {
        let ldd = "\tlinux-vdso.so.1 (0x00007ffd)\n\tlibgcc_s.so.1 => /lib/x86_64-linux-gnu/libgcc_s.so.1 (0x00007f)\n\tlibc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x00007f)\n\t/lib64/ld-linux-x86-64.so.2 (0x00007f)\n";
        assert_eq!(
            libraries_in(ldd),
            [
                "/lib/x86_64-linux-gnu/libgcc_s.so.1",
                "/lib/x86_64-linux-gnu/libc.so.6",
                "/lib64/ld-linux-x86-64.so.2"
            ]
        );
        assert!(libraries_in("\tnot a dynamic executable\n").is_empty());
    }
}
