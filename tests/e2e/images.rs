//! The tests' images, built at test time and pushed to the registry that tests/cluster/up
//! runs on loopback: WebAssembly modules written as WAT, pushed as wasm OCI artifacts, and a
//! container image made from the machine's static busybox, pushed as a multi-arch index.

use oci_client::client::{ClientConfig, ClientProtocol, Config, ImageLayer};
use oci_client::secrets::RegistryAuth;
use oci_client::{Client, Reference};

/// The user and password of the private registry tests/cluster/up runs (test-only).
pub const PRIVATE_USER: &str = "darkcore";
pub const PRIVATE_PASSWORD: &str = "darkcore-test-pull";

/// The loopback registry's host:port, from the cluster's ports.env (beside KUBECONFIG).
pub fn registry() -> String {
    loopback_port("REGISTRY_PORT")
}

/// The loopback registry that asks for `PRIVATE_USER` and `PRIVATE_PASSWORD`.
pub fn private_registry() -> String {
    loopback_port("PRIVATE_REGISTRY_PORT")
}

fn loopback_port(key: &str) -> String {
    let kubeconfig = std::env::var("KUBECONFIG").expect("KUBECONFIG is set by make test");
    let ports = std::path::Path::new(&kubeconfig).with_file_name("ports.env");
    let text = std::fs::read_to_string(&ports)
        .unwrap_or_else(|e| panic!("reading {}: {e}", ports.display()));
    let port = text
        .lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix('='))
        .unwrap_or_else(|| panic!("no {key} in {}: run tests/cluster/up", ports.display()));
    format!("127.0.0.1:{port}")
}

/// Assembles `wat` and pushes it as a wasm OCI artifact at `<registry>/<repository>:<tag>`;
/// returns the full reference and the manifest URL.
pub async fn push_wasm(repository_and_tag: &str, wat: &str) -> (String, String) {
    push_wasm_to(
        &registry(),
        RegistryAuth::Anonymous,
        repository_and_tag,
        wat,
    )
    .await
}

/// As `push_wasm`, to the given registry with the given credentials.
pub async fn push_wasm_to(
    registry: &str,
    auth: RegistryAuth,
    repository_and_tag: &str,
    wat: &str,
) -> (String, String) {
    let module = wat::parse_str(wat).expect("the test's WAT assembles");
    let layer = ImageLayer::new(module, "application/wasm".into(), None);
    let config = Config::new(
        b"{}".to_vec(),
        "application/vnd.wasm.config.v0+json".into(),
        None,
    );
    let reference = format!("{registry}/{repository_and_tag}");
    let pushed = client()
        .push(
            &reference.parse::<Reference>().unwrap(),
            &[layer],
            config,
            &auth,
            None,
        )
        .await
        .unwrap_or_else(|e| panic!("pushing {reference}: {e}"));
    (reference, pushed.manifest_url)
}

/// Pushes an image of one gzip layer and an OCI image config.
pub async fn push_image(
    client: &Client,
    reference: &Reference,
    layers: Vec<Vec<u8>>,
    config: &serde_json::Value,
) {
    let layers: Vec<ImageLayer> = layers
        .into_iter()
        .map(|layer| {
            ImageLayer::new(
                layer,
                "application/vnd.oci.image.layer.v1.tar+gzip".into(),
                None,
            )
        })
        .collect();
    let config = Config::new(
        config.to_string().into_bytes(),
        "application/vnd.oci.image.config.v1+json".into(),
        None,
    );
    client
        .push(reference, &layers, config, &RegistryAuth::Anonymous, None)
        .await
        .unwrap_or_else(|e| panic!("pushing {reference}: {e}"));
}

fn gzip(bytes: &[u8]) -> Vec<u8> {
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    std::io::Write::write_all(&mut gz, bytes).unwrap();
    gz.finish().unwrap()
}

pub fn client() -> Client {
    let _ = rustls::crypto::ring::default_provider().install_default();
    Client::new(ClientConfig {
        protocol: ClientProtocol::Http,
        ..Default::default()
    })
}

/// Pushes `wat`, assembled, as a plain image: one gzip tar layer holding the module at
/// `path`, and a config whose Entrypoint is `path`. Returns the reference.
pub async fn push_wasm_in_layer(repository_and_tag: &str, wat: &str, path: &str) -> String {
    let module = wat::parse_str(wat).expect("the test's WAT assembles");
    let mut layer = Layer::new();
    layer.file(path.trim_start_matches('/'), 0o644, &module);
    let (layer, diff_id) = layer.finish();
    let config = serde_json::json!({
        "architecture": "wasm",
        "os": "wasip1",
        "config": { "Entrypoint": [path] },
        "rootfs": { "type": "layers", "diff_ids": [diff_id] },
    });
    let reference = format!("{}/{repository_and_tag}", registry());
    push_image(&client(), &reference.parse().unwrap(), vec![layer], &config).await;
    reference
}

