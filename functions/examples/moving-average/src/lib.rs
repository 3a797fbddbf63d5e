//! `moving-average`: smooths each sensor's readings.
//!
//! A JSON reading `{"value": 21.5}` on `sensors/<sensor>/<metric>` is added
//! to that sensor's window of the last `window` values (config, default 5),
//! kept in the function's durable state under `window/<sensor>/<metric>`, so
//! the average carries on across gateway restarts and new versions of the
//! function. The average is published as
//! `{"sensor", "metric", "average", "samples", "value"}` on
//! `smoothed/<sensor>/<metric>`.

use edgefn_sdk::{Event, Function, config_or, kv, publish_json};
use serde::Deserialize;

#[derive(Deserialize)]
struct Reading {
    value: f64,
}

struct MovingAverage;

impl Function for MovingAverage {
    fn handle(event: Event) -> Result<(), String> {
        let reading: Reading = event.json()?;
        if !reading.value.is_finite() {
            return Err(format!("reading {} is not a finite number", reading.value));
        }
        let size: usize = config_or("window", 5usize)?;
        if size == 0 {
            return Err("config `window` must be at least 1".into());
        }
        let sensor = event.topic_level(1).unwrap_or("unknown");
        let metric = event.topic_level(2).unwrap_or("value");
        let key = format!("window/{sensor}/{metric}");
        let mut window: Vec<f64> = kv::get_json(&key)?.unwrap_or_default();
        window.push(reading.value);
        if window.len() > size {
            let excess = window.len() - size;
            window.drain(..excess);
        }
        kv::set_json(&key, &window)?;
        let average = window.iter().sum::<f64>() / window.len() as f64;
        publish_json(
            &format!("smoothed/{sensor}/{metric}"),
            &serde_json::json!({
                "sensor": sensor,
                "metric": metric,
                "average": average,
                "samples": window.len(),
                "value": reading.value,
            }),
        )?;
        Ok(())
    }
}

edgefn_sdk::export!(MovingAverage);
