//! What `make install` ships beside the binary, checked without root: the man pages and the
//! shell completions `snapship generate` makes (one page per verb, every verb in each
//! completion script, and the verbs taken from the clap definitions, so a new verb is
//! covered the day it is added), the `unit-paths` drop-in, and the Makefile's install
//! target into a DESTDIR.

use std::path::Path;

use clap::CommandFactory;

/// The verbs an admin sees (`snapship --help`): the hidden `generate` is left out.
fn verbs() -> Vec<String> {
    let cmd = snapship::cli::Cli::command();
    let verbs: Vec<String> = cmd.get_subcommands().filter(|c| !c.is_hide_set()).map(|c| c.get_name().to_string()).collect();
    assert!(verbs.len() >= 10, "the verbs: {verbs:?}");
    verbs
}

fn generate(args: &[&str], dir: &Path) {
    let out = crate::common::snapship().arg("generate").args(args).arg(dir).output().unwrap();
    assert!(out.status.success(), "snapship generate {args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

#[test]
fn man_pages_cover_every_verb() {
    let dir = tempfile::tempdir().unwrap();
    generate(&["man"], dir.path());
    let main = std::fs::read_to_string(dir.path().join("snapship.1")).unwrap();
    assert!(main.starts_with(".ie") || main.contains(".TH snapship 1"), "not a man page:\n{main}");
    for verb in verbs() {
        let page = dir.path().join(format!("snapship-{verb}.1"));
        let text = std::fs::read_to_string(&page).unwrap_or_else(|e| panic!("{}: {e}", page.display()));
        assert!(text.contains(&format!(".TH snapship-{verb} 1")), "{} has no title", page.display());
        assert!(main.contains(&verb), "snapship.1 does not mention `{verb}`");
    }
    assert!(!dir.path().join("snapship-generate.1").exists(), "the hidden verb got a man page");
}

#[test]
fn completions_cover_every_verb_in_bash_zsh_and_fish() {
    let dir = tempfile::tempdir().unwrap();
    for (shell, file) in [("bash", "snapship.bash"), ("zsh", "_snapship"), ("fish", "snapship.fish")] {
        generate(&["completions", shell], dir.path());
        let text = std::fs::read_to_string(dir.path().join(file)).unwrap_or_else(|e| panic!("{shell}: {file}: {e}"));
        for verb in verbs() {
            assert!(text.contains(&verb), "the {shell} completions do not mention `{verb}`");
        }
    }
}

#[test]
fn unit_paths_lists_the_btrfs_places_of_this_node() {
    let example = |node: &str| Path::new(env!("CARGO_MANIFEST_DIR")).join(format!("examples/two-node/{node}.yaml"));
    let out = crate::common::snapship().args(["generate", "unit-paths", "--config"]).arg(example("beta")).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.contains("[Service]\n"), "{text}");
    // beta receives into /backup/... and, promoted, serves the origin's path under /srv.
    assert!(text.contains("ReadWritePaths=-/backup\n") && text.contains("ReadWritePaths=-/srv\n"), "{text}");
    // The default state dir is the unit's StateDirectory=, writable already.
    assert!(!text.contains("/var/lib/snapship"), "{text}");
}

/// `make install DESTDIR=...` puts every file where its tool looks, and points the unit at
/// the installed binary. Needs the release binary (`make install` would build it, which is
/// too slow for a test), so it skips without one.
#[test]
fn make_install_into_a_destdir() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    if !root.join("target/release/snapship").exists() {
        eprintln!("skipping: no target/release/snapship (cargo build --release makes it)");
        return;
    }
    let dest = tempfile::tempdir().unwrap();
    let out = std::process::Command::new("make")
        .current_dir(root)
        .arg("install")
        .arg(format!("DESTDIR={}", dest.path().display()))
        .arg("PREFIX=/opt/snapship")
        .output()
        .unwrap();
    assert!(out.status.success(), "make install: {}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    let at = |p: &str| dest.path().join(p.trim_start_matches('/'));
    for file in [
        "/opt/snapship/bin/snapship",
        "/opt/snapship/share/man/man1/snapship.1",
        "/opt/snapship/share/man/man1/snapship-run.1",
        "/opt/snapship/share/bash-completion/completions/snapship",
        "/opt/snapship/share/zsh/site-functions/_snapship",
        "/opt/snapship/share/fish/vendor_completions.d/snapship.fish",
        "/opt/snapship/lib/systemd/system/snapship.service",
    ] {
        assert!(at(file).is_file(), "make install did not write {file}");
    }
    let unit = std::fs::read_to_string(at("/opt/snapship/lib/systemd/system/snapship.service")).unwrap();
    assert!(unit.contains("ExecStart=/opt/snapship/bin/snapship run"), "{unit}");
    assert!(!unit.contains("/usr/local/bin"), "{unit}");
}
