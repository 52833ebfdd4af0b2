//! The few wire-format operations the resolver's hot path needs, on raw bytes: read a query's
//! question, answer it directly (blocked, refused, server failure, truncated), and find the TTL
//! fields of an upstream answer so cached copies can count down. Upstream answers are also
//! parsed in full with hickory-proto before they are cached; these helpers only locate bytes.

pub const HEADER_LEN: usize = 12;
const TYPE_A: u16 = 1;
const TYPE_AAAA: u16 = 28;
const TYPE_OPT: u16 = 41;
const TYPE_SOA: u16 = 6;
const CLASS_IN: u16 = 1;
pub const RCODE_NOERROR: u8 = 0;
pub const RCODE_SERVFAIL: u8 = 2;
pub const RCODE_NXDOMAIN: u8 = 3;
pub const RCODE_REFUSED: u8 = 5;
/// The UDP payload size a client without EDNS can take (RFC 1035).
pub const CLASSIC_UDP_SIZE: usize = 512;
/// What we advertise and accept with EDNS.
pub const EDNS_UDP_SIZE: u16 = 1232;

/// A standard query with exactly one question, as read from the wire.
#[derive(Debug, Clone, PartialEq)]
pub struct Question {
    pub id: u16,
    /// Lowercase, dotted, no trailing dot; the root is "".
    pub name: QName,
    pub qtype: u16,
    pub qclass: u16,
    /// Where the question section ends (header + question bytes).
    pub end: usize,
    /// The largest UDP answer the client accepts.
    pub udp_size: usize,
    pub has_edns: bool,
    /// The RD flag the client sent.
    pub recursion_desired: bool,
    /// CD (checking disabled, RFC 4035): the client validates DNSSEC itself and wants the
    /// data even where validation fails. Answers differ, so it is part of the cache key.
    pub checking_disabled: bool,
    /// DO in the client's OPT record (RFC 3225): the client wants DNSSEC records (RRSIG,
    /// NSEC) with the answer. Answers differ, so it is part of the cache key.
    pub dnssec_ok: bool,
}

#[derive(Debug, PartialEq, Eq)]
pub enum QueryError {
    /// Shorter than a header: nothing can be answered.
    TooShort,
    /// A response, not a query: never answered (no reflection loops).
    NotQuery,
    /// An opcode other than QUERY, or not exactly one question: answered NOTIMP/FORMERR-like.
    Unsupported,
    /// A malformed question: answered FORMERR.
    Malformed,
}

/// The longest name in dotted form (RFC 1035: 255 bytes on the wire).
pub const MAX_NAME: usize = 253;

/// A queried name held inline (no allocation per query): lowercase printable ASCII, dotted,
/// no trailing dot, at most [`MAX_NAME`] bytes. Reads as a `&str`.
#[derive(Clone)]
pub struct QName {
    len: u8,
    bytes: [u8; MAX_NAME],
}

impl QName {
    const EMPTY: Self = Self {
        len: 0,
        bytes: [0; MAX_NAME],
    };

    pub fn as_str(&self) -> &str {
        let bytes = &self.bytes[..usize::from(self.len)];
        // SAFETY: `parse_query` is the only writer and pushes only bytes in 0x21..0x7f
        // (printable ASCII), so the bytes are UTF-8; checking again would cost every query a
        // scan of the name.
        unsafe { std::str::from_utf8_unchecked(bytes) }
    }
}

impl std::ops::Deref for QName {
    type Target = str;
    fn deref(&self) -> &str {
        self.as_str()
    }
}

impl std::fmt::Debug for QName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Debug::fmt(self.as_str(), f)
    }
}

impl PartialEq for QName {
    fn eq(&self, other: &Self) -> bool {
        self.as_str() == other.as_str()
    }
}

impl PartialEq<str> for QName {
    fn eq(&self, other: &str) -> bool {
        self.as_str() == other
    }
}

impl PartialEq<&str> for QName {
    fn eq(&self, other: &&str) -> bool {
        self.as_str() == *other
    }
}

impl std::hash::Hash for QName {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.as_str().hash(state);
    }
}

impl Question {
    pub fn is_address(&self) -> bool {
        self.qclass == CLASS_IN && (self.qtype == TYPE_A || self.qtype == TYPE_AAAA)
    }
}

fn u16_at(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_be_bytes([*b.get(at)?, *b.get(at + 1)?]))
}

