//! `kubectl chatrelease`: the kubectl plugin for ChatReleases. kubectl finds it on PATH by its
//! name, `kubectl-chatrelease`, and passes it everything after `kubectl chatrelease`.

use chatrelease::cli::{self, Cli};
use clap::Parser;
use std::process::ExitCode;

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    if cli.command.talks_to_cluster() {
        // Before any client exists: kube's TLS setup panics when no provider is chosen.
        cli::install_crypto_provider();
    }
    let mut stdout = std::io::stdout();
    match cli::run(cli, &mut stdout).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) if e.is_broken_pipe() => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(e.exit_code())
        }
    }
}
