//! Figures the benchmark tools share: nearest-rank percentiles of latencies, in milliseconds.
//! Included by path into each bench binary (the tests crate has no library).

use std::time::Duration;

/// The value below which `q` of the sorted samples fall (nearest rank).
pub fn percentile(sorted: &[Duration], q: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

/// Milliseconds, to a tenth.
pub fn ms(d: Duration) -> f64 {
    (d.as_secs_f64() * 10_000.0).round() / 10.0
}

/// p50, p90, p99 and max of `samples`, in milliseconds.
pub fn latencies_ms(mut samples: Vec<Duration>) -> serde_json::Value {
    samples.sort();
    serde_json::json!({
        "p50": ms(percentile(&samples, 0.50)),
        "p90": ms(percentile(&samples, 0.90)),
        "p99": ms(percentile(&samples, 0.99)),
        "max": ms(percentile(&samples, 1.0)),
    })
}
