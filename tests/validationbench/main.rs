//! darkcore-validationbench: the replication overhead of validation by quorum, measured by
//! running the operator's own decision code (replicas, quorum, reputation, adaptive plan,
//! quarantine) over a simulated fleet, with no API server, agents or processes in the way.
//!
//! Each task needs a quorum of 2 (at most 5 replicas); replicas run one after another, each
//! on a device picked at random among those not quarantined that have not run the task.
//! Faulty devices return a wrong result every time, each its own (broken hardware: they never
//! agree with each other). For each fleet and faulty share it runs the workload with adaptive
//! replication off (every task replicated) and on (the pool's policy), and reports the extra
//! runs over one per task, wrong results accepted, and how many results a liar returned
//! before its quarantine.
//!
//! darkcore-validationbench --tasks 10000 --devices 100 --faulty 0,1,5 --out FILE

use anyhow::Context as _;
use clap::Parser;
use darkcore_crds::AdaptiveReplication;
use darkcore_operator::validation::policy::Validation;
use darkcore_operator::validation::quorum::Decision;
use darkcore_operator::validation::replicas::{Replicas, Verdict};
use darkcore_operator::validation::reputation::{self, Plan, Reputation, Standing};

#[derive(Parser)]
struct Args {
    /// Tasks in the workload.
    #[arg(long, default_value_t = 10_000)]
    tasks: u32,
    /// Devices in the fleet.
    #[arg(long, default_value_t = 100)]
    devices: u32,
    /// Faulty shares of the fleet to run, in percent.
    #[arg(long, value_delimiter = ',', default_value = "0,1,5")]
    faulty: Vec<u32>,
    /// Spot-check percentages to run adaptive replication with (the pool default is 10).
    #[arg(long, value_delimiter = ',', default_value = "10,5")]
    spot_check_percent: Vec<u32>,
    /// Seed of the simulation's random numbers: the same seed gives the same figures.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    #[arg(long)]
    out: std::path::PathBuf,
}

/// SplitMix64: small, fast and good enough to pick devices and draw spot checks.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    fn percent(&mut self) -> f64 {
        (self.next() % 10_000) as f64 / 100.0
    }
}

struct Device {
    id: String,
    faulty: bool,
    reputation: Reputation,
    quarantined: bool,
    results: u64,
}

struct Run {
    faulty_percent: u32,
    adaptive: bool,
    /// With adaptive replication on.
    spot_check_percent: Option<u32>,
    tasks: u32,
    devices: u32,
    /// Replicas run, all tasks together.
    runs: u64,
    /// Runs beyond one per task, as a share of the tasks.
    overhead_percent: f64,
    validated: u32,
    unverified: u32,
    no_quorum: u32,
    /// Tasks whose accepted result was a faulty device's.
    wrong_accepted: u32,
    faulty_devices: u32,
    faulty_quarantined: u32,
    honest_quarantined: u32,
    /// Results each quarantined liar returned before its quarantine.
    liar_results_to_quarantine_mean: Option<f64>,
    liar_results_to_quarantine_max: Option<u64>,
}

