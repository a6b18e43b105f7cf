//! Usage accounting: agents charge each task run to their device's ledger; the operator stores
//! the records in `PoolUsage` objects (per pool, UTC day and shard of devices), exactly once.
//!
//! ```text
//!  agent ledger ──UsageRecords──> gateway ──> recorder (buffer, flush) ──> PoolUsage objects
//!       <────────UsageAck (after the write)───────┘                  `darkcore-operator usage`
//! ```

pub mod ledger;
pub mod recorder;
pub mod report;
