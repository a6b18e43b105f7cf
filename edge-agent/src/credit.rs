//! What the operator credits this device with, as it says after each change (per UTC day),
//! kept in the status file for `darkcore-agent status`; and the check of a signed statement
//! against the key the operator gave over this device's authenticated stream.

use std::collections::BTreeMap;

use darkcore_proto::agent::v1::{CreditAmounts, CreditStanding};
use darkcore_statement::{Statement, format_micros, verify};
use serde::{Deserialize, Serialize};

/// Days of credit the status keeps: the newest ones.
pub const DAYS_KEPT: usize = 31;

/// Attempts and usage under one standing.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Figures {
    pub attempts: u64,
    pub cpu_milliseconds: u64,
    pub memory_mib_seconds: u64,
}

impl Figures {
    fn of(amounts: Option<&CreditAmounts>) -> Figures {
        amounts.map_or_else(Figures::default, |a| Figures {
            attempts: a.attempts,
            cpu_milliseconds: a.cpu_milliseconds,
            memory_mib_seconds: a.memory_mib_seconds,
        })
    }

    fn add(&mut self, other: &Figures) {
        self.attempts = self.attempts.saturating_add(other.attempts);
        self.cpu_milliseconds = self.cpu_milliseconds.saturating_add(other.cpu_milliseconds);
        self.memory_mib_seconds = self
            .memory_mib_seconds
            .saturating_add(other.memory_mib_seconds);
    }
}

/// One day's credit, as the operator last told it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CreditDay {
    pub validated: Figures,
    pub unverified: Figures,
    pub rejected: Figures,
    pub pending: Figures,
    pub credit_micros: u64,
    #[serde(default)]
    pub currency: String,
}

/// Keeps what the operator said of a day, replacing what it said before, within
/// [`DAYS_KEPT`] days.
pub fn record(days: &mut BTreeMap<String, CreditDay>, standing: &CreditStanding) {
    let day = CreditDay {
        validated: Figures::of(standing.validated.as_ref()),
        unverified: Figures::of(standing.unverified.as_ref()),
        rejected: Figures::of(standing.rejected.as_ref()),
        pending: Figures::of(standing.pending.as_ref()),
        credit_micros: standing.credit_micros,
        currency: standing.currency.chars().take(16).collect(),
    };
    days.insert(standing.day.chars().take(10).collect(), day);
    while days.len() > DAYS_KEPT {
        days.pop_first();
    }
}

/// The status lines for the credit kept: the sum over the days, by standing.
pub fn render(days: &BTreeMap<String, CreditDay>) -> String {
    let (Some(first), Some(last)) = (days.keys().next(), days.keys().next_back()) else {
        return "credit:      none yet (only checked pods' validated results earn)\n".into();
    };
    let mut sum = CreditDay::default();
    for day in days.values() {
        sum.validated.add(&day.validated);
        sum.unverified.add(&day.unverified);
        sum.rejected.add(&day.rejected);
        sum.pending.add(&day.pending);
        sum.credit_micros = sum.credit_micros.saturating_add(day.credit_micros);
        if sum.currency.is_empty() {
            sum.currency.clone_from(&day.currency);
        }
    }
    let figures = |name: &str, f: &Figures| {
        format!(
            "{name} {:.1} core-seconds, {:.1} GiB-seconds in {} attempts",
            f.cpu_milliseconds as f64 / 1000.0,
            f.memory_mib_seconds as f64 / 1024.0,
            f.attempts
        )
    };
    format!(
        "credit:      {} from {first} to {last} (UTC), by the operator's record\n             {}\n             {}\n             {}\n             {}\n",
        in_currency(&format_micros(sum.credit_micros), &sum.currency),
        figures("validated: ", &sum.validated),
        figures("unverified:", &sum.unverified),
        figures("pending:   ", &sum.pending),
        figures("rejected:  ", &sum.rejected),
    )
}

/// An amount and its currency, when there is one: `0.125000 EUR`, or `0.125000`.
fn in_currency(amount: &str, currency: &str) -> String {
    match currency {
        "" => amount.to_string(),
        currency => format!("{amount} {currency}"),
    }
}

/// What `statement verify` says of a statement that checks out.
pub fn describe_valid(statement: &Statement) -> String {
    format!(
        "valid: signed by the operator; credit {} from {} to {} (rows: {})",
        in_currency(&statement.credit, &statement.currency),
        statement.from_day,
        statement.to_day,
        statement.rows.len()
    )
}

/// Why a statement could not be checked here.
#[derive(Debug, thiserror::Error)]
pub enum CheckError {
    #[error(
        "no verification key: this agent has not connected to an operator that signs statements yet; pass --key with the key in the operator's ConfigMap darkcore-statement-key"
    )]
    NoKey,
    #[error("{0}")]
    Invalid(#[from] darkcore_statement::VerifyError),
}

/// Checks a statement's text with `key` (base64), or the key the operator gave.
pub fn check(text: &str, key: Option<&str>, operator_key: &str) -> Result<Statement, CheckError> {
    let key = key
        .or((!operator_key.is_empty()).then_some(operator_key))
        .ok_or(CheckError::NoKey)?;
    Ok(verify(text, key)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn standing(day: &str, validated_cpu: u64, credit_micros: u64) -> CreditStanding {
        CreditStanding {
            day: day.into(),
            validated: Some(CreditAmounts {
                attempts: 1,
                cpu_milliseconds: validated_cpu,
                memory_mib_seconds: 0,
            }),
            credit_micros,
            currency: "EUR".into(),
            ..Default::default()
        }
    }

    #[test]
    fn each_day_keeps_the_operators_latest_word_and_the_sum_shows() {
        let mut days = BTreeMap::new();
        assert!(render(&days).contains("none yet"));
        record(&mut days, &standing("2026-11-30", 1000, 10));
        record(&mut days, &standing("2026-12-01", 1000, 10));
        record(&mut days, &standing("2026-12-01", 2500, 25));
        let text = render(&days);
        assert!(
            text.contains("0.000035 EUR from 2026-11-30 to 2026-12-01"),
            "{text}"
        );
        assert!(text.contains("validated:  3.5 core-seconds"), "{text}");
        for n in 0..40 {
            record(&mut days, &standing(&format!("2027-01-{n:02}"), 1, 1));
        }
        assert_eq!(days.len(), DAYS_KEPT);
        assert!(!days.contains_key("2026-11-30"), "the oldest go");
    }
}
