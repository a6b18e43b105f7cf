//! One kubelet API endpoint per virtual node: each node the operator publishes gets a port of
//! its own from `--kubelet-port` on, so that the API server's calls to a node reach that node.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};

use tokio::task::JoinHandle;

use crate::kubelet::KubeletServer;
use crate::pool::node_status::{KubeletEndpoint, KubeletEndpoints, NoFreePort};

/// The ports a node's endpoint may take, in the order they are tried: the one it publishes
/// (when in range and not another node's), then the range from its start. `count` 0 stands
/// for one port; a range past 65535 ends there.
pub fn candidates(first: u16, count: u16, published: Option<i32>, taken: &[u16]) -> Vec<u16> {
    let last = first.saturating_add(count.max(1) - 1);
    let published = published
        .and_then(|p| u16::try_from(p).ok())
        .filter(|p| (first..=last).contains(p));
    published
        .into_iter()
        .chain((first..=last).filter(move |p| Some(*p) != published))
        .filter(|p| !taken.contains(p))
        .collect()
}

/// A node's open endpoint: its port, and the task serving it (stopped when closed).
struct Open {
    port: u16,
    serving: JoinHandle<()>,
}

impl Drop for Open {
    fn drop(&mut self) {
        self.serving.abort();
    }
}

/// The operator's node endpoints, bound on `bind` and published as `address`.
pub struct NodeEndpoints {
    server: Arc<KubeletServer>,
    bind: IpAddr,
    address: String,
    /// The range: from `first`, `count` ports. `first` 0: any free port the system gives.
    first: u16,
    count: u16,
    open: Mutex<HashMap<String, Open>>,
}

impl NodeEndpoints {
    pub fn new(
        server: Arc<KubeletServer>,
        bind: IpAddr,
        address: String,
        first: u16,
        count: u16,
    ) -> NodeEndpoints {
        NodeEndpoints {
            server,
            bind,
            address,
            first,
            count,
            open: Mutex::default(),
        }
    }

    /// Binds a listener for `node`: the first port of its candidates that is free.
    fn bind(&self, node: &str, published: Option<i32>, taken: &[u16]) -> Option<Open> {
        let ports: Vec<u16> = match self.first {
            0 => vec![0],
            first => candidates(first, self.count, published, taken),
        };
        for port in ports {
            let Ok(listener) = std::net::TcpListener::bind(SocketAddr::new(self.bind, port)) else {
                continue;
            };
            let bound = listener.local_addr().map(|a| a.port()).unwrap_or(port);
            let listener = listener
                .set_nonblocking(true)
                .and_then(|()| tokio::net::TcpListener::from_std(listener));
            let Ok(listener) = listener else {
                continue;
            };
            tracing::info!(%node, port = bound, "kubelet API of the node listening");
            let serving = tokio::spawn(self.server.clone().serve(listener, node.into()));
            return Some(Open {
                port: bound,
                serving,
            });
        }
        None
    }
}

impl KubeletEndpoints for NodeEndpoints {
    fn open(&self, node: &str, current_port: Option<i32>) -> Result<KubeletEndpoint, NoFreePort> {
        let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        // Nothing supervises a node's listener but this: each reconcile of its pool (at least
        // every minute) opens it again if its task has ended.
        if open.get(node).is_some_and(|o| o.serving.is_finished()) {
            tracing::warn!(%node, "the node's kubelet API listener ended; opening it again");
            open.remove(node);
        }
        let port = match open.get(node) {
            Some(endpoint) => endpoint.port,
            None => {
                let taken: Vec<u16> = open.values().map(|o| o.port).collect();
                let endpoint = self
                    .bind(node, current_port, &taken)
                    .ok_or_else(|| NoFreePort {
                        node: node.to_string(),
                        first: self.first,
                        last: self.first.saturating_add(self.count.max(1) - 1),
                    })?;
                let port = endpoint.port;
                open.insert(node.to_string(), endpoint);
                port
            }
        };
        Ok(KubeletEndpoint {
            address: self.address.clone(),
            port: i32::from(port),
        })
    }

    fn close(&self, node: &str) {
        let closed = self
            .open
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(node);
        if let Some(closed) = closed {
            tracing::info!(%node, port = closed.port, "kubelet API of the node closed");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_node_keeps_its_published_port_and_others_take_the_first_free_ones() {
        let all = |published, taken: &[u16]| candidates(10250, 4, published, taken);
        assert_eq!(all(None, &[]), [10250, 10251, 10252, 10253]);
        assert_eq!(all(Some(10252), &[]), [10252, 10250, 10251, 10253]);
        assert_eq!(all(Some(10252), &[10250, 10252]), [10251, 10253]);
        assert_eq!(
            all(Some(9999), &[]),
            [10250, 10251, 10252, 10253],
            "out of range: ignored"
        );
        assert_eq!(all(Some(-1), &[10250]), [10251, 10252, 10253]);
        assert_eq!(candidates(10250, 0, None, &[]), [10250]);
        assert_eq!(candidates(65534, 100, None, &[]), [65534, 65535]);
    }
}
