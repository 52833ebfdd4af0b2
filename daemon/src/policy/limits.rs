//! Rate limits and quotas per client: the settings (a client's own over the server's
//! `[limits]` defaults), what the kernel is given for them (`PH_CLIENT_LIMIT`), and the quota
//! periods. The kernel meters and counts (`tc_client_policy` upload, `tc_client_limit`
//! download); the daemon only starts periods, notices a used-up quota (log line, metric) and
//! keeps the usage on disk. See docs/policy.md.

use serde::{Deserialize, Serialize};
use time::{Duration, OffsetDateTime, Time};

use phantom_common::policy::{
    ClientLimit, LimitDir, QUOTA_BLOCK, QUOTA_NONE, QUOTA_THROTTLE, ns_per_byte_q16,
};

use crate::config::{LimitsConfig, MAX_BURST_KB, MAX_KBPS, MIN_KBPS};

/// How long a quota lasts before it starts again (UTC).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Period {
    Monthly,
    Weekly,
    Daily,
}

impl Period {
    pub fn parse(s: &str) -> Option<Self> {
        match s.to_ascii_lowercase().as_str() {
            "monthly" | "month" => Some(Period::Monthly),
            "weekly" | "week" => Some(Period::Weekly),
            "daily" | "day" => Some(Period::Daily),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Period::Monthly => "monthly",
            Period::Weekly => "weekly",
            Period::Daily => "daily",
        }
    }

    /// The Unix time the period holding `unix` started: the 1st of the month, Monday or
    /// midnight, 00:00 UTC.
    pub fn start(self, unix: i64) -> i64 {
        let Ok(t) = OffsetDateTime::from_unix_timestamp(unix) else {
            return 0;
        };
        let day = t.replace_time(Time::MIDNIGHT);
        let start = match self {
            Period::Daily => day,
            Period::Weekly => {
                let back = i64::from(day.weekday().number_days_from_monday());
                day - Duration::days(back)
            }
            Period::Monthly => day.replace_day(1).unwrap_or(day),
        };
        start.unix_timestamp()
    }
}

/// What a used-up quota does.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum QuotaAction {
    /// Every packet dropped until the period ends.
    Block,
    /// Held to the floor rate until the period ends.
    Throttle,
}

impl QuotaAction {
    pub fn parse(s: &str) -> Option<Self> {
        match s.to_ascii_lowercase().as_str() {
            "block" | "disable" => Some(QuotaAction::Block),
            "throttle" => Some(QuotaAction::Throttle),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            QuotaAction::Block => "block",
            QuotaAction::Throttle => "throttle",
        }
    }
}

/// A client's own settings; `None`: the server's (`[limits]`). Rates in kilobits per second,
/// the burst in KiB, the quota in MiB; 0 = none.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LimitSettings {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub download_kbps: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub upload_kbps: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub burst_kb: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub quota_mb: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub quota_period: Option<Period>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub quota_action: Option<QuotaAction>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub quota_floor_kbps: Option<u64>,
}

impl LimitSettings {
    pub fn is_empty(&self) -> bool {
        *self == Self::default()
    }

    /// `self` with every setting `other` gives replaced.
    pub fn updated(&self, other: &LimitSettings) -> LimitSettings {
        LimitSettings {
            download_kbps: other.download_kbps.or(self.download_kbps),
            upload_kbps: other.upload_kbps.or(self.upload_kbps),
            burst_kb: other.burst_kb.or(self.burst_kb),
            quota_mb: other.quota_mb.or(self.quota_mb),
            quota_period: other.quota_period.or(self.quota_period),
            quota_action: other.quota_action.or(self.quota_action),
            quota_floor_kbps: other.quota_floor_kbps.or(self.quota_floor_kbps),
        }
    }