/// `text` as the body of a WAT string literal.
fn wat_bytes(text: &str) -> String {
    text.bytes().map(|b| format!("\\{b:02x}")).collect()
}

/// A module that loops without ever calling the host.
pub const WAT_SPIN: &str = r#"(module
  (memory (export "memory") 1)
  (func (export "_start") (loop $spin (br $spin))))"#;

/// A WASI command that writes `text` to stdout (fd 1) and exits with `code`.
pub fn wat_printing(text: &str, code: i32) -> String {
    let bytes = wat_bytes(text);
    format!(
        r#"(module
  (import "wasi_snapshot_preview1" "fd_write" (func $fd_write (param i32 i32 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "proc_exit" (func $proc_exit (param i32)))
  (memory (export "memory") 1)
  (data (i32.const 64) "{bytes}")
  (func (export "_start")
    (i32.store (i32.const 0) (i32.const 64))
    (i32.store (i32.const 4) (i32.const {len}))
    (drop (call $fd_write (i32.const 1) (i32.const 0) (i32.const 1) (i32.const 32)))
    (call $proc_exit (i32.const {code}))))"#,
        len = text.len()
    )
}

/// A module whose `_start` traps (unreachable).
pub const WAT_TRAP: &str = r#"(module
  (memory (export "memory") 1)
  (func (export "_start") unreachable))"#;

/// The user a container image's `/etc/passwd` names besides root.
pub const IMAGE_USER_UID: u32 = 1000;

/// Builds a container image from this machine's static busybox (Debian's busybox-static,
/// which tests/cluster/up installs) and pushes it as a multi-arch index with an entry for
/// this machine's platform. Its config: Cmd `sh -c 'echo image default'`, Env `FROM_IMAGE=yes`
/// and `SHARED=image`, WorkingDir `/home/app`. Returns the reference and the layer's digest.
pub async fn push_busybox(repository_and_tag: &str) -> (String, String) {
    push_busybox_to(&registry(), repository_and_tag).await
}

/// As `push_busybox`, to the given (plain-HTTP) registry.
pub async fn push_busybox_to(registry: &str, repository_and_tag: &str) -> (String, String) {
    push_busybox_with(registry, repository_and_tag, &[]).await
}

/// As `push_busybox_to`, with `extra` layers (plain tars, gzipped here) above busybox's.
pub async fn push_busybox_with(
    registry: &str,
    repository_and_tag: &str,
    extra: &[Vec<u8>],
) -> (String, String) {
    use oci_client::manifest::OciImageIndex;
    let (layer, diff_id) = busybox_layer();
    let layer_digest = format!("sha256:{}", sha256_hex(&layer));
    let mut diff_ids = vec![diff_id];
    let mut layers = vec![layer];
    for tar in extra {
        diff_ids.push(format!("sha256:{}", sha256_hex(tar)));
        layers.push(gzip(tar));
    }
    let arch = oci_arch();
    let config = serde_json::json!({
        "architecture": arch,
        "os": "linux",
        "config": {
            "Cmd": ["sh", "-c", "echo image default"],
            "Env": ["PATH=/bin", "FROM_IMAGE=yes", "SHARED=image"],
            "WorkingDir": "/home/app",
        },
        "rootfs": { "type": "layers", "diff_ids": diff_ids },
    });
    let reference = format!("{registry}/{repository_and_tag}");
    let platform_ref: Reference = format!("{reference}-linux-{arch}").parse().unwrap();
    let client = client();
    let auth = RegistryAuth::Anonymous;
    push_image(&client, &platform_ref, layers, &config).await;
    let (manifest, digest) = client
        .pull_manifest_raw(
            &platform_ref,
            &auth,
            &["application/vnd.oci.image.manifest.v1+json"],
        )
        .await
        .unwrap();
    let index: OciImageIndex = serde_json::from_value(serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [{
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": digest,
            "size": manifest.len(),
            "platform": { "architecture": arch, "os": "linux" },
        }],
    }))
    .unwrap();
    client
        .push_manifest_list(&reference.parse().unwrap(), &auth, index)
        .await
        .unwrap_or_else(|e| panic!("pushing the index {reference}: {e}"));
    (reference, layer_digest)
}

/// This machine's architecture as OCI platforms name it.
pub fn oci_arch() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        other => other,
    }
}

