//! `tier0 ls|stat|mkdir|rm|mv|tag`: the namespace, through the control plane.

use std::collections::BTreeMap;
use std::io::Write;

use clap::Args;
use serde_json::json;
use tier0_control_api::proto;

use super::control::{ControlArgs, connect, failed, print_json, runtime, timestamp};

#[derive(Debug, Args)]
pub struct LsArgs {
    /// A directory (its entries) or a file (itself).
    #[arg(default_value = "/")]
    path: String,
    #[command(flatten)]
    control: ControlArgs,
}

#[derive(Debug, Args)]
pub struct StatArgs {
    path: String,
    #[command(flatten)]
    control: ControlArgs,
}

#[derive(Debug, Args)]
pub struct MkdirArgs {
    path: String,
    /// Make missing parents too; an existing directory is not an error.
    #[arg(short, long)]
    parents: bool,
    /// Chunk size of new files below (default: the parent's).
    #[arg(long, value_parser = super::parse_bytes)]
    chunk_size: Option<u64>,
    /// Replicas per chunk of new files below (default: the parent's).
    #[arg(long)]
    replication: Option<u32>,
    #[command(flatten)]
    control: ControlArgs,
}

#[derive(Debug, Args)]
pub struct RmArgs {
    path: String,
    /// Remove a directory and everything below it.
    #[arg(short, long)]
    recursive: bool,
    #[command(flatten)]
    control: ControlArgs,
}

#[derive(Debug, Args)]
pub struct MvArgs {
    from: String,
    to: String,
    #[command(flatten)]
    control: ControlArgs,
}

#[derive(Debug, Args)]
pub struct TagArgs {
    path: String,
    /// `KEY=VALUE` to set, `KEY-` to remove; none: show the tags.
    tags: Vec<String>,
    #[command(flatten)]
    control: ControlArgs,
}

use tier0_control_api::json::{entry as entry_json, entry_kind as kind};

fn child_path(dir: &str, name: &str) -> String {
    if dir == "/" {
        format!("/{name}")
    } else {
        format!("{dir}/{name}")
    }
}

pub fn ls(args: LsArgs) -> anyhow::Result<()> {
    runtime()?.block_on(async {
        let mut client = connect(&args.control).await?;
        let reply = client
            .namespace
            .list(proto::ListRequest {
                path: args.path.clone(),
            })
            .await
            .map_err(|s| failed(&format!("ls {}", args.path), &client.url, s))?
            .into_inner();
        // A file lists as itself, a directory as its entries: one file listed is the path
        // itself only if it is the inode the path names (`/x/y` may be a directory holding
        // a file `y`), which its name alone cannot tell.
        let is_file_itself = match reply.entries.as_slice() {
            [only] if only.kind == proto::EntryKind::File as i32 => {
                let stat = client
                    .namespace
                    .stat(proto::StatRequest {
                        path: args.path.clone(),
                    })
                    .await
                    .map_err(|s| failed(&format!("ls {}", args.path), &client.url, s))?
                    .into_inner();
                stat.entry.is_some_and(|entry| entry.id == only.id)
            }
            _ => false,
        };
        let path_of = |entry: &proto::Entry| {
            if is_file_itself {
                reply.path.clone()
            } else {
                child_path(&reply.path, &entry.name)
            }
        };
        if args.control.json {
            let entries: Vec<_> = reply
                .entries
                .iter()
                .map(|e| entry_json(&path_of(e), e))
                .collect();
            return print_json(&json!(entries));
        }
        let mut out = std::io::stdout().lock();
        for entry in &reply.entries {
            let name = if entry.kind == proto::EntryKind::Directory as i32 {
                format!("{}/", entry.name)
            } else {
                entry.name.clone()
            };
            writeln!(
                out,
                "{:<4} {:>14} {:>4} {}  {}",
                kind(entry),
                entry.size,
                if entry.kind == proto::EntryKind::File as i32 {
                    format!("v{}", entry.version)
                } else {
                    "-".to_owned()
                },
                timestamp(entry.modified_ms),
                name
            )?;
        }
        Ok(())
    })
}

