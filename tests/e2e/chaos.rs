//! Chaos: an indexed Job of 100 on 8 agents while agents are killed with their tasks and
//! replaced, and the operator is killed once. Every run writes its start and end to a file on
//! the host, so the test can check that no index ever ran on two devices at once.

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use darkcore_crds::{DevicePoolSpec, Runtime};
use k8s_openapi::api::batch::v1::Job;
use kube::api::ListParams;

use crate::fleet::{Agent, token};
use crate::harness::{log_dir, poll_until, unique};
use crate::pods::Bench;

const COMPLETIONS: i32 = 100;
const AGENTS: usize = 8;
/// Agents killed (and replaced) while the Job runs.
const KILLS: usize = 5;

fn unix_nanos() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_nanos() as i64
}

/// One run of an index, as the host saw it: from its start line to its end line, or to when
/// the test killed it.
#[derive(Clone, Debug)]
struct RunSpan {
    index: u32,
    pid: u32,
    from: i64,
    to: Option<i64>,
}

/// The runs a record file lists, with the kills the test made (pid and when).
fn spans(record: &str, killed: &HashMap<u32, i64>) -> Vec<RunSpan> {
    let mut open: HashMap<u32, RunSpan> = HashMap::new();
    let mut done = Vec::new();
    for line in record.lines() {
        let words: Vec<&str> = line.split_whitespace().collect();
        let [what, index, at, pid] = words[..] else {
            continue;
        };
        let (index, at, pid) = (
            index.parse().unwrap(),
            at.parse().unwrap(),
            pid.parse().unwrap(),
        );
        match what {
            "start" => {
                open.insert(
                    pid,
                    RunSpan {
                        index,
                        pid,
                        from: at,
                        to: None,
                    },
                );
            }
            "end" => {
                if let Some(mut span) = open.remove(&pid) {
                    span.to = Some(at);
                    done.push(span);
                }
            }
            _ => {}
        }
    }
    for (pid, mut span) in open {
        span.to = killed.get(&pid).copied();
        done.push(span);
    }
    done
}

/// Asserts that no index's runs overlap in time (a run neither ended nor killed counts as
/// running on); returns how many runs were re-runs.
fn never_twice_at_once(runs: &[RunSpan]) -> usize {
    let mut by_index: BTreeMap<u32, Vec<&RunSpan>> = BTreeMap::new();
    for span in runs {
        by_index.entry(span.index).or_default().push(span);
    }
    let mut reruns = 0;
    for (index, spans) in &by_index {
        reruns += spans.len() - 1;
        for (i, a) in spans.iter().enumerate() {
            let a_end = a.to.unwrap_or(i64::MAX);
            for b in &spans[i + 1..] {
                let b_end = b.to.unwrap_or(i64::MAX);
                assert!(
                    a_end <= b.from || b_end <= a.from,
                    "index {index} ran twice at once: pid {} {a:?} and pid {} {b:?}",
                    a.pid,
                    b.pid
                );
            }
        }
    }
    reruns
}

/// The children of a process: its tasks, for the agent runtime `process`.
fn children(pid: u32) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|child| {
            std::fs::read_to_string(format!("/proc/{child}/stat")).is_ok_and(|stat| {
                // pid (comm) state ppid ...: the comm may hold spaces, so read after ')'.
                stat.rsplit_once(')')
                    .and_then(|(_, rest)| rest.split_whitespace().nth(1)?.parse::<u32>().ok())
                    == Some(pid)
            })
        })
        .collect()
}

