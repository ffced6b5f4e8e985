//! The command line: verbs, their options and their exit codes. Each verb loads the config,
//! wires what it needs (through `node`) and prints; no replication logic lives here.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Result, bail};
use clap::{Args, Parser, Subcommand};

mod generate;
mod peers;
mod prune;
mod status;
mod verify;

use std::sync::Arc;

use crate::config;
use crate::node::control;
use crate::observe::logging::{self, LogFormat};
use crate::replicate;

/// Keeps live replicas of btrfs subvolumes and ZFS datasets on other machines by shipping
/// snapshot send streams.
#[derive(Debug, Parser)]
#[command(name = "snapship", version, about, propagate_version = true)]
pub struct Cli {
    /// Log format on stderr.
    #[arg(long, global = true, value_enum, default_value = "human")]
    log_format: LogFormat,
    /// More log output (-v debug, -vv trace).
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    verbose: u8,
    /// Only warnings and errors.
    #[arg(short, long, global = true, conflicts_with = "verbose")]
    quiet: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run in the foreground: receive as replica (and, as origin, schedule and ship); stop with
    /// SIGINT or SIGTERM.
    Run(ConfigArg),
    /// Check the node config, every policy it lists, and what they name on this node (TLS
    /// files, the file sets' paths); exit 0 when all are valid (warnings allowed).
    Check {
        #[command(flatten)]
        config: ConfigArg,
        /// Check only the config files, not what they name on this node (for a config meant
        /// for another node, or in CI).
        #[arg(long)]
        config_only: bool,
        /// Also connect to every peer: the TLS handshake, the protocol version, and that its
        /// policy for every file set both nodes are members of is the same as this node's.
        #[arg(long, conflicts_with = "config_only")]
        peers: bool,
    },
    /// Snapshot a file set now and ship it to every replica; exit 0 when every replica has it.
    Sync {
        #[command(flatten)]
        config: ConfigArg,
        /// The file set (the policy's `fileset`).
        fileset: String,
        /// With a daemon running: how long to wait, after a replica's first attempt failed,
        /// for the daemon's retries to get the snapshot there; after it, the command reports
        /// the failure and exits 1, while the daemon goes on (`0s`: report the first attempt).
        #[arg(long, value_name = "DURATION", default_value = "10m", value_parser = humantime::parse_duration)]
        wait: std::time::Duration,
        /// With a daemon running: return once the snapshot is taken; the daemon ships it.
        #[arg(long, conflicts_with = "wait")]
        no_wait: bool,
    },
    /// On a replica whose origin is gone: make this node the file set's origin (a new epoch);
    /// the other members follow with no configuration change, and the old origin, when it
    /// comes back, steps down and becomes a replica. Refused while the origin still answers
    /// (use switchover there) unless --force.
    Promote {
        #[command(flatten)]
        config: ConfigArg,
        /// The file set.
        fileset: String,
        /// Promote even though the current origin still answers (it is fenced off).
        #[arg(long)]
        force: bool,
    },
    /// On the origin, planned: freeze writes, take a final snapshot, ship it, have NODE take
    /// over as origin, and become a replica. No data is lost; if a step before NODE's
    /// takeover fails, writes are thawed and this node stays the origin. Needs `snapship run`.
    Switchover {
        #[command(flatten)]
        config: ConfigArg,
        /// The file set.
        fileset: String,
        /// The member that becomes the origin.
        #[arg(long, value_name = "NODE")]
        to: String,
    },
    /// The diverged data this node keeps for a file set (what it wrote as origin after the
    /// newest snapshot the new origin had, kept read-only when it stepped down); with
    /// --remove, delete one once you have looked at it (docs/failover.md). Retention never
    /// deletes diverged data.
    Diverged {
        #[command(flatten)]
        config: ConfigArg,
        /// The file set.
        fileset: String,
        /// Delete this diverged data (its name, `diverged-TIME`).
        #[arg(long, value_name = "NAME")]
        remove: Option<String>,
    },
    /// Ask the running daemon, per file set and replica: newest snapshots, common base, lag,
    /// the transfer in progress, the last error.
    Status {
        #[command(flatten)]
        config: ConfigArg,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
    },
    /// List a file set's snapshots: each one's time, kind and size, and which members hold
    /// it. Works on the origin and on a replica, with or without a running daemon here. The
    /// origin asks each replica over QUIC; a replica reads its own copies and asks the origin,
    /// and shows `?` for the other replicas (they answer only their origin). Exits non-zero
    /// when a member it asked cannot be reached.
    List {
        #[command(flatten)]
        config: ConfigArg,
        /// The file set.
        fileset: String,
    },
    /// Make a snapshot this node holds available as a new, writable copy: the whole file set,
    /// or one file or directory of it (--path). Never touches the live file set, unless
    /// --in-place.
    ///
    /// btrfs: --to PATH becomes a writable snapshot of the chosen snapshot (instant; PATH must be
    /// on the same btrfs). ZFS: --to names a new dataset, cloned from the snapshot (same pool).
    /// With --path, the file or directory is copied to --to PATH with its mode, owner, times and
    /// xattrs (reflinked where the filesystem can). PATH must not exist.
    /// --in-place (btrfs, on the origin, `snapship run` stopped): the live file set becomes the
    /// snapshot's content; what it held is kept read-only beside it, NAME.before-restore-TIME.
    #[command(verbatim_doc_comment)]
    Restore {
        #[command(flatten)]
        config: ConfigArg,
        /// The file set.
        fileset: String,
        /// The newest snapshot at or before TIME: RFC 3339 (2026-11-30T14:00:00Z,
        /// 2026-11-30T15:00:00+01:00), a date and time in UTC (2026-11-30 14:00), a duration
        /// ago (2h ago, 1h 30m ago), or now.
        #[arg(long, value_name = "TIME", required_unless_present = "snapshot", conflicts_with = "snapshot")]
        at: Option<String>,
        /// The snapshot by name (as `snapship list` shows it).
        #[arg(long, value_name = "NAME")]
        snapshot: Option<String>,
        /// Where the copy goes (a new path; with ZFS and no --path, a new dataset name).
        #[arg(long, value_name = "PATH", required_unless_present = "in_place")]
        to: Option<String>,
        /// Restore the live file set itself to the snapshot, on its origin, with no `snapship
        /// run` using this node's state_dir (stop it first). The live state is kept first,
        /// read-only, beside it as NAME.before-restore-TIME (never pruned; on ZFS a dataset
        /// with the later snapshots and the live state as @before-restore-TIME).
        #[arg(long, conflicts_with_all = ["to", "path", "from"])]
        in_place: bool,
        /// Only this file or directory, relative to the file set's root (the live path, e.g.
        /// /srv/projects/docs/a.txt, is understood too).
        #[arg(long, value_name = "SUBPATH")]
        path: Option<PathBuf>,
        /// Restore from another member node's snapshot, or from one of the file set's
        /// object-storage replicas, by its `name` (docs/object-storage.md: its chain of streams
        /// is downloaded, checked and received; with --path, into a temporary place, removed after
        /// the copy). A member ships the snapshot to this node over
        /// QUIC first, incrementally from the newest base both hold (this node's daemon must
        /// run: it receives it); then it is restored as any snapshot held here. btrfs and ZFS
        /// (on ZFS nothing older than this node's newest snapshot, and never by rolling
        /// anything back: docs/restore.md).
        #[arg(long, value_name = "NAME")]
        from: Option<String>,
    },
    /// Prove that a replica's copy of a snapshot equals the origin's, content and metadata
    /// (type, mode, owner, size, mtime, xattrs, symlink targets, file contents); run on the
    /// origin. Prints each path that differs and what differs:
    ///   M PATH: WHAT   differs (content, mode 0755 -> 0700, xattr user.x, ...; origin first)
    ///   D PATH: only on the origin      A PATH: only on the replica
    /// Both nodes hash their copy (reusing, unless --full, the content hashes of their last
    /// verify for files whose inode, size, mtime and ctime are unchanged) and compare hash
    /// trees, descending only where they differ. btrfs and ZFS (through temporary clones).
    /// An object store (--replica NAME, and after the nodes without --replica) is checked
    /// against its own manifests, from any node with its key: each stream of the snapshot's
    /// chain present with its size; with --full every part downloaded, decrypted and hashed.
    /// Exit 0: equal; 1: a replica differs; 2: could not verify (and none differs).
    #[command(verbatim_doc_comment)]
    Verify {
        #[command(flatten)]
        config: ConfigArg,
        /// The file set.
        fileset: String,
        /// Only this replica (default: every replica of the file set).
        #[arg(long, value_name = "MEMBER")]
        replica: Option<String>,
        /// This snapshot, by name (default: the newest that origin and replica both hold).
        #[arg(long, value_name = "NAME")]
        snapshot: Option<String>,
        /// Rehash every file on both nodes, ignoring the hashes kept from the last verify (an
        /// object store: download and check every part).
        #[arg(long)]
        full: bool,
    },
    /// Delete snapshots that retention no longer keeps, on every side this node holds (the
    /// newest, every common base and transfers in flight are always kept). With --dry-run,
    /// print the plan and why each snapshot is kept.
    Prune {
        #[command(flatten)]
        config: ConfigArg,
        /// Only this file set.
        fileset: Option<String>,
        /// Print the plan, delete nothing.
        #[arg(long)]
        dry_run: bool,
    },
    /// Make a CA and a certificate and key per node for mutual TLS: DIR/ca.pem, DIR/ca.key,
    /// DIR/NODE.pem, DIR/NODE.key; or renew a node's certificate.
    ///
    /// An existing CA in DIR is reused (never replaced), so nodes can be added later. A node
    /// that already has a key or certificate in DIR is refused unless --renew or --force says
    /// what to do with it.
    ///
    /// Node certificates are valid for 825 days (--days), the CA for 10 years. To renew a
    /// node before it expires: `snapship certs --out DIR --renew NODE`, then copy DIR/NODE.pem
    /// to the node and restart its `snapship run`; its key and the other nodes stay as they are.
    ///
    /// DIR/ca.key can sign certificates every node trusts: keep it offline, never on the
    /// nodes (they need ca.pem, NODE.pem and NODE.key); it is only needed to add or renew nodes.
    Certs {
        /// Where to write the files.
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
        /// Days the node certificates made or renewed now are valid.
        #[arg(long, value_name = "N", default_value_t = crate::ship::tls::NODE_CERT_DAYS, value_parser = clap::value_parser!(u32).range(1..))]
        days: u32,
        /// Renew the named nodes: a new certificate (new serial and validity) for each one's
        /// existing key, signed by the existing CA. Nothing else changes.
        #[arg(long, conflicts_with = "force")]
        renew: bool,
        /// Replace the named nodes' keys and certificates; their old keys stop working. The CA is
        /// kept.
        #[arg(long)]
        force: bool,
        /// Node names (as in `node:` of each node config).
        #[arg(required = true, value_name = "NODE")]
        nodes: Vec<String>,
    },
    // Hidden from --help and the man pages: `make install` and packagers run it, and admins
    // its `unit-paths` (docs/configuration.md). Shell completions still offer it.
    /// Files for installing snapship: man pages, shell completions, a systemd drop-in with the
    /// places this node's policies write.
    #[command(hide = true, subcommand)]
    Generate(generate::Generate),
}

