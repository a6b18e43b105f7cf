//! Kubernetes quantities as the API server writes and reads them: CPU in millicores, bytes,
//! counts, in canonical form so that a value read back compares equal to the one written.

/// Decimal SI suffixes in the order the API server's canonical form uses them.
const DECIMAL: [(&str, u64); 6] = [
    ("E", 1_000_000_000_000_000_000),
    ("P", 1_000_000_000_000_000),
    ("T", 1_000_000_000_000),
    ("G", 1_000_000_000),
    ("M", 1_000_000),
    ("k", 1_000),
];

/// A count in the API server's canonical form (`1k` for 1000, `1500` for 1500), so a value
/// read back compares equal to the one written and no write repeats for nothing.
pub fn count_quantity(n: u64) -> String {
    in_largest_exact_unit(n, &DECIMAL)
}

/// `n` in the largest of `units` (largest first) that divides it exactly, else plain.
fn in_largest_exact_unit(n: u64, units: &[(&str, u64)]) -> String {
    units
        .iter()
        .find(|(_, size)| n != 0 && n.is_multiple_of(*size))
        .map_or_else(
            || n.to_string(),
            |(suffix, size)| format!("{}{suffix}", n / size),
        )
}

/// Kubernetes quantity text for CPU millicores, canonical: whole cores when exact, else `NNNm`.
pub fn cpu_quantity(millis: u64) -> String {
    if millis.is_multiple_of(1000) {
        count_quantity(millis / 1000)
    } else {
        format!("{millis}m")
    }
}

/// Millicores in a CPU quantity as the API server returns it (`4`, `1k`, `1500m`).
pub fn cpu_millis(quantity: &str) -> Option<u64> {
    if let Some(millis) = quantity.strip_suffix('m') {
        return millis.parse().ok();
    }
    let (number, size) = DECIMAL
        .iter()
        .find_map(|(suffix, size)| quantity.strip_suffix(suffix).map(|n| (n, *size)))
        .unwrap_or((quantity, 1));
    number
        .parse::<u64>()
        .ok()?
        .checked_mul(size)?
        .checked_mul(1000)
}

/// Binary suffixes, largest first.
const BINARY: [(&str, u64); 6] = [
    ("Ei", 1 << 60),
    ("Pi", 1 << 50),
    ("Ti", 1 << 40),
    ("Gi", 1 << 30),
    ("Mi", 1 << 20),
    ("Ki", 1 << 10),
];

/// Kubernetes quantity text for bytes, in the largest binary unit that divides it exactly.
pub fn bytes_quantity(bytes: u64) -> String {
    in_largest_exact_unit(bytes, &BINARY)
}

/// Bytes in a Kubernetes memory quantity: plain, binary (Ki..Ei) or decimal (k..E) suffixes,
/// fractions allowed (`1.5Gi`).
pub fn parse_memory(quantity: &str) -> Option<u64> {
    let q = quantity.trim();
    let (number, scale) = BINARY
        .iter()
        .chain(DECIMAL.iter())
        .find_map(|(suffix, scale)| q.strip_suffix(suffix).map(|n| (n, *scale)))
        .unwrap_or((q, 1));
    let value: f64 = number.parse().ok()?;
    (value >= 0.0 && value.is_finite()).then_some((value * scale as f64) as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_quantity_prefers_whole_cores() {
        assert_eq!(cpu_quantity(0), "0");
        assert_eq!(cpu_quantity(4000), "4");
        assert_eq!(cpu_quantity(1500), "1500m");
    }

    #[test]
    fn cpu_quantities_read_back() {
        for millis in [0, 1500, 4000, 1_000_000, 1_500_000, 2_000_000_000] {
            assert_eq!(cpu_millis(&cpu_quantity(millis)), Some(millis), "{millis}");
        }
        assert_eq!(cpu_millis("lots"), None);
    }

    #[test]
    fn counts_are_written_as_the_api_server_canonicalizes_them() {
        // What a 1.33 API server returns for these values, observed with 1000 devices.
        assert_eq!(cpu_quantity(1_000_000), "1k");
        assert_eq!(count_quantity(10_000), "10k");
        assert_eq!(count_quantity(1500), "1500");
        assert_eq!(count_quantity(0), "0");
        assert_eq!(count_quantity(3_000_000), "3M");
    }

    #[test]
    fn memory_quantities_parse_with_any_suffix() {
        assert_eq!(parse_memory("2Gi"), Some(2 << 30));
        assert_eq!(parse_memory("1.5Gi"), Some(3 << 29));
        assert_eq!(parse_memory("500M"), Some(500_000_000));
        assert_eq!(parse_memory("1024"), Some(1024));
        assert_eq!(parse_memory("lots"), None);
    }

    #[test]
    fn bytes_quantity_uses_the_largest_exact_unit() {
        assert_eq!(bytes_quantity(0), "0");
        assert_eq!(bytes_quantity(16 << 30), "16Gi");
        assert_eq!(bytes_quantity(1536 << 20), "1536Mi");
        assert_eq!(bytes_quantity(1000), "1000");
    }
}
