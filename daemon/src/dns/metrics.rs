//! The resolver's collector: queries by transport, outcomes, cache size and policy.

use std::sync::{Arc, atomic::Ordering};

use prometheus_client::{collector::Collector, encoding::DescriptorEncoder};

use super::Resolver;
use crate::metrics::{counter_family, gauge};

/// The resolver's totals.
pub struct ResolverCollector {
    pub resolver: Arc<Resolver>,
}

impl std::fmt::Debug for ResolverCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ResolverCollector")
    }
}

impl Collector for ResolverCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let r = &self.resolver;
        let st = &r.stats;
        let n = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
        counter_family(
            &mut encoder,
            "phantom_dns_queries",
            "Queries to Phantom's resolver, by transport",
            [
                (vec![("transport", "udp".to_string())], n(&st.queries_udp)),
                (vec![("transport", "tcp".to_string())], n(&st.queries_tcp)),
            ]
            .into_iter(),
        )?;
        counter_family(
            &mut encoder,
            "phantom_dns_answers",
            "Resolver outcomes: blocked, matched but passed (dry_run, exempt client), from the cache, forwarded, failed",
            [
                ("blocked", n(&st.blocked)),
                ("dry_run", n(&st.dry_run_matches)),
                ("exempt_client", n(&st.exempt_matches)),
                ("cache_hit", n(&r.cache.hits)),
                ("forwarded", n(&st.forwarded)),
                ("upstream_failure", n(&st.upstream_failures)),
                ("malformed", n(&st.malformed)),
                ("truncated", n(&st.truncated)),
            ]
            .into_iter()
            .map(|(o, v)| (vec![("outcome", o.to_string())], v)),
        )?;
        counter_family(
            &mut encoder,
            "phantom_dns_bypass_answers",
            "Answers that keep clients on this resolver, by reason: the Firefox DoH canary, Private Relay, DDR (answered here), ECH removed from HTTPS/SVCB answers",
            r.bypass_stats
                .by_reason()
                .into_iter()
                .map(|(reason, v)| (vec![("reason", reason.to_string())], v)),
        )?;
        counter_family(
            &mut encoder,
            "phantom_dns_stopped",
            "What each layer of the block stopped, by reason: resolver (blocked, bypass answers), kernel_answer_rewrite (answers of other resolvers rewritten to NXDOMAIN, packets), kernel_encrypted_dns (DoT, DoQ, DoH packets dropped), kernel_sni (ClientHellos with blocked names, ECH to known fronts, QUIC in strict mode)",
            r.stopped().into_iter().map(|(layer, reason, v)| {
                (
                    vec![("layer", layer.to_string()), ("reason", reason.to_string())],
                    v,
                )
            }),
        )?;
        gauge(
            &mut encoder,
            "phantom_dns_cache_entries",
            "Answers in the resolver's cache",
            r.cache.len() as i64,
        )?;
        gauge(
            &mut encoder,
            "phantom_dns_forwards_in_flight",
            "Queries waiting on an upstream now (each for at most upstream_timeout_ms per upstream)",
            i64::try_from(n(&st.forwards_in_flight)).unwrap_or(i64::MAX),
        )?;
        gauge(
            &mut encoder,
            "phantom_dns_dry_run",
            "1 while dry run is on",
            i64::from(r.policy().dry_run),
        )?;
        gauge(
            &mut encoder,
            "phantom_dns_listening",
            "Addresses the resolver listens on (UDP and TCP each)",
            r.listening().len() as i64,
        )
    }
}
