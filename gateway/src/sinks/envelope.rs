//! The envelope around a forwarded payload:
//! `{id, gateway, function, topic, seq, ts, payload}` in JSON or CBOR.
//!
//! `seq` is the record's outbox sequence number: unique per gateway,
//! increasing in delivery order (per sink it has gaps where other sinks'
//! records sit). `id` is `<gateway>-<seq>`, the idempotency key: a record
//! sent twice (after a reconnect or a crash) carries the same `id`. `ts` is
//! the forward time in milliseconds since the Unix epoch. A batch (an array
//! of envelopes) has a key of its own, [`batch_key`]:
//! `<gateway>-<first seq>-<last seq>`. In JSON, a payload
//! that is itself JSON is embedded as JSON; any other payload is carried as
//! base64 under `payload_base64`. In CBOR the payload is always a byte
//! string. A batch is an array of envelopes.

use base64::Engine as _;
use ciborium::value::Value as Cbor;

use crate::config::EnvelopeFormat;
use crate::outbox::StoredRecord;

/// The idempotency key of a record.
pub fn idempotency_key(gateway: &str, seq: u64) -> String {
    format!("{gateway}-{seq}")
}

/// The idempotency key of a batch: `<gateway>-<first seq>-<last seq>`.
///
/// It names every record the batch carries, not only the first: after a
/// reconnect a batch can start at the same record and carry more, and a
/// cloud that drops it as a duplicate of the shorter one would lose the rest.
pub fn batch_key(gateway: &str, records: &[StoredRecord]) -> String {
    let first = records.first().map_or(0, |r| r.seq);
    let last = records.last().map_or(first, |r| r.seq);
    format!("{gateway}-{first}-{last}")
}

/// One envelope as a JSON value.
pub fn json_value(gateway: &str, record: &StoredRecord) -> serde_json::Value {
    let mut obj = serde_json::Map::new();
    obj.insert("id".into(), idempotency_key(gateway, record.seq).into());
    obj.insert("gateway".into(), gateway.into());
    obj.insert("function".into(), record.function.as_str().into());
    obj.insert("topic".into(), record.topic.as_str().into());
    obj.insert("seq".into(), record.seq.into());
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
    serde_json::Value::Object(obj)
}

fn cbor_value(gateway: &str, record: &StoredRecord) -> Cbor {
    Cbor::Map(vec![
        (
            Cbor::Text("id".into()),
            Cbor::Text(idempotency_key(gateway, record.seq)),
        ),
        (Cbor::Text("gateway".into()), Cbor::Text(gateway.into())),
        (
            Cbor::Text("function".into()),
            Cbor::Text(record.function.clone()),
        ),
        (Cbor::Text("topic".into()), Cbor::Text(record.topic.clone())),
        (Cbor::Text("seq".into()), Cbor::Integer(record.seq.into())),
        (Cbor::Text("ts".into()), Cbor::Integer(record.ts_ms.into())),
        (
            Cbor::Text("payload".into()),
            Cbor::Bytes(record.payload.to_vec()),
        ),
    ])
}

fn cbor_bytes(value: &Cbor) -> Vec<u8> {
    let mut out = Vec::new();
    // Writing a Value into a Vec cannot fail.
    if let Err(e) = ciborium::into_writer(value, &mut out) {
        tracing::error!(error = %e, "CBOR envelope encoding failed.");
    }
    out
}

/// Encodes one record.
pub fn encode(format: EnvelopeFormat, gateway: &str, record: &StoredRecord) -> Vec<u8> {
    match format {
        EnvelopeFormat::Json => json_value(gateway, record).to_string().into_bytes(),
        EnvelopeFormat::Cbor => cbor_bytes(&cbor_value(gateway, record)),
    }
}

