//! Quant Studio: with no command, the desktop window; with one, the command line. Both drive the same
//! engine thread (`quant_engine::jobs`).

use quant_studio::{cli, gui};

use std::process::ExitCode;

fn main() -> ExitCode {
    // SIGINT, SIGTERM (and SIGHUP): remove what is half written, then go. A second signal while the
    // first is handled is ignored (the handler is already on its way out).
    let _ = ctrlc::set_handler(|| {
        let n = quant_engine::output::staged_count();
        quant_engine::output::remove_all_staged();
        if n > 0 {
            eprintln!("\ninterrupted: removed {n} unfinished output(s)");
        } else {
            eprintln!("\ninterrupted");
        }
        std::process::exit(130);
    });
    let args = cli::Cli::parse_args();
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
    cli::configure_backend(args.backend, args.gpu.as_deref())?;
    match args.command {
        None => gui::run(args.demo, args.open),
        Some(command) => cli::run(command),
    }
}
