//! DNS messages in and out (RFC 1035 wire format through `hickory-proto`): what a query
//! asks, and the answers the proxy authors itself (records for mesh names, errors).
//! Forwarded answers never pass through here: they are relayed byte for byte.

use std::net::IpAddr;

use hickory_proto::op::{Edns, Message, MessageType, OpCode, Query, ResponseCode};
use hickory_proto::rr::rdata::{A, AAAA, CNAME};
use hickory_proto::rr::{DNSClass, Name, RData, Record, RecordType};

use super::lookup::{Family, Found};

/// TTL of authored records (upstream's 30 s).
pub const TTL_SECONDS: u32 = 30;

/// A parsed query.
pub struct Request {
    msg: Message,
}

/// What the proxy does with a query.
#[derive(Debug, PartialEq, Eq)]
pub enum Question {
    /// One IN-class A or AAAA question: the mesh may answer it.
    Address { name: String, family: Family },
    /// Anything else a resolver should answer (other types, classes, several questions).
    Other,
}

/// Why a datagram gets no normal treatment.
#[derive(Debug, PartialEq, Eq)]
pub enum Rejected {
    /// Not a DNS query at all (too short, or a response): dropped silently.
    Drop,
    /// Answer with this error.
    Reply(Vec<u8>),
}

impl Request {
    /// Parses `bytes`; malformed queries get FORMERR (when they have a header), other
    /// opcodes NOTIMP.
    pub fn parse(bytes: &[u8]) -> Result<Request, Rejected> {
        let msg = match Message::from_vec(bytes) {
            Ok(m) => m,
            Err(_) if bytes.len() >= 12 && bytes[2] & 0x80 == 0 => {
                let id = u16::from_be_bytes([bytes[0], bytes[1]]);
                let reply = Message::error_msg(id, OpCode::Query, ResponseCode::FormErr);
                return Err(encode(&reply).map_or(Rejected::Drop, Rejected::Reply));
            }
            Err(_) => return Err(Rejected::Drop),
        };
        if msg.metadata.message_type != MessageType::Query {
            return Err(Rejected::Drop);
        }
        let request = Request { msg };
        if request.msg.metadata.op_code != OpCode::Query {
            return Err(request.error(ResponseCode::NotImp));
        }
        if request.msg.queries.is_empty() {
            return Err(request.error(ResponseCode::FormErr));
        }
        Ok(request)
    }

    pub fn question(&self) -> Question {
        let [q] = self.msg.queries.as_slice() else {
            return Question::Other;
        };
        if q.query_class() != DNSClass::IN {
            return Question::Other;
        }
        let family = match q.query_type() {
            RecordType::A => Family::V4,
            RecordType::AAAA => Family::V6,
            _ => return Question::Other,
        };
        Question::Address {
            name: q.name().to_ascii(),
            family,
        }
    }

    /// `a`, `aaaa`, `srv`, ... (metrics label).
    pub fn query_type(&self) -> String {
        self.msg
            .queries
            .first()
            .map(|q| q.query_type().to_string().to_ascii_lowercase())
            .unwrap_or_else(|| "unknown".into())
    }

    /// The queried name (logs).
    pub fn name(&self) -> String {
        self.msg
            .queries
            .first()
            .map(|q| q.name().to_ascii())
            .unwrap_or_default()
    }

    fn reply(&self) -> Message {
        let mut m = Message::response(self.msg.metadata.id, OpCode::Query);
        m.metadata.recursion_desired = self.msg.metadata.recursion_desired;
        m.metadata.recursion_available = true;
        m.metadata.checking_disabled = self.msg.metadata.checking_disabled;
        m.add_queries(self.msg.queries.iter().cloned());
        if let Some(req) = &self.msg.edns {
            let mut edns = Edns::new();
            edns.set_max_payload(req.max_payload().max(512));
            edns.set_version(req.version());
            edns.set_dnssec_ok(req.flags().dnssec_ok);
            m.set_edns(edns);
        }
        m
    }

    /// An error answer with `code`.
    pub fn error(&self, code: ResponseCode) -> Rejected {
        let mut m = self.reply();
        m.metadata.response_code = code;
        encode(&m).map_or(Rejected::Drop, Rejected::Reply)
    }

