//! Usage accounting: agents charge each task run to their device's ledger; the operator stores
//! the records in `PoolUsage` objects (per pool, UTC day and shard of devices), exactly once.
//!
//! ```text
//!  agent ledger ──UsageRecords──> gateway ──> recorder ──> PoolUsage objects
//!       <────────UsageAck (after the write)───────┘  │  checked against   `darkcore-operator usage`
//!  pod controller ──attempts sent, ended, lost, judged──> attempt book (the operator's own record)
//!  credit: checked attempts' usage filed by how their results were judged ──> `usage statement`
//! ```

pub mod attempts;
pub mod credit;
pub mod ledger;
pub mod recorder;
pub mod report;
pub mod statement;
pub mod statement_key;
