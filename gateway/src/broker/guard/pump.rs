//! The packets of one logged-in device, both ways, with its rights checked.
//!
//! Device → rumqttd: every PUBLISH outside the device's rights is dropped
//! and answered as MQTT 3.1.1 allows (a PUBACK at QoS 1, PUBREC then
//! PUBCOMP at QoS 2), so a device keeps no unacknowledged message that it
//! would resend forever. A SUBSCRIBE goes on with only the granted filters;
//! the refused ones get `0x80` in the SUBACK, spliced into rumqttd's
//! answer. A second CONNECT ends the connection.
//!
//! Packets are parsed and written with rumqttc's MQTT 3.1.1 codec; each
//! read's packets are forwarded in one write.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::Mutex;

use bytes::BytesMut;
use rumqttc::mqttbytes::v4::{
    Packet, PubAck, PubComp, PubRec, SubAck, Subscribe, SubscribeReasonCode,
};
use rumqttc::mqttbytes::{Error as CodecError, QoS};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::mpsc;

use super::Guard;
use super::session::{Identity, MAX_PACKET, cut};
use crate::broker::acl::Rights;

/// Largest packet from rumqttd to a device: a publish of the largest
/// payload plus its topic.
const MAX_DOWN_PACKET: usize = MAX_PACKET + 70_000;
/// Answers the guard writes itself, queued for the device.
const INJECT_QUEUE: usize = 64;

/// A logged-in device.
#[derive(Debug)]
pub(super) struct Device {
    pub peer: SocketAddr,
    pub identity: Identity,
    pub rights: Rights,
}

