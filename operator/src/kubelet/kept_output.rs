//! The end of each container's output, kept on its pod when the pod finishes, so that
//! `kubectl logs` still answers after an operator restart or without its device: the whole
//! output when it is small, else the tail the kubelet would keep. It is the message of the
//! pod's `darkcore.io/Output` condition (JSON by container): status is all a kubelet may write
//! on a pod, and all darkcore's RBAC allows.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{Pod, PodCondition};
use serde::{Deserialize, Serialize};

use crate::kubelet::log_store::{Line, TAIL_BYTES, TAIL_LINES};

/// The condition whose message keeps a finished pod's output.
pub const CONDITION: &str = "darkcore.io/Output";

/// One container's kept output: its last lines, and whether they are all it printed.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Kept {
    pub whole: bool,
    /// `[unix nanos, text]`, oldest first.
    pub lines: Vec<(i64, String)>,
}

impl Kept {
    /// Keeps the end of a run's `lines` within the kubelet's tail bounds ([`TAIL_LINES`]
    /// lines, [`TAIL_BYTES`] bytes). `whole_run`: the lines are all the run printed; the kept
    /// ones are whole only if nothing had to be cut or re-encoded.
    pub fn of(lines: &[Line], whole_run: bool) -> Kept {
        let mut kept = Vec::new();
        let mut bytes = 0;
        for line in lines.iter().rev() {
            if kept.len() == TAIL_LINES || bytes + line.data.len() > TAIL_BYTES {
                break;
            }
            bytes += line.data.len();
            kept.push(line);
        }
        kept.reverse();
        let mut whole = whole_run && kept.len() == lines.len();
        let lines = kept
            .into_iter()
            .map(|line| {
                let text = match std::str::from_utf8(&line.data) {
                    Ok(text) => text.to_string(),
                    Err(_) => {
                        whole = false;
                        String::from_utf8_lossy(&line.data).into_owned()
                    }
                };
                (line.timestamp_unix_nanos, text)
            })
            .collect();
        Kept { whole, lines }
    }

    /// The kept lines as the log store holds them.
    pub fn to_lines(&self) -> Vec<Line> {
        self.lines
            .iter()
            .map(|(at, text)| Line {
                timestamp_unix_nanos: *at,
                data: text.as_bytes().to_vec(),
                stderr: false,
            })
            .collect()
    }
}

/// The condition's message for these containers' output.
pub fn encode(containers: &BTreeMap<String, Kept>) -> String {
    serde_json::to_string(containers).unwrap_or_default()
}

fn condition(pod: &Pod) -> Option<&PodCondition> {
    let conditions = pod.status.as_ref()?.conditions.as_ref()?;
    conditions.iter().find(|c| c.type_ == CONDITION)
}

/// What the pod keeps of `container`'s output, if it has the condition (an unreadable one
/// keeps nothing).
pub fn kept(pod: &Pod, container: &str) -> Option<Kept> {
    let value = condition(pod)?.message.as_deref()?;
    let mut containers: BTreeMap<String, Kept> = serde_json::from_str(value).ok()?;
    containers.remove(container)
}

/// Whether the pod keeps its output already.
pub fn present(pod: &Pod) -> bool {
    condition(pod).is_some()
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::PodStatus;

    fn line(text: &str) -> Line {
        Line {
            timestamp_unix_nanos: 7,
            data: text.as_bytes().to_vec(),
            stderr: false,
        }
    }

    #[test]
    fn small_output_of_a_whole_run_is_kept_whole_and_reads_back() {
        let kept = Kept::of(&[line("3.14\n"), line("done\n")], true);
        assert!(kept.whole);
        let message = encode(&BTreeMap::from([("main".to_string(), kept.clone())]));
        let pod = with_condition(&message);
        assert!(present(&pod));
        let read = kept_of(&pod, "main");
        assert_eq!(read.to_lines(), [line("3.14\n"), line("done\n")]);
        assert!(super::kept(&pod, "other").is_none());
    }

    fn with_condition(message: &str) -> Pod {
        Pod {
            status: Some(PodStatus {
                conditions: Some(vec![PodCondition {
                    type_: CONDITION.into(),
                    status: "True".into(),
                    message: Some(message.into()),
                    ..Default::default()
                }]),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    fn kept_of(pod: &Pod, container: &str) -> Kept {
        kept(pod, container).unwrap()
    }

    #[test]
    fn a_long_output_keeps_its_tail_and_says_it_is_not_whole() {
        let many: Vec<Line> = (0..200).map(|n| line(&format!("{n}\n"))).collect();
        let kept = Kept::of(&many, true);
        assert!(!kept.whole);
        assert_eq!(kept.lines.len(), TAIL_LINES);
        assert_eq!(kept.lines.last().unwrap().1, "199\n");
        let big = vec![line(&"x".repeat(1500)), line(&"y".repeat(1500))];
        let kept = Kept::of(&big, true);
        assert_eq!(
            kept.lines.len(),
            1,
            "at most {TAIL_BYTES} bytes, whole lines"
        );
        assert!(!kept.whole);
    }

    #[test]
    fn a_partial_run_or_bytes_that_are_not_text_are_never_called_whole() {
        assert!(!Kept::of(&[line("a\n")], false).whole);
        let binary = Line {
            timestamp_unix_nanos: 1,
            data: vec![0xff, b'\n'],
            stderr: false,
        };
        assert!(!Kept::of(&[binary], true).whole);
        assert!(Kept::of(&[], true).whole, "a run that printed nothing");
    }

    #[test]
    fn a_mangled_message_keeps_nothing() {
        assert!(kept(&with_condition("{not json"), "main").is_none());
        assert!(!present(&Pod::default()));
    }
}
