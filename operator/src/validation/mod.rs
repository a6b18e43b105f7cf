//! Results checked by agreement between devices, as BOINC checks them (pure logic): what a pod
//! asks for, where its replicas may run, when they agree, how far each device is trusted, and
//! how reliably it stays online.

pub mod placement;
pub mod policy;
pub mod quorum;
pub mod reliability;
pub mod replicas;
pub mod reputation;
pub mod reputation_store;
