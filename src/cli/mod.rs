//! The command line: argument parsing, output and exit codes only. Everything else is in the
//! library modules this calls.

mod commands;
mod ops;
mod plan_apply;
mod pr;

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
    /// Desired (repository) vs live (providers), three-way with the last-applied record.
    Plan {
        #[command(flatten)]
        args: PlanArgs,
        /// Save the plan to FILE, for `apply FILE`.
        #[arg(long, value_name = "FILE")]
        out: Option<PathBuf>,
        #[arg(long, value_enum, default_value_t)]
        format: Format,
        /// Exit 2 when there are changes or drift (0: none, 1: error).
        #[arg(long)]
        detailed_exitcode: bool,
        #[command(flatten)]
        report: ReportArgs,
    },
    /// What a pull request changes in the rendered resources: the repository at --base
    /// against --head, desired against desired, with no access to live systems (safe for
    /// pull requests from forks). Only the tenants the change reaches are read.
    Diff {
        /// The revision the change starts from (any git revision: a commit, branch, tag).
        #[arg(long, value_name = "REV")]
        base: String,
        /// The revision with the change.
        #[arg(long, value_name = "REV")]
        head: String,
        #[arg(long, value_enum, default_value_t)]
        format: Format,
        /// The time licenses and secrets are judged at (RFC 3339; default: now).
        #[arg(long, value_name = "RFC3339")]
        now: Option<String>,
        /// Exit 2 when there are changes (0: none, 1: errors at the head revision).
        #[arg(long)]
        detailed_exitcode: bool,
        #[command(flatten)]
        report: ReportArgs,
    },
    /// Create or update one sticky comment on a GitHub pull request (found again by a hidden
    /// marker), from GITHUB_TOKEN, GITHUB_REPOSITORY and GITHUB_API_URL.
    PrComment {
        /// The pull request's number.
        #[arg(long, value_name = "N")]
        pr: u64,
        /// The comment's Markdown (`-`: standard input).
        #[arg(long, value_name = "FILE")]
        body_file: PathBuf,
        /// The hidden marker (`<!-- TEXT -->`) that names the comment; one comment per marker.
        #[arg(long, value_name = "TEXT", default_value = "dotmac-gitops")]
        marker: String,
    },
    /// Apply a saved plan, or plan and apply.
    Apply {
        /// A plan saved with `plan --out`; refused if the repository, the state or live
        /// resources moved since.
        #[arg(value_name = "FILE")]
        plan_file: Option<PathBuf>,
        #[command(flatten)]
        args: PlanArgs,
        /// Do not ask for confirmation.
        #[arg(long)]
        auto_approve: bool,
        /// Allow deletions (critical changes).
        #[arg(long)]
        allow_delete: bool,
        /// Remove every version of deleted secrets (default: a soft delete that keeps them).
        #[arg(long)]
        destroy_secrets: bool,
        /// Tenants applied at the same time (default: [apply] parallelism, else 8); with
        /// local stores only, at most one per core.
        #[arg(long, value_name = "N")]
        parallelism: Option<usize>,
        #[command(flatten)]
        lock: LockArgs,
    },
    /// Live vs last-applied for every resource, and management vs ISP consistency.
    Drift {
        #[arg(long = "tenant", value_name = "ID")]
        tenants: Vec<String>,
        #[arg(long, value_enum, default_value_t)]
        format: Format,
        /// Exit 2 when there is drift.
        #[arg(long)]
        detailed_exitcode: bool,
    },
    /// The audit trail and a per-tenant summary.
    Audit {
        #[arg(long = "tenant", value_name = "ID")]
        tenants: Vec<String>,
        /// Only entries at or after this time (RFC 3339).
        #[arg(long, value_name = "RFC3339")]
        since: Option<String>,
        #[arg(long, value_enum, default_value_t)]
        format: Format,
    },
    /// Rotate generated secrets now.
    Rotate {
        /// The tenants (repeatable; at least one).
        #[arg(long = "tenant", value_name = "ID", required = true)]
        tenants: Vec<String>,
        /// Only these secrets (default: every generated secret of the tenants).
        #[arg(long = "secret", value_name = "NAME")]
        secrets: Vec<String>,
        /// An emergency rotation: critical risk in the audit log, every chosen tenant at once.
        #[arg(long)]
        emergency: bool,
        #[command(flatten)]
        lock: LockArgs,
    },
    /// Manage values in the local secret store.
    #[command(subcommand)]
    Secret(SecretCommand),
    /// The benchmark's parse-only floor: read and parse every file of the repository once,
    /// nothing else.
    #[command(hide = true, name = "bench-parse")]
    BenchParse,
    /// Keep live state equal to a git branch, continuously: reconcile loops, HTTP status
    /// and metrics, notifications, leader election.
    Daemon(DaemonArgs),
}

