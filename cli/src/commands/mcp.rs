//! `tier0 mcp`: the MCP server for AI agents, on stdin/stdout (`tier0-mcp`).

use std::path::PathBuf;

use clap::Args;

use super::control::{read_token, runtime};

#[derive(Debug, Args)]
pub struct McpArgs {
    /// The control plane (`http://host:port`, or `host:port`).
    #[arg(long, env = "TIER0_CONTROL", default_value = "http://127.0.0.1:7300")]
    control: String,
    /// File holding the cluster token (else the TIER0_TOKEN environment variable).
    #[arg(long, value_name = "PATH")]
    token_file: Option<PathBuf>,
    /// The name this agent's calls carry (`x-tier0-agent`), as the agent audit log shows it.
    #[arg(long, default_value = "mcp")]
    agent_name: String,
}

pub fn run(args: McpArgs) -> anyhow::Result<()> {
    let token = read_token(args.token_file.as_ref())?;
    runtime()?.block_on(tier0_mcp::serve_stdio(tier0_mcp::Config {
        control: args.control,
        token,
        agent: args.agent_name,
    }))
}
