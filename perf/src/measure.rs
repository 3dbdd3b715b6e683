//! What a benchmark measures besides time: CPU used, and latency percentiles.

use std::time::Duration;

use hdrhistogram::Histogram;

use crate::report::Latency;

/// CPU time (user + system) of this process, or of its waited-for children.
#[derive(Clone, Copy, Debug)]
pub enum Who {
    Process,
    /// The calling thread only.
    Thread,
    Children,
}

pub fn cpu_seconds(who: Who) -> f64 {
    let target = match who {
        Who::Process => libc::RUSAGE_SELF,
        Who::Thread => libc::RUSAGE_THREAD,
        Who::Children => libc::RUSAGE_CHILDREN,
    };
    let mut usage = std::mem::MaybeUninit::<libc::rusage>::uninit();
    // SAFETY: getrusage fills the struct we pass and nothing else.
    let usage = unsafe {
        libc::getrusage(target, usage.as_mut_ptr());
        usage.assume_init()
    };
    let seconds = |time: libc::timeval| time.tv_sec as f64 + time.tv_usec as f64 / 1e6;
    seconds(usage.ru_utime) + seconds(usage.ru_stime)
}

/// Request latencies, recorded in nanoseconds (1 µs to 100 s at 3 significant digits).
#[derive(Debug)]
pub struct LatencyRecorder {
    histogram: Histogram<u64>,
}

impl Default for LatencyRecorder {
    fn default() -> Self {
        LatencyRecorder {
            histogram: Histogram::new_with_bounds(1_000, 100_000_000_000, 3)
                .expect("valid histogram bounds"),
        }
    }
}

impl LatencyRecorder {
    pub fn record(&mut self, latency: Duration) {
        let nanos = (latency.as_nanos() as u64).clamp(1_000, 100_000_000_000);
        self.histogram.saturating_record(nanos);
    }

    pub fn summary(&self) -> Latency {
        let micros = |quantile: f64| self.histogram.value_at_quantile(quantile) as f64 / 1_000.0;
        Latency {
            p50_us: micros(0.5),
            p99_us: micros(0.99),
            p999_us: micros(0.999),
        }
    }
}