#[derive(Debug, Args)]
struct ConfigArg {
    /// The node config (node.yaml).
    #[arg(short, long, value_name = "FILE")]
    config: PathBuf,
}

pub fn main() -> ExitCode {
    let cli = Cli::parse();
    logging::init(cli.log_format, if cli.quiet { -1 } else { cli.verbose.min(2) as i8 });
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(dispatch(cli.command)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn dispatch(command: Command) -> Result<ExitCode> {
    match command {
        Command::Run(args) => crate::node::run(&args.config).await.map(|()| ExitCode::SUCCESS),
        Command::Check { config, config_only, peers } => check(&config.config, config_only, peers).await,
        Command::Sync { config, fileset, wait, no_wait } => sync(&config.config, &fileset, (!no_wait).then_some(wait)).await,
        Command::Promote { config, fileset, force } => promote(&config.config, &fileset, force).await,
        Command::Switchover { config, fileset, to } => switchover(&config.config, &fileset, &to).await,
        Command::Diverged { config, fileset, remove } => diverged(&config.config, &fileset, remove.as_deref()).await,
        Command::Certs { out, days, renew, force, nodes } => {
            use crate::ship::tls::Existing;
            let existing = match (renew, force) {
                (true, _) => Existing::Renew,
                (false, true) => Existing::Replace,
                (false, false) => Existing::Refuse,
            };
            certs(&out, &nodes, &crate::ship::tls::CertOptions { node_days: days, existing })
        }
        Command::Status { config, json } => status(&config.config, json).await,
        Command::List { config, fileset } => list(&config.config, &fileset).await,
        Command::Restore { config, fileset, at, snapshot, to, path, from, in_place } => {
            let which = match (&at, &snapshot) {
                (_, Some(name)) => Some(crate::restore::Which::Named(name.clone())),
                (Some(at), None) => {
                    Some(crate::restore::Which::At(crate::restore::when::parse_time(at, chrono::Utc::now()).map_err(|e| anyhow::anyhow!("--at: {e}"))?))
                }
                (None, None) => None,
            };
            if in_place {
                let which = which.ok_or_else(|| anyhow::anyhow!("say which snapshot: --at TIME or --snapshot NAME"))?;
                return restore_in_place(&config.config, &fileset, &which).await;
            }
            let to = to.unwrap_or_default();
            if let (Some(store), Some(which)) = (from.as_deref(), &which) {
                if let Some(code) = restore_from_store(&config.config, &fileset, store, which, &to, path.as_deref()).await? {
                    return Ok(code);
                }
            }
            let Some(which) = which else { bail!("say which snapshot: --at TIME or --snapshot NAME") };
            // Not an object store of the file set (those are restored above): a member node,
            // which ships the snapshot here first.
            let which = match from {
                Some(node) => fetch_from_member(&config.config, &fileset, &node, &which).await?,
                None => which,
            };
            restore(&config.config, &fileset, &which, &to, path.as_deref()).await
        }
        Command::Verify { config, fileset, replica, snapshot, full } => {
            Ok(verify::verify(&config.config, &fileset, replica.as_deref(), snapshot.as_deref(), full).await)
        }
        Command::Prune { config, fileset, dry_run } => prune(&config.config, fileset.as_deref(), dry_run).await,
        Command::Generate(what) => generate::run(what),
    }
}

/// `snapship check`: the config files, then (unless `config_only`) what they point at on this
/// node (TLS files, the file sets' paths; see `node::preflight`). Warnings alone exit 0.
async fn check(path: &std::path::Path, config_only: bool, with_peers: bool) -> Result<ExitCode> {
    use crate::node::preflight;
    let loaded = config::load(path)?;
    let mut errors = loaded.errors.clone();
    let mut warnings = Vec::new();
    if !config_only {
        let mut tls = preflight::tls(&loaded.node);
        errors.append(&mut tls.errors);
        warnings.append(&mut tls.warnings);
        for policy in &loaded.policies {
            let mut places = preflight::places(policy, &loaded.node).await;
            errors.append(&mut places.errors);
            warnings.append(&mut places.warnings);
        }
    }
    let peers = if with_peers { peers::check(&loaded).await } else { peers::Findings::default() };
    for w in &warnings {
        eprintln!("warning: {w}");
    }
    for e in &errors {
        eprintln!("error: {e}");
    }
    for e in &peers.errors {
        eprintln!("error: {e}");
    }
    if !errors.is_empty() || !peers.errors.is_empty() {
        eprintln!("{} error(s); fix them and run check again", errors.len() + peers.errors.len());
        return Ok(ExitCode::FAILURE);
    }
    println!("{}: node `{}`, {} polic{} valid", path.display(), loaded.node.node, loaded.policies.len(), if loaded.policies.len() == 1 { "y" } else { "ies" });
    for p in &loaded.policies {
        let role = if p.origin.node == loaded.node.node {
            "origin"
        } else if p.replica_on(&loaded.node.node).is_some() {
            "replica"
        } else {
            "not involved"
        };
        println!("  {} ({}, {}): {role}", p.fileset, p.backend, p.mode);
    }
    for line in &peers.fine {
        println!("  {line}");
    }
    Ok(ExitCode::SUCCESS)
}

/// The policy of `fileset`, or an error that says what is there instead.
fn find_policy<'a>(loaded: &'a config::LoadedConfig, path: &std::path::Path, fileset: &str) -> Result<&'a config::Policy> {
    if let Some(policy) = loaded.policy(fileset) {
        return Ok(policy);
    }
    if let Some(e) = loaded.errors.iter().find(|e| e.file.to_string_lossy().contains(fileset)) {
        bail!("file set `{fileset}` did not load: {e}");
    }
    let known: Vec<&str> = loaded.policies.iter().map(|p| p.fileset.0.as_str()).collect();
    bail!("no file set `{fileset}` in the policies of {} (known: {})", path.display(), if known.is_empty() { "none".into() } else { known.join(", ") });
}

