//! darkcore-agent: the daemon on a volunteer device. It dials out to the operator, reports
//! what the device offers, and runs tasks only as its owner allows.
#![deny(rust_2018_idioms)]

pub mod capabilities;
pub mod policy;
pub mod sensors;
