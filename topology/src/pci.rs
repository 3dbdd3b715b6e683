use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize, Serializer};

/// A PCI function address, `domain:bus:device.function`, as Linux prints it (`0000:3b:00.0`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PciAddress {
    pub domain: u32,
    pub bus: u8,
    pub device: u8,
    pub function: u8,
}

impl PciAddress {
    /// True when both addresses are functions of one physical device (same slot).
    pub fn same_device(&self, other: &PciAddress) -> bool {
        self.domain == other.domain && self.bus == other.bus && self.device == other.device
    }
}

impl fmt::Display for PciAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{:04x}:{:02x}:{:02x}.{:x}",
            self.domain, self.bus, self.device, self.function
        )
    }
}

impl FromStr for PciAddress {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let bad = || format!("{text:?} is not a PCI address (expected DDDD:BB:DD.F)");
        let (domain, rest) = text.split_once(':').ok_or_else(bad)?;
        let (bus, rest) = rest.split_once(':').ok_or_else(bad)?;
        let (device, function) = rest.split_once('.').ok_or_else(bad)?;
        let address = PciAddress {
            domain: u32::from_str_radix(domain, 16).map_err(|_| bad())?,
            bus: u8::from_str_radix(bus, 16).map_err(|_| bad())?,
            device: u8::from_str_radix(device, 16).map_err(|_| bad())?,
            function: u8::from_str_radix(function, 16).map_err(|_| bad())?,
        };
        // A PCI slot number has 5 bits and a function number 3.
        if address.device > 0x1f || address.function > 7 {
            return Err(bad());
        }
        Ok(address)
    }
}

impl Serialize for PciAddress {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for PciAddress {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

/// One bridge on the way from the CPU to a device.
///
/// A device's PCIe path lists these from the host bridge down; two devices whose paths share a
/// prefix meet at the last shared bridge, which is what the distance model measures.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum PcieHop {
    /// The root complex port into the CPU, named by the bus range it serves.
    HostBridge {
        domain: u32,
        first_bus: u8,
        last_bus: u8,
    },
    /// A PCI-to-PCI bridge: a root port or a port of a PCIe switch.
    Bridge { address: PciAddress },
}

impl fmt::Display for PcieHop {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PcieHop::HostBridge {
                domain,
                first_bus,
                last_bus,
            } => write!(
                f,
                "host-bridge {domain:04x}:[{first_bus:02x}-{last_bus:02x}]"
            ),
            PcieHop::Bridge { address } => write!(f, "bridge {address}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pci_address_round_trips_through_text() {
        let address: PciAddress = "0000:3b:00.1".parse().unwrap();
        assert_eq!(
            address,
            PciAddress {
                domain: 0,
                bus: 0x3b,
                device: 0,
                function: 1
            }
        );
        assert_eq!(address.to_string(), "0000:3b:00.1");
    }

    #[test]
    fn malformed_pci_addresses_are_rejected() {
        for text in [
            "",
            "3b:00.0",
            "0000:3b:00",
            "0000:zz:00.0",
            "0000:3b:20.0",
            "0000:3b:00.8",
        ] {
            assert!(text.parse::<PciAddress>().is_err(), "{text:?} was accepted");
        }
    }
}
