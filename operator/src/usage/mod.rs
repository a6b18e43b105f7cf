//! Usage accounting: agents charge each task run to their device's ledger; the operator stores
//! the records in `PoolUsage` objects (per pool, UTC day and shard of devices), exactly once.
//!
//! ```text
//!  agent ledger ──UsageRecords──> gateway ──> recorder ──> PoolUsage objects
//!       <────────UsageAck (after the write)───────┘  │  checked against   `darkcore-operator usage`
//!  pod controller ──attempts sent, ended, lost──> attempt book (the operator's own record)
//! ```

pub mod attempts;
pub mod ledger;
pub mod recorder;
pub mod report;