/// Reads the header and the single question of a query.
pub fn parse_query(b: &[u8]) -> Result<Question, QueryError> {
    if b.len() < HEADER_LEN {
        return Err(QueryError::TooShort);
    }
    if b[2] & 0x80 != 0 {
        return Err(QueryError::NotQuery);
    }
    if (b[2] >> 3) & 0x0f != 0 || u16_at(b, 4) != Some(1) || u16_at(b, 6) != Some(0) {
        return Err(QueryError::Unsupported);
    }
    let mut name = QName::EMPTY;
    let mut n = 0usize;
    let mut at = HEADER_LEN;
    loop {
        let len = *b.get(at).ok_or(QueryError::Malformed)? as usize;
        at += 1;
        if len == 0 {
            break;
        }
        // No compression in a question; labels at most 63.
        if len > 63 {
            return Err(QueryError::Malformed);
        }
        let label = b.get(at..at + len).ok_or(QueryError::Malformed)?;
        let dot = usize::from(n > 0);
        if n + dot + len > MAX_NAME {
            return Err(QueryError::Malformed);
        }
        if dot == 1 {
            name.bytes[n] = b'.';
        }
        let out = &mut name.bytes[n + dot..n + dot + len];
        for (o, &c) in out.iter_mut().zip(label) {
            if c == b'.' || !(0x21..0x7f).contains(&c) {
                return Err(QueryError::Malformed);
            }
            *o = c.to_ascii_lowercase();
        }
        n += dot + len;
        at += len;
    }
    // At most MAX_NAME (253), checked above.
    name.len = n as u8;
    let qtype = u16_at(b, at).ok_or(QueryError::Malformed)?;
    let qclass = u16_at(b, at + 2).ok_or(QueryError::Malformed)?;
    let end = at + 4;
    let edns = edns(b, end);
    Ok(Question {
        id: u16::from_be_bytes([b[0], b[1]]),
        name,
        qtype,
        qclass,
        end,
        udp_size: edns.udp_size,
        has_edns: edns.present,
        recursion_desired: b[2] & 0x01 != 0,
        checking_disabled: b[3] & FLAG_CD != 0,
        dnssec_ok: edns.dnssec_ok,
    })
}

/// CD in the header's second flags byte.
const FLAG_CD: u8 = 0x10;
/// DO in the OPT record's flags (the low half of its TTL field).
const EDNS_FLAG_DO: u16 = 0x8000;

/// What a query's OPT record says.
struct Edns {
    present: bool,
    udp_size: usize,
    dnssec_ok: bool,
}

/// Finds an OPT record among the additional records of a query (after the question).
fn edns(b: &[u8], question_end: usize) -> Edns {
    let arcount = u16_at(b, 10).unwrap_or(0);
    let mut at = question_end;
    for _ in 0..arcount {
        let Some(name_end) = skip_name(b, at) else {
            break;
        };
        let (Some(rtype), Some(class), Some(rdlen)) = (
            u16_at(b, name_end),
            u16_at(b, name_end + 2),
            u16_at(b, name_end + 8),
        ) else {
            break;
        };
        if rtype == TYPE_OPT {
            return Edns {
                present: true,
                udp_size: (class as usize).max(CLASSIC_UDP_SIZE),
                dnssec_ok: u16_at(b, name_end + 6).is_some_and(|f| f & EDNS_FLAG_DO != 0),
            };
        }
        at = name_end + 10 + rdlen as usize;
    }
    Edns {
        present: false,
        udp_size: CLASSIC_UDP_SIZE,
        dnssec_ok: false,
    }
}

/// The offset just past a (possibly compressed) name. `None` also for a compression pointer
/// into the header: no name starts there, and the resolver rewrites the ID, so what such a
/// pointer reads would change between the upstream's answer and the client's.
fn skip_name(b: &[u8], mut at: usize) -> Option<usize> {
    for _ in 0..128 {
        let len = *b.get(at)?;
        match len {
            0 => return Some(at + 1),
            l if l & 0xc0 == 0xc0 => {
                let target = usize::from(u16::from_be_bytes([l & 0x3f, *b.get(at + 1)?]));
                if target < HEADER_LEN {
                    return None;
                }
                return Some(at + 2);
            }
            l if l <= 63 => at += 1 + l as usize,
            _ => return None,
        }
    }
    None
}

/// A reply that repeats the query's header and question with `rcode`, no records but an OPT
/// when the client sent one.
fn reply_head(out: &mut Vec<u8>, query: &[u8], q: &Question, rcode: u8, answers: u16) {
    out.clear();
    out.extend_from_slice(&query[..q.end]);
    // QR, the client's opcode (QUERY) and RD; RA set; AD/CD clear.
    out[2] = 0x80 | (query[2] & 0x01);
    out[3] = 0x80 | (rcode & 0x0f);
    out[4..6].copy_from_slice(&1u16.to_be_bytes());
    out[6..8].copy_from_slice(&answers.to_be_bytes());
    out[8..10].copy_from_slice(&0u16.to_be_bytes());
    out[10..12].copy_from_slice(&u16::from(q.has_edns).to_be_bytes());
}

