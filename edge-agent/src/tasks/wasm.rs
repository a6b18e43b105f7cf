//! The `wasm` runtime: a WASI preview 1 module run by wasmtime inside the agent. The module
//! sees only its task's volumes (preopened at their mount paths), the pod's env and args, and
//! stdout/stderr piped to the log pumps; memory is capped by the pod's limit. Stopping uses
//! epoch interruption: WASI has no signals, so SIGTERM's grace passes, then the module traps.
//!
//! The module is the image's `application/wasm` layer (the wasm OCI artifact layout).
//! argv is the container's command and args; with no command, argv[0] is the container name.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use tokio::sync::oneshot;
use wasmtime::{Config, Engine, Linker, Module, Store, StoreLimits, StoreLimitsBuilder};
use wasmtime_wasi::cli::AsyncStdoutStream;
use wasmtime_wasi::p1::{self, WasiP1Ctx};
use wasmtime_wasi::{DirPerms, FilePerms, WasiCtxBuilder};

use crate::images::{Image, ImageStore};
use crate::tasks::runtime::{Exit, Launch, Output, Runtime, StartError, Workload};

/// The media type of a WebAssembly module layer.
pub const WASM_LAYER: &str = "application/wasm";
/// How often a running module checks whether it must stop.
const EPOCH_TICK: Duration = Duration::from_millis(50);
/// Bytes buffered between a module's output and its log pump.
const PIPE_BYTES: usize = 64 * 1024;

pub struct WasmRuntime {
    /// Made at the first wasm task: wasmtime's set-up touches megabytes of code that an
    /// agent which never runs wasm need not keep resident.
    engine: OnceLock<Engine>,
    images: Arc<ImageStore>,
}

struct State {
    wasi: WasiP1Ctx,
    limits: StoreLimits,
}

impl WasmRuntime {
    pub fn new(images: Arc<ImageStore>) -> WasmRuntime {
        WasmRuntime {
            engine: OnceLock::new(),
            images,
        }
    }

    fn engine(&self) -> Result<&Engine, String> {
        if let Some(engine) = self.engine.get() {
            return Ok(engine);
        }
        let mut config = Config::new();
        config.async_support(true).epoch_interruption(true);
        let engine =
            Engine::new(&config).map_err(|e| format!("starting wasmtime on this device: {e:#}"))?;
        Ok(self.engine.get_or_init(|| engine))
    }
}

/// Where a pulled image keeps its module.
enum ModuleSource {
    /// A wasm OCI artifact's `application/wasm` layer (a blob in the image store).
    Layer(String),
    /// A container image whose single layer holds the `.wasm` file its argv[0] names.
    FileInLayer { layer: String, path: String },
}

