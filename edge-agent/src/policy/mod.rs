//! The owner's policy: when this device may give, and how much. `config` reads the file the
//! owner edits, `schedule` knows the allowed hours, `decide` turns a snapshot of the host into
//! "available or not, and why" (all pure, so every rule is unit-tested).
//!
//! ```text
//!  agent.toml ──> config::AgentConfig ──┐
//!                                       ├──> decide::decide ──> Decision { available, reason, offer }
//!  host sensors ─> decide::Observation ─┘
//! ```

pub mod bytes;
pub mod config;
pub mod decide;
pub mod schedule;

pub use config::{AgentConfig, OwnerPolicy};
pub use decide::{Decision, InputIdle, Observation, decide};
