//! What `tier0 topology` prints.

use std::fmt::Write as _;

use serde::Serialize;

use crate::machine::{Located, Machine};
use crate::plan::WorkerPlan;

/// The JSON form: the machine's fields at the top level, plus the worker plan.
#[derive(Debug, Serialize)]
pub struct TopologyReport<'a> {
    #[serde(flatten)]
    pub machine: &'a Machine,
    pub worker_plan: &'a WorkerPlan,
}

/// A compact CPU list as the kernel writes one: `0-7,16-23`.
fn cpu_list(cpus: &[u32]) -> String {
    let mut sorted = cpus.to_vec();
    sorted.sort_unstable();
    sorted.dedup();
    let mut ranges: Vec<(u32, u32)> = Vec::new();
    for cpu in sorted {
        match ranges.last_mut() {
            Some((_, end)) if *end + 1 == cpu => *end = cpu,
            _ => ranges.push((cpu, cpu)),
        }
    }
    ranges
        .iter()
        .map(|&(start, end)| {
            if start == end {
                start.to_string()
            } else {
                format!("{start}-{end}")
            }
        })
        .collect::<Vec<_>>()
        .join(",")
}

fn gib(bytes: u64) -> String {
    format!("{:.1} GiB", bytes as f64 / (1u64 << 30) as f64)
}

fn device_line<T: Located>(out: &mut String, what: &str, device: &T, detail: &str) {
    let placement = device.placement();
    let _ = write!(out, "    {what:<6} {:<14}", device.label());
    if let Some(address) = placement
        .pci_address
        .filter(|address| address.to_string() != device.label())
    {
        let _ = write!(out, " pci {address}");
    }
    let _ = writeln!(out, "{detail}");
}

/// The human form: per NUMA node its CPUs, memory and devices, then the worker plan.
pub fn render_text(machine: &Machine, plan: &WorkerPlan) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "machine: {} ({})",
        machine
            .product
            .as_deref()
            .or(machine.hostname.as_deref())
            .unwrap_or("unnamed"),
        machine.source
    );
    let _ = writeln!(
        out,
        "{} NUMA nodes, {} GPUs, {} RDMA devices, {} block devices",
        machine.numa_nodes.len(),
        machine.gpus.len(),
        machine.rdma_devices.len(),
        machine.block_devices.len()
    );

    let mut sections: Vec<Option<u32>> = machine
        .numa_nodes
        .iter()
        .map(|node| Some(node.os_index))
        .collect();
    sections.push(None);
    for section in sections {
        let on = |numa: Option<u32>| numa == section;
        let gpus: Vec<_> = machine
            .gpus
            .iter()
            .filter(|gpu| on(gpu.placement.numa_node))
            .collect();
        let rdma: Vec<_> = machine
            .rdma_devices
            .iter()
            .filter(|device| on(device.placement.numa_node))
            .collect();
        let drives: Vec<_> = machine
            .block_devices
            .iter()
            .filter(|device| on(device.placement.numa_node))
            .collect();
        let nics: Vec<_> = machine
            .network_devices
            .iter()
            .filter(|device| on(device.placement.numa_node))
            .collect();
        match section.and_then(|index| machine.numa_node(index)) {
            Some(node) => {
                let package = node
                    .package
                    .map_or(String::new(), |package| format!(", package {package}"));
                let _ = writeln!(
                    out,
                    "NUMA node {}{package}: cpus {} ({} cores), memory {}",
                    node.os_index,
                    cpu_list(&node.cpus),
                    node.cores.len(),
                    gib(node.memory_bytes)
                );
            }
            None if gpus.is_empty() && rdma.is_empty() && drives.is_empty() && nics.is_empty() => {
                continue;
            }
            None => {
                let _ = writeln!(out, "devices with no NUMA node:");
            }
        }
        for gpu in gpus {
            let model = gpu.model.as_deref().unwrap_or("unknown model");
            let names = if gpu.os_devices.is_empty() {
                String::new()
            } else {
                format!(" ({})", gpu.os_devices.join(", "))
            };
            device_line(&mut out, "gpu", gpu, &format!("  {model}{names}"));
        }
        for device in rdma {
            let netdevs = if device.netdevs.is_empty() {
                String::new()
            } else {
                format!("  netdev {}", device.netdevs.join(", "))
            };
            device_line(&mut out, "rdma", device, &netdevs);
        }
        for drive in drives {
            let size = drive
                .size_bytes
                .map_or(String::new(), |bytes| format!(", {}", gib(bytes)));
            device_line(
                &mut out,
                "block",
                drive,
                &format!("  {:?}{size}", drive.kind),
            );
        }
        for nic in nics {
            device_line(&mut out, "net", nic, "");
        }
    }

    let _ = writeln!(
        out,
        "worker plan: {} workers on {} NUMA nodes",
        plan.worker_count(),
        plan.numa_nodes.len()
    );
    for workers in &plan.numa_nodes {
        let rdma = match (&workers.rdma_device, workers.rdma_locality) {
            (Some(device), Some(locality)) => format!("{device} ({locality})"),
            _ => "none (TCP)".to_string(),
        };
        let drives = if workers.block_devices.is_empty() {
            "none".to_string()
        } else {
            workers.block_devices.join(", ")
        };
        let _ = writeln!(
            out,
            "  node {}: workers on cpus {}; rdma {rdma}; drives {drives}; {} local GPUs",
            workers.numa_node,
            cpu_list(&workers.worker_cpus),
            workers.gpus.len()
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::cpu_list;

    #[test]
    fn cpu_lists_collapse_into_ranges() {
        assert_eq!(cpu_list(&[0, 1, 2, 3, 8, 10, 11]), "0-3,8,10-11");
        assert_eq!(cpu_list(&[5]), "5");
        assert_eq!(cpu_list(&[]), "");
    }
}