    /// Refuses a rate outside `MIN_KBPS..=MAX_KBPS` (0 = none is fine), a burst over
    /// `MAX_BURST_KB`, a quota over 2^40 MiB.
    pub fn check(&self) -> Result<(), String> {
        for (key, v) in [
            ("download_kbps", self.download_kbps),
            ("upload_kbps", self.upload_kbps),
            ("quota_floor_kbps", self.quota_floor_kbps),
        ] {
            if let Some(v) = v
                && v != 0
                && !(MIN_KBPS..=MAX_KBPS).contains(&v)
            {
                return Err(format!(
                    "{key} must be 0 (none) or between {MIN_KBPS} and {MAX_KBPS}"
                ));
            }
        }
        if self.burst_kb.is_some_and(|b| b > MAX_BURST_KB) {
            return Err(format!("burst_kb must be at most {MAX_BURST_KB}"));
        }
        if self.quota_mb.is_some_and(|q| q > 1 << 40) {
            return Err("quota_mb is too large".into());
        }
        Ok(())
    }

    /// Every setting filled in: this client's where it has one, else `defaults`.
    pub fn over(&self, defaults: &Effective) -> Effective {
        Effective {
            download_kbps: self.download_kbps.unwrap_or(defaults.download_kbps),
            upload_kbps: self.upload_kbps.unwrap_or(defaults.upload_kbps),
            burst_kb: self.burst_kb.unwrap_or(defaults.burst_kb),
            quota_mb: self.quota_mb.unwrap_or(defaults.quota_mb),
            quota_period: self.quota_period.unwrap_or(defaults.quota_period),
            quota_action: self.quota_action.unwrap_or(defaults.quota_action),
            quota_floor_kbps: self.quota_floor_kbps.unwrap_or(defaults.quota_floor_kbps),
        }
    }
}

/// A client's settings in force.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Effective {
    pub download_kbps: u64,
    pub upload_kbps: u64,
    pub burst_kb: u64,
    pub quota_mb: u64,
    pub quota_period: Period,
    pub quota_action: QuotaAction,
    pub quota_floor_kbps: u64,
}

/// The bucket's depth when none is set: 2 s at the rate, at least 1 MiB. A TCP sender needs
/// room for its window's bursts (and a forwarded GSO packet is up to 64 KiB at once) and for
/// the time it stands still after a timeout to reach the rate through a dropping bucket: at
/// 10 Mbit/s, 64 KiB gave 3 Mbit/s, 256 KiB 9.4, 1 MiB 9.7 to 10.5; at 50 Mbit/s, 500 ms
/// gave 4.3 % less than 2 s, which came within 0.3 % of the rate (docs/policy.md).
fn auto_burst_bytes(kbps: u64) -> u64 {
    (kbps * 1000 / 8 * 2).max(1024 * 1024)
}

impl Effective {
    /// The server's defaults (`[limits]`, validated at start).
    pub fn from_config(c: &LimitsConfig) -> Self {
        Self {
            download_kbps: c.download_kbps,
            upload_kbps: c.upload_kbps,
            burst_kb: c.burst_kb,
            quota_mb: c.quota_mb,
            quota_period: Period::parse(&c.quota_period).unwrap_or(Period::Monthly),
            quota_action: QuotaAction::parse(&c.quota_action).unwrap_or(QuotaAction::Throttle),
            quota_floor_kbps: c.quota_floor_kbps,
        }
    }

    /// Whether the kernel needs an entry for the client.
    pub fn any(&self) -> bool {
        self.download_kbps != 0 || self.upload_kbps != 0 || self.quota_mb != 0
    }

    pub fn quota_bytes(&self) -> u64 {
        self.quota_mb.saturating_mul(1024 * 1024)
    }

    fn dir(&self, kbps: u64) -> LimitDir {
        let throttles = self.quota_mb != 0 && self.quota_action == QuotaAction::Throttle;
        let floor = if throttles { self.quota_floor_kbps } else { 0 };
        // The depth follows the lower of the two rates in force.
        let rate_for_burst = match (kbps, floor) {
            (0, f) => f,
            (k, 0) => k,
            (k, f) => k.min(f),
        };
        LimitDir {
            ns_per_byte_q16: ns_per_byte_q16(kbps),
            floor_ns_per_byte_q16: ns_per_byte_q16(floor),
            burst_bytes: if self.burst_kb != 0 {
                self.burst_kb * 1024
            } else {
                auto_burst_bytes(rate_for_burst)
            },
            ..LimitDir::default()
        }
    }