/// One file set's sync: its name, the snapshot, and each replica's outcome.
type SyncResult = (String, String, Vec<(String, Result<replicate::ReplicaReport, String>)>);

async fn sync(path: &std::path::Path, fileset: &str, wait: Option<std::time::Duration>) -> Result<ExitCode> {
    let loaded = Arc::new(config::load(path)?);
    let policy = find_policy(&loaded, path, fileset)?;
    for e in &loaded.errors {
        tracing::warn!("skipping a broken policy: {e}");
    }
    // With a daemon running, it does the sync: one process owns transfers and pruning.
    let results: Vec<SyncResult> = match control::sync_through_daemon(&loaded.node.state_dir, fileset, wait).await? {
        Some(replies) if wait.is_none() => {
            for r in &replies {
                println!("{}: {} taken; the running daemon ships it (`snapship status` shows the transfers)", r.fileset, r.snapshot);
            }
            return Ok(ExitCode::SUCCESS);
        }
        Some(replies) => {
            tracing::info!("synced by the running snapship run");
            replies.into_iter().map(|r| (r.fileset, r.snapshot, r.replicas)).collect()
        }
        None => {
            let _lock = crate::node::lock_state_dir(&loaded.node.state_dir)?;
            let progress = crate::observe::progress::Progress::start(fileset);
            let reports = crate::node::sync(&loaded, policy, &|replica, tally| progress.add(replica, tally)).await;
            progress.finish();
            let reports = reports?;
            reports
                .into_iter()
                .map(|r| (r.fileset, r.snapshot.name.to_string(), r.replicas.into_iter().map(|(n, x)| (n, x.map_err(|e| format!("{e:#}")))).collect()))
                .collect()
        }
    };
    let mut failed = false;
    for (fileset, snapshot, outcomes) in &results {
        for (node, result) in outcomes {
            match result {
                Ok(r) => println!(
                    "{fileset}: {} -> {node}: {} ({} bytes in {:.2}s){}",
                    r.snapshot,
                    match &r.base {
                        Some(b) => format!("incremental from {b}"),
                        None if r.bytes == 0 => "already there".into(),
                        None => "full".into(),
                    },
                    r.bytes,
                    r.elapsed.as_secs_f64(),
                    if r.resumed_from > 0 { format!(", resumed after {} bytes the replica held", r.resumed_from) } else { String::new() }
                ),
                Err(e) => {
                    failed = true;
                    println!("{fileset}: {snapshot} -> {node}: FAILED: {e}");
                }
            }
        }
    }
    if failed {
        return Ok(ExitCode::FAILURE);
    }
    Ok(ExitCode::SUCCESS)
}

