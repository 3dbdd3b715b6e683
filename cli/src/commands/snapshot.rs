//! `tier0 snapshot create|list|diff|rollback|delete`.

use std::collections::BTreeMap;
use std::io::Write;

use clap::Subcommand;
use serde_json::json;
use tier0_control_api::proto;

use super::control::{ControlArgs, connect, failed, print_json, runtime, timestamp};

#[derive(Debug, Subcommand)]
pub enum SnapshotCommand {
    /// Pin the current versions of everything at and below PATH as NAME.
    Create {
        name: String,
        path: String,
        #[command(flatten)]
        control: ControlArgs,
    },
    /// The snapshots (of paths at or below PATH).
    List {
        path: Option<String>,
        #[command(flatten)]
        control: ControlArgs,
    },
    /// What changed from snapshot FROM to snapshot TO (default: to now).
    Diff {
        from: String,
        to: Option<String>,
        #[command(flatten)]
        control: ControlArgs,
    },
    /// Restore the snapshot's subtree to the pinned versions.
    Rollback {
        name: String,
        #[command(flatten)]
        control: ControlArgs,
    },
    /// Unpin a snapshot (what only it kept becomes garbage).
    Delete {
        name: String,
        #[command(flatten)]
        control: ControlArgs,
    },
}

use tier0_control_api::json::snapshot as info_json;

fn change_name(change: i32) -> &'static str {
    match proto::Change::try_from(change) {
        Ok(proto::Change::Added) => "added",
        Ok(proto::Change::Removed) => "removed",
        Ok(proto::Change::Modified) => "modified",
        _ => "unknown",
    }
}

fn side_json(entry: &Option<proto::SnapshotEntry>) -> serde_json::Value {
    match entry {
        None => serde_json::Value::Null,
        Some(entry) => json!({
            "kind": if entry.kind == proto::EntryKind::Directory as i32 { "dir" } else { "file" },
            "file_id": entry.file_id,
            "version": entry.version,
            "size": entry.size,
            "tags": entry.tags.iter().collect::<BTreeMap<_, _>>(),
        }),
    }
}

pub fn run(command: SnapshotCommand) -> anyhow::Result<()> {
    runtime()?.block_on(async move {
        match command {
            SnapshotCommand::Create {
                name,
                path,
                control,
            } => {
                let mut client = connect(&control).await?;
                let info = client
                    .snapshots
                    .create(proto::CreateSnapshotRequest {
                        name: name.clone(),
                        path: path.clone(),
                    })
                    .await
                    .map_err(|s| failed(&format!("snapshot create {name}"), &client.url, s))?
                    .into_inner();
                if control.json {
                    return print_json(&info_json(&info));
                }
                println!(
                    "snapshot {} of {}: {} files, {} directories, {} bytes",
                    info.name, info.path, info.files, info.directories, info.bytes
                );
                Ok(())
            }
            SnapshotCommand::List { path, control } => {
                let mut client = connect(&control).await?;
                let list = client
                    .snapshots
                    .list(proto::ListSnapshotsRequest {
                        path: path.clone().unwrap_or_default(),
                    })
                    .await
                    .map_err(|s| failed("snapshot list", &client.url, s))?
                    .into_inner();
                if control.json {
                    let all: Vec<_> = list.snapshots.iter().map(info_json).collect();
                    return print_json(&json!(all));
                }
                let mut out = std::io::stdout().lock();
                for info in &list.snapshots {
                    writeln!(
                        out,
                        "{:<24} {}  {:>6} files {:>14} bytes  {}",
                        info.name,
                        timestamp(info.created_ms),
                        info.files,
                        info.bytes,
                        info.path
                    )?;
                }
                Ok(())
            }
            SnapshotCommand::Diff { from, to, control } => {
                let mut client = connect(&control).await?;
                let diff = client
                    .snapshots
                    .diff(proto::DiffRequest {
                        from: from.clone(),
                        to: to.clone().unwrap_or_default(),
                    })
                    .await
                    .map_err(|s| failed(&format!("snapshot diff {from}"), &client.url, s))?
                    .into_inner();
                if control.json {
                    let all: Vec<_> = diff
                        .entries
                        .iter()
                        .map(|e| {
                            json!({
                                "path": e.path,
                                "change": change_name(e.change),
                                "before": side_json(&e.before),
                                "after": side_json(&e.after),
                            })
                        })
                        .collect();
                    return print_json(&json!(all));
                }
                let mut out = std::io::stdout().lock();
                for entry in &diff.entries {
                    let mark = match change_name(entry.change) {
                        "added" => '+',
                        "removed" => '-',
                        _ => '~',
                    };
                    let version = |side: &Option<proto::SnapshotEntry>| {
                        side.as_ref()
                            .filter(|s| s.kind == proto::EntryKind::File as i32)
                            .map(|s| format!("v{} ({} bytes)", s.version, s.size))
                    };
                    let detail = match (version(&entry.before), version(&entry.after)) {
                        (Some(a), Some(b)) => format!("  {a} → {b}"),
                        _ => String::new(),
                    };
                    writeln!(out, "{mark} {}{detail}", entry.path)?;
                }
                Ok(())
            }
            SnapshotCommand::Rollback { name, control } => {
                let mut client = connect(&control).await?;
                let report = client
                    .snapshots
                    .rollback(proto::RollbackRequest { name: name.clone() })
                    .await
                    .map_err(|s| failed(&format!("snapshot rollback {name}"), &client.url, s))?
                    .into_inner();
                if control.json {
                    return print_json(&tier0_control_api::json::rollback(&name, &report));
                }
                println!(
                    "rolled back to {name}: {} restored, {} removed, {} unchanged",
                    report.restored, report.removed, report.unchanged
                );
                Ok(())
            }
            SnapshotCommand::Delete { name, control } => {
                let mut client = connect(&control).await?;
                client
                    .snapshots
                    .delete(proto::DeleteSnapshotRequest { name: name.clone() })
                    .await
                    .map_err(|s| failed(&format!("snapshot delete {name}"), &client.url, s))?;
                if control.json {
                    return print_json(&json!({ "name": name, "deleted": true }));
                }
                Ok(())
            }
        }
    })
}