/// Pushes busybox as [`push_busybox_with`] does, then its platform manifest again with the
/// layer's size declared `short` bytes smaller, as `<reference>-understated`: an image whose
/// registry serves more than it promised. Returns that reference.
pub async fn push_understated_busybox(
    registry: &str,
    repository_and_tag: &str,
    short: i64,
) -> String {
    use oci_client::manifest::{OciImageManifest, OciManifest};
    let (reference, _) = push_busybox_with(registry, repository_and_tag, &[]).await;
    let platform: Reference = format!("{reference}-linux-{}", oci_arch()).parse().unwrap();
    let client = client();
    let (raw, _) = client
        .pull_manifest_raw(
            &platform,
            &RegistryAuth::Anonymous,
            &["application/vnd.oci.image.manifest.v1+json"],
        )
        .await
        .unwrap();
    let mut manifest: OciImageManifest = serde_json::from_slice(&raw).unwrap();
    manifest.layers[0].size -= short;
    let lying = format!("{reference}-understated");
    client
        .push_manifest(&lying.parse().unwrap(), &OciManifest::Image(manifest))
        .await
        .unwrap_or_else(|e| panic!("pushing {lying}: {e}"));
    lying
}

/// How often the loopback registry has served the blob `digest` of `repository` (its access
/// log is cluster/logs/registry.log, beside KUBECONFIG).
pub fn blob_fetches(repository: &str, digest: &str) -> usize {
    let kubeconfig = std::env::var("KUBECONFIG").expect("KUBECONFIG is set by make test");
    let log = std::path::Path::new(&kubeconfig).with_file_name("logs/registry.log");
    let needle = format!("\"GET /v2/{repository}/blobs/{digest} ");
    std::fs::read_to_string(&log)
        .unwrap_or_else(|e| panic!("reading {}: {e}", log.display()))
        .lines()
        .filter(|l| l.contains(&needle))
        .count()
}

/// A layer being written: a tar whose entries all have mtime 0, so that the same content
/// always gives the same digest.
pub struct Layer(tar::Builder<Vec<u8>>);

impl Layer {
    pub fn new() -> Layer {
        Layer(tar::Builder::new(Vec::new()))
    }

    fn header(kind: tar::EntryType, mode: u32, uid: u64, size: u64) -> tar::Header {
        let mut header = tar::Header::new_gnu();
        header.set_entry_type(kind);
        header.set_mode(mode);
        header.set_uid(uid);
        header.set_gid(uid);
        header.set_mtime(0);
        header.set_size(size);
        header
    }

    pub fn dir(&mut self, path: &str, mode: u32, uid: u64) {
        let mut header = Layer::header(tar::EntryType::Directory, mode, uid, 0);
        self.0
            .append_data(&mut header, path, std::io::empty())
            .unwrap();
    }

    pub fn file(&mut self, path: &str, mode: u32, content: &[u8]) {
        let size = content.len() as u64;
        let mut header = Layer::header(tar::EntryType::Regular, mode, 0, size);
        self.0.append_data(&mut header, path, content).unwrap();
    }

    pub fn symlink(&mut self, path: &str, target: &str) {
        let mut header = Layer::header(tar::EntryType::Symlink, 0o777, 0, 0);
        self.0.append_link(&mut header, path, target).unwrap();
    }

    /// `/etc/passwd` and `/etc/group` with root and one `user` (name, uid and gid, home), both
    /// with login shell `shell`.
    pub fn accounts(&mut self, shell: &str, (name, id, home): (&str, u32, &str)) {
        let passwd =
            format!("root:x:0:0:root:/root:{shell}\n{name}:x:{id}:{id}:{name}:{home}:{shell}\n");
        self.file("etc/passwd", 0o644, passwd.as_bytes());
        let group = format!("root:x:0:\n{name}:x:{id}:\n");
        self.file("etc/group", 0o644, group.as_bytes());
    }

    /// The gzipped layer and its diff id.
    pub fn finish(self) -> (Vec<u8>, String) {
        let tar = self.0.into_inner().unwrap();
        let diff_id = format!("sha256:{}", sha256_hex(&tar));
        (gzip(&tar), diff_id)
    }
}

/// One gzip layer: busybox with its applets as symlinks, a passwd with `app` (uid 1000), and
/// the directories a container expects. Returns the layer and its diff id.
fn busybox_layer() -> (Vec<u8>, String) {
    let busybox = std::fs::read("/bin/busybox")
        .expect("/bin/busybox (Debian's busybox-static) is installed by tests/cluster/up");
    let mut layer = Layer::new();
    for (path, mode, uid) in [
        ("bin", 0o755, 0),
        ("etc", 0o755, 0),
        ("home", 0o755, 0),
        ("home/app", 0o755, u64::from(IMAGE_USER_UID)),
        ("root", 0o700, 0),
        ("tmp", 0o1777, 0),
    ] {
        layer.dir(path, mode, uid);
    }
    layer.file("bin/busybox", 0o755, &busybox);
    layer.accounts("/bin/sh", ("app", IMAGE_USER_UID, "/home/app"));
    for applet in [
        "sh", "echo", "cat", "sleep", "dd", "head", "id", "ls", "touch", "pwd", "test", "true",
        "mkdir", "stat", "ln", "tar",
    ] {
        layer.symlink(&format!("bin/{applet}"), "busybox");
    }
    layer.finish()
}

