//! The command functions: the binary's edge, where library errors become `anyhow` errors and
//! outcomes become exit codes.

use std::io::Write;
use std::process::ExitCode;

use anyhow::Context;
use pgcast_listener::{installed_version, MigrationScope};

use crate::cli::{
    Cli, Command, DemoArgs, DoctorArgs, LogFormat, MigrateArgs, ServeArgs, TailArgs, TokenArgs,
};
use crate::{cancel_on_signal, connect, mint, principal, tail, PgcastError, TailOptions};

/// Exit status of `doctor` when a check failed, and of any command that failed.
const FAILURE: u8 = 1;
/// Exit status of a bad command line (as clap's).
const USAGE: u8 = 2;

/// Runs a parsed command line. Prints the configuration (without secrets) to stderr first,
/// except for `token`, whose output is meant to be captured by scripts.
pub async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    // Limits that do not go together are a bad command line, like a bad value: one line, 2.
    if let Command::Serve(args) = &cli.command {
        if let Err(message) = args.gateway_limits() {
            eprintln!("error: {message}");
            return Ok(ExitCode::from(USAGE));
        }
        // A certificate and key that do not go together, refused before anything binds.
        if let Err(message) = args.tls.server() {
            eprintln!("error: {message}");
            return Ok(ExitCode::from(USAGE));
        }
    }
    if !matches!(cli.command, Command::Token(_)) {
        match cli.log_format {
            // Log shippers get the summary as one more JSON line.
            LogFormat::Json => tracing::info!(summary = %cli.command, "configuration"),
            LogFormat::Text => eprintln!("pgcast {}", cli.command),
        }
    }
    let outcome = match cli.command {
        Command::Serve(args) => serve(args).await,
        Command::Demo(args) => demo(args).await,
        Command::Migrate(args) => migrate(args).await,
        Command::Doctor(args) => doctor(args).await,
        Command::Tail(args) => tail_command(args).await,
        Command::Token(args) => token(args),
    };
    match outcome {
        // Arguments that parse but do not go together (a customer token with a workshop,
        // `tail --topic queue`): a bad command line, 2.
        Err(err)
            if err
                .downcast_ref::<PgcastError>()
                .is_some_and(PgcastError::is_usage) =>
        {
            eprintln!("error: {}", crate::describe(&err));
            Ok(ExitCode::from(USAGE))
        }
        other => other,
    }
}

async fn serve(args: ServeArgs) -> anyhow::Result<ExitCode> {
    let limits = args
        .gateway_limits()
        .map_err(|message| anyhow::anyhow!(message))?;
    // Read again (checked in `run`): the files may have changed since, and an error now is
    // still reported before binding.
    let tls = args
        .tls
        .server()
        .map_err(|message| anyhow::anyhow!(message))?;
    let shutdown = cancel_on_signal().context("could not install signal handlers")?;
    let tcp = crate::bind(args.listen).await?;
    let options = crate::ServeOptions {
        pg: args.database.database(),
        jwt_secret: args.keys.secret_bytes(),
        jwt_issuer: args.jwt_issuer,
        jwt_audience: args.jwt_audience,
        retention: args.retention,
        migrate: args.migrate,
        links: Vec::new(),
    };
    match tls {
        Some(tls) => crate::serve_tls(tcp, options, limits, tls, shutdown).await?,
        None => crate::serve_limited(tcp, options, limits, shutdown).await?,
    }
    Ok(ExitCode::SUCCESS)
}

async fn demo(args: DemoArgs) -> anyhow::Result<ExitCode> {
    let shutdown = cancel_on_signal().context("could not install signal handlers")?;
    let options = crate::DemoOptions {
        listen: args.listen,
        retention: args.retention,
        simulate: args.simulate,
        data_dir: args.data_dir,
    };
    crate::demo(options, shutdown).await?;
    Ok(ExitCode::SUCCESS)
}

async fn migrate(args: MigrateArgs) -> anyhow::Result<ExitCode> {
    // Migrations hold a session lock: through the listen URL, never a transaction pooler.
    let mut client = connect(args.database.database().listen_url(), "pgcast-migrate").await?;
    let scope = if args.realtime_only {
        MigrationScope::RealtimeOnly
    } else {
        MigrationScope::All
    };
    let applied = pgcast_listener::migrate(&mut client, scope).await?;
    let version = installed_version(&client)
        .await?
        .context("pgcast.version() is missing after migrating")?;
    print_out(&format!(
        "applied {applied} migration{}; pgcast.version() = {version}",
        if applied == 1 { "" } else { "s" }
    ))?;
    Ok(ExitCode::SUCCESS)
}

async fn doctor(args: DoctorArgs) -> anyhow::Result<ExitCode> {
    let report = crate::doctor(&args.database.database()).await?;
    print_out(&report.to_string())?;
    Ok(if report.is_healthy() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(FAILURE)
    })
}

async fn tail_command(args: TailArgs) -> anyhow::Result<ExitCode> {
    let shutdown = cancel_on_signal().context("could not install signal handlers")?;
    let options = TailOptions {
        since: args.since,
        topic: args.topic,
    };
    let mut out = tokio::io::stdout();
    tail(&args.database.database(), options, &mut out, shutdown).await?;
    Ok(ExitCode::SUCCESS)
}

fn token(args: TokenArgs) -> anyhow::Result<ExitCode> {
    let who = principal(args.sub, args.role, args.workshop)?;
    let token = mint(
        &args.secret.jwt_secret,
        &who,
        args.ttl,
        args.jwt_issuer.as_deref(),
        args.jwt_audience.as_deref(),
    )?;
    print_out(&token)?;
    Ok(ExitCode::SUCCESS)
}

/// Prints `text` and a newline to stdout. A reader that went away (`| head`) is not an error.
fn print_out(text: &str) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    match writeln!(out, "{text}").and_then(|()| out.flush()) {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => {
            Err(e).context("could not write the output")
        }
        _ => Ok(()),
    }
}

/// An error and its causes on one line, `a: b: c`, skipping a cause whose text the previous
/// message already ends with (many errors print their source in their own message too).
pub fn describe(error: &anyhow::Error) -> String {
    let mut parts: Vec<String> = Vec::new();
    for cause in error.chain() {
        let text = cause.to_string();
        if parts.last().is_some_and(|last| last.ends_with(&text)) {
            continue;
        }
        parts.push(text);
    }
    parts.join(": ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("outer: {0}")]
    struct Doubled(#[source] std::io::Error);

    #[test]
    fn describe_prints_each_cause_once() {
        let io = std::io::Error::other("disk on fire");
        let e = anyhow::Error::new(Doubled(io)).context("could not save");
        assert_eq!(describe(&e), "could not save: outer: disk on fire");
        let e = anyhow::Error::new(std::io::Error::other("plain")).context("top");
        assert_eq!(describe(&e), "top: plain");
    }
}
