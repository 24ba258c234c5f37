//! A decoder for PostgreSQL's `pgoutput` logical replication messages (protocol version 1, text format).
//!
//! A parser of wire data: every read is bounds-checked and malformed input returns [`DecodeError`] naming
//! what was being read. It never panics and never allocates more than the message it was given.
//! Message layouts: PostgreSQL docs, "Logical Replication Message Formats".

use std::fmt;

/// One pgoutput message. Tuple values borrow from the decoded bytes: a row of 53 columns costs one
/// allocation (its value list), and the reader copies only the columns it keeps.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message<'a> {
    Begin {
        final_lsn: u64,
        commit_time: i64,
        xid: u32,
    },
    Commit {
        flags: u8,
        commit_lsn: u64,
        end_lsn: u64,
        commit_time: i64,
    },
    Origin {
        commit_lsn: u64,
        name: String,
    },
    Relation(Relation),
    Type {
        id: u32,
        namespace: String,
        name: String,
    },
    Insert {
        relation: u32,
        new: Vec<Value<'a>>,
    },
    /// `old` is present with REPLICA IDENTITY FULL ('O') or when a key column changed ('K').
    Update {
        relation: u32,
        old: Option<Vec<Value<'a>>>,
        new: Vec<Value<'a>>,
    },
    Delete {
        relation: u32,
        old: Vec<Value<'a>>,
    },
    Truncate {
        options: u8,
        relations: Vec<u32>,
    },
    Message {
        flags: u8,
        lsn: u64,
        prefix: String,
        content: Vec<u8>,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Relation {
    pub id: u32,
    pub namespace: String,
    pub name: String,
    pub replica_identity: u8,
    pub columns: Vec<Column>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Column {
    pub flags: u8,
    pub name: String,
    pub type_oid: u32,
    pub type_modifier: i32,
}

/// One column value of a tuple.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Value<'a> {
    Null,
    /// An unchanged TOASTed value: the update did not send it. It must never be read as NULL.
    Unchanged,
    Text(&'a str),
    Binary(&'a [u8]),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DecodeError {
    pub message: String,
}

impl fmt::Display for DecodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "malformed pgoutput message: {}", self.message)
    }
}

impl std::error::Error for DecodeError {}

fn err<T>(message: impl Into<String>) -> Result<T, DecodeError> {
    Err(DecodeError { message: message.into() })
}

