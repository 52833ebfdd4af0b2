//! `dns_wire`: the resolver's query parsing, its own replies and the answer path (an upstream's
//! answer checked, cached, served again). `dns_filter`: the kernel DNS filter's
//! parse-and-decide steps (`phantom_common::dns_filter`) against hickory-proto.

use std::collections::HashMap;

use hickory_proto::{
    op::{Header, HeaderCounts, Message, MessageType, Metadata, OpCode, Query, ResponseCode},
    serialize::binary::{BinDecodable, BinDecoder, BinEncodable, BinEncoder},
};
use phantom_common::{
    dns::{DOMAIN_EXACT, DOMAIN_SUBDOMAINS, DnsVerdict, DomainKey, KEY_POSITIONS},
    dns_filter::{self, DNS_HLEN, SCRATCH_LEN},
};
use phantom_daemon::dns::{
    cache::Cache,
    same_question,
    wire::{self, QueryError},
};

/// Input: two parts (`split2`), a client's query and an upstream's answer to it.
///
/// - a query either parses into a question whose bytes are its own, or gets the reply the
///   resolver sends for its error (header only, which hickory parses);
/// - every reply the resolver builds itself (NXDOMAIN, SERVFAIL, the sinkhole, truncated)
///   parses with hickory, keeps the client's ID and answers the client's question;
/// - an upstream answer that passes the resolver's checks (the question, hickory's parse, the
///   record walk `answer_shape`, whose TTL offsets lie inside it) and is cached comes back from
///   the cache with the client's ID and question bytes, and still parses.
pub fn dns_wire(data: &[u8]) {
    let (query, answer) = crate::split2(data);
    let q = match wire::parse_query(query) {
        Ok(q) => q,
        Err(e) => {
            let rcode = match e {
                QueryError::TooShort | QueryError::NotQuery => return,
                QueryError::Unsupported => 4,
                QueryError::Malformed => 1,
            };
            let reply = wire::header_reply(query, rcode).expect("a header to answer");
            let m = Message::from_vec(&reply).expect("a header-only reply parses");
            assert_eq!(m.metadata.id, u16::from_be_bytes([query[0], query[1]]));
            assert_eq!(m.metadata.message_type, MessageType::Response);
            return;
        }
    };
    assert!(q.end > wire::HEADER_LEN && q.end <= query.len());
    assert!(q.name.len() <= 253, "names are at most 253 bytes");
    assert!(q.udp_size >= wire::CLASSIC_UDP_SIZE);
    assert!(
        same_question(query, query, &q),
        "a query asks its own question"
    );
    for rcode in [
        wire::RCODE_NXDOMAIN,
        wire::RCODE_SERVFAIL,
        wire::RCODE_REFUSED,
    ] {
        own_reply(query, &q, &wire::rcode_reply(query, &q, rcode), rcode);
    }
    own_reply(query, &q, &wire::sinkhole_reply(query, &q, 300), 0);

    // The answer path (`Resolver::forward`): only an answer to this question that hickory
    // parses in full is kept.
    if !same_question(answer, query, &q) || Message::from_vec(answer).is_err() {
        return;
    }
    let Some(shape) = wire::answer_shape(answer) else {
        return;
    };
    for &at in &shape.ttl_offsets {
        assert!(
            at as usize + 4 <= answer.len(),
            "a TTL offset inside the answer"
        );
    }
    let cache = Cache::new(64, 3600);
    cache.put(&q, answer, Some(1));
    if let Some((served, vetted)) = cache.get(query, &q, 1) {
        assert!(vetted);
        assert_eq!(served.len(), answer.len());
        assert_eq!(served[..2], query[..2], "the client's ID");
        assert_eq!(
            served[wire::HEADER_LEN..q.end],
            query[wire::HEADER_LEN..q.end],
            "the client's question bytes"
        );
        Message::from_vec(&served).expect("a cached answer parses");
    }
    let cut = wire::truncated(answer, q.end);
    let m = Message::from_vec(&cut).expect("a truncated answer parses");
    assert!(m.metadata.truncation);
    assert!(m.answers.is_empty() && m.authorities.is_empty() && m.additionals.is_empty());
}

