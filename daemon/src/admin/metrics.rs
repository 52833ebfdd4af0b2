//! The admin socket's request counter.

use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family},
};

use super::registry::Outcome;
use crate::metrics::Metrics;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct AdminLabels {
    module: String,
    action: String,
    outcome: String,
}

/// `phantom_admin_requests` by module, action and outcome.
#[derive(Clone, Debug, Default)]
pub struct AdminMetrics {
    requests: Family<AdminLabels, Counter>,
}

impl AdminMetrics {
    /// Creates the counter and registers it.
    pub fn register(metrics: &mut Metrics) -> Self {
        let this = Self::default();
        metrics.register(
            "phantom_admin_requests",
            "Admin socket requests by module, action and outcome (unknown targets are module=\"unknown\")",
            this.requests.clone(),
        );
        this
    }

    /// Counts one admin request. Labels only ever carry registered names, so a client
    /// cannot create series at will.
    pub fn record(&self, outcome: Outcome) {
        let (module, action) = outcome.target.unwrap_or(("unknown", "unknown"));
        self.requests
            .get_or_create(&AdminLabels {
                module: module.into(),
                action: action.into(),
                outcome: if outcome.success { "success" } else { "error" }.into(),
            })
            .inc();
    }

    /// Pre-creates the success series of every action so dashboards see zeros, not gaps.
    pub fn register_actions(&self, actions: &[(&'static str, &'static str)]) {
        for (module, action) in actions {
            let _ = self.requests.get_or_create(&AdminLabels {
                module: (*module).into(),
                action: (*action).into(),
                outcome: "success".into(),
            });
        }
    }
}
