//! Prices and credit as whole millionths of a currency unit, so that sums are exact and a
//! statement reads the same wherever it is checked.

use serde::{Deserialize, Serialize};

const MICROS: u64 = 1_000_000;

/// A pool's prices, in millionths of its currency.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Prices {
    pub per_core_hour_micros: u64,
    pub per_gib_hour_micros: u64,
    pub currency: String,
}

/// Credit for usage at `prices`, rounded down to a millionth.
pub fn credit_micros(cpu_milliseconds: u64, memory_mib_seconds: u64, prices: &Prices) -> u64 {
    let cpu = u128::from(cpu_milliseconds) * u128::from(prices.per_core_hour_micros) / 3_600_000;
    let memory =
        u128::from(memory_mib_seconds) * u128::from(prices.per_gib_hour_micros) / (1024 * 3600);
    u64::try_from(cpu + memory).unwrap_or(u64::MAX)
}

/// A decimal amount ("0.02", "3", "1.500000") as millionths; at most six decimals.
pub fn parse_micros(text: &str) -> Result<u64, String> {
    let wrong = || {
        format!(
            "{text:?} is not an amount: write a decimal number with at most six decimals, such as \"0.02\""
        )
    };
    let (whole, fraction) = text.trim().split_once('.').unwrap_or((text.trim(), ""));
    let digits = |part: &str| part.bytes().all(|b| b.is_ascii_digit());
    if (whole.is_empty() && fraction.is_empty()) || !digits(whole) || !digits(fraction) {
        return Err(wrong());
    }
    if fraction.len() > 6 {
        return Err(wrong());
    }
    let whole: u64 = match whole {
        "" => 0,
        digits => digits.parse().map_err(|_| wrong())?,
    };
    let fraction: u64 = format!("{fraction:0<6}").parse().map_err(|_| wrong())?;
    whole
        .checked_mul(MICROS)
        .and_then(|w| w.checked_add(fraction))
        .ok_or_else(wrong)
}

/// Millionths as a decimal with six places: 1500000 is "1.500000".
pub fn format_micros(micros: u64) -> String {
    format!("{}.{:06}", micros / MICROS, micros % MICROS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn amounts_parse_to_millionths_and_print_back() {
        assert_eq!(parse_micros("0.02"), Ok(20_000));
        assert_eq!(parse_micros("3"), Ok(3_000_000));
        assert_eq!(parse_micros(".5"), Ok(500_000));
        assert_eq!(parse_micros("1.000001"), Ok(1_000_001));
        assert_eq!(format_micros(1_500_000), "1.500000");
        assert_eq!(format_micros(7), "0.000007");
        for bad in [
            "",
            ".",
            "-1",
            "1e3",
            "0.0000001",
            "1,5",
            "99999999999999999999",
        ] {
            let error = parse_micros(bad).unwrap_err();
            assert!(error.contains("six decimals"), "{bad}: {error}");
        }
    }

    #[test]
    fn an_hour_of_a_core_and_a_gib_costs_the_two_prices() {
        let prices = Prices {
            per_core_hour_micros: 20_000,
            per_gib_hour_micros: 5_000,
            currency: "EUR".into(),
        };
        assert_eq!(credit_micros(3_600_000, 1024 * 3600, &prices), 25_000);
        assert_eq!(credit_micros(0, 0, &prices), 0);
        // Rounded down, never up: a millisecond of a core at 0.02/h is worth nothing yet.
        assert_eq!(credit_micros(1, 0, &prices), 0);
        assert_eq!(
            credit_micros(
                u64::MAX,
                u64::MAX,
                &Prices {
                    per_core_hour_micros: u64::MAX,
                    ..prices
                }
            ),
            u64::MAX
        );
    }
}