/// Decodes one message (the payload of an XLogData frame).
pub fn decode(data: &[u8]) -> Result<Message<'_>, DecodeError> {
    let mut r = Reader { data, pos: 0 };
    let tag = r.u8("message type")?;
    let msg = match tag {
        b'B' => Message::Begin {
            final_lsn: r.u64("Begin.final_lsn")?,
            commit_time: r.i64("Begin.timestamp")?,
            xid: r.u32("Begin.xid")?,
        },
        b'C' => Message::Commit {
            flags: r.u8("Commit.flags")?,
            commit_lsn: r.u64("Commit.commit_lsn")?,
            end_lsn: r.u64("Commit.end_lsn")?,
            commit_time: r.i64("Commit.timestamp")?,
        },
        b'O' => Message::Origin { commit_lsn: r.u64("Origin.lsn")?, name: r.cstr("Origin.name")? },
        b'R' => {
            let id = r.u32("Relation.id")?;
            let namespace = r.cstr("Relation.namespace")?;
            let name = r.cstr("Relation.name")?;
            let replica_identity = r.u8("Relation.replica_identity")?;
            let n = r.i16("Relation.column_count")?;
            if n < 0 {
                return err(format!("Relation {name}: negative column count {n}"));
            }
            let mut columns = Vec::with_capacity((n as usize).min(r.remaining()));
            for _ in 0..n {
                columns.push(Column {
                    flags: r.u8("Relation.column.flags")?,
                    name: r.cstr("Relation.column.name")?,
                    type_oid: r.u32("Relation.column.type")?,
                    type_modifier: r.i32("Relation.column.typmod")?,
                });
            }
            Message::Relation(Relation { id, namespace, name, replica_identity, columns })
        }
        b'Y' => {
            Message::Type { id: r.u32("Type.id")?, namespace: r.cstr("Type.namespace")?, name: r.cstr("Type.name")? }
        }
        b'I' => {
            let relation = r.u32("Insert.relation")?;
            match r.u8("Insert.tuple_kind")? {
                b'N' => Message::Insert { relation, new: r.tuple()? },
                k => return err(format!("Insert: expected 'N' before the new tuple, got {k:#04x}")),
            }
        }
        b'U' => {
            let relation = r.u32("Update.relation")?;
            let mut old = None;
            let mut kind = r.u8("Update.tuple_kind")?;
            if kind == b'K' || kind == b'O' {
                old = Some(r.tuple()?);
                kind = r.u8("Update.tuple_kind")?;
            }
            if kind != b'N' {
                return err(format!("Update: expected 'N' before the new tuple, got {kind:#04x}"));
            }
            Message::Update { relation, old, new: r.tuple()? }
        }
        b'D' => {
            let relation = r.u32("Delete.relation")?;
            match r.u8("Delete.tuple_kind")? {
                b'K' | b'O' => Message::Delete { relation, old: r.tuple()? },
                k => return err(format!("Delete: expected 'K' or 'O', got {k:#04x}")),
            }
        }
        b'T' => {
            let n = r.i32("Truncate.relation_count")?;
            if n < 0 {
                return err(format!("Truncate: negative relation count {n}"));
            }
            let options = r.u8("Truncate.options")?;
            let mut relations = Vec::with_capacity((n as usize).min(r.remaining() / 4));
            for _ in 0..n {
                relations.push(r.u32("Truncate.relation")?);
            }
            Message::Truncate { options, relations }
        }
        b'M' => {
            let flags = r.u8("Message.flags")?;
            let lsn = r.u64("Message.lsn")?;
            let prefix = r.cstr("Message.prefix")?;
            let len = r.i32("Message.length")?;
            if len < 0 {
                return err(format!("Message: negative content length {len}"));
            }
            Message::Message { flags, lsn, prefix, content: r.bytes(len as usize, "Message.content")?.to_vec() }
        }
        other => return err(format!("unknown message type {other:#04x}")),
    };
    if r.remaining() != 0 {
        return err(format!("{} trailing bytes after a {} message", r.remaining(), tag as char));
    }
    Ok(msg)
}

struct Reader<'a> {
    data: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn remaining(&self) -> usize {
        self.data.len() - self.pos
    }

    fn bytes(&mut self, n: usize, what: &str) -> Result<&'a [u8], DecodeError> {
        if n > self.remaining() {
            return err(format!("{what}: needs {n} bytes, {} left", self.remaining()));
        }
        let out = &self.data[self.pos..self.pos + n];
        self.pos += n;
        Ok(out)
    }

    fn array<const N: usize>(&mut self, what: &str) -> Result<[u8; N], DecodeError> {
        let b = self.bytes(N, what)?;
        let mut out = [0u8; N];
        out.copy_from_slice(b);
        Ok(out)
    }

    fn u8(&mut self, what: &str) -> Result<u8, DecodeError> {
        Ok(self.array::<1>(what)?[0])
    }
    fn i16(&mut self, what: &str) -> Result<i16, DecodeError> {
        Ok(i16::from_be_bytes(self.array(what)?))
    }
    fn i32(&mut self, what: &str) -> Result<i32, DecodeError> {
        Ok(i32::from_be_bytes(self.array(what)?))
    }
    fn u32(&mut self, what: &str) -> Result<u32, DecodeError> {
        Ok(u32::from_be_bytes(self.array(what)?))
    }
    fn i64(&mut self, what: &str) -> Result<i64, DecodeError> {
        Ok(i64::from_be_bytes(self.array(what)?))
    }
    fn u64(&mut self, what: &str) -> Result<u64, DecodeError> {
        Ok(u64::from_be_bytes(self.array(what)?))
    }

    fn cstr(&mut self, what: &str) -> Result<String, DecodeError> {
        let rest = &self.data[self.pos..];
        let Some(end) = rest.iter().position(|b| *b == 0) else {
            return err(format!("{what}: string is not NUL-terminated"));
        };
        let s = std::str::from_utf8(&rest[..end]).map_err(|_| DecodeError { message: format!("{what}: not UTF-8") })?;
        self.pos += end + 1;
        Ok(s.to_owned())
    }

    fn tuple(&mut self) -> Result<Vec<Value<'a>>, DecodeError> {
        let n = self.i16("TupleData.column_count")?;
        if n < 0 {
            return err(format!("TupleData: negative column count {n}"));
        }
        let mut values = Vec::with_capacity((n as usize).min(self.remaining()));
        for i in 0..n {
            values.push(match self.u8("TupleData.kind")? {
                b'n' => Value::Null,
                b'u' => Value::Unchanged,
                kind @ (b't' | b'b') => {
                    let len = self.i32("TupleData.length")?;
                    if len < 0 {
                        return err(format!("TupleData column {i}: negative length {len}"));
                    }
                    let raw = self.bytes(len as usize, "TupleData.value")?;
                    if kind == b't' {
                        match std::str::from_utf8(raw) {
                            Ok(s) => Value::Text(s),
                            Err(_) => return err(format!("TupleData column {i}: text value is not UTF-8")),
                        }
                    } else {
                        Value::Binary(raw)
                    }
                }
                k => return err(format!("TupleData column {i}: unknown kind {k:#04x}")),
            });
        }
        Ok(values)
    }
}