/// `daemon`: `--repo` is a local work tree or a URL to clone (`--rev` does not apply: the
/// daemon follows `--branch`).
#[derive(Debug, Clone, Args)]
pub struct DaemonArgs {
    /// The branch to follow (default: a local repository's current branch; a remote's default branch).
    #[arg(long)]
    pub branch: Option<String>,
    /// How often every tenant is checked for drift and a remote repository fetched
    /// (default: [daemon] interval, else 1m).
    #[arg(long, value_name = "DURATION")]
    pub interval: Option<String>,
    /// Where the HTTP endpoints listen.
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:9090")]
    pub listen: std::net::SocketAddr,
    /// Apply new commits and heal drift (without it, the daemon only reports).
    #[arg(long)]
    pub auto_apply: bool,
    /// Let auto-apply delete resources (tenants or resources removed from the repository).
    #[arg(long)]
    pub allow_delete: bool,
    /// Tenant batches reconciled at the same time (default: [daemon] concurrency, else 2).
    #[arg(long, value_name = "N")]
    pub concurrency: Option<usize>,
    /// Where remote repositories are cloned (default: $XDG_CACHE_HOME/dotmac-gitops).
    #[arg(long, value_name = "DIR")]
    pub cache_dir: Option<PathBuf>,
    /// How replicas agree on the one that reconciles.
    #[arg(long, value_enum, default_value = "auto")]
    pub leader_election: crate::daemon::leader::Election,
    /// The Lease's name.
    #[arg(long, default_value = "dotmac-gitops")]
    pub lease_name: String,
    /// The Lease's namespace (default: $POD_NAMESPACE, the service account's, else default).
    #[arg(long)]
    pub lease_namespace: Option<String>,
    /// How long a Lease holds without renewal.
    #[arg(long, value_name = "DURATION", default_value = "15s")]
    pub lease_duration: String,
    /// How long a shutdown waits for tenants being applied.
    #[arg(long, value_name = "DURATION", default_value = "25s")]
    pub shutdown_timeout: String,
    /// Who applies, for the audit log.
    #[arg(long, default_value = "dotmac-gitops-daemon")]
    pub actor: String,
    /// Require a token on the HTTP endpoints (dashboard and API; not the probes, the metrics
    /// or the git webhook): the name of the environment variable that holds it. Send it as
    /// `Authorization: Bearer …`, or as the Basic password of --auth-user from a browser.
    #[arg(long, value_name = "VAR")]
    pub auth_token_env: Option<String>,
    /// The user name for Basic authentication (with --auth-token-env).
    #[arg(long, value_name = "NAME", default_value = "dotmac", requires = "auth_token_env")]
    pub auth_user: String,
}

#[derive(Debug, Clone, Args)]
pub struct PlanArgs {
    /// Only this tenant (repeatable).
    #[arg(long = "tenant", value_name = "ID")]
    pub tenants: Vec<String>,
    /// The time licenses and secret ages are judged at (RFC 3339; default: now).
    #[arg(long, value_name = "RFC3339")]
    pub now: Option<String>,
}

