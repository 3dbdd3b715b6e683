//! What every control-plane client command shares: finding the control plane, the token,
//! `--json`, and turning a gRPC status into one clear line.

use std::path::PathBuf;

use anyhow::{Context, bail};
use clap::Args;
use tier0_control_api::client::{ControlClient, Timeouts};

#[derive(Debug, Clone, Args)]
pub struct ControlArgs {
    /// The control plane (`http://host:port`, or `host:port`).
    #[arg(
        long,
        env = "TIER0_CONTROL",
        default_value = "http://127.0.0.1:7300",
        global = true
    )]
    pub control: String,
    /// File holding the cluster token (else the TIER0_TOKEN environment variable).
    #[arg(long, value_name = "PATH", global = true)]
    pub token_file: Option<PathBuf>,
    /// Print JSON instead of text.
    #[arg(long, global = true)]
    pub json: bool,
}

/// The cluster token from `--token-file` or `TIER0_TOKEN`, trimmed, never empty.
pub fn read_token(token_file: Option<&PathBuf>) -> anyhow::Result<Vec<u8>> {
    let token = match token_file {
        Some(path) => std::fs::read(path)
            .with_context(|| format!("reading the token file {}", path.display()))?,
        None => match std::env::var_os("TIER0_TOKEN") {
            Some(token) => token.into_encoded_bytes(),
            None => bail!("no cluster token: pass --token-file or set TIER0_TOKEN"),
        },
    };
    let token = token.trim_ascii().to_vec();
    if token.is_empty() {
        bail!("the cluster token is empty");
    }
    Ok(token)
}

/// A runtime for one client command.
pub fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")
}

pub async fn connect(args: &ControlArgs) -> anyhow::Result<ControlClient> {
    let token = read_token(args.token_file.as_ref())?;
    // A command's call may be a whole upkeep pass or the rollback of a large tree: it gets
    // long, not forever. A control plane that dies is noticed sooner, by keepalive.
    let timeouts = Timeouts {
        request: COMMAND_TIMEOUT,
        ..Timeouts::default()
    };
    Ok(ControlClient::connect_with(&args.control, &token, timeouts).await?)
}

/// The longest one command's call waits for its reply.
const COMMAND_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(600);

/// A failed call as one line: what was asked, where, and the server's reason.
pub fn failed(what: &str, url: &str, status: tonic::Status) -> anyhow::Error {
    let code = match status.code() {
        tonic::Code::InvalidArgument => "invalid argument",
        tonic::Code::NotFound => "not found",
        tonic::Code::AlreadyExists => "already exists",
        tonic::Code::FailedPrecondition => "refused",
        tonic::Code::Unauthenticated => "unauthenticated",
        tonic::Code::Unavailable => "unavailable",
        tonic::Code::ResourceExhausted => "too large",
        _ => "failed",
    };
    anyhow::anyhow!("{what}: {code}: {} (control plane {url})", status.message())
}

pub fn print_json(value: &serde_json::Value) -> anyhow::Result<()> {
    use std::io::Write;
    let mut stdout = std::io::stdout().lock();
    serde_json::to_writer_pretty(&mut stdout, value)?;
    writeln!(stdout)?;
    Ok(())
}

/// Milliseconds since the epoch as UTC `YYYY-MM-DD HH:MM:SS`.
pub fn timestamp(ms: u64) -> String {
    let secs = ms / 1000;
    let (days, rest) = (secs / 86_400, secs % 86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02} {:02}:{:02}:{:02}",
        rest / 3600,
        rest % 3600 / 60,
        rest % 60
    )
}

#[cfg(test)]
mod tests {
    #[test]
    fn timestamps_are_utc_dates() {
        assert_eq!(super::timestamp(0), "1970-01-01 00:00:00");
        assert_eq!(super::timestamp(1_796_137_569_000), "2026-12-01 15:06:09");
    }
}
