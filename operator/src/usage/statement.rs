//! `darkcore-operator usage statement`: what a device or an owner was credited over a period,
//! from the PoolUsage objects, priced by each pool's `spec.credit` and signed by the operator.

use std::collections::BTreeMap;

use anyhow::Context as _;
use darkcore_crds::{DevicePool, PoolUsage};
use darkcore_statement::{
    Prices, Row, SignedStatement, Statement, Subject, credit_micros, format_micros, parse_micros,
};
use k8s_openapi::jiff::Timestamp;
use k8s_openapi::jiff::civil::Date;
use kube::{Api, Client, ResourceExt as _};

use crate::usage::ledger::utc_day;
use crate::usage::{credit, report, statement_key};

/// Reads the usage and the pools' prices, and signs the statement of `subject` over `period`
/// (of one pool, or all) with the operator's key in `namespace`.
pub async fn issue(
    client: &Client,
    namespace: &str,
    subject: Subject,
    period: &Period,
    pool: Option<&str>,
) -> anyhow::Result<SignedStatement> {
    let objects = report::fetch(client, pool).await?;
    let pools = Api::<DevicePool>::all(client.clone())
        .list(&Default::default())
        .await
        .context("listing DevicePools for their prices")?;
    let mut prices = BTreeMap::new();
    for pool in &pools.items {
        prices.insert(
            pool.name_any(),
            prices_of(pool).map_err(anyhow::Error::msg)?,
        );
    }
    let issued_at = Timestamp::now().strftime("%Y-%m-%dT%H:%M:%SZ").to_string();
    let statement =
        statement(&objects, &prices, &subject, period, issued_at).map_err(anyhow::Error::msg)?;
    let key = statement_key::ensure(client, namespace).await.with_context(|| {
        format!("reading the statement key in namespace {namespace:?} (set --namespace to the operator's)")
    })?;
    Ok(key.sign(&statement))
}

/// The UTC days a statement covers, first and last.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Period {
    pub from: String,
    pub to: String,
}

/// A period as given: a day (2026-12-01), a month (2026-12), a range (2026-11-01..2026-11-30),
/// or a time back from `now` to today (7d, 24h).
pub fn parse_period(text: &str, now: Timestamp) -> Result<Period, String> {
    let wrong = || {
        format!(
            "--period {text:?}: give a day (2026-12-01), a month (2026-12), a range (2026-11-01..2026-11-30) or a time back from now (7d)"
        )
    };
    let day = |text: &str| {
        text.parse::<Date>()
            .map(|d| d.to_string())
            .map_err(|_| wrong())
    };
    if let Some((from, to)) = text.split_once("..") {
        let (from, to) = (day(from)?, day(to)?);
        return match from <= to {
            true => Ok(Period { from, to }),
            false => Err(format!(
                "--period {text:?}: the range ends before it starts"
            )),
        };
    }
    if let Ok(date) = day(text) {
        return Ok(Period {
            from: date.clone(),
            to: date,
        });
    }
    if let Ok(first) = format!("{text}-01").parse::<Date>() {
        let last = first.last_of_month();
        return Ok(Period {
            from: first.to_string(),
            to: last.to_string(),
        });
    }
    // A time back from now: from that day, as `usage --since` counts it, to today.
    Ok(Period {
        from: report::since_day(text, now).map_err(|_| wrong())?,
        to: utc_day(now.as_millisecond()),
    })
}

/// A pool's prices from its `spec.credit`; an amount it cannot read is named with its fix.
pub fn prices_of(pool: &DevicePool) -> Result<Prices, String> {
    let credit = &pool.spec.credit;
    let name = pool.name_any();
    let price = |field: &str, value: &Option<String>| {
        value
            .as_deref()
            .map_or(Ok(0), parse_micros)
            .map_err(|e| format!("DevicePool {name}: spec.credit.{field}: {e}"))
    };
    Ok(Prices {
        per_core_hour_micros: price("pricePerCoreHour", &credit.price_per_core_hour)?,
        per_gib_hour_micros: price("pricePerGiBHour", &credit.price_per_gib_hour)?,
        currency: credit.currency.clone().unwrap_or_default(),
    })
}

