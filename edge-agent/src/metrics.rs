//! The agent's opt-in Prometheus endpoint (`[metrics] address` in the config): GET /metrics
//! answers the status `run` keeps (policy state, tasks, usage) in the text exposition format.
//!
//! A small HTTP/1.1 responder rather than a server crate: one path on a local port, and the
//! agent stays small on the device.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context as _;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

use crate::status::AgentStatus;

/// The most a request head may be; the responder reads nothing else.
const MAX_REQUEST: usize = 8 * 1024;
const CLIENT_TIMEOUT: Duration = Duration::from_secs(5);

/// Binds `address` (failing start-up with the reason) and serves it in the background.
pub async fn serve(
    address: SocketAddr,
    status: watch::Receiver<AgentStatus>,
) -> anyhow::Result<()> {
    let listener = TcpListener::bind(address).await.with_context(|| {
        format!("binding the metrics endpoint to {address} (change [metrics] address in the config, or remove it)")
    })?;
    tracing::info!(%address, "serving metrics at /metrics");
    tokio::spawn(async move {
        loop {
            let Ok((client, _)) = listener.accept().await else {
                continue;
            };
            let body = render(&status.borrow());
            tokio::spawn(async move {
                let _ = tokio::time::timeout(CLIENT_TIMEOUT, answer(client, body)).await;
            });
        }
    });
    Ok(())
}

async fn answer(mut client: TcpStream, body: String) -> std::io::Result<()> {
    let mut head = Vec::with_capacity(512);
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < MAX_REQUEST {
        let n = client.read(&mut buf).await?;
        if n == 0 {
            break;
        }
        head.extend_from_slice(&buf[..n]);
    }
    let line = String::from_utf8_lossy(&head);
    let (status, content_type, body) = match line.split_whitespace().take(2).collect::<Vec<_>>()[..]
    {
        ["GET", "/metrics"] => ("200 OK", "text/plain; version=0.0.4", body),
        ["GET", _] => (
            "404 Not Found",
            "text/plain",
            "the agent serves /metrics only\n".into(),
        ),
        _ => (
            "405 Method Not Allowed",
            "text/plain",
            "GET /metrics\n".into(),
        ),
    };
    let response = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    client.write_all(response.as_bytes()).await?;
    client.shutdown().await
}

/// The status as Prometheus text.
pub fn render(status: &AgentStatus) -> String {
    let mut out = String::new();
    let mut metric = |name: &str, kind: &str, help: &str, samples: &[(&str, f64)]| {
        let _ = writeln!(out, "# HELP darkcore_agent_{name} {help}");
        let _ = writeln!(out, "# TYPE darkcore_agent_{name} {kind}");
        for (labels, value) in samples {
            let _ = writeln!(out, "darkcore_agent_{name}{labels} {value}");
        }
    };
    let flag = |b: bool| if b { 1.0 } else { 0.0 };
    let usage = &status.usage;
    metric(
        "connected",
        "gauge",
        "1 while the agent is attached to the gateway.",
        &[("", flag(status.connected))],
    );
    metric(
        "giving",
        "gauge",
        "1 while the owner's policy lets the device take work.",
        &[("", flag(status.available))],
    );
    metric(
        "offer_cpu_cores",
        "gauge",
        "CPU the policy offers now.",
        &[("", f64::from(status.offer_millicores) / 1000.0)],
    );
    metric(
        "offer_memory_bytes",
        "gauge",
        "Memory the policy offers now.",
        &[("", status.offer_memory_bytes as f64)],
    );
    metric(
        "running_tasks",
        "gauge",
        "Tasks running on the device.",
        &[("", status.running_tasks.len() as f64)],
    );
    metric(
        "core_seconds_given",
        "counter",
        "CPU the agent's tasks used since the agent started, as the policy's sensors measure it.",
        &[("_total", status.core_seconds_given)],
    );
    metric(
        "task_runs",
        "counter",
        "Task runs charged since the device joined, by how they ended.",
        &[
            ("_total{result=\"completed\"}", usage.tasks as f64),
            ("_total{result=\"interrupted\"}", usage.interrupted as f64),
        ],
    );
    metric(
        "charged_cpu_seconds",
        "counter",
        "CPU time charged to task runs since the device joined.",
        &[("_total", usage.cpu_milliseconds as f64 / 1000.0)],
    );
    metric(
        "charged_memory_gib_seconds",
        "counter",
        "Reserved memory times time held, charged since the device joined.",
        &[("_total", usage.memory_mib_seconds as f64 / 1024.0)],
    );
    metric(
        "usage_unacknowledged",
        "gauge",
        "Usage records the operator has not stored yet.",
        &[("", status.usage_unacknowledged as f64)],
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::usage::Totals;

    #[test]
    fn the_status_renders_as_prometheus_text() {
        let status = AgentStatus {
            connected: true,
            available: true,
            offer_millicores: 1500,
            running_tasks: vec!["a".into(), "b".into()],
            usage: Totals {
                tasks: 3,
                interrupted: 1,
                cpu_milliseconds: 2500,
                memory_mib_seconds: 2048,
            },
            ..Default::default()
        };
        let text = render(&status);
        for line in [
            "# TYPE darkcore_agent_giving gauge",
            "darkcore_agent_giving 1",
            "darkcore_agent_offer_cpu_cores 1.5",
            "darkcore_agent_running_tasks 2",
            "darkcore_agent_task_runs_total{result=\"completed\"} 3",
            "darkcore_agent_task_runs_total{result=\"interrupted\"} 1",
            "darkcore_agent_charged_cpu_seconds_total 2.5",
            "darkcore_agent_charged_memory_gib_seconds_total 2",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "{line:?} missing in\n{text}"
            );
        }
    }

    #[tokio::test]
    async fn the_endpoint_answers_metrics_and_refuses_other_paths() {
        let port = {
            let probe = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            probe.local_addr().unwrap()
        };
        let (_keep, status) = watch::channel(AgentStatus {
            connected: true,
            ..Default::default()
        });
        serve(port, status).await.unwrap();
        let get = |path: &'static str| async move {
            let mut client = TcpStream::connect(port).await.unwrap();
            client
                .write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
                .await
                .unwrap();
            let mut text = String::new();
            client.read_to_string(&mut text).await.unwrap();
            text
        };
        let metrics = get("/metrics").await;
        assert!(metrics.starts_with("HTTP/1.1 200 OK"), "{metrics}");
        assert!(
            metrics.contains("\ndarkcore_agent_connected 1\n"),
            "{metrics}"
        );
        assert!(get("/").await.starts_with("HTTP/1.1 404"));
    }
}
