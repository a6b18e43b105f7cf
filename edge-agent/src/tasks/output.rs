//! The output of the tasks this device holds, kept until each is released and sent from here:
//! every chunk carries its offset in its run. When the operator asks (it adopted the task
//! after a restart, or the device reattached), all that is kept of a task goes again, so it
//! gets each run from its start and skips by offset what it has.
//!
//! Bounds: per run [`RUN_KEEP`] bytes, in all [`TOTAL_KEEP`]; beyond, a run's oldest chunks go
//! first (from the largest run), and a chunk that goes before it was sent is counted dropped.

use std::collections::{HashMap, VecDeque};

use darkcore_proto::agent::v1::LogChunk;

/// Output kept per container run: what the operator keeps of one too.
pub const RUN_KEEP: usize = 1 << 20;
/// Output kept in all, whatever the number of tasks.
pub const TOTAL_KEEP: usize = 16 << 20;
/// Runs kept per container: the current one and the one before it (`logs --previous`).
const RUNS_PER_CONTAINER: usize = 2;

/// A run of one container of one task: (task id, container, run).
type RunKey = (String, String, u32);

#[derive(Default)]
struct RunOutput {
    chunks: VecDeque<LogChunk>,
    /// What the kept chunks cost, with their bookkeeping.
    bytes: usize,
    /// The offset the next chunk of the run gets.
    next_offset: u64,
    /// The offset from which nothing is sent yet (or asked for again).
    cursor: u64,
    /// In the ready queue.
    queued: bool,
}

impl RunOutput {
    fn first_offset(&self) -> u64 {
        self.chunks.front().map_or(self.next_offset, offset_of)
    }
}

fn offset_of(chunk: &LogChunk) -> u64 {
    chunk.offset.unwrap_or(0)
}

fn cost(chunk: &LogChunk) -> usize {
    chunk.data.len() + chunk.task_id.len() + chunk.container.len() + 64
}

/// Kept output, and which runs have some not sent yet (each once, in turn).
#[derive(Default)]
pub struct OutputBook {
    runs: HashMap<RunKey, RunOutput>,
    ready: VecDeque<RunKey>,
    bytes: usize,
    /// Chunks that went before they were sent.
    pub dropped: u64,
}

impl OutputBook {
    /// Keeps a chunk a task just wrote, giving it its offset in its run.
    pub fn push(&mut self, mut chunk: LogChunk) {
        let key = (chunk.task_id.clone(), chunk.container.clone(), chunk.run);
        if !self.runs.contains_key(&key) {
            self.forget_old_runs(&key);
        }
        let run = self.runs.entry(key.clone()).or_default();
        chunk.offset = Some(run.next_offset);
        run.next_offset += chunk.data.len() as u64;
        let size = cost(&chunk);
        run.bytes += size;
        self.bytes += size;
        run.chunks.push_back(chunk);
        if !run.queued {
            run.queued = true;
            self.ready.push_back(key.clone());
        }
        while self.runs[&key].bytes > RUN_KEEP {
            self.drop_oldest(&key);
        }
        while self.bytes > TOTAL_KEEP {
            let Some(largest) = self
                .runs
                .iter()
                .max_by_key(|(_, run)| run.bytes)
                .map(|(key, _)| key.clone())
            else {
                break;
            };
            self.drop_oldest(&largest);
        }
    }

    /// The next chunk not sent yet (or asked for again), taking runs in turn.
    pub fn next_unsent(&mut self) -> Option<LogChunk> {
        while let Some(key) = self.ready.pop_front() {
            let Some(run) = self.runs.get_mut(&key) else {
                continue;
            };
            let cursor = run.cursor.max(run.first_offset());
            let at = run.chunks.partition_point(|c| offset_of(c) < cursor);
            let Some(chunk) = run.chunks.get(at).cloned() else {
                run.queued = false;
                continue;
            };
            run.cursor = offset_of(&chunk) + chunk.data.len() as u64;
            if run.cursor < run.next_offset {
                self.ready.push_back(key);
            } else {
                run.queued = false;
            }
            return Some(chunk);
        }
        None
    }

    /// Everything kept of the task is to be sent again.
    pub fn resend(&mut self, task_id: &str) {
        for (key, run) in self.runs.iter_mut().filter(|(key, _)| key.0 == task_id) {
            run.cursor = 0;
            if !run.queued && !run.chunks.is_empty() {
                run.queued = true;
                self.ready.push_back(key.clone());
            }
        }
    }

    /// The task is released: its output is no longer needed here.
    pub fn forget(&mut self, task_id: &str) {
        let bytes = &mut self.bytes;
        self.runs.retain(|(task, _, _), run| {
            let keep = task != task_id;
            if !keep {
                *bytes -= run.bytes;
            }
            keep
        });
    }

    /// Bytes kept (with bookkeeping).
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    fn drop_oldest(&mut self, key: &RunKey) {
        let Some(run) = self.runs.get_mut(key) else {
            return;
        };
        let Some(chunk) = run.chunks.pop_front() else {
            return;
        };
        let size = cost(&chunk);
        run.bytes -= size;
        self.bytes -= size;
        if offset_of(&chunk) >= run.cursor {
            self.dropped += 1;
        }
    }