#[cfg(test)]
pub mod tests {
    use super::*;

    /// Builds pgoutput messages by hand, as the server would send them.
    #[derive(Default)]
    pub struct Builder(pub Vec<u8>);

    impl Builder {
        pub fn tag(mut self, t: u8) -> Self {
            self.0.push(t);
            self
        }
        pub fn u8(mut self, v: u8) -> Self {
            self.0.push(v);
            self
        }
        pub fn i16(mut self, v: i16) -> Self {
            self.0.extend_from_slice(&v.to_be_bytes());
            self
        }
        pub fn i32(mut self, v: i32) -> Self {
            self.0.extend_from_slice(&v.to_be_bytes());
            self
        }
        pub fn u32(mut self, v: u32) -> Self {
            self.0.extend_from_slice(&v.to_be_bytes());
            self
        }
        pub fn u64(mut self, v: u64) -> Self {
            self.0.extend_from_slice(&v.to_be_bytes());
            self
        }
        pub fn cstr(mut self, s: &str) -> Self {
            self.0.extend_from_slice(s.as_bytes());
            self.0.push(0);
            self
        }
        pub fn text(self, s: &str) -> Self {
            let b = self.u8(b't').i32(s.len() as i32);
            let mut v = b.0;
            v.extend_from_slice(s.as_bytes());
            Builder(v)
        }
    }

    fn relation() -> Vec<u8> {
        Builder::default()
            .tag(b'R')
            .u32(16384)
            .cstr("public")
            .cstr("staging_acra_companies")
            .u8(b'd')
            .i16(2)
            .u8(1)
            .cstr("id")
            .u32(20)
            .i32(-1)
            .u8(0)
            .cstr("uen")
            .u32(25)
            .i32(-1)
            .0
    }

