//! Envoy dynamic metadata as proxy-wasm returns it for the `metadata` property: a serialized
//! `envoy.config.core.v3.Metadata` protobuf. Native `jwt_authn` with `payload_in_metadata` puts
//! the verified payload there as a `google.protobuf.Struct`; this decodes exactly the parts
//! needed (`filter_metadata[namespace].fields[key]`) into JSON, with no protobuf dependency.
//!
//! ```text
//! Metadata  { map<string, Struct> filter_metadata = 1; … }
//! Struct    { map<string, Value> fields = 1; }
//! Value     { oneof kind { NullValue null_value = 1; double number_value = 2;
//!             string string_value = 3; bool bool_value = 4; Struct struct_value = 5;
//!             ListValue list_value = 6; } }
//! ListValue { repeated Value values = 1; }
//! ```
//!
//! Numbers arrive as doubles (JSON has no integers either): whole numbers become JSON integers,
//! so `exp`, `iat` read as they do from a token.

use serde_json::{Map, Number, Value};

/// Nesting deeper than this is refused (a bounded recursion on untrusted-shaped input).
const MAX_DEPTH: usize = 32;

enum Field<'a> {
    Varint(u64),
    Fixed64([u8; 8]),
    Bytes(&'a [u8]),
    Fixed32,
}

struct Reader<'a> {
    buf: &'a [u8],
}

impl<'a> Reader<'a> {
    fn varint(&mut self) -> Option<u64> {
        let mut v: u64 = 0;
        for i in 0..10 {
            let (&b, rest) = self.buf.split_first()?;
            self.buf = rest;
            v |= u64::from(b & 0x7f) << (7 * i);
            if b & 0x80 == 0 {
                return Some(v);
            }
        }
        None
    }

    /// The next `(field number, value)`, `None` at the end, `Some(Err)` on malformed input.
    fn next(&mut self) -> Option<Result<(u64, Field<'a>), ()>> {
        if self.buf.is_empty() {
            return None;
        }
        Some(self.field().ok_or(()))
    }

    fn field(&mut self) -> Option<(u64, Field<'a>)> {
        let tag = self.varint()?;
        let value = match tag & 7 {
            0 => Field::Varint(self.varint()?),
            1 => {
                let (b, rest) = self.buf.split_at_checked(8)?;
                self.buf = rest;
                Field::Fixed64(b.try_into().ok()?)
            }
            2 => {
                let len = usize::try_from(self.varint()?).ok()?;
                let (b, rest) = self.buf.split_at_checked(len)?;
                self.buf = rest;
                Field::Bytes(b)
            }
            5 => {
                let (_, rest) = self.buf.split_at_checked(4)?;
                self.buf = rest;
                Field::Fixed32
            }
            _ => return None,
        };
        Some((tag >> 3, value))
    }
}

/// The `(key, value bytes)` of a protobuf map entry message.
fn map_entry(entry: &[u8]) -> Option<(&str, &[u8])> {
    let mut r = Reader { buf: entry };
    let (mut key, mut value) = ("", &[][..]);
    while let Some(f) = r.next() {
        match f.ok()? {
            (1, Field::Bytes(k)) => key = std::str::from_utf8(k).ok()?,
            (2, Field::Bytes(v)) => value = v,
            _ => {}
        }
    }
    Some((key, value))
}

fn decode_struct(buf: &[u8], depth: usize) -> Option<Map<String, Value>> {
    if depth > MAX_DEPTH {
        return None;
    }
    let mut out = Map::new();
    let mut r = Reader { buf };
    while let Some(f) = r.next() {
        if let (1, Field::Bytes(entry)) = f.ok()? {
            let (k, v) = map_entry(entry)?;
            out.insert(k.to_string(), decode_value(v, depth + 1)?);
        }
    }
    Some(out)
}

fn decode_value(buf: &[u8], depth: usize) -> Option<Value> {
    if depth > MAX_DEPTH {
        return None;
    }
    let mut out = Value::Null;
    let mut r = Reader { buf };
    while let Some(f) = r.next() {
        out = match f.ok()? {
            (1, _) => Value::Null,
            (2, Field::Fixed64(b)) => number(f64::from_le_bytes(b)),
            (3, Field::Bytes(s)) => Value::String(std::str::from_utf8(s).ok()?.to_string()),
            (4, Field::Varint(b)) => Value::Bool(b != 0),
            (5, Field::Bytes(s)) => Value::Object(decode_struct(s, depth + 1)?),
            (6, Field::Bytes(l)) => {
                let mut list = Vec::new();
                let mut lr = Reader { buf: l };
                while let Some(item) = lr.next() {
                    if let (1, Field::Bytes(v)) = item.ok()? {
                        list.push(decode_value(v, depth + 1)?);
                    }
                }
                Value::Array(list)
            }
            _ => continue,
        };
    }
    Some(out)
}

