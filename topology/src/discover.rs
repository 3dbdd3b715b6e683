//! Reading a [`Machine`] from hwloc: the live system or an XML export.
//!
//! hwloc is the only source of truth for locality that works the same on every Linux machine
//! (and reads the XML exports of machines we do not have). Everything hwloc-specific stays in
//! this file; the rest of tier0 sees only the plain structs of [`crate::machine`].

use std::ffi::CStr;
use std::path::Path;

use hwlocality::Topology;
use hwlocality::object::TopologyObject;
use hwlocality::object::attributes::{DownstreamAttributes, ObjectAttributes};
use hwlocality::object::types::{BridgeType, OSDeviceType, ObjectType};
use hwlocality::topology::builder::{TopologyBuilder, TypeFilter};

use crate::error::TopologyError;
use crate::machine::{
    BlockDevice, BlockDeviceKind, Core, Gpu, Machine, NetworkDevice, NumaNode, Placement,
    RdmaDevice,
};
use crate::pci::{PciAddress, PcieHop};

/// PCI class of a 3D controller: how NVIDIA data-center GPUs present themselves. Unlike a
/// VGA controller (0x0300), which is as often the BMC's display as a GPU, it always is one.
const PCI_CLASS_3D_CONTROLLER: u16 = 0x0302;
/// PCI class of an NVM Express controller.
const PCI_CLASS_NVME: u16 = 0x0108;

/// Reads the machine this process runs on.
pub fn discover_live() -> Result<Machine, TopologyError> {
    let origin = "live".to_string();
    let builder = Topology::builder();
    let topology = build(builder, &origin)?;
    Ok(machine_from(&topology, origin))
}

/// Reads an hwloc XML export (`lstopo machine.xml`, or the exports in `shared/topologies/`).
///
/// A missing, unreadable or malformed file is an error naming the file; hwloc is only handed
/// a file this function has already read, because hwloc's own loader panics on a missing one.
pub fn load_xml_file(path: &Path) -> Result<Machine, TopologyError> {
    let text = match std::fs::read(path) {
        Ok(bytes) => bytes,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => {
            return Err(TopologyError::FileNotFound {
                path: path.to_path_buf(),
            });
        }
        Err(source) => {
            return Err(TopologyError::FileUnreadable {
                path: path.to_path_buf(),
                source,
            });
        }
    };
    let origin = path.display().to_string();
    let text = String::from_utf8(text).map_err(|_| TopologyError::Malformed {
        origin: origin.clone(),
        reason: "the file is not UTF-8 text".to_string(),
    })?;
    load_xml(&text, origin)
}

/// Reads an hwloc XML topology held in memory.
pub fn load_xml_str(xml: &str) -> Result<Machine, TopologyError> {
    load_xml(xml, "xml".to_string())
}

fn load_xml(xml: &str, origin: String) -> Result<Machine, TopologyError> {
    let malformed = |reason: &str| TopologyError::Malformed {
        origin: origin.clone(),
        reason: reason.to_string(),
    };
    if xml.trim().is_empty() {
        return Err(malformed("the document is empty"));
    }
    if xml.contains('\0') {
        return Err(malformed("the document contains a NUL byte"));
    }
    if !xml.contains("<topology") {
        return Err(malformed("there is no <topology> element"));
    }
    let builder = Topology::builder()
        .from_xml(xml)
        .map_err(|error| malformed(&error.to_string()))?;
    // hwloc validates the document only while loading it, and says no more than EINVAL.
    let topology = build(builder, &origin).map_err(|error| match error {
        TopologyError::Hwloc { .. } => {
            malformed("hwloc rejected it: truncated, or not in hwloc's XML format")
        }
        other => other,
    })?;
    Ok(machine_from(&topology, origin))
}

fn build(builder: TopologyBuilder, origin: &str) -> Result<Topology, TopologyError> {
    let hwloc_error = |operation: &'static str, message: String| TopologyError::Hwloc {
        origin: origin.to_string(),
        operation,
        message,
    };
    builder
        // PCI devices, bridges and OS devices are dropped by default: keep them all, since
        // locality is what tier0 wants from hwloc.
        .with_io_type_filter(TypeFilter::KeepAll)
        .map_err(|error| hwloc_error("set_io_types_filter", error.to_string()))?
        .build()
        .map_err(|error| hwloc_error("topology_load", error.to_string()))
}

fn text(value: Option<&CStr>) -> Option<String> {
    value
        .map(|value| value.to_string_lossy().trim().to_string())
        .filter(|value| !value.is_empty())
}

fn info(object: &TopologyObject, key: &str) -> Option<String> {
    text(object.info(key))
}

fn name(object: &TopologyObject) -> String {
    text(object.name()).unwrap_or_default()
}

fn to_u32(index: impl Into<usize>) -> u32 {
    u32::try_from(index.into()).unwrap_or(u32::MAX)
}

