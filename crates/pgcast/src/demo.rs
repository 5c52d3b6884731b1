//! `pgcast demo`: the embedded default. Starts a local PostgreSQL from the machine's binaries,
//! migrates, loads a small marketplace (workshops, mechanics, sessions), serves it, prints
//! ready-to-open URLs and, with `--simulate`, keeps writing realistic assignment lifecycles
//! through plain SQL — the way any other service would.
//!
//! The demo also serves a small action API (`/demo/api/…`, [`crate::demo_api`]) behind the
//! pages' buttons: a customer opens and ends requests, a mechanic accepts, declines and
//! completes. It too only writes plain SQL; what the pages show still arrives through the
//! trigger → log → listener → gateway path, never from a button's response.
//!
//! ```text
//!   demo ──▶ LocalPg (initdb once, data kept) ──▶ demo_on(tcp, DemoSetup)
//!              migrate, sql/demo_*.sql data ──▶ serve_with(…, Extras { /demo/api/… })
//!              --simulate: simulator task (sql/demo_sim_*.sql), stopped with the server
//! ```

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use pgcast_events::{Principal, Role};
use pgcast_localpg::{find_bin_dir, free_port, LocalPg, Settings, StopMode};
use rand::seq::IndexedRandom;
use rand::Rng;
use tokio_postgres::Client;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::server::{serve_with, Extras, ServeOptions};
use crate::PgcastError;

const COUNT_SESSIONS_SQL: &str = include_str!("../../../sql/demo_count_sessions.sql");
pub(crate) const INSERT_SESSION_SQL: &str = include_str!("../../../sql/demo_insert_session.sql");
pub(crate) const INSERT_ASSIGNMENT_SQL: &str =
    include_str!("../../../sql/demo_insert_assignment.sql");
const SIM_COUNT_OPEN_SQL: &str = include_str!("../../../sql/demo_sim_count_open.sql");
const SIM_ACCEPT_SQL: &str = include_str!("../../../sql/demo_sim_accept.sql");
const SIM_FINISH_SQL: &str = include_str!("../../../sql/demo_sim_finish.sql");

/// Demo tokens stay valid this long.
const TOKEN_TTL: Duration = Duration::from_secs(24 * 3600);
/// The simulator stops adding assignments while this many are open, so the queue stays readable.
const MAX_OPEN: i64 = 25;

const fn id(n: u128) -> Uuid {
    Uuid::from_u128(0x0000_0000_0000_4000_8000_0000_0000_0000 | n)
}

/// Workshops: (id, name).
const WORKSHOPS: [(Uuid, &str); 3] = [
    (id(0xa001), "Northside Garage"),
    (id(0xa002), "Southbank Motors"),
    (id(0xa003), "Eastgate Auto"),
];
/// Mechanics: (id, workshop index or none).
const MECHANICS: [(Uuid, Option<usize>); 6] = [
    (id(0xb001), Some(0)),
    (id(0xb002), Some(0)),
    (id(0xb003), Some(1)),
    (id(0xb004), Some(2)),
    (id(0xb005), None),
    (id(0xb006), None),
];
/// The customer whose page the demo prints: the one a person plays. The simulator leaves
/// their sessions alone, so that nothing but the person's own clicks changes them.
pub(crate) const DEMO_CUSTOMER: Uuid = id(0xc001);
/// The name the demo customer's requests carry (a real app would take it from its profile).
pub(crate) const DEMO_CUSTOMER_NAME: &str = "Sam Rivera";
/// Sessions the simulator never touches: those of the customer people play.
const PLAYED_CUSTOMERS: [Uuid; 1] = [DEMO_CUSTOMER];

