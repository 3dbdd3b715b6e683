//! `tier0 quickstart`: the first thing a new user runs. Brings up a local cluster on
//! loopback (a control plane on the embedded store, data daemons on store files, TCP),
//! ingests a generated dataset, reads every file back striped through the client shim and
//! checks every byte, prints the throughput next to a plain read of the same files from the
//! local file system, shows one file's layout, and cleans up. Exits 0 only when every byte
//! matched.

use std::io::Write;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, bail};
use clap::Args;
use tier0_client::{Client, ReadBuffer};
use tier0_control_api::client::ControlClient;
use tier0_control_api::proto;

use super::cluster::{UpArgs, down, up};
use super::control::ControlArgs;

#[derive(Debug, Args)]
pub struct QuickstartArgs {
    /// Data daemons.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=16))]
    nodes: u32,
    /// Files in the generated dataset.
    #[arg(long, default_value_t = 24, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    files: u32,
    /// Size of each file.
    #[arg(long, default_value = "6MiB", value_parser = super::parse_bytes)]
    file_size: u64,
    /// Chunk size of the namespace.
    #[arg(long, default_value = "1MiB", value_parser = super::parse_bytes)]
    chunk_size: u64,
    /// Where to put the cluster and the dataset (default: a fresh temporary directory).
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Leave the cluster running (and print how to reach it) instead of cleaning up.
    #[arg(long)]
    keep: bool,
}

/// Reads a whole file with O_DIRECT into `buffer` (page-aligned, at least the file's size
/// rounded up to 4 KiB); falls back to buffered reads where the file system refuses O_DIRECT.
fn read_direct(path: &std::path::Path, buffer: &mut ReadBuffer) -> anyhow::Result<u64> {
    use std::io::Read;
    use std::os::unix::fs::OpenOptionsExt;
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECT)
        .open(path)
        .or_else(|_| std::fs::File::open(path))
        .with_context(|| format!("opening {}", path.display()))?;
    let mut total = 0;
    loop {
        let read = file
            .read(&mut buffer[total..])
            .with_context(|| format!("reading {}", path.display()))?;
        if read == 0 {
            return Ok(total as u64);
        }
        total += read;
    }
}

/// What the Python leg runs: every file read into the registered buffer through the shim
/// (`read_batch`, no copy), compared byte for byte with the local file; prints
/// `BYTES SECONDS`.
const PYTHON_CHECK: &str = r#"
import sys, time, numpy as np, tier0
dataset, paths = sys.argv[1], sys.argv[2:]
client = tier0.Client()
size = max(client.size(p) for p in paths)
buffer = tier0.Buffer(size)
total, seconds = 0, 0.0
for path in paths:
    started = time.perf_counter()
    (view,) = client.read_batch([(path, 0, client.size(path))], buffer)
    seconds += time.perf_counter() - started
    want = np.fromfile(dataset + "/" + path.rsplit("/", 1)[1], dtype=np.uint8)
    if not np.array_equal(view, want):
        sys.exit("python: " + path + " read back wrong")
    total += view.nbytes
client.close()
print(total, seconds)
"#;

/// The shared library the Python shim loads: `TIER0_LIB`, else next to this binary (as
/// `cargo build -p tier0-c` leaves it), else in `deps/` beside it (as `cargo test` does).
fn find_library() -> Option<PathBuf> {
    if let Some(path) = std::env::var_os("TIER0_LIB") {
        return Some(PathBuf::from(path));
    }
    let exe = std::env::current_exe().ok()?;
    let dir = exe.parent()?;
    [dir.join("libtier0.so"), dir.join("deps/libtier0.so")]
        .into_iter()
        .find(|path| path.exists())
}