async fn diverged(path: &std::path::Path, fileset: &str, remove: Option<&str>) -> Result<ExitCode> {
    let loaded = config::load(path)?;
    let policy = find_policy(&loaded, path, fileset)?;
    let here = &loaded.node.node.0;
    let epochs = crate::store::EpochStore::open(&loaded.node.state_dir);
    let record = epochs.record(policy)?;
    match remove {
        None => {
            if record.diverged.is_empty() {
                println!("{fileset}: no diverged data kept on `{here}`");
            }
            let dir = policy.origin_home(here).unwrap_or_default();
            for d in &record.diverged {
                println!("{fileset}: {dir}/{d}");
            }
        }
        Some(name) => {
            if !record.diverged.iter().any(|d| d == name) {
                bail!("no diverged data `{name}` is kept for `{fileset}` on `{here}` (see `snapship diverged` without --remove)");
            }
            crate::snapshot::origin_on(policy, here)?.remove_diverged(name).await?;
            epochs.remove_diverged(policy, name)?;
            println!("{fileset}: removed {name}");
        }
    }
    Ok(ExitCode::SUCCESS)
}

async fn switchover(path: &std::path::Path, fileset: &str, to: &str) -> Result<ExitCode> {
    let started = std::time::Instant::now();
    let loaded = config::load(path)?;
    find_policy(&loaded, path, fileset)?;
    match control::switchover_through_daemon(&loaded.node.state_dir, fileset, to).await? {
        Some(report) => println!("{report}\nswitchover took {:.2}s", started.elapsed().as_secs_f64()),
        None => bail!("no snapship run is running here; switchover is carried out by the running origin daemon: start it and try again"),
    }
    Ok(ExitCode::SUCCESS)
}

