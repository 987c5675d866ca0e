//! `snapshot-bench [reps]`: what workspace snapshots cost (snapshot and restore times, bytes
//! stored) for 1 MB and 100 MB workspaces, against a plain JetStream object put/get of the same
//! bytes measured in the same run; prints a Markdown table for BENCHMARKS.md. Starts its own
//! `nats-server -js`. Build with `--release`.

use anyhow::Context;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let reps: usize = std::env::args()
        .nth(1)
        .map_or(Ok(5), |a| a.parse())
        .context("reps")?;
    let rows = worker::snapshot_bench::run(reps.max(1)).await?;
    println!("median of {reps} runs each");
    println!();
    println!(
        "| scenario | time | bytes to/from JetStream | floor (snapshot: one object put of the same bytes; restore: its get + writing the same files) | ratio |"
    );
    println!("|---|---|---|---|---|");
    for r in &rows {
        let (floor, ratio) = match r.floor {
            Some(f) => (
                format!("{:.1} ms", f.as_secs_f64() * 1e3),
                format!("{:.2}×", r.time.as_secs_f64() / f.as_secs_f64().max(1e-9)),
            ),
            None => ("—".to_owned(), "—".to_owned()),
        };
        println!(
            "| {} | {:.2} ms | {} | {} | {} |",
            r.what,
            r.time.as_secs_f64() * 1e3,
            r.bytes,
            floor,
            ratio
        );
    }
    Ok(())
}