    #[test]
    fn decodes_every_message_kind() {
        let begin = Builder::default().tag(b'B').u64(0x1_0000_0010).u64(7).u32(42).0;
        assert_eq!(decode(&begin).unwrap(), Message::Begin { final_lsn: 0x1_0000_0010, commit_time: 7, xid: 42 });
        let commit = Builder::default().tag(b'C').u8(0).u64(10).u64(20).u64(30).0;
        assert_eq!(
            decode(&commit).unwrap(),
            Message::Commit { flags: 0, commit_lsn: 10, end_lsn: 20, commit_time: 30 }
        );
        let origin = Builder::default().tag(b'O').u64(5).cstr("upstream").0;
        assert_eq!(decode(&origin).unwrap(), Message::Origin { commit_lsn: 5, name: "upstream".into() });
        let Message::Relation(rel) = decode(&relation()).unwrap() else { panic!() };
        assert_eq!(rel.name, "staging_acra_companies");
        assert_eq!(rel.columns.iter().map(|c| c.name.as_str()).collect::<Vec<_>>(), ["id", "uen"]);
        let ty = Builder::default().tag(b'Y').u32(99).cstr("public").cstr("mood").0;
        assert_eq!(decode(&ty).unwrap(), Message::Type { id: 99, namespace: "public".into(), name: "mood".into() });
        let insert = Builder::default().tag(b'I').u32(16384).u8(b'N').i16(2).text("1").text("201908808K").0;
        assert_eq!(
            decode(&insert).unwrap(),
            Message::Insert { relation: 16384, new: vec![Value::Text("1"), Value::Text("201908808K")] }
        );
        let update = Builder::default().tag(b'U').u32(16384).u8(b'N').i16(3).text("1").u8(b'u').u8(b'n').0;
        assert_eq!(
            decode(&update).unwrap(),
            Message::Update { relation: 16384, old: None, new: vec![Value::Text("1"), Value::Unchanged, Value::Null] }
        );
        let update_k = Builder::default().tag(b'U').u32(1).u8(b'K').i16(1).text("1").u8(b'N').i16(1).text("2").0;
        let Message::Update { old: Some(old), .. } = decode(&update_k).unwrap() else { panic!() };
        assert_eq!(old, vec![Value::Text("1")]);
        let delete = Builder::default().tag(b'D').u32(1).u8(b'K').i16(1).text("9").0;
        assert_eq!(decode(&delete).unwrap(), Message::Delete { relation: 1, old: vec![Value::Text("9")] });
        let truncate = Builder::default().tag(b'T').i32(2).u8(1).u32(1).u32(2).0;
        assert_eq!(decode(&truncate).unwrap(), Message::Truncate { options: 1, relations: vec![1, 2] });
        let mut message = Builder::default().tag(b'M').u8(1).u64(77).cstr("acraflow").i32(2).0;
        message.extend_from_slice(b"hi");
        assert_eq!(
            decode(&message).unwrap(),
            Message::Message { flags: 1, lsn: 77, prefix: "acraflow".into(), content: b"hi".to_vec() }
        );
    }

    #[test]
    fn every_truncation_of_a_valid_message_is_an_error_not_a_panic() {
        let insert = Builder::default().tag(b'I').u32(16384).u8(b'N').i16(2).text("1").text("201908808K").0;
        for msg in [relation(), insert] {
            for len in 0..msg.len() {
                assert!(decode(&msg[..len]).is_err(), "prefix of {len} bytes decoded");
            }
        }
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        let cases: Vec<Vec<u8>> = vec![
            vec![],
            vec![b'Z'],
            Builder::default().tag(b'I').u32(1).u8(b'X').0,
            Builder::default().tag(b'I').u32(1).u8(b'N').i16(-1).0,
            Builder::default().tag(b'I').u32(1).u8(b'N').i16(1).u8(b't').i32(-5).0,
            Builder::default().tag(b'I').u32(1).u8(b'N').i16(1).u8(b't').i32(i32::MAX).0,
            Builder::default().tag(b'I').u32(1).u8(b'N').i16(i16::MAX).0,
            Builder::default().tag(b'I').u32(1).u8(b'N').i16(1).u8(b't').i32(2).u8(0xff).u8(0xfe).0,
            Builder::default().tag(b'R').u32(1).cstr("public").0,
            Builder::default().tag(b'T').i32(i32::MAX).u8(0).0,
            Builder::default().tag(b'M').u8(0).u64(1).cstr("p").i32(-1).0,
            Builder::default().tag(b'B').u64(1).u64(2).u32(3).u8(9).0,
        ];
        for case in cases {
            assert!(decode(&case).is_err(), "{case:?} decoded");
        }
        // Pseudo-random bytes: whatever they decode to, no panic.
        let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
        for _ in 0..20_000 {
            let len = (x % 64) as usize;
            let bytes: Vec<u8> = (0..len)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    (x >> 24) as u8
                })
                .collect();
            let _ = decode(&bytes);
        }
    }
}
