//! End-to-end tests: a real kube-apiserver, controller-manager and scheduler (tests/cluster/up),
//! the real darkcore-operator binary, one operator and one namespace per test.

mod attach;
mod chaos;
mod devices;
mod exec;
mod fencing;
mod fleet;
mod frames;
mod harness;
mod helm;
mod hostile;
mod images;
mod kubelet_api;
mod leadership;
mod network;
mod oci;
mod pods;
mod pools;
mod port_forward;
mod rbac;
mod real_node;
mod scheduling;
mod slow_api;
mod tokens;
mod usage;
mod validation;
mod wasm;