/// The statement of `subject` over `period` from `objects`, priced by `prices` (by pool; a
/// pool without prices credits nothing but still shows its usage).
pub fn statement(
    objects: &[PoolUsage],
    prices: &BTreeMap<String, Prices>,
    subject: &Subject,
    period: &Period,
    issued_at: String,
) -> Result<Statement, String> {
    let mut rows = Vec::new();
    let mut total = 0u64;
    let mut currencies: Vec<&str> = Vec::new();
    let unpriced = Prices::default();
    for object in objects {
        let spec = &object.spec;
        if spec.day < period.from || spec.day > period.to {
            continue;
        }
        let price = prices.get(&spec.pool).unwrap_or(&unpriced);
        for (device, usage) in &spec.devices {
            let matches = match subject {
                Subject::Device(id) => device == id,
                Subject::Owner(owner) => usage.owner.as_deref() == Some(owner),
            };
            if !matches {
                continue;
            }
            for (standing, amounts) in credit::by_standing(usage) {
                let credit = match standing.earns() {
                    true => {
                        credit_micros(amounts.cpu_milliseconds, amounts.memory_mib_seconds, price)
                    }
                    false => 0,
                };
                if credit > 0
                    && !price.currency.is_empty()
                    && !currencies.contains(&price.currency.as_str())
                {
                    currencies.push(&price.currency);
                }
                total = total.saturating_add(credit);
                rows.push(Row {
                    day: spec.day.clone(),
                    pool: spec.pool.clone(),
                    device: device.clone(),
                    owner: usage.owner.clone(),
                    standing,
                    attempts: amounts.tasks,
                    cpu_milliseconds: amounts.cpu_milliseconds,
                    memory_mib_seconds: amounts.memory_mib_seconds,
                    credit: format_micros(credit),
                });
            }
        }
    }
    if currencies.len() > 1 {
        return Err(format!(
            "the pools in this statement price in different currencies ({}): ask for one statement per pool with --pool",
            currencies.join(", ")
        ));
    }
    rows.sort_by(|a, b| {
        (&a.day, &a.pool, &a.device, a.standing).cmp(&(&b.day, &b.pool, &b.device, b.standing))
    });
    Ok(Statement {
        subject: subject.clone(),
        from_day: period.from.clone(),
        to_day: period.to.clone(),
        issued_at,
        currency: currencies
            .first()
            .map(|c| c.to_string())
            .unwrap_or_default(),
        rows,
        credit: format_micros(total),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use darkcore_crds::{Amounts, DeviceUsage};
    use darkcore_statement::Standing;

    fn now() -> Timestamp {
        "2026-12-01T10:00:00Z".parse().unwrap()
    }

    #[test]
    fn periods_are_days_months_ranges_or_times_back() {
        let period = |text| parse_period(text, now());
        let span = |from: &str, to: &str| {
            Ok(Period {
                from: from.into(),
                to: to.into(),
            })
        };
        assert_eq!(period("2026-11-30"), span("2026-11-30", "2026-11-30"));
        assert_eq!(period("2026-02"), span("2026-02-01", "2026-02-28"));
        assert_eq!(
            period("2026-11-01..2026-11-30"),
            span("2026-11-01", "2026-11-30")
        );
        assert_eq!(period("7d"), span("2026-11-24", "2026-12-01"));
        assert!(
            period("2026-11-30..2026-11-01")
                .unwrap_err()
                .contains("ends before")
        );
        assert!(period("last month").unwrap_err().contains("give a day"));
    }

    fn usage(
        owner: &str,
        validated_cpu: u64,
        rejected_cpu: u64,
        unchecked_cpu: u64,
    ) -> DeviceUsage {
        // An attempt for each amount given.
        let amounts = |cpu| Amounts {
            tasks: u64::from(cpu > 0),
            cpu_milliseconds: cpu,
            ..Default::default()
        };
        let mut usage = DeviceUsage {
            owner: Some(owner.into()),
            ..Default::default()
        };
        usage.credit.validated = amounts(validated_cpu);
        usage.credit.rejected = amounts(rejected_cpu);
        let mut total = Amounts::default();
        for cpu in [validated_cpu, rejected_cpu, unchecked_cpu] {
            total.add(&amounts(cpu));
        }
        usage.namespaces.insert("team".into(), total);
        usage
    }

    fn object(pool: &str, day: &str, devices: &[(&str, DeviceUsage)]) -> PoolUsage {
        PoolUsage::new(
            &format!("{pool}.{day}.00"),
            darkcore_crds::PoolUsageSpec {
                pool: pool.into(),
                day: day.into(),
                shard: 0,
                device_count: devices.len() as u32,
                total: Amounts::default(),
                devices: devices
                    .iter()
                    .map(|(d, u)| (d.to_string(), u.clone()))
                    .collect(),
            },
        )
    }

    #[test]
    fn only_validated_work_is_credited_at_the_pools_price_for_the_device_or_owner_asked() {
        let objects = [
            object(
                "lab",
                "2026-11-30",
                &[
                    ("dev-a", usage("alice", 3_600_000, 1_000, 5)),
                    ("dev-b", usage("bob", 7_200_000, 0, 0)),
                ],
            ),
            object(
                "lab",
                "2026-12-01",
                &[("dev-a", usage("alice", 1_800_000, 0, 0))],
            ),
            object(
                "lab",
                "2026-10-01",
                &[("dev-a", usage("alice", 99_000_000, 0, 0))],
            ),
        ];
        let prices = BTreeMap::from([(
            "lab".to_string(),
            Prices {
                per_core_hour_micros: 20_000,
                per_gib_hour_micros: 0,
                currency: "EUR".into(),
            },
        )]);
        let period = Period {
            from: "2026-11-01".into(),
            to: "2026-12-31".into(),
        };
        let by_device = statement(
            &objects,
            &prices,
            &Subject::Device("dev-a".into()),
            &period,
            "t".into(),
        )
        .unwrap();
        assert_eq!(by_device.credit, "0.030000", "1.5 core-hours at 0.02");
        assert_eq!(by_device.currency, "EUR");
        let standings: Vec<(&str, Standing, &str)> = by_device
            .rows
            .iter()
            .map(|r| (r.day.as_str(), r.standing, r.credit.as_str()))
            .collect();
        assert_eq!(
            standings,
            [
                ("2026-11-30", Standing::Validated, "0.020000"),
                ("2026-11-30", Standing::Rejected, "0.000000"),
                ("2026-11-30", Standing::Uncredited, "0.000000"),
                ("2026-12-01", Standing::Validated, "0.010000"),
            ]
        );
        let by_owner = statement(
            &objects,
            &prices,
            &Subject::Owner("bob".into()),
            &period,
            "t".into(),
        )
        .unwrap();
        assert_eq!(by_owner.credit, "0.040000");
        assert!(by_owner.rows.iter().all(|r| r.device == "dev-b"));
        // A pool without prices shows usage and credits nothing.
        let unpriced = statement(
            &objects,
            &BTreeMap::new(),
            &Subject::Device("dev-a".into()),
            &period,
            "t".into(),
        )
        .unwrap();
        assert_eq!(unpriced.credit, "0.000000");
        assert_eq!(unpriced.rows.len(), 4);
    }

    #[test]
    fn a_price_that_is_not_an_amount_names_the_pool_and_field() {
        let mut pool = DevicePool::new("lab", Default::default());
        pool.spec.credit.price_per_core_hour = Some("0,02".into());
        let error = prices_of(&pool).unwrap_err();
        assert!(
            error.contains("DevicePool lab: spec.credit.pricePerCoreHour"),
            "{error}"
        );
    }
}