/// Our OPT record when the client sent one, with DO copied from the query (RFC 3225).
fn push_opt(out: &mut Vec<u8>, q: &Question) {
    if q.has_edns {
        out.push(0);
        out.extend_from_slice(&TYPE_OPT.to_be_bytes());
        out.extend_from_slice(&EDNS_UDP_SIZE.to_be_bytes());
        let flags = if q.dnssec_ok { EDNS_FLAG_DO } else { 0 };
        out.extend_from_slice(&[0, 0]);
        out.extend_from_slice(&flags.to_be_bytes());
        out.extend_from_slice(&[0, 0]);
    }
}

/// An answer with only a response code (NXDOMAIN, SERVFAIL, REFUSED, FORMERR).
pub fn rcode_reply(query: &[u8], q: &Question, rcode: u8) -> Vec<u8> {
    let mut out = Vec::with_capacity(q.end + 32);
    write_rcode_reply(&mut out, query, q, rcode);
    out
}

/// [`rcode_reply`] into `out` (its old content replaced; its allocation reused).
pub fn write_rcode_reply(out: &mut Vec<u8>, query: &[u8], q: &Question, rcode: u8) {
    reply_head(out, query, q, rcode, 0);
    push_opt(out, q);
}

/// A reply to a query that could not be parsed past the header: header only.
pub fn header_reply(query: &[u8], rcode: u8) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(HEADER_LEN);
    write_header_reply(&mut out, query, rcode).then_some(out)
}

/// [`header_reply`] into `out` (its old content replaced); false (and `out` empty) when the
/// query is shorter than a header.
pub fn write_header_reply(out: &mut Vec<u8>, query: &[u8], rcode: u8) -> bool {
    out.clear();
    let Some(head) = query.get(..HEADER_LEN) else {
        return false;
    };
    out.extend_from_slice(head);
    out[2] = 0x80 | (head[2] & 0x79);
    out[3] = 0x80 | (rcode & 0x0f);
    out[4..12].fill(0);
    true
}

/// The sinkhole answer for a blocked name: `0.0.0.0` for A, `::` for AAAA, and no data (NOERROR,
/// no records) for every other type, so clients do not retry elsewhere.
pub fn sinkhole_reply(query: &[u8], q: &Question, ttl: u32) -> Vec<u8> {
    let mut out = Vec::with_capacity(q.end + 64);
    write_sinkhole_reply(&mut out, query, q, ttl);
    out
}

/// [`sinkhole_reply`] into `out` (its old content replaced; its allocation reused).
pub fn write_sinkhole_reply(out: &mut Vec<u8>, query: &[u8], q: &Question, ttl: u32) {
    let address: &[u8] = match (q.qclass, q.qtype) {
        (CLASS_IN, TYPE_A) => &[0; 4],
        (CLASS_IN, TYPE_AAAA) => &[0; 16],
        _ => &[],
    };
    reply_head(out, query, q, 0, u16::from(!address.is_empty()));
    if !address.is_empty() {
        // The name is a pointer to the question's.
        out.extend_from_slice(&[0xc0, 0x0c]);
        out.extend_from_slice(&q.qtype.to_be_bytes());
        out.extend_from_slice(&q.qclass.to_be_bytes());
        out.extend_from_slice(&ttl.to_be_bytes());
        out.extend_from_slice(&(address.len() as u16).to_be_bytes());
        out.extend_from_slice(address);
    }
    push_opt(out, q);
}

/// The header and question of `answer` with TC set and no records: "ask again over TCP".
pub fn truncated(answer: &[u8], question_end: usize) -> Vec<u8> {
    let mut out = answer[..question_end.min(answer.len())].to_vec();
    truncate_in_place(&mut out, question_end);
    out
}

/// [`truncated`] in place.
pub fn truncate_in_place(answer: &mut Vec<u8>, question_end: usize) {
    answer.truncate(question_end);
    if answer.len() >= HEADER_LEN {
        answer[2] |= 0x02;
        answer[6..12].fill(0);
    }
}

/// What the cache needs to know about an upstream answer.
#[derive(Debug, Clone, PartialEq)]
pub struct AnswerShape {
    pub rcode: u8,
    pub truncated: bool,
    /// Offsets of every TTL field except OPT's.
    pub ttl_offsets: Vec<u32>,
    /// How long it may be cached: the smallest TTL of the answer and authority records, or for
    /// a negative answer the SOA's TTL capped by its MINIMUM (RFC 2308).
    pub ttl: Option<u32>,
}

