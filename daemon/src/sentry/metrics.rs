//! Prometheus series of the sentry, read at scrape time.

use std::sync::{Arc, atomic::Ordering};

use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeMetric},
    metrics::{counter::ConstCounter, gauge::ConstGauge},
};

use super::{
    Mode, PASS_NAMES, Sentry,
    challenge::{Authenticated, Rejection},
};
use crate::metrics::{counter_family, gauge, gauge_family};

pub struct SentryCollector {
    pub sentry: Arc<Sentry>,
}

impl std::fmt::Debug for SentryCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SentryCollector")
    }
}

fn counter(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    value: u64,
) -> Result<(), std::fmt::Error> {
    let c = ConstCounter::new(value);
    let metric = encoder.encode_descriptor(name, help, None, c.metric_type())?;
    c.encode(metric)
}

fn float_gauge(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    value: f64,
) -> Result<(), std::fmt::Error> {
    let g = ConstGauge::new(value);
    let metric = encoder.encode_descriptor(name, help, None, g.metric_type())?;
    g.encode(metric)
}

impl Collector for SentryCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let s = &self.sentry;
        let load = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
        let mode = s.mode_state().current_mode;
        gauge_family(
            &mut encoder,
            "phantom_sentry_mode",
            "1 for the current defence mode",
            Mode::ALL
                .iter()
                .map(|m| (vec![("mode", m.name().to_string())], i64::from(*m == mode))),
        )?;
        gauge(
            &mut encoder,
            "phantom_sentry_global_rate",
            "Requests in the current (or last complete) second",
            s.detector.current_rate() as i64,
        )?;
        let snap = s.detector.snapshot();
        float_gauge(
            &mut encoder,
            "phantom_sentry_rate_mean",
            "Mean requests/s over the last 300 s",
            snap.mean,
        )?;
        float_gauge(
            &mut encoder,
            "phantom_sentry_rate_std_dev",
            "Standard deviation of requests/s over the last 300 s",
            snap.std_dev,
        )?;
        float_gauge(
            &mut encoder,
            "phantom_sentry_dynamic_threshold",
            "mean + std_dev * sensitivity_factor (-1 while learning)",
            snap.threshold.unwrap_or(-1.0),
        )?;
        float_gauge(
            &mut encoder,
            "phantom_sentry_cpu_percent",
            "Host CPU busy % seen by the activation gate",
            s.detector.cpu_percent(),
        )?;
        let c = &s.counters;
        let mut requests: Vec<(Vec<(&'static str, String)>, u64)> = PASS_NAMES
            .iter()
            .enumerate()
            .map(|(i, n)| (vec![("outcome", n.to_string())], load(&c.passed[i])))
            .collect();
        requests.push((vec![("outcome", "challenged".into())], load(&c.challenged)));
        requests.push((vec![("outcome", "blocked".into())], load(&c.blocked)));
        requests.push((
            vec![("outcome", "unavailable".into())],
            load(&c.unavailable),
        ));
        counter_family(
            &mut encoder,
            "phantom_sentry_requests",
            "Proxied requests by outcome",
            requests.into_iter(),
        )?;
        counter_family(
            &mut encoder,
            "phantom_sentry_good_bot_passes",
            "Requests of a good bot (user agent and address matched) let through instead of a challenge, by bot",
            s.good_bots
                .passes()
                .into_iter()
                .map(|(name, n)| (vec![("bot", name.to_string())], n)),
        )?;
        counter(
            &mut encoder,
            "phantom_sentry_challenges_issued",
            "Challenges served with HTTP 429",
            load(&c.challenged),
        )?;
        counter(
            &mut encoder,
            "phantom_sentry_challenges_solved",
            "Proofs accepted",
            load(&c.solved),
        )?;
        counter(
            &mut encoder,
            "phantom_sentry_delays_redeemed",
            "Delay tokens redeemed by browsers without JavaScript",
            load(&c.delays_redeemed),
        )?;
        counter_family(
            &mut encoder,
            "phantom_sentry_challenges_failed",
            "Proofs refused, by reason",
            Rejection::ALL.iter().map(|r| {
                (
                    vec![("reason", r.code().to_string())],
                    load(&c.failed[super::rejection_index(*r)]),
                )
            }),
        )?;
        counter(
            &mut encoder,
            "phantom_sentry_forged_cookies",
            "Ticket cookies whose signature did not verify (each held against its source)",
            load(&c.forged_cookies),
        )?;
        counter(
            &mut encoder,
            "phantom_sentry_tickets_revoked",
            "Tickets taken away from holders past the ticket ceiling",
            load(&c.tickets_revoked),
        )?;
        counter_family(
            &mut encoder,
            "phantom_sentry_proofs_authenticated",
            "Proofs whose package was found authentic, by how: issued_here (this host's memory), fleet_record (the shared store's record), signature (ECDSA)",
            Authenticated::ALL.iter().map(|a| {
                (
                    vec![("by", a.name().to_string())],
                    load(&c.authenticated[super::authenticated_index(*a)]),
                )
            }),
        )?;
        counter(
            &mut encoder,
            "phantom_sentry_tickets_issued",
            "Trust tickets granted",
            load(&c.tickets),
        )?;
        counter(
            &mut encoder,
            "phantom_sentry_penalties",
            "Penalty box raises",
            load(&c.penalties),
        )?;
        counter(
            &mut encoder,
            "phantom_sentry_hard_blocks",
            "Sources put into the kernel deny map",
            load(&c.hard_blocks),
        )?;
        counter(
            &mut encoder,
            "phantom_sentry_upstream_errors",
            "Requests the upstream did not answer",
            load(&c.upstream_errors),
        )?;
        counter(
            &mut encoder,
            "phantom_sentry_store_errors",
            "Failed store calls",
            load(&c.store_errors),
        )?;
        gauge_family(
            &mut encoder,
            "phantom_sentry_store_up",
            "1 while the state store answers (0 = degraded)",
            std::iter::once((
                vec![("backend", s.store.backend().to_string())],
                i64::from(s.healthy()),
            )),
        )?;
        gauge(
            &mut encoder,
            "phantom_sentry_tickets_live",
            "Trust tickets this host knows to be live",
            s.tickets_cached() as i64,
        )?;
        gauge(
            &mut encoder,
            "phantom_sentry_whitelist_size",
            "Whitelisted sources (an IPv6 address stands for its prefix)",
            s.whitelist_local().len() as i64,
        )
    }
}