fn machine_from(topology: &Topology, source: String) -> Machine {
    let root = topology.root_object();
    let mut machine = Machine {
        source,
        hostname: info(root, "HostName"),
        product: info(root, "DMIProductName"),
        numa_nodes: numa_nodes(topology),
        ..Machine::default()
    };

    for pci in topology.pci_devices() {
        let Some(ObjectAttributes::PCIDevice(attributes)) = pci.attributes() else {
            continue;
        };
        let address = PciAddress {
            domain: attributes.domain().into(),
            bus: attributes.bus_id(),
            device: attributes.bus_device(),
            function: attributes.function(),
        };
        let placement = placement_of(pci, Some(address));
        let os_devices: Vec<&TopologyObject> = pci
            .io_children()
            .filter(|child| child.object_type() == ObjectType::OSDevice)
            .collect();

        let is_gpu = attributes.class_id() == PCI_CLASS_3D_CONTROLLER
            || os_devices.iter().any(|device| is_compute_device(device));
        if is_gpu {
            machine.gpus.push(Gpu {
                pci_address: address,
                vendor: first_info(&os_devices, "GPUVendor").or_else(|| info(pci, "PCIVendor")),
                model: first_info(&os_devices, "GPUModel").or_else(|| info(pci, "PCIDevice")),
                uuid: first_info(&os_devices, "NVIDIAUUID"),
                os_devices: os_devices.iter().map(|device| name(device)).collect(),
                placement: placement.clone(),
            });
        }

        let netdevs: Vec<&TopologyObject> = os_devices
            .iter()
            .copied()
            .filter(|device| os_device_type(device) == Some(OSDeviceType::Network))
            .collect();
        let mut has_rdma = false;
        for device in &os_devices {
            match os_device_type(device) {
                Some(OSDeviceType::OpenFabrics) => {
                    has_rdma = true;
                    machine.rdma_devices.push(RdmaDevice {
                        name: name(device),
                        netdevs: netdevs.iter().map(|netdev| name(netdev)).collect(),
                        node_guid: info(device, "NodeGUID"),
                        placement: placement.clone(),
                    });
                }
                Some(OSDeviceType::Storage) => {
                    machine.block_devices.push(block_device(
                        device,
                        attributes.class_id(),
                        placement.clone(),
                    ));
                }
                _ => {}
            }
        }
        if !has_rdma {
            for netdev in netdevs {
                machine.network_devices.push(NetworkDevice {
                    name: name(netdev),
                    address: info(netdev, "Address"),
                    placement: placement.clone(),
                });
            }
        }
    }

    // Block devices outside PCI (NVMe over fabrics, device-mapper, some virtual disks) still
    // count, with whatever locality hwloc gives them.
    for device in topology.os_devices() {
        let outside_pci = device
            .parent()
            .is_none_or(|parent| parent.object_type() != ObjectType::PCIDevice);
        if outside_pci && os_device_type(device) == Some(OSDeviceType::Storage) {
            let placement = placement_of(device, None);
            machine
                .block_devices
                .push(block_device(device, 0, placement));
        }
    }

    machine.gpus.sort_by_key(|gpu| gpu.pci_address);
    machine.rdma_devices.sort_by(|a, b| a.name.cmp(&b.name));
    machine
        .block_devices
        .sort_by_key(|device| natural_key(&device.name));
    machine
        .network_devices
        .sort_by_key(|device| natural_key(&device.name));
    machine
}

/// Orders `nvme2n1` before `nvme10n1`.
fn natural_key(name: &str) -> Vec<(String, u64)> {
    let mut key = Vec::new();
    let mut letters = String::new();
    let mut digits = String::new();
    for character in name.chars() {
        if character.is_ascii_digit() {
            digits.push(character);
        } else {
            if !digits.is_empty() {
                key.push((
                    std::mem::take(&mut letters),
                    digits.parse().unwrap_or(u64::MAX),
                ));
                digits.clear();
            }
            letters.push(character);
        }
    }
    key.push((letters, digits.parse().unwrap_or(0)));
    key
}

fn os_device_type(object: &TopologyObject) -> Option<OSDeviceType> {
    match object.attributes() {
        Some(ObjectAttributes::OSDevice(attributes)) => Some(attributes.device_type()),
        _ => None,
    }
}

fn first_info(devices: &[&TopologyObject], key: &str) -> Option<String> {
    devices.iter().find_map(|device| info(device, key))
}

