//! Command line. Every size has a full default (the sizes of the performance targets in
//! bench/README.md) and a `--quick` one
//! (a smoke run of a minute or two); an explicit flag wins over both.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, ValueEnum};

/// Benchmarks pgcast end to end on this machine: latency under load, the ceiling, fan-out
/// (against a bare broadcaster too), memory per connection, catch-up, overhead versus a bare
/// LISTEN, other relays, a reconnect storm, and the cost of pgcast's trigger on writes.
///
/// Starts a throwaway PostgreSQL and a `pgcast serve` child unless told otherwise, targets
/// loopback only, stops by itself, and writes results.md and results.json. The bench writes
/// rows into session_assignments: point --database-url only at a throwaway database.
#[derive(Debug, Parser)]
#[command(name = "pgcast-bench", version)]
pub(crate) struct Args {
    /// Scenarios to run.
    #[arg(value_enum, default_values_t = [Scenario::All])]
    pub(crate) scenarios: Vec<Scenario>,
    /// Small sizes and short durations: a smoke run for development.
    #[arg(long)]
    pub(crate) quick: bool,
    /// Use this database (loopback or Unix socket only) instead of starting a throwaway one;
    /// pending pgcast migrations are applied to it.
    #[arg(long, value_name = "URL")]
    pub(crate) database_url: Option<String>,
    /// Start the throwaway PostgreSQL with its crash-safety settings (fsync, full_page_writes)
    /// on, as production runs them, instead of off: every commit waits for the disk, so the
    /// write scenarios show what production pays (the machine table says which was used).
    #[arg(long, conflicts_with = "database_url")]
    pub(crate) durable: bool,
    /// Target a running pgcast (`ws://127.0.0.1:PORT/ws`) instead of starting one; needs
    /// --database-url (the same database) and --jwt-secret.
    #[arg(long, value_name = "URL", requires_all = ["database_url", "jwt_secret"])]
    pub(crate) ws_url: Option<String>,
    /// Token secret of the pgcast given with --ws-url (a started one gets a random secret).
    #[arg(
        long,
        env = "PGCAST_JWT_SECRET",
        hide_env_values = true,
        value_name = "SECRET"
    )]
    pub(crate) jwt_secret: Option<String>,
    /// Process id of the pgcast given with --ws-url, for its CPU and memory readings.
    #[arg(long, value_name = "PID")]
    pub(crate) pgcast_pid: Option<u32>,
    /// The pgcast binary to start (default: `pgcast` next to this executable, as built by
    /// `cargo build --release --workspace`).
    #[arg(long, value_name = "PATH")]
    pub(crate) pgcast_bin: Option<PathBuf>,
    /// Where results.md and results.json go (default: `bench`, the figures the README quotes;
    /// with --quick, `target/bench-quick`, so that a smoke run never overwrites them).
    #[arg(long, value_name = "DIR")]
    pub(crate) out: Option<PathBuf>,
    /// Worker threads of the load generator's runtime.
    #[arg(long, default_value_t = 2)]
    pub(crate) threads: usize,
    /// Tasks that share the WebSocket connections.
    #[arg(long, default_value_t = 4)]
    pub(crate) reader_tasks: usize,
    /// A remark printed at the top of results.md (e.g. that the machine was shared).
    #[arg(long, value_name = "TEXT")]
    pub(crate) note: Option<String>,
    /// The whole run is aborted after this long.
    #[arg(long, default_value = "40m", value_parser = humantime::parse_duration)]
    pub(crate) max_time: Duration,
    /// Seed of the writers' random choices.
    #[arg(long, default_value_t = 1)]
    pub(crate) seed: u64,
    /// Internal: be the bare broadcaster of the fan-out comparison (the bench starts itself
    /// with this flag and DATABASE_URL; the process ends when its stdin closes).
    #[arg(long, hide = true)]
    pub(crate) serve_floor: bool,

    /// Latency: subscribed mechanics (default 1000; quick 100).
    #[arg(long, help_heading = "Latency")]
    pub(crate) mechanics: Option<usize>,
    /// Latency: workshops the mechanics belong to.
    #[arg(long, default_value_t = 10, help_heading = "Latency")]
    pub(crate) workshops: usize,
    /// Latency and overhead: total events per second (default 500; quick 200).
    #[arg(long, help_heading = "Latency")]
    pub(crate) rate: Option<f64>,
    /// Writer connections of paced loads.
    #[arg(long, default_value_t = 4, help_heading = "Latency")]
    pub(crate) writers: usize,
    /// Latency and overhead: how long the writers write (default 20s; quick 4s).
    #[arg(long, value_parser = humantime::parse_duration, help_heading = "Latency")]
    pub(crate) duration: Option<Duration>,

    /// Ceiling and writes: writer connections for 1-row transactions.
    #[arg(long, default_value_t = 8, help_heading = "Ceiling")]
    pub(crate) ceiling_writers: usize,
    /// Ceiling and writes: writer connections for 100-row transactions.
    #[arg(long, default_value_t = 4, help_heading = "Ceiling")]
    pub(crate) ceiling_batch_writers: usize,
    /// Ceiling: duration of each run (default 10s; quick 3s).
    #[arg(long, value_parser = humantime::parse_duration, help_heading = "Ceiling")]
    pub(crate) ceiling_duration: Option<Duration>,

    /// Fan-out: connections receiving every event (default 1000; quick 200).
    #[arg(long, help_heading = "Fan-out")]
    pub(crate) fanout_connections: Option<usize>,
    /// Fan-out: offered event rates to step through, events/s (default
    /// 250,500,1000,1250,1500,2000; quick 250,500). Stops after the first step that is not
    /// sustained.
    #[arg(long, value_delimiter = ',', help_heading = "Fan-out")]
    pub(crate) fanout_rates: Option<Vec<f64>>,
    /// Fan-out: duration of each step (default 8s; quick 2s).
    #[arg(long, value_parser = humantime::parse_duration, help_heading = "Fan-out")]
    pub(crate) fanout_step: Option<Duration>,

    /// Memory: idle authenticated connections (default 10000; quick 1000).
    #[arg(long, help_heading = "Memory")]
    pub(crate) memory_connections: Option<usize>,

    /// Catch-up: events to resume behind (default 100000; quick 10000).
    #[arg(long, help_heading = "Catch-up")]
    pub(crate) catchup_events: Option<u64>,

    /// Writes: length of one round of one trigger variant (default 3s; quick 1s).
    #[arg(long, value_parser = humantime::parse_duration, help_heading = "Writes")]
    pub(crate) writes_round: Option<Duration>,
    /// Writes: rounds of each variant per transaction size, interleaved (no trigger, bare
    /// NOTIFY, pgcast, no trigger, …) (default 3; quick 2).
    #[arg(long, help_heading = "Writes")]
    pub(crate) writes_rounds: Option<u32>,

    /// Reconnect storm: mechanics connected on `queue` when pgcast is SIGKILLed and restarted
    /// (default 10000; quick 1000).
    #[arg(long, help_heading = "Reconnect storm")]
    pub(crate) storm_mechanics: Option<usize>,
    /// Reconnect storm: workshops the mechanics belong to (every fifth mechanic is a
    /// freelancer, in none).
    #[arg(long, default_value_t = 5, help_heading = "Reconnect storm")]
    pub(crate) storm_workshops: usize,
    /// Reconnect storm: events per second the writers commit before, during and after the
    /// outage (default 20; quick 20). About half of them reach every mechanic.
    #[arg(long, help_heading = "Reconnect storm")]
    pub(crate) storm_rate: Option<f64>,
    /// Reconnect storm: how long pgcast stays dead before it is started again (its own
    /// start-up comes on top).
    #[arg(long, default_value = "1s", value_parser = humantime::parse_duration, help_heading = "Reconnect storm")]
    pub(crate) storm_down: Duration,
    /// Reconnect storm: how long the writers go on after the restart (default 10s; quick 6s).
    #[arg(long, value_parser = humantime::parse_duration, help_heading = "Reconnect storm")]
    pub(crate) storm_after: Option<Duration>,

    /// Raw mode: a WebSocket server that forwards NOTIFY payloads of the bench's baseline
    /// channel pgcast_bench_bare (a plain `pg_notify(to_jsonb(NEW))` trigger installed for the
    /// run) as text frames (loopback only), e.g. ws://127.0.0.1:7700/listen/pgcast_bench_bare.
    #[arg(long, value_name = "URL", help_heading = "Other servers")]
    pub(crate) raw_url: Option<String>,
    /// Raw mode: text to send right after connecting.
    #[arg(long, value_name = "TEXT", help_heading = "Other servers")]
    pub(crate) raw_first_frame: Option<String>,
    /// Raw mode: JSON pointer of the assignment id in a forwarded payload (frames where it
    /// does not resolve are not counted as events).
    #[arg(
        long,
        default_value = "/id",
        value_name = "POINTER",
        help_heading = "Other servers"
    )]
    pub(crate) raw_id_pointer: String,
    /// Also start the Node.js pg + ws relay of bench/node-relay and run the raw scenarios
    /// against it.
    #[arg(long, help_heading = "Other servers")]
    pub(crate) compare_node: bool,
    /// Directory of the Node relay.
    #[arg(
        long,
        default_value = "bench/node-relay",
        value_name = "DIR",
        help_heading = "Other servers"
    )]
    pub(crate) node_relay_dir: PathBuf,
}