/// Why a packet could not be read.
#[derive(Debug, thiserror::Error)]
pub(super) enum ReadError {
    /// The socket failed.
    #[error(transparent)]
    Io(#[from] std::io::Error),
    /// Not MQTT 3.1.1.
    #[error("malformed packet: {0}")]
    Codec(CodecError),
}

/// The next whole packet from `io`, buffering in `buf`; `None` at a clean
/// end of stream.
pub(super) async fn read_packet<S: AsyncRead + Unpin>(
    io: &mut S,
    buf: &mut BytesMut,
    max: usize,
) -> Result<Option<Packet>, ReadError> {
    loop {
        if let Some(packet) = parse(buf, max)? {
            return Ok(Some(packet));
        }
        if io.read_buf(buf).await? == 0 {
            return Ok(None);
        }
    }
}

/// A whole packet from the front of `buf`, if there is one.
fn parse(buf: &mut BytesMut, max: usize) -> Result<Option<Packet>, ReadError> {
    match Packet::read(buf, max) {
        Ok(packet) => Ok(Some(packet)),
        Err(CodecError::InsufficientBytes(_)) => Ok(None),
        Err(e) => Err(ReadError::Codec(e)),
    }
}

/// State shared by the two directions of one connection.
#[derive(Default)]
struct Shared {
    /// SUBSCRIBE packet id → which of its filters were granted.
    partial_subscribes: Mutex<HashMap<u16, Vec<bool>>>,
}

/// Forwards packets both ways until a side closes, the device breaks the
/// protocol, or its password entry changes (reload).
pub(super) async fn run<S>(
    guard: &Guard,
    device_io: S,
    inbuf: BytesMut,
    upstream: TcpStream,
    device: Device,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send,
{
    let (device_rx, device_tx) = tokio::io::split(device_io);
    let (up_rx, up_tx) = upstream.into_split();
    let (inject, injected) = mpsc::channel(INJECT_QUEUE);
    let shared = Shared::default();
    let end = tokio::select! {
        r = up(guard, &device, &shared, device_rx, inbuf, up_tx, inject) => r,
        r = down(&shared, up_rx, device_tx, injected) => r,
        r = revoked(guard, &device.identity) => r,
    };
    tracing::debug!(peer = %device.peer, user = device.identity.name(), end = %end, "Embedded broker: client disconnected.");
}

/// Device → rumqttd.
async fn up<R, W>(
    guard: &Guard,
    device: &Device,
    shared: &Shared,
    mut rx: R,
    mut inbuf: BytesMut,
    mut tx: W,
    inject: mpsc::Sender<Packet>,
) -> String
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut out = BytesMut::with_capacity(4096);
    let mut refused_qos2 = HashSet::new();
    loop {
        loop {
            let packet = match parse(&mut inbuf, MAX_PACKET) {
                Ok(Some(packet)) => packet,
                Ok(None) => break,
                Err(e) => return format!("device: {e}"),
            };
            let mut answers = Vec::new();
            let forward = match packet {
                Packet::Connect(_) => return "device: a second CONNECT".into(),
                Packet::Publish(p) if !device.rights.may_publish(&p.topic) => {
                    refused_publish(guard, device, &p.topic);
                    match p.qos {
                        QoS::AtMostOnce => {}
                        QoS::AtLeastOnce => answers.push(Packet::PubAck(PubAck::new(p.pkid))),
                        QoS::ExactlyOnce => {
                            refused_qos2.insert(p.pkid);
                            answers.push(Packet::PubRec(PubRec::new(p.pkid)));
                        }
                    }
                    None
                }
                Packet::PubRel(r) if refused_qos2.remove(&r.pkid) => {
                    answers.push(Packet::PubComp(PubComp::new(r.pkid)));
                    None
                }
                Packet::Subscribe(s) => subscribe(guard, device, shared, s, &mut answers),
                other => Some(other),
            };
            if let Some(packet) = forward
                && let Err(e) = packet.write(&mut out, MAX_DOWN_PACKET)
            {
                return format!("device: {e}");
            }
            for answer in answers {
                if inject.send(answer).await.is_err() {
                    return "device: gone".into();
                }
            }
        }
        if !out.is_empty() {
            if let Err(e) = tx.write_all(&out).await {
                return format!("broker: {e}");
            }
            out.clear();
        }
        match rx.read_buf(&mut inbuf).await {
            Ok(0) => return "device closed the connection".into(),
            Ok(_) => {}
            Err(e) => return format!("device: {e}"),
        }
    }
}

/// The part of `s` that may go on; answers a wholly refused SUBSCRIBE.
fn subscribe(
    guard: &Guard,
    device: &Device,
    shared: &Shared,
    mut s: Subscribe,
    answers: &mut Vec<Packet>,
) -> Option<Packet> {
    let granted: Vec<bool> = s
        .filters
        .iter()
        .map(|f| device.rights.may_subscribe(&f.path))
        .collect();
    let refused = granted.iter().filter(|g| !**g).count();
    if refused == 0 {
        return Some(Packet::Subscribe(s));
    }
    guard.count(&guard.metrics().broker_refused_subscribes, refused as u64);
    for (f, _) in s.filters.iter().zip(&granted).filter(|(_, g)| !**g) {
        guard.warn(|| tracing::warn!(peer = %device.peer, user = device.identity.name(), filter = %cut(&f.path), "Embedded broker: refused a subscription outside the device's rights."));
    }
    if refused == granted.len() {
        let codes = vec![SubscribeReasonCode::Failure; granted.len()];
        answers.push(Packet::SubAck(SubAck::new(s.pkid, codes)));
        return None;
    }
    let mut keep = granted.iter();
    s.filters.retain(|_| keep.next().copied().unwrap_or(false));
    shared
        .partial_subscribes
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .insert(s.pkid, granted);
    Some(Packet::Subscribe(s))
}

fn refused_publish(guard: &Guard, device: &Device, topic: &str) {
    guard.count(&guard.metrics().broker_refused_publishes, 1);
    guard.warn(|| tracing::warn!(peer = %device.peer, user = device.identity.name(), topic = %cut(topic), "Embedded broker: refused a publish outside the device's rights."));
}

/// rumqttd → device, with the guard's own answers in between.
async fn down<R, W>(
    shared: &Shared,
    mut rx: R,
    mut tx: W,
    mut injected: mpsc::Receiver<Packet>,
) -> String
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut inbuf = BytesMut::with_capacity(4096);
    let mut out = BytesMut::with_capacity(4096);
    loop {
        tokio::select! {
            read = rx.read_buf(&mut inbuf) => match read {
                Ok(0) => return "broker closed the connection".into(),
                Ok(_) => {}
                Err(e) => return format!("broker: {e}"),
            },
            Some(answer) = injected.recv() => {
                if let Err(e) = answer.write(&mut out, MAX_DOWN_PACKET) {
                    return format!("guard: {e}");
                }
            }
        }
        loop {
            let packet = match parse(&mut inbuf, MAX_DOWN_PACKET) {
                Ok(Some(packet)) => packet,
                Ok(None) => break,
                Err(e) => return format!("broker: {e}"),
            };
            let packet = match packet {
                Packet::SubAck(ack) => Packet::SubAck(splice(shared, ack)),
                other => other,
            };
            if let Err(e) = packet.write(&mut out, MAX_DOWN_PACKET) {
                return format!("broker: {e}");
            }
        }
        if !out.is_empty() {
            if let Err(e) = tx.write_all(&out).await {
                return format!("device: {e}");
            }
            out.clear();
        }
    }
}

/// rumqttd's SUBACK for a partly refused SUBSCRIBE, with `0x80` put back
/// where filters were refused.
fn splice(shared: &Shared, mut ack: SubAck) -> SubAck {
    let granted = shared
        .partial_subscribes
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .remove(&ack.pkid);
    if let Some(granted) = granted {
        let mut theirs = ack.return_codes.into_iter();
        ack.return_codes = granted
            .into_iter()
            .map(|g| {
                if g {
                    theirs.next().unwrap_or(SubscribeReasonCode::Failure)
                } else {
                    SubscribeReasonCode::Failure
                }
            })
            .collect();
    }
    ack
}

/// Resolves when the device's password entry changes or goes (SIGHUP).
async fn revoked(guard: &Guard, identity: &Identity) -> String {
    let Identity::User {
        name,
        password_entry: Some(entry),
    } = identity
    else {
        return std::future::pending().await;
    };
    let mut passwords = guard.passwords.subscribe();
    loop {
        if passwords.changed().await.is_err() {
            return std::future::pending().await;
        }
        if passwords.borrow().entry(name) != Some(entry.as_str()) {
            tracing::info!(user = %name, "Embedded broker: the device's password entry changed or was removed; disconnecting it.");
            return "password entry changed".into();
        }
    }
}
