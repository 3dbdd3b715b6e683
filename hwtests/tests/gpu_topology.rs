//! Live discovery on a machine with GPUs: every GPU the driver sees is found once, with its
//! NUMA node, and the worker plan hands it to exactly one node.

use std::path::Path;

/// GPUs the NVIDIA driver exposes, by PCI address (`/proc/driver/nvidia/gpus/<address>`).
fn nvidia_driver_gpus() -> Vec<String> {
    let Ok(entries) = std::fs::read_dir("/proc/driver/nvidia/gpus") else {
        return Vec::new();
    };
    let mut addresses: Vec<String> = entries
        .filter_map(|entry| entry.ok())
        .map(|entry| entry.file_name().to_string_lossy().to_lowercase())
        .collect();
    addresses.sort();
    addresses
}

#[test]
#[ignore = "needs a machine with an NVIDIA GPU and its driver loaded"]
fn live_machine_reports_each_driver_gpu_once_with_its_numa_node() {
    let driver_gpus = nvidia_driver_gpus();
    assert!(
        !driver_gpus.is_empty(),
        "no GPU under /proc/driver/nvidia/gpus: this test needs an NVIDIA GPU"
    );
    let machine = tier0_topology::discover_live().expect("live discovery");
    let found: Vec<String> = machine
        .gpus
        .iter()
        .map(|gpu| gpu.pci_address.to_string())
        .collect();
    for address in &driver_gpus {
        assert!(
            found.contains(address),
            "driver GPU {address} missing from {found:?}"
        );
    }
    for gpu in &machine.gpus {
        let sysfs = Path::new("/sys/bus/pci/devices")
            .join(gpu.pci_address.to_string())
            .join("numa_node");
        let kernel_node: i64 = std::fs::read_to_string(&sysfs)
            .expect("sysfs numa_node")
            .trim()
            .parse()
            .expect("numa_node is a number");
        // The kernel says -1 when the firmware gives no affinity; hwloc then hangs the device
        // off the whole machine.
        if kernel_node >= 0 && machine.numa_nodes.len() > 1 {
            assert_eq!(gpu.placement.numa_node, Some(kernel_node as u32), "{gpu:?}");
        }
    }
    let plan = tier0_topology::plan_workers(&machine, &tier0_topology::WorkerPolicy::default());
    let planned: usize = plan.numa_nodes.iter().map(|node| node.gpus.len()).sum();
    let placed = machine
        .gpus
        .iter()
        .filter(|gpu| gpu.placement.numa_node.is_some())
        .count();
    assert_eq!(planned, placed, "every placed GPU is listed under one node");
}
