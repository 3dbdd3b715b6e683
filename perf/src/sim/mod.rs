//! The cluster simulator (`tier0 sim`): a discrete-event model of a GPU cluster whose nodes'
//! NVMe drives hold the training data, run three times from the same seed — with no
//! rebalancing, with tier0's rebalancer, and with an oracle — to report accelerator
//! utilization (AU: the share of a training GPU's time spent computing rather than waiting
//! for data, as MLPerf Storage defines it) side by side.
//!
//! What is modelled (every figure a flag, printed with the result):
//! - `nodes` nodes of `gpus` GPUs. Each node has its drives' read bandwidth (`nvme_gbps`, for
//!   all its drives) and a NIC (`nic_gbps` each way). A transfer holds every resource on its
//!   route (drives, the serving NIC's send side, the reading NIC's receive side) first come
//!   first served: a resource serves one transfer at a time at its full bandwidth, so a
//!   saturated drive or NIC makes the readers behind it wait.
//! - Datasets of `dataset_gib` in extents of `extent_mib`, placed when the simulation starts by
//!   the control plane's own placement (`tier0_control::placement::place`: striped over
//!   every node, `replication` replicas).
//! - Training jobs on whole nodes (`busy_share` of the nodes, 1 to `job_nodes` nodes a job),
//!   each reading one dataset (chosen at random; several jobs may share one), for a length
//!   drawn between `job_minutes`; when a job ends, a new one starts on its nodes with another
//!   dataset. Each GPU reads extents at random from its job's dataset, keeps `prefetch` of
//!   them in flight or ready, and computes on each for `extent / gpu_gbps` seconds (the rate
//!   at which a GPU consumes its data at full AU, as an MLPerf Storage workload sets it). A
//!   GPU reads from a replica on its own node, else from the replica whose drive and NIC
//!   free up first.
//! - **none**: the data stays where it was placed.
//! - **tier0**: every `rebalance_s` the leader's pass runs on the control plane's own code:
//!   the daemons' heat maps (`tier0_dataplane::heat::HeatMap`, per node, the 4096 hottest as
//!   a heartbeat carries them) feed `HeatTable`, the jobs and GPUs feed `GpuTable` as a
//!   scheduler would, and `tier0_control::rebalance::plan` decides the moves (home ranking,
//!   policies, budget, watermarks, drops). Its copies then run as `rebalance::run` makes
//!   them: copies to one node one after another, at most `COPY_STREAMS` nodes at once, each
//!   holding the source drive and NIC and the target's NIC and drives; a replica is readable
//!   once its copy is done; the next pass starts when the last copy is done and the interval
//!   has passed.
//! - **oracle**: every read is served by the reader's own drives, as if each job's data had
//!   always been on its nodes (an upper bound: no copies, no capacity limit).
//!
//! What is not: the network's core (only the nodes' NICs limit), synchronous steps across a
//! job's GPUs (each GPU waits only for its own data), compute jitter, failures.

mod engine;
pub mod planner;

use serde::Serialize;

pub use engine::Policy;

/// The cluster, workload and rebalancer a simulation runs.
#[derive(Clone, Debug, Serialize)]
pub struct SimConfig {
    pub nodes: u32,
    pub gpus: u32,
    /// Read bandwidth of a node's drives together, GB/s (10⁹ bytes a second).
    pub nvme_gbps: f64,
    /// A node's NIC, GB/s each way.
    pub nic_gbps: f64,
    /// What one GPU consumes at full AU, GB/s. The default (4) makes a busy node's GPUs want
    /// more than its NIC carries (32 against 25 GB/s): the case tier0 is for.
    pub gpu_gbps: f64,
    pub extent_mib: u32,
    /// Extents a GPU keeps in flight or ready.
    pub prefetch: u32,
    pub datasets: u32,
    pub dataset_gib: u64,
    pub replication: u32,
    /// A node's drive capacity, GiB.
    pub capacity_gib: u64,
    /// The share of nodes running jobs.
    pub busy_share: f64,
    /// Most nodes a job takes.
    pub job_nodes: u32,
    /// A job's length is drawn between these, minutes.
    pub job_minutes: (f64, f64),
    pub duration_s: f64,
    /// Seconds between rebalancer passes.
    pub rebalance_s: f64,
    /// The rebalancer's budget, bytes copied per rolling hour (cluster-wide).
    pub move_budget_bytes: u64,
    pub high_watermark: f64,
    /// The added time of a read from another node (the network's round trip), µs.
    pub remote_latency_us: f64,
    pub seed: u64,
}

