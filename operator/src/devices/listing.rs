//! `darkcore-operator devices`: reads `/devices` from a running operator and prints a table.
//! Listing is served from the registry's soft state, so it costs the API server nothing.

use anyhow::{Context as _, bail};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::devices::registry::DeviceView;

/// Fetches the device list from the operator at `base` (`http://host:port`).
pub async fn fetch(base: &str, pool: Option<&str>) -> anyhow::Result<Vec<DeviceView>> {
    let address = base
        .strip_prefix("http://")
        .context("--operator must be an http:// address, such as http://127.0.0.1:8080")?
        .trim_end_matches('/');
    let path = match pool {
        Some(pool) => format!("/devices?pool={pool}"),
        None => "/devices".into(),
    };
    let mut stream = tokio::net::TcpStream::connect(address)
        .await
        .with_context(|| format!("connecting to the operator at {base} (is it running? use `kubectl port-forward` to reach one in a cluster)"))?;
    stream
        .write_all(format!("GET {path} HTTP/1.0\r\nHost: {address}\r\n\r\n").as_bytes())
        .await?;
    let mut response = String::new();
    stream.read_to_string(&mut response).await?;
    let Some((head, body)) = response.split_once("\r\n\r\n") else {
        bail!("the operator at {base} sent no HTTP response");
    };
    if !head.starts_with("HTTP/1.1 200") && !head.starts_with("HTTP/1.0 200") {
        bail!(
            "the operator at {base} answered {}",
            head.lines().next().unwrap_or_default()
        );
    }
    serde_json::from_str(body).context("the operator's device list is not valid JSON")
}

pub fn render(devices: &[DeviceView]) -> String {
    let mut out = format!(
        "{:<18} {:<20} {:<20} {:<12} {:<8} {:<9} {:<10} {:<9} {:<16} {:<9} {}\n",
        "DEVICE",
        "POOL",
        "OWNER",
        "PLATFORM",
        "STATE",
        "ENLISTED",
        "OFFER",
        "SEEN",
        "ERRORS",
        "RELIABLE",
        "NOTE"
    );
    for d in devices {
        let state = match (d.online, d.available) {
            (false, _) => "lost",
            (true, false) => "withheld",
            (true, true) => "online",
        };
        out.push_str(&format!(
            "{:<18} {:<20} {:<20} {:<12} {:<8} {:<9} {:<10} {:<9} {:<16} {:<9} {}\n",
            d.id,
            d.pool,
            d.owner.as_deref().unwrap_or("-"),
            format!("{}/{}", d.os, d.arch),
            state,
            if d.enlisted { "yes" } else { "no" },
            format!("{}m/{}Mi", d.offer_millicores, d.offer_memory_bytes >> 20),
            format!("{}s ago", d.seconds_since_seen),
            // The error rate, and validated/invalid results, once it has any.
            d.reputation
                .as_ref()
                .filter(|r| r.validated + r.invalid > 0 || r.quarantined.is_some())
                .map_or("-".into(), |r| format!(
                    "{:.1}% {}/{}",
                    r.error_rate_percent, r.validated, r.invalid
                )),
            // The share of the time it stayed connected.
            d.reputation
                .as_ref()
                .and_then(|r| r.reliability_percent)
                .map_or("-".into(), |percent| format!("{percent:.1}%")),
            d.note.as_deref().unwrap_or("")
        ));
    }
    out
}
