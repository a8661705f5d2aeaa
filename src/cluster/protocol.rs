//! Node's cluster protocol (`NODE_CLUSTER` messages, protocol doc §7), both directions.
//!
//! What a worker sends is parsed leniently from JSON (a Node worker adds fields freely); what we
//! send is written with the fields in Node's order, so the bytes match what Node's own primary or
//! worker would write.

use serde::Serialize;
use serde_json::Value;

/// The `cmd` of every cluster message.
pub(crate) const CLUSTER: &str = "NODE_CLUSTER";

/// A worker's server query (`queryServer`, and `listening` with the real port).
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Query {
    pub(crate) index: Value,
    pub(crate) data: Value,
    /// The address asked for: a host string, `null`, or absent (Node's `undefined`).
    pub(crate) address: Option<Value>,
    pub(crate) port: Option<Value>,
    /// `4`, `6`, `-1` (a Unix path), `"udp4"` or `"udp6"`.
    pub(crate) address_type: Option<Value>,
    pub(crate) fd: Option<Value>,
    pub(crate) flags: Option<Value>,
    pub(crate) backlog: Option<Value>,
}

impl Query {
    fn parse(message: &Value) -> Query {
        let field = |name: &str| message.get(name).cloned();
        Query {
            index: field("index").unwrap_or(Value::from(0)),
            data: field("data").unwrap_or(Value::Null),
            address: field("address"),
            port: field("port"),
            address_type: field("addressType"),
            fd: field("fd"),
            flags: field("flags"),
            backlog: field("backlog"),
        }
    }

    /// The primary's key for this server: `address:port:addressType:fd:index`, each printed as
    /// JavaScript prints it (`undefined` for a missing field), as Node's primary builds it.
    pub(crate) fn key(&self) -> String {
        let js = |v: &Option<Value>| match v {
            None => "undefined".to_owned(),
            Some(v) => js_string(v),
        };
        format!(
            "{}:{}:{}:{}:{}",
            js(&self.address),
            js(&self.port),
            js(&self.address_type),
            js(&self.fd),
            js_string(&self.index)
        )
    }

    /// The port asked for, if it is a number.
    pub(crate) fn port(&self) -> Option<i64> {
        self.port.as_ref().and_then(Value::as_i64)
    }

    /// The host asked for, if it is a string (`null` or absent: every interface).
    pub(crate) fn host(&self) -> Option<&str> {
        self.address.as_ref().and_then(Value::as_str)
    }

    /// What kind of server it is.
    pub(crate) fn kind(&self) -> AddressKind {
        match self.address_type.as_ref() {
            Some(Value::String(s)) if s == "udp4" || s == "udp6" => AddressKind::Udp,
            Some(v) if v.as_i64() == Some(-1) => AddressKind::Pipe,
            Some(v) if v.as_i64() == Some(6) => AddressKind::Tcp6,
            _ => AddressKind::Tcp4,
        }
    }
}

/// The kind of server a query is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum AddressKind {
    Tcp4,
    Tcp6,
    /// A Unix socket path (`addressType` -1).
    Pipe,
    Udp,
}

/// JavaScript's string conversion of a JSON value, as template literals print it.
fn js_string(value: &Value) -> String {
    match value {
        Value::String(s) => s.clone(),
        Value::Null => "null".to_owned(),
        Value::Bool(b) => b.to_string(),
        Value::Number(n) => match (n.as_i64(), n.as_f64()) {
            (Some(i), _) => i.to_string(),
            (None, Some(f)) if f.fract() == 0.0 && f.abs() < 1e21 => format!("{f:.0}"),
            _ => n.to_string(),
        },
        Value::Array(_) | Value::Object(_) => "[object Object]".to_owned(),
    }
}

/// A cluster message from a worker.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum FromWorker {
    Online,
    QueryServer { seq: u64, query: Query },
    Listening { query: Query },
    Close { key: String },
    ExitedAfterDisconnect { seq: u64 },
    /// An answer to one of our messages: `accepted` for a `newconn`.
    Reply { ack: u64, accepted: Option<bool> },
    /// Anything else (ignored, as Node's primary ignores unknown acts).
    Other,
}

