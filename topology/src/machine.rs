use serde::{Deserialize, Serialize};

use crate::pci::{PciAddress, PcieHop};

/// One machine: its NUMA nodes and the devices tier0 cares about, each with its locality.
///
/// Plain data on purpose: discovery fills it once, and every placement function takes it as
/// an argument, so tests build any machine by hand or from an hwloc XML export.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Machine {
    /// Where the description came from: `live` or the XML file's path.
    pub source: String,
    /// Host name as hwloc recorded it, when it did.
    pub hostname: Option<String>,
    /// DMI product name (for example `NVIDIA DGX-2H`), when known.
    pub product: Option<String>,
    pub numa_nodes: Vec<NumaNode>,
    /// Physical GPUs, one entry per PCI function whatever number of OS devices
    /// (CUDA, NVML, OpenCL, DRM) name it.
    pub gpus: Vec<Gpu>,
    pub rdma_devices: Vec<RdmaDevice>,
    pub block_devices: Vec<BlockDevice>,
    /// Network interfaces that are not the netdev of an RDMA device.
    pub network_devices: Vec<NetworkDevice>,
}

impl Machine {
    pub fn numa_node(&self, os_index: u32) -> Option<&NumaNode> {
        self.numa_nodes
            .iter()
            .find(|node| node.os_index == os_index)
    }

    pub fn gpu(&self, pci_address: PciAddress) -> Option<&Gpu> {
        self.gpus.iter().find(|gpu| gpu.pci_address == pci_address)
    }

    pub fn rdma_device(&self, name: &str) -> Option<&RdmaDevice> {
        self.rdma_devices.iter().find(|device| device.name == name)
    }

    pub fn block_device(&self, name: &str) -> Option<&BlockDevice> {
        self.block_devices.iter().find(|device| device.name == name)
    }

    /// GPUs attached to the given NUMA node.
    pub fn gpus_on_numa_node(&self, os_index: u32) -> impl Iterator<Item = &Gpu> {
        self.gpus
            .iter()
            .filter(move |gpu| gpu.placement.numa_node == Some(os_index))
    }
}

/// A NUMA node: a set of CPUs and the memory local to them.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NumaNode {
    /// The kernel's node number (`/sys/devices/system/node/nodeN`).
    pub os_index: u32,
    /// The CPU package (socket) this node belongs to, when known.
    pub package: Option<u32>,
    /// OS indexes of the logical CPUs (hardware threads) of this node, ascending.
    pub cpus: Vec<u32>,
    /// Physical cores of this node, each with its hardware threads.
    pub cores: Vec<Core>,
    pub memory_bytes: u64,
}

/// A physical core and its hardware threads (logical CPUs), by OS index.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Core {
    pub cpus: Vec<u32>,
}

/// Where a device hangs in the machine: its NUMA node, package and PCIe path.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Placement {
    /// The device's PCI function, when it is a PCI device.
    pub pci_address: Option<PciAddress>,
    /// The NUMA node the device is attached to; `None` when the machine does not say
    /// (a device hanging off the whole machine on a multi-node system).
    pub numa_node: Option<u32>,
    pub package: Option<u32>,
    /// Bridges from the host bridge down to (not including) the device.
    pub pcie_path: Vec<PcieHop>,
}

/// Anything with a [`Placement`], so distance queries work on every device kind.
pub trait Located {
    fn placement(&self) -> &Placement;
    /// A name a person recognizes: the kernel name, or the PCI address for GPUs.
    fn label(&self) -> String;
}

/// A GPU (or other compute accelerator), counted once per PCI function.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Gpu {
    /// The stable name of a GPU is its PCI address: CUDA and NVML indexes can differ.
    pub pci_address: PciAddress,
    pub vendor: Option<String>,
    pub model: Option<String>,
    /// NVIDIA's `GPU-…` UUID, when NVML reported it.
    pub uuid: Option<String>,
    /// The OS devices that name this GPU (`cuda0`, `nvml0`, `card1`, `opencl0d0`, …).
    pub os_devices: Vec<String>,
    #[serde(flatten)]
    pub placement: Placement,
}

/// An RDMA-capable adapter as the verbs library names it (`mlx5_0`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RdmaDevice {
    pub name: String,
    /// The network interfaces of the same PCI function (`ib0`, `ens1f0`).
    pub netdevs: Vec<String>,
    pub node_guid: Option<String>,
    #[serde(flatten)]
    pub placement: Placement,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BlockDeviceKind {
    /// An NVMe namespace: the drives tier0 is built for.
    Nvme,
    /// Any other disk (SATA, SAS, virtio).
    Disk,
    /// Tapes, removable media and devices hwloc does not classify.
    Other,
}

/// A block device (`nvme0n1`, `sda`, `vda`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockDevice {
    pub name: String,
    pub kind: BlockDeviceKind,
    pub size_bytes: Option<u64>,
    pub model: Option<String>,
    #[serde(flatten)]
    pub placement: Placement,
}

/// A network interface that is not part of an RDMA device (TCP transport candidates).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetworkDevice {
    pub name: String,
    pub address: Option<String>,
    #[serde(flatten)]
    pub placement: Placement,
}

impl Located for Gpu {
    fn placement(&self) -> &Placement {
        &self.placement
    }
    fn label(&self) -> String {
        self.pci_address.to_string()
    }
}

impl Located for RdmaDevice {
    fn placement(&self) -> &Placement {
        &self.placement
    }
    fn label(&self) -> String {
        self.name.clone()
    }
}

impl Located for BlockDevice {
    fn placement(&self) -> &Placement {
        &self.placement
    }
    fn label(&self) -> String {
        self.name.clone()
    }
}

impl Located for NetworkDevice {
    fn placement(&self) -> &Placement {
        &self.placement
    }
    fn label(&self) -> String {
        self.name.clone()
    }
}