impl Default for SimConfig {
    fn default() -> Self {
        SimConfig {
            nodes: 1000,
            gpus: 8,
            nvme_gbps: 48.0,
            nic_gbps: 25.0,
            gpu_gbps: 4.0,
            extent_mib: 1024,
            prefetch: 2,
            datasets: 64,
            dataset_gib: 512,
            replication: 1,
            capacity_gib: 30 << 10,
            busy_share: 0.75,
            job_nodes: 8,
            job_minutes: (10.0, 30.0),
            duration_s: 1800.0,
            rebalance_s: 30.0,
            move_budget_bytes: 1000 << 40,
            high_watermark: 0.9,
            remote_latency_us: 20.0,
            seed: 1,
        }
    }
}

impl SimConfig {
    /// Checks the figures, naming the one that is wrong.
    pub fn check(&self) -> Result<(), String> {
        let positive = [
            ("nvme-gbps", self.nvme_gbps),
            ("nic-gbps", self.nic_gbps),
            ("gpu-gbps", self.gpu_gbps),
            ("duration", self.duration_s),
            ("rebalance-interval", self.rebalance_s),
        ];
        for (name, value) in positive {
            if !(value.is_finite() && value > 0.0) {
                return Err(format!("--{name} {value}: a number above 0"));
            }
        }
        if self.nodes == 0 || self.gpus == 0 {
            return Err("--nodes and --gpus: at least 1".into());
        }
        if self.nodes > 100_000 || self.gpus > 64 {
            return Err(format!(
                "--nodes {} --gpus {}: at most 100000 nodes of 64 GPUs",
                self.nodes, self.gpus
            ));
        }
        if self.extent_mib == 0 || self.extent_mib > 4095 {
            return Err(format!(
                "--extent-mib {}: 1 to 4095 (an extent is one chunk)",
                self.extent_mib
            ));
        }
        if self.prefetch == 0 {
            return Err("--prefetch: at least 1".into());
        }
        if self.datasets == 0 || self.dataset_gib == 0 {
            return Err("--datasets and --dataset-gib: at least 1".into());
        }
        if self.replication == 0 || self.replication > self.nodes.min(8) {
            return Err(format!(
                "--replication {}: 1 to {}",
                self.replication,
                self.nodes.min(8)
            ));
        }
        if !(self.busy_share > 0.0 && self.busy_share <= 1.0) {
            return Err(format!(
                "--busy-share {}: above 0, at most 1",
                self.busy_share
            ));
        }
        if self.job_nodes == 0 {
            return Err("--job-nodes: at least 1".into());
        }
        let (short, long) = self.job_minutes;
        if !(short > 0.0 && long >= short && long.is_finite()) {
            return Err(format!(
                "--job-minutes {short}..{long}: above 0, the first no more than the second"
            ));
        }
        if !(self.high_watermark > 0.0 && self.high_watermark <= 1.0) {
            return Err(format!(
                "--high-watermark {}: above 0, at most 1",
                self.high_watermark
            ));
        }
        if !(self.remote_latency_us.is_finite() && self.remote_latency_us >= 0.0) {
            return Err(format!(
                "--remote-latency-us {}: 0 or more",
                self.remote_latency_us
            ));
        }
        Ok(())
    }

    pub fn extent_bytes(&self) -> u64 {
        u64::from(self.extent_mib) << 20
    }

    pub fn extents_per_dataset(&self) -> u32 {
        (self.dataset_gib << 30).div_ceil(self.extent_bytes()) as u32
    }
}