const CUSTOMERS: [&str; 10] = [
    "Ana Souza",
    "Ben Okafor",
    "Chloé Martin",
    "Dmitri Ivanov",
    "Emma Larsen",
    "Farah Haddad",
    "Gustavo Pereira",
    "Hana Sato",
    "Ivan Kovač",
    "Julia Novak",
];
const VEHICLES: [&str; 8] = [
    "2014 VW Golf 1.6 TDI",
    "2019 Toyota Corolla Hybrid",
    "2011 Ford Focus 1.0 EcoBoost",
    "2017 BMW 320d",
    "2020 Tesla Model 3",
    "2008 Honda Civic 1.8",
    "2016 Škoda Octavia Combi",
    "2012 Renault Clio dCi",
];
const CONCERNS: [&str; 8] = [
    "Grinding noise when braking, worse in the morning.",
    "Engine warning light came on right after refuelling.",
    "The car pulls to the left above 80 km/h.",
    "Battery is flat every other morning.",
    "Air conditioning blows warm air.",
    "Rough idle when the engine is cold, smooths out after 10 minutes.",
    "Clunk from the front suspension over speed bumps.",
    "Gearbox whines in third gear.",
];

/// What `demo` needs.
#[derive(Debug, Clone)]
pub struct DemoOptions {
    /// HTTP address.
    pub listen: SocketAddr,
    /// Log retention.
    pub retention: Duration,
    /// Simulated events per second, if any.
    pub simulate: Option<f64>,
    /// PostgreSQL data directory (default under /var/tmp, printed).
    pub data_dir: Option<PathBuf>,
}

/// What [`demo_on`] needs: a database to run the demo in, instead of the local PostgreSQL
/// that [`demo`] starts (tests use a throwaway database).
#[derive(Clone)]
pub struct DemoSetup {
    /// The database; it is migrated, and demo data is loaded when it has no sessions.
    pub pg: tokio_postgres::Config,
    /// HS256 secret of the demo's tokens (at least 32 bytes).
    pub jwt_secret: Vec<u8>,
    /// Log retention.
    pub retention: Duration,
    /// Simulated events per second, if any.
    pub simulate: Option<f64>,
}

impl std::fmt::Debug for DemoSetup {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DemoSetup")
            .field("retention", &self.retention)
            .field("simulate", &self.simulate)
            .finish_non_exhaustive()
    }
}

/// A demo about to serve: where, and its ready-made pages.
#[derive(Debug, Clone)]
pub struct DemoReady {
    /// The address it serves on.
    pub addr: SocketAddr,
    /// (label, path) of each demo page, its token in the fragment.
    pub links: Vec<(String, String)>,
}

/// The default data directory: outside any home directory, so that the `postgres` OS user
/// (used when running as root) can reach it, and kept across runs and reboots.
pub fn default_data_dir() -> PathBuf {
    let uid = pgcast_localpg::effective_uid().unwrap_or(0);
    PathBuf::from(format!("/var/tmp/pgcast-demo-{uid}"))
}

/// Runs the demo until `shutdown`; stops the PostgreSQL it started before returning.
pub async fn demo(options: DemoOptions, shutdown: CancellationToken) -> Result<(), PgcastError> {
    // Bind first: a busy port fails before anything is started.
    let tcp = crate::server::bind(options.listen).await?;
    if !options.listen.ip().is_loopback() {
        // PGCAST_LISTEN exported for `serve` applies here too.
        tracing::warn!(
            listen = %options.listen,
            "the demo listens beyond this machine: its overview page lists working tokens for \
             anyone who can reach it"
        );
    }
    let data_dir = options.data_dir.clone().unwrap_or_else(default_data_dir);
    // Held until the demo returns (the OS releases it if the process dies).
    let (pg, _lock) = start_postgres(data_dir.clone()).await?;
    let mut config = tokio_postgres::Config::new();
    config
        .host("127.0.0.1")
        .port(pg.port())
        .user("postgres")
        .dbname("postgres");
    let secret: [u8; 32] = rand::rng().random();
    let secret: Vec<u8> = secret
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<String>()
        .into_bytes();
    let setup = DemoSetup {
        pg: config,
        jwt_secret: secret,
        retention: options.retention,
        simulate: options.simulate,
    };
    let port = pg.port();
    let print = |ready: &DemoReady| {
        println!("pgcast demo");
        println!(
            "  PostgreSQL: {} (port {port}, data kept for the next run)",
            data_dir.display(),
        );
        for (label, path) in &ready.links {
            println!("  {label}:\n    http://{}{path}", ready.addr);
        }
        println!("  Overview: http://{}/", ready.addr);
        println!("  Play it: open a request on the customer page, accept it on a mechanic page.");
        match options.simulate {
            Some(rate) => println!("  Simulating {rate} events/s. Press Ctrl-C to stop."),
            None => println!("  Add --simulate 5 for live traffic. Press Ctrl-C to stop."),
        }
    };
    let result = demo_on(tcp, setup, print, shutdown).await;
    let stopper = pg.clone();
    let stopped = tokio::task::spawn_blocking(move || stopper.stop(StopMode::Fast)).await;
    match stopped {
        Ok(Ok(())) => eprintln!("PostgreSQL stopped (data kept in {})", data_dir.display()),
        Ok(Err(e)) => tracing::error!(error = %e, "could not stop the demo PostgreSQL"),
        Err(e) => tracing::error!(error = %e, "could not stop the demo PostgreSQL"),
    }
    result
}

