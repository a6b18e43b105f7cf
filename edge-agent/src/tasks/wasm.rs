//! The `wasm` runtime: a WASI preview 1 module run by wasmtime inside the agent. The module
//! sees only its task's volumes (preopened at their mount paths), the pod's env and args, and
//! stdout/stderr piped to the log pumps; memory is capped by the pod's limit. Stopping uses
//! epoch interruption: WASI has no signals, so SIGTERM's grace passes, then the module traps.
//!
//! The module is the image's `application/wasm` layer (the wasm OCI artifact layout).
//! argv is the container's command and args; with no command, argv[0] is the container name.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use tokio::io::DuplexStream;
use tokio::sync::oneshot;
use wasmtime::{
    Config, Engine, Linker, Module, ResourceLimiter, Store, StoreLimits, StoreLimitsBuilder,
    TypedFunc,
};
use wasmtime_wasi::cli::AsyncStdoutStream;
use wasmtime_wasi::p1::{self, WasiP1Ctx};
use wasmtime_wasi::{DirPerms, FilePerms, WasiCtxBuilder};

use crate::images::{Image, ImageStore};
use crate::tasks::mounts::MountSource;
use crate::tasks::runtime::{Ceiling, Exit, Launch, Output, Runtime, StartError, Workload};
use crate::tasks::stats::{Meter, Sample};

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
    /// The owner's offer: caps each module's memory and CPU share, and is their default.
    ceiling: Ceiling,
    /// How the offer's cores are split between the modules running now.
    shares: Arc<Shares>,
}

/// The offer's cores, shared by every running module: each gets at most an equal part, so
/// together they stay within the offer (modules run in the agent's process, outside the
/// cgroup that holds containers to it).
struct Shares {
    /// The offer in millicores; 0: no bound.
    offer: u32,
    running: AtomicU32,
}

/// A module's running, counted while this lives.
struct Running<'a>(&'a Shares);

impl Shares {
    fn enter(&self) -> Running<'_> {
        self.running.fetch_add(1, Ordering::Relaxed);
        Running(self)
    }

    /// The share now of a module whose own is `own`.
    fn of(&self, own: u32) -> u32 {
        fair_share(own, self.offer, self.running.load(Ordering::Relaxed))
    }
}