    /// SERVFAIL (forwarding failed).
    pub fn servfail(&self) -> Option<Vec<u8>> {
        match self.error(ResponseCode::ServFail) {
            Rejected::Reply(b) => Some(b),
            Rejected::Drop => None,
        }
    }

    /// The authoritative answer for a mesh name. Over UDP, an answer larger than the
    /// client accepts (512 bytes, or its EDNS payload size) is cut to the records that fit
    /// and marked truncated (TC) so the client retries over TCP.
    pub fn answer(&self, found: &Found, udp: bool) -> Option<Vec<u8>> {
        let q: &Query = self.msg.queries.first()?;
        let mut m = self.reply();
        m.metadata.authoritative = true;
        let mut owner = q.name().clone();
        if let Some(target) = &found.cname {
            let target = Name::from_ascii(target).ok()?;
            m.add_answer(Record::from_rdata(
                owner.clone(),
                TTL_SECONDS,
                RData::CNAME(CNAME(target.clone())),
            ));
            owner = target;
        }
        for ip in &found.addrs {
            let rdata = match ip {
                IpAddr::V4(v4) => RData::A(A(*v4)),
                IpAddr::V6(v6) => RData::AAAA(AAAA(*v6)),
            };
            m.add_answer(Record::from_rdata(owner.clone(), TTL_SECONDS, rdata));
        }
        let bytes = encode(&m)?;
        let limit = usize::from(self.msg.max_payload());
        if !udp || bytes.len() <= limit {
            return Some(bytes);
        }
        truncated(m, limit)
    }
}

