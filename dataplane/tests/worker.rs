//! Workers end to end: requests over channels, I/O on their own rings, verified data back in
//! leased pool buffers; back-pressure, faults, bad requests, poll modes and metrics.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crossbeam_channel::Receiver;
use tier0_dataplane::buffer::BufferPoolConfig;
use tier0_dataplane::device::{
    BlockDevice, DeviceError, FaultControl, FaultyDevice, UringDevice, UringOptions,
    preallocate_file,
};
use tier0_dataplane::store::{ChunkId, ChunkStore, StoreConfig, StoreError};
use tier0_dataplane::worker::{
    Completion, DeviceFactory, DriveSpec, Op, Output, PollMode, ReadCheck, Request, RequestError,
    WorkerPool, WorkerPoolConfig,
};
use tier0_topology::WorkerPlan;

const CHUNK: u32 = 256 << 10;

fn plan(cpus: &[u32]) -> WorkerPlan {
    WorkerPlan::single_node(0, cpus.to_vec())
}

fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state as u8
        })
        .collect()
}

fn chunk(index: u32) -> ChunkId {
    ChunkId {
        file: 77,
        index,
        generation: 1,
    }
}

fn config(poll_mode: PollMode, buffers: usize) -> WorkerPoolConfig {
    WorkerPoolConfig {
        poll_mode,
        in_flight_max: 16,
        buffers: BufferPoolConfig {
            buffer_size: CHUNK as usize,
            buffer_count: buffers,
            numa_node: None,
            hugepages: true,
        },
        pin: false,
        sources: None,
    }
}

