//! Names and records with which a VPN client's software routes around Phantom's resolver,
//! answered so that it does not: the Firefox canary (automatic DoH), Apple Private Relay's
//! ingress names, Discovery of Designated Resolvers (DDR, RFC 9462), and the `ech` parameter
//! of HTTPS/SVCB records (Encrypted ClientHello hides the server name from the SNI filter).
//! Each answer is counted by reason, never with a client or a name. docs/dns.md.

use std::sync::atomic::{AtomicU64, Ordering};

use hickory_proto::{
    op::Message,
    rr::{
        RData,
        rdata::svcb::{SVCB, SvcParamKey},
    },
};

use crate::config::DnsConfig;

/// Firefox turns automatic DoH off on networks that answer this name NXDOMAIN.
pub const FIREFOX_CANARY: &str = "use-application-dns.net";
/// Apple Private Relay's ingress names: a negative answer turns it off on this network.
pub const PRIVATE_RELAY: [&str; 2] = ["mask.icloud.com", "mask-h2.icloud.com"];
/// Where DDR clients ask the resolver which encrypted resolvers it designates.
pub const DDR: &str = "_dns.resolver.arpa";

const TYPE_SVCB: u16 = 64;
const TYPE_HTTPS: u16 = 65;

/// A name answered here instead of forwarded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Special {
    /// NXDOMAIN.
    FirefoxCanary,
    /// NXDOMAIN.
    PrivateRelay,
    /// NOERROR without records: no designated resolver to switch to.
    Ddr,
}

/// Which of the defences are on (`[dns]`).
#[derive(Clone, Copy, Debug)]
pub struct Bypass {
    pub firefox_canary: bool,
    pub private_relay: bool,
    pub ddr: bool,
    pub strip_ech: bool,
}

impl Bypass {
    pub fn from_config(c: &DnsConfig) -> Self {
        Self {
            firefox_canary: c.answer_firefox_canary,
            private_relay: c.block_private_relay,
            ddr: c.answer_ddr,
            strip_ech: c.strip_ech,
        }
    }

    /// What `name` (lowercase, no trailing dot) is, if it is answered here.
    pub fn special(&self, name: &str) -> Option<Special> {
        if self.firefox_canary && name == FIREFOX_CANARY {
            Some(Special::FirefoxCanary)
        } else if self.private_relay && PRIVATE_RELAY.contains(&name) {
            Some(Special::PrivateRelay)
        } else if self.ddr && name == DDR {
            Some(Special::Ddr)
        } else {
            None
        }
    }

    /// Whether answers to `qtype` may carry ECH parameters to remove.
    pub fn strips(&self, qtype: u16) -> bool {
        self.strip_ech && (qtype == TYPE_HTTPS || qtype == TYPE_SVCB)
    }
}

/// What the defences answered, by reason.
#[derive(Debug, Default)]
pub struct BypassStats {
    pub firefox_canary: AtomicU64,
    pub private_relay: AtomicU64,
    pub ddr: AtomicU64,
    /// Answers from the upstream whose HTTPS/SVCB records lost their `ech` parameter.
    pub ech_stripped: AtomicU64,
}

impl BypassStats {
    pub fn count(&self, s: Special) {
        let c = match s {
            Special::FirefoxCanary => &self.firefox_canary,
            Special::PrivateRelay => &self.private_relay,
            Special::Ddr => &self.ddr,
        };
        c.fetch_add(1, Ordering::Relaxed);
    }

    /// (reason, count) for the status and the metrics.
    pub fn by_reason(&self) -> [(&'static str, u64); 4] {
        let n = |a: &AtomicU64| a.load(Ordering::Relaxed);
        [
            ("firefox_canary", n(&self.firefox_canary)),
            ("private_relay", n(&self.private_relay)),
            ("ddr", n(&self.ddr)),
            ("ech_stripped", n(&self.ech_stripped)),
        ]
    }
}

fn without_ech(svcb: &mut SVCB) -> bool {
    let before = svcb.svc_params.len();
    svcb.svc_params
        .retain(|(k, _)| *k != SvcParamKey::EchConfigList);
    svcb.svc_params.len() != before
}

/// `answer` with the `ech` parameter removed from every HTTPS and SVCB record, or `None` when
/// it has none (or does not parse: the caller has checked it does). Re-encoded by
/// hickory-proto; a client validating DNSSEC itself sees the record's signature fail, which
/// is the point: the record as signed carries ECH.
pub fn strip_ech(answer: &[u8]) -> Option<Vec<u8>> {
    let mut message = Message::from_vec(answer).ok()?;
    let mut changed = false;
    for record in message
        .answers
        .iter_mut()
        .chain(message.additionals.iter_mut())
    {
        changed |= match &mut record.data {
            RData::HTTPS(https) => without_ech(&mut https.0),
            RData::SVCB(svcb) => without_ech(svcb),
            _ => false,
        };
    }
    if !changed {
        return None;
    }
    message.to_vec().ok()
}

#[cfg(test)]
mod tests {
    use hickory_proto::{
        op::{Message, MessageType, Query},
        rr::{
            Name, RData, Record, RecordType,
            rdata::{
                HTTPS,
                svcb::{Alpn, EchConfigList, SvcParamValue},
            },
        },
    };

    use super::*;

    fn bypass(on: bool) -> Bypass {
        Bypass {
            firefox_canary: on,
            private_relay: on,
            ddr: on,
            strip_ech: on,
        }
    }

    #[test]
    fn special_names_follow_the_switches() {
        let b = bypass(true);
        assert_eq!(b.special(FIREFOX_CANARY), Some(Special::FirefoxCanary));
        assert_eq!(b.special("mask-h2.icloud.com"), Some(Special::PrivateRelay));
        assert_eq!(b.special(DDR), Some(Special::Ddr));
        assert_eq!(b.special("www.use-application-dns.net"), None);
        assert_eq!(b.special("icloud.com"), None);
        assert!(b.strips(65) && b.strips(64) && !b.strips(1));
        let off = bypass(false);
        assert_eq!(off.special(FIREFOX_CANARY), None);
        assert!(!off.strips(65));
    }

    fn https_answer(with_ech: bool) -> Vec<u8> {
        let name = Name::from_ascii("ech.example.").unwrap();
        let mut params = vec![(
            SvcParamKey::Alpn,
            SvcParamValue::Alpn(Alpn(vec!["h2".into()])),
        )];
        if with_ech {
            params.push((
                SvcParamKey::EchConfigList,
                SvcParamValue::EchConfigList(EchConfigList(vec![0xde, 0xad, 0xbe, 0xef])),
            ));
        }
        let mut m = Message::query();
        m.metadata.message_type = MessageType::Response;
        m.add_query(Query::query(name.clone(), RecordType::HTTPS));
        m.add_answer(Record::from_rdata(
            name,
            300,
            RData::HTTPS(HTTPS(SVCB::new(1, Name::root(), params))),
        ));
        m.to_vec().unwrap()
    }

    #[test]
    fn ech_is_removed_and_everything_else_kept() {
        let stripped = strip_ech(&https_answer(true)).expect("changed");
        let m = Message::from_vec(&stripped).unwrap();
        let RData::HTTPS(h) = &m.answers[0].data else {
            panic!("{m:?}")
        };
        assert_eq!(h.0.svc_params.len(), 1);
        assert_eq!(h.0.svc_params[0].0, SvcParamKey::Alpn);
        assert_eq!(m.answers[0].ttl, 300);
        assert_eq!(strip_ech(&https_answer(false)), None, "nothing to strip");
        assert_eq!(strip_ech(b"\x00\x01garbage"), None);
    }
}
