//! Join tokens: making them, what is stored of them (a hash, never the secret), and whether
//! one may be used now (pure). The printed form is shared with the agent, in darkcore-proto.

use std::time::Duration;

use k8s_openapi::jiff::Timestamp;
use ring::digest::{SHA256, digest};
use ring::rand::{SecureRandom, SystemRandom};

pub use darkcore_proto::join_token::{JoinToken, MalformedToken};

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error(transparent)]
    Malformed(#[from] MalformedToken),
    #[error("could not draw random bytes for a token")]
    Random,
}

/// A new token with a random id and secret, pinned to the CA certificate `ca_der`.
pub fn generate(ca_der: &[u8]) -> Result<JoinToken, TokenError> {
    let random_hex = |bytes: usize| -> Result<String, TokenError> {
        let mut buf = vec![0u8; bytes];
        SystemRandom::new()
            .fill(&mut buf)
            .map_err(|_| TokenError::Random)?;
        Ok(to_hex(&buf))
    };
    Ok(JoinToken {
        id: random_hex(6)?,
        secret: random_hex(16)?,
        ca_pin: ca_pin(ca_der),
    })
}

/// The SHA-256 of a CA certificate (DER), in hex: what a token pins.
pub fn ca_pin(ca_der: &[u8]) -> String {
    to_hex(digest(&SHA256, ca_der).as_ref())
}

/// The hash stored for a token's secret.
pub fn secret_hash(secret: &str) -> String {
    to_hex(digest(&SHA256, secret.as_bytes()).as_ref())
}

fn to_hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// What the operator keeps of a token.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TokenRecord {
    pub id: String,
    pub pool: String,
    pub secret_sha256: String,
    pub created: Timestamp,
    pub expires: Timestamp,
    /// `None`: any number of devices may join with it until it expires.
    pub max_uses: Option<u32>,
    pub uses: u32,
    pub revoked: bool,
    /// Who the devices that join with it belong to, as the platform team vouched when it
    /// made the token: replicas of a checked pod go to distinct owners. `None`: each device
    /// counts as its own owner.
    pub owner: Option<String>,
}

/// Checks an owner name for `token create --owner`: 1 to 63 characters, lower-case letters,
/// digits and `-._@`, starting and ending with a letter or digit.
pub fn parse_owner(text: &str) -> Result<String, String> {
    let allowed = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit() || "-._@".contains(c);
    let edge = |c: Option<char>| c.is_some_and(|c| c.is_ascii_lowercase() || c.is_ascii_digit());
    let fits = (1..=63).contains(&text.len())
        && text.chars().all(allowed)
        && edge(text.chars().next())
        && edge(text.chars().last());
    match fits {
        true => Ok(text.to_string()),
        false => Err(format!(
            "owner {text:?} is not a name darkcore takes: use 1 to 63 lower-case letters, digits and '-', '.', '_', '@', starting and ending with a letter or digit (an email address in lower case works)"
        )),
    }
}

/// Why a token cannot be used. Each says what to do about it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Rejection {
    #[error("the join token has expired: ask the pool's platform team for a new one")]
    Expired,
    #[error("the join token has been used as many times as it allows: ask for a new one")]
    UsedUp,
    #[error("the join token has been revoked: ask the pool's platform team for a new one")]
    Revoked,
    #[error("the join token is not valid")]
    WrongSecret,
}

impl Rejection {
    /// A short, bounded label for metrics.
    pub fn label(self) -> &'static str {
        match self {
            Rejection::Expired => "expired",
            Rejection::UsedUp => "used_up",
            Rejection::Revoked => "revoked",
            Rejection::WrongSecret => "wrong_secret",
        }
    }
}

impl TokenRecord {
    pub fn new(
        token: &JoinToken,
        pool: &str,
        now: Timestamp,
        ttl: Duration,
        max_uses: Option<u32>,
    ) -> TokenRecord {
        let ttl = k8s_openapi::jiff::SignedDuration::try_from(ttl)
            .unwrap_or(k8s_openapi::jiff::SignedDuration::MAX);
        TokenRecord {
            id: token.id.clone(),
            pool: pool.into(),
            secret_sha256: secret_hash(&token.secret),
            created: now,
            expires: now.checked_add(ttl).unwrap_or(Timestamp::MAX),
            max_uses,
            uses: 0,
            revoked: false,
            owner: None,
        }
    }

    /// Whether the token may be used now, regardless of who presents it.
    pub fn usable(&self, now: Timestamp) -> Result<(), Rejection> {
        if self.revoked {
            Err(Rejection::Revoked)
        } else if now >= self.expires {
            Err(Rejection::Expired)
        } else if self.max_uses.is_some_and(|max| self.uses >= max) {
            Err(Rejection::UsedUp)
        } else {
            Ok(())
        }
    }

