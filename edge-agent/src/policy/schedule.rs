//! The hours an owner allows, per weekday, in local time. A window that ends before it starts
//! runs past midnight: `21:00-07:00` on Friday covers Friday night and early Saturday.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Deserializer};

/// Days of the week, Monday first.
pub const WEEKDAYS: [&str; 7] = [
    "monday",
    "tuesday",
    "wednesday",
    "thursday",
    "friday",
    "saturday",
    "sunday",
];

/// A moment in local time: the weekday (0 = Monday) and minutes since midnight.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LocalTime {
    pub weekday: usize,
    pub minute: u32,
}

impl LocalTime {
    /// The local time now, in the device's time zone.
    pub fn now() -> LocalTime {
        let now = jiff::Zoned::now();
        LocalTime {
            weekday: now.weekday().to_monday_zero_offset() as usize,
            minute: now.hour() as u32 * 60 + now.minute() as u32,
        }
    }
}

/// `HH:MM-HH:MM`; `24:00` may end a window.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Window {
    pub start: u32,
    pub end: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0:?} is not a time window: write HH:MM-HH:MM in local time, for example 21:00-07:00")]
pub struct BadWindow(pub String);

impl std::str::FromStr for Window {
    type Err = BadWindow;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let bad = || BadWindow(text.to_string());
        let (start, end) = text.trim().split_once('-').ok_or_else(bad)?;
        let minute = |hhmm: &str| -> Option<u32> {
            let (h, m) = hhmm.trim().split_once(':')?;
            if h.len() != 2 || m.len() != 2 {
                return None;
            }
            let (h, m): (u32, u32) = (h.parse().ok()?, m.parse().ok()?);
            (m < 60 && (h < 24 || (h == 24 && m == 0))).then_some(h * 60 + m)
        };
        let window = Window {
            start: minute(start).ok_or_else(bad)?,
            end: minute(end).ok_or_else(bad)?,
        };
        if window.start == window.end || window.start == 24 * 60 {
            return Err(bad());
        }
        Ok(window)
    }
}

impl fmt::Display for Window {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{:02}:{:02}-{:02}:{:02}",
            self.start / 60,
            self.start % 60,
            self.end / 60,
            self.end % 60
        )
    }
}

impl<'de> Deserialize<'de> for Window {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        String::deserialize(deserializer)?
            .parse()
            .map_err(serde::de::Error::custom)
    }
}

impl Window {
    fn crosses_midnight(&self) -> bool {
        self.end < self.start
    }
}

/// Allowed windows per weekday. Keys are weekday names, or `everyday`, `weekdays`
/// (Monday to Friday) and `weekends`; a day's windows are all the keys that name it.
/// No keys at all means any time.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(try_from = "BTreeMap<String, Vec<Window>>")]
pub struct Schedule {
    days: [Vec<Window>; 7],
    any_time: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0:?} is not a day: use monday .. sunday, everyday, weekdays or weekends")]
pub struct BadDay(pub String);

impl TryFrom<BTreeMap<String, Vec<Window>>> for Schedule {
    type Error = BadDay;

    fn try_from(entries: BTreeMap<String, Vec<Window>>) -> Result<Self, Self::Error> {
        let mut days: [Vec<Window>; 7] = Default::default();
        for (key, windows) in &entries {
            let indexes: Vec<usize> = match key.as_str() {
                "everyday" => (0..7).collect(),
                "weekdays" => (0..5).collect(),
                "weekends" => vec![5, 6],
                day => vec![
                    WEEKDAYS
                        .iter()
                        .position(|d| *d == day)
                        .ok_or_else(|| BadDay(key.clone()))?,
                ],
            };
            for i in indexes {
                days[i].extend(windows.iter().copied());
            }
        }
        Ok(Schedule {
            days,
            any_time: entries.is_empty(),
        })
    }
}

impl Schedule {
    /// A schedule that allows any time.
    pub fn any_time() -> Schedule {
        Schedule {
            any_time: true,
            ..Schedule::default()
        }
    }

    pub fn allows(&self, at: LocalTime) -> bool {
        if self.any_time {
            return true;
        }
        let yesterday = (at.weekday + 6) % 7;
        let today = self.days[at.weekday].iter().any(|w| {
            if w.crosses_midnight() {
                at.minute >= w.start
            } else {
                at.minute >= w.start && at.minute < w.end
            }
        });
        let spill = self.days[yesterday]
            .iter()
            .any(|w| w.crosses_midnight() && at.minute < w.end);
        today || spill
    }