/// A reply the resolver built for `q`.
fn own_reply(query: &[u8], q: &wire::Question, reply: &[u8], rcode: u8) {
    let m = Message::from_vec(reply).unwrap_or_else(|e| panic!("own reply does not parse: {e}"));
    assert_eq!(m.metadata.id, q.id);
    assert_eq!(m.metadata.message_type, MessageType::Response);
    assert_eq!(u16::from(m.metadata.response_code) & 0x0f, u16::from(rcode));
    assert_eq!(m.queries.len(), 1);
    assert!(
        same_question(reply, query, q),
        "a reply answers the client's question"
    );
    assert!(wire::answer_shape(reply).is_some(), "own replies walk");
    assert_eq!(m.edns.is_some(), q.has_edns);
}

/// The key of the domain hash the filter model runs with (any fixed one will do: the fuzzer
/// does not see it).
fn key() -> &'static DomainKey {
    static KEY: std::sync::OnceLock<DomainKey> = std::sync::OnceLock::new();
    KEY.get_or_init(|| {
        let mut key = DomainKey::ZERO;
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        for m in key.mul.iter_mut().take(KEY_POSITIONS) {
            // splitmix64
            x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = x;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            *m = z ^ (z >> 31);
        }
        key
    })
}

/// Rules every run has, besides those the input asks for.
const RULES: &[(&str, u8)] = &[
    ("blocked.example", DOMAIN_EXACT),
    ("ads.example", DOMAIN_EXACT | DOMAIN_SUBDOMAINS),
    ("tracker.test", DOMAIN_SUBDOMAINS),
    ("x", DOMAIN_EXACT),
];

/// What hickory-proto reads in the DNS payload: the verdict the filter must reach, and for a
/// blocked question the payload it must leave (an NXDOMAIN header hickory encodes, then the
/// question as it was).
struct Reference {
    verdict: DnsVerdict,
    rewrite: Option<Vec<u8>>,
}

/// The filter's documented rules, over hickory's parse: not a response or not QUERY ->
/// `NotResponse`; not one question -> `QuestionCount`; a header or question hickory cannot
/// read, the root name, or a name that uses compression -> `Unparsable`; then the name in text
/// form (its labels joined by dots, ASCII lowercase) is blocked when a rule names it or, with
/// `DOMAIN_SUBDOMAINS`, a suffix after one of its dots.
fn reference(payload: &[u8], rules: &HashMap<Vec<u8>, u8>) -> Reference {
    let unparsable = Reference {
        verdict: DnsVerdict::Unparsable,
        rewrite: None,
    };
    let mut d = BinDecoder::new(payload);
    let Ok(header) = Header::read(&mut d) else {
        return unparsable;
    };
    if header.metadata.message_type != MessageType::Response
        || header.metadata.op_code != OpCode::Query
    {
        return Reference {
            verdict: DnsVerdict::NotResponse,
            rewrite: None,
        };
    }
    if header.counts.queries != 1 {
        return Reference {
            verdict: DnsVerdict::QuestionCount,
            rewrite: None,
        };
    }
    let start = d.index();
    let Ok(query) = Query::read(&mut d) else {
        return unparsable;
    };
    let Some(text) = text_name(&query, d.index() - start) else {
        return unparsable;
    };
    if !blocked(&text, rules) {
        return Reference {
            verdict: DnsVerdict::Passed,
            rewrite: None,
        };
    }
    let mut metadata = Metadata::new(header.metadata.id, MessageType::Response, OpCode::Query);
    metadata.recursion_desired = header.metadata.recursion_desired;
    metadata.recursion_available = header.metadata.recursion_available;
    metadata.response_code = ResponseCode::NXDomain;
    let nx = Header {
        metadata,
        counts: HeaderCounts {
            queries: 1,
            answers: 0,
            authorities: 0,
            additionals: 0,
        },
    };
    let mut out = Vec::new();
    {
        let mut enc = BinEncoder::new(&mut out);
        nx.emit(&mut enc).expect("a header encodes");
    }
    out.extend_from_slice(&payload[DNS_HLEN..d.index()]);
    Reference {
        verdict: DnsVerdict::Rewritten,
        rewrite: Some(out),
    }
}