pub fn stat(args: StatArgs) -> anyhow::Result<()> {
    runtime()?.block_on(async {
        let mut client = connect(&args.control).await?;
        let reply = client
            .namespace
            .stat(proto::StatRequest {
                path: args.path.clone(),
            })
            .await
            .map_err(|s| failed(&format!("stat {}", args.path), &client.url, s))?
            .into_inner();
        if args.control.json {
            return print_json(&tier0_control_api::json::stat(&reply));
        }
        let entry = reply.entry.unwrap_or_default();
        let settings = entry.settings.unwrap_or_default();
        let mut out = std::io::stdout().lock();
        writeln!(out, "path:        {}", reply.path)?;
        writeln!(out, "kind:        {}", kind(&entry))?;
        writeln!(out, "id:          {:x}", entry.id)?;
        if entry.kind == proto::EntryKind::File as i32 {
            writeln!(out, "size:        {}", entry.size)?;
            writeln!(
                out,
                "version:     {} (kept: {:?})",
                entry.version, reply.versions
            )?;
            writeln!(out, "layout:      version {}", entry.layout_version)?;
        }
        writeln!(
            out,
            "chunks:      {} bytes, {} replicas",
            settings.chunk_size, settings.replication
        )?;
        writeln!(out, "created:     {} UTC", timestamp(entry.created_ms))?;
        writeln!(out, "modified:    {} UTC", timestamp(entry.modified_ms))?;
        for (key, value) in entry.tags.iter().collect::<BTreeMap<_, _>>() {
            writeln!(out, "tag:         {key}={value}")?;
        }
        Ok(())
    })
}

pub fn mkdir(args: MkdirArgs) -> anyhow::Result<()> {
    let chunk_size = match args.chunk_size {
        Some(size) => {
            u32::try_from(size).map_err(|_| anyhow::anyhow!("--chunk-size {size} is too large"))?
        }
        None => 0,
    };
    runtime()?.block_on(async {
        let mut client = connect(&args.control).await?;
        let reply = client
            .namespace
            .mkdir(proto::MkdirRequest {
                path: args.path.clone(),
                parents: args.parents,
                settings: Some(proto::LayoutSettings {
                    chunk_size,
                    replication: args.replication.unwrap_or(0),
                }),
            })
            .await
            .map_err(|s| failed(&format!("mkdir {}", args.path), &client.url, s))?
            .into_inner();
        if args.control.json {
            return print_json(&entry_json(&reply.path, &reply.entry.unwrap_or_default()));
        }
        Ok(())
    })
}

pub fn rm(args: RmArgs) -> anyhow::Result<()> {
    runtime()?.block_on(async {
        let mut client = connect(&args.control).await?;
        let reply = client
            .namespace
            .delete(proto::DeleteRequest {
                path: args.path.clone(),
                recursive: args.recursive,
            })
            .await
            .map_err(|s| failed(&format!("rm {}", args.path), &client.url, s))?
            .into_inner();
        if args.control.json {
            return print_json(&json!({ "path": args.path, "removed": reply.removed }));
        }
        Ok(())
    })
}

pub fn mv(args: MvArgs) -> anyhow::Result<()> {
    runtime()?.block_on(async {
        let mut client = connect(&args.control).await?;
        let reply = client
            .namespace
            .rename(proto::RenameRequest {
                from: args.from.clone(),
                to: args.to.clone(),
            })
            .await
            .map_err(|s| failed(&format!("mv {} {}", args.from, args.to), &client.url, s))?
            .into_inner();
        if args.control.json {
            return print_json(&entry_json(&reply.path, &reply.entry.unwrap_or_default()));
        }
        Ok(())
    })
}

pub fn tag(args: TagArgs) -> anyhow::Result<()> {
    let mut set = std::collections::HashMap::new();
    let mut remove = Vec::new();
    for tag in &args.tags {
        if let Some((key, value)) = tag.split_once('=') {
            set.insert(key.to_owned(), value.to_owned());
        } else if let Some(key) = tag.strip_suffix('-') {
            remove.push(key.to_owned());
        } else {
            anyhow::bail!("tag {tag:?}: expected KEY=VALUE (set) or KEY- (remove)");
        }
    }
    runtime()?.block_on(async {
        let mut client = connect(&args.control).await?;
        let entry = if set.is_empty() && remove.is_empty() {
            client
                .namespace
                .stat(proto::StatRequest {
                    path: args.path.clone(),
                })
                .await
                .map_err(|s| failed(&format!("tag {}", args.path), &client.url, s))?
                .into_inner()
                .entry
        } else {
            client
                .namespace
                .tag(proto::TagRequest {
                    path: args.path.clone(),
                    set,
                    remove,
                })
                .await
                .map_err(|s| failed(&format!("tag {}", args.path), &client.url, s))?
                .into_inner()
                .entry
        }
        .unwrap_or_default();
        let tags: BTreeMap<_, _> = entry.tags.iter().collect();
        if args.control.json {
            return print_json(&json!({ "path": args.path, "tags": tags }));
        }
        let mut out = std::io::stdout().lock();
        for (key, value) in tags {
            writeln!(out, "{key}={value}")?;
        }
        Ok(())
    })
}
