//! Quant Studio: with no command, the desktop window; with one, the command line. Both drive the same
//! engine thread (`quant_engine::jobs`).

use quant_studio::{cli, gui};

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let args = cli::Cli::parse();
    let result = run(args);
    match result {
        Ok(()) => ExitCode::SUCCESS,
        // The reader of our output went away (`| head`): not an error of ours.
        Err(e) if is_broken_pipe(&e) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", cli::one_line(&format!("{e:#}")));
            ExitCode::FAILURE
        }
    }
}

fn is_broken_pipe(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        c.downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
    })
}

fn run(args: cli::Cli) -> anyhow::Result<()> {
    if let Some(n) = args.threads {
        quant_engine::jobs::configure_threads(n)?;
    }
    match args.command {
        None => gui::run(args.demo, args.open),
        Some(command) => cli::run(command),
    }
}
