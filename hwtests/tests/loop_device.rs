//! The io_uring device and the chunk store on a raw block device: a loop device with direct
//! I/O, the stand-in for an NVMe namespace on machines without one. Needs root (losetup);
//! `hwtests/run` runs it when it is root and has losetup.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use tier0_dataplane::buffer::{AlignedBuf, BufferPoolConfig};
use tier0_dataplane::device::{BlockDevice, UringDevice, UringOptions};
use tier0_dataplane::store::{ChunkId, ChunkStore, StoreConfig};
use tier0_dataplane::worker::{
    DeviceFactory, DriveSpec, Op, Output, PollMode, ReadCheck, Request, WorkerPool,
    WorkerPoolConfig,
};
use tier0_topology::WorkerPlan;

const DEVICE_LEN: u64 = 64 << 20;
const CHUNK: u32 = 1 << 20;

/// A loop device over a sparse file, detached and deleted on drop.
struct LoopDevice {
    path: PathBuf,
    backing: PathBuf,
}

impl LoopDevice {
    fn attach(what: &str) -> LoopDevice {
        let backing =
            std::env::temp_dir().join(format!("tier0-loop-{what}-{}", std::process::id()));
        let file = std::fs::File::create(&backing).unwrap();
        file.set_len(DEVICE_LEN).unwrap();
        let output = Command::new("losetup")
            .args(["--find", "--show", "--direct-io=on"])
            .arg(&backing)
            .output()
            .expect("running losetup");
        assert!(
            output.status.success(),
            "losetup failed (this test needs root): {}",
            String::from_utf8_lossy(&output.stderr)
        );
        let path = PathBuf::from(String::from_utf8(output.stdout).unwrap().trim());
        LoopDevice { path, backing }
    }
}

impl Drop for LoopDevice {
    fn drop(&mut self) {
        let _ = Command::new("losetup").arg("-d").arg(&self.path).status();
        let _ = std::fs::remove_file(&self.backing);
    }
}

fn pattern(seed: u32, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u32).wrapping_mul(2_654_435_761).wrapping_add(seed) as u8 ^ (i >> 12) as u8)
        .collect()
}

fn chunk(index: u32) -> ChunkId {
    ChunkId {
        file: 9,
        index,
        generation: 1,
    }
}

fn open(path: &Path) -> UringDevice {
    UringDevice::open(path, &UringOptions::default()).expect("opening the loop device")
}

#[test]
#[ignore = "needs root to attach a loop device (losetup)"]
fn io_uring_reads_and_writes_a_raw_block_device_with_direct_io() {
    let loop_device = LoopDevice::attach("device");
    let mut device = open(&loop_device.path);
    assert_eq!(device.len(), DEVICE_LEN, "size from BLKGETSIZE64");

    let data = pattern(1, 1 << 20);
    let mut buffer = AlignedBuf::zeroed(data.len());
    buffer.copy_from_slice(&data);
    device.write_at(8 << 20, &buffer).unwrap();
    device.sync().unwrap();

    // A second open (its own ring, its own O_DIRECT file) sees the bytes on the device.
    let mut reader = open(&loop_device.path);
    let mut back = AlignedBuf::zeroed(data.len());
    reader.read_at(8 << 20, &mut back).unwrap();
    assert_eq!(&back[..], &data[..]);

    // Past the end: an error naming the device, never a short read passed off as data.
    let mut tail = AlignedBuf::zeroed(1 << 20);
    let error = reader.read_at(DEVICE_LEN - 4096, &mut tail).unwrap_err();
    assert!(
        error
            .to_string()
            .contains(&*loop_device.path.to_string_lossy()),
        "{error}"
    );
}

#[test]
#[ignore = "needs root to attach a loop device (losetup)"]
fn chunk_store_on_a_raw_block_device_survives_reopening_and_serves_workers() {
    let loop_device = LoopDevice::attach("store");
    let mut device = open(&loop_device.path);
    let store = ChunkStore::format(
        &mut device,
        StoreConfig {
            chunk_size: CHUNK,
            checksum_block_size: 4096,
        },
    )
    .unwrap();
    for index in 0..6 {
        let len = CHUNK as usize - index as usize * 4099;
        store
            .put(&mut device, chunk(index), &pattern(index, len))
            .unwrap();
    }
    drop(store);
    drop(device);

    let mut device = open(&loop_device.path);
    let (store, recovery) = ChunkStore::open(&mut device).unwrap();
    assert_eq!(recovery.chunks, 6);
    drop(device);

    let path = loop_device.path.clone();
    let factory: DeviceFactory = Arc::new(move |_: &DriveSpec| {
        Ok(Box::new(UringDevice::open(&path, &UringOptions::default())?) as Box<dyn BlockDevice>)
    });
    let plan = WorkerPlan::single_node(0, vec![0]);
    let config = WorkerPoolConfig {
        poll_mode: PollMode::Adaptive,
        in_flight_max: 8,
        buffers: BufferPoolConfig {
            buffer_size: CHUNK as usize,
            buffer_count: 8,
            numa_node: None,
            hugepages: true,
        },
        pin: false,
        sources: None,
    };
    let drive = DriveSpec {
        name: "loop".into(),
        store: Arc::new(store),
        numa_node: 0,
        memory: None,
    };
    let pool = WorkerPool::start(&plan, &[drive], factory, &config).unwrap();
    let (reply, completions) = crossbeam_channel::unbounded();
    for index in 0..6u32 {
        pool.submit(Request {
            tag: u64::from(index),
            drive: 0,
            op: Op::Read {
                chunk: chunk(index),
                offset: 1000,
                len: 200_000,
                check: ReadCheck::Worker,
            },
            reply: reply.clone(),
        })
        .unwrap();
    }
    for _ in 0..6 {
        let completion = completions
            .recv_timeout(Duration::from_secs(10))
            .expect("a completion");
        let index = completion.tag as u32;
        let Ok(Output::Read { lease, .. }) = completion.result else {
            panic!("read {index} failed: {:?}", completion.result);
        };
        let len = CHUNK as usize - index as usize * 4099;
        assert_eq!(lease.as_slice(), &pattern(index, len)[1000..201_000]);
    }
    pool.shutdown();
}