/// The question's name in text form (bytes: a label may hold any byte); `None` for the root
/// or a name that took `consumed` bytes other than its own length plus QTYPE and QCLASS (a
/// compression pointer).
fn text_name(query: &Query, consumed: usize) -> Option<Vec<u8>> {
    let labels: Vec<&[u8]> = query.name().iter().collect();
    if labels.is_empty() {
        return None;
    }
    let wire_len: usize = labels.iter().map(|l| l.len() + 1).sum::<usize>() + 1;
    if consumed != wire_len + 4 {
        return None;
    }
    Some(labels.join(&b'.').to_ascii_lowercase())
}

fn blocked(text: &[u8], rules: &HashMap<Vec<u8>, u8>) -> bool {
    if rules.contains_key(text) {
        return true;
    }
    text.iter()
        .enumerate()
        .filter(|&(_, &c)| c == b'.')
        .any(|(i, _)| {
            rules
                .get(&text[i + 1..])
                .is_some_and(|f| f & DOMAIN_SUBDOMAINS != 0)
        })
}

/// Input: one byte of rules to add for the question's own name (bit 0: the name, exact; bit 1:
/// its parent, with subdomains; bit 2: the name, with subdomains), then a DNS payload (what
/// follows the UDP header of an answer going to a client). The filter's model and hickory's
/// reading agree on the verdict, and on the bytes of the rewritten answer.
pub fn dns_filter(data: &[u8]) {
    let Some((&wants, payload)) = data.split_first() else {
        return;
    };
    let mut rules: HashMap<Vec<u8>, u8> = RULES
        .iter()
        .map(|(n, f)| (n.as_bytes().to_vec(), *f))
        .collect();
    // The question's name as hickory reads it, for the rules the input asks for.
    let mut d = BinDecoder::new(payload);
    if Header::read(&mut d).is_ok() {
        let start = d.index();
        if let Ok(query) = Query::read(&mut d)
            && let Some(text) = text_name(&query, d.index() - start)
        {
            if wants & 1 != 0 {
                *rules.entry(text.clone()).or_default() |= DOMAIN_EXACT;
            }
            if wants & 2 != 0
                && let Some(dot) = text.iter().position(|&b| b == b'.')
            {
                *rules.entry(text[dot + 1..].to_vec()).or_default() |= DOMAIN_SUBDOMAINS;
            }
            if wants & 4 != 0 {
                *rules.entry(text).or_default() |= DOMAIN_SUBDOMAINS;
            }
        }
    }
    let key = key();
    let map: HashMap<u64, u8> = rules
        .iter()
        .map(|(name, flags)| (key.hash(name), *flags))
        .collect();
    let mut buf = [0u8; SCRATCH_LEN];
    let (verdict, len) = dns_filter::decide(payload, key, |h| map.get(&h).copied(), &mut buf);
    let want = reference(payload, &rules);
    assert_eq!(
        verdict, want.verdict,
        "the filter's verdict against hickory's reading"
    );
    let rewrite = len.map(|len| {
        let mut header = [0u8; DNS_HLEN];
        header.copy_from_slice(&payload[..DNS_HLEN]);
        let mut out = dns_filter::nxdomain_header(&header).to_vec();
        out.extend_from_slice(&payload[DNS_HLEN..len]);
        out
    });
    assert_eq!(
        rewrite, want.rewrite,
        "the rewritten answer against hickory's"
    );
    if let Some(rewritten) = &rewrite {
        let m = Message::from_vec(rewritten).expect("a rewritten answer parses");
        assert_eq!(m.metadata.response_code, ResponseCode::NXDomain);
        assert_eq!(m.queries.len(), 1);
    }
}