/// Where the module is: an `application/wasm` layer, else the `.wasm` file that argv[0] (the
/// image's Entrypoint, or the pod's command) names in the image's single layer.
fn module_source(image: &Image, argv: &[String]) -> Result<ModuleSource, String> {
    if let Some(layer) = image.layers.iter().find(|l| l.media_type == WASM_LAYER) {
        return Ok(ModuleSource::Layer(layer.digest.clone()));
    }
    match (image.layers.as_slice(), argv.first()) {
        ([layer], Some(path)) if path.ends_with(".wasm") => Ok(ModuleSource::FileInLayer {
            layer: layer.digest.clone(),
            path: path.clone(),
        }),
        _ => Err(format!(
            "image {} has no {WASM_LAYER} layer (its layers: {}), nor one layer with the .wasm file its entrypoint names; the wasm runtime runs wasm OCI artifacts",
            image.reference,
            image
                .layers
                .iter()
                .map(|l| l.media_type.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        )),
    }
}

/// The argv of a module: the pod's command and args merged with the image's Entrypoint and
/// Cmd as Kubernetes merges them; with neither, the container's name alone.
fn module_argv(image: &Image, container: &darkcore_proto::agent::v1::Container) -> Vec<String> {
    let config = crate::tasks::oci::spec::image_config(&image.config).unwrap_or_default();
    if container.command.is_empty() && config.entrypoint.is_none() && config.cmd.is_none() {
        return std::iter::once(container.name.clone())
            .chain(container.args.iter().cloned())
            .collect();
    }
    crate::tasks::oci::spec::argv(&config, &container.command, &container.args)
}

#[tonic::async_trait]
impl Runtime for WasmRuntime {
    fn name(&self) -> &'static str {
        "wasm"
    }

    fn images(&self) -> Option<Arc<ImageStore>> {
        Some(self.images.clone())
    }

    async fn start(&self, launch: &Launch) -> Result<Box<dyn Workload>, StartError> {
        let create = |message: String| StartError {
            reason: "CreateContainerError",
            message,
        };
        let container = &launch.container;
        let image = launch
            .image
            .as_ref()
            .ok_or_else(|| create("the image was not pulled".into()))?;
        let argv = module_argv(image, container);
        let source = module_source(image, &argv).map_err(create)?;
        let engine = self.engine().map_err(create)?.clone();
        let (compiler, images) = (engine.clone(), self.images.clone());
        let module = tokio::task::spawn_blocking(move || {
            let blob = |digest: &str| {
                images
                    .blob_path(digest)
                    .ok_or_else(|| format!("bad layer digest {digest}"))
            };
            match source {
                ModuleSource::Layer(digest) => Module::from_file(&compiler, blob(&digest)?)
                    .map_err(|e| format!("compiling the module: {e:#}")),
                ModuleSource::FileInLayer { layer, path } => {
                    let bytes = crate::tasks::oci::rootfs::read_file(&blob(&layer)?, &path)
                        .map_err(|e| e.to_string())?
                        .ok_or_else(|| format!("the image's layer has no file {path}"))?;
                    Module::new(&compiler, bytes)
                        .map_err(|e| format!("compiling the module {path}: {e:#}"))
                }
            }
        })
        .await
        .map_err(|e| create(e.to_string()))?
        .map_err(create)?;

        let (stdout_reader, stdout_writer) = tokio::io::simplex(PIPE_BYTES);
        let (stderr_reader, stderr_writer) = tokio::io::simplex(PIPE_BYTES);
        let mut wasi = WasiCtxBuilder::new();
        wasi.args(&argv)
            .stdout(AsyncStdoutStream::new(PIPE_BYTES, stdout_writer))
            .stderr(AsyncStdoutStream::new(PIPE_BYTES, stderr_writer));
        for env in &container.env {
            wasi.env(&env.name, &env.value);
        }
        for mount in &launch.mounts {
            let mount_path = &mount.path_in_pod;
            wasi.preopened_dir(
                mount.in_agent(),
                mount_path,
                DirPerms::all(),
                FilePerms::all(),
            )
            .map_err(|e| create(format!("opening volume {mount_path}: {e:#}")))?;
        }
        let memory = container
            .resources
            .as_ref()
            .map(|r| r.limit_memory_bytes)
            .filter(|m| *m > 0);
        // Growing past the limit ends the module, as the kernel's OOM killer ends a process
        // (a failed grow that the module could ignore would hide the limit).
        let mut limits = StoreLimitsBuilder::new().trap_on_grow_failure(true);
        if let Some(bytes) = memory {
            limits = limits.memory_size(bytes as usize);
        }
        let mut store = Store::new(
            &engine,
            State {
                wasi: wasi.build_p1(),
                limits: limits.build(),
            },
        );
        store.limiter(|s| &mut s.limits);
        let killed = Arc::new(AtomicBool::new(false));
        let check = killed.clone();
        store.set_epoch_deadline(1);
        store.epoch_deadline_callback(move |_| {
            if check.load(Ordering::Relaxed) {
                anyhow::bail!("stopped: the grace period ran out")
            }
            Ok(wasmtime::UpdateDeadline::Yield(1))
        });
        let mut linker: Linker<State> = Linker::new(&engine);
        p1::add_to_linker_async(&mut linker, |s| &mut s.wasi)
            .map_err(|e| create(format!("{e:#}")))?;
        let instance = linker
            .instantiate_async(&mut store, &module)
            .await
            .map_err(|e| create(format!("instantiating the module: {e:#}")))?;
        let start = instance
            .get_typed_func::<(), ()>(&mut store, "_start")
            .map_err(|e| create(format!("the module has no WASI _start: {e:#}")))?;

        let (done, exit) = oneshot::channel();
        let ticker_engine = engine.clone();
        tokio::spawn(async move {
            let ticker = tokio::spawn(async move {
                loop {
                    tokio::time::sleep(EPOCH_TICK).await;
                    ticker_engine.increment_epoch();
                }
            });
            let mut cpu = Duration::ZERO;
            let result = on_cpu(start.call_async(&mut store, ()), &mut cpu).await;
            ticker.abort();
            // Dropping the store closes the pipes, so the log pumps see the end.
            drop(store);
            let _ = done.send((exit_of(result, memory), cpu));
        });
        Ok(Box::new(WasmWorkload {
            stdout: Some(Box::new(stdout_reader)),
            stderr: Some(Box::new(stderr_reader)),
            exit: Some(exit),
            killed,
            cpu: Duration::ZERO,
        }))
    }
}