impl Drop for Running<'_> {
    fn drop(&mut self) {
        self.0.running.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A module's share (pure): its own (already capped by the offer), and no more than an equal
/// part of `offer` between the `running` modules. 0 is no bound.
fn fair_share(own: u32, offer: u32, running: u32) -> u32 {
    if offer == 0 {
        return own;
    }
    let part = (offer / running.max(1)).max(1);
    if own == 0 { part } else { own.min(part) }
}

struct State {
    wasi: WasiP1Ctx,
    limits: MeteredLimits,
}

/// A module's figures for `kubectl top`, kept up to date by the thread that runs it: its CPU
/// time at each epoch tick, and its linear memories' size as they grow.
#[derive(Default)]
struct WasmMeter {
    cpu_nanos: AtomicU64,
    memory: AtomicU64,
}

impl Meter for WasmMeter {
    fn sample(&self) -> Option<Sample> {
        Some(Sample {
            cpu: Duration::from_nanos(self.cpu_nanos.load(Ordering::Relaxed)),
            memory_working_set: self.memory.load(Ordering::Relaxed),
        })
    }
}

/// The store's limits, which also count the memory they let the module have.
struct MeteredLimits {
    limits: StoreLimits,
    meter: Arc<WasmMeter>,
}

impl ResourceLimiter for MeteredLimits {
    fn memory_growing(
        &mut self,
        current: usize,
        desired: usize,
        maximum: Option<usize>,
    ) -> anyhow::Result<bool> {
        let allowed = self.limits.memory_growing(current, desired, maximum)?;
        if allowed {
            let grown = u64::try_from(desired.saturating_sub(current)).unwrap_or(u64::MAX);
            self.meter.memory.fetch_add(grown, Ordering::Relaxed);
        }
        Ok(allowed)
    }

    fn memory_grow_failed(&mut self, error: anyhow::Error) -> anyhow::Result<()> {
        self.limits.memory_grow_failed(error)
    }

    fn table_growing(
        &mut self,
        current: usize,
        desired: usize,
        maximum: Option<usize>,
    ) -> anyhow::Result<bool> {
        self.limits.table_growing(current, desired, maximum)
    }

    fn table_grow_failed(&mut self, error: anyhow::Error) -> anyhow::Result<()> {
        self.limits.table_grow_failed(error)
    }

    fn instances(&self) -> usize {
        self.limits.instances()
    }

    fn tables(&self) -> usize {
        self.limits.tables()
    }

    fn memories(&self) -> usize {
        self.limits.memories()
    }
}

impl WasmRuntime {
    pub fn new(images: Arc<ImageStore>, ceiling: Ceiling) -> WasmRuntime {
        WasmRuntime {
            engine: OnceLock::new(),
            images,
            ceiling,
            shares: Arc::new(Shares {
                offer: ceiling.millicores,
                running: AtomicU32::new(0),
            }),
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
        Ok(self.engine.get_or_init(|| {
            // One clock for every module, on a thread of its own: ticks come however busy
            // the agent's threads or the modules are.
            let ticker = engine.clone();
            let spawned = std::thread::Builder::new()
                .name("wasm-epoch".into())
                .spawn(move || {
                    loop {
                        std::thread::sleep(EPOCH_TICK);
                        ticker.increment_epoch();
                    }
                });
            if let Err(error) = spawned {
                tracing::error!(%error, "could not start the wasm epoch thread: modules cannot be stopped or throttled");
            }
            engine
        }))
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

        // Duplex, not simplex: a simplex's reader sees its end only when the writer shuts it
        // down, which wasmtime's stream never does, so the pumps hung until their timeout and
        // the result's stdout was never read to its end. A duplex ends when its writer drops.
        let (stdout_reader, stdout_writer) = tokio::io::duplex(PIPE_BYTES);
        let (stderr_reader, stderr_writer) = tokio::io::duplex(PIPE_BYTES);
        let limits = container.resources.unwrap_or_default();
        let run = ModuleRun {
            engine,
            module,
            argv,
            env: container
                .env
                .iter()
                .map(|e| (e.name.clone(), e.value.clone()))
                .collect(),
            preopens: launch
                .mounts
                .iter()
                .map(|m| (m.in_agent(), m.path_in_pod.clone()))
                .collect(),
            memory: self.ceiling.memory_bytes(limits.limit_memory_bytes),
            millicores: self.ceiling.millicores(limits.limit_millicores),
            shares: self.shares.clone(),
            killed: Arc::new(AtomicBool::new(false)),
            meter: Arc::default(),
            // The mounts' handles stay open until the module has opened its preopens.
            _mounts: launch.mounts.clone(),
        };
        let (killed, meter) = (run.killed.clone(), run.meter.clone());
        let (ready, started) = oneshot::channel();
        let (done, exit) = oneshot::channel();
        // Its own thread, never the agent's: a module that never calls the host cannot hold
        // up heartbeats, logs or a stop.
        std::thread::Builder::new()
            .name(format!("wasm-{}", launch.task_id))
            .spawn(move || run.on_this_thread(stdout_writer, stderr_writer, ready, done))
            .map_err(|e| create(format!("starting the module's thread: {e}")))?;
        match started.await {
            Ok(Ok(())) => {}
            Ok(Err(message)) => return Err(create(message)),
            Err(_) => return Err(create("the module's thread ended before the module".into())),
        }
        Ok(Box::new(WasmWorkload {
            stdout: Some(Box::new(stdout_reader)),
            stderr: Some(Box::new(stderr_reader)),
            exit: Some(exit),
            killed,
            meter,
            cpu: Duration::ZERO,
        }))
    }
}

/// One module's run, moved to the thread that runs it.
struct ModuleRun {
    engine: Engine,
    module: Module,
    argv: Vec<String>,
    env: Vec<(String, String)>,
    /// (host directory as the agent opens it, path in the pod)
    preopens: Vec<(PathBuf, String)>,
    /// 0: no bound (an owner who offers everything).
    memory: u64,
    millicores: u32,
    shares: Arc<Shares>,
    killed: Arc<AtomicBool>,
    meter: Arc<WasmMeter>,
    _mounts: Vec<MountSource>,
}

impl ModuleRun {
    /// Runs the module to its end on the calling thread, in a runtime of its own (WASI's
    /// streams are tokio's). `ready` says whether it started; `done` says how it ended and the
    /// thread's CPU time.
    fn on_this_thread(
        self,
        stdout: DuplexStream,
        stderr: DuplexStream,
        ready: oneshot::Sender<Result<(), String>>,
        done: oneshot::Sender<(Exit, Duration)>,
    ) {
        let runtime = match tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
        {
            Ok(runtime) => runtime,
            Err(e) => {
                let _ = ready.send(Err(format!("starting the module's runtime: {e}")));
                return;
            }
        };
        let memory = self.memory;
        let shares = self.shares.clone();
        let _running = shares.enter();
        let cpu_at_start = thread_cpu();
        let result = runtime.block_on(async move {
            let (mut store, start) = match self.instantiate(stdout, stderr, cpu_at_start).await {
                Ok(ready_to_run) => {
                    let _ = ready.send(Ok(()));
                    ready_to_run
                }
                Err(message) => {
                    let _ = ready.send(Err(message));
                    return None;
                }
            };
            let result = start.call_async(&mut store, ()).await;
            drop(store);
            Some(result)
        });
        let cpu = thread_cpu().saturating_sub(cpu_at_start);
        // The pipes' writers live in tasks of this runtime: only its end closes them, so the
        // log pumps (and the result's stdout digest) see the end before the run is reported over.
        drop(runtime);
        if let Some(result) = result {
            let _ = done.send((exit_of(result, (memory > 0).then_some(memory)), cpu));
        }
    }

    /// Makes the module's store and instance; `cpu_at_start`: this thread's CPU time when the
    /// run began, which its meter counts from.
    async fn instantiate(
        self,
        stdout: DuplexStream,
        stderr: DuplexStream,
        cpu_at_start: Duration,
    ) -> Result<(Store<State>, TypedFunc<(), ()>), String> {
        let mut wasi = WasiCtxBuilder::new();
        wasi.args(&self.argv)
            .stdout(AsyncStdoutStream::new(PIPE_BYTES, stdout))
            .stderr(AsyncStdoutStream::new(PIPE_BYTES, stderr));
        for (name, value) in &self.env {
            wasi.env(name, value);
        }
        for (host, mount_path) in &self.preopens {
            wasi.preopened_dir(host, mount_path, DirPerms::all(), FilePerms::all())
                .map_err(|e| format!("opening volume {mount_path}: {e:#}"))?;
        }
        // Growing past the limit ends the module, as the kernel's OOM killer ends a process
        // (a failed grow that the module could ignore would hide the limit).
        let mut limits = StoreLimitsBuilder::new().trap_on_grow_failure(true);
        if self.memory > 0 {
            limits = limits.memory_size(usize::try_from(self.memory).unwrap_or(usize::MAX));
        }
        let mut store = Store::new(
            &self.engine,
            State {
                wasi: wasi.build_p1(),
                limits: MeteredLimits {
                    limits: limits.build(),
                    meter: self.meter.clone(),
                },
            },
        );
        store.limiter(|s| &mut s.limits);
        let killed = self.killed.clone();
        let mut throttle = Throttle::new(self.millicores);
        let (own, shares, meter) = (self.millicores, self.shares.clone(), self.meter.clone());
        store.set_epoch_deadline(1);
        store.epoch_deadline_callback(move |_| {
            let used = thread_cpu().saturating_sub(cpu_at_start);
            let nanos = u64::try_from(used.as_nanos()).unwrap_or(u64::MAX);
            meter.cpu_nanos.store(nanos, Ordering::Relaxed);
            if !killed.load(Ordering::Relaxed) {
                // This thread is the module's alone: waiting here slows no one else.
                throttle.set_share(shares.of(own));
                std::thread::sleep(throttle.pause(thread_cpu(), Instant::now()));
            }
            if killed.load(Ordering::Relaxed) {
                anyhow::bail!("stopped: the grace period ran out")
            }
            Ok(wasmtime::UpdateDeadline::Yield(1))
        });
        let mut linker: Linker<State> = Linker::new(&self.engine);
        p1::add_to_linker_async(&mut linker, |s| &mut s.wasi).map_err(|e| format!("{e:#}"))?;
        let instance = linker
            .instantiate_async(&mut store, &self.module)
            .await
            .map_err(|e| format!("instantiating the module: {e:#}"))?;
        let start = instance
            .get_typed_func::<(), ()>(&mut store, "_start")
            .map_err(|e| format!("the module has no WASI _start: {e:#}"))?;
        Ok((store, start))
    }
}

/// Holds a module to its share of a core: at each epoch tick it compares the CPU the thread
/// has used since the start with what the share allows of the time since, and pauses the
/// thread for the excess.
struct Throttle {
    /// The share in millicores; 0, or a whole core or more, never pauses.
    millicores: u32,
    since: Option<(Duration, Instant)>,
}

/// The longest pause at one tick, so a stop is seen soon.
const MAX_PAUSE: Duration = Duration::from_millis(250);

impl Throttle {
    fn new(millicores: u32) -> Throttle {
        Throttle {
            millicores,
            since: None,
        }
    }

    /// A new share, counted from the next tick on.
    fn set_share(&mut self, millicores: u32) {
        if millicores != self.millicores {
            *self = Throttle::new(millicores);
        }
    }

    /// How long to pause now, given the thread's CPU time and the wall clock.
    fn pause(&mut self, cpu: Duration, now: Instant) -> Duration {
        if self.millicores == 0 || self.millicores >= 1000 {
            return Duration::ZERO;
        }
        let (cpu_at_start, started) = *self.since.get_or_insert((cpu, now));
        let used = cpu.saturating_sub(cpu_at_start);
        let allowed = now.duration_since(started) * self.millicores / 1000;
        // At the share, `used` CPU takes used / share of wall time: wait out the difference.
        let due = used * 1000 / self.millicores;
        due.saturating_sub(now.duration_since(started))
            .min(MAX_PAUSE)
            .max(if used > allowed {
                Duration::from_millis(1)
            } else {
                Duration::ZERO
            })
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

fn thread_cpu() -> Duration {
    let now = rustix::time::clock_gettime(rustix::time::ClockId::ThreadCPUTime);
    Duration::new(now.tv_sec as u64, now.tv_nsec as u32)
}

struct WasmWorkload {
    stdout: Option<Output>,
    stderr: Option<Output>,
    exit: Option<oneshot::Receiver<(Exit, Duration)>>,
    killed: Arc<AtomicBool>,
    meter: Arc<WasmMeter>,
    cpu: Duration,
}

#[tonic::async_trait]
impl Workload for WasmWorkload {
    fn take_output(&mut self) -> (Option<Output>, Option<Output>) {
        (self.stdout.take(), self.stderr.take())
    }

    /// Cancel-safe: a wait given up (for a stop) leaves the outcome to the next one.
    async fn wait(&mut self) -> Exit {
        let Some(exit) = self.exit.as_mut() else {
            return Exit::from_code(1);
        };
        let outcome = exit.await;
        self.exit = None;
        match outcome {
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

    fn meter(&self) -> Option<Arc<dyn Meter>> {
        Some(self.meter.clone())
    }

    fn entrance(&self) -> crate::tasks::enter::Entrance {
        crate::tasks::enter::Entrance::Unsupported(
            "exec is not supported by the wasm runtime: a wasm module has no processes to start a command beside; read its output with kubectl logs".into(),
        )
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_module_is_held_to_its_share_of_a_core() {
        let start = Instant::now();
        let ms = Duration::from_millis;
        let mut half = Throttle::new(500);
        assert_eq!(
            half.pause(ms(1000), start),
            Duration::ZERO,
            "the first tick sets the start"
        );
        // 50 ms of CPU in 50 ms of wall time: due at 100 ms, so 50 ms to wait.
        assert_eq!(half.pause(ms(1050), start + ms(50)), ms(50));
        // Back under its share after the pause: no wait.
        assert_eq!(half.pause(ms(1050), start + ms(100)), Duration::ZERO);
        // A long burst waits at most MAX_PAUSE a tick, so a stop is seen.
        assert_eq!(half.pause(ms(3000), start + ms(200)), MAX_PAUSE);
        let mut whole = Throttle::new(1000);
        assert_eq!(whole.pause(ms(0), start), Duration::ZERO);
        assert_eq!(
            whole.pause(ms(500), start + ms(50)),
            Duration::ZERO,
            "a core or more: never"
        );
        let mut unbounded = Throttle::new(0);
        assert_eq!(unbounded.pause(ms(9), start + ms(1)), Duration::ZERO);
    }

    #[test]
    fn running_modules_split_the_offer() {
        assert_eq!(fair_share(500, 500, 1), 500, "alone: its own");
        assert_eq!(fair_share(500, 500, 2), 250, "two: half each");
        assert_eq!(fair_share(100, 1000, 4), 100, "its own limit is lower");
        assert_eq!(fair_share(2000, 2000, 3), 666);
        assert_eq!(fair_share(700, 0, 5), 700, "no offer: no bound");
        assert_eq!(fair_share(500, 500, 0), 500);
        let shares = Shares {
            offer: 1000,
            running: AtomicU32::new(0),
        };
        let one = shares.enter();
        let two = shares.enter();
        assert_eq!(shares.of(1000), 500);
        drop(two);
        assert_eq!(shares.of(1000), 1000);
        drop(one);
    }
}
