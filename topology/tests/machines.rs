//! Discovery, distances and worker plans on hwloc exports of real machines
//! (`tests/fixtures/`, from hwloc's own test suite), and on the live machine.

use std::collections::HashSet;
use std::path::PathBuf;

use tier0_topology::{
    BlockDeviceKind, Locality, Machine, PciAddress, TopologyError, WorkerPolicy, load_xml_file,
    plan_workers, rank_by_distance,
};

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

fn load(name: &str) -> Machine {
    load_xml_file(&fixture(name)).unwrap_or_else(|error| panic!("{name}: {error}"))
}

fn pci(text: &str) -> PciAddress {
    text.parse().unwrap()
}

const DGX2: &str = "nvidiaDGX2.xml";
const GPU_AND_HCA: &str = "32em64t-2n8c2t-pci-normalio.xml";
const CONNECTX3: &str = "24em64t-2n6c2t-pci.xml";
const MANY_VFS: &str = "16intel64-manyVFs.xml";
const ALL: [&str; 4] = [DGX2, GPU_AND_HCA, CONNECTX3, MANY_VFS];

#[test]
fn dgx2_has_two_numa_nodes_and_sixteen_gpus_split_eight_eight() {
    let machine = load(DGX2);
    assert_eq!(machine.product.as_deref(), Some("NVIDIA DGX-2H"));
    assert_eq!(machine.numa_nodes.len(), 2);
    assert_eq!(machine.gpus.len(), 16);
    assert_eq!(machine.gpus_on_numa_node(0).count(), 8);
    assert_eq!(machine.gpus_on_numa_node(1).count(), 8);
    assert!(
        machine
            .gpus
            .iter()
            .all(|gpu| gpu.model.as_deref() == Some("Tesla V100-SXM3-32GB-H"))
    );
    assert!(machine.gpus.iter().all(|gpu| {
        gpu.uuid
            .as_deref()
            .is_some_and(|uuid| uuid.starts_with("GPU-"))
    }));
    assert_eq!(machine.numa_nodes[0].package, Some(0));
    assert_eq!(machine.numa_nodes[1].package, Some(1));
    assert_eq!(machine.numa_nodes[0].memory_bytes, 810_234_351_616);
}

#[test]
fn dgx2_gpus_pair_up_under_their_pcie_switches() {
    let machine = load(DGX2);
    let gpu0 = machine.gpu(pci("0000:34:00.0")).unwrap();
    let others: Vec<_> = machine
        .gpus
        .iter()
        .filter(|gpu| gpu.pci_address != gpu0.pci_address)
        .cloned()
        .collect();
    let ranked = rank_by_distance(&others, &gpu0.placement);
    // 34:00.0 and 36:00.0 share the second-level PLX switch under 32:00.0.
    assert_eq!(ranked[0].0.pci_address, pci("0000:36:00.0"));
    assert_eq!(ranked[0].1.locality, Locality::PcieSwitch);
    // The four GPUs behind the first-level switch come before the rest of the socket.
    let behind_first_switch: HashSet<_> =
        ranked[..3].iter().map(|(gpu, _)| gpu.pci_address).collect();
    assert_eq!(
        behind_first_switch,
        HashSet::from([
            pci("0000:36:00.0"),
            pci("0000:39:00.0"),
            pci("0000:3b:00.0")
        ])
    );
    assert!(
        ranked[..7]
            .iter()
            .all(|(gpu, _)| gpu.placement.numa_node == Some(0))
    );
    assert!(
        ranked[7..]
            .iter()
            .all(|(_, distance)| distance.locality == Locality::System)
    );
}

#[test]
fn dgx2_worker_plan_gives_each_node_its_eight_gpus() {
    let machine = load(DGX2);
    let plan = plan_workers(&machine, &WorkerPolicy::default());
    assert_eq!(plan.numa_nodes.len(), 2);
    for workers in &plan.numa_nodes {
        assert_eq!(workers.gpus.len(), 8, "node {}", workers.numa_node);
        for gpu in &workers.gpus {
            assert_eq!(
                machine.gpu(pci(gpu)).unwrap().placement.numa_node,
                Some(workers.numa_node)
            );
        }
        assert_eq!(workers.rdma_device, None, "the export has no HCA");
    }
    assert_eq!(plan.for_numa_node(0).unwrap().worker_cpus, vec![0, 1]);
    assert_eq!(plan.for_numa_node(1).unwrap().worker_cpus, vec![24, 25]);
}

