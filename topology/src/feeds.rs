//! How directly each GPU of a machine can be fed with data: the nearest drive and the nearest
//! NIC, by the distance model. A GPU under the same PCIe switch as an NVMe drive and a NIC
//! reads local chunks without touching the CPU's root complex, and remote ones straight from
//! the NIC; one across the socket link pays on every byte. The control plane's placement
//! scores nodes for a hot extent from these (`control/src/orchestration.rs`).

use serde::{Deserialize, Serialize};

use crate::distance::{Distance, Locality};
use crate::machine::{BlockDeviceKind, Machine, Placement};

impl Locality {
    /// A cost per byte moved at this distance, for scoring: 0 (same device) to 5 (across
    /// packages). Linear on purpose: the levels are ordered, their ratios vary by machine.
    pub fn cost(self) -> u32 {
        match self {
            Locality::SameDevice => 0,
            Locality::PcieSwitch => 1,
            Locality::HostBridge => 2,
            Locality::NumaNode => 3,
            Locality::Package => 4,
            Locality::System => 5,
        }
    }
}

/// One GPU and how near its feeds are.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct GpuFeed {
    /// The GPU's index in the machine's PCI order (as `nvidia-smi` numbers them).
    pub index: u32,
    pub numa_node: Option<u32>,
    /// The nearest drive (NVMe first; any disk if there is none): `None` without drives.
    pub drive: Option<Distance>,
    /// The nearest RDMA NIC, else the nearest network device: `None` without either.
    pub nic: Option<Distance>,
}

/// A machine's GPUs' feeds, and how near its drives sit to its NICs (the path a chunk takes
/// when this node serves a GPU on another node).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MachineFeeds {
    pub gpus: Vec<GpuFeed>,
    /// The nearest drive–NIC pair: `None` without drives or NICs.
    pub drive_to_nic: Option<Distance>,
}

/// The feeds of every GPU of `machine`.
pub fn feeds(machine: &Machine) -> MachineFeeds {
    let nvme: Vec<&Placement> = machine
        .block_devices
        .iter()
        .filter(|drive| drive.kind == BlockDeviceKind::Nvme)
        .map(|drive| &drive.placement)
        .collect();
    let drives: Vec<&Placement> = if nvme.is_empty() {
        machine
            .block_devices
            .iter()
            .filter(|drive| drive.kind == BlockDeviceKind::Disk)
            .map(|drive| &drive.placement)
            .collect()
    } else {
        nvme
    };
    let nics: Vec<&Placement> = if machine.rdma_devices.is_empty() {
        machine
            .network_devices
            .iter()
            .map(|nic| &nic.placement)
            .collect()
    } else {
        machine
            .rdma_devices
            .iter()
            .map(|nic| &nic.placement)
            .collect()
    };
    let nearest =
        |from: &Placement, to: &[&Placement]| to.iter().map(|other| from.distance_to(other)).min();
    let gpus = machine
        .gpus
        .iter()
        .enumerate()
        .map(|(index, gpu)| GpuFeed {
            index: index as u32,
            numa_node: gpu.placement.numa_node,
            drive: nearest(&gpu.placement, &drives),
            nic: nearest(&gpu.placement, &nics),
        })
        .collect();
    let drive_to_nic = drives
        .iter()
        .filter_map(|drive| nearest(drive, &nics))
        .min();
    MachineFeeds { gpus, drive_to_nic }
}
