//! The `tiergate` binary: parse arguments, run the command (which sets up logging and
//! tracing once it knows the configuration).

use clap::Parser;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let cli = tiergate::cli::Cli::parse();
    match tiergate::cli::run(cli).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
