//! Device joins, losses and revocations summed up as pool Events (pure): one Event per kind
//! per reconcile, so a fleet joining at once makes a few Events, not one per device.

use kube::runtime::events::EventType;

use crate::pool::capacity::{ChangeKind, DeviceChange};

/// How many device ids an Event names before it says "and N more".
pub const NAMED_DEVICES: usize = 10;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChangeSummary {
    pub type_: EventType,
    pub reason: &'static str,
    pub note: String,
}

pub fn summarize_changes(changes: &[DeviceChange]) -> Vec<ChangeSummary> {
    let kinds = [
        (
            ChangeKind::Joined,
            EventType::Normal,
            "DevicesJoined",
            "joined",
        ),
        (
            ChangeKind::Lost,
            EventType::Warning,
            "DevicesLost",
            "lost (no heartbeat within deviceLostAfterSeconds)",
        ),
        (
            ChangeKind::Revoked,
            EventType::Warning,
            "DevicesRevoked",
            "revoked",
        ),
        (
            ChangeKind::Implausible,
            EventType::Warning,
            "DevicesImplausible",
            "not enlisted: they claim more than spec.deviceLimits or their own hardware (see darkcore-operator device list)",
        ),
        (
            ChangeKind::Quarantined,
            EventType::Warning,
            "DevicesQuarantined",
            "quarantined and no longer enlisted: their results disagreed with validated ones past spec.validation.adaptive.quarantineErrorRatePercent (see darkcore-operator devices)",
        ),
    ];
    kinds
        .into_iter()
        .filter_map(|(kind, type_, reason, verb)| {
            let mut ids: Vec<&str> = changes
                .iter()
                .filter(|c| c.kind == kind)
                .map(|c| c.device.as_str())
                .collect();
            ids.dedup();
            if ids.is_empty() {
                return None;
            }
            let named = ids[..ids.len().min(NAMED_DEVICES)].join(", ");
            let more = ids.len().saturating_sub(NAMED_DEVICES);
            let note = match (ids.len(), more) {
                (1, _) => format!("device {named} {verb}"),
                (n, 0) => format!("{n} devices {verb}: {named}"),
                (n, more) => format!("{n} devices {verb}: {named} and {more} more"),
            };
            Some(ChangeSummary {
                type_,
                reason,
                note,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn change(kind: ChangeKind, device: String) -> DeviceChange {
        DeviceChange { kind, device }
    }

    #[test]
    fn one_join_names_the_device() {
        let summary = summarize_changes(&[change(ChangeKind::Joined, "dev-a".into())]);
        assert_eq!(summary.len(), 1);
        assert_eq!(summary[0].note, "device dev-a joined");
        assert_eq!(summary[0].type_, EventType::Normal);
    }

    #[test]
    fn many_changes_become_one_event_per_kind_with_a_bounded_note() {
        let mut changes: Vec<DeviceChange> = (0..1000)
            .map(|i| change(ChangeKind::Joined, format!("dev-{i:04}")))
            .collect();
        changes.push(change(ChangeKind::Lost, "dev-x".into()));
        changes.push(change(ChangeKind::Revoked, "dev-y".into()));
        let summary = summarize_changes(&changes);
        assert_eq!(
            summary.iter().map(|s| s.reason).collect::<Vec<_>>(),
            ["DevicesJoined", "DevicesLost", "DevicesRevoked"]
        );
        assert!(
            summary[0].note.starts_with("1000 devices joined: dev-0000")
                && summary[0].note.ends_with("and 990 more"),
            "{}",
            summary[0].note
        );
        assert!(summary[0].note.len() < 300);
        assert_eq!(summary[1].type_, EventType::Warning);
    }

    #[test]
    fn nothing_happened_means_no_event() {
        assert!(summarize_changes(&[]).is_empty());
    }
}
