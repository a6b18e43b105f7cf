//! Where agents' task reports go, behind the gateway's `TaskSink`: statuses to the pod
//! controller, output to the log store, readings to the stats store, finished runs to the
//! usage recorder.

use std::sync::Arc;

use darkcore_proto::agent::v1::{LogChunk, Offer, Stats, TaskStatus, UsageRecord};
use futures::future::BoxFuture;
use tokio::sync::mpsc;

use crate::devices::registry::AgentSender;
use crate::gateway::attach::TaskSink;
use crate::kubelet::log_store::{LogStore, Refused};
use crate::kubelet::stats::{Bound, StatsStore};
use crate::pods::controller::Input;
use crate::usage::recorder::Charged;

pub struct TaskReports {
    pub controller: mpsc::Sender<Input>,
    pub logs: Arc<LogStore>,
    pub stats: Arc<StatsStore>,
    pub usage: mpsc::Sender<Charged>,
}

impl TaskSink for TaskReports {
    fn hello(&self, device: &str, tasks: Vec<TaskStatus>) -> BoxFuture<'_, ()> {
        let input = Input::Hello(device.to_string(), tasks);
        Box::pin(async move {
            let _ = self.controller.send(input).await;
        })
    }

    fn status(&self, device: &str, status: TaskStatus) -> BoxFuture<'_, ()> {
        let input = Input::Report(device.to_string(), status);
        Box::pin(async move {
            let _ = self.controller.send(input).await;
        })
    }

    fn detached(&self, device: &str) -> BoxFuture<'_, ()> {
        let input = Input::Detached(device.to_string());
        Box::pin(async move {
            let _ = self.controller.send(input).await;
        })
    }

    fn output(&self, device: &str, chunk: &LogChunk) -> Result<(), &'static str> {
        self.logs
            .append(device, chunk)
            .map_err(|refused| match refused {
                Refused::BadTaskId => "log_bad_task_id",
                Refused::NotHolder => "log_not_held",
            })
    }

    fn stats(&self, device: &str, stats: &Stats, offer: &Offer) -> usize {
        let bound = Bound {
            millicores: u64::from(offer.millicores),
            memory: offer.memory_bytes,
        };
        let now = crate::domain::unix_ms();
        let holds = |task: &str| self.logs.holds(device, task);
        self.stats.record(stats, now, bound, holds)
    }

    fn usage(
        &self,
        device: &str,
        pool: &str,
        records: Vec<UsageRecord>,
        ack: AgentSender,
    ) -> BoxFuture<'_, ()> {
        let charged = Charged::Reported {
            device: device.to_string(),
            pool: pool.to_string(),
            records,
            ack,
        };
        Box::pin(async move {
            let _ = self.usage.send(charged).await;
        })
    }
}
