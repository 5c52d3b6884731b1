//! The `pgcast` binary's library: it owns the command line and the operator commands, and
//! puts the other crates together into one program.
//!
//! ```text
//!   argv / env ──clap──▶ Cli (validated: nothing connects or binds before this succeeds)
//!                          │  summary printed to stderr, secrets redacted
//!                          ▼
//!   commands::run ──┬─ serve / demo   listener + gateway (pgcast-listener, pgcast-gateway)
//!                   ├─ migrate        pgcast_listener::migrate
//!                   ├─ doctor         diagnose(): sql/doctor_*.sql ──▶ DoctorReport
//!                   ├─ tail           Listener(Start::After(p) | Head) ──▶ JSON lines
//!                   └─ token          pgcast_gateway::mint_token
//! ```
//!
//! `main.rs` only parses, starts the runtime and turns the outcome into an exit status. Library
//! functions return [`PgcastError`]; `anyhow` appears only in the command functions.

mod cli;
mod commands;
mod config;
mod db;
mod demo;
mod demo_api;
mod doctor;
mod edge;
mod error;
mod server;
mod signal;
mod tail;
mod tls;
mod token;

pub use cli::{
    one_line_error, Cli, Command, DatabaseArgs, DemoArgs, DoctorArgs, LimitArgs, LogFormat,
    MigrateArgs, SecretArgs, ServeArgs, TailArgs, TokenArgs,
};
pub use commands::{describe, run};
pub use config::{
    format_duration, parse_duration, parse_rate, parse_role, parse_tail_topic, DatabaseUrl, Secret,
    SslMode,
};
pub use db::{connect, listener, pool, tls_connector, Database};
pub use demo::{default_data_dir, demo, demo_on, DemoOptions, DemoReady, DemoSetup};
pub use doctor::{diagnose, doctor, Check, DoctorReport, Verdict, MAX_QUEUE_USAGE};
pub use edge::EdgeLimits;
pub use error::PgcastError;
pub use server::{bind, serve, serve_limited, serve_tls, Limits, ServeOptions};
pub use signal::cancel_on_signal;
pub use tail::{tail, TailOptions};
pub use tls::{TlsArgs, TlsServer};
pub use token::{mint, principal};
