use std::io::Write;
use std::path::PathBuf;

use anyhow::Context;
use clap::Args;
use tier0_topology::{TopologyReport, WorkerPolicy, plan_workers, render_text};

#[derive(Debug, Args)]
pub struct TopologyArgs {
    /// Read an hwloc XML export instead of the live machine (`lstopo machine.xml` writes one).
    #[arg(long, value_name = "FILE")]
    xml: Option<PathBuf>,
    /// Print one JSON object instead of the text report.
    #[arg(long)]
    json: bool,
    /// Data-plane workers per NUMA node (default: one per physical core).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    workers_per_node: Option<u32>,
}

pub fn run(args: &TopologyArgs) -> anyhow::Result<()> {
    let machine = match &args.xml {
        Some(path) => tier0_topology::load_xml_file(path)?,
        None => tier0_topology::discover_live().context("discovering the live machine")?,
    };
    let policy = WorkerPolicy {
        workers_per_numa_node: args.workers_per_node.map(|n| n as usize),
        allowed_cpus: None,
    };
    let plan = plan_workers(&machine, &policy);

    let mut stdout = std::io::stdout().lock();
    if args.json {
        let report = TopologyReport {
            machine: &machine,
            worker_plan: &plan,
        };
        serde_json::to_writer_pretty(&mut stdout, &report).context("writing JSON")?;
        writeln!(stdout).context("writing JSON")?;
    } else {
        stdout
            .write_all(render_text(&machine, &plan).as_bytes())
            .context("writing the report")?;
    }
    Ok(())
}
