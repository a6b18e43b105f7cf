//! The join token's printed form, which both sides read: `dct1.<id>.<secret>.<ca-pin>`.
//! `id` names the token (for list and revoke), `secret` proves possession, `ca-pin` is the
//! SHA-256 of the operator's CA certificate, so the agent can authenticate the gateway
//! before it sends the token.

use std::fmt;

pub const PREFIX: &str = "dct1";

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

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error(
    "the join token is malformed: expected dct1.<id>.<secret>.<ca-pin> as printed by `darkcore-operator token create`"
)]
pub struct MalformedToken;

impl std::str::FromStr for JoinToken {
    type Err = MalformedToken;

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
            _ => Err(MalformedToken),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn token() -> JoinToken {
        JoinToken {
            id: "0123456789ab".into(),
            secret: "0123456789abcdef0123456789abcdef".into(),
            ca_pin: "ab".repeat(32),
        }
    }

    #[test]
    fn a_printed_token_parses_back() {
        let printed = token().to_string();
        assert!(printed.starts_with("dct1."));
        assert_eq!(printed.parse::<JoinToken>(), Ok(token()));
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
            assert_eq!(bad.parse::<JoinToken>(), Err(MalformedToken), "{bad}");
        }
    }

    #[test]
    fn debug_never_shows_the_secret() {
        let t = token();
        assert!(!format!("{t:?}").contains(&t.secret));
    }
}
