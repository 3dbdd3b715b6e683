//! `tier0 cluster up|down`: a local cluster on loopback, as processes that keep running —
//! a control plane on the embedded store and N data daemons on store files, all in one
//! directory, with a fresh cluster token.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::{Args, Subcommand};
use serde::{Deserialize, Serialize};
use tier0_control_api::client::ControlClient;
use tier0_control_api::proto;

#[derive(Debug, Subcommand)]
pub enum ClusterCommand {
    /// Start a control plane and N data daemons on loopback in DIR; returns once every node
    /// is up and prints `export TIER0_CONTROL=…` and `export TIER0_TOKEN=…`, so that
    /// `eval "$(tier0 cluster up …)"` points later commands at it.
    Up(UpArgs),
    /// Stop the cluster running in DIR (its data stays; `--purge` removes DIR).
    Down(DownArgs),
}

#[derive(Debug, Clone, Args)]
pub struct UpArgs {
    /// Data daemons to start.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=64))]
    pub nodes: u32,
    /// Where the cluster keeps its metadata, stores, logs and token.
    #[arg(long)]
    pub dir: PathBuf,
    /// Size of each daemon's store file.
    #[arg(long, default_value = "1GiB", value_parser = super::parse_bytes)]
    pub store_size: u64,
    /// Chunk size of the namespace and the stores.
    #[arg(long, default_value = "4MiB", value_parser = super::parse_bytes)]
    pub chunk_size: u64,
    /// Replicas per chunk.
    #[arg(long, default_value_t = 2)]
    pub replication: u32,
}

#[derive(Debug, Args)]
pub struct DownArgs {
    #[arg(long)]
    pub dir: PathBuf,
    /// Remove the directory (metadata, stores, logs) after stopping.
    #[arg(long)]
    pub purge: bool,
}