/// Encodes records as one message: a single envelope when `as_array` is
/// false and there is one record, else an array of envelopes.
pub fn encode_batch(
    format: EnvelopeFormat,
    gateway: &str,
    records: &[StoredRecord],
    as_array: bool,
) -> Vec<u8> {
    if let ([one], false) = (records, as_array) {
        return encode(format, gateway, one);
    }
    match format {
        EnvelopeFormat::Json => {
            serde_json::Value::Array(records.iter().map(|r| json_value(gateway, r)).collect())
                .to_string()
                .into_bytes()
        }
        EnvelopeFormat::Cbor => cbor_bytes(&Cbor::Array(
            records.iter().map(|r| cbor_value(gateway, r)).collect(),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(payload: &[u8]) -> StoredRecord {
        StoredRecord {
            seq: 7,
            function: "enrich".into(),
            topic: "sensors/a/temperature".into(),
            payload: bytes::Bytes::copy_from_slice(payload),
            ts_ms: 1_700_000_000_000,
            lane: crate::outbox::Lane::Normal,
        }
    }

    #[test]
    fn json_embeds_json_payloads() {
        let out = encode(EnvelopeFormat::Json, "gw", &record(br#"{"value":1.5}"#));
        let v: serde_json::Value = serde_json::from_slice(&out).unwrap_or_default();
        assert_eq!(v["id"], "gw-7");
        assert_eq!(v["gateway"], "gw");
        assert_eq!(v["function"], "enrich");
        assert_eq!(v["topic"], "sensors/a/temperature");
        assert_eq!(v["seq"], 7);
        assert_eq!(v["ts"], 1_700_000_000_000u64);
        assert_eq!(v["payload"]["value"], 1.5);
    }

    #[test]
    fn json_carries_binary_as_base64() {
        let out = encode(EnvelopeFormat::Json, "gw", &record(&[0xff, 0x00, 0x10]));
        let v: serde_json::Value = serde_json::from_slice(&out).unwrap_or_default();
        assert_eq!(v["payload_base64"], "/wAQ");
        assert!(v.get("payload").is_none());
    }

    #[test]
    fn cbor_round_trips() {
        let out = encode(EnvelopeFormat::Cbor, "gw", &record(b"raw"));
        let v: Cbor = ciborium::from_reader(out.as_slice()).unwrap_or(Cbor::Null);
        let map = v.as_map().cloned().unwrap_or_default();
        let get = |k: &str| {
            map.iter()
                .find(|(key, _)| key.as_text() == Some(k))
                .map(|(_, v)| v.clone())
        };
        assert_eq!(get("seq"), Some(Cbor::Integer(7.into())));
        assert_eq!(get("id"), Some(Cbor::Text("gw-7".into())));
        assert_eq!(get("payload"), Some(Cbor::Bytes(b"raw".to_vec())));
    }

    #[test]
    fn batch_keys_name_the_first_and_last_record() {
        let mut records = vec![record(b"1"), record(b"2"), record(b"3")];
        for (i, r) in records.iter_mut().enumerate() {
            r.seq = 40 + i as u64;
        }
        assert_eq!(batch_key("gw", &records), "gw-40-42");
        // A longer batch from the same first record has another key.
        assert_ne!(batch_key("gw", &records[..2]), batch_key("gw", &records));
        assert_eq!(batch_key("gw", &records[..1]), "gw-40-40");
    }

    #[test]
    fn batches_are_arrays() {
        let records = [record(b"1"), record(b"2")];
        let out = encode_batch(EnvelopeFormat::Json, "gw", &records, false);
        let v: serde_json::Value = serde_json::from_slice(&out).unwrap_or_default();
        assert_eq!(v.as_array().map(Vec::len), Some(2));
        let one = encode_batch(EnvelopeFormat::Json, "gw", &records[..1], true);
        let v: serde_json::Value = serde_json::from_slice(&one).unwrap_or_default();
        assert_eq!(v.as_array().map(Vec::len), Some(1));
        let cbor = encode_batch(EnvelopeFormat::Cbor, "gw", &records, true);
        let v: Cbor = ciborium::from_reader(cbor.as_slice()).unwrap_or(Cbor::Null);
        assert_eq!(v.as_array().map(Vec::len), Some(2));
    }
}