/// Reports for CI: a capped Markdown comment, the job summary, step outputs.
#[derive(Debug, Clone, Default, Args)]
pub struct ReportArgs {
    /// With --format markdown: stay within N characters, summarising and then truncating
    /// with a notice (a GitHub comment holds 65536).
    #[arg(long, value_name = "N")]
    pub max_chars: Option<usize>,
    /// Append the full Markdown report to FILE (for $GITHUB_STEP_SUMMARY; capped at 1 MiB).
    #[arg(long, value_name = "FILE")]
    pub summary_file: Option<PathBuf>,
    /// With --format markdown: start with the hidden marker `<!-- TEXT -->` that
    /// `pr-comment --marker TEXT` looks for.
    #[arg(long, value_name = "TEXT")]
    pub marker: Option<String>,
    /// Where the full report is, named in the truncation notice (e.g. the workflow run's URL).
    #[arg(long, value_name = "TEXT")]
    pub full_report: Option<String>,
    /// Append `changed-tenants`, `has-changes`, `highest-risk` and `errors` as name=value
    /// lines to FILE (for $GITHUB_OUTPUT).
    #[arg(long, value_name = "FILE")]
    pub github_output: Option<PathBuf>,
}

#[derive(Debug, Clone, Args)]
pub struct LockArgs {
    /// Wait this long for the state lock (e.g. 30s, 5m; default: fail at once).
    #[arg(long, value_name = "DURATION", default_value = "0s")]
    pub lock_timeout: String,
    /// Who is applying, for the audit log (default: $USER).
    #[arg(long)]
    pub actor: Option<String>,
}

#[derive(Debug, Subcommand)]
pub enum SecretCommand {
    /// Put a value for an external secret into the local store (the value is read from stdin).
    Put {
        #[arg(long)]
        tenant: String,
        #[arg(long)]
        name: String,
        /// Wait this long for the state lock (an apply writes the same store; default: fail
        /// at once, naming the holder).
        #[arg(long, value_name = "DURATION", default_value = "0s")]
        lock_timeout: String,
    },
}

/// The process entry point: parse, run, map the outcome to an exit code.
pub fn main() -> ExitCode {
    // Printing into a closed pipe (`| head`) ends the process quietly, as for any CLI tool.
    // SAFETY: restoring the default disposition of SIGPIPE before any thread starts.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    // Keep large git trees parsed in memory (libgit2 caches trees up to 4 KiB by default): a
    // `tenants/` tree of thousands of folders is then inflated once per run, not on every
    // lookup. SAFETY: libgit2's global options are set before any thread starts.
    unsafe {
        let _ = git2::opts::set_cache_object_limit(git2::ObjectType::Tree, 64 << 20);
    }
    // Objects are not hashed again on every read, as git does not: they were checked when they
    // arrived (clone, fetch). Hashing with collision detection was a quarter of `diff`'s
    // time at 100,000 tenants, whose `tenants/` tree is a 4 MB object read at both commits.
    git2::opts::strict_hash_verification(false);
    // One TLS crypto provider for the process (ring); an error means one is installed already.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let cli = Cli::parse();
    let daemon = matches!(cli.command, Command::Daemon(_));
    if !daemon {
        crate::render::budget::keep_freed_memory();
    }
    if matches!(cli.command, Command::Apply { .. }) {
        crate::render::budget::small_pages_only();
        crate::engine::keep_memory_below(1024);
    }
    init_logging(&cli.global, daemon);
    match commands::run(cli) {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            let color = std::io::stderr().is_terminal();
            let head = if color { "\x1b[1;31merror\x1b[0m" } else { "error" };
            eprintln!("{head}: {}", crate::diag::printable(&format!("{e:#}")));
            ExitCode::from(1)
        }
    }
}

fn init_logging(g: &Global, daemon: bool) {
    use tracing_subscriber::EnvFilter;
    let default = match g.verbose {
        // The daemon says what it does (info); the other commands print their results.
        0 if daemon => "warn,dotmac_gitops=info,vaultrs=off,rustify=off,rustls_platform_verifier=off",
        // vaultrs and rustify log every error answer (a 404 too) at ERROR level, the TLS
        // verifier every refused certificate; the OpenBao provider reports failures itself,
        // with what to do about them.
        0 => "warn,vaultrs=off,rustify=off,rustls_platform_verifier=off",
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
