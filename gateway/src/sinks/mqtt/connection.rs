//! One connection of the MQTT sink: a fresh rumqttc client of either
//! protocol version whose event loop runs on its own task and reports what
//! happens ([`Wire`]) until its first error.

use rumqttc::{Outgoing, QoS, Transport};
use tokio::sync::mpsc;

use super::commands::command_v5;
use super::config::{MqttProtocol, MqttSinkSpec};

/// Room in rumqttc's outgoing window beyond the sink's own `max_inflight`
/// (see `connect`).
const ACK_ROOM: u16 = 4;

/// Cloud commands an MQTT 5 broker may have in flight to the gateway (its
/// Receive Maximum); over 3.1.1 the broker's own window bounds them.
const COMMANDS_IN_FLIGHT: u16 = 100;

/// What the connection's event loop reported.
#[derive(Debug)]
pub(super) enum Wire {
    ConnAck {
        session_present: bool,
    },
    /// A cloud command (only with `subscribe`).
    Command(rumqttc::Publish),
    /// The broker answered a subscription; `false`: it refused a filter.
    Subscribed(bool),
    Sent(u16),
    Acked {
        pkid: u16,
        rejected: Option<String>,
    },
    Closed(String),
}

/// A client of either protocol version.
pub(super) enum Client {
    V4(rumqttc::AsyncClient),
    V5(rumqttc::v5::AsyncClient),
}

impl Client {
    pub(super) async fn publish(
        &self,
        topic: String,
        payload: Vec<u8>,
        key: String,
    ) -> Result<(), String> {
        match self {
            Self::V4(c) => c
                .publish(topic, QoS::AtLeastOnce, false, payload)
                .await
                .map_err(|e| e.to_string()),
            Self::V5(c) => {
                let props = rumqttc::v5::mqttbytes::v5::PublishProperties {
                    user_properties: vec![("idempotency-key".into(), key)],
                    ..Default::default()
                };
                c.publish_with_properties(
                    topic,
                    rumqttc::v5::mqttbytes::QoS::AtLeastOnce,
                    false,
                    payload,
                    props,
                )
                .await
                .map_err(|e| e.to_string())
            }
        }
    }

    pub(super) fn disconnect(&self) {
        let _ = match self {
            Self::V4(c) => c.try_disconnect().map_err(|e| e.to_string()),
            Self::V5(c) => c.try_disconnect().map_err(|e| e.to_string()),
        };
    }
}