    /// Whether `presented` is this token's secret and the token may be used now.
    pub fn verify(&self, presented: &JoinToken, now: Timestamp) -> Result<(), Rejection> {
        let presented_hash = secret_hash(&presented.secret);
        #[allow(deprecated)] // ring keeps it for exactly this: comparing secrets in constant time
        let same = ring::constant_time::verify_slices_are_equal(
            presented_hash.as_bytes(),
            self.secret_sha256.as_bytes(),
        )
        .is_ok();
        if !same {
            return Err(Rejection::WrongSecret);
        }
        self.usable(now)
    }

    /// One word for listings.
    pub fn state(&self, now: Timestamp) -> &'static str {
        match self.usable(now) {
            Ok(()) => "active",
            Err(Rejection::Expired) => "expired",
            Err(Rejection::UsedUp) => "used-up",
            Err(Rejection::Revoked) => "revoked",
            Err(Rejection::WrongSecret) => "invalid",
        }
    }
}

/// Durations as people type them for `--ttl`: `90s`, `30m`, `24h`, `7d`.
pub fn parse_ttl(text: &str) -> Result<Duration, String> {
    let bad = || {
        format!(
            "{text:?} is not a duration: write a whole number with s, m, h or d, such as 24h or 7d"
        )
    };
    let unit = text.chars().last().ok_or_else(bad)?;
    let number: u64 = text[..text.len() - unit.len_utf8()]
        .parse()
        .map_err(|_| bad())?;
    let secs = match unit {
        's' => 1,
        'm' => 60,
        'h' => 3600,
        'd' => 86_400,
        _ => return Err(bad()),
    };
    if number == 0 {
        return Err(bad());
    }
    number
        .checked_mul(secs)
        .map(Duration::from_secs)
        .ok_or_else(bad)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(secs: i64) -> Timestamp {
        Timestamp::from_second(1_800_000_000 + secs).unwrap()
    }

    fn token() -> JoinToken {
        generate(b"a CA certificate").unwrap()
    }

    #[test]
    fn tokens_are_random() {
        assert_ne!(token().secret, token().secret);
        assert_ne!(token().id, token().id);
    }

    #[test]
    fn the_record_keeps_a_hash_not_the_secret() {
        let t = token();
        let r = TokenRecord::new(&t, "lab", at(0), Duration::from_secs(60), None);
        assert_ne!(r.secret_sha256, t.secret);
        assert_eq!(r.secret_sha256.len(), 64);
    }

    #[test]
    fn a_fresh_token_verifies_and_a_wrong_secret_does_not() {
        let t = token();
        let r = TokenRecord::new(&t, "lab", at(0), Duration::from_secs(60), Some(1));
        assert_eq!(r.verify(&t, at(1)), Ok(()));
        let mut forged = t.clone();
        forged.secret = "0".repeat(32);
        assert_eq!(r.verify(&forged, at(1)), Err(Rejection::WrongSecret));
    }

    #[test]
    fn expiry_uses_and_revocation_each_refuse_with_their_reason() {
        let t = token();
        let mut r = TokenRecord::new(&t, "lab", at(0), Duration::from_secs(60), Some(2));
        assert_eq!(r.verify(&t, at(60)), Err(Rejection::Expired));
        r.uses = 2;
        assert_eq!(r.verify(&t, at(1)), Err(Rejection::UsedUp));
        assert_eq!(r.state(at(1)), "used-up");
        r.uses = 0;
        r.revoked = true;
        assert_eq!(r.verify(&t, at(1)), Err(Rejection::Revoked));
        assert!(Rejection::Revoked.to_string().contains("new one"));
    }

    #[test]
    fn ttls_parse_as_people_type_them() {
        assert_eq!(parse_ttl("24h"), Ok(Duration::from_secs(86_400)));
        assert_eq!(parse_ttl("7d"), Ok(Duration::from_secs(7 * 86_400)));
        assert_eq!(parse_ttl("90s"), Ok(Duration::from_secs(90)));
        for bad in ["", "h", "24", "1.5h", "0h", "-1h", "3w"] {
            assert!(parse_ttl(bad).unwrap_err().contains("such as 24h"), "{bad}");
        }
    }

    #[test]
    fn owner_names_are_plain_and_bounded() {
        for good in ["alice", "alice@example.org", "team-7", "a"] {
            assert_eq!(parse_owner(good).as_deref(), Ok(good));
        }
        for bad in [
            "",
            "Alice",
            "-alice",
            "alice.",
            "a b",
            "ali/ce",
            &"a".repeat(64),
        ] {
            let said = parse_owner(bad).unwrap_err();
            assert!(said.contains("lower-case letters"), "{bad}: {said}");
        }
    }
}
