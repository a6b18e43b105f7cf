//! Usage accounting end to end: agents charge every run to their ledgers, the operator stores
//! the records in PoolUsage objects exactly once (across an operator crash and a preemption),
//! and the operator's report, the agents' status and the agents' metrics agree.

use std::time::Duration;

use kube::ResourceExt;
use serde_json::Value;

use darkcore_crds::Amounts;

use crate::devices::{process_pool, quick_loss_pool};
use crate::fleet::Agent;
use crate::harness::{free_port, http_get, operator_cli, poll_until};
use crate::pods::{Bench, main_status, placed_on};

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
    let rows = stored_rows(&bench);
    let mut total = Amounts::default();
    for (device, ledger) in &ledgers {
        let stored = stored_for(&bench, &rows, device);
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

#[tokio::test]
async fn a_lost_attempt_is_charged_once_and_still_shown_after_an_operator_crash() {
    let mut bench = Bench::start("lostcharge", 2, quick_loss_pool()).await;
    let mut pod = bench.pod("moved", "sleep 4; echo held; sleep 20", "Never");
    pod.spec.as_mut().unwrap().containers[0].resources = Some(
        serde_json::from_value(serde_json::json!({ "requests": { "memory": "64Mi" } })).unwrap(),
    );
    bench.create(pod).await;
    let running = bench
        .phase_is("moved", "Running", Duration::from_secs(60))
        .await;
    let first = placed_on(&running).unwrap();
    // Its output comes over its device's stream: the device was heard 4 s into the run.
    bench
        .logs_show("moved", "held", Duration::from_secs(30))
        .await;
    bench.kill_agent(&first).await;

    // Its device is lost; the task runs on the other one; the operator dies at once, before
    // or after it stored its charge for the lost attempt.
    poll_until(
        "the task runs again on the other device",
        Duration::from_secs(60),
        || async {
            let pod = bench.pods().get("moved").await.map_err(|e| e.to_string())?;
            let restarts = pod
                .status
                .as_ref()
                .and_then(|s| s.container_statuses.as_ref())
                .map(|s| s[0].restart_count);
            match (placed_on(&pod), restarts) {
                (Some(device), Some(1)) if device != first => Ok(()),
                other => Err(format!("{other:?}")),
            }
        },
    )
    .await;
    bench.fx.operator.kill().await;
    bench.restart_operator().await;

    // The restarted operator goes on showing the loss, and counting it among the restarts.
    let done = bench
        .phase_is("moved", "Succeeded", Duration::from_secs(90))
        .await;
    let status = main_status(&done);
    assert_eq!(status.restart_count, 1);
    let lost = status.last_state.unwrap().terminated.unwrap();
    assert_eq!(lost.reason.as_deref(), Some("DeviceLost"));
    assert!(
        lost.container_id
            .as_deref()
            .is_some_and(|id| id.starts_with(&format!("darkcore://{first}/"))),
        "{lost:?}"
    );
    let held_seconds = lost.finished_at.as_ref().unwrap().0.as_second()
        - lost.started_at.as_ref().unwrap().0.as_second();
    assert!(held_seconds >= 3, "{lost:?}");

    // The lost device is charged once for it: 64 MiB for as long as it held it until last
    // heard, as interrupted.
    let stored = poll_until(
        "the lost attempt's charge is stored",
        Duration::from_secs(30),
        || async {
            let stored = stored_for(&bench, &stored_rows(&bench), &first);
            match stored.interrupted {
                0 => Err(format!("{stored:?}")),
                _ => Ok(stored),
            }
        },
    )
    .await;
    assert_eq!((stored.tasks, stored.interrupted), (0, 1), "{stored:?}");
    let expected = 64 * held_seconds as u64;
    assert!(
        stored.memory_mib_seconds.abs_diff(expected) <= 64,
        "{} MiB-s for {held_seconds} s of 64 MiB",
        stored.memory_mib_seconds
    );
    bench.finish().await;
}

/// The rows of `darkcore-operator usage --per-device` for the bench's pool.
fn stored_rows(bench: &Bench) -> Vec<Value> {
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
    serde_json::from_slice(&out.stdout).unwrap()
}

/// What `rows` store for `device`, all in the bench's namespace.
fn stored_for(bench: &Bench, rows: &[Value], device: &str) -> Amounts {
    let mut stored = Amounts::default();
    for row in rows.iter().filter(|r| r["device"] == device) {
        assert_eq!(
            row["namespace"],
            bench.ns.name.as_str(),
            "namespaces are the operator's: {row}"
        );
        // A row carries the stored amounts under the CRD's own field names.
        stored.add(&serde_json::from_value(row.clone()).unwrap());
    }
    stored
}

/// The metric `darkcore_operator_usage_records_total{result=...}`, 0 while absent.
async fn usage_records(bench: &Bench, result: &str) -> f64 {
    let line = format!("darkcore_operator_usage_records_total{{result=\"{result}\"}}");
    crate::devices::metric(&bench.fx.operator, &line)
        .await
        .unwrap_or(0.0)
}

#[tokio::test]
async fn a_device_lying_about_usage_is_refused_or_bounded_and_an_honest_one_is_counted() {
    let bench = Bench::start("usagelie", 1, process_pool()).await;
    let created = std::time::Instant::now();
    let day_at_start = k8s_openapi::jiff::Timestamp::now()
        .strftime("%Y-%m-%d")
        .to_string();
    // An honest run, whose task id the liar will claim as its own.
    let honest = bench
        .create(bench.pod(
            "honest",
            "i=0; while [ $i -lt 30000 ]; do i=$((i+1)); done; sleep 3",
            "Never",
        ))
        .await;
    let honest_task = format!("{}.1", honest.uid().unwrap());
    bench
        .phase_is("honest", "Running", Duration::from_secs(60))
        .await;

    // A device of four cores that, besides running its task, reports usage no agent would.
    let lies = [
        "--task-seconds",
        "2",
        "--lie-usage",
        "--claim",
        &honest_task,
    ];
    let token = crate::fleet::token(&bench.fx.pool, &[]);
    let _liar = crate::fleet::swarm_device(bench.fx.operator.gateway_port, &token, 4000, &lies);
    crate::fleet::node_cpu_is(
        &bench.fx.nodes(),
        &bench.fx.node,
        5000,
        Duration::from_secs(60),
    )
    .await;
    // Two cores: only the liar fits.
    let mut lied = bench.pod("lied", "true", "Never");
    lied.spec.as_mut().unwrap().containers[0].resources =
        Some(serde_json::from_value(serde_json::json!({ "requests": { "cpu": "2" } })).unwrap());
    bench.create(lied).await;
    let done = bench
        .phase_is("lied", "Succeeded", Duration::from_secs(60))
        .await;
    let liar = placed_on(&done).unwrap();
    bench
        .phase_is("honest", "Succeeded", Duration::from_secs(60))
        .await;

    // Every lie is refused or bounded: 20 more days of the same run, a task never held,
    // the honest device's task, and the inflated run itself.
    for (result, at_least) in [
        ("refused_already_charged", 20.0),
        ("refused_never_held", 1.0),
        ("refused_not_holder", 1.0),
        ("clipped", 1.0),
    ] {
        poll_until(result, Duration::from_secs(30), || async {
            let seen = usage_records(&bench, result).await;
            match seen >= at_least {
                true => Ok(()),
                false => Err(format!("{seen}")),
            }
        })
        .await;
    }

    // The honest device's records are all stored, and match its ledger exactly.
    let honest_device = &bench.agents[0];
    let ledger = poll_until(
        "the honest agent's usage acknowledged",
        Duration::from_secs(30),
        || async {
            match acknowledged_ledger(honest_device) {
                Some(ledger) if ledger.tasks == 1 => Ok(ledger),
                other => Err(format!("{other:?}")),
            }
        },
    )
    .await;
    let rows = stored_rows(&bench);
    let stored = |device: &str| stored_for(&bench, &rows, device);
    assert_eq!(
        stored(&honest_device.device_id),
        ledger,
        "the honest device"
    );
    // The liar is charged one run, within what it could have used: its four cores for no
    // longer than the test has run, and nothing reserved.
    let charged = stored(&liar);
    let bound = 4 * created.elapsed().as_millis() as u64;
    assert_eq!((charged.tasks, charged.interrupted), (1, 0), "{charged:?}");
    assert!(
        charged.cpu_milliseconds <= bound,
        "{charged:?} past {bound}"
    );
    assert!(charged.memory_mib_seconds <= 1, "{charged:?}");
    // Days are the operator's too: no object for a year to come or the days before.
    let today = k8s_openapi::jiff::Timestamp::now()
        .strftime("%Y-%m-%d")
        .to_string();
    let objects: Vec<darkcore_crds::PoolUsage> = kube::Api::all(bench.fx.client.clone())
        .list(
            &kube::api::ListParams::default()
                .labels(&format!("darkcore.io/pool={}", bench.fx.pool)),
        )
        .await
        .unwrap()
        .items;
    assert!(!objects.is_empty());
    for object in &objects {
        assert!(
            [&day_at_start, &today].contains(&&object.spec.day),
            "a PoolUsage for {}",
            object.spec.day
        );
    }
    bench.finish().await;
}
