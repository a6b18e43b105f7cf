//! Results checked by agreement between devices: pods that ask for a quorum run as replicas on
//! distinct real agents, and a lying agent (`[testing] fault`) is outvoted or leaves no quorum.

use std::time::Duration;

use std::collections::BTreeMap;

use darkcore_crds::{
    AdaptiveReplication, Amounts, Credit, CreditPrices, DevicePoolSpec, DeviceReputation,
    PoolUsage, ValidationPolicy,
};
use k8s_openapi::api::core::v1::{Pod, PodCondition};
use kube::api::ListParams;
use kube::{Api, ResourceExt};

use crate::devices::process_pool;
use crate::fleet;
use crate::harness::{OPERATOR_NAMESPACE, agent_bin, log_dir, operator_cli, poll_until, unique};
use crate::pods::Bench;

/// The condition a checked pod shows.
pub(crate) const VALIDATED: &str = "darkcore.io/Validated";

/// A `darkcore-process` pod that needs `quorum` agreeing results of at most `max_replicas`,
/// holding a whole core: it prints `printed`, writes `written` to /out/result on an emptyDir
/// (a declared result file), and takes `seconds` doing it.
fn checked_pod(bench: &Bench, name: &str, quorum: u32, max_replicas: u32, script: &str) -> Pod {
    let container = serde_json::json!({
        "image": "busybox",
        "command": ["sh", "-c", script],
        "resources": { "requests": { "cpu": "1" } },
        "volumeMounts": [{ "name": "out", "mountPath": "/out" }]
    });
    let mut pod = bench.pod_in("darkcore-process", name, container, "Never");
    pod.metadata.annotations = Some(
        [
            ("darkcore.io/quorum", quorum.to_string()),
            ("darkcore.io/max-replicas", max_replicas.to_string()),
            ("darkcore.io/result-paths", "/out/result".to_string()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect(),
    );
    Bench::with_empty_dir(pod, "out")
}

pub(crate) fn condition<'a>(pod: &'a Pod, type_: &str) -> Option<&'a PodCondition> {
    pod.status
        .as_ref()?
        .conditions
        .as_ref()?
        .iter()
        .find(|c| c.type_ == type_)
}

/// The devices a Validated message names as agreeing: "devices A, B gave ...".
fn agreeing(message: &str) -> Vec<String> {
    let list = message
        .split("devices ")
        .nth(1)
        .and_then(|rest| rest.split(" gave ").next())
        .unwrap_or_default();
    list.split(", ").map(str::to_string).collect()
}

/// Each device's credit in the pool's PoolUsage objects, summed over them.
async fn credit_by_device(bench: &Bench) -> BTreeMap<String, Credit> {
    let objects: Vec<PoolUsage> = Api::all(bench.fx.client.clone())
        .list(&ListParams::default().labels(&format!("darkcore.io/pool={}", bench.fx.pool)))
        .await
        .unwrap()
        .items;
    let mut credit: BTreeMap<String, Credit> = BTreeMap::new();
    for object in objects {
        for (device, usage) in object.spec.devices {
            let sum = credit.entry(device).or_default();
            sum.validated.add(&usage.credit.validated);
            sum.unverified.add(&usage.credit.unverified);
            sum.rejected.add(&usage.credit.rejected);
            sum.pending.extend(usage.credit.pending);
        }
    }
    credit
}