/// Reads the dataset back through the Python shim (numpy, zero copy), when it is installed.
fn python_leg(
    state: &super::cluster::ClusterState,
    dataset: &std::path::Path,
    names: &[String],
    out: &mut impl Write,
) -> anyhow::Result<bool> {
    let Some(library) = find_library() else {
        writeln!(
            out,
            "  Python shim: skipped (no libtier0.so: cargo build --release -p tier0-c)"
        )?;
        return Ok(false);
    };
    // The package missing is a skip; the package there but failing to load the library
    // (a header or ABI that drifted, a broken build) is a failure.
    let installed = std::process::Command::new("python3")
        .args(["-c", "import importlib.util as u, sys; sys.exit(0 if u.find_spec('tier0') and u.find_spec('numpy') else 1)"])
        .output();
    if !installed.is_ok_and(|output| output.status.success()) {
        writeln!(
            out,
            "  Python shim: skipped (python3 has no tier0 or numpy package: run scripts/setup)"
        )?;
        return Ok(false);
    }
    let imported = std::process::Command::new("python3")
        .args(["-c", "import tier0, numpy"])
        .env("TIER0_LIB", &library)
        .output()
        .context("running python3")?;
    if !imported.status.success() {
        bail!(
            "the Python shim does not load {}: {}",
            library.display(),
            String::from_utf8_lossy(&imported.stderr).trim()
        );
    }
    let token = std::fs::read_to_string(&state.token_file)?;
    let output = std::process::Command::new("python3")
        .args(["-c", PYTHON_CHECK])
        .arg(dataset)
        .args(
            names
                .iter()
                .map(|name| format!("/datasets/quickstart/{name}")),
        )
        .env("TIER0_LIB", &library)
        .env("TIER0_CONTROL", &state.control_url)
        .env("TIER0_TOKEN", token.trim())
        .output()
        .context("running python3")?;
    if !output.status.success() {
        bail!(
            "the Python shim failed: {}",
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    let text = String::from_utf8_lossy(&output.stdout);
    let mut fields = text.split_whitespace();
    let bytes: u64 = fields.next().and_then(|f| f.parse().ok()).unwrap_or(0);
    let seconds: f64 = fields.next().and_then(|f| f.parse().ok()).unwrap_or(0.0);
    writeln!(
        out,
        "  Python shim (numpy, zero copy): {:.1} MiB/s, {} files verified, every byte",
        mib_per_s(bytes, seconds),
        names.len()
    )?;
    Ok(true)
}

/// Why this host cannot mount (FUSE without libfuse needs root and /dev/fuse), if it can't.
fn fuse_unavailable() -> Option<&'static str> {
    if !std::path::Path::new("/dev/fuse").exists() {
        return Some("no /dev/fuse");
    }
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Some("mounting needs root");
    }
    None
}