async fn promote(path: &std::path::Path, fileset: &str, force: bool) -> Result<ExitCode> {
    let started = std::time::Instant::now();
    let loaded = Arc::new(config::load(path)?);
    let policy = find_policy(&loaded, path, fileset)?;
    let report = match control::promote_through_daemon(&loaded.node.state_dir, fileset, force).await? {
        Some(report) => report,
        None => {
            // No daemon: promote on disk; origin duty starts with `snapship run`.
            let _lock = crate::node::lock_state_dir(&loaded.node.state_dir)?;
            let epochs = crate::store::EpochStore::open(&loaded.node.state_dir);
            let known = crate::origin::failover::other_origin(policy, &loaded.node.node.0, &epochs)?;
            if !force {
                bail!(
                    "no snapship run is running here, so the origin `{}` cannot be asked whether it is gone; start `snapship run` and promote again, or add --force",
                    known.origin
                );
            }
            let report = crate::origin::failover::promote(policy, &loaded.node.node.0, &epochs, 0).await?;
            format!("{report}\nstart `snapship run --config {}` to take up origin duty", path.display())
        }
    };
    println!("{report}");
    println!("promotion took {:.2}s", started.elapsed().as_secs_f64());
    Ok(ExitCode::SUCCESS)
}

fn certs(out: &std::path::Path, nodes: &[String], options: &crate::ship::tls::CertOptions) -> Result<ExitCode> {
    let names = nodes.iter().map(|n| n.parse::<crate::config::units::Name>().map_err(|e| anyhow::anyhow!("node {e}"))).collect::<Result<Vec<_>>>()?;
    for file in crate::ship::tls::make_certs(out, &names, options)? {
        match file.valid_until {
            Some(until) => {
                println!("wrote {} (valid until {})", file.path.display(), chrono::DateTime::<chrono::Utc>::from(until).format("%Y-%m-%d %H:%M UTC"))
            }
            None => println!("wrote {}", file.path.display()),
        }
    }
    if options.existing == crate::ship::tls::Existing::Renew {
        for name in &names {
            println!("kept {}", out.join(format!("{name}.key")).display());
        }
    }
    println!(
        "{} signs certificates that every node trusts: keep it offline, not on the nodes (they need ca.pem, NODE.pem and NODE.key); it is only needed to add or renew nodes",
        out.join("ca.key").display()
    );
    Ok(ExitCode::SUCCESS)
}

async fn prune(path: &std::path::Path, fileset: Option<&str>, dry_run: bool) -> Result<ExitCode> {
    let loaded = Arc::new(config::load(path)?);
    let policies: Vec<&config::Policy> = match fileset {
        Some(f) => vec![find_policy(&loaded, path, f)?],
        None => loaded.policies.iter().collect(),
    };
    // The daemon prunes by itself; two pruners could race a transfer's base.
    let _lock = if dry_run {
        None
    } else {
        Some(crate::node::lock_state_dir(&loaded.node.state_dir).map_err(|e| anyhow::anyhow!("{e:#}; it prunes by itself (use --dry-run to see its plan)"))?)
    };
    let (cfg, wanted) = (&loaded, &policies);
    let reports = crate::node::with_replica_role(cfg, |role| async move { prune::plan_node(cfg, wanted, &role.link, &role.epochs).await }).await?;
    for r in &reports {
        println!("{} {}:", r.side, r.fileset);
        for e in &r.plan.entries {
            if e.delete() {
                println!("  {}  delete", e.name);
            } else {
                let why: Vec<String> = e.keep.iter().map(|k| k.to_string()).collect();
                println!("  {}  keep ({})", e.name, why.join(", "));
            }
        }
        if let Some(why) = &r.blocked {
            println!("  not pruned: {why}");
        }
    }
    if !dry_run {
        let n = prune::apply_reports(&loaded, &reports).await?;
        println!("deleted {n} snapshot(s)");
    }
    Ok(if reports.iter().any(|r| r.blocked.is_some()) { ExitCode::FAILURE } else { ExitCode::SUCCESS })
}

