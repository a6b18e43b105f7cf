//! darkcore-agent: the daemon on a volunteer device. It dials out to the operator, reports
//! what the device offers, and runs tasks only as its owner allows.
#![deny(rust_2018_idioms)]

pub mod backoff;
pub mod capabilities;
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
pub mod tasks;
pub mod usage;