/// The fields of a worker's answer to a `newconn` (`{"cmd":"NODE_CLUSTER","ack":N,
/// "accepted":true,"seq":M}`, one per connection), read without building a [`Value`].
#[derive(Debug, serde::Deserialize)]
struct ReplyFields {
    act: Option<serde::de::IgnoredAny>,
    ack: Option<u64>,
    accepted: Option<bool>,
}

impl FromWorker {
    /// Parses the JSON text of a cluster message.
    pub(crate) fn parse_json(json: &str) -> FromWorker {
        // The message of every connection takes the short way.
        if let Ok(ReplyFields { act: None, ack: Some(ack), accepted }) = crate::channel::json::from_str::<ReplyFields>(json) {
            return FromWorker::Reply { ack, accepted };
        }
        match crate::channel::json::from_str::<Value>(json) {
            Ok(value) => FromWorker::parse(&value),
            Err(_) => FromWorker::Other,
        }
    }

    pub(crate) fn parse(message: &Value) -> FromWorker {
        let seq = message.get("seq").and_then(Value::as_u64).unwrap_or(0);
        match message.get("act").and_then(Value::as_str) {
            Some("online") => FromWorker::Online,
            Some("queryServer") => FromWorker::QueryServer { seq, query: Query::parse(message) },
            Some("listening") => FromWorker::Listening { query: Query::parse(message) },
            Some("close") => match message.get("key").and_then(Value::as_str) {
                Some(key) => FromWorker::Close { key: key.to_owned() },
                None => FromWorker::Other,
            },
            Some("exitedAfterDisconnect") => FromWorker::ExitedAfterDisconnect { seq },
            Some(_) => FromWorker::Other,
            None => match message.get("ack").and_then(Value::as_u64) {
                Some(ack) => FromWorker::Reply {
                    ack,
                    accepted: message.get("accepted").and_then(Value::as_bool),
                },
                None => FromWorker::Other,
            },
        }
    }
}

/// A cluster message from the primary, as a worker reads it.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum FromPrimary {
    NewConn { seq: u64, key: String },
    Disconnect,
    /// The answer to one of our messages (`queryServer`, `exitedAfterDisconnect`).
    Reply { ack: u64, message: Value },
    Other,
}

/// The fields of a `newconn`, read without building a `Value`.
#[derive(serde::Deserialize)]
struct NewConnFields<'a> {
    act: Option<&'a str>,
    #[serde(borrow)]
    key: Option<std::borrow::Cow<'a, str>>,
    seq: Option<u64>,
}

impl FromPrimary {
    /// Parses the JSON text of a cluster message.
    pub(crate) fn parse_json(json: &str) -> FromPrimary {
        // The message of every connection takes the short way.
        if let Ok(NewConnFields { act: Some("newconn"), key: Some(key), seq }) =
            crate::channel::json::from_str::<NewConnFields<'_>>(json)
        {
            return FromPrimary::NewConn { seq: seq.unwrap_or(0), key: key.into_owned() };
        }
        match crate::channel::json::from_str::<Value>(json) {
            Ok(value) => FromPrimary::parse(value),
            Err(_) => FromPrimary::Other,
        }
    }

    pub(crate) fn parse(message: Value) -> FromPrimary {
        let seq = message.get("seq").and_then(Value::as_u64).unwrap_or(0);
        match message.get("act").and_then(Value::as_str) {
            Some("newconn") => match message.get("key").and_then(Value::as_str) {
                Some(key) => FromPrimary::NewConn { seq, key: key.to_owned() },
                None => FromPrimary::Other,
            },
            Some("disconnect") => FromPrimary::Disconnect,
            Some(_) => FromPrimary::Other,
            None => match message.get("ack").and_then(Value::as_u64) {
                Some(ack) => FromPrimary::Reply { ack, message },
                None => FromPrimary::Other,
            },
        }
    }
}

/// `sockname` in a round-robin query reply.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct Sockname {
    pub(crate) address: String,
    pub(crate) family: &'static str,
    pub(crate) port: u16,
}