/// A scenario of the benchmark.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(crate) enum Scenario {
    /// Every scenario (raw only with --raw-url or --compare-node).
    All,
    /// 1. Latency under load: mechanics on `queue`, a marketplace write mix.
    Latency,
    /// 2. Ceiling: writers as fast as the database commits; one `service` subscriber.
    Ceiling,
    /// 3. Fan-out: every event to every connection, stepped rates; pgcast, then the floor.
    Fanout,
    /// 4. Memory: resident memory of pgcast per idle authenticated connection.
    Memory,
    /// 5. Catch-up: a client resuming far behind with `since`.
    Catchup,
    /// 6. Overhead: one `service` subscriber and a bare LISTEN on the same load.
    Overhead,
    /// 7. Other servers: fan-out and ceiling against --raw-url and/or the Node relay.
    Raw,
    /// 8. Reconnect storm: pgcast SIGKILLed and restarted; every mechanic resumes with `since`.
    ///
    /// Needs a pgcast of its own: skipped with --ws-url.
    Storm,
    /// 9. Write cost: commits/s with no trigger, a bare NOTIFY trigger, two log floors and pgcast's triggers.
    Writes,
}

impl Args {
    pub(crate) fn wants(&self, s: Scenario) -> bool {
        let all = self.scenarios.contains(&Scenario::All);
        if s == Scenario::Raw {
            return (all || self.scenarios.contains(&s))
                && (self.raw_url.is_some() || self.compare_node);
        }
        all || self.scenarios.contains(&s)
    }

