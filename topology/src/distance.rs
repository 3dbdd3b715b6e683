use std::fmt;

use serde::{Deserialize, Serialize};

use crate::machine::{Located, NumaNode, Placement};

/// How far apart two things are in the machine, coarsest first.
///
/// The levels follow `nvidia-smi topo -m`: traffic between two devices under one PCIe switch
/// never reaches the CPU; under one host bridge it crosses the root complex; on one NUMA node
/// it crosses the node's internal fabric; across NUMA nodes of one package it crosses the
/// on-die interconnect; across packages it crosses the socket link (UPI, xGMI), the slowest
/// and most contended path.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Locality {
    /// Two functions of one physical PCI device (ports of one adapter).
    SameDevice,
    /// Below a shared PCIe switch or root port, without crossing the host bridge (PIX/PXB).
    PcieSwitch,
    /// Below the same host bridge (PHB).
    HostBridge,
    /// On the same NUMA node, through different host bridges (NODE).
    NumaNode,
    /// On different NUMA nodes of the same package (sub-NUMA clustering, AMD NPS).
    Package,
    /// Across packages, or where the machine does not say where a device is (SYS).
    System,
}

impl fmt::Display for Locality {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Locality::SameDevice => "same-device",
            Locality::PcieSwitch => "pcie-switch",
            Locality::HostBridge => "host-bridge",
            Locality::NumaNode => "numa-node",
            Locality::Package => "package",
            Locality::System => "system",
        })
    }
}

/// A [`Locality`] with a tie-break: the number of PCIe bridges on the route.
///
/// Ordering compares the locality first, so anything under a shared switch is nearer than
/// anything that crosses a host bridge, however many switch levels lie between.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Distance {
    pub locality: Locality,
    pub bridges: u32,
}

impl fmt::Display for Distance {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({} bridges)", self.locality, self.bridges)
    }
}

impl Placement {
    /// The distance between two devices.
    pub fn distance_to(&self, other: &Placement) -> Distance {
        let shared = self
            .pcie_path
            .iter()
            .zip(&other.pcie_path)
            .take_while(|(a, b)| a == b)
            .count();
        let own = self.pcie_path.len() - shared;
        let theirs = other.pcie_path.len() - shared;
        // The route climbs to the last shared bridge and back down: the unshared bridges of
        // both paths plus the meeting point itself.
        let bridges = u32::try_from(own + theirs + 1).unwrap_or(u32::MAX);

        if shared > 0 {
            if let (Some(a), Some(b)) = (self.pci_address, other.pci_address)
                && a.same_device(&b)
                && own == 0
                && theirs == 0
            {
                return Distance {
                    locality: Locality::SameDevice,
                    bridges: 0,
                };
            }
            let locality = if shared >= 2 {
                Locality::PcieSwitch
            } else {
                Locality::HostBridge
            };
            return Distance { locality, bridges };
        }

        // Different host bridges: the route goes through the CPU side of the machine.
        let bridges =
            u32::try_from(self.pcie_path.len() + other.pcie_path.len()).unwrap_or(u32::MAX);
        let locality = numa_locality(
            (self.numa_node, self.package),
            (other.numa_node, other.package),
        );
        Distance { locality, bridges }
    }

    /// The distance from this device to the CPUs and memory of a NUMA node.
    pub fn distance_to_numa_node(&self, node: &NumaNode) -> Distance {
        Distance {
            locality: numa_locality(
                (self.numa_node, self.package),
                (Some(node.os_index), node.package),
            ),
            bridges: u32::try_from(self.pcie_path.len()).unwrap_or(u32::MAX),
        }
    }
}

fn numa_locality(a: (Option<u32>, Option<u32>), b: (Option<u32>, Option<u32>)) -> Locality {
    match (a, b) {
        ((Some(node_a), _), (Some(node_b), _)) if node_a == node_b => Locality::NumaNode,
        ((_, Some(package_a)), (_, Some(package_b))) if package_a == package_b => Locality::Package,
        _ => Locality::System,
    }
}

/// `items` ordered nearest first from `from`, each with its distance; ties keep input order.
pub fn rank_by_distance<'a, T: Located>(
    items: &'a [T],
    from: &Placement,
) -> Vec<(&'a T, Distance)> {
    let mut ranked: Vec<_> = items
        .iter()
        .map(|item| (item, from.distance_to(item.placement())))
        .collect();
    ranked.sort_by_key(|(_, distance)| *distance);
    ranked
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pci::{PciAddress, PcieHop};

    fn host_bridge(first_bus: u8) -> PcieHop {
        PcieHop::HostBridge {
            domain: 0,
            first_bus,
            last_bus: first_bus + 0x10,
        }
    }

    fn bridge(bus: u8, device: u8) -> PcieHop {
        PcieHop::Bridge {
            address: PciAddress {
                domain: 0,
                bus,
                device,
                function: 0,
            },
        }
    }

    fn device(bus: u8, function: u8, numa: u32, package: u32, path: Vec<PcieHop>) -> Placement {
        Placement {
            pci_address: Some(PciAddress {
                domain: 0,
                bus,
                device: 0,
                function,
            }),
            numa_node: Some(numa),
            package: Some(package),
            pcie_path: path,
        }
    }

    #[test]
    fn levels_order_from_switch_to_system() {
        let switch = vec![host_bridge(0x10), bridge(0x10, 1), bridge(0x11, 0)];
        let gpu = device(
            0x12,
            0,
            0,
            0,
            [switch.clone(), vec![bridge(0x12, 0)]].concat(),
        );
        let nic = device(
            0x13,
            0,
            0,
            0,
            [switch.clone(), vec![bridge(0x12, 1)]].concat(),
        );
        let same_root = device(0x14, 0, 0, 0, vec![host_bridge(0x10), bridge(0x10, 2)]);
        let other_bridge = device(0x30, 0, 0, 0, vec![host_bridge(0x30), bridge(0x30, 1)]);
        let other_node = device(0x50, 0, 1, 0, vec![host_bridge(0x50)]);
        let other_socket = device(0x80, 0, 2, 1, vec![host_bridge(0x80)]);

        assert_eq!(gpu.distance_to(&nic).locality, Locality::PcieSwitch);
        assert_eq!(gpu.distance_to(&nic).bridges, 3);
        assert_eq!(gpu.distance_to(&same_root).locality, Locality::HostBridge);
        assert_eq!(gpu.distance_to(&other_bridge).locality, Locality::NumaNode);
        assert_eq!(gpu.distance_to(&other_node).locality, Locality::Package);
        assert_eq!(gpu.distance_to(&other_socket).locality, Locality::System);
        assert!(gpu.distance_to(&nic) < gpu.distance_to(&same_root));
        assert_eq!(
            gpu.distance_to(&nic),
            nic.distance_to(&gpu),
            "distance is symmetric"
        );
    }

    #[test]
    fn two_functions_of_one_adapter_are_the_same_device() {
        let path = vec![host_bridge(0x10), bridge(0x10, 1)];
        let port0 = device(0x11, 0, 0, 0, path.clone());
        let port1 = device(0x11, 1, 0, 0, path);
        assert_eq!(port0.distance_to(&port1).locality, Locality::SameDevice);
    }

    #[test]
    fn unknown_numa_node_counts_as_far() {
        let known = device(0x10, 0, 0, 0, vec![host_bridge(0x10)]);
        let unknown = Placement {
            pcie_path: vec![host_bridge(0x40)],
            ..Placement::default()
        };
        assert_eq!(known.distance_to(&unknown).locality, Locality::System);
    }
}
