//! darkcore-podbench: creates a burst of pods on a pool and measures, as SIG Scalability does,
//! the time from creation to Running as seen by a watch; then the time until all Succeeded.
//! A benchmark, not a test: it prints figures and writes them as JSON, and never fails on speed.
//!
//! The creation instant of a bare pod is taken on this side, just before its create request is
//! sent (creationTimestamp has one-second resolution), so every figure includes the create
//! call. A Job's pods are created by the Job controller: they count from the Job's create call,
//! so the controller's pace of creating them is part of the figure.
//!
//! `--kwok` runs the same pods on a kwok fake node instead (the baseline: a kubelet that does
//! no work at all), so both sides are measured by the same code on the same control plane.

#[path = "../bench_stats.rs"]
mod bench_stats;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use bench_stats::{latencies_ms, ms};
use clap::Parser;
use futures::{StreamExt, TryStreamExt, stream};
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{DeleteParams, ListParams, PostParams};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client, ResourceExt};

#[derive(Parser)]
struct Args {
    /// Namespace to create the pods in (must exist).
    #[arg(long)]
    namespace: String,
    /// The DevicePool to run on (its node selector `darkcore.io/pool`).
    #[arg(long, required_unless_present = "kwok")]
    pool: Option<String>,
    /// Run on kwok's fake nodes (label type=kwok, kwok's taint tolerated) instead of a pool.
    #[arg(long)]
    kwok: bool,
    /// Create one indexed Job of --pods completions, all in parallel, instead of bare pods.
    #[arg(long)]
    job: bool,
    #[arg(long, default_value_t = 100)]
    pods: usize,
    /// Create requests in flight at once.
    #[arg(long, default_value_t = 20)]
    concurrency: usize,
    /// What each pod runs, in sh.
    #[arg(long, default_value = "sleep 2")]
    script: String,
    /// CPU each pod requests.
    #[arg(long, default_value = "10m")]
    cpu: String,
    /// Failover: once every pod runs, run this shell command (which brings up the devices
    /// that take over), then SIGKILL this pid (the device running them all), and measure
    /// until every pod runs again elsewhere.
    #[arg(long)]
    failover_kill: Option<u32>,
    #[arg(long, default_value = "true")]
    failover_prepare: String,
    /// Where to write the figures as JSON.
    #[arg(long)]
    out: std::path::PathBuf,
    /// How long to wait for everything before giving up.
    #[arg(long, default_value_t = 600)]
    timeout_seconds: u64,
}

const LABEL: &str = "darkcore.io/podbench";

/// The pod spec: on the pool's node, or on kwok's.
fn pod_spec(args: &Args) -> serde_json::Value {
    let mut spec = serde_json::json!({
        "restartPolicy": "Never",
        "terminationGracePeriodSeconds": 1,
        "containers": [{
            "name": "main",
            "image": "busybox",
            "command": ["sh", "-c", args.script],
            "resources": { "requests": { "cpu": args.cpu, "memory": "8Mi" } }
        }]
    });
    if args.kwok {
        spec["nodeSelector"] = serde_json::json!({ "type": "kwok" });
        spec["tolerations"] = serde_json::json!([
            { "key": "kwok.x-k8s.io/node", "operator": "Exists", "effect": "NoSchedule" }
        ]);
    } else {
        spec["runtimeClassName"] = "darkcore-process".into();
        spec["nodeSelector"] = serde_json::json!({ "darkcore.io/pool": args.pool });
    }
    spec
}

fn pod(name: &str, args: &Args) -> Result<Pod> {
    Ok(serde_json::from_value(serde_json::json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": { "name": name, "labels": { LABEL: "true" } },
        "spec": pod_spec(args),
    }))?)
}

fn job(args: &Args) -> Result<Job> {
    Ok(serde_json::from_value(serde_json::json!({
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": { "name": "podbench" },
        "spec": {
            "completions": args.pods,
            "parallelism": args.pods,
            "completionMode": "Indexed",
            "backoffLimit": 0,
            "template": { "metadata": { "labels": { LABEL: "true" } }, "spec": pod_spec(args) }
        }
    }))?)
}

