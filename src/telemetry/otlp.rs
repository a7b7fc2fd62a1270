//! Spans written straight into their OTLP protobuf encoding.
//!
//! A sampled call's span is bytes from its first field on: each attribute
//! and event is encoded as it happens (with prost's encoding functions, by
//! the field numbers of `opentelemetry/proto/trace/v1/trace.proto`), and a
//! finished span is handed to the export queue as it is. A batch is then
//! one request made of the spans' bytes behind a few length prefixes,
//! written into the request body by [`PreEncoded`]. Protobuf lets a message's fields come in any
//! order and a repeated field's items be spread among the others, so the
//! attributes known only at the end (the peer, the status) follow the
//! events. Against building `opentelemetry-proto`'s structs and encoding
//! them at export this saves a heap value per string, the structs' drop,
//! and prost's walk of the nested lengths (see the README's figures).

use std::sync::Arc;

use bytes::BufMut;
use prost::Message as _;
use prost::encoding::{WireType, encode_key, encode_varint, encoded_len_varint};
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};

use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceResponse;

/// Field numbers of `Span`.
pub(super) mod span {
    pub const TRACE_ID: u32 = 1;
    pub const SPAN_ID: u32 = 2;
    pub const TRACE_STATE: u32 = 3;
    pub const PARENT_SPAN_ID: u32 = 4;
    pub const NAME: u32 = 5;
    pub const KIND: u32 = 6;
    pub const START_TIME: u32 = 7;
    pub const END_TIME: u32 = 8;
    pub const ATTRIBUTES: u32 = 9;
    pub const EVENTS: u32 = 11;
    pub const STATUS: u32 = 15;
    pub const FLAGS: u32 = 16;
    /// `SpanKind.SPAN_KIND_CLIENT`.
    pub const KIND_CLIENT: u64 = 3;
}

/// Field numbers of `Span.Event`.
pub(super) mod event {
    pub const TIME: u32 = 1;
    pub const NAME: u32 = 2;
    pub const ATTRIBUTES: u32 = 3;
}

/// Field numbers of `Status`.
pub(super) mod status {
    pub const MESSAGE: u32 = 2;
    pub const CODE: u32 = 3;
    /// `StatusCode.STATUS_CODE_ERROR`.
    pub const CODE_ERROR: u64 = 2;
}

/// An attribute's value.
#[derive(Debug, Clone, Copy)]
pub enum Attr<'a> {
    Str(&'a str),
    Int(i64),
    Strs(&'a [String]),
}

/// Appends protobuf fields to a message's encoding.
pub struct Fields<'a>(pub &'a mut Vec<u8>);

/// A varint pushed onto `buf` (prost's `encode_varint` writes each byte
/// through `BufMut::put_u8`, which does more per byte; most values here,
/// tags and lengths, are one byte).
#[inline]
fn put_varint(buf: &mut Vec<u8>, mut value: u64) {
    while value >= 0x80 {
        buf.push(value as u8 | 0x80);
        value >>= 7;
    }
    buf.push(value as u8);
}

/// A field's key: its number and wire type.
#[inline]
fn put_key(buf: &mut Vec<u8>, tag: u32, wire_type: WireType) {
    put_varint(buf, u64::from(tag << 3 | wire_type as u32));
}

