//! What a device may say in a task status, cut to the size Kubernetes itself keeps: a reason
//! is a short word, a message at most 4 KiB (the kubelet's termination message limit). Applied
//! as reports arrive, so nothing larger is held, compared or copied into pod status.

use darkcore_proto::agent::v1::{ContainerStatus, TaskStatus, Termination};

/// Characters kept of a reason (`OOMKilled`, `CrashLoopBackOff`, ...).
pub const REASON_CHARS: usize = 64;
/// Bytes kept of a message.
pub const MESSAGE_BYTES: usize = 4096;
/// Containers a status may describe: more than any pod holds is a device's invention.
pub const CONTAINERS: usize = 64;

/// Cuts a device's status down to the bounds; returns whether anything was cut.
pub fn bound_status(status: &mut TaskStatus) -> bool {
    let mut cut = cap(&mut status.reason, REASON_CHARS, true);
    cut |= cap(&mut status.message, MESSAGE_BYTES, false);
    for list in [&mut status.init_containers, &mut status.containers] {
        if list.len() > CONTAINERS {
            list.truncate(CONTAINERS);
            cut = true;
        }
        for container in list.iter_mut() {
            cut |= bound_container(container);
        }
    }
    cut
}

fn bound_container(container: &mut ContainerStatus) -> bool {
    let mut cut = cap(&mut container.name, REASON_CHARS, true);
    cut |= cap(&mut container.reason, REASON_CHARS, true);
    cut |= cap(&mut container.message, MESSAGE_BYTES, false);
    cut |= cap(&mut container.image_id, MESSAGE_BYTES, false);
    if let Some(last) = container.last_termination.as_mut() {
        cut |= bound_termination(last);
    }
    cut
}

fn bound_termination(termination: &mut Termination) -> bool {
    cap(&mut termination.reason, REASON_CHARS, true)
        | cap(&mut termination.message, MESSAGE_BYTES, false)
}

/// Keeps at most `limit` characters (`chars`) or bytes, cut at a character boundary.
fn cap(text: &mut String, limit: usize, chars: bool) -> bool {
    let end = if chars {
        text.char_indices().nth(limit).map(|(at, _)| at)
    } else if text.len() > limit {
        (0..=limit).rev().find(|at| text.is_char_boundary(*at))
    } else {
        None
    };
    match end {
        Some(end) => {
            text.truncate(end);
            true
        }
        None => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn megabyte_strings_from_a_device_are_cut_to_kubernetes_sizes() {
        let huge = "é".repeat(1 << 20);
        let mut status = TaskStatus {
            reason: huge.clone(),
            message: huge.clone(),
            containers: vec![
                ContainerStatus {
                    reason: huge.clone(),
                    message: huge.clone(),
                    last_termination: Some(Termination {
                        message: huge.clone(),
                        ..Default::default()
                    }),
                    ..Default::default()
                };
                100
            ],
            ..Default::default()
        };
        assert!(bound_status(&mut status));
        assert_eq!(status.reason.chars().count(), REASON_CHARS);
        assert!(status.message.len() <= MESSAGE_BYTES && status.message.len() >= MESSAGE_BYTES - 1);
        assert_eq!(status.containers.len(), CONTAINERS);
        let last = status.containers[0].last_termination.as_ref().unwrap();
        assert!(last.message.len() <= MESSAGE_BYTES);
    }

    #[test]
    fn an_honest_status_is_left_as_it_is() {
        let mut status = TaskStatus {
            reason: "Evicted".into(),
            message: "Usage of EmptyDir volume \"data\" exceeds the limit \"4.0Mi\".".into(),
            containers: vec![ContainerStatus {
                name: "main".into(),
                reason: "OOMKilled".into(),
                ..Default::default()
            }],
            ..Default::default()
        };
        let before = status.clone();
        assert!(!bound_status(&mut status));
        assert_eq!(status, before);
    }
}
