//! The workspace snapshot benchmark behind `snapshot-bench` (a binary of this crate): snapshot
//! and restore times and bytes stored, on the real [`Snapshots`] code against a real
//! `nats-server -js` it starts itself (file storage in a temporary folder), beside the floor
//! measured in the same run: one plain JetStream object-store put of the same bytes (for a
//! restore: its get, plus writing the same files with `std::fs`).
//!
//! Scenarios: a 1 MB workspace (10 files), a 100 MB one (1,000 files of 100 KB), the same with
//! one line appended to one file (incremental), and unchanged (what every turn end costs when
//! the agent changed nothing). Restores: on another root (everything fetched) and on the same
//! root (the local copy is current: nothing fetched).

use std::io::Write;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::Context;
use async_nats::jetstream::{self, object_store};
use shared::id::SessionId;
use shared::names::Names;
use shared::store::Store;

use crate::workspace::{Place, Snapshots, Taken};

/// One row of the result table.
#[derive(Debug, Clone)]
pub struct Row {
    /// What was measured.
    pub what: String,
    /// Median time.
    pub time: Duration,
    /// Bytes written to (or read from) JetStream by it.
    pub bytes: u64,
    /// The floor for the same bytes (object put or get), if one applies.
    pub floor: Option<Duration>,
}

/// A `nats-server -js` of the benchmark's own, killed on drop.
struct Nats {
    child: std::process::Child,
    port: u16,
    _dir: tempfile::TempDir,
}

