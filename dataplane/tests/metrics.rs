//! Worker metrics reach a Prometheus recorder (its own test binary: the recorder is global).

use std::sync::Arc;
use std::time::Duration;

use tier0_dataplane::buffer::BufferPoolConfig;
use tier0_dataplane::device::{BlockDevice, MemoryDevice};
use tier0_dataplane::store::{ChunkId, ChunkStore, StoreConfig};
use tier0_dataplane::worker::{
    DeviceFactory, DriveSpec, Op, Output, PollMode, ReadCheck, Request, WorkerPool,
    WorkerPoolConfig,
};
use tier0_topology::WorkerPlan;

#[test]
fn bytes_ops_latency_and_queue_depth_are_exported_per_worker() {
    let handle = metrics_exporter_prometheus::PrometheusBuilder::new()
        .install_recorder()
        .unwrap();
    let chunk = ChunkId {
        file: 1,
        index: 0,
        generation: 1,
    };
    let mut device = MemoryDevice::new("memory", 1 << 20, 8);
    let store = ChunkStore::format(
        &mut device,
        StoreConfig {
            chunk_size: 64 << 10,
            checksum_block_size: 4096,
        },
    )
    .unwrap();
    store.put(&mut device, chunk, &[7; 10_000]).unwrap();
    let device = std::sync::Mutex::new(Some(device));
    let factory: DeviceFactory = Arc::new(move |_: &DriveSpec| {
        Ok(Box::new(device.lock().unwrap().take().expect("one worker")) as Box<dyn BlockDevice>)
    });
    let plan = WorkerPlan::single_node(0, vec![0]);
    let drive = DriveSpec {
        name: "memory".into(),
        store: Arc::new(store),
        numa_node: 0,
        memory: None,
    };
    let config = WorkerPoolConfig {
        poll_mode: PollMode::Adaptive,
        in_flight_max: 4,
        buffers: BufferPoolConfig {
            buffer_size: 64 << 10,
            buffer_count: 2,
            numa_node: None,
            hugepages: false,
        },
        pin: false,
        sources: None,
    };
    let pool = WorkerPool::start(&plan, &[drive], factory, &config).unwrap();
    let (reply, completions) = crossbeam_channel::unbounded();
    for tag in 0..3 {
        pool.submit(Request {
            tag,
            drive: 0,
            op: Op::Read {
                chunk,
                offset: 0,
                len: 10_000,
                check: ReadCheck::Worker,
            },
            reply: reply.clone(),
        })
        .unwrap();
        let completion = completions.recv_timeout(Duration::from_secs(5)).unwrap();
        assert!(matches!(completion.result, Ok(Output::Read { .. })));
    }
    pool.shutdown();
    let text = handle.render();
    let line = |prefix: &str| {
        text.lines()
            .find(|line| line.starts_with(prefix) && line.contains("op=\"read\""))
            .unwrap_or_else(|| panic!("no {prefix} in:\n{text}"))
            .to_string()
    };
    assert!(
        line("tier0_dataplane_bytes_total").ends_with(" 30000"),
        "{text}"
    );
    assert!(line("tier0_dataplane_ops_total").ends_with(" 3"), "{text}");
    assert!(
        line("tier0_dataplane_latency_seconds").contains("worker=\"0\""),
        "{text}"
    );
    assert!(text.contains("tier0_dataplane_in_flight{"), "{text}");
}
