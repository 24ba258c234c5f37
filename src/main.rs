use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let cli = acraflow::cli::Cli::parse();
    acraflow::telemetry::init(cli.log_format);
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: starting the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(acraflow::commands::execute(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", acraflow::pipeline::error_chain(&e));
            ExitCode::FAILURE
        }
    }
}
