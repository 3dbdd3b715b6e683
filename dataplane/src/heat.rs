//! Read heat per chunk: reads and bytes served, each an exponentially decayed count, so a
//! chunk read a thousand times an hour ago counts for less than one read a hundred times in
//! the last minute. The daemon's request sources count every read they accept; the membership
//! agent reports the hottest chunks with each heartbeat, and the control plane's rebalancer
//! plans from them.
//!
//! A count decays as `value × 2^(−Δt / half_life)`: stored with the time it was last brought
//! up to date, so recording and reading are O(1) and nothing runs in the background.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::store::ChunkId;

/// The default half-life: ten minutes, a few epochs of a typical training job's pass over a
/// shard, so heat follows the job that is running rather than the one that ran.
pub const DEFAULT_HALF_LIFE: Duration = Duration::from_secs(600);

/// Counts below this are dropped: a chunk read once decays below it in about seven
/// half-lives, and the map only holds chunks that were read lately.
const FORGET_BELOW: f64 = 0.01;

const SHARDS: usize = 16;

/// A chunk's heat at one moment.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Heat {
    /// Reads, decayed.
    pub reads: f64,
    /// Bytes read, decayed.
    pub bytes: f64,
}

#[derive(Clone, Copy, Debug)]
struct Entry {
    heat: Heat,
    /// Seconds since the map's epoch at which `heat` was exact.
    at: f64,
}

/// Per-chunk read heat, shared by a daemon's request sources (sharded locks: workers that
/// read different chunks do not contend).
#[derive(Debug)]
pub struct HeatMap {
    shards: Vec<Mutex<HashMap<ChunkId, Entry>>>,
    half_life: Duration,
    epoch: Instant,
    /// `epoch` on the kernel's monotonic clock, which `Instant` reads too: the base for the
    /// coarse readings of [`HeatMap::record`] (None where either clock cannot be read: then
    /// it reads the precise one).
    epoch_monotonic: Option<Duration>,
}

impl HeatMap {
    pub fn new(half_life: Duration) -> Arc<HeatMap> {
        Arc::new(HeatMap {
            shards: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
            half_life: half_life.max(Duration::from_millis(1)),
            epoch: Instant::now(),
            epoch_monotonic: monotonic(libc::CLOCK_MONOTONIC)
                .filter(|_| monotonic(libc::CLOCK_MONOTONIC_COARSE).is_some()),
        })
    }

    pub fn half_life(&self) -> Duration {
        self.half_life
    }

    /// One read of `bytes` bytes of `chunk`, now: on the coarse clock (a few milliseconds
    /// of resolution, nothing against a half-life of minutes), which costs no hardware
    /// read, where a precise reading costs one per read served (a system call and an
    /// emulated device read on a VM whose clock source is the HPET).
    pub fn record(&self, chunk: ChunkId, bytes: u64) {
        let at = match self
            .epoch_monotonic
            .zip(monotonic(libc::CLOCK_MONOTONIC_COARSE))
        {
            Some((epoch, now)) => now.saturating_sub(epoch).as_secs_f64(),
            None => self.seconds(Instant::now()),
        };
        self.record_at_seconds(chunk, bytes, at);
    }

    /// One read at `when` (for tests). One earlier than the chunk's last adds its read
    /// undecayed and leaves the chunk's stamp where it was.
    pub fn record_at(&self, chunk: ChunkId, bytes: u64, when: Instant) {
        self.record_at_seconds(chunk, bytes, self.seconds(when));
    }

    fn record_at_seconds(&self, chunk: ChunkId, bytes: u64, at: f64) {
        let mut shard = self.shard(chunk);
        let entry = shard.entry(chunk).or_insert(Entry {
            heat: Heat {
                reads: 0.0,
                bytes: 0.0,
            },
            at,
        });
        let decayed = self.decay(entry.heat, at - entry.at);
        entry.heat = Heat {
            reads: decayed.reads + 1.0,
            bytes: decayed.bytes + bytes as f64,
        };
        // Reads recorded at once by several threads may take the lock out of clock order:
        // the stamp never goes back.
        entry.at = entry.at.max(at);
    }

    /// The chunk's heat now (zero for one not read lately).
    pub fn heat(&self, chunk: ChunkId) -> Heat {
        self.heat_at(chunk, Instant::now())
    }

    pub fn heat_at(&self, chunk: ChunkId, when: Instant) -> Heat {
        let at = self.seconds(when);
        match self.shard(chunk).get(&chunk) {
            Some(entry) => self.decay(entry.heat, at - entry.at),
            None => Heat {
                reads: 0.0,
                bytes: 0.0,
            },
        }
    }

    /// The `max` hottest chunks now, hottest first (by reads), and forgets the ones that
    /// have gone cold.
    pub fn hottest(&self, max: usize) -> Vec<(ChunkId, Heat)> {
        self.hottest_at(max, Instant::now())
    }