/// Kills an agent with its tasks, as a pulled plug does; returns the tasks' pids and when.
async fn kill_with_tasks(agent: &mut Agent) -> (Vec<u32>, i64) {
    let tasks = agent.pid().map(children).unwrap_or_default();
    agent.kill().await;
    for task in &tasks {
        // Each task leads its own process group.
        let _ = std::process::Command::new("kill")
            .args(["-KILL", "--", &format!("-{task}")])
            .status();
    }
    (tasks, unix_nanos())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_completes_through_killed_agents_and_a_killed_operator_never_running_an_index_twice_at_once()
 {
    let spec = DevicePoolSpec {
        runtimes: vec![Runtime::Process],
        fence_seconds: 5,
        max_redispatches: 20,
        ..Default::default()
    };
    let mut bench = Bench::start("chaos", AGENTS, spec).await;
    let record = log_dir().join(format!("{}.record", unique("chaos")));
    // ($$$$ is the shell's $$ once Kubernetes has expanded $$ to $. A run its agent stops,
    // fenced or cancelled, gets SIGTERM first and records its end too.)
    let script = format!(
        "trap 'echo end $JOB_COMPLETION_INDEX $(date +%s%N) $$$$ >> {record}; exit 143' TERM; \
         echo start $JOB_COMPLETION_INDEX $(date +%s%N) $$$$ >> {record}; sleep 3; \
         echo end $JOB_COMPLETION_INDEX $(date +%s%N) $$$$ >> {record}; echo done $JOB_COMPLETION_INDEX",
        record = record.display()
    );
    let mut pod = bench.pod("chaos", &script, "Never");
    pod.spec.as_mut().unwrap().containers[0].resources = Some(
        serde_json::from_value(serde_json::json!({
            "requests": { "cpu": "1", "memory": "64Mi" }
        }))
        .unwrap(),
    );
    let jobs = bench
        .indexed_job_of("chaos", COMPLETIONS, AGENTS as i32, pod)
        .await;
    let started = Instant::now();
    let succeeded = |jobs: &kube::Api<Job>| {
        let jobs = jobs.clone();
        async move {
            jobs.get("chaos")
                .await
                .ok()
                .and_then(|j| j.status?.succeeded)
                .unwrap_or(0)
        }
    };

    // Every 6 s an agent is killed with its tasks and a new one joins; halfway, the operator
    // is killed and restarted.
    let join = token(&bench.fx.pool, &[]);
    let mut killed: HashMap<u32, i64> = HashMap::new();
    let mut kills = 0;
    let mut operator_killed = false;
    while kills < KILLS || !operator_killed {
        tokio::time::sleep(Duration::from_secs(6)).await;
        let done = succeeded(&jobs).await;
        assert!(
            started.elapsed() < Duration::from_secs(400),
            "stuck at {done}"
        );
        if !operator_killed && done >= COMPLETIONS / 2 {
            bench.fx.operator.kill().await;
            bench.restart_operator().await;
            operator_killed = true;
            continue;
        }
        if kills < KILLS && done < COMPLETIONS - 10 {
            let victim = kills % AGENTS;
            let (tasks, at) = kill_with_tasks(&mut bench.agents[victim]).await;
            killed.extend(tasks.into_iter().map(|pid| (pid, at)));
            bench.agents[victim] = Agent::start(bench.fx.operator.gateway_port, &join, 1.0).await;
            kills += 1;
        } else {
            kills = KILLS;
        }
    }
    let pods = bench
        .job_succeeds(&jobs, "chaos", COMPLETIONS, Duration::from_secs(400))
        .await;
    let took = started.elapsed();

    // No index ever ran on two devices at once.
    let text = std::fs::read_to_string(&record).unwrap();
    let runs = spans(&text, &killed);
    let reruns = never_twice_at_once(&runs);
    let unfinished: Vec<_> = runs.iter().filter(|r| r.to.is_none()).collect();
    assert!(
        unfinished.is_empty(),
        "runs neither ended nor killed: {unfinished:?}"
    );
    assert_eq!(runs.len() - reruns, COMPLETIONS as usize, "every index ran");

    // Nothing is left Pending or Terminating.
    let all = bench
        .pods()
        .list(&ListParams::default())
        .await
        .unwrap()
        .items;
    for pod in &all {
        let phase = pod.status.as_ref().and_then(|s| s.phase.clone());
        assert_eq!(
            phase.as_deref(),
            Some("Succeeded"),
            "{}",
            pod.metadata.name.as_deref().unwrap_or("")
        );
        assert!(pod.metadata.deletion_timestamp.is_none());
    }
    assert_eq!(pods.len(), COMPLETIONS as usize);

    // Every pod's logs are readable: those that finished before the operator restarted keep
    // their output on themselves, and those running through it are sent again by their
    // devices.
    for pod in &pods {
        let name = pod.metadata.name.clone().unwrap();
        let index =
            pod.metadata.annotations.as_ref().unwrap()["batch.kubernetes.io/job-completion-index"]
                .clone();
        let logs = bench.kubectl(&["logs", &name]);
        assert_eq!(logs, format!("done {index}\n"), "{name}");
    }

    // Usage: every run reserved 64 Mi for as long as it held it; the pool's memory-seconds,
    // over 64, are the seconds runs were held, which the record measures.
    let measured: f64 = runs
        .iter()
        .filter_map(|s| Some((s.to? - s.from) as f64 / 1e9))
        .sum();
    let usage = poll_until("usage stored", Duration::from_secs(60), || async {
        let objects: Vec<darkcore_crds::PoolUsage> = kube::Api::all(bench.fx.client.clone())
            .list(&ListParams::default().labels(&format!("darkcore.io/pool={}", bench.fx.pool)))
            .await
            .unwrap()
            .items;
        let mut total = darkcore_crds::Amounts::default();
        for object in &objects {
            total.add(&object.spec.total);
        }
        match total.tasks >= COMPLETIONS as u64 {
            true => Ok(total),
            false => Err(format!("{total:?}")),
        }
    })
    .await;
    let charged = usage.memory_mib_seconds as f64 / 64.0;
    eprintln!(
        "chaos: {COMPLETIONS} completions in {took:?}; {} runs ({reruns} re-runs) after {KILLS} agent kills and one operator kill; all logs readable; usage {} tasks, {} interrupted, held {charged:.1} s charged vs {measured:.1} s measured ({:+.1}%)",
        runs.len(),
        usage.tasks,
        usage.interrupted,
        (charged - measured) / measured * 100.0
    );
    // Never less than the runs lived, but for runs lost with their device, charged only until
    // it was last heard (at most a fence, 5 s, before it died); more only by what holding a run
    // adds around its life (the agent starting and reaping it, the report's trip), which this
    // test's load on two cores stretches to tenths of a second: at most a second per run.
    let unheard = usage.interrupted as f64 * 5.0;
    assert!(
        charged >= measured - unheard,
        "charged {charged:.1} s, less than the {measured:.1} s measured"
    );
    let extra_per_run = (charged - measured) / runs.len() as f64;
    assert!(
        extra_per_run <= 1.0,
        "charged {charged:.1} s vs measured {measured:.1} s: {extra_per_run:.2} s more per run"
    );
    bench.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_down_for_16_s_runs_no_long_task_twice() {
    // The default fence (30 s): agents keep their tasks through the outage, and the new
    // operator, which cannot know when they were last heard, waits its fence from its start.
    let mut bench = Bench::start("outage", 4, crate::devices::process_pool()).await;
    let record = log_dir().join(format!("{}.record", unique("outage")));
    let script = format!(
        "echo start $JOB_COMPLETION_INDEX $(date +%s%N) $$$$ >> {record}; sleep 25; \
         echo end $JOB_COMPLETION_INDEX $(date +%s%N) $$$$ >> {record}",
        record = record.display()
    );
    let mut pod = bench.pod("long", &script, "Never");
    pod.spec.as_mut().unwrap().containers[0].resources =
        Some(serde_json::from_value(serde_json::json!({ "requests": { "cpu": "1" } })).unwrap());
    let jobs = bench.indexed_job_of("long", 4, 4, pod).await;
    bench.job_has_ready(&jobs, "long", 4).await;
    bench.fx.operator.kill().await;
    // Longer than the agents' first reconnect back-off: they are still reconnecting, with
    // their copies running, when the new operator starts.
    tokio::time::sleep(Duration::from_secs(16)).await;
    bench.restart_operator().await;
    bench
        .job_succeeds(&jobs, "long", 4, Duration::from_secs(120))
        .await;
    let runs = spans(&std::fs::read_to_string(&record).unwrap(), &HashMap::new());
    never_twice_at_once(&runs);
    let mut indexes: Vec<u32> = runs.iter().map(|r| r.index).collect();
    indexes.sort();
    assert_eq!(indexes, [0, 1, 2, 3], "each index ran once: {runs:?}");
    assert!(runs.iter().all(|r| r.to.is_some()), "{runs:?}");
    bench.finish().await;
}
