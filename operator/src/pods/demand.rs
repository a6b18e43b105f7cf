//! What a pod asks of a device (pure): each container's requests and limits as Kubernetes
//! reads them, and the pod's total as the scheduler counts it, with the CPU ceiling its limits set.

use darkcore_proto::agent::v1::{Container as TaskContainer, Resources};
use k8s_openapi::api::core::v1::{Container, Pod};

pub use crate::domain::Demand;
use crate::domain::quantity::{cpu_millis, parse_memory};

/// A container's requests and limits. As in Kubernetes, a limit without a request makes the
/// request equal to the limit; unreadable quantities count as none.
pub fn container_resources(c: &Container) -> Resources {
    let resources = c.resources.as_ref();
    let quantity = |limits: bool, name: &str| {
        resources
            .and_then(|r| {
                if limits {
                    r.limits.as_ref()
                } else {
                    r.requests.as_ref()
                }
            })
            .and_then(|m| m.get(name))
            .map(|q| q.0.clone())
    };
    let millis = |limits, name| {
        quantity(limits, name)
            .and_then(|q| cpu_millis(&q))
            .unwrap_or(0)
            .min(u64::from(u32::MAX)) as u32
    };
    let bytes = |limits, name| {
        quantity(limits, name)
            .and_then(|q| parse_memory(&q))
            .unwrap_or(0)
    };
    let (limit_cpu, limit_memory) = (millis(true, "cpu"), bytes(true, "memory"));
    Resources {
        request_millicores: quantity(false, "cpu").map_or(limit_cpu, |_| millis(false, "cpu")),
        request_memory_bytes: quantity(false, "memory")
            .map_or(limit_memory, |_| bytes(false, "memory")),
        limit_millicores: limit_cpu,
        limit_memory_bytes: limit_memory,
    }
}

/// The demand of a pod whose containers and init containers have these resources.
pub fn demand(containers: &[Resources], init_containers: &[Resources]) -> Demand {
    let total = |f: fn(&Resources) -> u64| -> u64 {
        let regular = containers.iter().map(f).fold(0u64, u64::saturating_add);
        let init = init_containers.iter().map(f).max().unwrap_or(0);
        regular.max(init)
    };
    let limited = containers
        .iter()
        .chain(init_containers)
        .all(|r| r.limit_millicores > 0);
    Demand {
        millicores: total(|r| u64::from(r.request_millicores)),
        memory: total(|r| r.request_memory_bytes),
        cpu_limit: limited.then(|| total(|r| u64::from(r.limit_millicores))),
    }
}

/// The demand of a resolved pod, from its task's containers.
pub fn demand_of_task(containers: &[TaskContainer], init_containers: &[TaskContainer]) -> Demand {
    let of = |list: &[TaskContainer]| -> Vec<Resources> {
        list.iter().filter_map(|c| c.resources).collect()
    };
    demand(&of(containers), &of(init_containers))
}

/// The demand of a pod, from its spec.
pub fn demand_of(pod: &Pod) -> Demand {
    let Some(spec) = pod.spec.as_ref() else {
        return Demand::default();
    };
    let of = |list: &[Container]| list.iter().map(container_resources).collect::<Vec<_>>();
    demand(
        &of(&spec.containers),
        &of(spec.init_containers.as_deref().unwrap_or_default()),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn container(requests: &[(&str, &str)], limits: &[(&str, &str)]) -> Container {
        serde_json::from_value(serde_json::json!({
            "name": "c",
            "resources": {
                "requests": requests.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect::<std::collections::BTreeMap<_, _>>(),
                "limits": limits.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect::<std::collections::BTreeMap<_, _>>(),
            }
        }))
        .unwrap()
    }

    #[test]
    fn a_limit_without_a_request_is_the_request() {
        let r = container_resources(&container(&[("memory", "64Mi")], &[("cpu", "2")]));
        assert_eq!(r.request_millicores, 2000);
        assert_eq!(r.limit_millicores, 2000);
        assert_eq!(r.request_memory_bytes, 64 << 20);
        assert_eq!(r.limit_memory_bytes, 0);
    }

    #[test]
    fn a_pods_demand_is_the_larger_of_its_init_and_its_regular_containers() {
        let r = |request, limit| Resources {
            request_millicores: request,
            request_memory_bytes: u64::from(request) << 20,
            limit_millicores: limit,
            limit_memory_bytes: 0,
        };
        let d = demand(&[r(100, 200), r(300, 400)], &[r(500, 500)]);
        assert_eq!((d.millicores, d.memory), (500, 500 << 20));
        assert_eq!(d.cpu_limit, Some(600));
        let unlimited = demand(&[r(100, 200), r(300, 0)], &[]);
        assert_eq!(unlimited.cpu_limit, None, "one container without a limit");
        assert_eq!(
            demand(&[], &[]),
            Demand {
                cpu_limit: Some(0),
                ..Default::default()
            }
        );
    }
}
