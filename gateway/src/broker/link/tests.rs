//! The link against a real embedded rumqttd.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::Bytes;
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use tokio::sync::mpsc;

use super::LinkError;
use crate::broker::{DEFAULT_RETENTION_BYTES, EmbeddedBroker};
use crate::metrics::GatewayMetrics;

const WAIT: Duration = Duration::from_secs(10);

fn broker() -> (EmbeddedBroker, Arc<GatewayMetrics>) {
    let metrics = Arc::new(GatewayMetrics::default());
    let broker = EmbeddedBroker::start(
        ([127, 0, 0, 1], 0).into(),
        None,
        DEFAULT_RETENTION_BYTES,
        metrics.clone(),
    )
    .unwrap();
    (broker, metrics)
}

/// A TCP subscriber to `filter` at QoS 2; returns once subscribed. Yields
/// (topic, payload, QoS) of what it receives.
async fn subscriber(
    port: u16,
    id: &str,
    filter: &str,
) -> mpsc::UnboundedReceiver<(String, Bytes, QoS)> {
    let (client, mut eventloop) = AsyncClient::new(MqttOptions::new(id, "127.0.0.1", port), 64);
    client.subscribe(filter, QoS::ExactlyOnce).await.unwrap();
    let (tx, rx) = mpsc::unbounded_channel();
    let (ready_tx, ready) = tokio::sync::oneshot::channel();
    let mut ready_tx = Some(ready_tx);
    tokio::spawn(async move {
        let _client = client;
        while let Ok(e) = eventloop.poll().await {
            match e {
                Event::Incoming(Packet::SubAck(_)) => {
                    if let Some(r) = ready_tx.take() {
                        let _ = r.send(());
                    }
                }
                Event::Incoming(Packet::Publish(p)) => {
                    let _ = tx.send((p.topic, p.payload, p.qos));
                }
                _ => {}
            }
        }
    });
    tokio::time::timeout(WAIT, ready).await.unwrap().unwrap();
    rx
}

async fn next(rx: &mut mpsc::UnboundedReceiver<(String, Bytes, QoS)>) -> (String, Bytes, QoS) {
    tokio::time::timeout(WAIT, rx.recv())
        .await
        .unwrap()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publishes_of_every_qos_arrive_in_order_and_are_counted() {
    let (broker, metrics) = broker();
    let mut rx = subscriber(broker.addr().port(), "link-sub", "t/#").await;
    let link = broker.link();
    link.publish("t/0".into(), 0, false, Bytes::from_static(b"zero"))
        .await
        .unwrap();
    link.publish("t/1".into(), 1, false, Bytes::from_static(b"one"))
        .await
        .unwrap();
    link.publish("t/2".into(), 2, false, Bytes::from_static(b"two"))
        .await
        .unwrap();
    link.publish("t/1".into(), 1, false, Bytes::from_static(b"again"))
        .await
        .unwrap();
    let got = [
        next(&mut rx).await,
        next(&mut rx).await,
        next(&mut rx).await,
        next(&mut rx).await,
    ];
    // rumqttd delivers at the subscription's QoS whatever the publish's,
    // over TCP as through a link.
    let want = [
        ("t/0", &b"zero"[..], QoS::ExactlyOnce),
        ("t/1", b"one", QoS::ExactlyOnce),
        ("t/2", b"two", QoS::ExactlyOnce),
        ("t/1", b"again", QoS::ExactlyOnce),
    ];
    for ((topic, payload, qos), (t, p, q)) in got.iter().zip(want) {
        assert_eq!((topic.as_str(), &payload[..], *qos), (t, p, q));
    }
    // QoS 2 is a PUBLISH and its PUBREL.
    assert_eq!(metrics.link_publishes.load(Ordering::Relaxed), 5);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn close_hands_over_everything_queued_before_it() {
    let (broker, _) = broker();
    let mut rx = subscriber(broker.addr().port(), "link-sub", "c/#").await;
    let link = broker.link().clone();
    let sender = link.clone();
    let publishing = tokio::spawn(async move {
        for i in 0..2000u32 {
            sender
                .publish("c/n".into(), 1, false, Bytes::from(i.to_string()))
                .await
                .unwrap();
        }
        sender.try_close().unwrap();
    });
    tokio::time::timeout(WAIT, link.closed()).await.unwrap();
    publishing.await.unwrap();
    for i in 0..2000u32 {
        let (_, payload, _) = next(&mut rx).await;
        assert_eq!(&payload[..], i.to_string().as_bytes());
    }
    assert!(matches!(
        link.publish("c/n".into(), 1, false, Bytes::new()).await,
        Err(LinkError::Closed)
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_taking_the_links_client_id_makes_publishes_fail() {
    let (broker, _) = broker();
    let link = broker.link().clone();
    // The device's own connection replaces the link on the broker.
    let _device = subscriber(broker.addr().port(), link.client_id(), "x/#").await;
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        match link.publish("x/y".into(), 1, false, Bytes::new()).await {
            Err(LinkError::Lost) => break,
            Ok(()) => assert!(tokio::time::Instant::now() < deadline, "link never lost"),
            Err(e) => panic!("unexpected {e}"),
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[test]
fn link_client_ids_are_valid_and_distinct() {
    let (a, b) = (super::client_id(), super::client_id());
    assert_ne!(a, b);
    assert!(!a.contains(['+', '#', '/', '$']));
}

#[tokio::test]
async fn wildcard_topics_are_refused_as_rumqttc_refuses_them() {
    let (broker, metrics) = broker();
    for topic in ["a/+", "a/#"] {
        assert!(matches!(
            broker
                .link()
                .publish(topic.into(), 1, false, Bytes::new())
                .await,
            Err(LinkError::InvalidTopic)
        ));
    }
    assert_eq!(metrics.link_publishes.load(Ordering::Relaxed), 0);
}
