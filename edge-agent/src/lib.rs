//! darkcore-agent: the daemon on a volunteer device. It dials out to the operator, reports
//! what the device offers, and runs tasks only as its owner allows.
#![deny(rust_2018_idioms)]

pub mod backoff;
pub mod capabilities;
pub mod credit;
pub mod digest;
pub mod fence;
pub mod gateway;
pub mod identity;
pub mod images;
pub mod input;
pub mod join;
pub mod metrics;
pub mod observe;
pub mod policy;
pub mod run;
pub mod sensors;
pub mod session;
pub mod status;
pub mod streams;
pub mod tasks;
pub mod usage;

/// A path of this test run's own under the system temp dir, `darkcore-NAME-PID`, emptied of
/// what an earlier run left (not created: callers make what they need).
#[cfg(test)]
pub(crate) fn fresh_test_dir(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("darkcore-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}