/// Mounts the namespace with `tier0 mount`, reads every file back through it with plain
/// file reads, compares every byte, and unmounts.
fn fuse_leg(
    dir: &std::path::Path,
    state: &super::cluster::ClusterState,
    names: &[String],
    expected: &[Vec<u8>],
    out: &mut impl Write,
) -> anyhow::Result<bool> {
    if let Some(why) = fuse_unavailable() {
        writeln!(out, "  FUSE mount: skipped ({why})")?;
        return Ok(false);
    }
    let mountpoint = dir.join("mnt");
    std::fs::create_dir_all(&mountpoint)?;
    let binary = std::env::current_exe().context("finding the tier0 binary")?;
    let mut mount = std::process::Command::new(binary)
        .arg("mount")
        .arg(&mountpoint)
        .args(["--control", &state.control_url])
        .arg("--token-file")
        .arg(&state.token_file)
        .env("TIER0_LOG", "warn")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .spawn()
        .context("starting tier0 mount")?;
    let result = (|| -> anyhow::Result<()> {
        let shard = mountpoint.join("datasets/quickstart").join(&names[0]);
        let deadline = Instant::now() + std::time::Duration::from_secs(20);
        while !shard.exists() {
            if let Some(status) = mount.try_wait()? {
                bail!("tier0 mount exited ({status}) before the namespace appeared");
            }
            if Instant::now() > deadline {
                bail!(
                    "the mount at {} did not appear within 20 s",
                    mountpoint.display()
                );
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        let started = Instant::now();
        let mut bytes = 0u64;
        let mut wrong = Vec::new();
        for (name, want) in names.iter().zip(expected) {
            let path = mountpoint.join("datasets/quickstart").join(name);
            let got =
                std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
            bytes += got.len() as u64;
            if &got != want {
                wrong.push(name.clone());
            }
        }
        let seconds = started.elapsed().as_secs_f64();
        if !wrong.is_empty() {
            bail!(
                "through the FUSE mount, {} files read back wrong: {}",
                wrong.len(),
                wrong.join(", ")
            );
        }
        writeln!(
            out,
            "  FUSE mount (tier0 mount {}): {:.1} MiB/s, {} files verified, every byte",
            mountpoint.display(),
            mib_per_s(bytes, seconds),
            names.len()
        )?;
        Ok(())
    })();
    // SAFETY: SIGTERM to the mount process this function started; it unmounts and exits.
    unsafe { libc::kill(mount.id() as i32, libc::SIGTERM) };
    let status = mount.wait()?;
    result?;
    if !status.success() {
        bail!("tier0 mount exited with {status} after unmounting");
    }
    Ok(true)
}

fn mib_per_s(bytes: u64, seconds: f64) -> f64 {
    bytes as f64 / (1 << 20) as f64 / seconds.max(1e-9)
}

pub fn run(args: QuickstartArgs) -> anyhow::Result<()> {
    let (dir, _temporary) = match &args.dir {
        Some(dir) => (dir.clone(), None),
        None => {
            let temporary = tempfile::Builder::new()
                .prefix("tier0-quickstart-")
                .tempdir()
                .context("making a temporary directory")?;
            (temporary.path().to_owned(), Some(temporary))
        }
    };
    let file_size = usize::try_from(args.file_size).context("--file-size too large")?;
    let total = args.file_size * u64::from(args.files);
    // Each daemon holds its share of the replicas, with room to spare for re-replication.
    let store_size = (total * 2 / u64::from(args.nodes) * 3).max(64 << 20) + (64 << 20);
    let mut out = std::io::stdout().lock();
    writeln!(out, "tier0 quickstart in {}", dir.display())?;
    let started = Instant::now();
    let state = up(&UpArgs {
        nodes: args.nodes,
        dir: dir.join("cluster"),
        store_size,
        chunk_size: args.chunk_size,
        replication: 2.min(args.nodes),
    })?;
    writeln!(
        out,
        "  cluster up: control plane {} (embedded store), {} data daemons, in {:.1} s",
        state.control_url,
        args.nodes,
        started.elapsed().as_secs_f64()
    )?;
    let result = exercise(&args, &dir, &state, file_size, total, &mut out);
    if args.keep && result.is_ok() {
        writeln!(out, "  the cluster keeps running; to use it:")?;
        writeln!(out, "    export TIER0_CONTROL={}", state.control_url)?;
        writeln!(
            out,
            "    export TIER0_TOKEN=$(cat {})",
            state.token_file.display()
        )?;
        writeln!(
            out,
            "    tier0 cluster down --dir {}",
            dir.join("cluster").display()
        )?;
        return Ok(());
    }
    let stopped = down(&dir.join("cluster"), true);
    if args.dir.is_none() {
        let _ = std::fs::remove_dir_all(&dir);
    } else {
        let _ = std::fs::remove_dir_all(dir.join("dataset"));
    }
    let surfaces = result?;
    stopped.context("stopping the cluster")?;
    writeln!(
        out,
        "  cleaned up. quickstart passed: every byte verified, through {}.",
        surfaces.join(", ")
    )?;
    Ok(())
}

fn exercise(
    args: &QuickstartArgs,
    dir: &std::path::Path,
    state: &super::cluster::ClusterState,
    file_size: usize,
    total: u64,
    out: &mut impl Write,
) -> anyhow::Result<Vec<&'static str>> {
    // The dataset: files of pseudo-random bytes, each from its own seed.
    let dataset = dir.join("dataset");
    std::fs::create_dir_all(&dataset)?;
    let mut names = Vec::new();
    for index in 0..args.files {
        let name = format!("shard-{index:05}.bin");
        let mut rng = fastrand::Rng::with_seed(0x7431_0000 + u64::from(index));
        let mut data = vec![0u8; file_size];
        rng.fill(&mut data);
        std::fs::write(dataset.join(&name), &data)?;
        names.push(name);
    }
    writeln!(
        out,
        "  dataset: {} files of {} bytes ({} MiB) in {}",
        args.files,
        file_size,
        total >> 20,
        dataset.display()
    )?;

    let control = ControlArgs {
        control: state.control_url.clone(),
        token_file: Some(state.token_file.clone()),
        json: false,
    };
    let put = super::ingest::put_tree(&control, &dataset, "/datasets/quickstart", 4, true)?;
    writeln!(
        out,
        "  ingest (tier0 put): {} files, {:.1} MiB/s",
        put.files,
        put.mib_per_second()
    )?;

    // Read back striped through the client shim; every byte compared.
    let token = std::fs::read_to_string(&state.token_file)?;
    let client = Client::connect(&state.control_url, token.trim().as_bytes(), "quickstart")?;
    let mut buffer = ReadBuffer::new(file_size.div_ceil(4096).max(1) * 4096)?;
    let mut mismatched = Vec::new();
    let read_started = Instant::now();
    let mut read_bytes = 0;
    let mut expected = Vec::with_capacity(names.len());
    for name in &names {
        expected.push(std::fs::read(dataset.join(name))?);
    }
    let mut compare_time = 0.0;
    for (name, want) in names.iter().zip(&expected) {
        let path = format!("/datasets/quickstart/{name}");
        let (layout, report) = client.read(&path, &mut buffer)?;
        read_bytes += report.bytes;
        let check = Instant::now();
        if layout.size as usize != want.len() || buffer[..want.len()] != want[..] {
            mismatched.push(path);
        }
        compare_time += check.elapsed().as_secs_f64();
    }
    let tier0_seconds = read_started.elapsed().as_secs_f64() - compare_time;
    // The baseline: the same files read from the local file system the daemons' stores are
    // on, with O_DIRECT as the daemons read (else it would measure the page cache, which
    // holds the dataset just written), into the same page-aligned buffer.
    let local_started = Instant::now();
    let mut local_bytes = 0;
    for name in &names {
        local_bytes += read_direct(&dataset.join(name), &mut buffer)?;
    }
    let local_seconds = local_started.elapsed().as_secs_f64();
    let tier0_rate = mib_per_s(read_bytes, tier0_seconds);
    let local_rate = mib_per_s(local_bytes, local_seconds);
    // The daemons run on this machine: reads take the node-local shared-memory path.
    let mut transports: Vec<String> = client
        .transports()
        .into_iter()
        .filter_map(|(_, kind)| kind.map(|kind| kind.to_string()))
        .collect();
    transports.sort();
    transports.dedup();
    writeln!(
        out,
        "  striped read (Rust client, {}): {:.1} MiB/s   plain local file read (O_DIRECT, same disk): {:.1} MiB/s   ratio {:.2}",
        transports.join("+"),
        tier0_rate,
        local_rate,
        tier0_rate / local_rate.max(1e-9)
    )?;
    if !mismatched.is_empty() {
        bail!(
            "{} of {} files read back wrong: {}",
            mismatched.len(),
            names.len(),
            mismatched.join(", ")
        );
    }
    writeln!(
        out,
        "  verified: {} files, {} bytes, every byte",
        names.len(),
        read_bytes
    )?;

    let mut surfaces = vec!["the Rust client"];
    if python_leg(state, &dataset, &names, out)? {
        surfaces.push("the Python shim");
    }
    if fuse_leg(dir, state, &names, &expected, out)? {
        surfaces.push("the FUSE mount");
    }

    let first = format!("/datasets/quickstart/{}", names[0]);
    let runtime = super::control::runtime()?;
    let layout = runtime.block_on(async {
        let mut admin = ControlClient::connect(&state.control_url, token.trim().as_bytes()).await?;
        anyhow::Ok(
            admin
                .admin
                .layout(proto::LayoutRequest {
                    path: first.clone(),
                    version: 0,
                })
                .await
                .map_err(|s| super::control::failed("admin layout", &state.control_url, s))?
                .into_inner(),
        )
    })?;
    writeln!(out, "  tier0 admin layout {first}:")?;
    super::admin::print_layout(out, &layout)?;
    Ok(surfaces)
}
