//! Measurement primitives: the process-wide clock, a log-linear latency histogram, a bit set of
//! received sequence numbers, and CPU/memory readings from `/proc`.

use std::sync::OnceLock;
use std::time::Instant;

use serde::Serialize;

/// Microseconds since the benchmark started, on the monotonic clock. Writers stamp rows with
/// it and readers subtract it from their receipt time: same process, same clock.
pub(crate) fn now_us() -> u64 {
    static START: OnceLock<Instant> = OnceLock::new();
    START.get_or_init(Instant::now).elapsed().as_micros() as u64
}

/// Sub-buckets per power of two: values are kept with a relative error below 1/64 (1.6 %).
const SUB_BITS: u32 = 6;
const SUB: u64 = 1 << SUB_BITS;
/// Largest value kept exactly (below it every microsecond has its own bucket).
const LINEAR: u64 = SUB << 1;
/// Values are clamped to 2^36 µs (19 hours).
const MAX_VALUE: u64 = (1 << 36) - 1;

/// A latency histogram in microseconds: exact below 128 µs, then 64 buckets per power of two.
#[derive(Debug, Clone)]
pub(crate) struct Histogram {
    counts: Vec<u64>,
    total: u64,
    max: u64,
    sum: u128,
}

impl Default for Histogram {
    fn default() -> Self {
        Histogram {
            counts: vec![0; bucket_index(MAX_VALUE) + 1],
            total: 0,
            max: 0,
            sum: 0,
        }
    }
}

fn bucket_index(v: u64) -> usize {
    let v = v.min(MAX_VALUE);
    if v < LINEAR {
        return v as usize;
    }
    let msb = 63 - v.leading_zeros();
    let shift = msb - SUB_BITS;
    ((u64::from(shift) << SUB_BITS) + (v >> shift)) as usize
}

/// The largest value that falls in bucket `i` (percentiles err on the high side).
fn bucket_high(i: usize) -> u64 {
    let i = i as u64;
    if i < LINEAR {
        return i;
    }
    let shift = (i >> SUB_BITS) - 1;
    let mantissa = i - (shift << SUB_BITS);
    ((mantissa + 1) << shift) - 1
}

impl Histogram {
    pub(crate) fn record(&mut self, v: u64) {
        self.counts[bucket_index(v)] += 1;
        self.total += 1;
        self.max = self.max.max(v);
        self.sum += u128::from(v);
    }

    pub(crate) fn merge(&mut self, other: &Histogram) {
        for (a, b) in self.counts.iter_mut().zip(&other.counts) {
            *a += b;
        }
        self.total += other.total;
        self.max = self.max.max(other.max);
        self.sum += other.sum;
    }

    #[cfg(test)]
    pub(crate) fn count(&self) -> u64 {
        self.total
    }

    /// The value at quantile `q` (0..=1): the smallest bucket bound with at least
    /// `ceil(q * total)` values at or below it; never above the exact maximum.
    pub(crate) fn quantile(&self, q: f64) -> u64 {
        if self.total == 0 {
            return 0;
        }
        let rank = ((q * self.total as f64).ceil() as u64).clamp(1, self.total);
        let mut seen = 0;
        for (i, c) in self.counts.iter().enumerate() {
            seen += c;
            if seen >= rank {
                return bucket_high(i).min(self.max);
            }
        }
        self.max
    }

    /// The summary written to the results, in milliseconds.
    pub(crate) fn summary(&self) -> Percentiles {
        let ms = |us: u64| (us as f64 / 1000.0 * 1000.0).round() / 1000.0;
        Percentiles {
            samples: self.total,
            p50_ms: ms(self.quantile(0.50)),
            p90_ms: ms(self.quantile(0.90)),
            p99_ms: ms(self.quantile(0.99)),
            p999_ms: ms(self.quantile(0.999)),
            max_ms: ms(self.max),
            mean_ms: if self.total == 0 {
                0.0
            } else {
                ms((self.sum / u128::from(self.total)) as u64)
            },
        }
    }
}