/// `m` cut to the leading answer records that fit in `limit` bytes, TC set: a client that
/// does not retry over TCP still gets some addresses (as upstream, through hickory's
/// encoder). The OPT record is kept.
fn truncated(mut m: Message, limit: usize) -> Option<Vec<u8>> {
    m.metadata.truncation = true;
    let answers = std::mem::take(&mut m.answers);
    let fits = |m: &mut Message, n: usize| {
        m.answers = answers[..n].to_vec();
        encode(m).is_some_and(|b| b.len() <= limit)
    };
    // `lo` records fit, `hi` do not (all of them did not).
    let (mut lo, mut hi) = (0, answers.len());
    while hi - lo > 1 {
        let mid = lo + (hi - lo) / 2;
        if fits(&mut m, mid) {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    m.answers = answers[..lo].to_vec();
    encode(&m)
}

fn encode(m: &Message) -> Option<Vec<u8>> {
    m.to_vec().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn query(name: &str, rtype: RecordType, edns: Option<u16>) -> Vec<u8> {
        let mut m = Message::query();
        m.metadata.id = 0x1234;
        m.metadata.recursion_desired = true;
        m.add_query(Query::query(Name::from_ascii(name).unwrap(), rtype));
        if let Some(size) = edns {
            let mut e = Edns::new();
            e.set_max_payload(size);
            m.set_edns(e);
        }
        m.to_vec().unwrap()
    }

    fn found(n: usize, cname: Option<&str>) -> Found {
        Found {
            cname: cname.map(str::to_string),
            service: "ns/x".into(),
            addrs: (0..n)
                .map(|i| IpAddr::from([10, 0, (i / 256) as u8, (i % 256) as u8]))
                .collect(),
        }
    }

    #[test]
    fn questions_are_classified() {
        let r = Request::parse(&query("web.ns1.svc.cluster.local.", RecordType::A, None)).unwrap();
        assert_eq!(
            r.question(),
            Question::Address {
                name: "web.ns1.svc.cluster.local.".into(),
                family: Family::V4
            }
        );
        assert_eq!(r.query_type(), "a");
        let r = Request::parse(&query("x.", RecordType::AAAA, None)).unwrap();
        assert!(matches!(
            r.question(),
            Question::Address {
                family: Family::V6,
                ..
            }
        ));
        let r = Request::parse(&query("_http._tcp.x.", RecordType::SRV, None)).unwrap();
        assert_eq!(r.question(), Question::Other);
        assert_eq!(r.query_type(), "srv");
    }

    #[test]
    fn malformed_input_is_formerr_or_dropped() {
        assert_eq!(Request::parse(b"short").err(), Some(Rejected::Drop));
        let mut garbage = vec![0xab, 0xcd, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0];
        garbage.extend_from_slice(&[0xff; 7]);
        let Err(Rejected::Reply(reply)) = Request::parse(&garbage) else {
            panic!("garbage with a header gets FORMERR")
        };
        let m = Message::from_vec(&reply).unwrap();
        assert_eq!(m.metadata.id, 0xabcd);
        assert_eq!(m.metadata.response_code, ResponseCode::FormErr);
        // A response is never answered (no loops between resolvers).
        let mut resp = Message::from_vec(&query("x.", RecordType::A, None)).unwrap();
        resp.metadata.message_type = MessageType::Response;
        assert_eq!(
            Request::parse(&resp.to_vec().unwrap()).err(),
            Some(Rejected::Drop)
        );
        // Other opcodes: NOTIMP.
        let mut notify = Message::from_vec(&query("x.", RecordType::A, None)).unwrap();
        notify.metadata.op_code = OpCode::Notify;
        let Err(Rejected::Reply(reply)) = Request::parse(&notify.to_vec().unwrap()) else {
            panic!("notify gets NOTIMP")
        };
        assert_eq!(
            Message::from_vec(&reply).unwrap().metadata.response_code,
            ResponseCode::NotImp
        );
    }

    #[test]
    fn answers_are_authoritative_with_cname_and_ttl() {
        let r = Request::parse(&query("web.corp.example.", RecordType::A, Some(1232))).unwrap();
        let m = Message::from_vec(&r.answer(&found(2, Some("web")), true).unwrap()).unwrap();
        assert_eq!(m.metadata.id, 0x1234);
        assert_eq!(m.metadata.message_type, MessageType::Response);
        assert!(m.metadata.authoritative && m.metadata.recursion_desired);
        assert_eq!(m.metadata.response_code, ResponseCode::NoError);
        assert_eq!(m.answers.len(), 3);
        assert_eq!(m.answers[0].record_type(), RecordType::CNAME);
        assert_eq!(m.answers[1].name.to_ascii(), "web.");
        assert!(m.answers.iter().all(|a| a.ttl == TTL_SECONDS));
        assert_eq!(m.edns.as_ref().map(|e| e.max_payload()), Some(1232));
        // No records is NOERROR with an empty answer section, not NXDOMAIN.
        let m = Message::from_vec(&r.answer(&found(0, None), true).unwrap()).unwrap();
        assert_eq!(m.metadata.response_code, ResponseCode::NoError);
        assert!(m.answers.is_empty());
    }

    #[test]
    fn oversized_udp_answers_keep_the_records_that_fit() {
        let r = Request::parse(&query("big.example.", RecordType::A, None)).unwrap();
        let bytes = r.answer(&found(100, Some("big")), true).unwrap();
        assert!(bytes.len() <= 512, "{}", bytes.len());
        let udp = Message::from_vec(&bytes).unwrap();
        assert!(udp.metadata.truncation && udp.metadata.authoritative);
        // As many as fit: the CNAME, then addresses (a client that does not retry over
        // TCP still gets some); one more would not fit.
        assert_eq!(udp.answers[0].record_type(), RecordType::CNAME);
        let n = udp.answers.len();
        assert!((20..100).contains(&n), "{n} records");
        assert!(
            bytes.len() + 16 > 512,
            "{} bytes with {n} records",
            bytes.len()
        );
        let tcp = Message::from_vec(&r.answer(&found(100, None), false).unwrap()).unwrap();
        assert!(!tcp.metadata.truncation);
        assert_eq!(tcp.answers.len(), 100);
        // The client's EDNS payload size is the limit, and the OPT record stays.
        let r = Request::parse(&query("big.example.", RecordType::A, Some(1232))).unwrap();
        let bytes = r.answer(&found(100, None), true).unwrap();
        assert!(
            bytes.len() <= 1232 && bytes.len() + 16 > 1232,
            "{}",
            bytes.len()
        );
        let udp = Message::from_vec(&bytes).unwrap();
        assert!(udp.metadata.truncation);
        assert!(udp.answers.len() > 50, "{}", udp.answers.len());
        assert_eq!(udp.edns.as_ref().map(|e| e.max_payload()), Some(1232));
        // Fits: not truncated.
        let udp = Message::from_vec(&r.answer(&found(3, None), true).unwrap()).unwrap();
        assert!(!udp.metadata.truncation);
        assert_eq!(udp.answers.len(), 3);
    }
}
