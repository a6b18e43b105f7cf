//! One pod watch per node of the pools this operator serves (`spec.nodeName=<node>`), started
//! and stopped as pools publish and remove nodes, so the operator never sees pods not its own
//! (nor those of another operator's pools, when pools are sharded by label selector).

use std::collections::HashMap;

use darkcore_crds::DevicePool;
use futures::StreamExt;
use k8s_openapi::api::core::v1::{Node, Pod};
use kube::runtime::reflector::Store;
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client, ResourceExt};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::pods::controller::Input;
use crate::pool::POOL_LABEL;

/// Keeps a watch running for every node in `nodes` that belongs to a pool in `pools`, feeding
/// `inbox`.
pub async fn follow_nodes(
    client: Client,
    pools: Store<DevicePool>,
    nodes: Store<Node>,
    inbox: mpsc::Sender<Input>,
) {
    let mut watches: HashMap<String, JoinHandle<()>> = HashMap::new();
    let mut tick = tokio::time::interval(std::time::Duration::from_millis(500));
    loop {
        tick.tick().await;
        let served: Vec<String> = pools.state().iter().map(|p| p.name_any()).collect();
        let names: Vec<String> = nodes
            .state()
            .iter()
            .filter(|n| {
                n.labels()
                    .get(POOL_LABEL)
                    .is_some_and(|p| served.contains(p))
            })
            .map(|n| n.name_any())
            .collect();
        for name in &names {
            if !watches.contains_key(name) {
                tracing::debug!(node = %name, "watching the node's pods");
                watches.insert(
                    name.clone(),
                    tokio::spawn(watch_node(client.clone(), name.clone(), inbox.clone())),
                );
            }
        }
        watches.retain(|name, handle| {
            let keep = names.contains(name);
            if !keep {
                handle.abort();
            }
            keep
        });
    }
}

async fn watch_node(client: Client, node: String, inbox: mpsc::Sender<Input>) {
    let pods: Api<Pod> = Api::all(client);
    let config = watcher::Config::default().fields(&format!("spec.nodeName={node}"));
    let mut events = std::pin::pin!(watcher(pods, config).default_backoff());
    let mut listed = Vec::new();
    while let Some(event) = events.next().await {
        let input = match event {
            Ok(watcher::Event::Apply(pod)) => Input::PodApplied(pod),
            Ok(watcher::Event::Delete(pod)) => Input::PodDeleted(pod),
            Ok(watcher::Event::Init) => {
                listed.clear();
                continue;
            }
            Ok(watcher::Event::InitApply(pod)) => {
                listed.push(pod);
                continue;
            }
            Ok(watcher::Event::InitDone) => {
                Input::NodeListed(node.clone(), std::mem::take(&mut listed))
            }
            Err(error) => {
                tracing::warn!(%node, %error, "watching the node's pods");
                continue;
            }
        };
        if inbox.send(input).await.is_err() {
            return;
        }
    }
}