/// Walks an upstream answer for its TTL fields. `None` when it does not parse, or a name
/// points into the header (such an answer is not forwarded: `Resolver::forward`).
pub fn answer_shape(b: &[u8]) -> Option<AnswerShape> {
    if b.len() < HEADER_LEN {
        return None;
    }
    let counts = [u16_at(b, 4)?, u16_at(b, 6)?, u16_at(b, 8)?, u16_at(b, 10)?];
    let mut at = HEADER_LEN;
    for _ in 0..counts[0] {
        at = skip_name(b, at)? + 4;
    }
    let mut ttl_offsets = Vec::new();
    let mut min_ttl: Option<u32> = None;
    let mut negative_ttl: Option<u32> = None;
    let records = counts[1] as usize + counts[2] as usize + counts[3] as usize;
    for i in 0..records {
        let name_end = skip_name(b, at)?;
        let rtype = u16_at(b, name_end)?;
        let ttl_at = name_end + 4;
        let ttl = u32::from_be_bytes(b.get(ttl_at..ttl_at + 4)?.try_into().ok()?);
        let rdlen = u16_at(b, name_end + 8)? as usize;
        let rdata = name_end + 10;
        b.get(rdata..rdata + rdlen)?;
        if rtype != TYPE_OPT {
            ttl_offsets.push(ttl_at as u32);
            let in_answer_or_authority = i < counts[1] as usize + counts[2] as usize;
            if in_answer_or_authority {
                min_ttl = Some(min_ttl.map_or(ttl, |m| m.min(ttl)));
            }
            if rtype == TYPE_SOA && i >= counts[1] as usize && rdlen >= 22 {
                // MINIMUM is the last field of the SOA rdata.
                let minimum_at = rdata + rdlen - 4;
                let minimum =
                    u32::from_be_bytes(b.get(minimum_at..rdata + rdlen)?.try_into().ok()?);
                negative_ttl = Some(ttl.min(minimum));
            }
        }
        at = rdata + rdlen;
    }
    let rcode = b[3] & 0x0f;
    let no_answers = counts[1] == 0;
    let ttl = if rcode == RCODE_NXDOMAIN || (rcode == 0 && no_answers) {
        negative_ttl
    } else if rcode == 0 {
        min_ttl
    } else {
        None
    };
    Some(AnswerShape {
        rcode,
        truncated: b[2] & 0x02 != 0,
        ttl_offsets,
        ttl,
    })
}

/// Writes `id` into an answer.
pub fn set_id(answer: &mut [u8], id: u16) {
    if answer.len() >= 2 {
        answer[..2].copy_from_slice(&id.to_be_bytes());
    }
}

#[cfg(test)]
mod tests {
    use hickory_proto::{
        op::{Edns, Message, Query, ResponseCode},
        rr::{Name, RData, Record, RecordType, rdata::A},
    };

    use super::*;

    fn query(name: &str, rtype: RecordType, edns: bool) -> Vec<u8> {
        query_with(name, rtype, edns, false)
    }

    fn query_with(name: &str, rtype: RecordType, edns: bool, dnssec_ok: bool) -> Vec<u8> {
        let mut m = Message::query();
        m.metadata.id = 0x1234;
        m.metadata.recursion_desired = true;
        m.add_query(Query::query(Name::from_ascii(name).unwrap(), rtype));
        if edns {
            let mut e = Edns::new();
            e.set_max_payload(4096);
            e.set_dnssec_ok(dnssec_ok);
            m.set_edns(e);
        }
        m.to_vec().unwrap()
    }

    #[test]
    fn reads_cd_and_do() {
        let q = parse_query(&query("a.example.", RecordType::A, true)).unwrap();
        assert_eq!((q.checking_disabled, q.dnssec_ok), (false, false));
        let q = parse_query(&query_with("a.example.", RecordType::A, true, true)).unwrap();
        assert_eq!((q.checking_disabled, q.dnssec_ok), (false, true));
        let mut b = query("a.example.", RecordType::A, false);
        b[3] |= FLAG_CD;
        let q = parse_query(&b).unwrap();
        assert_eq!((q.checking_disabled, q.dnssec_ok), (true, false));
        // A blocked answer to a DO query says DO back.
        let b = query_with("a.example.", RecordType::A, true, true);
        let q = parse_query(&b).unwrap();
        let m = Message::from_vec(&rcode_reply(&b, &q, RCODE_NXDOMAIN)).unwrap();
        assert!(m.edns.unwrap().flags().dnssec_ok);
    }