/// Latency percentiles in milliseconds.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub(crate) struct Percentiles {
    pub(crate) samples: u64,
    pub(crate) p50_ms: f64,
    pub(crate) p90_ms: f64,
    pub(crate) p99_ms: f64,
    pub(crate) p999_ms: f64,
    pub(crate) max_ms: f64,
    pub(crate) mean_ms: f64,
}

/// Sequence numbers seen by one reader, to count each event once and spot duplicates.
#[derive(Debug, Default, Clone)]
pub(crate) struct Seen {
    words: Vec<u64>,
}

/// Sequence numbers above this are not tracked (a stray marker must not allocate gigabytes).
pub(crate) const MAX_SEQ: u64 = 1 << 32;

impl Seen {
    /// Marks `seq`; false if it was already marked.
    pub(crate) fn insert(&mut self, seq: u64) -> bool {
        let word = (seq / 64) as usize;
        if word >= self.words.len() {
            self.words.resize((word + 1).max(self.words.len() * 2), 0);
        }
        let bit = 1u64 << (seq % 64);
        let new = self.words[word] & bit == 0;
        self.words[word] |= bit;
        new
    }

    /// Every marked sequence number, ascending.
    pub(crate) fn iter(&self) -> impl Iterator<Item = u64> + '_ {
        self.words.iter().enumerate().flat_map(|(i, &w)| {
            (0..64)
                .filter(move |b| w & (1 << b) != 0)
                .map(move |b| i as u64 * 64 + b)
        })
    }
}

/// CPU time of one process in clock ticks: its own, and that of its waited-for children.
fn proc_ticks(pid: u32) -> Option<(u64, u64, u32)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may contain spaces and parentheses: fields start after the last ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let n = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok());
    let ppid = f.get(1)?.parse().ok()?;
    Some((n(11)? + n(12)?, n(13)? + n(14)?, ppid))
}

/// Clock ticks per second of `/proc` CPU times (`getconf CLK_TCK`; 100 on Linux).
pub(crate) fn clock_ticks() -> f64 {
    static TICKS: OnceLock<f64> = OnceLock::new();
    *TICKS.get_or_init(|| {
        std::process::Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8(o.stdout).ok())
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(100.0)
    })
}

/// CPU seconds of a process and, with `tree`, of all its live children plus the ones it has
/// reaped (how a postmaster accounts for its backends).
pub(crate) fn cpu_seconds(pid: u32, tree: bool) -> Option<f64> {
    let (own, reaped, _) = proc_ticks(pid)?;
    let mut ticks = own;
    if tree {
        ticks += reaped;
        if let Ok(dir) = std::fs::read_dir("/proc") {
            for entry in dir.flatten() {
                let Some(child) = entry.file_name().to_str().and_then(|s| s.parse().ok()) else {
                    continue;
                };
                if let Some((t, _, ppid)) = proc_ticks(child) {
                    if ppid == pid {
                        ticks += t;
                    }
                }
            }
        }
    }
    Some(ticks as f64 / clock_ticks())
}

/// Busy CPU seconds of the whole machine (all cores), from `/proc/stat`.
pub(crate) fn machine_busy_seconds() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let line = stat.lines().next()?;
    let v: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal …: busy = all but idle and iowait.
    let total: u64 = v.iter().take(8).sum();
    let idle = v.get(3)? + v.get(4).copied().unwrap_or(0);
    Some((total - idle) as f64 / clock_ticks())
}

/// Resident memory of a process in KiB (`VmRSS`).
pub(crate) fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
}

/// Which processes a CPU reading covers.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Pids {
    pub(crate) pgcast: Option<u32>,
    pub(crate) postmaster: Option<u32>,
    pub(crate) other_server: Option<u32>,
}

/// One reading of every CPU counter.
#[derive(Debug, Clone, Copy)]
pub(crate) struct CpuSample {
    at: Instant,
    bench: f64,
    pgcast: Option<f64>,
    postgres: Option<f64>,
    other: Option<f64>,
    machine: Option<f64>,
}

impl CpuSample {
    pub(crate) fn take(pids: Pids) -> Self {
        CpuSample {
            at: Instant::now(),
            bench: cpu_seconds(std::process::id(), false).unwrap_or(0.0),
            pgcast: pids.pgcast.and_then(|p| cpu_seconds(p, false)),
            postgres: pids.postmaster.and_then(|p| cpu_seconds(p, true)),
            other: pids.other_server.and_then(|p| cpu_seconds(p, false)),
            machine: machine_busy_seconds(),
        }
    }

