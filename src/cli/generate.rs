//! `snapship generate`: files for installing snapship, made from the binary itself so they
//! always match it. Hidden from `--help` and the man pages (it is for `make install` and
//! packagers, not for daily use):
//!
//! - `generate man DIR`: a man page per verb (snapship.1, snapship-run.1, ...), from the clap
//!   definitions in `cli/mod.rs`, so the pages say exactly what `--help` says;
//! - `generate completions SHELL DIR`: the completion script for bash, zsh or fish;
//! - `generate unit-paths --config FILE`: a systemd drop-in with the `ReadWritePaths=` the
//!   shipped unit (ProtectSystem=strict, examples/snapship.service) needs for the places
//!   this node's policies write.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::{CommandFactory, Subcommand, ValueEnum};

use crate::config::{self, BackendKind};

#[derive(Debug, Subcommand)]
pub(super) enum Generate {
    /// Write a man page per verb into DIR (section 1).
    Man {
        #[arg(value_name = "DIR")]
        dir: PathBuf,
    },
    /// Write the completion script for SHELL into DIR.
    Completions {
        #[arg(value_enum)]
        shell: Shell,
        #[arg(value_name = "DIR")]
        dir: PathBuf,
    },
    /// Print a systemd drop-in with the ReadWritePaths= this node's policies need.
    UnitPaths {
        /// The node config (node.yaml).
        #[arg(short, long, value_name = "FILE")]
        config: PathBuf,
    },
}

/// The shells completions are made for.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub(super) enum Shell {
    Bash,
    Zsh,
    Fish,
}

pub(super) fn run(what: Generate) -> Result<ExitCode> {
    match what {
        Generate::Man { dir } => {
            create_dir(&dir)?;
            clap_mangen::generate_to(super::Cli::command(), &dir).with_context(|| format!("cannot write man pages into {}", dir.display()))?;
        }
        Generate::Completions { shell, dir } => {
            create_dir(&dir)?;
            let mut cmd = super::Cli::command();
            let written = match shell {
                Shell::Bash => clap_complete::generate_to(clap_complete::Shell::Bash, &mut cmd, "snapship", &dir),
                Shell::Zsh => clap_complete::generate_to(clap_complete::Shell::Zsh, &mut cmd, "snapship", &dir),
                Shell::Fish => clap_complete::generate_to(clap_complete::Shell::Fish, &mut cmd, "snapship", &dir),
            };
            written.with_context(|| format!("cannot write the completion script into {}", dir.display()))?;
        }
        Generate::UnitPaths { config } => print!("{}", unit_paths(&config)?),
    }
    Ok(ExitCode::SUCCESS)
}

fn create_dir(dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}; give a directory you can write", dir.display()))
}

/// The state dir systemd makes writable through the unit's `StateDirectory=snapship`.
const UNIT_STATE_DIR: &str = "/var/lib/snapship";

/// The drop-in for the node config at `path`: one `ReadWritePaths=` line per directory the
/// daemon writes in. For a btrfs file set that is the parent directory of each place this
/// node may hold it in, whatever its role now (a promotion or switchover changes the role
/// without a config change): the live subvolume, the origin's snapshot directory and the
/// replica directory. Parents, because the daemon makes these directories when missing.
/// ZFS file sets need none: `zfs` works through /dev/zfs, and receives unmounted.
pub fn unit_paths(path: &Path) -> Result<String> {
    let loaded = config::load(path)?;
    let here = &loaded.node.node.0;
    let mut dirs = BTreeSet::new();
    if loaded.node.state_dir != Path::new(UNIT_STATE_DIR) {
        dirs.insert(loaded.node.state_dir.clone());
    }
    for policy in loaded.policies.iter().filter(|p| p.is_member(here) && p.backend == BackendKind::Btrfs) {
        for place in [policy.live_on(here), policy.origin_home(here), policy.replica_home(here)].into_iter().flatten() {
            dirs.insert(Path::new(&place).parent().unwrap_or(Path::new("/")).to_path_buf());
        }
    }
    // A directory inside another one listed is writable already.
    let outer: Vec<&PathBuf> = dirs.iter().filter(|d| !dirs.iter().any(|o| o != *d && d.starts_with(o))).collect();

    let mut out = format!(
        "# The places snapship writes on node `{here}`, for the unit's ProtectSystem=strict.\n\
         # Made by `snapship generate unit-paths --config {}`; run it again after adding a policy.\n\
         # Install as /etc/systemd/system/snapship.service.d/paths.conf, then `systemctl daemon-reload`.\n\
         # A leading `-` lets the unit start while a directory is still missing.\n\
         [Service]\n",
        path.display()
    );
    for dir in outer {
        out.push_str(&format!("ReadWritePaths=-{}\n", dir.display()));
    }
    for e in &loaded.errors {
        out.push_str(&format!("# not included, the policy does not load: {}\n", e.to_string().replace('\n', " ")));
    }
    Ok(out)
}
