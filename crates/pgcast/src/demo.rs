//! `pgcast demo`: the embedded default. Starts a local PostgreSQL from the machine's binaries,
//! migrates, loads a small marketplace (workshops, mechanics, sessions), serves it, prints
//! ready-to-open URLs and, with `--simulate`, keeps writing realistic assignment lifecycles
//! through plain SQL — the way any other service would.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use pgcast_events::{Principal, Role};
use pgcast_localpg::{find_bin_dir, free_port, LocalPg, Settings, StopMode};
use rand::seq::IndexedRandom;
use rand::Rng;
use tokio_postgres::Client;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::server::{serve, ServeOptions};
use crate::PgcastError;

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
/// The customer whose session page the demo prints, and that session.
const DEMO_CUSTOMER: Uuid = id(0xc001);
const DEMO_SESSION: Uuid = id(0xd001);

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
    let addr = tcp.local_addr().map_err(PgcastError::Bind)?;
    let data_dir = options.data_dir.clone().unwrap_or_else(default_data_dir);
    let pg = start_postgres(data_dir.clone()).await?;
    let result = run(tcp, addr, &pg, &data_dir, &options, shutdown).await;
    let stopper = pg.clone();
    let stopped = tokio::task::spawn_blocking(move || stopper.stop(StopMode::Fast)).await;
    match stopped {
        Ok(Ok(())) => eprintln!("PostgreSQL stopped (data kept in {})", data_dir.display()),
        Ok(Err(e)) => tracing::error!(error = %e, "could not stop the demo PostgreSQL"),
        Err(e) => tracing::error!(error = %e, "could not stop the demo PostgreSQL"),
    }
    result
}

async fn start_postgres(data_dir: PathBuf) -> Result<LocalPg, PgcastError> {
    tokio::task::spawn_blocking(move || {
        find_bin_dir()?;
        let port = free_port()?;
        let pg = LocalPg::open_or_init(&data_dir, port)?.with_settings(Settings::durable());
        if pg.is_running() {
            // Left over from a demo that was killed: take it over on our port.
            tracing::warn!(dir = %data_dir.display(), "stopping a PostgreSQL left running by an earlier demo");
            pg.stop(StopMode::Fast)?;
        }
        pg.start()?;
        Ok(pg)
    })
    .await
    .map_err(|_| PgcastError::Task("PostgreSQL start-up did not finish"))?
    .map_err(PgcastError::LocalPg)
}

async fn run(
    tcp: tokio::net::TcpListener,
    addr: SocketAddr,
    pg: &LocalPg,
    data_dir: &Path,
    options: &DemoOptions,
    shutdown: CancellationToken,
) -> Result<(), PgcastError> {
    let mut config = tokio_postgres::Config::new();
    config
        .host("127.0.0.1")
        .port(pg.port())
        .user("postgres")
        .dbname("postgres");
    let mut client = crate::db::connect_config(&config, "pgcast-demo").await?;
    pgcast_listener::migrate(&mut client, pgcast_listener::MigrationScope::All).await?;
    load_demo_data(&client).await?;

    let secret: [u8; 32] = rand::rng().random();
    let secret: Vec<u8> = secret
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<String>()
        .into_bytes();
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
            "Customer session".to_owned(),
            format!(
                "/customer?session={DEMO_SESSION}#token={}",
                token(&customer)?
            ),
        ),
    ];
    println!("pgcast demo");
    println!(
        "  PostgreSQL: {} (port {}, data kept for the next run)",
        data_dir.display(),
        pg.port()
    );
    for (label, path) in &links {
        println!("  {label}:\n    http://{addr}{path}");
    }
    println!("  Overview: http://{addr}/");
    match options.simulate {
        Some(rate) => println!("  Simulating {rate} events/s. Press Ctrl-C to stop."),
        None => println!("  Add --simulate 5 for live traffic. Press Ctrl-C to stop."),
    }

    let simulator = options.simulate.map(|rate| {
        let config = config.clone();
        let stop = shutdown.clone();
        tokio::spawn(async move {
            if let Err(error) = simulate(&config, rate, stop).await {
                tracing::error!(%error, "simulator stopped");
            }
        })
    });
    let served = serve(
        tcp,
        ServeOptions {
            pg: config,
            jwt_secret: secret,
            jwt_issuer: None,
            jwt_audience: None,
            retention: options.retention,
            migrate: false,
            links,
        },
        shutdown.clone(),
    )
    .await;
    shutdown.cancel();
    if let Some(task) = simulator {
        let _ = task.await;
    }
    served
}

