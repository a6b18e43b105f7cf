//! Byte sizes as owners write them in the config: `512Mi`, `4Gi`, `10G`, or plain bytes.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// A size in bytes, read from and written as text such as `4Gi`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct ByteSize(pub u64);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "{0:?} is not a size: write a whole number with an optional unit, such as 512Mi, 4Gi or 10G"
)]
pub struct BadByteSize(pub String);

const UNITS: [(&str, u64); 8] = [
    ("Ki", 1 << 10),
    ("Mi", 1 << 20),
    ("Gi", 1 << 30),
    ("Ti", 1 << 40),
    ("K", 1_000),
    ("M", 1_000_000),
    ("G", 1_000_000_000),
    ("T", 1_000_000_000_000),
];

impl FromStr for ByteSize {
    type Err = BadByteSize;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let trimmed = text.trim();
        let digits_end = trimmed
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(trimmed.len());
        let (number, unit) = trimmed.split_at(digits_end);
        let number: u64 = number.parse().map_err(|_| BadByteSize(text.into()))?;
        let scale = if unit.is_empty() {
            1
        } else {
            UNITS
                .iter()
                .find(|(u, _)| *u == unit)
                .map(|(_, s)| *s)
                .ok_or_else(|| BadByteSize(text.into()))?
        };
        number
            .checked_mul(scale)
            .map(ByteSize)
            .ok_or_else(|| BadByteSize(text.into()))
    }
}

impl fmt::Display for ByteSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (unit, scale) in UNITS.iter().take(4).rev() {
            if self.0 >= *scale && self.0.is_multiple_of(*scale) {
                return write!(f, "{}{unit}", self.0 / scale);
            }
        }
        write!(f, "{}", self.0)
    }
}

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

impl Serialize for ByteSize {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_in_binary_and_decimal_units() {
        assert_eq!("4Gi".parse(), Ok(ByteSize(4 << 30)));
        assert_eq!("512Mi".parse(), Ok(ByteSize(512 << 20)));
        assert_eq!("10G".parse(), Ok(ByteSize(10_000_000_000)));
        assert_eq!("1024".parse(), Ok(ByteSize(1024)));
    }

    #[test]
    fn nonsense_is_refused_with_an_example() {
        for bad in ["", "Gi", "4 gigs", "-1Gi", "1.5Gi", "99999999999Ti"] {
            let err = bad.parse::<ByteSize>().unwrap_err();
            assert!(err.to_string().contains("such as 512Mi"), "{bad}: {err}");
        }
    }

    #[test]
    fn sizes_print_in_the_largest_exact_binary_unit() {
        assert_eq!(ByteSize(4 << 30).to_string(), "4Gi");
        assert_eq!(ByteSize(1536 << 20).to_string(), "1536Mi");
        assert_eq!(ByteSize(1000).to_string(), "1000");
    }
}
