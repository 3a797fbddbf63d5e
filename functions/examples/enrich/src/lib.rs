//! `enrich`: adds unit conversions and gateway metadata to a temperature
//! reading `{"value": 21.5}` (°C) and forwards it to the sink named in the
//! `sink` config key (default `cloud`).

use edgefn_sdk::{Event, Function, config, forward_json, gateway_id};
use serde::Deserialize;

#[derive(Deserialize)]
struct Reading {
    value: f64,
}

struct Enrich;

impl Function for Enrich {
    fn handle(event: Event) -> Result<(), String> {
        let reading: Reading = event.json()?;
        let celsius = reading.value;
        let record = serde_json::json!({
            "sensor": event.topic_level(1).unwrap_or("unknown"),
            "celsius": celsius,
            "fahrenheit": celsius * 9.0 / 5.0 + 32.0,
            "kelvin": celsius + 273.15,
            "gateway": gateway_id(),
            "received_at_ms": event.received_at_ms,
        });
        let sink = config("sink").unwrap_or_else(|| "cloud".to_owned());
        forward_json(&sink, &record)?;
        Ok(())
    }
}

edgefn_sdk::export!(Enrich);
