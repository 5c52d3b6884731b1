//! `pgcast`: parses the command line, starts the runtime, runs the command, and turns the
//! outcome into an exit status (0 ok, 1 failure or unhealthy, 2 bad command line).

use std::process::ExitCode;

use clap::Parser;
use tracing_subscriber::filter::{filter_fn, FilterExt};
use tracing_subscriber::prelude::*;
use tracing_subscriber::EnvFilter;

/// mimalloc instead of glibc's malloc: the gateway allocates and frees small objects on both
/// worker threads (frames, queue entries, per-connection state), and glibc's per-thread arenas
/// grow with an `mprotect` per step. Paired bench runs (2026-11-29): CPU per fan-out delivery
/// 5–9 % lower, the reconnect storm's p99 0.1–0.2 s shorter, 0.7 KiB more per idle connection.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    let cli = match pgcast::Cli::try_parse() {
        Ok(cli) => cli,
        Err(err) => {
            use clap::error::ErrorKind;
            return match err.kind() {
                // Help and version output as clap formats it.
                ErrorKind::DisplayHelp
                | ErrorKind::DisplayVersion
                | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand => {
                    let _ = err.print();
                    ExitCode::from(u8::try_from(err.exit_code()).unwrap_or(2))
                }
                _ => {
                    eprintln!("{}", pgcast::one_line_error(&err));
                    ExitCode::from(2)
                }
            };
        }
    };

    // Logs go to stderr; stdout carries the command's output (events, tokens, reports).
    // tungstenite logs received messages and frame payloads at TRACE, and `auth` frames carry
    // tokens: those records are vetoed whatever RUST_LOG says, so no token is ever logged.
    // The veto's level hint lets the combined filter keep the environment filter's maximum
    // level: without it the `log` bridge stays at TRACE and every frame tungstenite writes
    // goes through the dispatcher (a tenth of the CPU per delivery under fan-out).
    let env = EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into());
    let no_payloads = filter_fn(|meta| {
        !(*meta.level() == tracing::Level::TRACE && meta.target().starts_with("tungstenite"))
    })
    .with_max_level_hint(tracing::level_filters::LevelFilter::TRACE);
    let filter = env.and(no_payloads);
    let layer = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    match cli.log_format {
        pgcast::LogFormat::Json => tracing_subscriber::registry()
            .with(
                layer
                    .json()
                    .with_current_span(true)
                    .with_span_list(true)
                    .with_filter(filter),
            )
            .init(),
        pgcast::LogFormat::Text => {
            // Colour codes only for a person at a terminal, never into a file or a pipe.
            let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
            tracing_subscriber::registry()
                .with(layer.with_ansi(ansi).with_filter(filter))
                .init();
        }
    }

    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(err) => {
            eprintln!("error: could not start the async runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    let outcome = runtime.block_on(pgcast::run(cli));
    // A blocking thread still at work (a write to a stalled stdout, a name lookup) must not
    // hold the exit: dropping the runtime would wait for it without a limit.
    runtime.shutdown_timeout(RUNTIME_GRACE);
    match outcome {
        Ok(code) => code,
        Err(err) => {
            eprintln!("error: {}", pgcast::describe(&err));
            ExitCode::FAILURE
        }
    }
}

/// How long the exit waits for the runtime's blocking threads once the command has returned.
const RUNTIME_GRACE: std::time::Duration = std::time::Duration::from_millis(500);
