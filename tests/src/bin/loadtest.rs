//! `loadtest`: the load tool and benchmark driver (issue 3). See `tests::load` for what it
//! measures and README.md ("Load testing") for the scenarios.
//!
//! Exit codes: 0 when the run completed with no lost, duplicated or unexpected event; 1 when
//! events were lost/duplicated; 2 for bad arguments or a run that could not be carried out.

use clap::Parser as _;
use tests::load::{self, Args};

fn main() -> std::process::ExitCode {
    let args = Args::parse();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("loadtest: cannot start the runtime: {e}");
            return std::process::ExitCode::from(2);
        }
    };
    let report = match rt.block_on(load::run(args.clone(), None)) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("loadtest: {e}");
            return std::process::ExitCode::from(2);
        }
    };
    print!("{}", report.table());
    if let Err(e) = load::write_outputs(&args, &report) {
        eprintln!("loadtest: {e}");
        return std::process::ExitCode::from(2);
    }
    let bad = report.lost_events
        + report.duplicate_events
        + report.unexpected_events
        + report.stored_gaps;
    if bad > 0 {
        std::process::ExitCode::from(1)
    } else {
        std::process::ExitCode::SUCCESS
    }
}
