//! One pod watch per darkcore node (`spec.nodeName=<node>`), started and stopped as pools
//! publish and remove nodes, so the operator never lists pods that are not its own.

use std::collections::HashMap;

use futures::StreamExt;
use k8s_openapi::api::core::v1::{Node, Pod};
use kube::runtime::reflector::Store;
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client, ResourceExt};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::pods::controller::Input;

/// Keeps a watch running for every node in `nodes`, feeding `inbox`.
pub async fn follow_nodes(client: Client, nodes: Store<Node>, inbox: mpsc::Sender<Input>) {
    let mut watches: HashMap<String, JoinHandle<()>> = HashMap::new();
    let mut tick = tokio::time::interval(std::time::Duration::from_millis(500));
    loop {
        tick.tick().await;
        let names: Vec<String> = nodes.state().iter().map(|n| n.name_any()).collect();
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