/// Opens (or creates) the demo's cluster, takes its data directory's lock and starts it. The
/// lock file is returned: the demo holds it while it runs.
async fn start_postgres(data_dir: PathBuf) -> Result<(LocalPg, std::fs::File), PgcastError> {
    tokio::task::spawn_blocking(move || {
        let open = || {
            find_bin_dir()?;
            let port = free_port()?;
            LocalPg::open_or_init(&data_dir, port).map(|pg| pg.with_settings(Settings::durable()))
        };
        // First: two demos starting on a new directory must not both run initdb.
        let lock = lock_data_dir(&data_dir)?;
        let pg = open().map_err(PgcastError::LocalPg)?;
        if pg.is_running() {
            // Left over from a demo that was killed (a running one holds the lock): take it
            // over on our port.
            tracing::warn!(dir = %data_dir.display(), "stopping a PostgreSQL left running by an earlier demo");
            pg.stop(StopMode::Fast).map_err(PgcastError::LocalPg)?;
        }
        pg.start().map_err(PgcastError::LocalPg)?;
        Ok((pg, lock))
    })
    .await
    .map_err(|_| PgcastError::Task("PostgreSQL start-up did not finish"))?
}

/// Takes the exclusive lock of the demo's data directory, a file beside it
/// (`<data_dir>.lock`: inside, it would make a new directory non-empty for initdb), so that a
/// second demo on the same directory is refused instead of running initdb at the same time or
/// stopping the first one's server.
fn lock_data_dir(data_dir: &std::path::Path) -> Result<std::fs::File, PgcastError> {
    let path = lock_path(data_dir);
    let failed = |source| PgcastError::DemoLock {
        path: path.clone(),
        source,
    };
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent).map_err(failed)?;
    }
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(failed)?;
    match file.try_lock() {
        Ok(()) => Ok(file),
        Err(std::fs::TryLockError::WouldBlock) => Err(PgcastError::DemoInUse {
            data_dir: data_dir.to_path_buf(),
        }),
        Err(std::fs::TryLockError::Error(e)) => Err(failed(e)),
    }
}

/// `<data_dir>.lock`, beside the directory however it was spelled (`x/`, `./x`, `.`).
fn lock_path(data_dir: &std::path::Path) -> PathBuf {
    let dir: PathBuf = std::path::absolute(data_dir)
        .unwrap_or_else(|_| data_dir.to_path_buf())
        .components()
        .filter(|c| !matches!(c, std::path::Component::CurDir))
        .collect();
    let mut name = dir.file_name().unwrap_or_default().to_owned();
    name.push(".lock");
    dir.with_file_name(name)
}

