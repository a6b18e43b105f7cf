//! darkcore-podbench: creates a burst of pods on a pool and measures, as SIG Scalability does,
//! the time from creation to Running as seen by a watch; then the time until all Succeeded.
//! A benchmark, not a test: it prints figures and writes them as JSON, and never fails on speed.
//!
//! The creation instant is taken on this side, just before each create request is sent
//! (creationTimestamp has one-second resolution), so every figure includes the create call.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Parser;
use futures::{StreamExt, TryStreamExt, stream};
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
    #[arg(long)]
    pool: String,
    #[arg(long, default_value_t = 100)]
    pods: usize,
    /// Create requests in flight at once.
    #[arg(long, default_value_t = 20)]
    concurrency: usize,
    /// What each pod runs, in sh.
    #[arg(long, default_value = "sleep 2")]
    script: String,
    /// Where to write the figures as JSON.
    #[arg(long)]
    out: std::path::PathBuf,
    /// How long to wait for everything before giving up.
    #[arg(long, default_value_t = 600)]
    timeout_seconds: u64,
}

fn pod(name: &str, args: &Args) -> Result<Pod> {
    Ok(serde_json::from_value(serde_json::json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": { "name": name, "labels": { "darkcore.io/podbench": "true" } },
        "spec": {
            "runtimeClassName": "darkcore-process",
            "nodeSelector": { "darkcore.io/pool": args.pool },
            "restartPolicy": "Never",
            "terminationGracePeriodSeconds": 1,
            "containers": [{
                "name": "main",
                "image": "busybox",
                "command": ["sh", "-c", args.script],
                "resources": { "requests": { "cpu": "10m", "memory": "8Mi" } }
            }]
        }
    }))?)
}

fn phase(pod: &Pod) -> &str {
    pod.status
        .as_ref()
        .and_then(|s| s.phase.as_deref())
        .unwrap_or("")
}

/// The value below which `q` of the sorted samples fall (nearest rank).
fn percentile(sorted: &[Duration], q: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

fn ms(d: Duration) -> f64 {
    (d.as_secs_f64() * 10_000.0).round() / 10.0
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    let client = Client::try_default()
        .await
        .context("connecting to the cluster")?;
    let pods: Api<Pod> = Api::namespaced(client, &args.namespace);
    let selector = "darkcore.io/podbench=true";
    let timeout = Duration::from_secs(args.timeout_seconds);

    // The watch starts first, so no transition is missed.
    let (seen_tx, mut seen) = tokio::sync::mpsc::unbounded_channel::<(String, String, Instant)>();
    let watch_api = pods.clone();
    let watch = tokio::spawn(async move {
        let events = watcher(watch_api, watcher::Config::default().labels(selector))
            .default_backoff()
            .applied_objects();
        let mut events = std::pin::pin!(events);
        while let Ok(Some(pod)) = events.try_next().await {
            let _ = seen_tx.send((pod.name_any(), phase(&pod).to_string(), Instant::now()));
        }
    });

    let names: Vec<String> = (0..args.pods).map(|i| format!("podbench-{i}")).collect();
    let burst_started = Instant::now();
    let created: Vec<(String, Instant)> = stream::iter(names.iter().cloned())
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
        .await?;
    let burst = burst_started.elapsed();
    let created: HashMap<String, Instant> = created.into_iter().collect();

    let mut running: HashMap<String, Duration> = HashMap::new();
    let mut succeeded: HashMap<String, Instant> = HashMap::new();
    let mut failed = Vec::new();
    let deadline = tokio::time::Instant::now() + timeout;
    while succeeded.len() + failed.len() < args.pods {
        let Ok(Some((name, phase, at))) = tokio::time::timeout_at(deadline, seen.recv()).await
        else {
            bail!(
                "after {timeout:?}: {} Running, {} Succeeded, {} Failed of {}",
                running.len(),
                succeeded.len(),
                failed.len(),
                args.pods
            );
        };
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
    let all_done = succeeded
        .values()
        .max()
        .map_or(Duration::ZERO, |last| last.duration_since(burst_started));
    watch.abort();

    let mut startup: Vec<Duration> = running.values().copied().collect();
    startup.sort();
    let figures = serde_json::json!({
        "pods": args.pods,
        "create_burst_ms": ms(burst),
        "create_to_running_ms": {
            "p50": ms(percentile(&startup, 0.50)),
            "p90": ms(percentile(&startup, 0.90)),
            "p99": ms(percentile(&startup, 0.99)),
            "max": ms(percentile(&startup, 1.0)),
        },
        "all_succeeded_after_ms": ms(all_done),
        "succeeded": succeeded.len(),
        "failed": failed.len(),
        "task": args.script,
    });
    println!(
        "{} pods: create->Running p50 {} ms, p90 {} ms, p99 {} ms, max {} ms; all Succeeded after {} ms ({} failed)",
        args.pods,
        figures["create_to_running_ms"]["p50"],
        figures["create_to_running_ms"]["p90"],
        figures["create_to_running_ms"]["p99"],
        figures["create_to_running_ms"]["max"],
        figures["all_succeeded_after_ms"],
        failed.len()
    );
    std::fs::write(&args.out, serde_json::to_string_pretty(&figures)?)
        .with_context(|| format!("writing {}", args.out.display()))?;

    // Succeeded pods are deleted at once by the apiserver; the operator then releases tasks.
    pods.delete_collection(
        &DeleteParams::default(),
        &ListParams::default().labels(selector),
    )
    .await
    .context("deleting the pods")?;
    Ok(())
}
