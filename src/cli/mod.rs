//! The command line: argument parsing, output and exit codes only. Everything else is in the
//! library modules this calls.

mod commands;

use clap::{Args, Parser, Subcommand, ValueEnum};
use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Debug, Parser)]
#[command(
    name = "dotmac-gitops",
    version,
    about = "Declarative GitOps for DotMac tenants: validate, render, plan and apply a desired-state repository",
    propagate_version = true
)]
pub struct Cli {
    #[command(flatten)]
    pub global: Global,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Clone, Args)]
pub struct Global {
    /// The repository (default: the current directory, searched upwards for dotmac.toml).
    #[arg(long, global = true, value_name = "DIR")]
    pub repo: Option<PathBuf>,
    /// Read the repository at this git revision instead of the work tree.
    #[arg(long, global = true, value_name = "REV")]
    pub rev: Option<String>,
    /// Never colour the output (colour is used only on a terminal anyway).
    #[arg(long, global = true)]
    pub no_color: bool,
    /// Log format on stderr.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    /// More logging on stderr (-v info, -vv debug, -vvv trace); DOTMAC_LOG overrides.
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    pub verbose: u8,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, ValueEnum)]
pub enum Format {
    #[default]
    Text,
    Json,
    Markdown,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Load, schema-check and cross-check the repository, render every template once, and
    /// print every problem with its file, line and JSON pointer.
    Validate {
        #[arg(long, value_enum, default_value_t)]
        format: Format,
        /// The time licenses and secrets are judged at (RFC 3339; default: now).
        #[arg(long, value_name = "RFC3339")]
        now: Option<String>,
    },
    /// Print or write the rendered resources of the chosen tenants.
    Render {
        /// Only this tenant (repeatable).
        #[arg(long = "tenant", value_name = "ID")]
        tenants: Vec<String>,
        /// Write one file per resource under DIR instead of printing.
        #[arg(long, value_name = "DIR")]
        out: Option<PathBuf>,
        #[arg(long, value_enum, default_value_t)]
        format: Format,
        #[arg(long, value_name = "RFC3339")]
        now: Option<String>,
    },
}

/// The process entry point: parse, run, map the outcome to an exit code.
pub fn main() -> ExitCode {
    // Printing into a closed pipe (`| head`) ends the process quietly, as for any CLI tool.
    // SAFETY: restoring the default disposition of SIGPIPE before any thread starts.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    let cli = Cli::parse();
    init_logging(&cli.global);
    match commands::run(cli) {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            let color = std::io::stderr().is_terminal();
            let head = if color { "\x1b[1;31merror\x1b[0m" } else { "error" };
            eprintln!("{head}: {e:#}");
            ExitCode::from(1)
        }
    }
}

fn init_logging(g: &Global) {
    use tracing_subscriber::EnvFilter;
    let default = match g.verbose {
        0 => "warn",
        1 => "dotmac_gitops=info",
        2 => "dotmac_gitops=debug",
        _ => "dotmac_gitops=trace",
    };
    let filter = EnvFilter::try_from_env("DOTMAC_LOG").unwrap_or_else(|_| EnvFilter::new(default));
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    let _ = match g.log_format {
        LogFormat::Json => builder.json().try_init(),
        LogFormat::Text => builder.with_ansi(std::io::stderr().is_terminal() && !g.no_color).try_init(),
    };
}
