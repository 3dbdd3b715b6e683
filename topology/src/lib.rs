//! The machine as plain data.
//!
//! tier0 places work by locality: a data-plane worker should read from the NVMe drives and send
//! through the RDMA HCA that sit on its own NUMA node, and a hot extent should live on the node
//! whose drives and NIC sit nearest the GPUs that read it. Every such decision takes a
//! [`Machine`] as an argument, never the live system directly, so tests (and the cluster
//! simulator) can build any machine.
//!
//! - [`Machine`] is read once, from the live system or an hwloc XML export ([`discover`]).
//! - [`Distance`] ranks any two devices, or a device and a NUMA node, the way `nvidia-smi topo`
//!   does: same PCIe switch < same host bridge < same NUMA node < same package < across packages.
//! - [`WorkerPlan`] says, per NUMA node, which cores run data-plane workers and which drives,
//!   HCA and GPUs those workers use.

mod activity;
mod discover;
mod distance;
mod error;
mod feeds;
mod machine;
mod pci;
mod plan;
mod report;

pub use activity::{BUSY_PERCENT, GpuActivity, GpuMonitor, is_busy, parse_nvml_bus_id};
pub use discover::{discover_live, load_xml_file, load_xml_str};
pub use distance::{Distance, Locality, rank_by_distance};
pub use error::TopologyError;
pub use feeds::{GpuFeed, MachineFeeds, feeds};
pub use machine::{
    BlockDevice, BlockDeviceKind, Core, Gpu, Located, Machine, NetworkDevice, NumaNode, Placement,
    RdmaDevice,
};
pub use pci::{PciAddress, PcieHop};
pub use plan::{NumaWorkers, WorkerPlan, WorkerPolicy, plan_workers};
pub use report::{TopologyReport, render_text};
