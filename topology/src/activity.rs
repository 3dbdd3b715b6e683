//! What each GPU is doing now, from NVML (feature `nvml`): busy when it runs a compute process
//! or its utilization is above [`BUSY_PERCENT`], for the control plane's GPU state.
//!
//! NVML is loaded at run time (`libnvidia-ml.so.1`), so one binary runs everywhere: without the
//! feature, without the library, without a driver or without a GPU there are simply no GPUs
//! to report, never an error that stops the daemon, never a panic.

use crate::Gpu;
use crate::pci::PciAddress;

/// Utilization (percent of the last sample period with a kernel running) above which a GPU
/// without a listed compute process still counts as busy (a process in another container
/// may not be visible).
pub const BUSY_PERCENT: u32 = 10;

/// One GPU's activity, by its index in the topology's GPU list (PCI address order, as the
/// GPU feeds the control plane ranks homes with).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GpuActivity {
    pub index: u32,
    pub busy: bool,
    pub utilization_percent: u32,
    pub compute_processes: u32,
    pub memory_used_bytes: u64,
}

/// A handle on NVML, or on nothing where it is not.
pub struct GpuMonitor {
    #[cfg(feature = "nvml")]
    nvml: Option<nvml_wrapper::Nvml>,
    /// Why there is no NVML (for one log line), when there is none.
    pub unavailable: Option<String>,
}

impl std::fmt::Debug for GpuMonitor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GpuMonitor")
            .field("unavailable", &self.unavailable)
            .finish_non_exhaustive()
    }
}

impl GpuMonitor {
    /// Opens NVML if this build has it and the machine has a driver.
    pub fn open() -> GpuMonitor {
        #[cfg(feature = "nvml")]
        {
            match nvml_wrapper::Nvml::init() {
                Ok(nvml) => GpuMonitor {
                    nvml: Some(nvml),
                    unavailable: None,
                },
                Err(error) => GpuMonitor {
                    nvml: None,
                    unavailable: Some(format!("NVML: {error}")),
                },
            }
        }
        #[cfg(not(feature = "nvml"))]
        {
            GpuMonitor {
                unavailable: Some("built without the nvml feature".into()),
            }
        }
    }

    pub fn available(&self) -> bool {
        self.unavailable.is_none()
    }

    /// The activity of each of `gpus` (the topology's list) that NVML knows, matched by PCI
    /// address; empty without NVML. A GPU whose query fails is left out.
    pub fn activity(&self, gpus: &[Gpu]) -> Vec<GpuActivity> {
        #[cfg(feature = "nvml")]
        if let Some(nvml) = &self.nvml {
            return nvml_activity(nvml, gpus);
        }
        let _ = gpus;
        Vec::new()
    }
}

#[cfg(feature = "nvml")]
fn nvml_activity(nvml: &nvml_wrapper::Nvml, gpus: &[Gpu]) -> Vec<GpuActivity> {
    let count = nvml.device_count().unwrap_or(0);
    let mut activity = Vec::new();
    for nvml_index in 0..count {
        let Ok(device) = nvml.device_by_index(nvml_index) else {
            continue;
        };
        let Some(address) = device
            .pci_info()
            .ok()
            .and_then(|info| parse_nvml_bus_id(&info.bus_id))
        else {
            continue;
        };
        let Some(index) = gpus.iter().position(|gpu| gpu.pci_address == address) else {
            continue;
        };
        let utilization = device.utilization_rates().map_or(0, |rates| rates.gpu);
        let processes = device.running_compute_processes_count().unwrap_or(0);
        let memory = device.memory_info().map_or(0, |memory| memory.used);
        activity.push(GpuActivity {
            index: index as u32,
            busy: is_busy(processes, utilization),
            utilization_percent: utilization,
            compute_processes: processes,
            memory_used_bytes: memory,
        });
    }
    activity.sort_by_key(|gpu| gpu.index);
    activity
}

/// Busy: a compute process runs on it, or it computed for more than [`BUSY_PERCENT`] of the
/// last sample period.
pub fn is_busy(compute_processes: u32, utilization_percent: u32) -> bool {
    compute_processes > 0 || utilization_percent > BUSY_PERCENT
}

/// NVML's bus id (`00000000:3B:00.0`: an 8-digit domain) as a PCI address.
pub fn parse_nvml_bus_id(bus_id: &str) -> Option<PciAddress> {
    let bus_id = bus_id.trim().trim_end_matches('\0');
    let (domain, rest) = bus_id.split_once(':')?;
    let domain = u32::from_str_radix(domain, 16).ok()?;
    let address: PciAddress = format!("0000:{rest}").parse().ok()?;
    Some(PciAddress { domain, ..address })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nvml_bus_ids_parse_to_the_topology_s_addresses() {
        let address = parse_nvml_bus_id("00000000:3B:00.0").unwrap();
        assert_eq!(address.to_string(), "0000:3b:00.0");
        assert_eq!(
            parse_nvml_bus_id("00000001:07:1f.7\0").unwrap().to_string(),
            "0001:07:1f.7"
        );
        assert_eq!(parse_nvml_bus_id("3B:00.0"), None);
        assert_eq!(parse_nvml_bus_id("00000000:3B:20.0"), None, "slot > 31");
    }

    #[test]
    fn busy_means_a_process_or_utilization_past_the_mark() {
        assert!(!is_busy(0, 0));
        assert!(!is_busy(0, BUSY_PERCENT));
        assert!(is_busy(0, BUSY_PERCENT + 1));
        assert!(is_busy(1, 0));
    }

    /// Where there is no NVIDIA driver (CI, these machines), the monitor opens, says why there
    /// is no NVML and reports no GPUs, whatever GPUs the topology lists.
    #[test]
    fn without_a_driver_there_are_no_gpus_and_no_panic() {
        let monitor = GpuMonitor::open();
        let has_driver = std::path::Path::new("/proc/driver/nvidia/version").exists();
        if has_driver {
            // A GPU machine (the device check): NVML opens.
            assert!(monitor.available(), "{monitor:?}");
            return;
        }
        assert!(!monitor.available());
        let why = monitor.unavailable.clone().unwrap();
        assert!(
            why.contains("NVML") || why.contains("nvml feature"),
            "{why}"
        );
        // A DGX-2's sixteen GPUs, none of them here.
        let machine = crate::load_xml_file(std::path::Path::new(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/fixtures/nvidiaDGX2.xml"
        )))
        .unwrap();
        assert_eq!(machine.gpus.len(), 16);
        assert!(monitor.activity(&machine.gpus).is_empty());
    }
}