    /// Cores used by each party between `self` and `later`.
    pub(crate) fn until(&self, later: &CpuSample) -> CpuUse {
        let wall = later.at.duration_since(self.at).as_secs_f64().max(1e-9);
        let cores = |a: Option<f64>, b: Option<f64>| match (a, b) {
            (Some(a), Some(b)) => Some(round3((b - a) / wall)),
            _ => None,
        };
        let bench = round3((later.bench - self.bench) / wall);
        let pgcast = cores(self.pgcast, later.pgcast);
        let postgres = cores(self.postgres, later.postgres);
        let other_server = cores(self.other, later.other);
        // /proc/stat idle accounting can lag on an idle (tickless) CPU: never report less
        // than what the processes we know of used.
        let known =
            bench + pgcast.unwrap_or(0.0) + postgres.unwrap_or(0.0) + other_server.unwrap_or(0.0);
        let machine = cores(self.machine, later.machine).map(|m| m.max(round3(known)));
        let others = machine.map(|m| {
            round3(
                (m - bench
                    - pgcast.unwrap_or(0.0)
                    - postgres.unwrap_or(0.0)
                    - other_server.unwrap_or(0.0))
                .max(0.0),
            )
        });
        CpuUse {
            wall_s: round3(wall),
            bench_cores: bench,
            pgcast_cores: pgcast,
            postgres_cores: postgres,
            other_server_cores: other_server,
            machine_busy_cores: machine,
            other_processes_cores: others,
        }
    }
}

/// CPU use over a measurement window, in cores (1.0 = one core fully busy).
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub(crate) struct CpuUse {
    pub(crate) wall_s: f64,
    /// The load generator itself (this process: writers, readers, bookkeeping).
    pub(crate) bench_cores: f64,
    pub(crate) pgcast_cores: Option<f64>,
    /// The postmaster and all its backends.
    pub(crate) postgres_cores: Option<f64>,
    /// A compared server (the Node relay).
    pub(crate) other_server_cores: Option<f64>,
    pub(crate) machine_busy_cores: Option<f64>,
    /// Busy time not accounted to the processes above: other work on a shared machine.
    pub(crate) other_processes_cores: Option<f64>,
}

pub(crate) fn round3(v: f64) -> f64 {
    (v * 1000.0).round() / 1000.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_contiguous_and_bounded() {
        let mut prev = 0;
        for v in 0..1_000_000u64 {
            let i = bucket_index(v);
            assert!(i == prev || i == prev + 1, "gap at {v}");
            prev = i;
            let high = bucket_high(i);
            assert!(high >= v, "{v} above its bucket's bound {high}");
            assert!(high - v <= v / 64 + 1, "{v}: bound {high} too coarse");
        }
    }

    #[test]
    fn percentiles_of_known_data() {
        let mut h = Histogram::default();
        assert_eq!(h.quantile(0.5), 0);
        for v in 1..=100 {
            h.record(v);
        }
        assert_eq!(h.quantile(0.5), 50);
        assert_eq!(h.quantile(0.99), 99);
        assert_eq!(h.quantile(1.0), 100);
        let mut big = Histogram::default();
        for _ in 0..99 {
            big.record(1_000);
        }
        big.record(2_000_000);
        let p99 = big.quantile(0.99);
        assert!((1_000..=1_016).contains(&p99), "{p99}");
        assert_eq!(big.quantile(0.999), 2_000_000);
        h.merge(&big);
        assert_eq!(h.count(), 200);
        let s = big.summary();
        assert_eq!(s.max_ms, 2000.0);
        assert!((s.p50_ms - 1.0).abs() < 0.02, "{s:?}");
    }

    #[test]
    fn seen_counts_each_sequence_once() {
        let mut s = Seen::default();
        assert!(s.insert(3));
        assert!(s.insert(700));
        assert!(!s.insert(3));
        assert_eq!(s.iter().collect::<Vec<_>>(), vec![3, 700]);
    }
}
