//! The envelope around a forwarded payload:
//! `{gateway, function, topic, seq, ts, payload}` in JSON or CBOR.
//!
//! `seq` increases by one per record and sink, so the cloud can spot gaps and
//! duplicates; `ts` is the forward time in milliseconds since the Unix epoch.
//! In JSON, a payload that is itself JSON is embedded as JSON; any other
//! payload is carried as base64 under `payload_base64`. In CBOR the payload is
//! always a byte string.

use base64::Engine as _;
use ciborium::value::Value as Cbor;

use super::SinkRecord;
use crate::config::EnvelopeFormat;

/// Encodes `record` with sequence number `seq`.
pub fn encode(format: EnvelopeFormat, gateway: &str, seq: u64, record: &SinkRecord) -> Vec<u8> {
    match format {
        EnvelopeFormat::Json => {
            let mut obj = serde_json::Map::new();
            obj.insert("gateway".into(), gateway.into());
            obj.insert("function".into(), record.function.as_str().into());
            obj.insert("topic".into(), record.source_topic.as_str().into());
            obj.insert("seq".into(), seq.into());
            obj.insert("ts".into(), record.ts_ms.into());
            match serde_json::from_slice::<serde_json::Value>(&record.payload) {
                Ok(v) => obj.insert("payload".into(), v),
                Err(_) => obj.insert(
                    "payload_base64".into(),
                    base64::engine::general_purpose::STANDARD
                        .encode(&record.payload)
                        .into(),
                ),
            };
            serde_json::Value::Object(obj).to_string().into_bytes()
        }
        EnvelopeFormat::Cbor => {
            let map = Cbor::Map(vec![
                (Cbor::Text("gateway".into()), Cbor::Text(gateway.into())),
                (
                    Cbor::Text("function".into()),
                    Cbor::Text(record.function.clone()),
                ),
                (
                    Cbor::Text("topic".into()),
                    Cbor::Text(record.source_topic.clone()),
                ),
                (Cbor::Text("seq".into()), Cbor::Integer(seq.into())),
                (Cbor::Text("ts".into()), Cbor::Integer(record.ts_ms.into())),
                (
                    Cbor::Text("payload".into()),
                    Cbor::Bytes(record.payload.to_vec()),
                ),
            ]);
            let mut out = Vec::with_capacity(record.payload.len() + 96);
            // Writing into a Vec cannot fail for a Value built above.
            if let Err(e) = ciborium::into_writer(&map, &mut out) {
                tracing::error!(error = %e, "CBOR envelope encoding failed.");
            }
            out
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(payload: &[u8]) -> SinkRecord {
        SinkRecord {
            function: "enrich".into(),
            source_topic: "sensors/a/temperature".into(),
            payload: bytes::Bytes::copy_from_slice(payload),
            ts_ms: 1_700_000_000_000,
        }
    }

    #[test]
    fn json_embeds_json_payloads() {
        let out = encode(EnvelopeFormat::Json, "gw", 7, &record(br#"{"value":1.5}"#));
        let v: serde_json::Value = serde_json::from_slice(&out).unwrap_or_default();
        assert_eq!(v["gateway"], "gw");
        assert_eq!(v["function"], "enrich");
        assert_eq!(v["topic"], "sensors/a/temperature");
        assert_eq!(v["seq"], 7);
        assert_eq!(v["ts"], 1_700_000_000_000u64);
        assert_eq!(v["payload"]["value"], 1.5);
    }

    #[test]
    fn json_carries_binary_as_base64() {
        let out = encode(EnvelopeFormat::Json, "gw", 1, &record(&[0xff, 0x00, 0x10]));
        let v: serde_json::Value = serde_json::from_slice(&out).unwrap_or_default();
        assert_eq!(v["payload_base64"], "/wAQ");
        assert!(v.get("payload").is_none());
    }

    #[test]
    fn cbor_round_trips() {
        let out = encode(EnvelopeFormat::Cbor, "gw", 3, &record(b"raw"));
        let v: Cbor = ciborium::from_reader(out.as_slice()).unwrap_or(Cbor::Null);
        let map = v.as_map().cloned().unwrap_or_default();
        let get = |k: &str| {
            map.iter()
                .find(|(key, _)| key.as_text() == Some(k))
                .map(|(_, v)| v.clone())
        };
        assert_eq!(get("seq"), Some(Cbor::Integer(3.into())));
        assert_eq!(get("payload"), Some(Cbor::Bytes(b"raw".to_vec())));
        assert_eq!(get("gateway"), Some(Cbor::Text("gw".into())));
    }
}