/// Runs the demo on `tcp` against `setup.pg` until `shutdown`: migrates, loads the demo data
/// into an empty database, calls `on_ready` with the pages, then serves pgcast, its pages and
/// the demo's action API (and, with `simulate`, writes simulated traffic).
pub async fn demo_on(
    tcp: tokio::net::TcpListener,
    setup: DemoSetup,
    on_ready: impl FnOnce(&DemoReady),
    shutdown: CancellationToken,
) -> Result<(), PgcastError> {
    let addr = tcp.local_addr().map_err(PgcastError::Bind)?;
    // The demo's PostgreSQL is local: TLS as the configuration says (`prefer` by default).
    let config = crate::DatabaseUrl::from(setup.pg.clone());
    let mut client = crate::db::connect(&config, "pgcast-demo").await?;
    pgcast_listener::migrate(&mut client, pgcast_listener::MigrationScope::All).await?;
    load_demo_data(&client).await?;
    drop(client);

    let secret = setup.jwt_secret;
    let mechanic = Principal {
        user_id: MECHANICS[0].0,
        role: Role::Mechanic,
        workshop_id: Some(WORKSHOPS[0].0),
    };
    let freelancer = Principal {
        user_id: MECHANICS[4].0,
        role: Role::Mechanic,
        workshop_id: None,
    };
    let customer = Principal {
        user_id: DEMO_CUSTOMER,
        role: Role::Customer,
        workshop_id: None,
    };
    let token = |who: &Principal| {
        pgcast_gateway::mint_token(&secret, who, TOKEN_TTL).map_err(PgcastError::Token)
    };
    // Tokens travel in the fragment, which browsers never send to a server or proxy; the pages
    // take them out of the address bar as soon as they load.
    let links = vec![
        (
            format!("Mechanic queue ({})", WORKSHOPS[0].1),
            format!("/mechanic#token={}", token(&mechanic)?),
        ),
        (
            "Mechanic queue (freelancer)".to_owned(),
            format!("/mechanic#token={}", token(&freelancer)?),
        ),
        (
            format!("Customer ({DEMO_CUSTOMER_NAME})"),
            format!("/customer#token={}", token(&customer)?),
        ),
    ];
    let api = crate::demo_api::router(&config, &secret)?;
    on_ready(&DemoReady {
        addr,
        links: links.clone(),
    });

    let simulator = setup.simulate.map(|rate| {
        let config = config.clone();
        let stop = shutdown.clone();
        tokio::spawn(async move {
            if let Err(error) = simulate(&config, rate, stop).await {
                tracing::error!(%error, "simulator stopped");
            }
        })
    });
    let served = serve_with(
        tcp,
        ServeOptions {
            pg: config.into(),
            jwt_secret: secret,
            jwt_issuer: None,
            jwt_audience: None,
            retention: setup.retention,
            migrate: false,
            links,
        },
        Some(Extras {
            routes: api,
            head: crate::demo_api::PAGE_HEAD,
        }),
        shutdown.clone(),
    )
    .await;
    shutdown.cancel();
    if let Some(task) = simulator {
        let _ = task.await;
    }
    served
}

/// The SQL error helper: which statement failed.
fn q(what: &'static str) -> impl Fn(tokio_postgres::Error) -> PgcastError {
    move |source| PgcastError::Query { what, source }
}

async fn load_demo_data(client: &Client) -> Result<(), PgcastError> {
    let sessions: i64 = client
        .query_one(COUNT_SESSIONS_SQL, &[])
        .await
        .and_then(|row| row.try_get(0))
        .map_err(q("count demo sessions"))?;
    if sessions > 0 {
        return Ok(());
    }
    // A few open assignments so the queues are not empty at first sight. The demo customer
    // starts with none: opening one is theirs to play.
    for (i, workshop) in [None, Some(0), Some(1), None, Some(0)]
        .into_iter()
        .enumerate()
    {
        let session = insert_session(client, "free").await?;
        insert_assignment(client, session, workshop.map(|w| WORKSHOPS[w].0), i == 1).await?;
    }
    // One offered directly to the demo mechanic.
    let session = insert_session(client, "paid").await?;
    let (status, urgent) = ("offered", false);
    client
        .execute(
            INSERT_ASSIGNMENT_SQL,
            &[
                &session,
                &Some(MECHANICS[0].0),
                &Some(WORKSHOPS[0].0),
                &status,
                &urgent,
                &"Kofi Mensah",
                &"2015 Audi A4 Avant",
                &"Oil leak under the engine.",
            ],
        )
        .await
        .map_err(q("insert a direct offer"))?;
    Ok(())
}

/// A session of a simulated customer (a fresh id each time).
async fn insert_session(client: &Client, kind: &str) -> Result<Uuid, PgcastError> {
    client
        .query_one(INSERT_SESSION_SQL, &[&Uuid::new_v4(), &kind])
        .await
        .and_then(|row| row.try_get(0))
        .map_err(q("insert a session"))
}

