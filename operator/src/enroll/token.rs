//! Join tokens: their printed form, what is stored of them (a hash, never the secret), and
//! whether one may be used now (pure).
//!
//! Printed form: `dct1.<id>.<secret>.<ca-pin>`: `id` names the token (for list and revoke),
//! `secret` proves possession, `ca-pin` is the SHA-256 of the operator's CA certificate, so the
//! agent can authenticate the gateway before it sends the token.

use std::fmt;
use std::time::Duration;

use k8s_openapi::jiff::Timestamp;
use ring::digest::{SHA256, digest};
use ring::rand::{SecureRandom, SystemRandom};

const PREFIX: &str = "dct1";

/// A token as handed to a device owner.
#[derive(Clone, PartialEq, Eq)]
pub struct JoinToken {
    pub id: String,
    pub secret: String,
    pub ca_pin: String,
}

// The secret never reaches a log through Debug.
impl fmt::Debug for JoinToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("JoinToken")
            .field("id", &self.id)
            .field("secret", &"<redacted>")
            .finish()
    }
}

impl fmt::Display for JoinToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{PREFIX}.{}.{}.{}", self.id, self.secret, self.ca_pin)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error(
        "the join token is malformed: expected dct1.<id>.<secret>.<ca-pin> as printed by `darkcore-operator token create`"
    )]
    Malformed,
    #[error("could not draw random bytes for a token")]
    Random,
}

impl std::str::FromStr for JoinToken {
    type Err = TokenError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let parts: Vec<&str> = text.trim().split('.').collect();
        let hex = |s: &str, len: usize| {
            s.len() == len
                && s.bytes()
                    .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
        };
        match parts.as_slice() {
            [PREFIX, id, secret, pin] if hex(id, 12) && hex(secret, 32) && hex(pin, 64) => {
                Ok(JoinToken {
                    id: id.to_string(),
                    secret: secret.to_string(),
                    ca_pin: pin.to_string(),
                })
            }
            _ => Err(TokenError::Malformed),
        }
    }
}

impl JoinToken {
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
        JoinToken::generate(b"a CA certificate").unwrap()
    }

    #[test]
    fn a_printed_token_parses_back() {
        let t = token();
        let printed = t.to_string();
        assert!(printed.starts_with("dct1."));
        assert_eq!(printed.parse::<JoinToken>(), Ok(t));
    }

    #[test]
    fn garbage_tokens_are_malformed() {
        let good = token().to_string();
        for bad in [
            "",
            "hello",
            "dct1.abc.def.ghi",
            &good[..good.len() - 1],
            &good.replace("dct1", "dct2"),
            &good.to_uppercase(),
        ] {
            assert_eq!(
                bad.parse::<JoinToken>(),
                Err(TokenError::Malformed),
                "{bad}"
            );
        }
    }

    #[test]
    fn tokens_are_random() {
        assert_ne!(token().secret, token().secret);
        assert_ne!(token().id, token().id);
    }

    #[test]
    fn debug_never_shows_the_secret() {
        let t = token();
        assert!(!format!("{t:?}").contains(&t.secret));
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
}
