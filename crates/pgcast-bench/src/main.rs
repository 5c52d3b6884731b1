//! `pgcast-bench`: the benchmark behind the performance figures of
//! bench/README.md and the README.
//!
//! ```text
//!  throwaway PostgreSQL (or --database-url) ◀── writers (tokio-postgres, paced or flat out)
//!        │ pgcast trigger → log + doorbell NOTIFY          │ marker pgcb:<run>:<seq>:<t_us>:
//!        │   └──▶ pgcast serve (child, or --ws-url) ──ws──▶ readers: many sockets per task,
//!        │                                              ▲ 2 threads (marker in customer_name)
//!        └ baseline trigger (bench-only, while needed) → NOTIFY pgcast_bench_bare (row JSON)
//!            ├──▶ bare LISTEN reader (the database alone)
//!            ├──▶ bare broadcaster (the floor: this binary, --serve-floor) ──ws──▶ readers
//!            └──▶ Node relay / --raw-url (raw mode) ──ws──▶ readers
//! ```
//!
//! Latency is the receipt time of a frame minus the writer's clock just before its statement,
//! both read from one monotonic clock in this process. Losses are counted against the set of
//! events each subscriber may see (docs/architecture.md §5), computed from what the writers committed.
//! Everything runs on loopback; the run is bounded by `--max-time`; results go to
//! `bench/results.md` and `bench/results.json`, rewritten after every scenario.
//!
//! ```sh
//! cargo build --release --workspace
//! target/release/pgcast-bench --quick            # a smoke run, ~2 minutes
//! target/release/pgcast-bench --compare-node     # the full run, with the Node.js baseline
//! ```

mod bare;
mod cli;
mod clients;
mod env;
mod floor;
mod jsonptr;
mod load;
mod log_floor;
mod report;
mod scenarios;
mod stats;
mod ws;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use clap::Parser;
use pgcast_gateway::TokenMinter;
use pgcast_listener::MigrationScope;
use tokio_postgres::NoTls;

use crate::cli::Args;
use crate::env::{Database, Machine, Scratch, Server};
use crate::report::Results;
use crate::scenarios::Ctx;