/// What `cluster up` started, kept in `DIR/cluster.json` for `cluster down`.
#[derive(Debug, Serialize, Deserialize)]
pub struct ClusterState {
    pub control_url: String,
    pub token_file: PathBuf,
    pub processes: Vec<Process>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct Process {
    pub name: String,
    pub pid: u32,
    pub address: String,
}

const STATE_FILE: &str = "cluster.json";

pub fn run(command: ClusterCommand) -> anyhow::Result<()> {
    match command {
        ClusterCommand::Up(args) => {
            let state = up(&args)?;
            let token = std::fs::read_to_string(&state.token_file)?;
            println!("export TIER0_CONTROL={}", state.control_url);
            println!("export TIER0_TOKEN={}", token.trim());
            Ok(())
        }
        ClusterCommand::Down(args) => down(&args.dir, args.purge),
    }
}

/// Waits for `… listening on ADDR` in a process's output file.
fn wait_for_address(
    output: &Path,
    child: &mut std::process::Child,
    name: &str,
) -> anyhow::Result<String> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let text = std::fs::read_to_string(output).unwrap_or_default();
        if let Some(line) = text.lines().find(|line| line.contains("listening on"))
            && let Some(addr) = line.rsplit(' ').next()
        {
            return Ok(addr.to_owned());
        }
        if let Some(status) = child.try_wait()? {
            bail!(
                "{name} exited ({status}) before it was ready; see {}",
                output.with_extension("log").display()
            );
        }
        if Instant::now() > deadline {
            bail!(
                "{name} was not ready within 30 s; see {}",
                output.with_extension("log").display()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn spawn(dir: &Path, name: &str, args: &[String]) -> anyhow::Result<(std::process::Child, String)> {
    let output = dir.join(format!("{name}.out"));
    let log = dir.join(format!("{name}.log"));
    let binary = std::env::current_exe().context("finding the tier0 binary")?;
    let mut child = {
        use std::os::unix::process::CommandExt;
        Command::new(binary)
            .args(args)
            .env(
                "TIER0_LOG",
                std::env::var("TIER0_LOG").unwrap_or_else(|_| "info".to_owned()),
            )
            .env_remove("TIER0_CONTROL")
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(&output)?)
            .stderr(std::fs::File::create(&log)?)
            // Its own process group: a Ctrl-C in the shell that ran `cluster up` leaves it.
            .process_group(0)
            .spawn()
            .with_context(|| format!("starting {name}"))?
    };
    let address = wait_for_address(&output, &mut child, name)?;
    Ok((child, address))
}

/// Starts the cluster and waits until every node is up.
pub fn up(args: &UpArgs) -> anyhow::Result<ClusterState> {
    let dir = &args.dir;
    if dir.join(STATE_FILE).exists() {
        bail!(
            "{} already holds a cluster (stop it with `tier0 cluster down --dir {}`)",
            dir.display(),
            dir.display()
        );
    }
    std::fs::create_dir_all(dir).with_context(|| format!("making {}", dir.display()))?;
    let dir = dir.canonicalize()?;
    let token_file = dir.join("token");
    let token: String = (0..32).map(|_| fastrand::alphanumeric()).collect();
    {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&token_file)
            .with_context(|| format!("writing {}", token_file.display()))?;
        writeln!(file, "{token}")?;
    }
    let token_arg = token_file.display().to_string();
    let mut processes = Vec::new();
    let mut children = Vec::new();
    let result = (|| -> anyhow::Result<String> {
        let (child, control) = spawn(
            &dir,
            "control",
            &[
                "serve".into(),
                "control".into(),
                "--listen".into(),
                "127.0.0.1:0".into(),
                "--data-dir".into(),
                dir.join("control").display().to_string(),
                "--token-file".into(),
                token_arg.clone(),
                "--chunk-size".into(),
                args.chunk_size.to_string(),
                "--replication".into(),
                args.replication.to_string(),
                "--node-lease".into(),
                "5s".into(),
                "--upkeep-interval".into(),
                "5s".into(),
            ],
        )?;
        let control_url = format!("http://{control}");
        processes.push(Process {
            name: "control".into(),
            pid: child.id(),
            address: control.clone(),
        });
        children.push(child);
        for index in 0..args.nodes {
            let name = format!("node-{index}");
            let (child, address) = spawn(
                &dir,
                &name,
                &[
                    "serve".into(),
                    "data".into(),
                    "--listen".into(),
                    "127.0.0.1:0".into(),
                    "--node".into(),
                    name.clone(),
                    "--store".into(),
                    dir.join(format!("{name}.store")).display().to_string(),
                    "--store-size".into(),
                    args.store_size.to_string(),
                    "--chunk-size".into(),
                    args.chunk_size.to_string(),
                    "--token-file".into(),
                    token_arg.clone(),
                    "--control".into(),
                    control_url.clone(),
                    "--heartbeat".into(),
                    "1s".into(),
                    // A laptop's cores are shared by every daemon here: no pinning, one
                    // worker each, sleeping when idle.
                    "--no-pin".into(),
                    "--workers-per-node".into(),
                    "1".into(),
                    "--poll-mode".into(),
                    "interrupt".into(),
                    "--rdma".into(),
                    "off".into(),
                ],
            )?;
            processes.push(Process {
                name,
                pid: child.id(),
                address,
            });
            children.push(child);
        }
        Ok(control_url)
    })();
    let control_url = match result {
        Ok(url) => url,
        Err(error) => {
            for mut child in children {
                let _ = child.kill();
                let _ = child.wait();
            }
            return Err(error);
        }
    };
    let state = ClusterState {
        control_url: control_url.clone(),
        token_file: token_file.clone(),
        processes,
    };
    std::fs::write(dir.join(STATE_FILE), serde_json::to_vec_pretty(&state)?)?;
    // The children run on after this process exits; they are not waited for here.
    drop(children);
    wait_until_up(&control_url, token.as_bytes(), args.nodes as usize).inspect_err(|_| {
        let _ = down(&dir, false);
    })?;
    Ok(state)
}

fn wait_until_up(url: &str, token: &[u8], nodes: usize) -> anyhow::Result<()> {
    let runtime = super::control::runtime()?;
    runtime.block_on(async {
        let mut client = ControlClient::connect(url, token).await?;
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let listed = client
                .admin
                .nodes(proto::NodesRequest {})
                .await
                .map_err(|s| super::control::failed("admin nodes", url, s))?
                .into_inner()
                .nodes;
            let up = listed
                .iter()
                .filter(|n| n.state == proto::NodeState::Up as i32)
                .count();
            if up >= nodes {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("only {up} of {nodes} data nodes registered within 30 s");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
}

fn alive(pid: u32) -> bool {
    // SAFETY: signal 0 only checks that the process exists and may be signalled.
    unsafe { libc::kill(pid as i32, 0) == 0 }
}

/// Stops every process of the cluster in `dir` (SIGTERM, then SIGKILL after 10 s).
pub fn down(dir: &Path, purge: bool) -> anyhow::Result<()> {
    let path = dir.join(STATE_FILE);
    let text = std::fs::read(&path).with_context(|| {
        format!(
            "{} holds no running cluster ({})",
            dir.display(),
            path.display()
        )
    })?;
    let state: ClusterState =
        serde_json::from_slice(&text).with_context(|| format!("reading {}", path.display()))?;
    // Daemons first, so the control plane does not mark them down and start repairs.
    for process in state.processes.iter().rev() {
        if alive(process.pid) {
            // SAFETY: SIGTERM to a process this cluster started.
            unsafe { libc::kill(process.pid as i32, libc::SIGTERM) };
        }
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while state.processes.iter().any(|p| alive(p.pid)) && Instant::now() < deadline {
        reap();
        std::thread::sleep(Duration::from_millis(20));
    }
    for process in &state.processes {
        if alive(process.pid) {
            // SAFETY: SIGKILL to a process this cluster started that ignored SIGTERM.
            unsafe { libc::kill(process.pid as i32, libc::SIGKILL) };
        }
    }
    reap();
    std::fs::remove_file(&path)?;
    if purge {
        std::fs::remove_dir_all(dir).with_context(|| format!("removing {}", dir.display()))?;
    }
    Ok(())
}

/// Reaps children of this process that exited (when `down` runs in the process that ran
/// `up`, as the quickstart does), so they do not linger as zombies that look alive.
fn reap() {
    // SAFETY: waitpid with WNOHANG on any child; the status is not used.
    unsafe { while libc::waitpid(-1, std::ptr::null_mut(), libc::WNOHANG) > 0 {} }
}
