//! `threshold`: publishes an alert when a JSON reading `{"value": 31.5}` is
//! above the configured `limit` (default 30).
//!
//! A reading on `sensors/<sensor>/<metric>` above the limit publishes
//! `{"sensor", "metric", "value", "limit", "received_at_ms"}` on
//! `alerts/<sensor>/<metric>`, at QoS 1 (or 0 with `qos = "0"` in its
//! config).

use edgefn_sdk::{Event, Function, Qos, config_or, publish_qos};
use serde::Deserialize;

#[derive(Deserialize)]
struct Reading {
    value: f64,
}

struct Threshold;

impl Function for Threshold {
    fn handle(event: Event) -> Result<(), String> {
        let reading: Reading = event.json()?;
        let limit: f64 = config_or("limit", 30.0)?;
        if reading.value > limit {
            let sensor = event.topic_level(1).unwrap_or("unknown");
            let metric = event.topic_level(2).unwrap_or("value");
            let alert = serde_json::json!({
                "sensor": sensor,
                "metric": metric,
                "value": reading.value,
                "limit": limit,
                "received_at_ms": event.received_at_ms,
            });
            let qos = match config_or("qos", 1u8)? {
                0 => Qos::AtMostOnce,
                _ => Qos::AtLeastOnce,
            };
            let json = serde_json::to_vec(&alert).map_err(|e| e.to_string())?;
            publish_qos(&format!("alerts/{sensor}/{metric}"), json, qos)?;
        }
        Ok(())
    }
}

edgefn_sdk::export!(Threshold);
