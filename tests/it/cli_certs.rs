//! `snapship certs` as an admin runs it: what it writes, what it refuses to overwrite, and
//! how it renews. Runs the built binary; needs no root.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Output};

fn certs(dir: &Path, args: &[&str]) -> Output {
    crate::common::snapship().arg("certs").arg("--out").arg(dir).args(args).output().unwrap()
}

fn ok(out: &Output) -> String {
    assert!(out.status.success(), "certs failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn refused(out: &Output) -> String {
    assert!(!out.status.success(), "certs should have failed: {}", String::from_utf8_lossy(&out.stdout));
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn read(dir: &Path, file: &str) -> Vec<u8> {
    std::fs::read(dir.join(file)).unwrap()
}

/// notAfter of DIR/FILE, in Unix seconds.
fn not_after(dir: &Path, file: &str) -> i64 {
    let pem = x509_parser::pem::parse_x509_pem(&read(dir, file)).unwrap().1;
    pem.parse_x509().unwrap().validity().not_after.timestamp()
}

fn days_from_now(dir: &Path, file: &str) -> i64 {
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() as i64;
    (not_after(dir, file) - now + 3600) / 86_400
}

#[test]
fn makes_a_ca_and_node_files_and_says_to_keep_the_ca_key_offline() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("certs");
    let stdout = ok(&certs(&dir, &["alpha", "beta"]));
    for file in ["ca.pem", "ca.key", "alpha.pem", "alpha.key", "beta.pem", "beta.key"] {
        assert!(stdout.contains(&format!("wrote {}", dir.join(file).display())), "{stdout}");
    }
    for key in ["ca.key", "alpha.key", "beta.key"] {
        assert_eq!(std::fs::metadata(dir.join(key)).unwrap().permissions().mode() & 0o777, 0o600, "{key}");
    }
    assert!(stdout.contains("keep it offline"), "{stdout}");
    assert_eq!(days_from_now(&dir, "alpha.pem"), 825);
    assert_eq!(days_from_now(&dir, "ca.pem"), 3650);
}

#[test]
fn a_second_run_refuses_to_replace_a_node_unless_told_how() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    ok(&certs(dir, &["alpha", "beta"]));
    let (ca, alpha_key, alpha_pem, beta_pem) = (read(dir, "ca.pem"), read(dir, "alpha.key"), read(dir, "alpha.pem"), read(dir, "beta.pem"));

    let err = refused(&certs(dir, &["alpha"]));
    assert!(err.contains(&dir.join("alpha.key").display().to_string()) && err.contains("--renew") && err.contains("--force"), "{err}");
    assert_eq!(read(dir, "alpha.key"), alpha_key);

    // --renew: a new certificate for the same key, with the lifetime asked for; beta and the CA stay.
    let stdout = ok(&certs(dir, &["--renew", "--days", "90", "alpha"]));
    assert!(stdout.contains("kept") && stdout.contains("alpha.key"), "{stdout}");
    assert_eq!(read(dir, "alpha.key"), alpha_key);
    assert_ne!(read(dir, "alpha.pem"), alpha_pem);
    assert_eq!(days_from_now(dir, "alpha.pem"), 90);
    assert_eq!((read(dir, "ca.pem"), read(dir, "beta.pem")), (ca.clone(), beta_pem));

    // --force: a new key too; the CA stays.
    ok(&certs(dir, &["--force", "alpha"]));
    assert_ne!(read(dir, "alpha.key"), alpha_key);
    assert_eq!(read(dir, "ca.pem"), ca);

    let err = refused(&certs(dir, &["--renew", "--force", "alpha"]));
    assert!(err.contains("cannot be used with"), "{err}");
}

#[test]
fn help_explains_renewal_and_the_ca_key() {
    let out = Command::new(env!("CARGO_BIN_EXE_snapship")).args(["certs", "--help"]).output().unwrap();
    let help = ok(&out);
    for words in ["--renew", "--force", "--days", "825", "offline"] {
        assert!(help.contains(words), "{words} missing from:\n{help}");
    }
}