#[test]
fn gpu_with_several_os_devices_counts_once_and_bmc_display_is_not_a_gpu() {
    let machine = load(GPU_AND_HCA);
    let k40 = machine.gpu(pci("0000:84:00.0")).unwrap();
    assert_eq!(k40.os_devices, vec!["cuda0", "card0"]);
    assert_eq!(k40.model.as_deref(), Some("Tesla K40m"));
    assert_eq!(k40.placement.numa_node, Some(1));
    // The Matrox VGA of the BMC (05:03.0) is a display, not a GPU; an OpenCL GPU is one.
    assert!(machine.gpu(pci("0000:05:03.0")).is_none());
    assert!(machine.gpu(pci("0000:84:00.1")).is_some());
    let addresses: HashSet<_> = machine.gpus.iter().map(|gpu| gpu.pci_address).collect();
    assert_eq!(
        addresses.len(),
        machine.gpus.len(),
        "one entry per PCI function"
    );
}

#[test]
fn hca_and_gpu_share_node_one_while_the_disk_is_on_node_zero() {
    let machine = load(GPU_AND_HCA);
    let mlx = machine.rdma_device("mlx5_0").unwrap();
    assert_eq!(mlx.netdevs, vec!["ib0"]);
    assert_eq!(mlx.placement.numa_node, Some(1));
    assert_eq!(mlx.placement.pci_address, Some(pci("0000:04:00.0")));
    let sda = machine.block_device("sda").unwrap();
    assert_eq!(sda.placement.numa_node, Some(0));
    assert_eq!(sda.kind, BlockDeviceKind::Disk);
    // ib0 belongs to the HCA, not to the plain network devices.
    assert!(machine.network_devices.iter().all(|nic| nic.name != "ib0"));

    let k40 = machine.gpu(pci("0000:84:00.0")).unwrap();
    let nearest_hca = rank_by_distance(&machine.rdma_devices, &k40.placement);
    assert_eq!(nearest_hca[0].0.name, "mlx5_0");
    assert_eq!(nearest_hca[0].1.locality, Locality::PcieSwitch);
    let nearest_gpus = rank_by_distance(&machine.gpus, &mlx.placement);
    assert_eq!(nearest_gpus[0].1.locality, Locality::PcieSwitch);
    assert_eq!(
        nearest_gpus.last().unwrap().0.pci_address,
        pci("0000:03:00.0")
    );
    assert_eq!(nearest_gpus.last().unwrap().1.locality, Locality::System);
    assert_eq!(
        sda.placement.distance_to(&mlx.placement).locality,
        Locality::System
    );
}

#[test]
fn plan_puts_the_remote_hca_and_local_disk_where_they_belong() {
    let machine = load(GPU_AND_HCA);
    let plan = plan_workers(&machine, &WorkerPolicy::default());
    let node0 = plan.for_numa_node(0).unwrap();
    let node1 = plan.for_numa_node(1).unwrap();
    assert_eq!(node1.rdma_device.as_deref(), Some("mlx5_0"));
    assert_eq!(node1.rdma_locality, Some(Locality::NumaNode));
    // Node 0 has no HCA of its own: it shares node 1's, and the plan says it is remote.
    assert_eq!(node0.rdma_device.as_deref(), Some("mlx5_0"));
    assert_eq!(node0.rdma_locality, Some(Locality::System));
    assert_eq!(node0.block_devices, vec!["sda"]);
    assert!(node1.block_devices.is_empty());
    // One worker per physical core, on the core's first hardware thread.
    assert_eq!(node0.worker_cpus, (0..8).collect::<Vec<_>>());
    assert_eq!(node1.worker_cpus, (8..16).collect::<Vec<_>>());
    assert_eq!(
        node1.gpus,
        vec!["0000:83:00.0", "0000:84:00.0", "0000:84:00.1"]
    );
}

#[test]
fn connectx3_sits_on_node_zero_with_both_its_netdevs() {
    let machine = load(CONNECTX3);
    let mlx = machine.rdma_device("mlx4_0").unwrap();
    assert_eq!(mlx.placement.numa_node, Some(0));
    assert_eq!(mlx.netdevs, vec!["eth2", "ib0"]);
    // The ES1000 is the server's VGA display, not a GPU.
    assert!(machine.gpu(pci("0000:01:03.0")).is_none());
    assert_eq!(
        machine
            .gpu(pci("0000:06:00.0"))
            .unwrap()
            .placement
            .numa_node,
        Some(0)
    );
    let plan = plan_workers(&machine, &WorkerPolicy::default());
    // Hyper-threaded: 12 logical CPUs per node on 6 cores, one worker per core.
    assert_eq!(
        plan.for_numa_node(0).unwrap().worker_cpus,
        vec![0, 2, 4, 6, 8, 10]
    );
    assert_eq!(
        plan.for_numa_node(1).unwrap().worker_cpus,
        vec![1, 3, 5, 7, 9, 11]
    );
}