/// `darkcore-agent ARGS`, and whether it succeeded, with what it printed.
fn agent_cli(args: &[&str]) -> (bool, String) {
    let out = std::process::Command::new(agent_bin())
        .args(args)
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

#[tokio::test]
async fn a_quorum_job_completes_with_correct_output_when_one_of_four_devices_lies() {
    // Memory held earns 3600 points a GiB-hour (a point per GiB-second), CPU 1 a core-hour.
    let spec = DevicePoolSpec {
        credit: CreditPrices {
            price_per_core_hour: Some("1".into()),
            price_per_gib_hour: Some("3600".into()),
            currency: Some("points".into()),
        },
        ..process_pool()
    };
    let mut bench = Bench::start("quorum", 3, spec).await;
    bench.add_agent("fault = \"wrong-result\"\n").await;
    let liar = bench.agents[3].device_id.clone();
    // Four indexes at once, a core each, on four devices of a core: the liar takes one of the
    // first replicas, whatever the order.
    let script = "echo pi-$JOB_COMPLETION_INDEX=3.14159; echo $JOB_COMPLETION_INDEX > $DARKCORE_TASK_ROOT/out/result; sleep 3";
    let mut pod = checked_pod(&bench, "pi", 2, 5, script);
    pod.spec.as_mut().unwrap().containers[0].resources = Some(
        serde_json::from_value(serde_json::json!({
            "requests": { "cpu": "1", "memory": "64Mi" }
        }))
        .unwrap(),
    );
    let jobs = bench.indexed_job_of("pi", 4, 4, pod).await;
    let pods = bench
        .job_succeeds(&jobs, "pi", 4, Duration::from_secs(180))
        .await;
    let mut outvoted = 0;
    for pod in pods
        .iter()
        .filter(|p| p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Succeeded"))
    {
        let name = pod.name_any();
        let validated = condition(pod, VALIDATED).unwrap_or_else(|| panic!("{name}: {pod:?}"));
        let message = validated.message.clone().unwrap_or_default();
        assert_eq!(
            (validated.status.as_str(), validated.reason.as_deref()),
            ("True", Some("QuorumReached")),
            "{name}: {message}"
        );
        let devices = agreeing(&message);
        assert_eq!(devices.len(), 2, "{name}: {message}");
        assert_ne!(devices[0], devices[1], "{name}: distinct devices");
        assert!(
            !devices.contains(&liar),
            "{name}: the liar agreed: {message}"
        );
        if message.contains(&format!("disagreeing: {liar} gave")) {
            outvoted += 1;
        }
        let index = &pod.annotations()["batch.kubernetes.io/job-completion-index"];
        let want = format!("pi-{index}=3.14159\n");
        let logs = bench.logs_show(&name, &want, Duration::from_secs(10)).await;
        assert_eq!(logs, want, "{name}");
    }
    assert!(
        outvoted >= 1,
        "the liar's result was outvoted at least once"
    );
    let digests: std::collections::BTreeSet<String> = pods
        .iter()
        .filter_map(|p| condition(p, VALIDATED)?.message.clone())
        .map(|m| validated_digest(&m))
        .collect();
    assert_eq!(
        digests.len(),
        4,
        "each index printed its own output: {digests:?}"
    );
    // Each pod says in its Events that it was validated, and by whom.
    let first = pods[0].name_any();
    let events = bench.events(&first).await;
    assert!(
        events
            .iter()
            .any(|(reason, message)| reason == "Validated" && message.contains("agree")),
        "{events:?}"
    );

    // Credit: each index's two agreeing attempts are validated, each outvoted one of the liar
    // rejected, and nothing is left pending.
    let credit = poll_until("credit settled", Duration::from_secs(60), || async {
        let credit = credit_by_device(&bench).await;
        let (mut validated, mut rejected) = (Amounts::default(), Amounts::default());
        for sum in credit.values() {
            validated.add(&sum.validated);
            rejected.add(&sum.rejected);
        }
        let pending = credit.values().any(|c| !c.pending.is_empty());
        match (validated.tasks, rejected.tasks, pending) {
            (8, r, false) if r == outvoted => Ok(credit),
            _ => Err(format!("{credit:?}")),
        }
    })
    .await;
    assert_eq!(
        credit[&liar].validated,
        Amounts::default(),
        "the liar earns nothing"
    );
    assert_eq!(credit[&liar].rejected.tasks, outvoted);
    let (honest, honest_credit) = credit
        .iter()
        .find(|(device, c)| **device != liar && c.validated.tasks > 0)
        .unwrap();
    assert!(
        honest_credit.validated.memory_mib_seconds >= 64 * 3,
        "{honest_credit:?}"
    );

    // The honest device's statement is signed, verifies with the key its agent was given, and
    // credits its validated memory-seconds at a point per GiB-second.
    let statement = |device: &str| {
        let out = operator_cli(&[
            "usage",
            "statement",
            "--device",
            device,
            "--period",
            "1d",
            "--pool",
            &bench.fx.pool,
            "-n",
            OPERATOR_NAMESPACE,
        ]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let text = String::from_utf8(out.stdout).unwrap();
        let signed: serde_json::Value = serde_json::from_str(&text).unwrap();
        (
            text,
            signed["statement"]["credit"].as_str().unwrap().to_string(),
        )
    };
    let (text, earned) = statement(honest);
    let want = honest_credit.validated.memory_mib_seconds as f64 / 1024.0
        + honest_credit.validated.cpu_milliseconds as f64 / 3_600_000.0;
    assert!(
        (earned.parse::<f64>().unwrap() - want).abs() < 0.001 * want.max(1.0),
        "credit {earned}, validated {:?}",
        honest_credit.validated
    );
    let agent = bench
        .agents
        .iter()
        .find(|a| a.device_id == *honest)
        .unwrap();
    let state = agent.state_dir.to_str().unwrap().to_string();
    let file = log_dir().join(format!("{}.json", unique("statement")));
    std::fs::write(&file, &text).unwrap();
    let path = file.to_str().unwrap();
    let (valid, said) = agent_cli(&["statement", "verify", path, "--state-dir", &state]);
    assert!(
        valid && said.contains(&format!("credit {earned} points")),
        "{said}"
    );
    // One figure changed: refused, saying so.
    let tampered = text.replacen(&format!("\"{earned}\""), "\"999.000000\"", 1);
    assert_ne!(tampered, text);
    std::fs::write(&file, &tampered).unwrap();
    let (valid, said) = agent_cli(&["statement", "verify", path, "--state-dir", &state]);
    assert!(
        !valid && said.contains("changed after the operator signed it"),
        "{said}"
    );
    // The owner sees the same credit in the agent's status, from the operator's record.
    poll_until(
        "the agent shows its credit",
        Duration::from_secs(30),
        || async {
            let (_, status) = agent_cli(&["status", "--state-dir", &state]);
            match status.contains(&format!("credit:      {earned} points")) {
                true => Ok(()),
                false => Err(status),
            }
        },
    )
    .await;
    // The liar's statement credits nothing.
    assert_eq!(statement(&liar).1, "0.000000");
    bench.finish().await;
}

#[tokio::test]
async fn replicas_that_cannot_agree_fail_the_pod_with_no_quorum_and_list_the_digests() {
    let mut bench = Bench::start("noquorum", 1, process_pool()).await;
    bench.add_agent("fault = \"fake-success\"\n").await;
    let (honest, liar) = (
        bench.agents[0].device_id.clone(),
        bench.agents[1].device_id.clone(),
    );
    let script = "echo 42; echo 42 > $DARKCORE_TASK_ROOT/out/result";
    bench
        .create(checked_pod(&bench, "answer", 2, 2, script))
        .await;
    let failed = bench
        .phase_is("answer", "Failed", Duration::from_secs(120))
        .await;
    let status = failed.status.clone().unwrap();
    assert_eq!(status.reason.as_deref(), Some("NoQuorum"), "{status:?}");
    let message = status.message.unwrap_or_default();
    for device in [&honest, &liar] {
        assert!(message.contains(&format!("from {device}")), "{message}");
    }
    assert_eq!(message.matches("sha256:").count(), 2, "{message}");
    let validated = condition(&failed, VALIDATED).expect("the condition");
    assert_eq!(
        (validated.status.as_str(), validated.reason.as_deref()),
        ("False", Some("NoQuorum"))
    );
    let events = bench.events("answer").await;
    assert!(
        events
            .iter()
            .any(|(reason, m)| reason == "NoQuorum" && m.contains(&honest) && m.contains(&liar)),
        "{events:?}"
    );
    bench.finish().await;
}

#[tokio::test]
async fn replicas_go_to_devices_of_distinct_owners_named_by_their_join_tokens() {
    let mut bench = Bench::start("owners", 1, process_pool()).await;
    let pool = bench.fx.pool.clone();
    // The first device joined with a token that named nobody: it is its own owner.
    let mut first = bench.agents.remove(0);
    let loner = first.device_id.clone();
    first.stop().await;
    let alices = fleet::token(&pool, &["--owner", "alice@example.org"]);
    let alice_1 = bench.add_agent_with(&alices, "").await;
    let alice_2 = bench.add_agent_with(&alices, "").await;
    let listed =
        String::from_utf8_lossy(&operator_cli(&["token", "list", "-n", OPERATOR_NAMESPACE]).stdout)
            .into_owned();
    assert!(listed.contains("alice@example.org"), "{listed}");
    let refused = operator_cli(&["token", "create", "--pool", &pool, "--owner", "Alice Smith"]);
    let said = String::from_utf8_lossy(&refused.stderr);
    assert!(
        !refused.status.success() && said.contains("lower-case letters"),
        "{said}"
    );

    // Only alice's devices are online: the second replica waits, saying why.
    let script = "echo 42; echo 42 > $DARKCORE_TASK_ROOT/out/result";
    bench
        .create(checked_pod(&bench, "answer", 2, 2, script))
        .await;
    let why = poll_until(
        "the second replica waiting",
        Duration::from_secs(60),
        || async {
            let pod = bench
                .pods()
                .get("answer")
                .await
                .map_err(|e| e.to_string())?;
            let placed = condition(&pod, "darkcore.io/Placed").cloned();
            match placed
                .and_then(|c| c.message)
                .filter(|m| m.contains("another owner"))
            {
                Some(message) => Ok(message),
                None => Err(format!("{:?}", pod.status)),
            }
        },
    )
    .await;
    assert!(why.contains("of owner alice@example.org"), "{why}");

    // Bob's device joins: the second replica runs there, and the two agree.
    let bob = bench
        .add_agent_with(&fleet::token(&pool, &["--owner", "bob"]), "")
        .await;
    let done = bench
        .phase_is("answer", "Succeeded", Duration::from_secs(60))
        .await;
    let message = condition(&done, VALIDATED)
        .and_then(|c| c.message.clone())
        .unwrap_or_default();
    let devices = agreeing(&message);
    assert!(devices.contains(&bob), "{message}");
    assert!(
        devices.contains(&alice_1) != devices.contains(&alice_2),
        "one of alice's devices: {message}"
    );
    let operator = format!("http://127.0.0.1:{}", bench.fx.operator.http_port);
    let listing = operator_cli(&["devices", "--operator", &operator, "--pool", &pool]);
    let listing = String::from_utf8_lossy(&listing.stdout).into_owned();
    let row = |device: &str| {
        listing
            .lines()
            .find(|l| l.starts_with(device))
            .unwrap_or_default()
            .to_string()
    };
    assert!(row(&alice_1).contains("alice@example.org"), "{listing}");
    assert!(row(&bob).contains(" bob "), "{listing}");
    assert!(!row(&loner).contains("alice"), "{listing}");
    bench.finish().await;
}

/// A process pool whose validation is tuned for short tests: `adaptive` as given.
fn pool_with(adaptive: AdaptiveReplication) -> DevicePoolSpec {
    DevicePoolSpec {
        validation: ValidationPolicy {
            adaptive,
            ..Default::default()
        },
        ..process_pool()
    }
}

/// Waits until the pod's second replica waits for a device of another owner.
async fn waits_for_another_device(bench: &Bench, pod: &str) {
    poll_until(
        "a replica waiting for another device",
        Duration::from_secs(60),
        || async {
            let pod = bench.pods().get(pod).await.map_err(|e| e.to_string())?;
            let placed = condition(&pod, "darkcore.io/Placed").and_then(|c| c.message.clone());
            match placed.filter(|m| m.contains("another owner")) {
                Some(_) => Ok(()),
                None => Err(format!("{:?}", pod.status)),
            }
        },
    )
    .await;
}

/// The row of `device` in `darkcore-operator devices`, or the whole listing when it has none.
fn listing_row(bench: &Bench, device: &str) -> Result<String, String> {
    let operator = format!("http://127.0.0.1:{}", bench.fx.operator.http_port);
    let listing = operator_cli(&["devices", "--operator", &operator, "--pool", &bench.fx.pool]);
    let listing = String::from_utf8_lossy(&listing.stdout).into_owned();
    match listing.lines().find(|l| l.starts_with(device)) {
        Some(row) => Ok(row.to_string()),
        None => Err(listing),
    }
}

#[tokio::test]
async fn a_device_whose_results_keep_disagreeing_is_quarantined_and_stays_so_after_a_restart() {
    // Two lies pass 15%: 0.10 + 2 x 0.05.
    let policy = AdaptiveReplication {
        quarantine_error_rate_percent: 15,
        ..Default::default()
    };
    let mut bench = Bench::start("quarantine", 1, pool_with(policy)).await;
    let honest = bench.agents[0].device_id.clone();
    let liar = bench.add_agent("fault = \"wrong-result\"\n").await;
    let script = "echo 42; echo 42 > $DARKCORE_TASK_ROOT/out/result";
    let (nodes, node) = (bench.fx.nodes(), bench.fx.node.clone());
    let mut other = None;
    for round in 0..2 {
        // Two devices online: the two replicas run on the honest one and the liar, disagree,
        // and the third waits; a second honest device decides it.
        let name = format!("answer-{round}");
        bench.create(checked_pod(&bench, &name, 2, 3, script)).await;
        waits_for_another_device(&bench, &name).await;
        match other {
            None => {
                bench.add_agent("").await;
                other = Some(bench.agents.len() - 1);
            }
            Some(index) => bench.agents[index].run(),
        }
        let done = bench
            .phase_is(&name, "Succeeded", Duration::from_secs(60))
            .await;
        let message = condition(&done, VALIDATED)
            .and_then(|c| c.message.clone())
            .unwrap_or_default();
        assert!(
            message.contains(&format!("disagreeing: {liar} gave")),
            "{message}"
        );
        if round == 0 {
            let index = other.unwrap();
            bench.agents[index].stop().await;
            fleet::node_cpu_is(&nodes, &node, 2000, Duration::from_secs(30)).await;
        }
    }
    // The liar is out: not enlisted, named in a pool Event, shown with why.
    fleet::node_cpu_is(&nodes, &node, 2000, Duration::from_secs(30)).await;
    let events = bench.fx.pool_events_include(&["DevicesQuarantined"]).await;
    assert!(
        events
            .iter()
            .any(|e| e.starts_with("DevicesQuarantined:") && e.contains(&liar)),
        "{events:?}"
    );
    let row = listing_row(&bench, &liar).unwrap();
    assert!(
        row.contains("quarantined: error rate 20.0% after 2 invalid of 2"),
        "{row}"
    );
    assert!(row.contains("20.0% 0/2"), "{row}");
    let honest_row = listing_row(&bench, &honest).unwrap();
    assert!(honest_row.contains("9.0% 2/0"), "{honest_row}");
    // Stored, so a restarted operator keeps it out.
    let reputations: Api<DeviceReputation> = Api::all(bench.fx.client.clone());
    let stored = poll_until("the reputation stored", Duration::from_secs(30), || async {
        let list = reputations
            .list(&ListParams::default().labels(&format!("darkcore.io/pool={}", bench.fx.pool)))
            .await
            .map_err(|e| e.to_string())?;
        let record = (list.items.iter())
            .find_map(|o| o.spec.devices.get(&liar).cloned())
            .filter(|r| r.quarantined.is_some());
        record.ok_or_else(|| format!("{:?}", list.items))
    })
    .await;
    assert_eq!((stored.validated, stored.invalid), (0, 2));
    bench.fx.operator.kill().await;
    bench.restart_operator().await;
    fleet::node_cpu_is(&nodes, &node, 2000, Duration::from_secs(60)).await;
    let row = poll_until("the liar listed again", Duration::from_secs(30), || async {
        let row = listing_row(&bench, &liar)?;
        match row.contains("quarantined") {
            true => Ok(row),
            false => Err(row),
        }
    })
    .await;
    assert!(row.contains("20.0% 0/2"), "{row}");
    bench.finish().await;
}

#[tokio::test]
async fn trusted_devices_run_checked_pods_alone_and_say_so() {
    // Trusted after 3 validated results (0.1 x 0.95^3 = 8.6%), and never spot-checked.
    let policy = AdaptiveReplication {
        min_validated: 2,
        trusted_error_rate_percent: 9,
        spot_check_percent: 0,
        ..Default::default()
    };
    let bench = Bench::start("adaptive", 2, pool_with(policy)).await;
    let script = "echo pi-$JOB_COMPLETION_INDEX";
    let pod = checked_pod(&bench, "pi", 2, 5, script);
    let jobs = bench.indexed_job_of("pi", 6, 1, pod).await;
    let pods = bench
        .job_succeeds(&jobs, "pi", 6, Duration::from_secs(240))
        .await;
    let mut by_index: Vec<(u32, String, String)> = pods
        .iter()
        .map(|p| {
            let index = p.annotations()["batch.kubernetes.io/job-completion-index"]
                .parse()
                .unwrap();
            let validated = condition(p, VALIDATED).expect("the condition");
            let message = validated.message.clone().unwrap_or_default();
            (index, validated.status.clone(), message)
        })
        .collect();
    by_index.sort();
    // Two devices, each replica on both: both are trusted after three pods.
    for (index, status, message) in &by_index[..3] {
        assert_eq!(status, "True", "index {index}: {message}");
    }
    for (index, status, message) in &by_index[3..] {
        assert_eq!(status, "Unverified", "index {index}: {message}");
        assert!(message.contains("probability 0%"), "{message}");
        let name = &pods
            .iter()
            .find(|p| {
                p.annotations()["batch.kubernetes.io/job-completion-index"] == index.to_string()
            })
            .unwrap()
            .name_any();
        let want = format!("pi-{index}\n");
        assert_eq!(
            bench.logs_show(name, &want, Duration::from_secs(10)).await,
            want
        );
    }
    bench.finish().await;
}

/// The digest a Validated message names: "... gave sha256:...;".
pub(crate) fn validated_digest(message: &str) -> String {
    let after = message.split(" gave ").nth(1).unwrap_or_default();
    after.split(';').next().unwrap_or_default().to_string()
}

#[tokio::test]
async fn wasm_pieces_at_quorum_two_agree_across_devices_and_differ_between_pieces() {
    let bench = Bench::start("wasmquorum", 3, crate::wasm::wasm_pool()).await;
    let wat = std::fs::read_to_string(crate::harness::workspace().join("examples/pi.wat")).unwrap();
    let repository = format!("e2e/{}/pi:v1", bench.ns.name);
    let (module, _) = crate::images::push_wasm(&repository, &wat).await;
    let container = serde_json::json!({
        "image": module,
        "args": ["$(JOB_COMPLETION_INDEX)", "20000"],
    });
    let mut pod = bench.pod_in("darkcore-wasm", "pieces", container, "Never");
    pod.metadata.annotations = Some([("darkcore.io/quorum".to_string(), "2".to_string())].into());
    let jobs = bench.indexed_job_of("pieces", 3, 3, pod).await;
    let pods = bench
        .job_succeeds(&jobs, "pieces", 3, Duration::from_secs(180))
        .await;
    let mut digests = std::collections::BTreeSet::new();
    for pod in &pods {
        let validated = condition(pod, VALIDATED).expect("the condition");
        let message = validated.message.clone().unwrap_or_default();
        assert_eq!(validated.status, "True", "{message}");
        digests.insert(validated_digest(&message));
    }
    // Each piece prints its own count: a digest shared by pieces would mean the output was
    // not part of it (a wasm module's stdout once never reached its end before the digest).
    assert_eq!(digests.len(), 3, "{digests:?}");
    bench
        .indexed_outputs_are(&pods, 3, |index| crate::wasm::pi_piece(index, 20000))
        .await;
    bench.finish().await;
}

/// Whether the operator lists `device` as connected, and its reliability as the listing shows.
async fn connection_of(bench: &Bench, device: &str) -> (bool, Option<f64>) {
    let (_, body) = bench.fx.operator.get("/devices").await.unwrap();
    let devices: Vec<serde_json::Value> = serde_json::from_str(&body).unwrap();
    let found = devices.iter().find(|d| d["id"] == device);
    (
        found.is_some_and(|d| d["connected"] == true),
        found.and_then(|d| d["reputation"]["reliabilityPercent"].as_f64()),
    )
}

/// Waits until the operator lists `device` as connected, or not.
async fn connected_is(bench: &Bench, device: &str, want: bool) {
    poll_until("a device's connection", Duration::from_secs(30), || async {
        match connection_of(bench, device).await {
            (connected, _) if connected == want => Ok(()),
            other => Err(format!("{other:?}")),
        }
    })
    .await;
}

#[tokio::test]
async fn a_device_that_keeps_dropping_off_is_less_reliable_than_one_that_stays() {
    let mut bench = Bench::start("reliable", 2, process_pool()).await;
    let (steady, flaky) = (
        bench.agents[0].device_id.clone(),
        bench.agents[1].device_id.clone(),
    );
    // The flaky device drops off twice, each time until the operator has seen its stream end,
    // and comes back with the same identity.
    for _ in 0..2 {
        bench.agents[1].kill().await;
        connected_is(&bench, &flaky, false).await;
        bench.agents[1].run();
        connected_is(&bench, &flaky, true).await;
    }
    let (_, steady_share) = connection_of(&bench, &steady).await;
    let (_, flaky_share) = connection_of(&bench, &flaky).await;
    assert_eq!(steady_share, Some(100.0), "never dropped off");
    let flaky_share = flaky_share.unwrap();
    assert!(flaky_share < 100.0, "dropped off twice: {flaky_share}%");
    // Listed for people, and stored: the stretches that ended are in its DeviceReputation.
    let row = listing_row(&bench, &flaky).unwrap();
    assert!(row.contains('%'), "{row}");
    let stored = poll_until("reliability stored", Duration::from_secs(30), || async {
        let objects: Vec<DeviceReputation> = Api::all(bench.fx.client.clone())
            .list(&ListParams::default().labels(&format!("darkcore.io/pool={}", bench.fx.pool)))
            .await
            .unwrap()
            .items;
        let record = objects
            .iter()
            .find_map(|o| o.spec.devices.get(&flaky).cloned());
        match record {
            Some(r) if r.observed_milliseconds > r.online_milliseconds => Ok(r),
            other => Err(format!("{other:?}")),
        }
    })
    .await;
    assert!(stored.online_milliseconds > 0, "{stored:?}");
    bench.finish().await;
}

#[tokio::test]
async fn a_reissued_replica_past_the_pools_deadline_runs_on_another_device() {
    let spec = DevicePoolSpec {
        validation: ValidationPolicy {
            adaptive: AdaptiveReplication {
                enabled: false,
                ..Default::default()
            },
            reissue_deadline_seconds: Some(10),
            ..Default::default()
        },
        ..process_pool()
    };
    let bench = Bench::start("deadline", 5, spec).await;
    // By its attempt number (the task id ends the task root's directory): the first two
    // disagree, the third (reissued) never finishes, and the rest agree.
    let script = "case \"$DARKCORE_TASK_ROOT\" in \
        *.1|*.1/*) r=one;; *.2|*.2/*) r=two;; *.3|*.3/*) sleep 600; r=late;; *) r=agreed;; esac; \
        echo $r; echo $r > $DARKCORE_TASK_ROOT/out/result";
    let started = std::time::Instant::now();
    bench
        .create(checked_pod(&bench, "late", 2, 5, script))
        .await;
    let pod = bench
        .phase_is("late", "Succeeded", Duration::from_secs(120))
        .await;
    assert!(
        started.elapsed() >= Duration::from_secs(10),
        "the late replica had its 10 s"
    );
    let events = bench.events("late").await;
    let (_, missed) = events
        .iter()
        .find(|(reason, _)| reason == "ReplicaDeadline")
        .unwrap_or_else(|| panic!("{events:?}"));
    let late_device = missed
        .strip_prefix("device ")
        .and_then(|rest| rest.split(' ').next())
        .unwrap()
        .to_string();
    let message = condition(&pod, VALIDATED)
        .and_then(|c| c.message.clone())
        .unwrap_or_default();
    let devices = agreeing(&message);
    assert_eq!(devices.len(), 2, "{message}");
    assert!(!devices.contains(&late_device), "{late_device}: {message}");
    assert_eq!(bench.kubectl(&["logs", "late"]), "agreed\n");
    bench.finish().await;
}