async fn status(path: &std::path::Path, json: bool) -> Result<ExitCode> {
    let loaded = config::load(path)?;
    let report = control::status(&loaded.node.state_dir).await?;
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(ExitCode::SUCCESS);
    }
    print!("{}", status::render(&report));
    Ok(ExitCode::SUCCESS)
}

async fn restore(path: &std::path::Path, fileset: &str, which: &crate::restore::Which, to: &str, subpath: Option<&std::path::Path>) -> Result<ExitCode> {
    let loaded = config::load(path)?;
    let policy = find_policy(&loaded, path, fileset)?;
    let done = crate::restore::restore(&loaded, policy, which, to, subpath).await?;
    print_restored(fileset, &done);
    Ok(ExitCode::SUCCESS)
}

/// `restore --from NODE`, NODE another member: this node's daemon has NODE ship the snapshot
/// here (unless held already); then it is restored as any snapshot held here, by its name.
async fn fetch_from_member(path: &std::path::Path, fileset: &str, node: &str, which: &crate::restore::Which) -> Result<crate::restore::Which> {
    let loaded = config::load(path)?;
    let policy = find_policy(&loaded, path, fileset)?;
    let here = &loaded.node.node.0;
    if node == here {
        return Ok(which.clone());
    }
    if !policy.is_member(node) {
        let stores: Vec<&str> = policy.object_stores.iter().map(|s| s.name.0.as_str()).collect();
        bail!(
            "--from {node}: `{node}` is neither a member of `{fileset}` ({}) nor one of its object stores ({})",
            policy.members().join(", "),
            if stores.is_empty() { "none".to_string() } else { stores.join(", ") }
        );
    }
    let (name, at) = match which {
        crate::restore::Which::Named(name) => (Some(name.as_str()), None),
        crate::restore::Which::At(at) => (None, Some(*at)),
    };
    match control::fetch_through_daemon(&loaded.node.state_dir, fileset, node, name, at).await? {
        Some((name, report)) => {
            println!("{report}");
            Ok(crate::restore::Which::Named(name))
        }
        None => bail!(
            "restore --from {node} needs this node's daemon (`snapship run --config {}`): `{node}` ships the snapshot to its replica service over QUIC; start it, or run restore on `{node}` itself",
            path.display()
        ),
    }
}

/// `restore --in-place`: on the current origin, with no daemon using the `state_dir` (its
/// lock is held meanwhile), the live file set goes back to the snapshot; its state before is
/// kept (`restore::in_place`).
async fn restore_in_place(path: &std::path::Path, fileset: &str, which: &crate::restore::Which) -> Result<ExitCode> {
    let loaded = config::load(path)?;
    let policy = find_policy(&loaded, path, fileset)?;
    let _lock = crate::node::lock_state_dir(&loaded.node.state_dir).map_err(|e| {
        e.context(
            "restore --in-place replaces the live file set, which `snapship run` snapshots and ships: stop it first (`systemctl stop snapship`), restore, then start it again; nothing changed"
        )
    })?;
    let origin_now = crate::store::EpochStore::open(&loaded.node.state_dir).current(policy)?.origin;
    let done = crate::restore::in_place::restore_in_place(&loaded, policy, &origin_now, which).await?;
    let shown = crate::restore::shown_time(&done.snapshot);
    let kind = crate::restore::kind_word(done.snapshot.kind());
    println!("restored the live file set {fileset} at {} to snapshot {} (taken {shown}, {kind})", done.live, done.snapshot);
    println!("the live state from before is kept read-only at {} (snapship never deletes it: {} once it is no longer needed)", done.kept, done.forget);
    if let Some(w) = &done.warning {
        eprintln!("warning: the restore is done, but for the kept state: {w}");
    }
    Ok(ExitCode::SUCCESS)
}

/// What `restore` made, in one line.
fn print_restored(fileset: &str, done: &crate::restore::Restored) {
    let shown = crate::restore::shown_time(&done.snapshot);
    let kind = crate::restore::kind_word(done.snapshot.kind());
    println!("restored {fileset} as of snapshot {} (taken {shown}, {kind}): {} from {}, at {}", done.snapshot, done.how, done.from, done.to);
}

