//! results.md and results.json: the machine, the performance targets (bench/README.md) with their measured
//! values, one section per scenario, and where the CPU went.

use std::path::Path;

use anyhow::{Context, Result};
use serde::Serialize;

use crate::clients::ReaderReport;
use crate::env::Machine;
use crate::stats::CpuUse;

/// One performance target (bench/README.md) and what this run measured.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct Check {
    pub(crate) target: String,
    pub(crate) measured: String,
    /// `None`: not measured in this run (or not comparable).
    pub(crate) met: Option<bool>,
}

impl Check {
    pub(crate) fn new(target: &str, measured: String, met: Option<bool>) -> Check {
        Check {
            target: target.to_owned(),
            measured,
            met,
        }
    }
}

/// The outcome of one scenario.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct Section {
    pub(crate) key: String,
    pub(crate) title: String,
    #[serde(skip)]
    pub(crate) markdown: String,
    pub(crate) data: serde_json::Value,
    pub(crate) targets: Vec<Check>,
    /// CPU split of each measured phase, for the profile table.
    pub(crate) cpu: Vec<(String, CpuUse)>,
}

/// Everything written so far.
#[derive(Debug, Serialize)]
pub(crate) struct Results {
    pub(crate) machine: Machine,
    pub(crate) command: String,
    pub(crate) quick: bool,
    pub(crate) note: Option<String>,
    pub(crate) bench_threads: usize,
    pub(crate) sections: Vec<Section>,
    pub(crate) error: Option<String>,
}

impl Results {
    pub(crate) fn write(&self, dir: &Path) -> Result<()> {
        std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
        let json = serde_json::to_string_pretty(self)?;
        std::fs::write(dir.join("results.json"), json + "\n")?;
        let notes = std::fs::read_to_string(dir.join("profile-notes.md")).ok();
        std::fs::write(dir.join("results.md"), self.markdown(notes.as_deref()))?;
        Ok(())
    }

    fn markdown(&self, notes: Option<&str>) -> String {
        let m = &self.machine;
        let mut md = String::from("# pgcast benchmark results\n\n");
        md += "Written by `pgcast-bench` (crates/pgcast-bench); do not edit by hand. ";
        md += "Reproduce with:\n\n```sh\n";
        md += "cargo build --release --workspace\n";
        md += &format!("{}\n```\n\n", self.command);
        if self.quick {
            md += "> **Quick run** (`--quick`): small sizes for development; the figures are not comparable with the targets.\n\n";
        }
        if let Some(note) = &self.note {
            md += &format!("> **Note:** {note}\n\n");
        }
        if let Some(e) = &self.error {
            md += &format!("> **The run did not complete:** {e}\n\n");
        }
        md += "## Machine\n\n";
        md += &table(
            &["", ""],
            vec![
                row(["cores (nproc)", &m.cores.to_string()]),
                row(["CPU", &m.cpu_model]),
                row(["memory", &format!("{} GiB", m.memory_gib)]),
                row(["kernel", &m.kernel]),
                row(["PostgreSQL", &m.postgres]),
                row(["date", &m.date]),
                row([
                    "git commit",
                    &format!(
                        "{}{}",
                        m.git_commit,
                        if m.git_dirty {
                            " (with uncommitted changes)"
                        } else {
                            ""
                        }
                    ),
                ]),
                row(["load average at start", &m.load_average_at_start]),
                row([
                    "fd limit (soft/hard)",
                    &format!("{}/{}", m.fd_limit_soft, m.fd_limit_hard),
                ]),
                row([
                    "load generator",
                    &format!(
                        "{} tokio worker threads, in the same machine",
                        self.bench_threads
                    ),
                ]),
            ],
        );
        md += "\nEverything (PostgreSQL, pgcast, the load generator) runs on this one machine over loopback, so the cores are shared by all three.\n\n";

        md += "## Targets\n\n";
        let mut rows = Vec::new();
        for s in &self.sections {
            for c in &s.targets {
                let verdict = match c.met {
                    Some(true) => "met",
                    Some(false) => "**not met**",
                    None => "n/a",
                };
                rows.push(vec![
                    s.title.clone(),
                    c.target.clone(),
                    c.measured.clone(),
                    verdict.into(),
                ]);
            }
        }
        md += &table(&["scenario", "target", "measured", ""], rows);
        md += "\n";
        for s in &self.sections {
            md += &format!("## {}\n\n{}\n", s.title, s.markdown);
        }

        md += "## Where the CPU went\n\n";
        md += "Cores used during each measured phase (1.0 = one core busy), read from `/proc`: the load generator (this process), pgcast, PostgreSQL (postmaster and backends), a compared server, the whole machine, and the rest (other work on the machine).\n\n";
        let mut rows = Vec::new();
        for s in &self.sections {
            for (phase, c) in &s.cpu {
                rows.push(vec![
                    format!("{} — {phase}", s.title),
                    format!("{:.2}", c.bench_cores),
                    opt(c.pgcast_cores),
                    opt(c.postgres_cores),
                    opt(c.other_server_cores),
                    opt(c.machine_busy_cores),
                    opt(c.other_processes_cores),
                ]);
            }
        }
        md += &table(
            &[
                "phase",
                "bench",
                "pgcast",
                "postgres",
                "compared server",
                "machine busy",
                "other processes",
            ],
            rows,
        );
        if let Some(notes) = notes {
            md += "\n## Profile notes\n\n";
            md += notes.trim();
            md += "\n";
        }
        md
    }
}