/// One policy's run.
#[derive(Clone, Debug, Serialize)]
pub struct PolicyReport {
    pub policy: Policy,
    /// Compute time over allotted time, all training GPUs together.
    pub au: f64,
    /// The share of GPU-time at AU 90% or better (MLPerf Storage's passing mark), by job.
    pub jobs_at_90: f64,
    pub jobs: u64,
    pub bytes_read_local: u64,
    pub bytes_read_remote: u64,
    /// Bytes the rebalancer copied, replicas it dropped, passes it ran.
    pub bytes_moved: u64,
    pub copies: u64,
    pub drops: u64,
    pub passes: u64,
    /// Wall time spent planning (the control plane's code), seconds.
    pub plan_seconds: f64,
    /// Events the simulation processed, and its wall time, seconds.
    pub events: u64,
    pub wall_seconds: f64,
}

/// The three policies side by side.
#[derive(Clone, Debug, Serialize)]
pub struct SimReport {
    pub au_none: f64,
    pub au_tier0: f64,
    pub au_oracle: f64,
    pub params: SimConfig,
    pub runs: Vec<PolicyReport>,
    pub wall_seconds: f64,
}

/// Runs the three policies (in parallel threads) from the same seed.
pub fn run(config: &SimConfig) -> Result<SimReport, String> {
    config.check()?;
    let start = std::time::Instant::now();
    let runs: Vec<PolicyReport> = std::thread::scope(|scope| {
        let handles: Vec<_> = [Policy::None, Policy::Tier0, Policy::Oracle]
            .into_iter()
            .map(|policy| scope.spawn(move || engine::simulate(config, policy)))
            .collect();
        handles
            .into_iter()
            .map(|handle| handle.join().expect("a simulation thread panicked"))
            .collect()
    });
    let au = |policy: Policy| {
        runs.iter()
            .find(|run| run.policy == policy)
            .map_or(0.0, |run| run.au)
    };
    Ok(SimReport {
        au_none: au(Policy::None),
        au_tier0: au(Policy::Tier0),
        au_oracle: au(Policy::Oracle),
        params: config.clone(),
        runs: runs.clone(),
        wall_seconds: start.elapsed().as_secs_f64(),
    })
}