async fn insert_assignment(
    client: &Client,
    session: Uuid,
    workshop: Option<Uuid>,
    urgent: bool,
) -> Result<(), PgcastError> {
    let (name, vehicle, concern) = {
        let mut rng = rand::rng();
        (
            CUSTOMERS.choose(&mut rng).copied().unwrap_or("Customer"),
            VEHICLES.choose(&mut rng).copied().unwrap_or("Car"),
            CONCERNS.choose(&mut rng).copied().unwrap_or("Needs help."),
        )
    };
    let (mechanic, status): (Option<Uuid>, &str) = (None, "queued");
    client
        .execute(
            INSERT_ASSIGNMENT_SQL,
            &[
                &session, &mechanic, &workshop, &status, &urgent, &name, &vehicle, &concern,
            ],
        )
        .await
        .map_err(q("insert an assignment"))?;
    Ok(())
}

/// One step of a realistic lifecycle: queued → accepted → completed, some cancelled or expired.
/// Each step is one plain SQL statement, so one event.
async fn simulate(
    config: &crate::DatabaseUrl,
    rate: f64,
    stop: CancellationToken,
) -> Result<(), PgcastError> {
    let client = crate::db::connect(config, "pgcast-demo-simulator").await?;
    let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / rate));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            () = stop.cancelled() => return Ok(()),
        }
        step(&client).await?;
    }
}

async fn step(client: &Client) -> Result<(), PgcastError> {
    let open: i64 = client
        .query_one(SIM_COUNT_OPEN_SQL, &[])
        .await
        .and_then(|row| row.try_get(0))
        .map_err(q("count open assignments"))?;
    let (roll, mechanic, workshop, urgent) = {
        let mut rng = rand::rng();
        let (m, _) = MECHANICS[rng.random_range(0..MECHANICS.len())];
        let w = match rng.random_range(0..5) {
            0..=1 => None,
            n => Some(WORKSHOPS[n - 2].0),
        };
        (rng.random_range(0..100u32), m, w, rng.random_bool(0.15))
    };
    let played = &PLAYED_CUSTOMERS[..];
    let finish = |from: &'static str, to: &'static str, min_age: f64, what: &'static str| async move {
        let n: i64 = client
            .query_one(SIM_FINISH_SQL, &[&from, &to, &min_age, &played])
            .await
            .and_then(|row| row.try_get(0))
            .map_err(q(what))?;
        Ok::<u64, PgcastError>(u64::try_from(n).unwrap_or(0))
    };
    let changed = match roll {
        0..=39 if open < MAX_OPEN => {
            let kind = if urgent { "paid" } else { "free" };
            let session = insert_session(client, kind).await?;
            insert_assignment(client, session, workshop, urgent).await?;
            1
        }
        0..=69 => client
            .execute(SIM_ACCEPT_SQL, &[&mechanic, &played])
            .await
            .map_err(q("accept an assignment"))?,
        70..=89 => finish("accepted", "completed", 0.0, "complete an assignment").await?,
        90..=94 => finish("queued", "cancelled", 0.0, "cancel an assignment").await?,
        _ => finish("queued", "expired", 30.0, "expire an assignment").await?,
    };
    if changed == 0 && open < MAX_OPEN {
        // Nothing to move forward: queue something new instead, so every step is one event.
        let session = insert_session(client, "free").await?;
        insert_assignment(client, session, workshop, urgent).await?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    #[test]
    fn the_lock_is_beside_the_data_directory_however_it_is_spelled() {
        let cwd = std::env::current_dir().expect("cwd");
        let beside = |dir: &str| lock_path(Path::new(dir));
        assert_eq!(
            beside("/var/tmp/pgcast-demo-0"),
            Path::new("/var/tmp/pgcast-demo-0.lock")
        );
        assert_eq!(beside("/tmp/x/"), Path::new("/tmp/x.lock"));
        assert_eq!(beside("/tmp/./x"), Path::new("/tmp/x.lock"));
        assert_eq!(beside("x"), cwd.join("x.lock"));
        let mut here = cwd.file_name().expect("a name").to_owned();
        here.push(".lock");
        assert_eq!(beside("."), cwd.with_file_name(here));
    }
}