fn main() -> ExitCode {
    let args = Args::parse();
    if args.serve_floor {
        return match floor::main() {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("floor: {e:#}");
                ExitCode::FAILURE
            }
        };
    }
    stats::now_us();
    match run(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: Args) -> Result<()> {
    // 10,000 connections need 10,000 descriptors here and in pgcast, which inherits the limit.
    if let Err(e) = rlimit::increase_nofile_limit(u64::MAX) {
        eprintln!("warning: could not raise the open-file limit: {e}");
    }
    if let Some(url) = &args.ws_url {
        crate::ws::parse_ws_url(url)?;
    }
    if let Some(url) = &args.raw_url {
        crate::ws::parse_ws_url(url)?;
    }
    let pgcast_bin = match (&args.ws_url, &args.pgcast_bin) {
        (Some(_), _) => None,
        (None, Some(p)) => Some(p.clone()),
        (None, None) => Some(
            std::env::current_exe()?
                .parent()
                .ok_or_else(|| anyhow!("no directory of this executable"))?
                .join("pgcast"),
        ),
    };
    if let Some(bin) = &pgcast_bin {
        if !bin.is_file() {
            bail!(
                "{} not found: build it with `cargo build --release --workspace`, or give --pgcast-bin or --ws-url",
                bin.display()
            );
        }
    }

    let mut scratch = Scratch::new()?;
    let db = match &args.database_url {
        Some(url) => {
            scratch.arm(&std::process::Command::new("true"))?;
            Database::given(url)?
        }
        None => {
            eprintln!("starting a throwaway PostgreSQL …");
            Database::throwaway(&mut scratch, args.durable)?
        }
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(args.threads.max(1))
        .enable_all()
        .build()?;
    let result = runtime.block_on(bench(args, pgcast_bin, db, &scratch));
    runtime.shutdown_timeout(Duration::from_secs(5));
    scratch.finish();
    result
}

async fn bench(
    args: Args,
    pgcast_bin: Option<std::path::PathBuf>,
    db: Database,
    scratch: &Scratch,
) -> Result<()> {
    let version = {
        let (mut client, connection) = db
            .config
            .connect(NoTls)
            .await
            .context("connect to the database")?;
        let conn = tokio::spawn(async move {
            let _ = connection.await;
        });
        let applied = pgcast_listener::migrate(&mut client, MigrationScope::All)
            .await
            .context("apply pgcast's migrations")?;
        if applied > 0 {
            eprintln!("applied {applied} migrations");
        }
        let v: String = client.query_one("SHOW server_version", &[]).await?.get(0);
        // Every commit's cost depends on these: the throwaway cluster runs without fsync
        // unless --durable.
        let fsync: String = client.query_one("SHOW fsync", &[]).await?.get(0);
        let sync: String = client
            .query_one("SHOW synchronous_commit", &[])
            .await?
            .get(0);
        drop(client);
        let _ = conn.await;
        format!("PostgreSQL {v}; fsync {fsync}, synchronous_commit {sync}")
    };

    let secret = match &args.ws_url {
        Some(_) => args.jwt_secret.clone().unwrap_or_default(),
        None => format!("bench-{}", uuid::Uuid::new_v4().simple()),
    };
    let minter = TokenMinter::new(secret.as_bytes()).context("the token secret")?;
    let (server, target, pid) = match &args.ws_url {
        Some(url) => (None, crate::ws::parse_ws_url(url)?, args.pgcast_pid),
        None => {
            let bin = pgcast_bin
                .as_deref()
                .ok_or_else(|| anyhow!("no pgcast binary"))?;
            let log = scratch.path().join("pgcast.log");
            let server = Server::pgcast(bin, &db, &secret, log)?;
            scratch.set_pids(&[server.pid]);
            eprintln!(
                "pgcast (pid {}) serving on {}",
                server.pid, server.target.url
            );
            let (t, p) = (server.target.clone(), Some(server.pid));
            (Some(server), t, p)
        }
    };

    let command = format!(
        "target/release/pgcast-bench {}",
        shown_args(std::env::args().skip(1)).join(" ")
    );
    let mut results = Results {
        machine: Machine::probe(version),
        command: command.trim().to_owned(),
        quick: args.quick,
        note: args.note.clone(),
        bench_threads: args.threads,
        sections: Vec::new(),
        error: None,
    };
    let out = args.out.clone().unwrap_or_else(|| {
        PathBuf::from(if args.quick {
            "target/bench-quick"
        } else {
            "bench"
        })
    });
    let max_time = args.max_time;
    let mut ctx = Ctx::new(
        args,
        db,
        server,
        target,
        pid,
        secret,
        minter,
        pgcast_bin,
        scratch.path().to_owned(),
    );

    let outcome = tokio::select! {
        r = tokio::time::timeout(max_time, scenarios(&mut ctx, &mut results, &out)) => {
            r.unwrap_or_else(|_| Err(anyhow!("the time limit (--max-time) was reached")))
        }
        _ = tokio::signal::ctrl_c() => Err(anyhow!("interrupted")),
    };
    if let Err(e) = &outcome {
        results.error = Some(format!("{e:#}"));
    }
    ctx.shutdown();
    ctx.db.stop();
    results.write(&out)?;
    eprintln!(
        "results written to {}/results.md and results.json",
        out.display()
    );
    outcome
}

/// The command line as written to the results: secrets and passwords left out, arguments with
/// spaces quoted.
fn shown_args(args: impl Iterator<Item = String>) -> Vec<String> {
    let mut out = Vec::new();
    let mut hide_next = false;
    for a in args {
        if std::mem::take(&mut hide_next) {
            out.push("<redacted>".into());
            continue;
        }
        if a == "--jwt-secret" {
            hide_next = true;
            out.push(a);
            continue;
        }
        if a.starts_with("--jwt-secret=") {
            out.push("--jwt-secret=<redacted>".into());
            continue;
        }
        let mut a = a;
        // postgres://user:password@host → postgres://user:<redacted>@host
        if let (Some(scheme), Some(at)) = (a.find("://"), a.rfind('@')) {
            if let Some(colon) = a[scheme + 3..at].find(':') {
                a.replace_range(scheme + 3 + colon + 1..at, "<redacted>");
            }
        }
        if a.contains(' ') || a.is_empty() {
            a = format!("'{}'", a.replace('\'', r"'\''"));
        }
        out.push(a);
    }
    out
}

async fn scenarios(ctx: &mut Ctx, results: &mut Results, out: &std::path::Path) -> Result<()> {
    let mut failed = Vec::new();
    for scenario in scenarios::ORDER {
        if !ctx.args.wants(scenario) {
            continue;
        }
        let name = scenario.name();
        eprintln!("── {name} …");
        let started = std::time::Instant::now();
        match scenario.run(ctx).await {
            Ok(section) => {
                for t in &section.targets {
                    let verdict = match t.met {
                        Some(true) => "met",
                        Some(false) => "NOT MET",
                        None => "n/a",
                    };
                    eprintln!("   {}: {} [{verdict}]", t.target, t.measured);
                }
                results.sections.push(section);
            }
            Err(e) => {
                eprintln!("   {name} failed: {e:#}");
                failed.push(format!("{name}: {e:#}"));
                results.sections.push(report::Section {
                    key: name.into(),
                    title: format!("{name} (failed)"),
                    markdown: format!("The scenario failed: `{e:#}`\n"),
                    data: serde_json::json!({ "error": format!("{e:#}") }),
                    targets: Vec::new(),
                    cpu: Vec::new(),
                });
            }
        }
        eprintln!("   ({:.0} s)", started.elapsed().as_secs_f64());
        results.write(out)?;
    }
    if failed.is_empty() {
        Ok(())
    } else {
        bail!("{} scenario(s) failed: {}", failed.len(), failed.join("; "))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_recorded_command_hides_secrets() {
        let args = [
            "--jwt-secret",
            "s3cret",
            "--jwt-secret=abc",
            "--database-url",
            "postgres://app:hunter2@127.0.0.1:5432/db",
            "--note",
            "shared machine",
        ];
        let shown = shown_args(args.iter().map(|a| a.to_string())).join(" ");
        assert!(
            !shown.contains("s3cret") && !shown.contains("abc") && !shown.contains("hunter2"),
            "{shown}"
        );
        assert!(
            shown.contains("postgres://app:<redacted>@127.0.0.1:5432/db"),
            "{shown}"
        );
        assert!(shown.contains("'shared machine'"), "{shown}");
    }
}
