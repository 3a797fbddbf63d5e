//! A simulated temperature sensor for the demo: publishes readings like
//! `{"value": 31.5}` on `sensors/<id>/temperature` over real MQTT, as a
//! device would, so a new user sees alerts without any hardware.

use std::time::Duration;

use rand::Rng;
use rumqttc::{AsyncClient, MqttOptions, QoS};
use tokio_util::sync::CancellationToken;

/// Publishes a random walk between 24 °C and 34 °C for each sensor id, every
/// `interval`, until `cancel` fires.
pub async fn run(
    host: String,
    port: u16,
    login: Option<(String, String)>,
    sensors: Vec<String>,
    interval: Duration,
    cancel: CancellationToken,
) {
    let mut opts = MqttOptions::new("edgefn-simulated-sensor", host, port);
    opts.set_keep_alive(Duration::from_secs(30));
    if let Some((user, password)) = login {
        opts.set_credentials(user, password);
    }
    let (client, mut eventloop) = AsyncClient::new(opts, 64);
    let poll_cancel = cancel.clone();
    tokio::spawn(async move {
        loop {
            tokio::select! {
                () = poll_cancel.cancelled() => break,
                polled = eventloop.poll() => if polled.is_err() {
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
            }
        }
    });
    // The first sensor hovers around the demo's 30 °C limit, so alerts come
    // and go; the others stay cooler.
    let mut values: Vec<f64> = (0..sensors.len())
        .map(|i| if i == 0 { 30.5 } else { 26.0 })
        .collect();
    let mut ticker = tokio::time::interval(interval);
    tracing::info!(sensors = ?sensors, interval_ms = interval.as_millis() as u64, "Simulated sensor started.");
    loop {
        tokio::select! {
            () = cancel.cancelled() => break,
            _ = ticker.tick() => {}
        }
        for (sensor, value) in sensors.iter().zip(values.iter_mut()) {
            let step: f64 = rand::rng().random_range(-1.5..1.5);
            *value = (*value + step).clamp(24.0, 34.0);
            let reading = (*value * 10.0).round() / 10.0;
            let payload = format!("{{\"value\": {reading}}}");
            let topic = format!("sensors/{sensor}/temperature");
            if client
                .publish(topic, QoS::AtLeastOnce, false, payload)
                .await
                .is_err()
            {
                break;
            }
        }
    }
    let _ = client.try_disconnect();
}