impl Fields<'_> {
    pub fn bytes(&mut self, tag: u32, value: &[u8]) {
        put_key(self.0, tag, WireType::LengthDelimited);
        put_varint(self.0, value.len() as u64);
        self.0.extend_from_slice(value);
    }

    pub fn string(&mut self, tag: u32, value: &str) {
        self.bytes(tag, value.as_bytes());
    }

    pub fn varint(&mut self, tag: u32, value: u64) {
        put_key(self.0, tag, WireType::Varint);
        put_varint(self.0, value);
    }

    pub fn fixed64(&mut self, tag: u32, value: u64) {
        put_key(self.0, tag, WireType::SixtyFourBit);
        self.0.extend_from_slice(&value.to_le_bytes());
    }

    pub fn fixed32(&mut self, tag: u32, value: u32) {
        put_key(self.0, tag, WireType::ThirtyTwoBit);
        self.0.extend_from_slice(&value.to_le_bytes());
    }

    /// A nested message, written by `body`; its key and length go in
    /// front once its size is known (a move of the few bytes written).
    pub fn message(&mut self, tag: u32, body: impl FnOnce(&mut Fields<'_>)) {
        let start = self.0.len();
        body(&mut Fields(self.0));
        let len = self.0.len() - start;
        const HEAD: usize = 15;
        let mut head = [0u8; HEAD];
        let mut at = &mut head[..];
        encode_key(tag, WireType::LengthDelimited, &mut at);
        encode_varint(len as u64, &mut at);
        let n = HEAD - at.len();
        self.0.extend_from_slice(&head[..n]);
        self.0[start..].rotate_right(n);
    }

    /// A `Span.Event` in the span's events, written in one pass.
    pub fn event(&mut self, time_unix_nano: u64, name: &str, attributes: &[(&str, Attr<'_>)]) {
        let body = 9
            + field_len(name.len())
            + attributes
                .iter()
                .map(|(k, v)| field_len(kv_len(k, v)))
                .sum::<usize>();
        self.0.reserve(1 + encoded_len_varint(body as u64) + body);
        put_key(self.0, span::EVENTS, WireType::LengthDelimited);
        put_varint(self.0, body as u64);
        self.fixed64(event::TIME, time_unix_nano);
        self.string(event::NAME, name);
        for (key, value) in attributes {
            self.attribute(event::ATTRIBUTES, key, *value);
        }
    }

    /// A `KeyValue` in the repeated field `tag`, written in one pass: its
    /// lengths are worked out first, so nothing moves.
    pub fn attribute(&mut self, tag: u32, key: &str, value: Attr<'_>) {
        let any = value.encoded_len();
        let kv = field_len(key.len()) + field_len(any);
        if let (Attr::Str(s), true) = (value, kv < 0x80 && tag < 0x10) {
            // The common case, every length one byte: four copies.
            let buf = &mut *self.0;
            buf.reserve(2 + kv);
            let key_byte = (tag << 3) as u8 | WireType::LengthDelimited as u8;
            buf.extend_from_slice(&[key_byte, kv as u8, 0x0a, key.len() as u8]);
            buf.extend_from_slice(key.as_bytes());
            buf.extend_from_slice(&[0x12, any as u8, 0x0a, s.len() as u8]);
            buf.extend_from_slice(s.as_bytes());
            return;
        }
        self.0.reserve(2 + encoded_len_varint(kv as u64) + kv);
        put_key(self.0, tag, WireType::LengthDelimited);
        put_varint(self.0, kv as u64);
        self.string(1, key);
        put_key(self.0, 2, WireType::LengthDelimited);
        put_varint(self.0, any as u64);
        match value {
            Attr::Str(s) => self.string(1, s),
            // int64 is encoded as the two's complement varint.
            Attr::Int(i) => self.varint(3, i as u64),
            Attr::Strs(items) => {
                put_key(self.0, 5, WireType::LengthDelimited);
                put_varint(self.0, array_len(items) as u64);
                for item in items {
                    put_key(self.0, 1, WireType::LengthDelimited);
                    put_varint(self.0, field_len(item.len()) as u64);
                    self.string(1, item);
                }
            }
        }
    }
}

impl Attr<'_> {
    /// The length of the `AnyValue` holding it.
    fn encoded_len(&self) -> usize {
        match self {
            Attr::Str(s) => field_len(s.len()),
            Attr::Int(i) => 1 + encoded_len_varint(*i as u64),
            Attr::Strs(items) => field_len(array_len(items)),
        }
    }
}

/// The length of a `KeyValue`.
fn kv_len(key: &str, value: &Attr<'_>) -> usize {
    field_len(key.len()) + field_len(value.encoded_len())
}

/// The length of an `ArrayValue` of strings.
fn array_len(items: &[String]) -> usize {
    items.iter().map(|i| field_len(field_len(i.len()))).sum()
}

/// The length of a length-delimited field of `len` bytes (one-byte key).
fn field_len(len: usize) -> usize {
    1 + encoded_len_varint(len as u64) + len
}

/// A batch of spans to export: one `ExportTraceServiceRequest` of
/// `spans` (each a `Span`'s encoding) under the sidecar's resource and
/// scope (each a message's encoding), written by [`PreEncoded`] straight
/// into the request body: the spans' bytes are copied once, behind three
/// length prefixes.
pub struct Batch {
    pub envelope: Arc<Envelope>,
    pub spans: Vec<Vec<u8>>,
}

/// The encodings of the sidecar's `Resource` and `InstrumentationScope`.
pub struct Envelope {
    pub resource: Vec<u8>,
    pub scope: Vec<u8>,
}

impl Batch {
    fn write(&self, out: &mut impl BufMut) {
        fn prefix(tag: u32, len: usize, out: &mut impl BufMut) {
            encode_key(tag, WireType::LengthDelimited, out);
            encode_varint(len as u64, out);
        }
        let Envelope { resource, scope } = &*self.envelope;
        let spans_len: usize = self.spans.iter().map(|s| field_len(s.len())).sum();
        let scope_spans = field_len(scope.len()) + spans_len;
        let resource_spans = field_len(resource.len()) + field_len(scope_spans);
        // ExportTraceServiceRequest.resource_spans (1)
        prefix(1, resource_spans, out);
        // ResourceSpans.resource (1), ResourceSpans.scope_spans (2)
        prefix(1, resource.len(), out);
        out.put_slice(resource);
        prefix(2, scope_spans, out);
        // ScopeSpans.scope (1), ScopeSpans.spans (2)
        prefix(1, scope.len(), out);
        out.put_slice(scope);
        for span in &self.spans {
            prefix(2, span.len(), out);
            out.put_slice(span);
        }
    }
}

/// A codec that writes a [`Batch`] as it is and decodes the OTLP trace
/// service's answer.
#[derive(Debug, Clone, Copy, Default)]
pub struct PreEncoded;

impl Codec for PreEncoded {
    type Encode = Batch;
    type Decode = ExportTraceServiceResponse;
    type Encoder = PreEncoded;
    type Decoder = PreEncoded;

    fn encoder(&mut self) -> Self::Encoder {
        PreEncoded
    }

    fn decoder(&mut self) -> Self::Decoder {
        PreEncoded
    }
}

impl Encoder for PreEncoded {
    type Item = Batch;
    type Error = tonic::Status;

    fn encode(&mut self, item: Batch, dst: &mut EncodeBuf<'_>) -> Result<(), Self::Error> {
        item.write(dst);
        Ok(())
    }
}

impl Decoder for PreEncoded {
    type Item = ExportTraceServiceResponse;
    type Error = tonic::Status;

    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Self::Item>, Self::Error> {
        ExportTraceServiceResponse::decode(src)
            .map(Some)
            .map_err(|e| tonic::Status::internal(format!("the receiver's answer: {e}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
    use opentelemetry_proto::tonic::common::v1::{AnyValue, InstrumentationScope, any_value};
    use opentelemetry_proto::tonic::resource::v1::Resource;
    use opentelemetry_proto::tonic::trace::v1::Span;

    fn string_of(value: Option<&AnyValue>) -> Option<&str> {
        match value?.value.as_ref()? {
            any_value::Value::StringValue(s) => Some(s),
            _ => None,
        }
    }

    #[test]
    fn written_spans_decode_as_the_official_messages() {
        let mut bytes = Vec::new();
        let mut f = Fields(&mut bytes);
        f.bytes(span::TRACE_ID, &[7; 16]);
        f.bytes(span::SPAN_ID, &[9; 8]);
        f.fixed32(span::FLAGS, 0x301);
        f.string(span::NAME, "agents.v1.Agent/Invoke");
        f.varint(span::KIND, span::KIND_CLIENT);
        f.fixed64(span::START_TIME, 1_700_000_000_000_000_000);
        f.attribute(span::ATTRIBUTES, "rpc.method", Attr::Str("Invoke"));
        f.attribute(span::ATTRIBUTES, "server.port", Attr::Int(50051));
        f.attribute(span::ATTRIBUTES, "negative", Attr::Int(-3));
        let long = "x".repeat(300);
        // Past the one-byte lengths of the short path.
        f.attribute(span::ATTRIBUTES, "long", Attr::Str(&long));
        let candidates = ["a cost 1.0".to_string(), long.clone()];
        f.event(
            5,
            "pick",
            &[
                ("agentmesh.candidates", Attr::Strs(&candidates)),
                ("agentmesh.attempt", Attr::Int(2)),
            ],
        );
        // An attribute after the events, as the span's end writes them.
        f.attribute(
            span::ATTRIBUTES,
            "network.peer.address",
            Attr::Str("127.0.0.2"),
        );
        f.fixed64(span::END_TIME, 1_700_000_000_000_000_900);
        f.message(span::STATUS, |s| {
            s.string(status::MESSAGE, "UNAVAILABLE: gone");
            s.varint(status::CODE, status::CODE_ERROR);
        });

        let resource = Resource {
            attributes: vec![],
            ..Default::default()
        }
        .encode_to_vec();
        let scope = InstrumentationScope {
            name: "agentmesh".into(),
            ..Default::default()
        }
        .encode_to_vec();
        let batch = Batch {
            envelope: Arc::new(Envelope { resource, scope }),
            spans: vec![bytes.clone(), bytes],
        };
        let mut request = Vec::new();
        batch.write(&mut request);
        let decoded = ExportTraceServiceRequest::decode(&request[..]).expect("a valid request");
        let scope_spans = &decoded.resource_spans[0].scope_spans[0];
        assert_eq!(scope_spans.scope.as_ref().unwrap().name, "agentmesh");
        assert_eq!(scope_spans.spans.len(), 2);
        let s: &Span = &scope_spans.spans[1];
        assert_eq!(s.trace_id, vec![7; 16]);
        assert_eq!(s.span_id, vec![9; 8]);
        assert_eq!(s.flags, 0x301);
        assert_eq!(s.name, "agents.v1.Agent/Invoke");
        assert_eq!(s.kind, 3);
        assert_eq!(s.start_time_unix_nano, 1_700_000_000_000_000_000);
        assert_eq!(s.end_time_unix_nano, 1_700_000_000_000_000_900);
        let keys: Vec<&str> = s.attributes.iter().map(|a| a.key.as_str()).collect();
        assert_eq!(
            keys,
            [
                "rpc.method",
                "server.port",
                "negative",
                "long",
                "network.peer.address"
            ]
        );
        assert_eq!(string_of(s.attributes[0].value.as_ref()), Some("Invoke"));
        assert_eq!(
            string_of(s.attributes[3].value.as_ref()),
            Some(long.as_str())
        );
        assert_eq!(string_of(s.attributes[4].value.as_ref()), Some("127.0.0.2"));
        let int = |i: usize| match s.attributes[i].value.as_ref().unwrap().value {
            Some(any_value::Value::IntValue(n)) => n,
            ref other => panic!("{other:?}"),
        };
        assert_eq!((int(1), int(2)), (50051, -3));
        let pick = &s.events[0];
        assert_eq!((pick.name.as_str(), pick.time_unix_nano), ("pick", 5));
        let Some(any_value::Value::ArrayValue(array)) =
            &pick.attributes[0].value.as_ref().unwrap().value
        else {
            panic!("{:?}", pick.attributes[0]);
        };
        let items: Vec<_> = array.values.iter().map(|v| string_of(Some(v))).collect();
        assert_eq!(items, [Some("a cost 1.0"), Some(long.as_str())]);
        assert_eq!(pick.attributes[1].key, "agentmesh.attempt");
        let status = s.status.as_ref().unwrap();
        assert_eq!(
            (status.code, status.message.as_str()),
            (2, "UNAVAILABLE: gone")
        );
    }
}