/// A table of the three runs, for people.
pub fn render(report: &SimReport) -> String {
    let p = &report.params;
    let mut out = format!(
        "{} nodes × {} GPUs; drives {} GB/s, NIC {} GB/s a node; a GPU consumes {} GB/s at full AU\n\
         {} datasets of {} GiB in {} MiB extents, replication {}; {:.0}% of nodes busy, jobs of 1–{} nodes, {}–{} min\n\
         {} s simulated, rebalancer every {} s, budget {} GiB an hour\n\n",
        p.nodes,
        p.gpus,
        p.nvme_gbps,
        p.nic_gbps,
        p.gpu_gbps,
        p.datasets,
        p.dataset_gib,
        p.extent_mib,
        p.replication,
        100.0 * p.busy_share,
        p.job_nodes,
        p.job_minutes.0,
        p.job_minutes.1,
        p.duration_s,
        p.rebalance_s,
        p.move_budget_bytes >> 30,
    );
    out.push_str(&format!(
        "{:<8} {:>7} {:>9} {:>11} {:>10} {:>8} {:>7} {:>10} {:>8}\n",
        "policy",
        "AU",
        "jobs≥90%",
        "local read",
        "moved GiB",
        "copies",
        "drops",
        "plan s",
        "wall s"
    ));
    for run in &report.runs {
        let read = (run.bytes_read_local + run.bytes_read_remote).max(1);
        out.push_str(&format!(
            "{:<8} {:>6.1}% {:>8.0}% {:>10.0}% {:>10} {:>8} {:>7} {:>10.2} {:>8.1}\n",
            run.policy.name(),
            100.0 * run.au,
            100.0 * run.jobs_at_90,
            100.0 * run.bytes_read_local as f64 / read as f64,
            run.bytes_moved >> 30,
            run.copies,
            run.drops,
            run.plan_seconds,
            run.wall_seconds,
        ));
    }
    out.push_str(&format!(
        "\nAU tier0 / none: {:.2}×; tier0 / oracle: {:.2}×\n",
        report.au_tier0 / report.au_none.max(1e-9),
        report.au_tier0 / report.au_oracle.max(1e-9)
    ));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn small(gpu_gbps: f64) -> SimConfig {
        SimConfig {
            nodes: 24,
            gpus: 8,
            gpu_gbps,
            datasets: 6,
            dataset_gib: 96,
            duration_s: 600.0,
            move_budget_bytes: 24 << 40,
            ..SimConfig::default()
        }
    }

    /// GPUs that want more than a NIC carries (8 × 4 GB/s > 25 GB/s) wait on remote data
    /// without rebalancing; the rebalancer's copies make most reads local and win back most
    /// of the gap to the oracle, whose reads are all local.
    #[test]
    fn when_the_network_starves_the_gpus_the_rebalancer_closes_most_of_the_gap() {
        let report = run(&small(4.0)).unwrap();
        let tier0 = &report.runs[1];
        assert!(report.au_none < 0.85, "{report:?}");
        assert!(report.au_oracle > 0.97, "{report:?}");
        assert!(
            report.au_tier0 > report.au_none + 0.5 * (report.au_oracle - report.au_none),
            "{report:?}"
        );
        assert!(tier0.copies > 0 && tier0.bytes_read_local > tier0.bytes_read_remote);
        assert_eq!(report.runs[0].copies, 0);
        assert!(tier0.bytes_moved <= report.params.move_budget_bytes);
    }

    /// GPUs the network feeds fully are at full AU whatever the placement.
    #[test]
    fn when_the_network_suffices_every_policy_keeps_the_gpus_busy() {
        let report = run(&small(1.0)).unwrap();
        for run in &report.runs {
            assert!(run.au > 0.97, "{run:?}");
            assert!(run.jobs > 0 && run.events > 0);
        }
    }

    /// A budget of nothing moves nothing: tier0 is then no rebalancing at all.
    #[test]
    fn a_zero_budget_moves_nothing() {
        let config = SimConfig {
            move_budget_bytes: 0,
            ..small(4.0)
        };
        let report = run(&config).unwrap();
        assert_eq!(report.runs[1].copies, 0);
        assert!(
            (report.au_tier0 - report.au_none).abs() < 0.02,
            "{report:?}"
        );
    }

    #[test]
    fn bad_figures_are_named() {
        let cases = [
            (
                SimConfig {
                    nodes: 0,
                    ..SimConfig::default()
                },
                "--nodes",
            ),
            (
                SimConfig {
                    nic_gbps: -1.0,
                    ..SimConfig::default()
                },
                "--nic-gbps",
            ),
            (
                SimConfig {
                    replication: 9,
                    ..SimConfig::default()
                },
                "--replication",
            ),
            (
                SimConfig {
                    job_minutes: (5.0, 1.0),
                    ..SimConfig::default()
                },
                "--job-minutes",
            ),
            (
                SimConfig {
                    busy_share: 0.0,
                    ..SimConfig::default()
                },
                "--busy-share",
            ),
        ];
        for (config, flag) in cases {
            let error = run(&config).unwrap_err();
            assert!(error.contains(flag), "{flag}: {error}");
        }
    }

    /// The planner benchmark plans real moves with the control plane's code.
    #[test]
    fn the_planner_benchmark_plans_copies_toward_the_readers() {
        let report = planner::run(&planner::PlannerConfig {
            extents: 20_000,
            nodes: 40,
            files: 50,
            hot_share: 0.2,
            ..planner::PlannerConfig::default()
        })
        .unwrap();
        assert!(report.hot_extents > 0);
        assert!(report.moves > 0 && report.executable > 0, "{report:?}");
        assert!(report.executable + report.refused <= report.moves);
    }
}