impl Drop for Nats {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_nats() -> anyhow::Result<Nats> {
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let dir = tempfile::tempdir()?;
    let bin = [
        "nats-server",
        "/usr/sbin/nats-server",
        "/usr/bin/nats-server",
    ]
    .into_iter()
    .find(|b| {
        std::process::Command::new(b)
            .arg("--version")
            .output()
            .is_ok()
    })
    .context("nats-server not found (deploy/setup.sh installs it)")?;
    let child = std::process::Command::new(bin)
        .args(["-js", "-a", "127.0.0.1", "-p", &port.to_string(), "-sd"])
        .arg(dir.path())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()?;
    Ok(Nats {
        child,
        port,
        _dir: dir,
    })
}

/// Deterministic incompressible bytes.
fn fill(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

fn write_tree(dir: &Path, files: usize, size: usize) -> anyhow::Result<Vec<u8>> {
    let mut all = Vec::with_capacity(files * size);
    for i in 0..files {
        let sub = dir.join(format!("d{:02}", i % 20));
        std::fs::create_dir_all(&sub)?;
        let bytes = fill(i as u64 + 1, size);
        std::fs::write(sub.join(format!("f{i:04}.bin")), &bytes)?;
        all.extend_from_slice(&bytes);
    }
    Ok(all)
}

/// Writes `all` as files of `size` bytes in [`write_tree`]'s layout.
fn write_split(dir: &Path, all: &[u8], size: usize) -> anyhow::Result<()> {
    for (i, part) in all.chunks(size).enumerate() {
        let sub = dir.join(format!("d{:02}", i % 20));
        std::fs::create_dir_all(&sub)?;
        std::fs::write(sub.join(format!("f{i:04}.bin")), part)?;
    }
    Ok(())
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v.get(v.len() / 2).copied().unwrap_or_default()
}

/// Runs every scenario `reps` times; returns the table rows.
///
/// # Errors
/// nats-server cannot start, or a snapshot, restore or put fails.
pub async fn run(reps: usize) -> anyhow::Result<Vec<Row>> {
    let nats = start_nats()?;
    let url = format!("nats://127.0.0.1:{}", nats.port);
    let client = {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match async_nats::connect(&url).await {
                Ok(c) => break c,
                Err(e) if Instant::now() > deadline => return Err(e.into()),
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
    };
    let store = Store::open(client.clone(), Names::new("bench")?).await?;
    let js = jetstream::new(client);
    let floor_bucket = js
        .create_object_store(object_store::Config {
            bucket: "bench_floor".to_owned(),
            storage: jetstream::stream::StorageType::File,
            ..Default::default()
        })
        .await?;
    let mut rows = Vec::new();
    for (label, files, size) in [
        ("1 MB (10 files)", 10, 100_000),
        ("100 MB (1,000 files)", 1000, 100_000),
    ] {
        let mut full = Vec::new();
        let mut unchanged = Vec::new();
        let mut one = Vec::new();
        let mut restore_other = Vec::new();
        let mut restore_same = Vec::new();
        let mut floor_put = Vec::new();
        let mut floor_get = Vec::new();
        let (mut full_bytes, mut one_bytes, mut fetched) = (0, 0, 0);
        for rep in 0..reps {
            let (a, b) = (tempfile::tempdir()?, tempfile::tempdir()?);
            let sid = SessionId::parse(&format!("bench-{files}-{rep}"))?;
            let all = write_tree(&a.path().join(sid.as_str()), files, size)?;
            // Old enough that the local index trusts the stat (outside the racy window).
            tokio::time::sleep(Duration::from_millis(2100)).await;
            let place = |root: &Path| Place::new(root, &sid, None);
            let mut owner =
                Snapshots::fresh(store.clone(), sid.clone(), place(a.path()), 1, u64::MAX);
            let t0 = Instant::now();
            let Taken::Stored { uploaded, .. } = owner.snapshot(Some(1)).await? else {
                anyhow::bail!("first snapshot stored nothing");
            };
            full.push(t0.elapsed());
            full_bytes = uploaded;
            let t0 = Instant::now();
            anyhow::ensure!(
                owner.snapshot(Some(2)).await? == Taken::Unchanged,
                "not unchanged"
            );
            unchanged.push(t0.elapsed());
            // One line appended to one file.
            let victim = a.path().join(sid.as_str()).join("d00/f0000.bin");
            std::fs::OpenOptions::new()
                .append(true)
                .open(&victim)?
                .write_all(b"one more line\n")?;
            let t0 = Instant::now();
            let Taken::Stored { uploaded, .. } = owner.snapshot(Some(3)).await? else {
                anyhow::bail!("changed snapshot stored nothing");
            };
            one.push(t0.elapsed());
            one_bytes = uploaded;
            // Restore on another root: everything fetched.
            let t0 = Instant::now();
            let (_, r) =
                Snapshots::take_over(store.clone(), sid.clone(), place(b.path()), 2, u64::MAX)
                    .await?;
            restore_other.push(t0.elapsed());
            fetched = r.fetched_bytes;
            anyhow::ensure!(
                r.fetched_files == files as u64,
                "fetched {} files",
                r.fetched_files
            );
            // Restore on the root that holds the current snapshot: nothing fetched.
            let t0 = Instant::now();
            let (_, r) =
                Snapshots::take_over(store.clone(), sid.clone(), place(b.path()), 3, u64::MAX)
                    .await?;
            restore_same.push(t0.elapsed());
            anyhow::ensure!(
                r.fetched_files == 0,
                "local copy fetched {} files",
                r.fetched_files
            );
            // The floor: one object of the same bytes.
            let name = format!("floor-{files}-{rep}");
            let t0 = Instant::now();
            floor_bucket.put(name.as_str(), &mut all.as_slice()).await?;
            floor_put.push(t0.elapsed());
            let t0 = Instant::now();
            let mut obj = floor_bucket.get(name.as_str()).await?;
            let mut back = Vec::with_capacity(all.len());
            tokio::io::AsyncReadExt::read_to_end(&mut obj, &mut back).await?;
            // ... written as the same files (a restore writes them too: the disk's share).
            let c = tempfile::tempdir()?;
            write_split(c.path(), &back, size)?;
            floor_get.push(t0.elapsed());
            anyhow::ensure!(back.len() == all.len(), "floor get short");
            floor_bucket.delete(name.as_str()).await?;
            store.purge_snapshots(&sid).await?;
        }
        let (fp, fg) = (median(floor_put), median(floor_get));
        rows.push(Row {
            what: format!("{label}: first snapshot"),
            time: median(full),
            bytes: full_bytes,
            floor: Some(fp),
        });
        rows.push(Row {
            what: format!("{label}: unchanged (turn end, no file changed)"),
            time: median(unchanged),
            bytes: 0,
            floor: None,
        });
        rows.push(Row {
            what: format!("{label}: one line appended to one file"),
            time: median(one),
            bytes: one_bytes,
            floor: None,
        });
        rows.push(Row {
            what: format!("{label}: restore on another machine"),
            time: median(restore_other),
            bytes: fetched,
            floor: Some(fg),
        });
        rows.push(Row {
            what: format!("{label}: restore where the local copy is current"),
            time: median(restore_same),
            bytes: 0,
            floor: None,
        });
    }
    Ok(rows)
}