impl Sockname {
    pub(crate) fn of(addr: std::net::SocketAddr) -> Sockname {
        Sockname {
            address: addr.ip().to_string(),
            family: if addr.is_ipv4() { "IPv4" } else { "IPv6" },
            port: addr.port(),
        }
    }
}

/// The primary's answer to `queryServer` (round-robin: no handle; shared: as the `msg` of the
/// handle). Field order as Node's primary writes it.
#[derive(Debug, Serialize)]
pub(crate) struct QueryReply<'a> {
    pub(crate) cmd: &'static str,
    /// `null` (round-robin, success), `0` (shared, success) or a negative libuv errno.
    pub(crate) errno: Option<i32>,
    pub(crate) key: &'a str,
    pub(crate) ack: u64,
    pub(crate) data: &'a Value,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) sockname: Option<Sockname>,
    pub(crate) seq: u64,
}

/// `{"cmd":"NODE_CLUSTER","act":ACT,"key":K,"seq":S}` (`newconn`, and a worker's `close`).
#[derive(Debug, Serialize)]
pub(crate) struct ActKey<'a> {
    pub(crate) cmd: &'static str,
    pub(crate) act: &'static str,
    pub(crate) key: &'a str,
    pub(crate) seq: u64,
}

/// `{"cmd":"NODE_CLUSTER","act":"newconn","key":K,"seq":S}` as compact JSON: the same bytes as
/// [`ActKey`] serializes to, written directly because the primary sends one per connection.
pub(crate) fn newconn(key: &str, seq: u64) -> Vec<u8> {
    let mut json = Vec::with_capacity(64 + key.len());
    json.extend_from_slice(br#"{"cmd":"NODE_CLUSTER","act":"newconn","key":"#);
    // A string always serializes (JSON-escaped, in quotes).
    let _ = serde_json::to_writer(&mut json, key);
    json.extend_from_slice(br#","seq":"#);
    json.extend_from_slice(seq.to_string().as_bytes());
    json.push(b'}');
    json
}

/// `{"cmd":"NODE_CLUSTER","ack":A,"accepted":B,"seq":S}`: a worker's answer to a `newconn`, the
/// same bytes as [`Ack`] serializes to, written directly because it is sent per connection.
pub(crate) fn accepted(ack: u64, accepted: bool, seq: u64) -> Vec<u8> {
    format!(r#"{{"cmd":"NODE_CLUSTER","ack":{ack},"accepted":{accepted},"seq":{seq}}}"#).into_bytes()
}

/// `{"cmd":"NODE_CLUSTER","act":ACT,"seq":S}` (`disconnect`, `online`, `exitedAfterDisconnect`).
#[derive(Debug, Serialize)]
pub(crate) struct Act {
    pub(crate) cmd: &'static str,
    pub(crate) act: &'static str,
    pub(crate) seq: u64,
}

/// `{"cmd":"NODE_CLUSTER","ack":A,"seq":S}`, and a worker's answer to `newconn` with `accepted`.
#[derive(Debug, Serialize)]
pub(crate) struct Ack {
    pub(crate) cmd: &'static str,
    pub(crate) ack: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) accepted: Option<bool>,
    pub(crate) seq: u64,
}

/// A worker's `queryServer` / `listening`, fields in Node's order.
#[derive(Debug, Serialize)]
pub(crate) struct ServerMessage<'a> {
    pub(crate) cmd: &'static str,
    pub(crate) act: &'static str,
    pub(crate) index: u64,
    pub(crate) data: Value,
    pub(crate) address: &'a str,
    pub(crate) port: u16,
    #[serde(rename = "addressType")]
    pub(crate) address_type: i64,
    pub(crate) flags: u32,
    pub(crate) backlog: bool,
    pub(crate) seq: u64,
}

/// Node's libuv errno for an I/O error (negative), for `errno` in a query reply.
pub(crate) fn uv_errno(error: &std::io::Error) -> i32 {
    -error.raw_os_error().unwrap_or(libc::EINVAL)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn keys_print_as_javascript_does() {
        let query = Query::parse(&json!({"act": "queryServer", "index": 0, "data": null,
            "address": "127.0.0.1", "port": 0, "addressType": 4, "flags": 0, "backlog": false}));
        assert_eq!(query.key(), "127.0.0.1:0:4:undefined:0");
        let query = Query::parse(&json!({"index": 1, "address": null, "port": 8080, "addressType": 4}));
        assert_eq!(query.key(), "null:8080:4:undefined:1");
        let query = Query::parse(&json!({"index": 0, "address": "127.0.0.1", "port": 0, "addressType": "udp4", "fd": -1}));
        assert_eq!(query.key(), "127.0.0.1:0:udp4:-1:0");
        assert_eq!(query.kind(), AddressKind::Udp);
    }

    #[test]
    fn replies_are_written_in_nodes_field_order() {
        let data = Value::Null;
        let reply = QueryReply {
            cmd: CLUSTER,
            errno: None,
            key: "127.0.0.1:0:4:undefined:0",
            ack: 1,
            data: &data,
            sockname: Some(Sockname::of("127.0.0.1:40349".parse().unwrap())),
            seq: 0,
        };
        assert_eq!(
            serde_json::to_string(&reply).unwrap(),
            r#"{"cmd":"NODE_CLUSTER","errno":null,"key":"127.0.0.1:0:4:undefined:0","ack":1,"data":null,"sockname":{"address":"127.0.0.1","family":"IPv4","port":40349},"seq":0}"#
        );
        let newconn_message = ActKey { cmd: CLUSTER, act: "newconn", key: "k", seq: 1 };
        assert_eq!(serde_json::to_string(&newconn_message).unwrap(), r#"{"cmd":"NODE_CLUSTER","act":"newconn","key":"k","seq":1}"#);
        for (key, seq) in [("k", 1), ("127.0.0.1:0:4:undefined:0", u64::MAX), ("\"quoted\"\n\u{1}é", 0)] {
            let expected = serde_json::to_vec(&ActKey { cmd: CLUSTER, act: "newconn", key, seq }).unwrap();
            assert_eq!(newconn(key, seq), expected, "{key:?}");
        }
        let reply = Ack { cmd: CLUSTER, ack: 1, accepted: Some(true), seq: 3 };
        assert_eq!(serde_json::to_string(&reply).unwrap(), r#"{"cmd":"NODE_CLUSTER","ack":1,"accepted":true,"seq":3}"#);
        for (ack, ok, seq) in [(1, true, 3), (u64::MAX, false, 0)] {
            let expected = serde_json::to_vec(&Ack { cmd: CLUSTER, ack, accepted: Some(ok), seq }).unwrap();
            assert_eq!(accepted(ack, ok, seq), expected);
        }
    }

    #[test]
    fn primary_messages_parse_the_short_way_and_the_long_way_alike() {
        let texts = [
            r#"{"cmd":"NODE_CLUSTER","act":"newconn","key":"127.0.0.1:0:4:undefined:0","seq":7}"#,
            r#"{"cmd":"NODE_CLUSTER","act":"newconn","key":"a\"b\u00e9","seq":1}"#,
            r#"{"cmd":"NODE_CLUSTER","act":"newconn","seq":1}"#,
            r#"{"cmd":"NODE_CLUSTER","act":"disconnect","seq":2}"#,
            r#"{"cmd":"NODE_CLUSTER","ack":3,"errno":null,"seq":4}"#,
        ];
        for text in texts {
            let long = FromPrimary::parse(serde_json::from_str(text).unwrap());
            assert_eq!(format!("{:?}", FromPrimary::parse_json(text)), format!("{long:?}"), "{text}");
        }
    }

    #[test]
    fn worker_messages_parse() {
        assert_eq!(FromWorker::parse(&json!({"cmd": CLUSTER, "act": "online", "seq": 0})), FromWorker::Online);
        assert_eq!(
            FromWorker::parse(&json!({"cmd": CLUSTER, "ack": 4, "accepted": false, "seq": 9})),
            FromWorker::Reply { ack: 4, accepted: Some(false) }
        );
        assert_eq!(FromWorker::parse(&json!({"cmd": CLUSTER, "act": "close"})), FromWorker::Other);
    }
}