/// Connects a fresh client; its event loop runs on its own task and reports
/// into the returned channel until the first error.
pub(super) fn connect(
    spec: &MqttSinkSpec,
) -> (
    Client,
    mpsc::UnboundedReceiver<Wire>,
    tokio::task::JoinHandle<()>,
) {
    let (tx, rx) = mpsc::unbounded_channel();
    let cap = usize::from(spec.max_inflight).max(16) * 2;
    let ep = &spec.endpoint;
    match spec.protocol {
        MqttProtocol::V311 => {
            let mut opts = crate::mqtt::options(ep, "", spec.keep_alive);
            // The sink keeps at most max_inflight publishes out; the extra
            // room keeps rumqttc taking requests, so command acks never
            // queue behind a full window of outgoing publishes.
            opts.set_inflight(spec.max_inflight.saturating_add(ACK_ROOM));
            // Cloud commands wait at the broker while the gateway is away.
            let subscribing = !spec.subscribe.is_empty();
            opts.set_clean_session(!subscribing);
            opts.set_manual_acks(subscribing);
            let (client, mut eventloop) = rumqttc::AsyncClient::new(opts, cap);
            let task = tokio::spawn(async move {
                use rumqttc::{Event, Packet};
                loop {
                    let wire = match eventloop.poll().await {
                        Ok(Event::Incoming(Packet::ConnAck(c))) => Wire::ConnAck {
                            session_present: c.session_present,
                        },
                        Ok(Event::Incoming(Packet::Publish(p))) => Wire::Command(p),
                        Ok(Event::Incoming(Packet::SubAck(s))) => Wire::Subscribed(
                            !s.return_codes
                                .contains(&rumqttc::SubscribeReasonCode::Failure),
                        ),
                        Ok(Event::Outgoing(Outgoing::Publish(pkid))) => Wire::Sent(pkid),
                        Ok(Event::Incoming(Packet::PubAck(ack))) => Wire::Acked {
                            pkid: ack.pkid,
                            rejected: None,
                        },
                        Ok(Event::Outgoing(Outgoing::Disconnect)) => {
                            let _ = tx.send(Wire::Closed("disconnected".to_owned()));
                            return;
                        }
                        Ok(_) => continue,
                        Err(e) => {
                            let _ = tx.send(Wire::Closed(e.to_string()));
                            return;
                        }
                    };
                    if tx.send(wire).is_err() {
                        return;
                    }
                }
            });
            (Client::V4(client), rx, task)
        }
        MqttProtocol::V5 => {
            let mut opts =
                rumqttc::v5::MqttOptions::new(ep.client_id.clone(), ep.host.clone(), ep.port);
            opts.set_keep_alive(spec.keep_alive);
            let subscribing = !spec.subscribe.is_empty();
            opts.set_clean_start(!subscribing);
            opts.set_manual_acks(subscribing);
            if subscribing {
                // Commands wait at the broker while the gateway is away:
                // 0xFFFFFFFF, the session never expires (brokers cap it).
                opts.set_session_expiry_interval(Some(u32::MAX));
            }
            opts.set_outgoing_inflight_upper_limit(spec.max_inflight.saturating_add(ACK_ROOM));
            if subscribing {
                // Cloud commands held unacknowledged at most: bounds what a
                // flood of commands can make the gateway hold.
                opts.set_receive_maximum(Some(COMMANDS_IN_FLIGHT));
            }
            opts.set_max_packet_size(Some((crate::broker::MAX_PAYLOAD_BYTES + 64 * 1024) as u32));
            if let Some((user, password)) = &ep.credentials {
                opts.set_credentials(user.clone(), password.clone());
            }
            if let Some(tls) = &ep.tls {
                let alpn = (!tls.alpn.is_empty()).then(|| tls.alpn.clone());
                opts.set_transport(Transport::tls(
                    tls.ca.clone(),
                    tls.client_auth.clone(),
                    alpn,
                ));
            }
            let (client, mut eventloop) = rumqttc::v5::AsyncClient::new(opts, cap);
            let task = tokio::spawn(async move {
                use rumqttc::v5::Event;
                use rumqttc::v5::mqttbytes::v5::{Packet, PubAckReason};
                loop {
                    let wire = match eventloop.poll().await {
                        Ok(Event::Incoming(Packet::ConnAck(c))) => Wire::ConnAck {
                            session_present: c.session_present,
                        },
                        Ok(Event::Incoming(Packet::Publish(p))) => Wire::Command(command_v5(p)),
                        Ok(Event::Incoming(Packet::SubAck(s))) => {
                            Wire::Subscribed(s.return_codes.iter().all(|c| {
                                matches!(
                                    c,
                                    rumqttc::v5::mqttbytes::v5::SubscribeReasonCode::Success(_)
                                )
                            }))
                        }
                        Ok(Event::Outgoing(Outgoing::Disconnect)) => {
                            let _ = tx.send(Wire::Closed("disconnected".to_owned()));
                            return;
                        }
                        Ok(Event::Outgoing(Outgoing::Publish(pkid))) => Wire::Sent(pkid),
                        Ok(Event::Incoming(Packet::PubAck(ack))) => Wire::Acked {
                            pkid: ack.pkid,
                            rejected: match ack.reason {
                                PubAckReason::Success | PubAckReason::NoMatchingSubscribers => None,
                                other => Some(format!("PUBACK reason {other:?}")),
                            },
                        },
                        Ok(_) => continue,
                        Err(e) => {
                            let _ = tx.send(Wire::Closed(e.to_string()));
                            return;
                        }
                    };
                    if tx.send(wire).is_err() {
                        return;
                    }
                }
            });
            (Client::V5(client), rx, task)
        }
    }
}
