//! Condition bookkeeping shared by node and pool status: a condition's transition time moves
//! only when its status does, so unchanged status never causes a write.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

/// The transition time a condition should carry: the previous one while the status holds,
/// `now` when the status changed or the condition is new.
pub fn transition_time(previous: Option<(&str, Option<&Time>)>, status: &str, now: &Time) -> Time {
    match previous {
        Some((prev_status, Some(prev_time))) if prev_status == status => prev_time.clone(),
        _ => now.clone(),
    }
}

/// `"True"` or `"False"`, as Kubernetes spells condition status.
pub fn status_word(value: bool) -> &'static str {
    if value { "True" } else { "False" }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::jiff::Timestamp;

    fn at(secs: i64) -> Time {
        Time(Timestamp::from_second(secs).unwrap())
    }

    #[test]
    fn transition_time_holds_while_the_status_holds() {
        assert_eq!(
            transition_time(Some(("True", Some(&at(10)))), "True", &at(99)),
            at(10)
        );
    }

    #[test]
    fn transition_time_moves_when_the_status_changes_or_is_new() {
        assert_eq!(
            transition_time(Some(("True", Some(&at(10)))), "False", &at(99)),
            at(99)
        );
        assert_eq!(transition_time(None, "True", &at(99)), at(99));
    }
}
