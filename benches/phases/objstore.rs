//! The object-storage phase of `make bench` (`SNAPSHIP_BENCH_ONLY=objstore`): a full stream
//! of incompressible data uploaded to Garage on loopback by `snapship sync` (send, seal each
//! part with XChaCha20-Poly1305, multipart upload, manifest) and restored from it by
//! `snapship restore --from` (download, open and hash each part, `btrfs receive`, writable
//! snapshot), side by side with the local pipe (`btrfs send | btrfs receive`) of the same
//! data on the same filesystem. Each run starts from an empty store, so each upload is a
//! full stream. Medians of `runs()`.

use std::fmt::Write as _;
use std::os::unix::fs::PermissionsExt;

use crate::common::cluster::*;
use crate::common::garage::{self, Garage};
use crate::common::*;
use crate::{delete_subvolumes_in, generate_big, median, runs, sh, timed};

/// Files of 64 MiB of random data (`SNAPSHIP_BENCH_OBJSTORE_FILES` overrides, for a quick look).
fn files() -> usize {
    std::env::var("SNAPSHIP_BENCH_OBJSTORE_FILES").ok().and_then(|v| v.parse().ok()).unwrap_or(6)
}

pub fn object_store(out: &mut String) {
    eprintln!("object store: upload to and restore from Garage vs the local pipe");
    let c = Cluster::with_size("bench_objstore", &["alpha"], 4 * 1024);
    let Some(garage) = Garage::start(&c.scratch, "bench_objstore") else {
        writeln!(out, "\n## Object-storage replica (Garage)\n\nNot measured: Garage is not installed (scripts/fetch-garage.sh).").unwrap();
        return;
    };
    let src = c.fs["alpha"].subvolume("data");
    let mnt = c.mnt("alpha").to_path_buf();
    let keys = c.scratch.dir.join("keys");
    std::fs::create_dir_all(&keys).unwrap();
    let key = keys.join("offsite.key");
    std::fs::write(&key, format!("{}\n", "a7".repeat(32))).unwrap();
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
    garage.credentials_file(&keys.join("offsite.env"));
    let policy = format!(
        "fileset: data\nbackend: btrfs\nmode: snapshot\nschedule: \"@hourly\"\norigin:\n  node: alpha\n  path: {}\nreplicas:\n  - name: offsite\n    object_store:\n      endpoint: {}\n      bucket: {}\n      prefix: bench/\n      region: {}\n      credentials: {}\n    encryption_key: {}\n",
        src.display(),
        garage.endpoint,
        garage::BUCKET,
        garage::REGION,
        keys.join("offsite.env").display(),
        key.display()
    );
    let config = c.configure("alpha", &[("data", policy)]);
    let files = files();
    generate_big(&src, files);
    sh("sync");
    let bytes = (files as f64) * 64.0 * 1024.0 * 1024.0;
    let (manual, local, restored) = (mnt.join("manual"), mnt.join("local"), mnt.join("restored"));
    for d in [&manual, &local, &restored] {
        std::fs::create_dir_all(d).unwrap();
    }
    sh(&format!("btrfs subvolume snapshot -r {} {}/s >/dev/null", src.display(), manual.display()));
    let snapdir = mnt.join(".snapship/data");
    let rt = tokio::runtime::Runtime::new().unwrap();
    let s3 = garage.client();
    let empty_store = || {
        rt.block_on(async {
            use futures::TryStreamExt;
            use object_store::{ObjectStore, ObjectStoreExt};
            let prefix = object_store::path::Path::from("bench");
            for o in s3.list(Some(&prefix)).try_collect::<Vec<_>>().await.unwrap() {
                s3.delete(&o.location).await.unwrap();
            }
        })
    };
    let (mut pipe, mut upload, mut restore) = (Vec::new(), Vec::new(), Vec::new());
    for i in 0..runs() {
        // The local pipe.
        pipe.push(timed(|| sh(&format!("btrfs send -q {}/s | btrfs receive -q {}", manual.display(), local.display()))));
        delete_subvolumes_in(&local);
        // Upload: a new snapshot, sent as a full stream to the empty store.
        empty_store();
        let mut sync_out = None;
        upload.push(timed(|| sync_out = Some(snapship().args(["sync", "--wait", "0s", "--config"]).arg(&config).arg("data").output().unwrap())));
        let o = sync_out.unwrap();
        let t = String::from_utf8_lossy(&o.stdout).into_owned() + &String::from_utf8_lossy(&o.stderr);
        assert!(o.status.success() && t.contains("full"), "the upload failed or was not full:\n{t}");
        // Restore of that snapshot from the store.
        let name = snapshots(&snapdir).into_iter().rfind(|n| n.starts_with("snapship-")).unwrap();
        let to = restored.join(format!("r{i}"));
        let mut restore_out = None;
        restore.push(timed(|| {
            restore_out = Some(
                snapship()
                    .args(["restore", "--config"])
                    .arg(&config)
                    .args(["data", "--from", "offsite", "--snapshot", &name, "--to"])
                    .arg(&to)
                    .output()
                    .unwrap(),
            )
        }));
        let o = restore_out.unwrap();
        assert!(o.status.success(), "the restore failed:\n{}", String::from_utf8_lossy(&o.stderr));
        delete_subvolumes_in(&restored);
        eprintln!("run {i}: local pipe {:.2} s, upload {:.2} s, restore {:.2} s", pipe[i], upload[i], restore[i]);
    }
    empty_store();
    let (p, u, r) = (median(pipe), median(upload), median(restore));
    let mb = bytes / 1e6;
    writeln!(out, "\n## Object-storage replica: upload to and restore from Garage vs the local pipe ({mb:.0} MB, incompressible)\n").unwrap();
    writeln!(out, "{files} files of 64 MiB of random data on loop btrfs; Garage {} (one node, loopback, sqlite metadata) as the store; 16 MiB parts (the default), each sealed with XChaCha20-Poly1305 and hashed with BLAKE3. Upload: `snapship sync` one-shot (snapshot, `btrfs send`, seal, multipart upload, manifest) to an empty store, so a full stream. Restore: `snapship restore --from` of that snapshot (download two parts at a time, open and check each, `btrfs receive`, writable snapshot). MB/s of file data. Medians of {}.\n", garage::VERSION, runs()).unwrap();
    writeln!(out, "| path | median time | MB/s | vs local pipe |\n|---|---|---|---|").unwrap();
    for (name, t) in
        [("btrfs send \\| btrfs receive (local pipe)", p), ("upload to Garage (`snapship sync`)", u), ("restore from Garage (`snapship restore --from`)", r)]
    {
        writeln!(out, "| {name} | {t:.2} s | {:.0} | {:.2} x |", mb / t, p / t).unwrap();
    }
}