/// How a module's `_start` ended, in Kubernetes' words.
fn exit_of(result: anyhow::Result<()>, memory: Option<u64>) -> Exit {
    let error = match result {
        Ok(()) => return Exit::from_code(0),
        Err(error) => error,
    };
    if let Some(exit) = error.downcast_ref::<wasmtime_wasi::I32Exit>() {
        return Exit::from_code(exit.0);
    }
    let message = format!("{error:#}");
    if memory.is_some() && message.contains("growing memory") {
        return Exit {
            code: 137,
            reason: "OOMKilled".into(),
            message,
        };
    }
    if message.contains("stopped: the grace period ran out") {
        return Exit {
            code: 137,
            reason: "Error".into(),
            message: "killed after the grace period".into(),
        };
    }
    Exit {
        code: 1,
        reason: "Error".into(),
        message: format!("wasm trap: {message}"),
    }
}

/// Polls `future` to its end, adding the CPU time of the threads that polled it to `used`.
/// A module runs only inside these polls (it yields at each epoch tick), so the sum is the CPU
/// it used, wherever the runtime moved it.
async fn on_cpu<F: Future>(future: F, used: &mut Duration) -> F::Output {
    let mut future = std::pin::pin!(future);
    std::future::poll_fn(|cx| {
        let before = thread_cpu();
        let poll = future.as_mut().poll(cx);
        *used += thread_cpu().saturating_sub(before);
        poll
    })
    .await
}

fn thread_cpu() -> Duration {
    let now = rustix::time::clock_gettime(rustix::time::ClockId::ThreadCPUTime);
    Duration::new(now.tv_sec as u64, now.tv_nsec as u32)
}

struct WasmWorkload {
    stdout: Option<Output>,
    stderr: Option<Output>,
    exit: Option<oneshot::Receiver<(Exit, Duration)>>,
    killed: Arc<AtomicBool>,
    cpu: Duration,
}

#[tonic::async_trait]
impl Workload for WasmWorkload {
    fn take_output(&mut self) -> (Option<Output>, Option<Output>) {
        (self.stdout.take(), self.stderr.take())
    }

    async fn wait(&mut self) -> Exit {
        let Some(exit) = self.exit.take() else {
            return Exit::from_code(1);
        };
        match exit.await {
            Ok((exit, cpu)) => {
                self.cpu = cpu;
                exit
            }
            Err(_) => Exit {
                code: 1,
                reason: "Error".into(),
                message: "the module's runner ended without an outcome".into(),
            },
        }
    }

    fn cpu_used(&self) -> Duration {
        self.cpu
    }

    /// WASI has no signals: the module runs on until the grace period ends.
    fn terminate(&mut self) {}

    fn kill(&mut self) {
        self.killed.store(true, Ordering::Relaxed);
    }
}