async fn load_demo_data(client: &Client) -> Result<(), PgcastError> {
    let row = client
        .query_one("SELECT count(*) FROM sessions", &[])
        .await
        .map_err(|source| PgcastError::Query {
            what: "count demo sessions",
            source,
        })?;
    let sessions: i64 = row.get(0);
    if sessions > 0 {
        return Ok(());
    }
    let q = |what: &'static str| move |source| PgcastError::Query { what, source };
    client
        .execute(
            "INSERT INTO sessions (id, customer_id, kind) VALUES ($1, $2, 'paid')",
            &[&DEMO_SESSION, &DEMO_CUSTOMER],
        )
        .await
        .map_err(q("insert the demo session"))?;
    insert_assignment(client, DEMO_SESSION, None, false).await?;
    // A few open assignments so the queue is not empty at first sight.
    for (i, workshop) in [None, Some(0), Some(1), None, Some(0)]
        .into_iter()
        .enumerate()
    {
        let session = Uuid::new_v4();
        client
            .execute(
                "INSERT INTO sessions (id, customer_id, kind) VALUES ($1, gen_random_uuid(), 'free')",
                &[&session],
            )
            .await
            .map_err(q("insert a demo session"))?;
        insert_assignment(client, session, workshop.map(|w| WORKSHOPS[w].0), i == 1).await?;
    }
    // One offered directly to the demo mechanic.
    let session = Uuid::new_v4();
    client
        .execute(
            "INSERT INTO sessions (id, customer_id, kind) VALUES ($1, gen_random_uuid(), 'paid')",
            &[&session],
        )
        .await
        .map_err(q("insert a demo session"))?;
    client
        .execute(
            "INSERT INTO session_assignments (session_id, mechanic_id, workshop_id, status,
                customer_name, vehicle_summary, concern)
             VALUES ($1, $2, $3, 'offered', 'Kofi Mensah', '2015 Audi A4 Avant', 'Oil leak under the engine.')",
            &[&session, &MECHANICS[0].0, &WORKSHOPS[0].0],
        )
        .await
        .map_err(q("insert a direct offer"))?;
    Ok(())
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
    client
        .execute(
            "INSERT INTO session_assignments (session_id, workshop_id, status, urgent,
                customer_name, vehicle_summary, concern)
             VALUES ($1, $2, 'queued', $3, $4, $5, $6)",
            &[&session, &workshop, &urgent, &name, &vehicle, &concern],
        )
        .await
        .map_err(|source| PgcastError::Query {
            what: "insert an assignment",
            source,
        })?;
    Ok(())
}

/// One step of a realistic lifecycle: queued → accepted → completed, some cancelled or expired.
/// Each step is one plain SQL statement, so one event.
async fn simulate(
    config: &tokio_postgres::Config,
    rate: f64,
    stop: CancellationToken,
) -> Result<(), PgcastError> {
    let client = crate::db::connect_config(config, "pgcast-demo-simulator").await?;
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
    let q = |what: &'static str| move |source| PgcastError::Query { what, source };
    let open: i64 = client
        .query_one(
            "SELECT count(*) FROM session_assignments WHERE status IN ('queued', 'offered')",
            &[],
        )
        .await
        .map_err(q("count open assignments"))?
        .get(0);
    let (roll, mechanic, workshop, urgent) = {
        let mut rng = rand::rng();
        let (m, _) = MECHANICS[rng.random_range(0..MECHANICS.len())];
        let w = match rng.random_range(0..5) {
            0..=1 => None,
            n => Some(WORKSHOPS[n - 2].0),
        };
        (rng.random_range(0..100u32), m, w, rng.random_bool(0.15))
    };
    let changed = match roll {
        0..=39 if open < MAX_OPEN => {
            // The demo customer's session gets a new request whenever its last one is over.
            let demo_idle: bool = client
                .query_one(
                    "SELECT NOT EXISTS (SELECT 1 FROM session_assignments WHERE session_id = $1
                        AND status IN ('queued', 'offered', 'accepted'))",
                    &[&DEMO_SESSION],
                )
                .await
                .map_err(q("check the demo session"))?
                .get(0);
            let session = if demo_idle && roll < 10 {
                DEMO_SESSION
            } else {
                let s = Uuid::new_v4();
                client
                    .execute(
                        "INSERT INTO sessions (id, customer_id, kind) VALUES ($1, gen_random_uuid(), 'free')",
                        &[&s],
                    )
                    .await
                    .map_err(q("insert a session"))?;
                s
            };
            insert_assignment(client, session, workshop, urgent).await?;
            1
        }
        0..=69 => client
            .execute(
                "UPDATE session_assignments SET status = 'accepted', mechanic_id = $1, updated_at = now()
                 WHERE id = (SELECT id FROM session_assignments WHERE status = 'queued'
                             ORDER BY created_at LIMIT 1 FOR UPDATE SKIP LOCKED)",
                &[&mechanic],
            )
            .await
            .map_err(q("accept an assignment"))?,
        70..=89 => client
            .execute(
                "UPDATE session_assignments SET status = 'completed', updated_at = now()
                 WHERE id = (SELECT id FROM session_assignments WHERE status = 'accepted'
                             ORDER BY updated_at LIMIT 1 FOR UPDATE SKIP LOCKED)",
                &[],
            )
            .await
            .map_err(q("complete an assignment"))?,
        90..=94 => client
            .execute(
                "UPDATE session_assignments SET status = 'cancelled', updated_at = now()
                 WHERE id = (SELECT id FROM session_assignments WHERE status = 'queued'
                             AND session_id <> $1 ORDER BY random() LIMIT 1 FOR UPDATE SKIP LOCKED)",
                &[&DEMO_SESSION],
            )
            .await
            .map_err(q("cancel an assignment"))?,
        _ => client
            .execute(
                "UPDATE session_assignments SET status = 'expired', updated_at = now()
                 WHERE id = (SELECT id FROM session_assignments WHERE status = 'queued'
                             AND session_id <> $1 AND created_at < now() - interval '30 seconds'
                             ORDER BY created_at LIMIT 1 FOR UPDATE SKIP LOCKED)",
                &[&DEMO_SESSION],
            )
            .await
            .map_err(q("expire an assignment"))?,
    };
    if changed == 0 && open < MAX_OPEN {
        // Nothing to move forward: queue something new instead, so every step is one event.
        insert_assignment(client, Uuid::new_v4(), workshop, urgent).await?;
    }
    Ok(())
}
