//! `darkcore-push`: pushes the demo's and the benchmarks' images to a plain-HTTP registry,
//! such as the loopback one tests/cluster/up runs:
//!   darkcore-push wasm FILE.wat REGISTRY/REPOSITORY:TAG   a WAT module as a wasm OCI artifact
//!   darkcore-push busybox REGISTRY/REPOSITORY:TAG         the tests' busybox-static image
//!   darkcore-push program BINARY REGISTRY/REPOSITORY:TAG [ARG...]
//!                                  an image of one program and its shared libraries, whose
//!                                  entrypoint runs it with ARGs (the operator, metrics-server)

// The e2e tests' image builders, shared rather than copied; the tool uses two of them.
#[allow(dead_code)]
#[path = "../e2e/images.rs"]
mod images;
mod program;

use anyhow::{Context as _, bail};

const USAGE: &str = "usage: darkcore-push wasm FILE.wat REGISTRY/REPOSITORY:TAG | darkcore-push busybox REGISTRY/REPOSITORY:TAG | darkcore-push program BINARY REGISTRY/REPOSITORY:TAG [ARG...]";

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let split = |reference: &str| -> anyhow::Result<(String, String)> {
        match reference.split_once('/') {
            Some((registry, rest)) => Ok((registry.to_string(), rest.to_string())),
            None => bail!("{reference:?} names no registry: write it as host:port/repository:tag"),
        }
    };
    let pushed = match args.as_slice() {
        [kind, wat_file, reference] if kind == "wasm" => {
            let (registry, repository) = split(reference)?;
            let wat =
                std::fs::read_to_string(wat_file).with_context(|| format!("reading {wat_file}"))?;
            let anonymous = oci_client::secrets::RegistryAuth::Anonymous;
            images::push_wasm_to(&registry, anonymous, &repository, &wat)
                .await
                .0
        }
        [kind, reference] if kind == "busybox" => {
            let (registry, repository) = split(reference)?;
            images::push_busybox_to(&registry, &repository).await.0
        }
        [kind, binary, reference, args @ ..] if kind == "program" => {
            let (registry, repository) = split(reference)?;
            let binary = std::path::Path::new(binary);
            if !binary.is_file() {
                bail!(
                    "{} is not a file: give the program's path",
                    binary.display()
                );
            }
            program::push_program_to(&registry, &repository, binary, args).await
        }
        _ => bail!("{USAGE}"),
    };
    println!("pushed {pushed}");
    Ok(())
}