/// `restore --from STORE` where STORE is one of the file set's object-storage replicas;
/// `None` when it names no object store (a member node: handled as before).
async fn restore_from_store(
    path: &std::path::Path,
    fileset: &str,
    store: &str,
    which: &crate::restore::Which,
    to: &str,
    subpath: Option<&std::path::Path>,
) -> Result<Option<ExitCode>> {
    let loaded = config::load(path)?;
    let policy = find_policy(&loaded, path, fileset)?;
    let Some(spec) = policy.object_stores.iter().find(|s| s.name.0 == store) else { return Ok(None) };
    let replica = crate::objstore::ObjectReplica::new(policy, spec);
    let done = crate::objstore::restore::restore(&loaded, policy, &replica, which, to, subpath).await?;
    print_restored(fileset, &done);
    Ok(Some(ExitCode::SUCCESS))
}

/// What `list` knows of one member of the file set.
enum Known {
    Listed(Vec<crate::snapshot::Snapshot>),
    /// Asked, and it could not be reached (or failed): why.
    Unreachable(String),
    /// Not asked: the protocol gives this node no way to (why).
    NotAsked(String),
}

async fn list(path: &std::path::Path, fileset: &str) -> Result<ExitCode> {
    let loaded = config::load(path)?;
    let policy = find_policy(&loaded, path, fileset)?;
    let here = &loaded.node.node;
    if !policy.is_member(&here.0) {
        bail!("node `{here}` holds no copy of `{fileset}`: run list on one of its members ({})", policy.members().join(", "));
    }
    // The origin now (after a promotion, not the policy's `origin`), from this node's epoch.
    let epochs = crate::store::EpochStore::open(&loaded.node.state_dir);
    let current = epochs.current(policy)?.origin;
    let is_origin = current == here.0;
    // The other members: every replica entry (one on the origin's own node too, as a column
    // of its own), and the initial origin once another node is origin.
    let mut others: Vec<(String, bool)> = Vec::new(); // (node, a replica on the origin's node)
    for r in &policy.replicas {
        if r.node.0 != current {
            others.push((r.node.0.clone(), false));
        } else if policy.origin.node.0 == current {
            others.push((r.node.0.clone(), true));
        }
    }
    if policy.origin.node.0 != current {
        others.push((policy.origin.node.0.clone(), false));
    }
    // Each member's column: read from this node's filesystem where the copy is here (a
    // daemon may be receiving into it; listing changes nothing); otherwise asked over QUIC:
    // the origin asks the others, another member asks the origin; members that are not the
    // origin do not ask each other (they answer only their origin). Those asked over QUIC are
    // asked at once: members that are down cost one connect timeout, not one each.
    let asks_remote = !is_origin || others.iter().any(|(n, _)| *n != here.0);
    let connector = if asks_remote { Some(crate::ship::quic::Connector::new(&loaded.node).map(Arc::new).map_err(|e| format!("{e:#}"))) } else { None };
    let remote = |node: String| {
        let (loaded, connector) = (&loaded, connector.clone());
        async move {
            match connector {
                Some(Ok(connector)) => list_remote(loaded, policy, &config::units::Name(node), connector).await.map_err(|e| format!("{e:#}")),
                Some(Err(e)) => Err(e),
                None => Err(format!("`{node}` is on this node")),
            }
        }
    };
    let listed = |r: Result<Vec<crate::snapshot::Snapshot>>| match r {
        Ok(list) => Known::Listed(list),
        Err(e) => Known::Unreachable(format!("{e:#}")),
    };
    let origin_column = async {
        if is_origin {
            Ok::<_, anyhow::Error>(listed(crate::snapshot::origin_on(policy, &here.0)?.list().await))
        } else {
            Ok(match remote(current.clone()).await {
                Ok(list) => Known::Listed(list),
                Err(e) => Known::Unreachable(format!("{e} (an origin answers while its `snapship run` runs with a `listen:` address)")),
            })
        }
    };
    let other_columns = others.iter().map(|(node, _)| {
        let (node, remote, listed, current) = (node.clone(), &remote, &listed, &current);
        async move {
            if node == here.0 {
                return Ok(listed(crate::snapshot::replica_on(policy, &node)?.list().await));
            }
            if !is_origin {
                return Ok(Known::NotAsked(format!("members answer only their origin; run `snapship list` on `{current}` to see what `{node}` holds")));
            }
            Ok::<_, anyhow::Error>(match remote(node.clone()).await {
                Ok(list) => Known::Listed(list),
                Err(e) => Known::Unreachable(e),
            })
        }
    });
    let (origin_column, other_columns) = tokio::join!(origin_column, futures::future::join_all(other_columns));
    let mut columns: Vec<(String, Known)> = vec![(format!("{current} (origin)"), origin_column?)];
    for ((node, beside_origin), known) in others.iter().zip(other_columns) {
        // A replica on the origin's own node is told apart from the origin's column.
        let label = if *beside_origin { format!("{node} (replica)") } else { node.clone() };
        columns.push((label, known?));
    }
    // Object stores are read from here, with this node's key and credentials.
    for store in crate::objstore::ObjectReplica::all_of(policy) {
        let known = match store.held().await {
            Ok(list) => Known::Listed(list),
            Err(e) => Known::Unreachable(format!("{e:#}")),
        };
        columns.push((format!("{} (object store)", crate::ship::ReplicaEndpoint::node(&store)), known));
    }

    // Sizes where this node's filesystem knows them cheaply (ZFS); btrfs would need qgroups.
    let sizes = match policy.backend {
        config::BackendKind::Zfs => {
            let dataset = if is_origin { policy.origin_home(&here.0) } else { policy.replica_home(&here.0) }.unwrap_or_default();
            crate::snapshot::copy::zfs_sizes(&dataset).await.unwrap_or_default()
        }
        config::BackendKind::Btrfs => Default::default(),
    };

    print_table(&columns, &sizes);
    let mut unreachable = Vec::new();
    for (node, held) in &columns {
        match held {
            Known::Unreachable(why) => {
                println!("{node}: cannot list: {why}");
                unreachable.push(node.as_str());
            }
            Known::NotAsked(why) => println!("{node}: not asked: {why}"),
            Known::Listed(_) => {}
        }
    }
    if !unreachable.is_empty() {
        eprintln!("error: could not list {} (see above)", unreachable.join(", "));
        return Ok(ExitCode::FAILURE);
    }
    Ok(ExitCode::SUCCESS)
}

