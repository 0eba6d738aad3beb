//! The `tiergate` binary: parse arguments, run the command (which sets up logging and
//! tracing once it knows the configuration).

use clap::Parser;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let cli = tiergate::cli::Cli::parse();
    // Rust ignores SIGPIPE, so a command printing to a reader that stopped early
    // (`tiergate report | head`) panicked on the broken pipe. Printing commands end as `ls`
    // does instead. The server keeps it ignored: a client gone mid-answer is an error on
    // its socket to account for, not a reason to die.
    #[cfg(unix)]
    if !matches!(cli.command, tiergate::cli::Command::Serve { .. }) {
        // SAFETY: sets SIGPIPE's process-wide disposition back to the default; no handler
        // (no Rust code) is installed, and nothing else in the process changes it.
        unsafe {
            libc::signal(libc::SIGPIPE, libc::SIG_DFL);
        }
    }
    match tiergate::cli::run(cli).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
