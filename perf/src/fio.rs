//! fio as the baseline for local reads: same file, same range, same block size and depth.

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use serde_json::Value;

use crate::report::Latency;

#[derive(Clone, Debug)]
pub struct FioJob {
    pub name: String,
    pub file: PathBuf,
    /// `read` or `randread`.
    pub pattern: &'static str,
    pub block_size: u64,
    pub queue_depth: u32,
    /// The byte range fio reads: where tier0's chunk data lies in the file.
    pub offset: u64,
    pub size: u64,
    /// Time-based run; `None` reads the range `loops` times.
    pub runtime: Option<Duration>,
    pub loops: u32,
}

#[derive(Clone, Debug)]
pub struct FioResult {
    pub bytes: u64,
    pub seconds: f64,
    pub iops: f64,
    /// CPU seconds of fio's job thread (user + system) over the job, as fio reports them.
    pub cpu_seconds: f64,
    pub latency: Latency,
    pub version: String,
}

#[derive(Debug, thiserror::Error)]
pub enum FioError {
    #[error("fio is not installed (scripts/setup installs it)")]
    Missing,
    #[error("running fio failed")]
    Spawn(#[source] std::io::Error),
    #[error("fio exited with {status}: {stderr}")]
    Failed { status: String, stderr: String },
    #[error("fio's JSON output has no {0}")]
    Output(String),
}

fn version() -> Result<String, FioError> {
    let output = Command::new("fio")
        .arg("--version")
        .output()
        .map_err(|error| match error.kind() {
            std::io::ErrorKind::NotFound => FioError::Missing,
            _ => FioError::Spawn(error),
        })?;
    Ok(String::from_utf8_lossy(&output.stdout).trim().to_string())
}

pub fn run(job: &FioJob) -> Result<FioResult, FioError> {
    let version = version()?;
    let mut command = Command::new("fio");
    command
        .arg(format!("--name={}", job.name))
        .arg(format!("--filename={}", job.file.display()))
        .arg("--ioengine=io_uring")
        .arg("--direct=1")
        // The same io_uring features tier0 uses: registered file and fixed buffers.
        .arg("--registerfiles")
        .arg("--fixedbufs")
        .arg(format!("--rw={}", job.pattern))
        .arg(format!("--bs={}", job.block_size))
        .arg(format!("--iodepth={}", job.queue_depth))
        .arg(format!("--offset={}", job.offset))
        .arg(format!("--size={}", job.size))
        .arg("--numjobs=1")
        .arg("--thread")
        .arg("--norandommap")
        .arg("--randrepeat=0")
        .arg("--output-format=json");
    match job.runtime {
        Some(runtime) => {
            command
                .arg("--time_based")
                .arg(format!("--runtime={}ms", runtime.as_millis().max(1)));
        }
        None => {
            command.arg(format!("--loops={}", job.loops.max(1)));
        }
    }
    let output = command.output().map_err(FioError::Spawn)?;
    if !output.status.success() {
        return Err(FioError::Failed {
            status: output.status.to_string(),
            stderr: String::from_utf8_lossy(&output.stderr).trim().to_string(),
        });
    }
    let stdout = String::from_utf8_lossy(&output.stdout);
    // fio may print notes before the JSON document.
    let json = stdout.find('{').map_or("", |start| &stdout[start..]);
    let report: Value =
        serde_json::from_str(json).map_err(|_| FioError::Output("JSON document".into()))?;
    let read = &report["jobs"][0]["read"];
    let number = |value: &Value, what: &str| {
        value
            .as_f64()
            .ok_or_else(|| FioError::Output(what.to_string()))
    };
    let job = &report["jobs"][0];
    let bytes = number(&read["io_bytes"], "jobs[0].read.io_bytes")? as u64;
    // usr_cpu and sys_cpu are percentages of the job's elapsed time (job_runtime, ms).
    let cpu = (number(&job["usr_cpu"], "jobs[0].usr_cpu")?
        + number(&job["sys_cpu"], "jobs[0].sys_cpu")?)
        / 100.0
        * number(&job["job_runtime"], "jobs[0].job_runtime")?
        / 1_000.0;
    let runtime_ms = number(&read["runtime"], "jobs[0].read.runtime")?;
    let percentile = |key: &str| {
        number(
            &read["clat_ns"]["percentile"][key],
            &format!("clat_ns percentile {key}"),
        )
        .map(|nanos| nanos / 1_000.0)
    };
    Ok(FioResult {
        bytes,
        seconds: runtime_ms / 1_000.0,
        iops: number(&read["iops"], "jobs[0].read.iops")?,
        cpu_seconds: cpu,
        latency: Latency {
            p50_us: percentile("50.000000")?,
            p99_us: percentile("99.000000")?,
            p999_us: percentile("99.900000")?,
        },
        version,
    })
}