    pub fn hottest_at(&self, max: usize, when: Instant) -> Vec<(ChunkId, Heat)> {
        let at = self.seconds(when);
        let mut all = Vec::new();
        for shard in &self.shards {
            let mut shard = shard
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            shard.retain(|chunk, entry| {
                let heat = self.decay(entry.heat, at - entry.at);
                let keep = heat.reads >= FORGET_BELOW;
                if keep {
                    all.push((*chunk, heat));
                }
                keep
            });
        }
        all.sort_by(|a, b| b.1.reads.total_cmp(&a.1.reads).then(a.0.cmp(&b.0)));
        all.truncate(max);
        all
    }

    fn decay(&self, heat: Heat, elapsed: f64) -> Heat {
        let factor = 0.5f64.powf(elapsed.max(0.0) / self.half_life.as_secs_f64());
        Heat {
            reads: heat.reads * factor,
            bytes: heat.bytes * factor,
        }
    }

    fn seconds(&self, when: Instant) -> f64 {
        when.saturating_duration_since(self.epoch).as_secs_f64()
    }

    fn shard(&self, chunk: ChunkId) -> std::sync::MutexGuard<'_, HashMap<ChunkId, Entry>> {
        let index = (chunk.file as usize ^ (chunk.index as usize).wrapping_mul(31)) % SHARDS;
        self.shards[index]
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// The kernel clock `clock` (`CLOCK_MONOTONIC` or its coarse reading) since boot; None if
/// the kernel cannot read it.
fn monotonic(clock: libc::clockid_t) -> Option<Duration> {
    let mut now = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec into `now`, a valid place for it.
    let rc = unsafe { libc::clock_gettime(clock, &mut now) };
    (rc == 0).then(|| Duration::new(now.tv_sec as u64, now.tv_nsec as u32))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chunk(index: u32) -> ChunkId {
        ChunkId {
            file: 9,
            index,
            generation: 1,
        }
    }

    #[test]
    fn heat_halves_every_half_life_and_adds_up() {
        let map = HeatMap::new(Duration::from_secs(60));
        let start = Instant::now();
        for _ in 0..8 {
            map.record_at(chunk(1), 4096, start);
        }
        let now = map.heat_at(chunk(1), start);
        assert_eq!((now.reads, now.bytes), (8.0, 8.0 * 4096.0));
        let later = map.heat_at(chunk(1), start + Duration::from_secs(60));
        assert!((later.reads - 4.0).abs() < 1e-9, "{later:?}");
        assert!((later.bytes - 4.0 * 4096.0).abs() < 1e-6, "{later:?}");
        // A read two half-lives on adds one to a quarter of the old count.
        map.record_at(chunk(1), 0, start + Duration::from_secs(120));
        let then = map.heat_at(chunk(1), start + Duration::from_secs(120));
        assert!((then.reads - 3.0).abs() < 1e-9, "{then:?}");
        assert_eq!(map.heat_at(chunk(2), start).reads, 0.0);
    }

    #[test]
    fn hottest_ranks_by_recent_reads_and_forgets_cold_chunks() {
        let map = HeatMap::new(Duration::from_secs(10));
        let start = Instant::now();
        // Chunk 1: many reads long ago; chunk 2: a few just now; chunk 3: one, long ago.
        for _ in 0..100 {
            map.record_at(chunk(1), 1, start);
        }
        map.record_at(chunk(3), 1, start);
        let now = start + Duration::from_secs(60);
        for _ in 0..5 {
            map.record_at(chunk(2), 1, now);
        }
        let hottest = map.hottest_at(10, now);
        let order: Vec<u32> = hottest.iter().map(|(chunk, _)| chunk.index).collect();
        // 100 reads six half-lives ago are 1.56 now; one read then is 0.016.
        assert_eq!(order, vec![2, 1, 3]);
        assert_eq!(map.hottest_at(1, now).len(), 1);
        // Far later, everything is forgotten.
        assert!(
            map.hottest_at(10, now + Duration::from_secs(3600))
                .is_empty()
        );
        assert_eq!(map.heat_at(chunk(2), now).reads, 0.0);
    }

    #[test]
    fn reads_recorded_on_the_coarse_clock_are_placed_on_the_precise_one() {
        // A ten-second half-life: a stamp off by ten seconds would halve the count, while
        // 1% is lost only 145 ms after the stamp: a tick (at most 10 ms on any kernel) and
        // a test thread preempted for over 100 ms between its two readings fit in that.
        let map = HeatMap::new(Duration::from_secs(10));
        std::thread::sleep(Duration::from_millis(50));
        map.record(chunk(1), 10);
        let now = map.heat(chunk(1));
        assert!(now.reads > 0.99 && now.reads <= 1.0, "{now:?}");
        let later = map.heat_at(chunk(1), Instant::now() + Duration::from_secs(10));
        assert!(later.reads > 0.49 && later.reads <= 0.5, "{later:?}");
    }
}
