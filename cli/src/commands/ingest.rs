//! `tier0 put SRC DEST` and `tier0 get SRC DEST`: files and directory trees into and out of
//! the namespace, many files in parallel, with a progress bar and the throughput.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Instant;

use anyhow::{Context, bail};
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use tier0_client::{Client, ReadBuffer};
use tier0_control_api::proto;

use super::control::{ControlArgs, connect, failed, print_json, read_token, runtime};

#[derive(Debug, Args)]
pub struct PutArgs {
    /// A local file or directory.
    pub src: PathBuf,
    /// Where in the namespace: a file path, or an existing directory to put SRC into.
    pub dest: String,
    /// Files written at once.
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..=64))]
    pub jobs: u32,
    /// No progress bar.
    #[arg(long)]
    pub quiet: bool,
    #[command(flatten)]
    pub control: ControlArgs,
}

#[derive(Debug, Args)]
pub struct GetArgs {
    /// A file or directory in the namespace.
    pub src: String,
    /// A local path: the file (or directory) to make.
    pub dest: PathBuf,
    /// Files read at once.
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..=64))]
    pub jobs: u32,
    #[arg(long)]
    pub quiet: bool,
    #[command(flatten)]
    pub control: ControlArgs,
}

/// One file to copy, and its size.
struct Item<S, D> {
    src: S,
    dest: D,
    size: u64,
}

/// The directories to make and the files to copy, for a put (local → namespace)...
type PutPlan = (Vec<String>, Vec<Item<PathBuf, String>>);
/// ... and for a get (namespace → local).
type GetPlan = (Vec<PathBuf>, Vec<Item<String, PathBuf>>);

/// What a transfer did.
#[derive(Debug, Clone, Copy)]
pub struct Transfer {
    pub files: u64,
    pub bytes: u64,
    pub seconds: f64,
}

impl Transfer {
    pub fn mib_per_second(&self) -> f64 {
        self.bytes as f64 / (1 << 20) as f64 / self.seconds.max(1e-9)
    }
}

fn join(dir: &str, name: &str) -> String {
    if dir.ends_with('/') {
        format!("{dir}{name}")
    } else {
        format!("{dir}/{name}")
    }
}