fn opt(v: Option<f64>) -> String {
    v.map_or("–".into(), |v| format!("{v:.2}"))
}

fn row<const N: usize>(cells: [&str; N]) -> Vec<String> {
    cells.iter().map(|c| (*c).to_owned()).collect()
}

/// A Markdown table.
pub(crate) fn table(headers: &[&str], rows: Vec<Vec<String>>) -> String {
    let mut t = format!("| {} |\n", headers.join(" | "));
    t += &format!("|{}\n", "---|".repeat(headers.len()));
    for r in rows {
        let cells: Vec<String> = r.iter().map(|c| c.replace('|', "\\|")).collect();
        t += &format!("| {} |\n", cells.join(" | "));
    }
    t
}

/// 1234567 → "1,234,567".
pub(crate) fn int(v: u64) -> String {
    let mut rev = String::new();
    for (k, ch) in v.to_string().chars().rev().enumerate() {
        if k > 0 && k % 3 == 0 {
            rev.push(',');
        }
        rev.push(ch);
    }
    rev.chars().rev().collect()
}

pub(crate) fn ms(v: f64) -> String {
    if v >= 100.0 {
        format!("{v:.0}")
    } else if v >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

/// Header and row of the standard reader table.
pub(crate) const READER_HEADERS: [&str; 12] = [
    "reader",
    "connections",
    "received / expected",
    "lost",
    "unexpected",
    "dup",
    "p50 ms",
    "p90 ms",
    "p99 ms",
    "max ms",
    "delivered/s",
    "ended early",
];

pub(crate) fn reader_row(name: &str, r: &ReaderReport) -> Vec<String> {
    vec![
        name.to_owned(),
        format!("{}/{}", int(r.connected as u64), int(r.connections as u64)),
        format!("{} / {}", int(r.received), int(r.expected)),
        int(r.lost),
        int(r.unexpected),
        int(r.duplicates),
        ms(r.latency.p50_ms),
        ms(r.latency.p90_ms),
        ms(r.latency.p99_ms),
        ms(r.latency.max_ms),
        int(r.delivered_per_s as u64),
        int(r.ended_early as u64),
    ]
}

pub(crate) fn cpu_line(c: &CpuUse) -> String {
    format!(
        "CPU (cores): bench {:.2}, pgcast {}, postgres {}, compared server {}, machine busy {} of the cores, other processes {}.",
        c.bench_cores,
        opt(c.pgcast_cores),
        opt(c.postgres_cores),
        opt(c.other_server_cores),
        opt(c.machine_busy_cores),
        opt(c.other_processes_cores)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_read_well() {
        assert_eq!(int(0), "0");
        assert_eq!(int(999), "999");
        assert_eq!(int(1_000), "1,000");
        assert_eq!(int(1_234_567), "1,234,567");
        assert_eq!(ms(1.234), "1.23");
        assert_eq!(ms(12.34), "12.3");
        assert_eq!(ms(123.4), "123");
    }
}
