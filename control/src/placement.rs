//! Where new chunks go: striped across the up nodes, each chunk's replicas on distinct nodes
//! and, when there are enough, on distinct failure domains.

use crate::error::{ControlError, Result};
use crate::model::{NodeRecord, NodeState};

/// Most chunks placed by one request (a writer asks again for more): each is one write of
/// the placement's transaction, and etcd takes at most 128 by default.
pub const MAX_CHUNKS_PER_PLACEMENT: u32 = 100;

/// Replica node ids for chunks `first_index .. first_index + count` of file `file_id`.
///
/// The up nodes, in id order, form a ring. Chunk `i`'s first replica is ring position
/// `(start + i) mod n`, where `start` comes from the file id, so files begin on different
/// nodes and consecutive chunks of one file land on consecutive nodes (the stripe). Further
/// replicas walk the ring from there, taking the first node whose failure domain the chunk
/// does not use yet; when there are fewer domains than replicas, the remaining replicas take
/// the next nodes not used yet.
pub fn place(
    nodes: &[NodeRecord],
    replication: u32,
    file_id: u64,
    first_index: u32,
    count: u32,
) -> Result<Vec<Vec<String>>> {
    let mut ring: Vec<&NodeRecord> = nodes
        .iter()
        .filter(|node| node.state == NodeState::Up)
        .collect();
    ring.sort_by(|a, b| a.id.cmp(&b.id));
    let replication = replication as usize;
    if ring.len() < replication {
        return Err(ControlError::FailedPrecondition(format!(
            "replication {replication} needs {replication} data nodes up, {} are",
            ring.len()
        )));
    }
    let n = ring.len();
    // A multiplicative hash spreads consecutive file ids over the ring.
    let start = (file_id.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 32) as usize % n;
    let mut placements = Vec::with_capacity(count as usize);
    for offset in 0..count as usize {
        let first = (start + first_index as usize + offset) % n;
        let mut chosen: Vec<usize> = vec![first];
        // Distinct failure domains first, then any node not chosen yet.
        for pass in 0..2 {
            for step in 1..n {
                if chosen.len() == replication {
                    break;
                }
                let candidate = (first + step) % n;
                if chosen.contains(&candidate) {
                    continue;
                }
                let domain = ring[candidate].failure_domain();
                let domain_used = chosen.iter().any(|&c| ring[c].failure_domain() == domain);
                if pass == 1 || !domain_used {
                    chosen.push(candidate);
                }
            }
        }
        placements.push(chosen.into_iter().map(|c| ring[c].id.clone()).collect());
    }
    Ok(placements)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::TopologySummary;

    fn node(id: &str, domain: &str, state: NodeState) -> NodeRecord {
        NodeRecord {
            id: id.to_owned(),
            address: format!("{id}:7400"),
            topology: TopologySummary {
                failure_domain: domain.to_owned(),
                ..TopologySummary::default()
            },
            state,
            registered_ms: 0,
            heartbeat_ms: 0,
            lease_expires_ms: 0,
        }
    }

    #[test]
    fn stripes_over_up_nodes_with_distinct_replicas() {
        let nodes = [
            node("a", "", NodeState::Up),
            node("b", "", NodeState::Up),
            node("c", "", NodeState::Down),
            node("d", "", NodeState::Up),
        ];
        let placed = place(&nodes, 2, 7, 0, 6).unwrap();
        let firsts: Vec<&str> = placed.iter().map(|r| r[0].as_str()).collect();
        // Consecutive chunks start on consecutive up nodes: every up node leads twice.
        for id in ["a", "b", "d"] {
            assert_eq!(firsts.iter().filter(|f| **f == id).count(), 2, "{firsts:?}");
        }
        for replicas in &placed {
            assert_eq!(replicas.len(), 2);
            assert_ne!(replicas[0], replicas[1]);
            assert!(
                !replicas.contains(&"c".to_owned()),
                "a down node got a chunk"
            );
        }
    }

    #[test]
    fn replicas_take_distinct_failure_domains_when_there_are_enough() {
        let nodes = [
            node("a1", "rack-a", NodeState::Up),
            node("a2", "rack-a", NodeState::Up),
            node("b1", "rack-b", NodeState::Up),
            node("b2", "rack-b", NodeState::Up),
        ];
        for replicas in place(&nodes, 2, 3, 0, 16).unwrap() {
            assert_ne!(replicas[0][..1], replicas[1][..1], "{replicas:?}");
        }
        // Three replicas over two racks: both racks used, three distinct nodes.
        for replicas in place(&nodes, 3, 3, 0, 8).unwrap() {
            let mut unique = replicas.clone();
            unique.sort();
            unique.dedup();
            assert_eq!(unique.len(), 3);
            assert!(replicas.iter().any(|r| r.starts_with('a')));
            assert!(replicas.iter().any(|r| r.starts_with('b')));
        }
    }

    #[test]
    fn too_few_nodes_is_a_clear_error() {
        let nodes = [
            node("a", "", NodeState::Up),
            node("b", "", NodeState::Draining),
        ];
        let error = place(&nodes, 2, 1, 0, 1).unwrap_err().to_string();
        assert!(error.contains("needs 2 data nodes up, 1 are"), "{error}");
    }
}