fn bar(total: u64, quiet: bool) -> ProgressBar {
    if quiet {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new(total);
    bar.set_style(
        ProgressStyle::with_template(
            "{msg:>6} [{bar:30}] {bytes}/{total_bytes} {binary_bytes_per_sec} eta {eta}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> "),
    );
    bar
}

/// Runs `work` over `items` on `jobs` threads, each with its own state made by `make` for
/// its first item (a client, kept for the rest); the first error stops the rest.
fn parallel<T: Send, S>(
    items: Vec<T>,
    jobs: u32,
    make: impl Fn() -> anyhow::Result<S> + Sync,
    work: impl Fn(&mut S, &T) -> anyhow::Result<()> + Sync,
) -> anyhow::Result<()> {
    let queue = Mutex::new(items.into_iter());
    let first_error: Mutex<Option<anyhow::Error>> = Mutex::new(None);
    let fail = |error: anyhow::Error| {
        if let Ok(mut first) = first_error.lock() {
            first.get_or_insert(error);
        }
    };
    std::thread::scope(|scope| {
        for _ in 0..jobs {
            scope.spawn(|| {
                let mut state = None;
                loop {
                    if first_error.lock().map(|e| e.is_some()).unwrap_or(true) {
                        return;
                    }
                    let Some(item) = queue.lock().ok().and_then(|mut q| q.next()) else {
                        return;
                    };
                    let state = match &mut state {
                        Some(state) => state,
                        None => match make() {
                            Ok(made) => state.insert(made),
                            Err(error) => return fail(error),
                        },
                    };
                    if let Err(error) = work(state, &item) {
                        fail(error);
                    }
                }
            });
        }
    });
    match first_error.into_inner() {
        Ok(Some(error)) => Err(error),
        _ => Ok(()),
    }
}

fn put_items(src: &Path, dest: &str) -> anyhow::Result<PutPlan> {
    let mut dirs = Vec::new();
    let mut items = Vec::new();
    let meta = std::fs::metadata(src).with_context(|| format!("{}", src.display()))?;
    if meta.is_file() {
        items.push(Item {
            src: src.to_owned(),
            dest: dest.to_owned(),
            size: meta.len(),
        });
        return Ok((dirs, items));
    }
    if !meta.is_dir() {
        bail!("{}: neither a file nor a directory", src.display());
    }
    let mut stack = vec![(src.to_owned(), dest.to_owned())];
    while let Some((local, remote)) = stack.pop() {
        dirs.push(remote.clone());
        let mut entries: Vec<_> = std::fs::read_dir(&local)
            .with_context(|| format!("listing {}", local.display()))?
            .collect::<Result<_, _>>()?;
        entries.sort_by_key(|e| e.file_name());
        for entry in entries {
            let name = entry.file_name();
            let Some(name) = name.to_str() else {
                bail!("{}: the name is not UTF-8", entry.path().display());
            };
            let kind = entry.file_type()?;
            if kind.is_dir() {
                stack.push((entry.path(), join(&remote, name)));
            } else if kind.is_file() {
                items.push(Item {
                    src: entry.path(),
                    dest: join(&remote, name),
                    size: entry.metadata()?.len(),
                });
            }
        }
    }
    dirs.sort();
    Ok((dirs, items))
}

/// Copies a local file or tree into the namespace.
pub fn put_tree(
    control: &ControlArgs,
    src: &Path,
    dest: &str,
    jobs: u32,
    quiet: bool,
) -> anyhow::Result<Transfer> {
    let token = read_token(control.token_file.as_ref())?;
    // Into an existing directory, SRC keeps its name.
    let dest = runtime()?.block_on(async {
        let mut client = connect(control).await?;
        let is_dir = client
            .namespace
            .stat(proto::StatRequest {
                path: dest.to_owned(),
            })
            .await
            .map(|reply| {
                reply.into_inner().entry.map(|e| e.kind) == Some(proto::EntryKind::Directory as i32)
            })
            .unwrap_or(false);
        let name = src
            .file_name()
            .and_then(|n| n.to_str())
            .filter(|_| is_dir)
            .map(|name| join(dest, name));
        anyhow::Ok(name.unwrap_or_else(|| dest.to_owned()))
    })?;
    let (dirs, items) = put_items(src, &dest)?;
    let total: u64 = items.iter().map(|i| i.size).sum();
    let started = Instant::now();
    let progress = bar(total, quiet);
    progress.set_message("put");
    let mkdirs = runtime()?;
    mkdirs.block_on(async {
        let mut client = connect(control).await?;
        for dir in &dirs {
            client
                .namespace
                .mkdir(proto::MkdirRequest {
                    path: dir.clone(),
                    parents: true,
                    settings: None,
                })
                .await
                .map_err(|s| failed(&format!("mkdir {dir}"), &client.url, s))?;
        }
        anyhow::Ok(())
    })?;
    let files = items.len() as u64;
    let connect = || Ok(Client::connect(&control.control, &token, "tier0-put")?);
    parallel(items, jobs, connect, |client, item| {
        let mut file = std::fs::File::open(&item.src)
            .with_context(|| format!("opening {}", item.src.display()))?;
        let mut writer = client.create(&item.dest)?;
        let mut piece = vec![0u8; 1 << 20];
        loop {
            let read = file
                .read(&mut piece)
                .with_context(|| format!("reading {}", item.src.display()))?;
            if read == 0 {
                break;
            }
            writer.write(&piece[..read])?;
            progress.inc(read as u64);
        }
        writer.close()?;
        Ok(())
    })?;
    progress.finish_and_clear();
    Ok(Transfer {
        files,
        bytes: total,
        seconds: started.elapsed().as_secs_f64(),
    })
}

fn get_items(control: &ControlArgs, src: &str, dest: &Path) -> anyhow::Result<GetPlan> {
    runtime()?.block_on(async {
        let mut client = connect(control).await?;
        let stat = client
            .namespace
            .stat(proto::StatRequest {
                path: src.to_owned(),
            })
            .await
            .map_err(|s| failed(&format!("get {src}"), &client.url, s))?
            .into_inner();
        let entry = stat.entry.unwrap_or_default();
        if entry.kind == proto::EntryKind::File as i32 {
            // Into an existing directory, the file keeps its name.
            let dest = if dest.is_dir() {
                dest.join(&entry.name)
            } else {
                dest.to_owned()
            };
            return Ok((
                Vec::new(),
                vec![Item {
                    src: stat.path,
                    dest,
                    size: entry.size,
                }],
            ));
        }
        let mut dirs = Vec::new();
        let mut items = Vec::new();
        let mut stack = vec![(stat.path, dest.to_owned())];
        while let Some((remote, local)) = stack.pop() {
            dirs.push(local.clone());
            let listed = client
                .namespace
                .list(proto::ListRequest {
                    path: remote.clone(),
                })
                .await
                .map_err(|s| failed(&format!("ls {remote}"), &client.url, s))?
                .into_inner();
            for entry in listed.entries {
                let child = join(&remote, &entry.name);
                if entry.kind == proto::EntryKind::Directory as i32 {
                    stack.push((child, local.join(&entry.name)));
                } else {
                    items.push(Item {
                        src: child,
                        dest: local.join(&entry.name),
                        size: entry.size,
                    });
                }
            }
        }
        Ok((dirs, items))
    })
}

/// Copies a file or tree out of the namespace; each file appears whole or not at all.
pub fn get_tree(
    control: &ControlArgs,
    src: &str,
    dest: &Path,
    jobs: u32,
    quiet: bool,
) -> anyhow::Result<Transfer> {
    let token = read_token(control.token_file.as_ref())?;
    let (dirs, items) = get_items(control, src, dest)?;
    for dir in &dirs {
        std::fs::create_dir_all(dir).with_context(|| format!("making {}", dir.display()))?;
    }
    let total: u64 = items.iter().map(|i| i.size).sum();
    let files = items.len() as u64;
    let progress = bar(total, quiet);
    progress.set_message("get");
    let started = Instant::now();
    let connect = || Ok(Client::connect(&control.control, &token, "tier0-get")?);
    parallel(items, jobs, connect, |client, item| {
        let layout = client.open(&item.src)?;
        let mut buffer = ReadBuffer::new((layout.size as usize).max(1))?;
        let (layout, _) = client.read(&item.src, &mut buffer)?;
        let partial = item.dest.with_extension(format!(
            "{}tier0-partial",
            item.dest
                .extension()
                .map(|e| format!("{}.", e.to_string_lossy()))
                .unwrap_or_default()
        ));
        let mut file = std::fs::File::create(&partial)
            .with_context(|| format!("creating {}", partial.display()))?;
        file.write_all(&buffer[..layout.size as usize])
            .and_then(|()| file.sync_all())
            .with_context(|| format!("writing {}", partial.display()))?;
        std::fs::rename(&partial, &item.dest)
            .with_context(|| format!("renaming {} into place", partial.display()))?;
        progress.inc(layout.size);
        Ok(())
    })?;
    progress.finish_and_clear();
    Ok(Transfer {
        files,
        bytes: total,
        seconds: started.elapsed().as_secs_f64(),
    })
}

fn report(what: &str, transfer: &Transfer, json: bool) -> anyhow::Result<()> {
    if json {
        return print_json(&serde_json::json!({
            "files": transfer.files,
            "bytes": transfer.bytes,
            "seconds": transfer.seconds,
            "mib_per_second": transfer.mib_per_second(),
        }));
    }
    println!(
        "{what}: {} files, {} bytes in {:.2} s ({:.1} MiB/s)",
        transfer.files,
        transfer.bytes,
        transfer.seconds,
        transfer.mib_per_second()
    );
    Ok(())
}

pub fn put(args: PutArgs) -> anyhow::Result<()> {
    let transfer = put_tree(&args.control, &args.src, &args.dest, args.jobs, args.quiet)?;
    report("put", &transfer, args.control.json)
}

pub fn get(args: GetArgs) -> anyhow::Result<()> {
    let transfer = get_tree(&args.control, &args.src, &args.dest, args.jobs, args.quiet)?;
    report("get", &transfer, args.control.json)
}
