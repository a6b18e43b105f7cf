//! DevicePool -> virtual Nodes: what each pool's nodes and status should be (pure), and the
//! controller that makes the cluster match, renews node leases and cleans up on delete.
//!
//! ```text
//!  DevicePool watch ──┐                        ┌─> Node (metadata/spec, SSA)
//!  Node watch ────────┼─> controller::reconcile ┼─> Node status (SSA, only when stale)
//!  (one, cached)      │     uses node/status     └─> DevicePool status (SSA, only on change)
//!                     └─> lease::renew_loop ─────> Lease in kube-node-lease every 10 s
//! ```

pub mod capacity;
pub mod controller;
pub mod events;
pub mod lease;
pub mod node;
pub mod node_status;
pub mod pool_status;

/// Label on every node darkcore publishes: the name of its pool.
pub const POOL_LABEL: &str = "darkcore.io/pool";
/// The field manager for every server-side apply the operator makes.
pub const FIELD_MANAGER: &str = "darkcore-operator";
