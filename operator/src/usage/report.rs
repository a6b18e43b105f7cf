//! `darkcore-operator usage`: sums the PoolUsage objects into rows per pool and namespace
//! (or per device), from a day on, as a table or JSON.

use std::collections::BTreeMap;

use anyhow::Context as _;
use darkcore_crds::{Amounts, PoolUsage};
use k8s_openapi::jiff::Timestamp;
use kube::api::ListParams;
use kube::{Api, Client};
use serde::Serialize;

use crate::pool::POOL_LABEL;
use crate::usage::ledger::utc_day;

/// One row of the report. `device` is empty unless rows are per device.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Row {
    pub pool: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub device: String,
    pub namespace: String,
    #[serde(flatten)]
    pub amounts: Amounts,
}

/// The first UTC day to count: a date (YYYY-MM-DD) as given, or a duration back from `now`
/// (24h, 7d), rounded down to its day.
pub fn since_day(text: &str, now: Timestamp) -> Result<String, String> {
    if let Ok(date) = text.parse::<k8s_openapi::jiff::civil::Date>() {
        return Ok(date.to_string());
    }
    let back = crate::enroll::token::parse_ttl(text).map_err(|_| {
        format!("--since {text:?}: give a day (2026-11-01) or a time back from now (24h, 7d)")
    })?;
    let now_ms = now.as_millisecond();
    let back_ms = i64::try_from(back.as_millis()).unwrap_or(i64::MAX);
    Ok(utc_day(now_ms.saturating_sub(back_ms)))
}

/// Sums the objects of days from `since` on, per pool and namespace, or per pool, device
/// and namespace.
pub fn summarize(objects: &[PoolUsage], since: Option<&str>, per_device: bool) -> Vec<Row> {
    let mut rows: BTreeMap<(String, String, String), Amounts> = BTreeMap::new();
    for object in objects {
        let spec = &object.spec;
        if since.is_some_and(|since| spec.day.as_str() < since) {
            continue;
        }
        for (device, usage) in &spec.devices {
            for (namespace, amounts) in &usage.namespaces {
                let device = if per_device {
                    device.clone()
                } else {
                    String::new()
                };
                rows.entry((spec.pool.clone(), device, namespace.clone()))
                    .or_default()
                    .add(amounts);
            }
        }
    }
    rows.into_iter()
        .map(|((pool, device, namespace), amounts)| Row {
            pool,
            device,
            namespace,
            amounts,
        })
        .collect()
}

/// The rows as a table, with a total line.
pub fn render(rows: &[Row], per_device: bool) -> String {
    let mut out = String::new();
    let line = |pool: &str, device: &str, namespace: &str, amounts: &Amounts| {
        let device = if per_device {
            format!("{device:<18} ")
        } else {
            String::new()
        };
        format!(
            "{pool:<20} {device}{namespace:<20} {:>8} {:>11} {:>14.3} {:>16.3}\n",
            amounts.tasks,
            amounts.interrupted,
            amounts.core_seconds(),
            amounts.memory_gib_seconds()
        )
    };
    let device_header = if per_device {
        format!("{:<18} ", "DEVICE")
    } else {
        String::new()
    };
    out.push_str(&format!(
        "{:<20} {device_header}{:<20} {:>8} {:>11} {:>14} {:>16}\n",
        "POOL", "NAMESPACE", "TASKS", "INTERRUPTED", "CORE-SECONDS", "MEMORY-GIB-S"
    ));
    let mut total = Amounts::default();
    for row in rows {
        total.add(&row.amounts);
        out.push_str(&line(&row.pool, &row.device, &row.namespace, &row.amounts));
    }
    out.push_str(&line("(all)", "", "", &total));
    out
}

/// Reads the PoolUsage objects, of one pool or all.
pub async fn fetch(client: &Client, pool: Option<&str>) -> anyhow::Result<Vec<PoolUsage>> {
    let api: Api<PoolUsage> = Api::all(client.clone());
    let mut params = ListParams::default();
    if let Some(pool) = pool {
        params = params.labels(&format!("{POOL_LABEL}={pool}"));
    }
    let list = api.list(&params).await.context(
        "listing PoolUsage objects (install darkcore's CRDs, and grant list on poolusages.darkcore.io)",
    )?;
    Ok(list.items)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::usage::ledger::{Bucket, apply};
    use darkcore_proto::agent::v1::UsageRecord;

    fn object(pool: &str, day_ms: i64, device: &str, namespace: &str, cpu: u64) -> PoolUsage {
        let bucket = Bucket::of(pool, device, day_ms);
        let mut spec = bucket.empty_spec();
        let record = UsageRecord {
            sequence: 1,
            namespace: namespace.into(),
            cpu_milliseconds: cpu,
            memory_mib_seconds: 1024,
            completed: true,
            ..Default::default()
        };
        apply(&mut spec, device, &[record.into()]);
        PoolUsage::new(&bucket.name(), spec)
    }

    const NOV_21: i64 = 1_795_305_600_000 - 1;
    const NOV_22: i64 = 1_795_305_600_000;

    #[test]
    fn rows_sum_per_pool_and_namespace_from_a_day_on() {
        let objects = [
            object("lab", NOV_21, "dev-a", "team", 1000),
            object("lab", NOV_22, "dev-a", "team", 500),
            object("lab", NOV_22, "dev-b", "team", 250),
            object("lab", NOV_22, "dev-b", "other", 1),
        ];
        let all = summarize(&objects, None, false);
        assert_eq!(all.len(), 2);
        assert_eq!(all[1].namespace, "team");
        assert_eq!(all[1].amounts.cpu_milliseconds, 1750);
        let since = summarize(&objects, Some("2026-11-22"), false);
        assert_eq!(since[1].amounts.cpu_milliseconds, 750);
        assert_eq!(since[1].amounts.tasks, 2);
        let per_device = summarize(&objects, Some("2026-11-22"), true);
        assert_eq!(per_device.len(), 3);
        let text = render(&per_device, true);
        assert!(text.contains("DEVICE"), "{text}");
        assert!(
            text.lines().last().unwrap().contains("0.751"),
            "total: {text}"
        );
    }

    #[test]
    fn since_takes_a_day_or_a_time_back() {
        let now = Timestamp::from_millisecond(NOV_22 + 3_600_000).unwrap();
        assert_eq!(since_day("2026-11-01", now).unwrap(), "2026-11-01");
        assert_eq!(since_day("24h", now).unwrap(), "2026-11-21");
        assert_eq!(since_day("1h", now).unwrap(), "2026-11-22");
        let error = since_day("last week", now).unwrap_err();
        assert!(error.contains("give a day"), "{error}");
    }
}
