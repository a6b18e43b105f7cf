//! Usage accounting end to end: agents charge every run to their ledgers, the operator stores
//! the records in PoolUsage objects exactly once (across an operator crash and a preemption),
//! and the operator's report, the agents' status and the agents' metrics agree.

use std::time::Duration;

use serde_json::Value;

use darkcore_crds::Amounts;

use crate::devices::process_pool;
use crate::fleet::Agent;
use crate::harness::{free_port, http_get, operator_cli, poll_until};
use crate::pods::{Bench, placed_on};

fn number(value: &Value, key: &str) -> u64 {
    value[key].as_u64().unwrap_or(0)
}

/// An agent's ledger totals, once the operator has acknowledged every record.
fn acknowledged_ledger(agent: &Agent) -> Option<Amounts> {
    let status = agent.status_json();
    if status["usage_unacknowledged"].as_u64() != Some(0) {
        return None;
    }
    let usage = &status["usage"];
    Some(Amounts {
        tasks: number(usage, "tasks"),
        interrupted: number(usage, "interrupted"),
        cpu_milliseconds: number(usage, "cpu_milliseconds"),
        memory_mib_seconds: number(usage, "memory_mib_seconds"),
    })
}

#[tokio::test]
async fn usage_counts_every_run_once_across_an_operator_crash_and_a_preemption() {
    let mut bench = Bench::start("usage", 1, process_pool()).await;
    let metrics_port = free_port();
    bench
        .add_agent(&format!(
            "[metrics]\naddress = \"127.0.0.1:{metrics_port}\"\n"
        ))
        .await;

    // Six runs that use CPU and reserve 64 MiB each, two at a time; the operator is killed
    // while two run, so records reach a dead operator or come again to the new one.
    let mut work = bench.pod(
        "work",
        "i=0; while [ $i -lt 50000 ]; do i=$((i+1)); done; sleep 2",
        "Never",
    );
    work.spec.as_mut().unwrap().containers[0].resources = Some(
        serde_json::from_value(serde_json::json!({ "requests": { "memory": "64Mi" } })).unwrap(),
    );
    let jobs = bench.indexed_job_of("work", 6, 2, work).await;
    bench.job_has_ready(&jobs, "work", 2).await;
    bench.fx.operator.kill().await;
    // The two runs go on without the operator and end; each agent's status shows it, and
    // that their records wait to be sent.
    poll_until(
        "the runs end while the operator is away",
        Duration::from_secs(60),
        || async {
            let statuses: Vec<Value> = bench.agents.iter().map(Agent::status_json).collect();
            let idle = statuses.iter().all(|s| {
                s["connected"] == Value::Bool(false)
                    && s["running_tasks"].as_array().is_some_and(Vec::is_empty)
            });
            let waiting: u64 = statuses
                .iter()
                .map(|s| number(s, "usage_unacknowledged"))
                .sum();
            if idle && waiting > 0 {
                Ok(())
            } else {
                Err(format!("{statuses:?}"))
            }
        },
    )
    .await;
    bench.restart_operator().await;
    bench
        .job_succeeds(&jobs, "work", 6, Duration::from_secs(120))
        .await;

    // A seventh run is preempted by its owner, and runs again on the other device.
    bench.create(bench.pod("moved", "sleep 3", "Never")).await;
    let running = bench
        .phase_is("moved", "Running", Duration::from_secs(60))
        .await;
    let first = placed_on(&running).unwrap();
    let owner = bench.agents.iter().find(|a| a.device_id == first).unwrap();
    owner.owner_active(true);
    let done = bench
        .phase_is("moved", "Succeeded", Duration::from_secs(90))
        .await;
    assert_ne!(placed_on(&done).unwrap(), first);

    // Every record is stored and acknowledged: seven runs ended on their own, one was
    // interrupted.
    let ledgers: Vec<(String, Amounts)> = poll_until(
        "both agents' usage acknowledged",
        Duration::from_secs(60),
        || async {
            let statuses: Vec<Value> = bench.agents.iter().map(Agent::status_json).collect();
            let ledgers: Option<Vec<(String, Amounts)>> = bench
                .agents
                .iter()
                .map(|a| acknowledged_ledger(a).map(|l| (a.device_id.clone(), l)))
                .collect();
            let mut sum = Amounts::default();
            ledgers.iter().flatten().for_each(|(_, a)| sum.add(a));
            match ledgers {
                Some(ledgers) if (sum.tasks, sum.interrupted) == (7, 1) => Ok(ledgers),
                _ => Err(format!("{statuses:?}")),
            }
        },
    )
    .await;

    // The operator's objects agree with each device's ledger, exactly.
    let out = operator_cli(&[
        "usage",
        "--pool",
        &bench.fx.pool,
        "--per-device",
        "-o",
        "json",
    ]);
    assert!(
        out.status.success(),
        "usage: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let rows: Vec<Value> = serde_json::from_slice(&out.stdout).unwrap();
    let mut total = Amounts::default();
    for (device, ledger) in &ledgers {
        let mut stored = Amounts::default();
        for row in rows.iter().filter(|r| r["device"] == device.as_str()) {
            assert_eq!(row["namespace"], bench.ns.name.as_str(), "{row}");
            // A row carries the stored amounts under the CRD's own field names.
            stored.add(&serde_json::from_value(row.clone()).unwrap());
        }
        assert_eq!(&stored, ledger, "device {device}: stored vs its ledger");
        total.add(&stored);
    }
    assert_eq!((total.tasks, total.interrupted), (7, 1));
    assert!(total.cpu_milliseconds > 0, "busy loops used CPU: {total:?}");
    assert!(
        total.memory_mib_seconds >= 6 * 64 * 2,
        "six runs held 64 MiB for over 2 s each: {total:?}"
    );

    // People see the same: the table, kubectl, the owner's status, the agent's metrics.
    let table = operator_cli(&["usage", "--pool", &bench.fx.pool, "--since", "1d"]);
    let table = String::from_utf8_lossy(&table.stdout).into_owned();
    assert!(
        table
            .lines()
            .any(|l| l.contains(&bench.ns.name) && l.contains(" 7 ")),
        "{table}"
    );
    let objects = bench.kubectl(&[
        "get",
        "poolusages",
        "-l",
        &format!("darkcore.io/pool={}", bench.fx.pool),
        "-o",
        "name",
    ]);
    assert!(objects.contains("poolusage.darkcore.io/"), "{objects}");
    let (device, ledger) = &ledgers[1];
    let agent = bench
        .agents
        .iter()
        .find(|a| &a.device_id == device)
        .unwrap();
    let status = agent.status();
    assert!(
        status.contains(&format!(
            "{} tasks completed, {} interrupted",
            ledger.tasks, ledger.interrupted
        )),
        "{status}"
    );
    let (code, metrics) = http_get(metrics_port, "/metrics").await.unwrap();
    assert_eq!(code, 200);
    let line = format!(
        "darkcore_agent_task_runs_total{{result=\"completed\"}} {}",
        ledger.tasks
    );
    assert!(metrics.lines().any(|l| l == line), "{line} in\n{metrics}");
    bench.finish().await;
}
