use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let cli = match acraflow::cli::Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            if let Some(var) = acraflow::cli::env_behind(&e) {
                eprintln!("note: that value came from the environment variable {var}");
            }
            std::process::exit(e.exit_code());
        }
    };
    // The demo's output is its report: its logs go to a file in the home, which the report names.
    let demo_log = matches!(cli.command, acraflow::cli::Command::Demo(_)).then(|| {
        let path = acraflow::commands::demo_log(&cli);
        let _ = path.parent().map(std::fs::create_dir_all);
        std::fs::File::create(path).ok()
    });
    let quiet = matches!(cli.command, acraflow::cli::Command::Psql(_));
    acraflow::telemetry::init_quiet(cli.log_format, demo_log.flatten(), quiet);
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
