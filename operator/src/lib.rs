//! darkcore-operator: publishes each DevicePool as virtual Nodes and keeps them alive, and
//! serves the gateway that devices join and attach through.
//! Durable state lives in the Kubernetes API, so the process may restart at any time.
#![deny(rust_2018_idioms)]

pub mod conditions;
pub mod devices;
pub mod domain;
pub mod enroll;
pub mod gateway;
pub mod housekeeping;
pub mod http;
pub mod installation;
pub mod kubelet;
pub mod leader;
pub mod metrics;
pub mod pods;
pub mod pool;
pub mod reports;
pub mod run;
pub mod supervise;
pub mod tls;
pub mod usage;
pub mod validation;
pub mod warmup;