/// `list`'s table: one row per snapshot identity any member holds, oldest first, with its
/// time, kind, size (where known) and a mark per member.
fn print_table(columns: &[(String, Known)], sizes: &std::collections::BTreeMap<String, (u64, u64)>) {
    let mut rows: Vec<(crate::snapshot::SnapshotName, String)> = Vec::new();
    for (_, held) in columns {
        if let Known::Listed(list) = held {
            rows.extend(list.iter().map(|s| (s.name.clone(), s.identity.clone())));
        }
    }
    rows.sort();
    rows.dedup_by(|a, b| a.1 == b.1);

    let widths: Vec<usize> = columns.iter().map(|(n, _)| n.len().max(1)).collect();
    let mut header = format!("{:<34} {:<23} {:<10} {:>22}", "snapshot", "taken (UTC)", "kind", "size (used/referenced)");
    for (name, _) in columns {
        header += &format!("  {name}");
    }
    println!("{header}");
    for (name, identity) in &rows {
        let size = match sizes.get(name.as_str()) {
            Some((used, referenced)) => format!("{}/{}", bytesize::ByteSize(*used).display().iec(), bytesize::ByteSize(*referenced).display().iec()),
            None => "-".to_string(),
        };
        let mut line =
            format!("{:<34} {:<23} {:<10} {size:>22}", name.to_string(), name.time().format("%Y-%m-%d %H:%M:%S%.3f"), crate::restore::kind_word(name.kind()));
        for ((_, held), width) in columns.iter().zip(&widths) {
            let mark = match held {
                Known::Listed(list) if list.iter().any(|s| s.identity == *identity) => "x",
                Known::Listed(_) => ".",
                Known::Unreachable(_) | Known::NotAsked(_) => "?",
            };
            line += &format!("  {mark:<width$}");
        }
        println!("{}", line.trim_end());
    }
    if rows.is_empty() {
        println!("(no snapshots)");
    }
    println!("x: holds it, .: does not, ?: unknown");
}

/// What `node` holds of `policy`'s file set, asked over QUIC: a replica asked by its origin,
/// or the origin asked by one of its replicas.
async fn list_remote(
    loaded: &config::LoadedConfig,
    policy: &config::Policy,
    node: &config::units::Name,
    connector: Arc<crate::ship::quic::Connector>,
) -> Result<Vec<crate::snapshot::Snapshot>> {
    let ep = remote_member(loaded, policy, node, connector)?;
    Ok(crate::ship::ReplicaEndpoint::list(&ep).await?.snapshots)
}

/// `node`, a member of `policy`'s star, reached over QUIC through `connector`, asked in the
/// epoch this node knows (the origin sees itself as origin, a replica asks as one).
fn remote_member(
    loaded: &config::LoadedConfig,
    policy: &config::Policy,
    node: &config::units::Name,
    connector: Arc<crate::ship::quic::Connector>,
) -> Result<crate::ship::client::PeerReplica> {
    let addr = loaded.node.peers.get(node).ok_or_else(|| anyhow::anyhow!("`{node}` is not in peers"))?;
    let dialer = Arc::new(crate::ship::quic::QuicDialer::new(node.0.clone(), addr.clone(), connector));
    let (p, store) = (policy.clone(), Arc::new(crate::store::EpochStore::open(&loaded.node.state_dir)));
    let epoch: crate::ship::client::EpochSource = Arc::new(move || store.current(&p));
    let stall = loaded.node.transfers.stall_timeout.0;
    Ok(crate::ship::client::PeerReplica::new(node.0.clone(), policy.fileset.0.clone(), policy.transfer.clone(), stall, dialer, epoch))
}