#[test]
fn many_rdma_functions_each_node_takes_a_local_one() {
    let machine = load(MANY_VFS);
    assert_eq!(machine.rdma_devices.len(), 3);
    let plan = plan_workers(&machine, &WorkerPolicy::default());
    let node0 = plan.for_numa_node(0).unwrap();
    let node1 = plan.for_numa_node(1).unwrap();
    assert_eq!(node0.rdma_locality, Some(Locality::NumaNode));
    assert_eq!(node1.rdma_locality, Some(Locality::NumaNode));
    assert_eq!(
        machine
            .rdma_device(node1.rdma_device.as_deref().unwrap())
            .unwrap()
            .placement
            .numa_node,
        Some(1)
    );
}

#[test]
fn workers_per_node_keeps_the_highest_cores_and_allowed_cpus_are_respected() {
    let machine = load(GPU_AND_HCA);
    let two = WorkerPolicy {
        workers_per_numa_node: Some(2),
        allowed_cpus: None,
    };
    let plan = plan_workers(&machine, &two);
    assert_eq!(plan.for_numa_node(0).unwrap().worker_cpus, vec![6, 7]);
    assert_eq!(plan.for_numa_node(1).unwrap().worker_cpus, vec![14, 15]);

    // Only hyper-thread siblings of node 1 allowed: node 0 gets no workers and its disk moves
    // to node 1, the nearest node that has some.
    let siblings = WorkerPolicy {
        workers_per_numa_node: None,
        allowed_cpus: Some((24..32).collect()),
    };
    let plan = plan_workers(&machine, &siblings);
    assert_eq!(plan.numa_nodes.len(), 1);
    assert_eq!(plan.numa_nodes[0].numa_node, 1);
    assert_eq!(plan.numa_nodes[0].worker_cpus, (24..32).collect::<Vec<_>>());
    assert_eq!(plan.numa_nodes[0].block_devices, vec!["sda"]);
}

#[test]
fn every_fixture_plans_consistently() {
    for name in ALL {
        let machine = load(name);
        let plan = plan_workers(&machine, &WorkerPolicy::default());
        assert_eq!(plan.numa_nodes.len(), machine.numa_nodes.len(), "{name}");
        let mut drives = Vec::new();
        let mut cpus = HashSet::new();
        for workers in &plan.numa_nodes {
            let node = machine.numa_node(workers.numa_node).unwrap();
            for cpu in &workers.worker_cpus {
                assert!(
                    node.cpus.contains(cpu),
                    "{name}: cpu {cpu} not on node {}",
                    node.os_index
                );
                assert!(cpus.insert(*cpu), "{name}: cpu {cpu} planned twice");
            }
            let cores: HashSet<_> = workers
                .worker_cpus
                .iter()
                .map(|cpu| {
                    node.cores
                        .iter()
                        .position(|core| core.cpus.contains(cpu))
                        .unwrap()
                })
                .collect();
            assert_eq!(
                cores.len(),
                workers.worker_cpus.len(),
                "{name}: two workers on one core"
            );
            drives.extend(workers.block_devices.iter().cloned());
        }
        let mut expected: Vec<_> = machine
            .block_devices
            .iter()
            .map(|drive| drive.name.clone())
            .collect();
        drives.sort();
        expected.sort();
        assert_eq!(
            drives, expected,
            "{name}: every drive owned by exactly one node"
        );
    }
}

#[test]
fn a_memory_only_node_gets_no_workers() {
    let mut machine = load(GPU_AND_HCA);
    machine.numa_nodes.push(tier0_topology::NumaNode {
        os_index: 2,
        package: Some(1),
        memory_bytes: 1 << 40,
        ..Default::default()
    });
    let plan = plan_workers(&machine, &WorkerPolicy::default());
    assert!(plan.for_numa_node(2).is_none());
    assert_eq!(plan.numa_nodes.len(), 2);
}

