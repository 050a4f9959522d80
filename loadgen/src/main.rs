//! Thin: hands the command line to `run`, maps errors to an exit status.
use std::process::ExitCode;

fn main() -> ExitCode {
    ringmx_loadgen::run::main()
}
