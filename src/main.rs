//! `ringmx`: hands the command line to `config` and `server`, maps errors to one line on stderr
//! and exit status 1. Never panics on bad input.
use std::process::ExitCode;

use ringmx::config::{Cli, Config};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    let cli = Cli::parse_from_env();
    let cfg = match Config::from_cli(cli) {
        Ok(cfg) => cfg,
        Err(e) => {
            eprintln!("ringmx: {e}");
            return ExitCode::FAILURE;
        }
    };
    let filter = tracing_subscriber::EnvFilter::try_new(cfg.log_filter())
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_target(false).init();
    match ringmx::server::run(cfg) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ringmx: {e}");
            ExitCode::FAILURE
        }
    }
}
