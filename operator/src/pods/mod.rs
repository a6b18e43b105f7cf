//! Pods on darkcore nodes become tasks on devices.
//!
//! ```text
//!  pod watch per node ─┐                         ┌─> Writer: status (SSA, coalesced), delete, Events
//!  agent Hello/reports ┼─> controller (one task) ┼─> Outbox: TaskAssign / TaskCancel to agents
//!  1 s tick ───────────┘   admission, resolve,   └─> LogStore (ends of runs)
//!                          placement (over the tracked load), status (pure)
//! ```

pub mod admission;
pub mod controller;
pub mod demand;
pub mod lifecycle;
pub mod load;
pub mod orphans;
pub mod outbox;
pub mod placement;
pub mod pull_secrets;
pub mod resolve;
pub mod runtime_class;
pub mod status;
pub mod watch;
pub mod writer;