    fn pick<T>(&self, v: Option<T>, full: T, quick: T) -> T {
        v.unwrap_or(if self.quick { quick } else { full })
    }

    pub(crate) fn sizes(&self) -> Sizes {
        Sizes {
            mechanics: self.pick(self.mechanics, 1000, 100),
            rate: self.pick(self.rate, 500.0, 200.0),
            duration: self.pick(
                self.duration,
                Duration::from_secs(20),
                Duration::from_secs(4),
            ),
            ceiling_duration: self.pick(
                self.ceiling_duration,
                Duration::from_secs(10),
                Duration::from_secs(3),
            ),
            fanout_connections: self.pick(self.fanout_connections, 1000, 200),
            fanout_rates: self.pick(
                self.fanout_rates.clone(),
                vec![250.0, 500.0, 1000.0, 1250.0, 1500.0, 2000.0],
                vec![250.0, 500.0],
            ),
            fanout_step: self.pick(
                self.fanout_step,
                Duration::from_secs(8),
                Duration::from_secs(2),
            ),
            memory_connections: self.pick(self.memory_connections, 10_000, 1000),
            catchup_events: self.pick(self.catchup_events, 100_000, 10_000),
            storm_mechanics: self.pick(self.storm_mechanics, 10_000, 1000),
            storm_rate: self.pick(self.storm_rate, 20.0, 20.0),
            storm_after: self.pick(
                self.storm_after,
                Duration::from_secs(10),
                Duration::from_secs(6),
            ),
            writes_round: self.pick(
                self.writes_round,
                Duration::from_secs(3),
                Duration::from_secs(1),
            ),
            writes_rounds: self.pick(self.writes_rounds, 3, 2).max(1),
        }
    }
}

/// Sizes after `--quick` and explicit flags.
#[derive(Debug, Clone)]
pub(crate) struct Sizes {
    pub(crate) mechanics: usize,
    pub(crate) rate: f64,
    pub(crate) duration: Duration,
    pub(crate) ceiling_duration: Duration,
    pub(crate) fanout_connections: usize,
    pub(crate) fanout_rates: Vec<f64>,
    pub(crate) fanout_step: Duration,
    pub(crate) memory_connections: usize,
    pub(crate) catchup_events: u64,
    pub(crate) storm_mechanics: usize,
    pub(crate) storm_rate: f64,
    pub(crate) storm_after: Duration,
    pub(crate) writes_round: Duration,
    pub(crate) writes_rounds: u32,
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn the_command_line_is_consistent() {
        Args::command().debug_assert();
        let a =
            Args::try_parse_from(["pgcast-bench", "--quick", "latency", "--rate", "50"]).unwrap();
        assert!(a.wants(Scenario::Latency) && !a.wants(Scenario::Fanout));
        assert_eq!(a.sizes().rate, 50.0);
        assert_eq!(a.sizes().mechanics, 100);
        let a = Args::try_parse_from(["pgcast-bench"]).unwrap();
        assert!(a.wants(Scenario::Memory) && !a.wants(Scenario::Raw));
        assert!(a.wants(Scenario::Storm));
        assert_eq!(a.sizes().storm_mechanics, 10_000);
        let a = Args::try_parse_from(["pgcast-bench", "storm", "--quick"]).unwrap();
        assert!(a.wants(Scenario::Storm) && !a.wants(Scenario::Latency));
        assert_eq!(a.sizes().storm_mechanics, 1000);
        let a = Args::try_parse_from(["pgcast-bench", "writes", "--quick"]).unwrap();
        assert!(a.wants(Scenario::Writes) && !a.wants(Scenario::Fanout));
        assert_eq!(a.sizes().writes_rounds, 2);
        let a = Args::try_parse_from(["pgcast-bench"]).unwrap();
        assert!(a.wants(Scenario::Writes) && !a.serve_floor);
        assert_eq!(a.sizes().writes_round, Duration::from_secs(3));
    }
}
