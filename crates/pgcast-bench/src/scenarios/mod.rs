//! The scenarios, one module each, and the order they run in. Each returns a [`Section`] for
//! the results; what they share (the context, opening subscribers, running a measured load)
//! is in [`context`], written once.
//!
//! | module | measures |
//! |---|---|
//! | [`latency`] | INSERT commit → frame, mechanics on `queue`, beside a bare LISTEN |
//! | [`ceiling`] | delivered ÷ committed with writers as fast as the database commits |
//! | [`fanout`] | deliveries/s to every connection, and CPU per delivery against the floor |
//! | [`memory`] | pgcast's resident memory per idle authenticated connection |
//! | [`catchup`] | a client resuming far behind with `since` |
//! | [`overhead`] | what the gateway adds to a bare LISTEN on the same load |
//! | [`raw`] | the ceiling and fan-out loads against other servers |
//! | [`storm`] | pgcast SIGKILLed and restarted; every mechanic resumes |
//! | [`writes`] | commit rate with no trigger, a bare NOTIFY trigger, pgcast's trigger |

mod catchup;
mod ceiling;
mod context;
mod fanout;
mod latency;
mod memory;
mod overhead;
mod raw;
mod storm;
mod writes;

use anyhow::{bail, Result};

use crate::cli::Scenario;
use crate::report::Section;

pub(crate) use self::context::Ctx;

/// Every scenario in the order of a full run. The storm kills the pgcast the others use and
/// leaves a restarted one; `writes` needs no subscriber, so it may come after it.
pub(crate) const ORDER: [Scenario; 9] = [
    Scenario::Latency,
    Scenario::Ceiling,
    Scenario::Fanout,
    Scenario::Memory,
    Scenario::Catchup,
    Scenario::Overhead,
    Scenario::Raw,
    Scenario::Storm,
    Scenario::Writes,
];

impl Scenario {
    /// The name progress lines and the key of a failed section use.
    pub(crate) fn name(self) -> &'static str {
        match self {
            Scenario::All => "all",
            Scenario::Latency => "latency",
            Scenario::Ceiling => "ceiling",
            Scenario::Fanout => "fan-out",
            Scenario::Memory => "memory",
            Scenario::Catchup => "catch-up",
            Scenario::Overhead => "overhead",
            Scenario::Raw => "other servers",
            Scenario::Storm => "reconnect storm",
            Scenario::Writes => "write cost",
        }
    }

    /// Runs this scenario.
    pub(crate) async fn run(self, ctx: &mut Ctx) -> Result<Section> {
        match self {
            Scenario::All => bail!("`all` names every scenario, it is not one"),
            Scenario::Latency => latency::run(ctx).await,
            Scenario::Ceiling => ceiling::run(ctx).await,
            Scenario::Fanout => fanout::run(ctx).await,
            Scenario::Memory => memory::run(ctx).await,
            Scenario::Catchup => catchup::run(ctx).await,
            Scenario::Overhead => overhead::run(ctx).await,
            Scenario::Raw => raw::run(ctx).await,
            Scenario::Storm => storm::run(ctx).await,
            Scenario::Writes => writes::run(ctx).await,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::ValueEnum;

    #[test]
    fn every_scenario_runs_once_storm_before_writes() {
        for s in Scenario::value_variants() {
            let n = ORDER.iter().filter(|o| *o == s).count();
            assert_eq!(n, usize::from(*s != Scenario::All), "{s:?}");
        }
        let at = |s| ORDER.iter().position(|o| *o == s);
        assert!(at(Scenario::Storm) < at(Scenario::Writes));
    }
}