fn number(f: f64) -> Value {
    // Whole numbers within 2^53 are exact as doubles: give them back as integers.
    if f.fract() == 0.0 && f.abs() < 9_007_199_254_740_992.0 {
        if f >= 0.0 {
            return Value::Number(Number::from(f as u64));
        }
        return Value::Number(Number::from(f as i64));
    }
    Number::from_f64(f).map_or(Value::Null, Value::Number)
}

/// `filter_metadata[namespace].fields[key]` of a serialized `Metadata` when it is a JSON object
/// (native `jwt_authn`'s verified payload, `payload_in_metadata`).
pub fn claims(metadata: &[u8], namespace: &str, key: &str) -> Option<crate::jwt::Claims> {
    match lookup(metadata, namespace, key)? {
        Value::Object(map) => Some(map),
        _ => None,
    }
}

/// `filter_metadata[namespace].fields[key]` of a serialized `Metadata`, as JSON.
pub fn lookup(metadata: &[u8], namespace: &str, key: &str) -> Option<Value> {
    let mut r = Reader { buf: metadata };
    while let Some(f) = r.next() {
        let (1, Field::Bytes(entry)) = f.ok()? else {
            continue;
        };
        let (ns, structure) = map_entry(entry)?;
        if ns != namespace {
            continue;
        }
        let mut sr = Reader { buf: structure };
        while let Some(sf) = sr.next() {
            let (1, Field::Bytes(field)) = sf.ok()? else {
                continue;
            };
            let (k, v) = map_entry(field)?;
            if k == key {
                return decode_value(v, 0);
            }
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// A tiny protobuf writer for the test vectors.
    fn len_field(n: u64, body: &[u8]) -> Vec<u8> {
        let mut out = vec![];
        varint(&mut out, (n << 3) | 2);
        varint(&mut out, body.len() as u64);
        out.extend_from_slice(body);
        out
    }
    fn varint(out: &mut Vec<u8>, mut v: u64) {
        loop {
            let b = (v & 0x7f) as u8;
            v >>= 7;
            if v == 0 {
                out.push(b);
                return;
            }
            out.push(b | 0x80);
        }
    }
    fn entry(k: &str, v: &[u8]) -> Vec<u8> {
        let mut e = len_field(1, k.as_bytes());
        e.extend(len_field(2, v));
        e
    }
    fn value(v: &Value) -> Vec<u8> {
        match v {
            Value::Null => vec![8, 0],
            Value::Bool(b) => vec![0x20, u8::from(*b)],
            Value::Number(n) => {
                let mut out = vec![0x11];
                out.extend_from_slice(&n.as_f64().unwrap().to_le_bytes());
                out
            }
            Value::String(s) => len_field(3, s.as_bytes()),
            Value::Array(a) => {
                let body: Vec<u8> = a.iter().flat_map(|x| len_field(1, &value(x))).collect();
                len_field(6, &body)
            }
            Value::Object(o) => len_field(5, &structure(o)),
        }
    }
    fn structure(o: &Map<String, Value>) -> Vec<u8> {
        o.iter()
            .flat_map(|(k, v)| len_field(1, &entry(k, &value(v))))
            .collect()
    }

    #[test]
    fn decodes_a_jwt_authn_payload() {
        let payload = json!({"sub": "alice", "exp": 1767225600, "room": ["a", "b"], "n": -3,
                             "f": 1.5, "ok": true, "none": null, "nested": {"x": "y"}});
        let Value::Object(p) = &payload else {
            unreachable!()
        };
        let ns_struct = structure(&Map::from_iter([(
            "jwt_payload".to_string(),
            payload.clone(),
        )]));
        let mut md = len_field(1, &entry("other.ns", &structure(p)));
        md.extend(len_field(
            1,
            &entry("envoy.filters.http.jwt_authn", &ns_struct),
        ));
        assert_eq!(
            lookup(&md, "envoy.filters.http.jwt_authn", "jwt_payload"),
            Some(payload)
        );
        assert_eq!(
            lookup(&md, "envoy.filters.http.jwt_authn", "jwt_header"),
            None
        );
        assert_eq!(lookup(&md, "nope", "jwt_payload"), None);
    }

    #[test]
    fn malformed_input_is_none_never_a_panic() {
        for bad in [
            &[0x0a, 0x05, 0x01][..],
            &[0x0a],
            &[0xff; 12],
            &[0x0b],
            b"garbage",
        ] {
            assert_eq!(lookup(bad, "a", "b"), None);
        }
        // Deep nesting is refused.
        let mut v = value(&json!("x"));
        for _ in 0..100 {
            v = len_field(5, &len_field(1, &entry("k", &v)));
        }
        let md = len_field(1, &entry("ns", &len_field(1, &entry("k", &v))));
        assert_eq!(lookup(&md, "ns", "k"), None);
    }
}
