//! `ringmx`: hands the command line to `config` and `server`, maps errors to one line on stderr
//! and exit status 1. Never panics on bad input.
use std::process::ExitCode;

use ringmx::config::{Cli, Config};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    let cli = match <Cli as clap::Parser>::try_parse() {
        Ok(cli) => cli,
        Err(e) => return usage_error(e),
    };
    let cfg = match Config::from_cli(cli) {
        Ok(cfg) => cfg,
        Err(e) => {
            eprintln!("ringmx: {e}");
            return ExitCode::FAILURE;
        }
    };
    let filter = tracing_subscriber::EnvFilter::try_new(cfg.log_filter())
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let log = ringmx::logging::init(filter);
    let result = ringmx::server::run(cfg);
    // Every log line first (the writer thread drains its queue), then the error, last.
    drop(log);
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ringmx: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Help and version go to stdout with status 0; a usage error is one line on stderr, status 1
/// (clap's own default would be a multi-line message and status 2).
fn usage_error(e: clap::Error) -> ExitCode {
    use clap::error::ErrorKind;
    match e.kind() {
        ErrorKind::DisplayHelp | ErrorKind::DisplayVersion => {
            let _ = e.print();
            ExitCode::SUCCESS
        }
        ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand => {
            let _ = e.print();
            ExitCode::FAILURE
        }
        _ => {
            let text = e.render().to_string();
            let line = text
                .lines()
                .find(|l| !l.trim().is_empty())
                .unwrap_or("bad command line");
            let line = line.trim_start_matches("error: ");
            eprintln!("ringmx: {line}; see `ringmx serve --help`");
            ExitCode::FAILURE
        }
    }
}
