//! Credit statements: what the operator credited a device or an owner for, as rows per day,
//! pool, device and result, signed with the operator's Ed25519 key so that anyone holding the
//! published verification key can tell a statement the operator issued from an edited one.

pub mod money;
pub mod signing;

use serde::{Deserialize, Serialize};

pub use money::{Prices, credit_micros, format_micros, parse_micros};
pub use signing::{KeyPair, SignedStatement, VerifyError, verify};

/// How an attempt's usage stands toward credit.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Standing {
    /// A quorum of devices agreed with its result.
    Validated,
    /// A trusted device's result, accepted alone (spot checks aside).
    Unverified,
    /// Its result disagreed with the quorum, or no quorum was reached: it earns nothing.
    Rejected,
    /// Its result is not judged yet.
    Pending,
    /// It asked for no check, or was interrupted before a result: it earns nothing.
    Uncredited,
}

impl Standing {
    /// Whether usage of this standing is credited.
    pub fn earns(self) -> bool {
        matches!(self, Standing::Validated | Standing::Unverified)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Standing::Validated => "validated",
            Standing::Unverified => "unverified",
            Standing::Rejected => "rejected",
            Standing::Pending => "pending",
            Standing::Uncredited => "uncredited",
        }
    }
}

/// Whose credit a statement shows.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum Subject {
    Device(String),
    Owner(String),
}

/// One day's usage of one device in one pool, for one standing.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Row {
    /// The UTC day the attempts ended on.
    pub day: String,
    pub pool: String,
    pub device: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner: Option<String>,
    pub standing: Standing,
    pub attempts: u64,
    pub cpu_milliseconds: u64,
    #[serde(rename = "memoryMiBSeconds")]
    pub memory_mib_seconds: u64,
    /// In the pool's currency, to six decimals: zero unless the standing earns.
    pub credit: String,
}

/// A statement before it is signed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Statement {
    pub subject: Subject,
    /// The first and last UTC day it covers.
    pub from_day: String,
    pub to_day: String,
    /// When it was made (RFC 3339).
    pub issued_at: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub currency: String,
    pub rows: Vec<Row>,
    /// The sum of the rows' credit.
    pub credit: String,
}

impl Statement {
    /// The rows as CSV, with a header line.
    pub fn to_csv(&self) -> String {
        let mut out = String::from(
            "day,pool,device,owner,standing,attempts,cpu_milliseconds,memory_mib_seconds,credit\n",
        );
        for row in &self.rows {
            let fields = [
                row.day.as_str(),
                &row.pool,
                &row.device,
                row.owner.as_deref().unwrap_or(""),
                row.standing.as_str(),
                &row.attempts.to_string(),
                &row.cpu_milliseconds.to_string(),
                &row.memory_mib_seconds.to_string(),
                &row.credit,
            ];
            let quoted: Vec<String> = fields.iter().map(|f| csv_field(f)).collect();
            out.push_str(&quoted.join(","));
            out.push('\n');
        }
        out
    }
}

/// A CSV field, quoted when it holds a comma, a quote or a line break.
fn csv_field(text: &str) -> String {
    if text.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", text.replace('"', "\"\""))
    } else {
        text.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn csv_quotes_what_would_split_a_field() {
        assert_eq!(csv_field("plain"), "plain");
        assert_eq!(csv_field("a,b"), "\"a,b\"");
        assert_eq!(csv_field("say \"hi\""), "\"say \"\"hi\"\"\"");
    }
}