/// A store on a preallocated file, filled with `chunks` chunks; every worker opens the file
/// with io_uring.
fn file_drive(what: &str, chunks: u32) -> (PathBuf, DriveSpec, DeviceFactory) {
    let dir = std::env::temp_dir().join(format!("tier0-worker-{what}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("drive");
    preallocate_file(&path, 8 << 20).unwrap();
    let mut device = UringDevice::open(&path, &UringOptions::default()).unwrap();
    let store = ChunkStore::format(
        &mut device,
        StoreConfig {
            chunk_size: CHUNK,
            checksum_block_size: 4096,
        },
    )
    .unwrap();
    for index in 0..chunks {
        store
            .put(
                &mut device,
                chunk(index),
                &pattern(u64::from(index), CHUNK as usize - index as usize * 1000),
            )
            .unwrap();
    }
    let spec = DriveSpec {
        name: "drive".into(),
        store: Arc::new(store),
        numa_node: 0,
        memory: None,
    };
    let opened = path.clone();
    let factory: DeviceFactory = Arc::new(move |_: &DriveSpec| {
        Ok(Box::new(UringDevice::open(&opened, &UringOptions::default())?) as Box<dyn BlockDevice>)
    });
    (dir, spec, factory)
}

fn expected(index: u32) -> Vec<u8> {
    pattern(u64::from(index), CHUNK as usize - index as usize * 1000)
}

fn read(pool: &WorkerPool, tag: u64, index: u32, offset: u64, len: u32) -> Receiver<Completion> {
    let (reply, completions) = crossbeam_channel::unbounded();
    pool.submit(Request {
        tag,
        drive: 0,
        op: Op::Read {
            chunk: chunk(index),
            offset,
            len,
            check: ReadCheck::Worker,
        },
        reply,
    })
    .unwrap();
    completions
}

fn wait(completions: &Receiver<Completion>) -> Completion {
    completions
        .recv_timeout(Duration::from_secs(10))
        .expect("a completion")
}

#[test]
fn two_workers_serve_concurrent_reads_with_verified_bytes() {
    let (dir, drive, factory) = file_drive("reads", 8);
    let pool = WorkerPool::start(
        &plan(&[0, 1]),
        &[drive],
        factory,
        &config(PollMode::Adaptive, 8),
    )
    .unwrap();
    assert_eq!(pool.workers(), 2);
    let (reply, completions) = crossbeam_channel::unbounded();
    let mut wanted = Vec::new();
    for round in 0..5u64 {
        for index in 0..8u32 {
            let len = CHUNK - index * 1000;
            // Whole chunks, and ranges that start and end inside checksum blocks.
            let (offset, size) = match round % 3 {
                0 => (0, len),
                1 => (4095, 10_000),
                _ => (u64::from(len) - 7000, 7000),
            };
            let tag = round * 100 + u64::from(index);
            wanted.push((tag, index, offset, size));
            pool.submit(Request {
                tag,
                drive: 0,
                op: Op::Read {
                    chunk: chunk(index),
                    offset,
                    len: size,
                    check: ReadCheck::Worker,
                },
                reply: reply.clone(),
            })
            .unwrap();
        }
    }
    for _ in 0..wanted.len() {
        let completion = wait(&completions);
        let (_, index, offset, size) = *wanted.iter().find(|w| w.0 == completion.tag).unwrap();
        let Ok(Output::Read { lease, .. }) = completion.result else {
            panic!("read {} failed: {:?}", completion.tag, completion.result);
        };
        let start = offset as usize;
        assert_eq!(
            lease.as_slice(),
            &expected(index)[start..start + size as usize],
            "tag {}",
            completion.tag
        );
    }
    pool.shutdown();
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn writes_and_deletes_go_through_the_workers_and_survive_a_restart() {
    let (dir, drive, factory) = file_drive("writes", 0);
    let store = drive.store.clone();
    let pool = WorkerPool::start(
        &plan(&[0]),
        &[drive],
        factory,
        &config(PollMode::Interrupt, 4),
    )
    .unwrap();
    let (reply, completions) = crossbeam_channel::unbounded();
    for index in 0..4u32 {
        pool.submit(Request {
            tag: u64::from(index),
            drive: 0,
            op: Op::Write {
                chunk: chunk(index),
                data: expected(index),
            },
            reply: reply.clone(),
        })
        .unwrap();
    }
    for _ in 0..4 {
        assert!(matches!(wait(&completions).result, Ok(Output::Written)));
    }
    pool.submit(Request {
        tag: 9,
        drive: 0,
        op: Op::Delete { chunk: chunk(3) },
        reply: reply.clone(),
    })
    .unwrap();
    assert!(matches!(wait(&completions).result, Ok(Output::Deleted)));
    let rewrite = pool.submit(Request {
        tag: 10,
        drive: 0,
        op: Op::Write {
            chunk: chunk(0),
            data: vec![1; 10],
        },
        reply: reply.clone(),
    });
    assert!(rewrite.is_ok());
    let error = wait(&completions).result.unwrap_err();
    assert_eq!(error.errno(), libc::EEXIST, "{error}");
    pool.shutdown();
    assert_eq!(store.len(), 3);

    let mut device = UringDevice::open(&dir.join("drive"), &UringOptions::default()).unwrap();
    let (reopened, recovery) = ChunkStore::open(&mut device).unwrap();
    assert_eq!(recovery.chunks, 3);
    for index in 0..3 {
        assert_eq!(
            reopened.get(&mut device, chunk(index)).unwrap(),
            expected(index)
        );
    }
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn an_empty_buffer_pool_makes_requests_wait_instead_of_allocating() {
    let (dir, drive, factory) = file_drive("bounded", 4);
    let pool = WorkerPool::start(
        &plan(&[0]),
        &[drive],
        factory,
        &config(PollMode::Adaptive, 2),
    )
    .unwrap();
    let (reply, completions) = crossbeam_channel::unbounded();
    for tag in 0..6u64 {
        pool.submit(Request {
            tag,
            drive: 0,
            op: Op::Read {
                chunk: chunk(tag as u32 % 4),
                offset: 0,
                len: 4096,
                check: ReadCheck::Worker,
            },
            reply: reply.clone(),
        })
        .unwrap();
    }
    // Two buffers: two completions, and the rest wait while their leases are held.
    let held: Vec<_> = (0..2).map(|_| wait(&completions)).collect();
    assert!(
        completions
            .recv_timeout(Duration::from_millis(300))
            .is_err(),
        "a third read completed with both buffers leased"
    );
    drop(held);
    for _ in 0..4 {
        assert!(matches!(wait(&completions).result, Ok(Output::Read { .. })));
    }
    pool.shutdown();
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn bad_requests_get_clear_errors() {
    let (dir, drive, factory) = file_drive("bad", 1);
    let pool =
        WorkerPool::start(&plan(&[0]), &[drive], factory, &config(PollMode::Busy, 2)).unwrap();
    let cases: Vec<(u32, u64, u32, i32)> = vec![
        (5, 0, 4096, libc::ENOENT),         // no such chunk
        (0, CHUNK as u64, 1, libc::EINVAL), // past the end
        (0, 0, 0, libc::EINVAL),            // empty
    ];
    for (index, offset, len, errno) in cases {
        let completion = wait(&read(&pool, 1, index, offset, len));
        let error = completion.result.unwrap_err();
        assert_eq!(error.errno(), errno, "{error}");
    }
    let (reply, completions) = crossbeam_channel::unbounded();
    pool.submit(Request {
        tag: 2,
        drive: 3,
        op: Op::Delete { chunk: chunk(0) },
        reply,
    })
    .unwrap();
    assert!(matches!(
        wait(&completions).result,
        Err(RequestError::NoSuchDrive {
            drive: 3,
            drives: 1
        })
    ));
    pool.shutdown();
    std::fs::remove_dir_all(dir).unwrap();
}

/// One faulty drive shared with the test through its control handle.
fn faulty_drive() -> (DriveSpec, DeviceFactory, FaultControl) {
    let (mut device, control) = FaultyDevice::new("faulty", 4 << 20, 64);
    let store = ChunkStore::format(
        &mut device,
        StoreConfig {
            chunk_size: CHUNK,
            checksum_block_size: 4096,
        },
    )
    .unwrap();
    store.put(&mut device, chunk(0), &expected(0)).unwrap();
    let spec = DriveSpec {
        name: "faulty".into(),
        store: Arc::new(store),
        numa_node: 0,
        memory: None,
    };
    let device = Mutex::new(Some(device));
    let factory: DeviceFactory = Arc::new(move |_: &DriveSpec| {
        let device = device.lock().unwrap().take();
        device
            .map(|device| Box::new(device) as Box<dyn BlockDevice>)
            .ok_or_else(|| DeviceError::Open {
                device: "faulty".into(),
                source: std::io::Error::other("one worker only"),
            })
    });
    (spec, factory, control)
}

#[test]
fn faults_become_errors_and_never_wrong_bytes() {
    let (drive, factory, control) = faulty_drive();
    let pool = WorkerPool::start(
        &plan(&[0]),
        &[drive],
        factory,
        &config(PollMode::Adaptive, 4),
    )
    .unwrap();

    control.flip_read_bit(control.executed(), 12_345);
    let error = wait(&read(&pool, 1, 0, 0, 64 << 10)).result.unwrap_err();
    assert!(
        matches!(
            error,
            RequestError::Store(StoreError::Corrupt { block: 0, .. })
        ),
        "{error}"
    );

    control.fail_one(control.executed(), libc::EIO);
    let error = wait(&read(&pool, 2, 0, 0, 4096)).result.unwrap_err();
    assert_eq!(error.errno(), libc::EIO, "{error}");

    let Ok(Output::Read { lease, .. }) = wait(&read(&pool, 3, 0, 0, CHUNK)).result else {
        panic!("a healthy read failed");
    };
    assert_eq!(lease.as_slice(), expected(0));
    pool.shutdown();
}

#[test]
fn a_second_worker_on_a_single_device_drive_fails_to_start_with_a_clear_error() {
    let (drive, factory, _control) = faulty_drive();
    let error = WorkerPool::start(
        &plan(&[0, 1]),
        &[drive],
        factory,
        &config(PollMode::Adaptive, 2),
    )
    .unwrap_err();
    assert!(error.to_string().contains("worker 1"), "{error}");
    assert!(error.to_string().contains("one worker only"), "{error}");
}

#[test]
fn poll_modes_parse_from_configuration_text() {
    assert_eq!("busy".parse::<PollMode>().unwrap(), PollMode::Busy);
    assert_eq!("adaptive".parse::<PollMode>().unwrap(), PollMode::Adaptive);
    assert_eq!(
        "interrupt".parse::<PollMode>().unwrap(),
        PollMode::Interrupt
    );
    assert!(
        "spin"
            .parse::<PollMode>()
            .unwrap_err()
            .contains("busy, adaptive, interrupt")
    );
    assert_eq!(PollMode::default(), PollMode::Adaptive);
}

/// A source whose work shows up only when the worker says it is about to sleep, as a
/// network source's events are read only then: its wake fd, an eventfd, is rung to wake the
/// worker, and `prepare_to_sleep` clears it and takes the work in (reads of chunk `index` on
/// drive `drive`).
struct LazySource {
    drive: usize,
    inbox: Arc<Mutex<Vec<u32>>>,
    found: Vec<u32>,
    wake: std::os::fd::OwnedFd,
    /// `wake`'s fd, for the worker to watch.
    wake_fds: [std::os::fd::RawFd; 1],
    stop: Arc<std::sync::atomic::AtomicBool>,
    done: crossbeam_channel::Sender<Completion>,
}

impl tier0_dataplane::worker::RequestSource for LazySource {
    fn poll(&mut self, _max: usize, requests: &mut Vec<(u64, usize, Op)>) -> bool {
        for index in self.found.drain(..) {
            requests.push((
                u64::from(index),
                self.drive,
                Op::Read {
                    chunk: chunk(index),
                    offset: 0,
                    len: 4096,
                    check: ReadCheck::Worker,
                },
            ));
        }
        !self.stop.load(std::sync::atomic::Ordering::SeqCst)
    }

    fn complete(&mut self, completion: Completion) {
        let _ = self.done.send(completion);
    }

    fn wake_fds(&self) -> &[std::os::fd::RawFd] {
        &self.wake_fds
    }

    fn prepare_to_sleep(&mut self) -> bool {
        use std::os::fd::AsRawFd as _;
        let mut count = 0u64;
        // SAFETY: reads 8 bytes from our non-blocking eventfd into `count`.
        unsafe { libc::read(self.wake.as_raw_fd(), (&raw mut count).cast(), 8) };
        self.found
            .extend(std::mem::take(&mut *self.inbox.lock().unwrap()));
        self.found.is_empty()
    }

    fn close(self: Box<Self>) {}
}

/// The test's side of a [`LazySource`].
struct LazyFeed {
    inbox: Arc<Mutex<Vec<u32>>>,
    ring: std::os::fd::OwnedFd,
    completions: Receiver<Completion>,
}

impl LazyFeed {
    /// Rings the source's eventfd.
    fn ring(&self) {
        ring(&self.ring);
    }

    /// Hands the source reads of chunks 0 and 1 in turn, one at a time, each after the worker
    /// has had time to fall asleep, and checks they are served within `bound` all together
    /// (the pauses before them not counted).
    fn read_one_at_a_time(&self, reads: u32, bound: Duration) {
        let mut total = Duration::ZERO;
        for read in 0..reads {
            std::thread::sleep(Duration::from_millis(5));
            let index = read % 2;
            let started = std::time::Instant::now();
            self.inbox.lock().unwrap().push(index);
            self.ring();
            let completion = wait(&self.completions);
            let took = started.elapsed();
            let Ok(Output::Read { lease, .. }) = completion.result else {
                panic!("read {read} failed: {:?}", completion.result);
            };
            assert_eq!(lease.as_slice(), &expected(index)[..4096], "read {read}");
            total += took;
        }
        assert!(total < bound, "{reads} reads took {total:?}");
    }
}

/// Adds one to an eventfd.
fn ring(eventfd: &std::os::fd::OwnedFd) {
    use std::os::fd::AsRawFd as _;
    // SAFETY: writes 8 bytes to an eventfd we hold open.
    unsafe { libc::write(eventfd.as_raw_fd(), (&1u64 as *const u64).cast(), 8) };
}

/// Runs its closure when dropped, failed assertion or not.
struct Finally<F: FnMut()>(F);

impl<F: FnMut()> Drop for Finally<F> {
    fn drop(&mut self) {
        (self.0)();
    }
}

/// A worker on `drives` whose one source is a [`LazySource`] reading from drive `drive`; the
/// returned guard, dropped before the pool, finishes the source so the pool's shutdown (which
/// waits for its sources) ends.
fn lazy_pool(
    drives: &[DriveSpec],
    factory: DeviceFactory,
    drive: usize,
) -> (WorkerPool, LazyFeed, Finally<impl FnMut() + use<>>) {
    use std::os::fd::{FromRawFd as _, OwnedFd};
    // SAFETY: eventfd returns a new fd that we own.
    let wake = unsafe { OwnedFd::from_raw_fd(libc::eventfd(0, libc::EFD_NONBLOCK)) };
    let inbox = Arc::new(Mutex::new(Vec::new()));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (done, completions) = crossbeam_channel::unbounded();
    let feed = LazyFeed {
        inbox: inbox.clone(),
        ring: wake.try_clone().unwrap(),
        completions,
    };
    let source = Mutex::new(Some(LazySource {
        drive,
        inbox,
        found: Vec::new(),
        wake_fds: [std::os::fd::AsRawFd::as_raw_fd(&wake)],
        wake,
        stop: stop.clone(),
        done,
    }));
    let mut config = config(PollMode::Interrupt, 8);
    config.sources = Some(Arc::new(move |_| {
        let source = source.lock().unwrap().take();
        source
            .map(|s| Box::new(s) as Box<dyn tier0_dataplane::worker::RequestSource>)
            .into_iter()
            .collect()
    }));
    let pool = WorkerPool::start(&plan(&[0]), drives, factory, &config).unwrap();
    let eventfd = feed.ring.try_clone().unwrap();
    let guard = Finally(move || {
        stop.store(true, std::sync::atomic::Ordering::SeqCst);
        ring(&eventfd);
    });
    (pool, feed, guard)
}

// A worker that slept anyway, its wake fd cleared, would sleep out its 100 ms bound on its
// sources (nothing in flight: 2 s for 20 reads) or forever (a read in flight on a stalled
// drive: `wait` gives up after 10 s) before each read. 20 reads served in time take a few
// milliseconds; the bound leaves a loaded machine room.
const LAZY_READS: u32 = 20;
const LAZY_READS_BOUND: Duration = Duration::from_secs(1);

#[test]
fn work_a_source_finds_as_the_worker_goes_to_sleep_is_served_before_it_sleeps() {
    let (dir, drive, factory) = file_drive("lazy", 2);
    let (pool, feed, finish) = lazy_pool(&[drive], factory, 0);
    feed.read_one_at_a_time(LAZY_READS, LAZY_READS_BOUND);
    drop(finish);
    pool.shutdown();
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn work_a_source_finds_as_the_worker_goes_to_sleep_with_io_in_flight_is_served_before_it_sleeps() {
    let (dir, file, file_factory) = file_drive("lazy-in-flight", 2);
    let (faulty, faulty_factory, control) = faulty_drive();
    let factory: DeviceFactory = Arc::new(move |spec: &DriveSpec| {
        if spec.name == "faulty" {
            faulty_factory(spec)
        } else {
            file_factory(spec)
        }
    });
    // Drive 0 stops answering, so the worker sleeps with a read in flight on it.
    control.stall(true);
    let (pool, feed, finish) = lazy_pool(&[faulty, file], factory, 1);
    let release = Finally(|| control.stall(false));
    let before = control.submitted();
    let stuck = read(&pool, 99, 0, 0, 4096);
    // The reads below must find the worker asleep with this one in flight.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while control.submitted() == before {
        assert!(
            std::time::Instant::now() < deadline,
            "the read never reached the drive"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
    feed.read_one_at_a_time(LAZY_READS, LAZY_READS_BOUND);
    drop(release);
    // The released read completes at the worker's next wake, with the right bytes.
    feed.ring();
    let Ok(Output::Read { lease, .. }) = wait(&stuck).result else {
        panic!("the read on the released drive failed");
    };
    assert_eq!(lease.as_slice(), &expected(0)[..4096]);
    drop(lease);
    drop(finish);
    pool.shutdown();
    std::fs::remove_dir_all(dir).unwrap();
}