/// A pod as the watch saw it.
struct Seen {
    name: String,
    phase: String,
    /// Its container runs again after a restart (here: on another device).
    rerun: bool,
    at: Instant,
}

fn rerun(pod: &Pod) -> bool {
    pod.status
        .as_ref()
        .and_then(|s| s.container_statuses.as_ref())
        .and_then(|c| c.first())
        .is_some_and(|c| {
            c.restart_count >= 1 && c.state.as_ref().is_some_and(|s| s.running.is_some())
        })
}

fn phase(pod: &Pod) -> &str {
    pod.status
        .as_ref()
        .and_then(|s| s.phase.as_deref())
        .unwrap_or("")
}

/// Runs `prepare`, SIGKILLs `pid`, and returns how long until all `pods` were seen running
/// again after a restart.
async fn failover(
    pid: u32,
    prepare: &str,
    pods: usize,
    seen: &mut tokio::sync::mpsc::UnboundedReceiver<Seen>,
    deadline: tokio::time::Instant,
) -> Result<Duration> {
    let prepared = tokio::process::Command::new("sh")
        .args(["-c", prepare])
        .status()
        .await?;
    if !prepared.success() {
        bail!("--failover-prepare {prepare:?} failed: {prepared}");
    }
    while seen.try_recv().is_ok() {}
    let killed = Instant::now();
    let status = std::process::Command::new("kill")
        .args(["-KILL", &pid.to_string()])
        .status()?;
    if !status.success() {
        bail!("kill -KILL {pid} failed");
    }
    println!("failover: killed {pid}; waiting for {pods} pods to run again");
    let mut again = std::collections::HashSet::new();
    while again.len() < pods {
        let Ok(Some(pod)) = tokio::time::timeout_at(deadline, seen.recv()).await else {
            bail!(
                "failover: {} of {pods} pods ran again before the timeout",
                again.len()
            );
        };
        if pod.rerun {
            again.insert(pod.name);
        }
    }
    Ok(killed.elapsed())
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    let client = Client::try_default()
        .await
        .context("connecting to the cluster")?;
    let pods: Api<Pod> = Api::namespaced(client, &args.namespace);
    let selector = &format!("{LABEL}=true");
    let jobs: Api<Job> = Api::namespaced(pods.clone().into_client(), &args.namespace);
    let timeout = Duration::from_secs(args.timeout_seconds);

    // The watch starts first, so no transition is missed.
    let (seen_tx, mut seen) = tokio::sync::mpsc::unbounded_channel::<Seen>();
    let watch_api = pods.clone();
    let watch_selector = selector.clone();
    let watch = tokio::spawn(async move {
        let events = watcher(
            watch_api,
            watcher::Config::default().labels(&watch_selector),
        )
        .default_backoff()
        .applied_objects();
        let mut events = std::pin::pin!(events);
        while let Ok(Some(pod)) = events.try_next().await {
            let _ = seen_tx.send(Seen {
                name: pod.name_any(),
                phase: phase(&pod).to_string(),
                rerun: rerun(&pod),
                at: Instant::now(),
            });
        }
    });

    let burst_started = Instant::now();
    let created: Vec<(String, Instant)> = if args.job {
        jobs.create(&PostParams::default(), &job(&args)?)
            .await
            .context("creating the Job")?;
        Vec::new()
    } else {
        let names: Vec<String> = (0..args.pods).map(|i| format!("podbench-{i}")).collect();
        stream::iter(names)
            .map(|name| {
                let pods = pods.clone();
                let pod = pod(&name, &args);
                async move {
                    let sent = Instant::now();
                    pods.create(&PostParams::default(), &pod?)
                        .await
                        .with_context(|| format!("creating {name}"))?;
                    anyhow::Ok((name, sent))
                }
            })
            .buffer_unordered(args.concurrency)
            .try_collect()
            .await?
    };
    let burst = burst_started.elapsed();
    let mut created: HashMap<String, Instant> = created.into_iter().collect();

    let mut running: HashMap<String, Duration> = HashMap::new();
    let mut succeeded: HashMap<String, Instant> = HashMap::new();
    let mut failed = Vec::new();
    let deadline = tokio::time::Instant::now() + timeout;
    // kwok completes only pods a Job owns (its default stages); bare pods there stay Running.
    // A failover's pods run until they are deleted.
    let completes = (!args.kwok || args.job) && args.failover_kill.is_none();
    let done = |running: &HashMap<String, Duration>, ended: usize| {
        if completes {
            ended >= args.pods
        } else {
            running.len() >= args.pods
        }
    };
    while !done(&running, succeeded.len() + failed.len()) {
        let Ok(Some(Seen {
            name, phase, at, ..
        })) = tokio::time::timeout_at(deadline, seen.recv()).await
        else {
            bail!(
                "after {timeout:?}: {} Running, {} Succeeded, {} Failed of {}",
                running.len(),
                succeeded.len(),
                failed.len(),
                args.pods
            );
        };
        // A Job's pods count from the Job's create call: the burst is the Job.
        if args.job {
            created.entry(name.clone()).or_insert(burst_started);
        }
        let Some(sent) = created.get(&name) else {
            continue;
        };
        // A pod that finished before a watch event showed it Running started when it finished.
        if matches!(phase.as_str(), "Running" | "Succeeded" | "Failed") {
            running
                .entry(name.clone())
                .or_insert_with(|| at.duration_since(*sent));
        }
        match phase.as_str() {
            "Succeeded" => {
                succeeded.entry(name).or_insert(at);
            }
            "Failed" if !failed.contains(&name) => failed.push(name),
            _ => {}
        }
    }
    let failover = match args.failover_kill {
        Some(pid) => {
            Some(failover(pid, &args.failover_prepare, args.pods, &mut seen, deadline).await?)
        }
        None => None,
    };
    let all_done = succeeded
        .values()
        .max()
        .map_or(Duration::ZERO, |last| last.duration_since(burst_started));
    watch.abort();

    let startup: Vec<Duration> = running.values().copied().collect();
    let figures = serde_json::json!({
        "pods": args.pods,
        "create_burst_ms": ms(burst),
        "create_to_running_ms": latencies_ms(startup),
        "all_succeeded_after_ms": if completes { ms(all_done).into() } else { serde_json::Value::Null },
        "succeeded": succeeded.len(),
        "failed": failed.len(),
        "task": args.script,
        "failover_all_running_again_ms": failover.map(ms),
        "shape": if args.job { "indexed Job" } else { "bare pods" },
        "node": if args.kwok { "kwok" } else { "darkcore" },
    });
    println!(
        "{} {} on {}: create->Running p50 {} ms, p90 {} ms, p99 {} ms, max {} ms; all Succeeded after {} ms ({} failed)",
        args.pods,
        figures["shape"].as_str().unwrap_or_default(),
        figures["node"].as_str().unwrap_or_default(),
        figures["create_to_running_ms"]["p50"],
        figures["create_to_running_ms"]["p90"],
        figures["create_to_running_ms"]["p99"],
        figures["create_to_running_ms"]["max"],
        figures["all_succeeded_after_ms"],
        failed.len()
    );
    std::fs::write(&args.out, serde_json::to_string_pretty(&figures)?)
        .with_context(|| format!("writing {}", args.out.display()))?;

    if args.job {
        jobs.delete("podbench", &DeleteParams::background())
            .await
            .context("deleting the Job")?;
    }
    pods.delete_collection(
        &DeleteParams::default(),
        &ListParams::default().labels(selector),
    )
    .await
    .context("deleting the pods")?;
    Ok(())
}