    /// The kernel's entry (settings only; the kernel's counters start at 0).
    pub fn kernel(&self) -> ClientLimit {
        ClientLimit {
            up: self.dir(self.upload_kbps),
            down: self.dir(self.download_kbps),
            quota_bytes: self.quota_bytes(),
            quota_action: match (self.quota_mb, self.quota_action) {
                (0, _) => QUOTA_NONE,
                (_, QuotaAction::Block) => QUOTA_BLOCK,
                (_, QuotaAction::Throttle) => QUOTA_THROTTLE,
            },
            ..ClientLimit::default()
        }
    }
}

/// A client's quota period as kept on disk: its start, the bytes used (as of the last save)
/// and whether the cap was reached (logged once).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct QuotaUsage {
    /// Unix seconds.
    pub period_start: i64,
    pub used_bytes: u64,
    pub reached: bool,
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn at(s: &str) -> i64 {
        OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339)
            .unwrap()
            .unix_timestamp()
    }

    #[test]
    fn periods_start_at_midnight_utc_on_monday_and_the_first() {
        let t = at("2026-12-03T17:45:00Z"); // a Thursday
        assert_eq!(Period::Daily.start(t), at("2026-12-03T00:00:00Z"));
        assert_eq!(Period::Weekly.start(t), at("2026-11-30T00:00:00Z"));
        assert_eq!(Period::Monthly.start(t), at("2026-12-01T00:00:00Z"));
        let first = at("2026-12-01T00:00:00Z");
        assert_eq!(Period::Monthly.start(first), first);
    }

    #[test]
    fn a_client_setting_wins_over_the_default_and_zero_means_none() {
        let defaults = Effective::from_config(&LimitsConfig {
            download_kbps: 20_000,
            quota_mb: 100,
            ..LimitsConfig::default()
        });
        let own = LimitSettings {
            download_kbps: Some(0),
            upload_kbps: Some(10_000),
            ..LimitSettings::default()
        };
        let e = own.over(&defaults);
        assert_eq!(
            (e.download_kbps, e.upload_kbps, e.quota_mb),
            (0, 10_000, 100)
        );
        let k = e.kernel();
        assert_eq!(k.down.ns_per_byte_q16, 0);
        assert_eq!(k.up.ns_per_byte_q16, ns_per_byte_q16(10_000));
        assert_eq!(k.quota_bytes, 100 << 20);
        assert_eq!(k.quota_action, QUOTA_THROTTLE);
        assert_eq!(k.up.floor_ns_per_byte_q16, ns_per_byte_q16(1_000));
        // 2 s at the floor rate (it is lower, so it sets the depth) is 250,000 bytes: the
        // depth's own floor, 1 MiB.
        assert_eq!(k.up.burst_bytes, 1024 * 1024);
        let later = own.updated(&LimitSettings {
            upload_kbps: Some(50_000),
            burst_kb: Some(128),
            ..LimitSettings::default()
        });
        assert_eq!(later.download_kbps, Some(0));
        assert_eq!(later.over(&defaults).kernel().up.burst_bytes, 128 * 1024);
        assert!(
            !LimitSettings::default()
                .over(&Effective::from_config(&LimitsConfig::default()))
                .any()
        );
        assert!(
            LimitSettings {
                upload_kbps: Some(10),
                ..LimitSettings::default()
            }
            .check()
            .is_err()
        );
        assert!(
            LimitSettings {
                burst_kb: Some(MAX_BURST_KB + 1),
                ..LimitSettings::default()
            }
            .check()
            .is_err()
        );
    }
}