    #[test]
    fn reads_the_question() {
        let q = parse_query(&query("WwW.Casino.Example.", RecordType::AAAA, true)).unwrap();
        assert_eq!(q.name, "www.casino.example");
        assert_eq!(
            (q.id, q.qtype, q.has_edns, q.udp_size),
            (0x1234, 28, true, 4096)
        );
        let q = parse_query(&query("a.example.", RecordType::A, false)).unwrap();
        assert_eq!((q.has_edns, q.udp_size), (false, 512));
    }

    #[test]
    fn refuses_malformed_queries() {
        assert_eq!(parse_query(&[0; 5]), Err(QueryError::TooShort));
        let mut b = query("a.example.", RecordType::A, false);
        b[2] |= 0x80;
        assert_eq!(parse_query(&b), Err(QueryError::NotQuery));
        let mut b = query("a.example.", RecordType::A, false);
        b.truncate(20);
        assert_eq!(parse_query(&b), Err(QueryError::Malformed));
        let mut b = query("a.example.", RecordType::A, false);
        b[12] = 0xc0;
        assert_eq!(parse_query(&b), Err(QueryError::Malformed));
        let mut b = query("a.example.", RecordType::A, false);
        b[5] = 2;
        assert_eq!(parse_query(&b), Err(QueryError::Unsupported));
    }

    #[test]
    fn built_replies_parse() {
        for edns in [false, true] {
            let b = query("Casino.example.", RecordType::A, edns);
            let q = parse_query(&b).unwrap();
            let m = Message::from_vec(&rcode_reply(&b, &q, RCODE_NXDOMAIN)).unwrap();
            assert_eq!(m.metadata.response_code, ResponseCode::NXDomain);
            assert_eq!(m.metadata.id, 0x1234);
            assert_eq!(m.queries[0].name().to_ascii(), "Casino.example.");
            assert_eq!(m.edns.is_some(), edns);
            let m = Message::from_vec(&sinkhole_reply(&b, &q, 60)).unwrap();
            assert_eq!(m.answers.len(), 1);
            assert_eq!(m.answers[0].data, RData::A(A::new(0, 0, 0, 0)));
            let b = query("casino.example.", RecordType::MX, edns);
            let q = parse_query(&b).unwrap();
            let m = Message::from_vec(&sinkhole_reply(&b, &q, 60)).unwrap();
            assert!(m.answers.is_empty());
            assert_eq!(m.metadata.response_code, ResponseCode::NoError);
        }
    }

    #[test]
    fn finds_ttls() {
        let b = query("a.example.", RecordType::A, true);
        let mut m = Message::from_vec(&b).unwrap();
        m.metadata.message_type = hickory_proto::op::MessageType::Response;
        let name = Name::from_ascii("a.example.").unwrap();
        m.add_answer(Record::from_rdata(
            name.clone(),
            300,
            RData::A(A::new(192, 0, 2, 7)),
        ));
        m.add_answer(Record::from_rdata(name, 60, RData::A(A::new(192, 0, 2, 8))));
        let wire = m.to_vec().unwrap();
        let shape = answer_shape(&wire).unwrap();
        assert_eq!(shape.ttl, Some(60));
        assert_eq!(
            shape.ttl_offsets.len(),
            2,
            "the OPT record's TTL is not a TTL"
        );
        for at in shape.ttl_offsets {
            let at = at as usize;
            let ttl = u32::from_be_bytes(wire[at..at + 4].try_into().unwrap());
            assert!(ttl == 300 || ttl == 60);
        }
        assert!(answer_shape(&wire[..wire.len() - 3]).is_none());
    }

    /// Found by the fuzz crate (`dns_wire`): hickory reads a name pointing at the ID, which
    /// the resolver then rewrites; such an answer is neither cached nor forwarded.
    #[test]
    fn a_name_pointing_into_the_header_is_refused() {
        let mut wire = query("a.example.", RecordType::A, false);
        wire[2] |= 0x80;
        wire[7] = 1;
        // An A record whose owner is a pointer to offset 0 (the ID).
        wire.extend_from_slice(&[0xc0, 0x00, 0, 1, 0, 1, 0, 0, 0, 60, 0, 4, 192, 0, 2, 7]);
        wire[0] = 0;
        wire[1] = 0;
        assert!(answer_shape(&wire).is_none());
        let at = wire.len() - 16;
        wire[at + 1] = 12;
        assert!(
            answer_shape(&wire).is_some(),
            "a pointer to the question is fine"
        );
    }
}
