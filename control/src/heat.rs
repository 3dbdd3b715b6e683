//! Read heat as the data nodes report it: per chunk, per node, the decayed reads and bytes
//! its last heartbeat carried. Soft state in memory: a heartbeat replaces the node's whole
//! report, a restarted control plane starts cold and is warm again one heartbeat later, and
//! nothing here is ever written to the metadata store (heat changes with every read; a store
//! write per heartbeat would cost more than the reads it describes).
//!
//! Counts decay as on the daemons (`value × 2^(−Δt / half_life)`, `dataplane/src/heat.rs`),
//! from the moment of the report, with the half-life the node reported.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use tier0_dataplane::store::ChunkId;

/// Decayed reads and bytes.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Heat {
    pub reads: f64,
    pub bytes: f64,
}

impl Heat {
    fn decayed(self, elapsed: Duration, half_life: Duration) -> Heat {
        let factor = 0.5f64.powf(elapsed.as_secs_f64() / half_life.as_secs_f64().max(1e-3));
        Heat {
            reads: self.reads * factor,
            bytes: self.bytes * factor,
        }
    }
}

#[derive(Debug)]
struct Report {
    at: Instant,
    half_life: Duration,
    chunks: HashMap<ChunkId, Heat>,
}

/// The nodes' latest heat reports.
#[derive(Debug, Default)]
pub struct HeatTable {
    reports: Mutex<HashMap<String, Report>>,
}

impl HeatTable {
    /// Replaces `node`'s report with `chunks`, measured now.
    pub fn report(&self, node: &str, half_life: Duration, chunks: Vec<(ChunkId, Heat)>) {
        self.report_at(node, half_life, chunks, Instant::now());
    }

    pub fn report_at(
        &self,
        node: &str,
        half_life: Duration,
        chunks: Vec<(ChunkId, Heat)>,
        at: Instant,
    ) {
        let report = Report {
            at,
            half_life,
            chunks: chunks.into_iter().collect(),
        };
        self.lock().insert(node.to_string(), report);
    }

    /// Forgets a node (it left the cluster).
    pub fn forget(&self, node: &str) {
        self.lock().remove(node);
    }

    /// Each node's heat for `chunk`, decayed to `now`, hottest first; nodes that did not
    /// report it are left out.
    pub fn chunk_at(&self, chunk: ChunkId, now: Instant) -> Vec<(String, Heat)> {
        let reports = self.lock();
        let mut nodes: Vec<(String, Heat)> = reports
            .iter()
            .filter_map(|(node, report)| {
                let heat = report.chunks.get(&chunk)?;
                let elapsed = now.saturating_duration_since(report.at);
                Some((node.clone(), heat.decayed(elapsed, report.half_life)))
            })
            .collect();
        nodes.sort_by(|a, b| b.1.reads.total_cmp(&a.1.reads).then(a.0.cmp(&b.0)));
        nodes
    }

    pub fn chunk(&self, chunk: ChunkId) -> Vec<(String, Heat)> {
        self.chunk_at(chunk, Instant::now())
    }

    /// Every reported chunk's reads, summed over the nodes that reported it and decayed to
    /// `now`: one walk over the reports, for a pass that looks at many chunks.
    pub fn totals_at(&self, now: Instant) -> HashMap<ChunkId, f64> {
        let reports = self.lock();
        let mut totals: HashMap<ChunkId, f64> = HashMap::new();
        for report in reports.values() {
            let elapsed = now.saturating_duration_since(report.at);
            for (chunk, heat) in &report.chunks {
                *totals.entry(*chunk).or_default() += heat.decayed(elapsed, report.half_life).reads;
            }
        }
        totals
    }

    pub fn totals(&self) -> HashMap<ChunkId, f64> {
        self.totals_at(Instant::now())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Report>> {
        self.reports
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chunk(index: u32) -> ChunkId {
        ChunkId {
            file: 4,
            index,
            generation: 1,
        }
    }

    #[test]
    fn a_report_replaces_the_last_and_decays_from_when_it_was_made() {
        let table = HeatTable::default();
        let minute = Duration::from_secs(60);
        let start = Instant::now();
        let hot = Heat {
            reads: 8.0,
            bytes: 8.0 * 4096.0,
        };
        table.report_at("a", minute, vec![(chunk(0), hot), (chunk(1), hot)], start);
        table.report_at(
            "b",
            minute,
            vec![(
                chunk(0),
                Heat {
                    reads: 2.0,
                    bytes: 0.0,
                },
            )],
            start,
        );
        let later = start + minute;
        let nodes = table.chunk_at(chunk(0), later);
        assert_eq!(nodes.len(), 2);
        assert_eq!(nodes[0].0, "a");
        assert!((nodes[0].1.reads - 4.0).abs() < 1e-9, "{nodes:?}");
        assert!((nodes[1].1.reads - 1.0).abs() < 1e-9, "{nodes:?}");
        let totals = table.totals_at(later);
        assert!((totals[&chunk(0)] - 5.0).abs() < 1e-9, "{totals:?}");
        assert!((totals[&chunk(1)] - 4.0).abs() < 1e-9, "{totals:?}");
        // Node a's next report no longer lists chunk 1: it went cold there.
        table.report_at("a", minute, vec![(chunk(0), hot)], later);
        assert!(table.chunk_at(chunk(1), later).is_empty());
        assert_eq!(table.chunk_at(chunk(0), later)[0].1, hot);
        table.forget("a");
        assert_eq!(table.chunk_at(chunk(0), later).len(), 1);
    }
}