#[test]
fn live_machine_is_discovered_without_error() {
    let machine = tier0_topology::discover_live().expect("live discovery");
    assert!(!machine.numa_nodes.is_empty());
    assert!(
        machine
            .numa_nodes
            .iter()
            .all(|node| !node.cpus.is_empty() || node.memory_bytes > 0)
    );
    let plan = plan_workers(&machine, &WorkerPolicy::default());
    assert!(plan.worker_count() >= 1, "{plan:?}");
    let online = std::thread::available_parallelism().map_or(1, |n| n.get());
    assert!(
        plan.worker_count() <= online.max(machine.numa_nodes.iter().map(|n| n.cpus.len()).sum())
    );
}

#[test]
fn bad_files_are_clear_errors() {
    let dir = std::env::temp_dir().join(format!("tier0-topology-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();

    let missing = dir.join("missing.xml");
    assert!(matches!(
        load_xml_file(&missing),
        Err(TopologyError::FileNotFound { .. })
    ));
    assert!(matches!(
        load_xml_file(&dir),
        Err(TopologyError::FileUnreadable { .. })
    ));

    let full = std::fs::read_to_string(fixture(DGX2)).unwrap();
    let cases: [(&str, Vec<u8>); 5] = [
        ("empty", Vec::new()),
        ("garbage", b"not xml at all".to_vec()),
        ("truncated", full.as_bytes()[..full.len() / 2].to_vec()),
        ("binary", vec![0xff, 0xfe, 0x00, 0x3c]),
        ("nul", b"<topology version=\"2.0\">\0</topology>".to_vec()),
    ];
    for (what, bytes) in cases {
        let path = dir.join(format!("{what}.xml"));
        std::fs::write(&path, bytes).unwrap();
        let error = load_xml_file(&path).expect_err(what);
        assert!(
            matches!(error, TopologyError::Malformed { .. }),
            "{what}: {error:?}"
        );
        assert!(
            error.to_string().contains(&path.display().to_string()),
            "{what}: {error}"
        );
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Each GPU's nearest drive and NIC, by the distance model: what placement scores nodes by.
#[test]
fn each_gpu_knows_how_near_its_drive_and_nic_are() {
    let feed = |locality| Some(Locality::cost(locality));
    // Four GPUs over two nodes, an HCA on node 1 and a disk on node 0: GPU 0 shares a host
    // bridge with the disk and reaches the HCA across the socket link; GPUs 2 and 3 sit
    // under the HCA's PCIe switch.
    let feeds = tier0_topology::feeds(&load(GPU_AND_HCA));
    let costs: Vec<(Option<u32>, Option<u32>)> = feeds
        .gpus
        .iter()
        .map(|gpu| {
            (
                gpu.drive.map(|d| d.locality.cost()),
                gpu.nic.map(|d| d.locality.cost()),
            )
        })
        .collect();
    assert_eq!(
        costs,
        vec![
            (feed(Locality::HostBridge), feed(Locality::System)),
            (feed(Locality::System), feed(Locality::HostBridge)),
            (feed(Locality::System), feed(Locality::PcieSwitch)),
            (feed(Locality::System), feed(Locality::PcieSwitch)),
        ]
    );
    assert_eq!(
        feeds
            .gpus
            .iter()
            .map(|gpu| gpu.numa_node)
            .collect::<Vec<_>>(),
        vec![Some(0), Some(1), Some(1), Some(1)]
    );
    assert_eq!(feeds.drive_to_nic.unwrap().locality, Locality::System);
    // One host bridge for the disk, the ConnectX-3 and GPU 0.
    let feeds = tier0_topology::feeds(&load(CONNECTX3));
    assert_eq!(feeds.gpus[0].drive.unwrap().locality, Locality::HostBridge);
    assert_eq!(feeds.gpus[0].nic.unwrap().locality, Locality::HostBridge);
    assert_eq!(feeds.drive_to_nic.unwrap().locality, Locality::HostBridge);
    // The DGX-2 export lists no drives or NICs: its GPUs have no feeds to score by.
    let feeds = tier0_topology::feeds(&load(DGX2));
    assert_eq!(feeds.gpus.len(), 16);
    assert!(
        feeds
            .gpus
            .iter()
            .all(|gpu| gpu.drive.is_none() && gpu.nic.is_none())
    );
    assert_eq!(feeds.drive_to_nic, None);
    // The cost order is the locality order.
    let all = [
        Locality::SameDevice,
        Locality::PcieSwitch,
        Locality::HostBridge,
        Locality::NumaNode,
        Locality::Package,
        Locality::System,
    ];
    assert!(all.windows(2).all(|pair| pair[0].cost() < pair[1].cost()));
}
