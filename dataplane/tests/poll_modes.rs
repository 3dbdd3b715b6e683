//! Poll modes, alone in their own test binary: the idle check measures the process's CPU
//! time, which other tests running in parallel would inflate.

use std::sync::Arc;
use std::time::Duration;

use tier0_dataplane::buffer::BufferPoolConfig;
use tier0_dataplane::device::{BlockDevice, UringDevice, UringOptions, preallocate_file};
use tier0_dataplane::store::{ChunkId, ChunkStore, StoreConfig};
use tier0_dataplane::worker::{
    DeviceFactory, DriveSpec, Op, Output, PollMode, ReadCheck, Request, WorkerPool,
    WorkerPoolConfig,
};
use tier0_topology::WorkerPlan;

const CHUNK: u32 = 64 << 10;

fn start(mode: PollMode, dir: &std::path::Path) -> WorkerPool {
    let path = dir.join("drive");
    preallocate_file(&path, 1 << 20).unwrap();
    let mut device = UringDevice::open(&path, &UringOptions::default()).unwrap();
    let store = ChunkStore::format(
        &mut device,
        StoreConfig {
            chunk_size: CHUNK,
            checksum_block_size: 4096,
        },
    )
    .unwrap();
    store.put(&mut device, chunk(), &data()).unwrap();
    let factory: DeviceFactory = Arc::new(move |_: &DriveSpec| {
        Ok(Box::new(UringDevice::open(&path, &UringOptions::default())?) as Box<dyn BlockDevice>)
    });
    let plan = WorkerPlan::single_node(0, vec![0]);
    let drive = DriveSpec {
        name: "drive".into(),
        store: Arc::new(store),
        numa_node: 0,
        memory: None,
    };
    let config = WorkerPoolConfig {
        poll_mode: mode,
        in_flight_max: 4,
        buffers: BufferPoolConfig {
            buffer_size: CHUNK as usize,
            buffer_count: 2,
            numa_node: None,
            hugepages: false,
        },
        pin: false,
        sources: None,
    };
    WorkerPool::start(&plan, &[drive], factory, &config).unwrap()
}

fn chunk() -> ChunkId {
    ChunkId {
        file: 5,
        index: 0,
        generation: 1,
    }
}

fn data() -> Vec<u8> {
    (0..CHUNK).map(|i| (i % 251) as u8).collect()
}

fn process_cpu_seconds() -> f64 {
    let mut usage = std::mem::MaybeUninit::<libc::rusage>::uninit();
    // SAFETY: getrusage fills the struct we pass.
    let usage = unsafe {
        libc::getrusage(libc::RUSAGE_SELF, usage.as_mut_ptr());
        usage.assume_init()
    };
    let seconds = |time: libc::timeval| time.tv_sec as f64 + time.tv_usec as f64 / 1e6;
    seconds(usage.ru_utime) + seconds(usage.ru_stime)
}

#[test]
fn every_poll_mode_serves_and_adaptive_sleeps_when_idle() {
    for mode in [PollMode::Busy, PollMode::Adaptive, PollMode::Interrupt] {
        let dir = std::env::temp_dir().join(format!("tier0-poll-{mode:?}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let pool = start(mode, &dir);
        let (reply, completions) = crossbeam_channel::unbounded();
        pool.submit(Request {
            tag: 1,
            drive: 0,
            op: Op::Read {
                chunk: chunk(),
                offset: 100,
                len: 5000,
                check: ReadCheck::Worker,
            },
            reply,
        })
        .unwrap();
        let completion = completions.recv_timeout(Duration::from_secs(10)).unwrap();
        let Ok(Output::Read { lease, .. }) = completion.result else {
            panic!("{mode:?}: read failed");
        };
        assert_eq!(lease.as_slice(), &data()[100..5100]);
        drop(lease);
        if mode != PollMode::Busy {
            // An idle adaptive or interrupt worker sleeps: well under a core over 500 ms.
            std::thread::sleep(Duration::from_millis(50));
            let before = process_cpu_seconds();
            std::thread::sleep(Duration::from_millis(500));
            let used = process_cpu_seconds() - before;
            assert!(
                used < 0.2,
                "{mode:?} worker used {used:.3} CPU-s while idle for 0.5 s"
            );
        }
        pool.shutdown();
        std::fs::remove_dir_all(dir).unwrap();
    }
}