/// True for OS devices that run compute kernels: CUDA, NVML, OpenCL (GPU type), ROCm SMI,
/// Level Zero. A DRM card alone does not make a GPU: servers' BMCs have one too.
fn is_compute_device(device: &TopologyObject) -> bool {
    let device_name = name(device);
    match os_device_type(device) {
        Some(OSDeviceType::CoProcessor) => {
            info(device, "OpenCLDeviceType").is_none_or(|kind| kind == "GPU")
        }
        Some(OSDeviceType::GPU) => {
            !(device_name.starts_with("card")
                || device_name.starts_with("renderD")
                || device_name.starts_with("controlD"))
        }
        _ => false,
    }
}

fn block_device(device: &TopologyObject, pci_class: u16, placement: Placement) -> BlockDevice {
    let device_name = name(device);
    let subtype = text(device.subtype()).unwrap_or_default();
    let kind = if pci_class == PCI_CLASS_NVME || device_name.starts_with("nvme") {
        BlockDeviceKind::Nvme
    } else if matches!(subtype.as_str(), "" | "Disk" | "NVM") {
        BlockDeviceKind::Disk
    } else {
        BlockDeviceKind::Other
    };
    BlockDevice {
        name: device_name,
        kind,
        // hwloc reports the size in KiB.
        size_bytes: info(device, "Size")
            .and_then(|size| size.parse::<u64>().ok())
            .map(|kib| kib.saturating_mul(1024)),
        model: info(device, "Model"),
        placement,
    }
}

fn numa_nodes(topology: &Topology) -> Vec<NumaNode> {
    let cores: Vec<&TopologyObject> = topology.objects_with_type(ObjectType::Core).collect();
    let mut nodes: Vec<NumaNode> = topology
        .objects_with_type(ObjectType::NUMANode)
        .map(|node| {
            let cpus: Vec<u32> = node
                .cpuset()
                .map(|set| set.iter_set().map(to_u32).collect())
                .unwrap_or_default();
            let mut node_cores: Vec<Core> = cores
                .iter()
                .filter_map(|core| {
                    let core_cpus: Vec<u32> = core.cpuset()?.iter_set().map(to_u32).collect();
                    (!core_cpus.is_empty() && core_cpus.iter().all(|cpu| cpus.contains(cpu)))
                        .then_some(Core { cpus: core_cpus })
                })
                .collect();
            // Some exports have no Core objects: every logical CPU is then its own core.
            if node_cores.is_empty() {
                node_cores = cpus.iter().map(|&cpu| Core { cpus: vec![cpu] }).collect();
            }
            let memory_bytes = match node.attributes() {
                Some(ObjectAttributes::NUMANode(attributes)) => {
                    attributes.local_memory().map_or(0, |bytes| bytes.get())
                }
                _ => 0,
            };
            NumaNode {
                os_index: node.os_index().map_or(u32::MAX, to_u32),
                package: package_of(node),
                cpus,
                cores: node_cores,
                memory_bytes,
            }
        })
        .collect();
    nodes.sort_by_key(|node| node.os_index);
    nodes
}

fn package_of(object: &TopologyObject) -> Option<u32> {
    std::iter::once(object)
        .chain(object.ancestors())
        .find(|ancestor| ancestor.object_type() == ObjectType::Package)
        .and_then(|package| package.os_index())
        .map(to_u32)
}

fn placement_of(object: &TopologyObject, pci_address: Option<PciAddress>) -> Placement {
    // I/O objects hang off the normal object (package, group, machine) whose memory they are
    // closest to; its node set names the NUMA node, unless it spans several.
    let anchor = object.first_non_io_ancestor();
    let numa_node = anchor
        .and_then(|anchor| anchor.nodeset())
        .filter(|set| set.weight() == Some(1))
        .and_then(|set| set.first_set())
        .map(to_u32);
    let package = anchor.and_then(package_of);

    let mut pcie_path: Vec<PcieHop> = object
        .ancestors()
        .take_while(|ancestor| ancestor.object_type().is_io())
        .filter_map(pcie_hop)
        .collect();
    pcie_path.reverse();
    Placement {
        pci_address,
        numa_node,
        package,
        pcie_path,
    }
}

fn pcie_hop(object: &TopologyObject) -> Option<PcieHop> {
    let Some(ObjectAttributes::Bridge(bridge)) = object.attributes() else {
        return None;
    };
    match bridge.upstream_type() {
        BridgeType::Host => {
            let Some(DownstreamAttributes::PCI(downstream)) = bridge.downstream_attributes() else {
                return None;
            };
            Some(PcieHop::HostBridge {
                domain: downstream.domain().into(),
                first_bus: downstream.secondary_bus(),
                last_bus: downstream.subordinate_bus(),
            })
        }
        _ => {
            let hwlocality::object::attributes::UpstreamAttributes::PCI(upstream) =
                bridge.upstream_attributes()?;
            Some(PcieHop::Bridge {
                address: PciAddress {
                    domain: upstream.domain().into(),
                    bus: upstream.bus_id(),
                    device: upstream.bus_device(),
                    function: upstream.function(),
                },
            })
        }
    }
}