    /// A day's windows in order, for messages: `12:00-13:00, 21:00-07:00`, or `none`.
    pub fn describe(&self, weekday: usize) -> String {
        let mut day = self.days[weekday].clone();
        day.sort_by_key(|w| w.start);
        let windows: Vec<String> = day.iter().map(Window::to_string).collect();
        if windows.is_empty() {
            "none".into()
        } else {
            windows.join(", ")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn schedule(entries: &[(&str, &[&str])]) -> Schedule {
        let map: BTreeMap<String, Vec<Window>> = entries
            .iter()
            .map(|(day, ws)| {
                (
                    day.to_string(),
                    ws.iter().map(|w| w.parse().unwrap()).collect(),
                )
            })
            .collect();
        Schedule::try_from(map).unwrap()
    }

    fn at(weekday: usize, hhmm: &str) -> LocalTime {
        let (h, m) = hhmm.split_once(':').unwrap();
        LocalTime {
            weekday,
            minute: h.parse::<u32>().unwrap() * 60 + m.parse::<u32>().unwrap(),
        }
    }

    #[test]
    fn windows_parse_and_refuse_nonsense_with_an_example() {
        assert_eq!(
            "21:00-07:00".parse(),
            Ok(Window {
                start: 21 * 60,
                end: 7 * 60
            })
        );
        assert_eq!(
            "00:00-24:00".parse(),
            Ok(Window {
                start: 0,
                end: 24 * 60
            })
        );
        for bad in [
            "21-7",
            "9:00-17:00",
            "25:00-01:00",
            "10:00-10:00",
            "10:60-11:00",
            "24:00-01:00",
            "night",
        ] {
            let err = bad.parse::<Window>().unwrap_err().to_string();
            assert!(err.contains("for example 21:00-07:00"), "{bad}: {err}");
        }
    }

    #[test]
    fn a_daytime_window_includes_its_start_and_excludes_its_end() {
        let s = schedule(&[("monday", &["09:00-17:00"])]);
        assert!(s.allows(at(0, "09:00")));
        assert!(s.allows(at(0, "16:59")));
        assert!(!s.allows(at(0, "17:00")));
        assert!(!s.allows(at(1, "10:00")), "tuesday has no window");
    }

    #[test]
    fn an_overnight_window_runs_into_the_next_morning() {
        let s = schedule(&[("friday", &["21:00-07:00"])]);
        assert!(s.allows(at(4, "23:30")), "friday night");
        assert!(s.allows(at(5, "06:59")), "saturday early morning");
        assert!(!s.allows(at(5, "07:00")));
        assert!(
            !s.allows(at(4, "06:00")),
            "friday early morning belongs to thursday"
        );
    }

    #[test]
    fn sunday_night_spills_into_monday() {
        let s = schedule(&[("sunday", &["22:00-02:00"])]);
        assert!(s.allows(at(0, "01:00")));
    }

    #[test]
    fn groups_of_days_add_up() {
        let s = schedule(&[
            ("weekdays", &["19:00-23:00"]),
            ("weekends", &["00:00-24:00"]),
            ("wednesday", &["12:00-13:00"]),
        ]);
        assert!(s.allows(at(2, "12:30")) && s.allows(at(2, "20:00")));
        assert!(!s.allows(at(2, "14:00")));
        assert!(s.allows(at(6, "10:00")));
        assert_eq!(s.describe(2), "12:00-13:00, 19:00-23:00");
    }

    #[test]
    fn no_windows_means_any_time_but_an_empty_day_means_never_that_day() {
        assert!(schedule(&[]).allows(at(3, "03:00")));
        let s = schedule(&[("monday", &[])]);
        assert!(!s.allows(at(0, "12:00")));
        assert!(
            !s.allows(at(1, "12:00")),
            "a schedule that names days allows only those"
        );
    }

    #[test]
    fn unknown_day_names_are_refused() {
        let map = BTreeMap::from([("caturday".to_string(), vec![])]);
        assert!(
            Schedule::try_from(map)
                .unwrap_err()
                .to_string()
                .contains("monday .. sunday")
        );
    }
}