/// One workload on a fleet with `faulty_percent` liars; adaptive replication on with the
/// spot-check percentage given, else off.
fn simulate(args: &Args, faulty_percent: u32, spot_check: Option<u32>) -> Run {
    let adaptive = spot_check.is_some();
    let mut rng = Rng(args.seed ^ (u64::from(faulty_percent) << 32));
    let policy = AdaptiveReplication {
        enabled: adaptive,
        spot_check_percent: spot_check.unwrap_or(0),
        ..Default::default()
    };
    let validation = Validation::quorum_of(2, 5);
    let faulty_count = (args.devices * faulty_percent).div_ceil(100);
    let mut devices: Vec<Device> = (0..args.devices)
        .map(|i| Device {
            id: format!("dev-{i}"),
            faulty: i < faulty_count,
            reputation: Reputation::default(),
            quarantined: false,
            results: 0,
        })
        .collect();
    let mut run = Run {
        faulty_percent,
        adaptive,
        spot_check_percent: spot_check,
        tasks: args.tasks,
        devices: args.devices,
        runs: 0,
        overhead_percent: 0.0,
        validated: 0,
        unverified: 0,
        no_quorum: 0,
        wrong_accepted: 0,
        faulty_devices: faulty_count,
        faulty_quarantined: 0,
        honest_quarantined: 0,
        liar_results_to_quarantine_mean: None,
        liar_results_to_quarantine_max: None,
    };
    let mut to_quarantine = Vec::new();
    for task in 0..args.tasks {
        let right = format!("sha256:right-{task}");
        let mut replicas = Replicas::default();
        let mut used: Vec<usize> = Vec::new();
        for number in 1.. {
            let free: Vec<usize> = (0..devices.len())
                .filter(|i| !devices[*i].quarantined && !used.contains(i))
                .collect();
            if free.is_empty() {
                run.no_quorum += 1;
                break;
            }
            let picked = free[rng.below(free.len())];
            used.push(picked);
            let device = &mut devices[picked];
            device.results += 1;
            run.runs += 1;
            let result = match device.faulty {
                true => format!("sha256:wrong-{task}-{}", device.id),
                false => right.clone(),
            };
            let decision = replicas.record(number, &device.id, result, &validation);
            if number == 1 && matches!(decision, Decision::RunMore(_)) {
                let standing = device.reputation.standing(&policy);
                if reputation::plan(standing, &policy, rng.percent()) == Plan::Alone {
                    replicas.accept_unverified(policy.spot_check_percent);
                }
            }
            match &replicas.verdict {
                None => continue,
                Some(Verdict::NoQuorum { .. }) => run.no_quorum += 1,
                Some(Verdict::Unverified { digest, .. }) => {
                    run.unverified += 1;
                    run.wrong_accepted += u32::from(*digest != right);
                }
                Some(Verdict::Validated { digest, .. }) => {
                    run.validated += 1;
                    run.wrong_accepted += u32::from(*digest != right);
                    let (agreeing, disagreeing) = replicas.judged().unwrap_or_default();
                    for (ids, valid) in [(agreeing, true), (disagreeing, false)] {
                        for id in ids {
                            let index: usize = id["dev-".len()..].parse().unwrap_or(0);
                            let device = &mut devices[index];
                            device.reputation = match valid {
                                true => device.reputation.validated(),
                                false => device.reputation.invalid(),
                            };
                            if !device.quarantined
                                && device.reputation.standing(&policy) == Standing::Quarantined
                            {
                                device.quarantined = true;
                                match device.faulty {
                                    true => {
                                        run.faulty_quarantined += 1;
                                        to_quarantine.push(device.results);
                                    }
                                    false => run.honest_quarantined += 1,
                                }
                            }
                        }
                    }
                }
            }
            break;
        }
    }
    run.overhead_percent =
        ((run.runs as f64 / f64::from(args.tasks) - 1.0) * 1000.0).round() / 10.0;
    if !to_quarantine.is_empty() {
        let sum: u64 = to_quarantine.iter().sum();
        run.liar_results_to_quarantine_mean =
            Some((sum as f64 / to_quarantine.len() as f64 * 10.0).round() / 10.0);
        run.liar_results_to_quarantine_max = to_quarantine.iter().max().copied();
    }
    run
}

impl Run {
    fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "faulty_percent": self.faulty_percent,
            "adaptive": self.adaptive,
            "spot_check_percent": self.spot_check_percent,
            "tasks": self.tasks,
            "devices": self.devices,
            "runs": self.runs,
            "overhead_percent": self.overhead_percent,
            "validated": self.validated,
            "unverified": self.unverified,
            "no_quorum": self.no_quorum,
            "wrong_accepted": self.wrong_accepted,
            "faulty_devices": self.faulty_devices,
            "faulty_quarantined": self.faulty_quarantined,
            "honest_quarantined": self.honest_quarantined,
            "liar_results_to_quarantine_mean": self.liar_results_to_quarantine_mean,
            "liar_results_to_quarantine_max": self.liar_results_to_quarantine_max,
        })
    }
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let mut runs = Vec::new();
    for &faulty in &args.faulty {
        let settings =
            std::iter::once(None).chain(args.spot_check_percent.iter().map(|s| Some(*s)));
        for spot_check in settings {
            let run = simulate(&args, faulty, spot_check);
            println!(
                "{faulty}% faulty, adaptive {}: {} runs for {} tasks ({:+.1}% overhead), {} validated, {} unverified, {} without quorum, {} wrong accepted, {}/{} liars quarantined after {} results (max {}), {} honest quarantined",
                spot_check.map_or("off".into(), |s| format!("on, {s}% spot checks")),
                run.runs,
                run.tasks,
                run.overhead_percent,
                run.validated,
                run.unverified,
                run.no_quorum,
                run.wrong_accepted,
                run.faulty_quarantined,
                run.faulty_devices,
                run.liar_results_to_quarantine_mean
                    .map_or("-".into(), |m| m.to_string()),
                run.liar_results_to_quarantine_max
                    .map_or("-".into(), |m| m.to_string()),
                run.honest_quarantined,
            );
            runs.push(run.to_json());
        }
    }
    let report = serde_json::json!({
        "tasks": args.tasks,
        "devices": args.devices,
        "quorum": 2,
        "max_replicas": 5,
        "spot_check_percents": args.spot_check_percent,
        "seed": args.seed,
        "runs": runs,
    });
    std::fs::write(&args.out, serde_json::to_string_pretty(&report)?)
        .with_context(|| format!("writing {}", args.out.display()))?;
    Ok(())
}
