//! The tests' images, built at test time and pushed to the registry that tests/cluster/up
//! runs on loopback: WebAssembly modules written as WAT, pushed as wasm OCI artifacts.

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

fn client() -> Client {
    let _ = rustls::crypto::ring::default_provider().install_default();
    Client::new(ClientConfig {
        protocol: ClientProtocol::Http,
        ..Default::default()
    })
}

/// A WASI command that writes `text` to stdout (fd 1) and exits with `code`.
pub fn wat_printing(text: &str, code: i32) -> String {
    let bytes: String = text.bytes().map(|b| format!("\\{b:02x}")).collect();
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
