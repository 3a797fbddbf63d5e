//! `cbor-decode`: decodes a compact CBOR sensor frame into JSON.
//!
//! The frame is a CBOR array `[sensor_id, temperature_centi_c,
//! humidity_permille, battery_mv]` (e.g. `["s1", 2150, 455, 3011]`, 18 bytes).
//! It publishes `{"sensor", "temperature_c", "humidity_pct", "battery_v"}` on
//! `<prefix>/<sensor>` (`prefix` config key, default `decoded`).

use edgefn_sdk::{Event, Function, config, publish_json};
use serde::Deserialize;

#[derive(Deserialize)]
struct Frame(String, i64, i64, i64);

struct CborDecode;

impl Function for CborDecode {
    fn handle(event: Event) -> Result<(), String> {
        let Frame(sensor, centi_c, permille, millivolts) = event.cbor()?;
        if sensor.is_empty() || sensor.contains(['/', '+', '#']) {
            return Err(format!("invalid sensor id `{sensor}` in CBOR frame"));
        }
        let decoded = serde_json::json!({
            "sensor": sensor,
            "temperature_c": centi_c as f64 / 100.0,
            "humidity_pct": permille as f64 / 10.0,
            "battery_v": millivolts as f64 / 1000.0,
        });
        let prefix = config("prefix").unwrap_or_else(|| "decoded".to_owned());
        publish_json(&format!("{prefix}/{sensor}"), &decoded)?;
        Ok(())
    }
}

edgefn_sdk::export!(CborDecode);