    /// A container starts a new run: only the newest runs of it stay.
    fn forget_old_runs(&mut self, new: &RunKey) {
        let mut older: Vec<u32> = self
            .runs
            .keys()
            .filter(|(task, container, _)| *task == new.0 && *container == new.1)
            .map(|(_, _, run)| *run)
            .collect();
        if older.len() < RUNS_PER_CONTAINER {
            return;
        }
        older.sort_unstable();
        let excess = older.len() + 1 - RUNS_PER_CONTAINER;
        for run in older.into_iter().take(excess) {
            let key = (new.0.clone(), new.1.clone(), run);
            if let Some(gone) = self.runs.remove(&key) {
                self.bytes -= gone.bytes;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chunk(task: &str, run: u32, text: &str) -> LogChunk {
        LogChunk {
            task_id: task.into(),
            container: "main".into(),
            data: text.as_bytes().to_vec(),
            run,
            ..Default::default()
        }
    }

    fn drain(book: &mut OutputBook) -> Vec<(String, u64, String)> {
        std::iter::from_fn(|| book.next_unsent())
            .map(|c| {
                let text = String::from_utf8(c.data.clone()).unwrap();
                (c.task_id, c.offset.unwrap(), text)
            })
            .collect()
    }

    #[test]
    fn chunks_carry_their_offset_in_their_run_and_go_once_unless_asked_again() {
        let mut book = OutputBook::default();
        book.push(chunk("a.1", 0, "one\n"));
        book.push(chunk("a.1", 0, "two\n"));
        book.push(chunk("b.1", 0, "x\n"));
        let sent = drain(&mut book);
        assert_eq!(
            sent,
            [
                ("a.1".into(), 0, "one\n".into()),
                ("b.1".into(), 0, "x\n".into()),
                ("a.1".into(), 4, "two\n".into()),
            ],
            "runs take turns"
        );
        assert!(book.next_unsent().is_none());
        book.push(chunk("a.1", 0, "three\n"));
        assert_eq!(drain(&mut book), [("a.1".into(), 8, "three\n".into())]);
    }

    #[test]
    fn a_task_asked_for_again_sends_everything_kept_from_the_start_and_only_it() {
        let mut book = OutputBook::default();
        book.push(chunk("a.1", 0, "one\n"));
        book.push(chunk("b.1", 0, "other\n"));
        drain(&mut book);
        book.push(chunk("a.1", 0, "two\n")); // written while disconnected
        book.resend("a.1");
        let sent = drain(&mut book);
        assert_eq!(
            sent.iter().map(|s| (s.0.as_str(), s.1)).collect::<Vec<_>>(),
            [("a.1", 0), ("a.1", 4)],
            "each chunk once, oldest first"
        );
    }

    #[test]
    fn a_run_keeps_its_newest_output_within_its_bound_and_counts_what_went_unsent() {
        let mut book = OutputBook::default();
        let line = "x".repeat(1000) + "\n";
        let lines = 2 * RUN_KEEP / line.len();
        for _ in 0..lines {
            book.push(chunk("a.1", 0, &line));
        }
        assert!(book.bytes() <= RUN_KEEP);
        assert!(book.dropped > 0);
        let sent = drain(&mut book);
        let first = sent.first().unwrap().1;
        assert!(first > 0, "the oldest output went first");
        assert_eq!(
            sent.last().unwrap().1,
            (lines as u64 - 1) * line.len() as u64
        );
        // Resent from the first kept chunk.
        book.resend("a.1");
        assert_eq!(book.next_unsent().unwrap().offset, Some(first));
    }

    #[test]
    fn the_device_keeps_at_most_its_total_and_takes_from_the_largest_run() {
        let mut book = OutputBook::default();
        let line = "y".repeat(16 * 1024);
        for task in 0..40 {
            for _ in 0..(RUN_KEEP / line.len()) {
                book.push(chunk(&format!("t{task}.1"), 0, &line));
            }
        }
        assert!(book.bytes() <= TOTAL_KEEP);
        book.push(chunk("small.1", 0, "hello\n"));
        book.resend("small.1");
        assert!(
            drain(&mut book).iter().any(|s| s.0 == "small.1"),
            "a small run is not pushed out by large ones"
        );
    }

    #[test]
    fn released_tasks_and_runs_older_than_the_previous_are_forgotten() {
        let mut book = OutputBook::default();
        for run in 0..4 {
            book.push(chunk("a.1", run, "r\n"));
        }
        book.push(chunk("b.1", 0, "b\n"));
        book.resend("a.1");
        let mut runs: Vec<_> = std::iter::from_fn(|| book.next_unsent())
            .filter(|c| c.task_id == "a.1")
            .map(|c| c.run)
            .collect();
        runs.sort();
        assert_eq!(runs, [2, 3]);
        book.forget("a.1");
        book.resend("a.1");
        book.resend("b.1");
        assert_eq!(drain(&mut book).len(), 1);
        book.forget("b.1");
        assert_eq!(book.bytes(), 0);
    }
}