fn sha256_hex(bytes: &[u8]) -> String {
    ring::digest::digest(&ring::digest::SHA256, bytes)
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// A module that grows its memory by `pages` of 64 KiB, then prints "grew".
pub fn wat_growing(pages: u32) -> String {
    format!(
        r#"(module
  (import "wasi_snapshot_preview1" "fd_write" (func $fd_write (param i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 1)
  (data (i32.const 64) "grew\0a")
  (func (export "_start")
    (drop (memory.grow (i32.const {pages})))
    (i32.store (i32.const 0) (i32.const 64))
    (i32.store (i32.const 4) (i32.const 5))
    (drop (call $fd_write (i32.const 1) (i32.const 0) (i32.const 1) (i32.const 32)))))"#
    )
}

/// A module that tries to open each of `escapes` through its first preopened directory (a
/// volume) and exits 1 if any opens; then creates `inside` there (exit 2 if it cannot), and
/// prints "escape refused, volume written".
pub fn wat_escape_probe(escapes: &[&str]) -> String {
    let mut data = String::new();
    let mut tries = String::new();
    let mut at = 1024;
    for path in escapes {
        let bytes = wat_bytes(path);
        data.push_str(&format!("  (data (i32.const {at}) \"{bytes}\")\n"));
        tries.push_str(&format!(
            "    (if (i32.eqz (call $path_open (i32.const 3) (i32.const 0) (i32.const {at}) (i32.const {len}) (i32.const 0) (i64.const 2) (i64.const 0) (i32.const 0) (i32.const 8)))
      (then (call $proc_exit (i32.const 1))))\n",
            len = path.len()
        ));
        at += path.len() + 16;
    }
    let message = "escape refused, volume written\n";
    format!(
        r#"(module
  (import "wasi_snapshot_preview1" "path_open" (func $path_open (param i32 i32 i32 i32 i32 i64 i64 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "fd_write" (func $fd_write (param i32 i32 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "proc_exit" (func $proc_exit (param i32)))
  (memory (export "memory") 1)
{data}  (data (i32.const 400) "inside")
  (data (i32.const 500) "{message_bytes}")
  (func (export "_start")
{tries}    (if (call $path_open (i32.const 3) (i32.const 0) (i32.const 400) (i32.const 6) (i32.const 1) (i64.const 64) (i64.const 0) (i32.const 0) (i32.const 8))
      (then (call $proc_exit (i32.const 2))))
    (i32.store (i32.const 16) (i32.const 500))
    (i32.store (i32.const 20) (i32.const {message_len}))
    (drop (call $fd_write (i32.const 1) (i32.const 16) (i32.const 1) (i32.const 32)))
    (call $proc_exit (i32.const 0))))"#,
        message_bytes = wat_bytes(message),
        message_len = message.len()
    )
}

/// A module that makes the symlink `name -> target` in its first preopened directory (a
/// volume), then prints "linked"; exit 1 if WASI refuses.
pub fn wat_symlinking(target: &str, name: &str) -> String {
    format!(
        r#"(module
  (import "wasi_snapshot_preview1" "path_symlink" (func $path_symlink (param i32 i32 i32 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "fd_write" (func $fd_write (param i32 i32 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "proc_exit" (func $proc_exit (param i32)))
  (memory (export "memory") 1)
  (data (i32.const 64) "linked\0a")
  (data (i32.const 1024) "{target_bytes}")
  (data (i32.const 512) "{name_bytes}")
  (func (export "_start")
    (if (call $path_symlink (i32.const 1024) (i32.const {target_len}) (i32.const 3) (i32.const 512) (i32.const {name_len}))
      (then (call $proc_exit (i32.const 1))))
    (i32.store (i32.const 0) (i32.const 64))
    (i32.store (i32.const 4) (i32.const 7))
    (drop (call $fd_write (i32.const 1) (i32.const 0) (i32.const 1) (i32.const 32)))
    (call $proc_exit (i32.const 0))))"#,
        target_bytes = wat_bytes(target),
        target_len = target.len(),
        name_bytes = wat_bytes(name),
        name_len = name.len(),
    )
}
