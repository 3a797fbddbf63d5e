//! One device's connection through the guard, up to the point where
//! packets flow: TLS handshake, CONNECT, login, the will's topic, and the
//! connection to rumqttd with the device's CONNECT rewritten (internal
//! login, client id of its own).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use rumqttc::mqttbytes::v4::{ConnAck, Connect, ConnectReturnCode, Packet};
use rumqttc::mqttbytes::{Error as CodecError, Protocol};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

use super::pump::{self, Device};
use super::{Entry, Guard};
use crate::broker::MAX_PAYLOAD_BYTES;
use crate::broker::acl::Rights;
use crate::broker::tls;

/// Time a client has for its TLS handshake, and then for its CONNECT.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Time rumqttd has to take the forwarded connection.
const UPSTREAM_TIMEOUT: Duration = Duration::from_secs(5);
/// Largest packet from a device (rumqttd's own limit).
pub(super) const MAX_PACKET: usize = MAX_PAYLOAD_BYTES;
/// Largest CONNECT (its will included): what an unauthenticated client may
/// make the guard buffer, so 1024 half-sent CONNECTs hold at most 64 MiB.
const MAX_CONNECT: usize = 64 * 1024;

/// Who a client is once logged in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Identity {
    /// No credentials, on a listener that allows it: every right.
    Anonymous,
    /// A user from the password file (with its entry when it logged in, to
    /// notice a change on reload) or a client certificate's CN.
    User {
        name: String,
        password_entry: Option<String>,
    },
}

impl Identity {
    /// The user name; empty for an anonymous client.
    pub(super) fn name(&self) -> &str {
        match self {
            Self::Anonymous => "",
            Self::User { name, .. } => name,
        }
    }
}

/// Serves one accepted connection until either side closes it.
pub(super) async fn serve(guard: &Guard, stream: TcpStream, peer: SocketAddr, entry: &Entry) {
    let Some(acceptor) = &entry.tls else {
        return login(guard, stream, None, peer, entry).await;
    };
    let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
        Ok(Ok(tls)) => tls,
        // A bare connect and close (a port scan, a TCP health check) is
        // not a login attempt.
        Ok(Err(e)) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
            tracing::debug!(%peer, "Embedded broker: closed before the TLS handshake.");
            return;
        }
        Ok(Err(e)) => {
            failed_login(
                guard,
                peer,
                entry,
                "",
                &format!("TLS handshake failed: {e}"),
            );
            return;
        }
        Err(_) => return,
    };
    match tls::peer_user(tls.get_ref().1) {
        Ok(user) => login(guard, tls, user, peer, entry).await,
        Err(reason) => failed_login(
            guard,
            peer,
            entry,
            "",
            &format!("client certificate: {reason}"),
        ),
    }
}

/// Reads the CONNECT, logs the client in, and hands over to the pump.
async fn login<S>(
    guard: &Guard,
    mut io: S,
    cert_user: Option<String>,
    peer: SocketAddr,
    entry: &Entry,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send,
{
    let mut inbuf = BytesMut::with_capacity(4096);
    let connect =
        match tokio::time::timeout(HANDSHAKE_TIMEOUT, read_connect(&mut io, &mut inbuf)).await {
            Ok(Ok(connect)) => connect,
            Ok(Err(Some(code))) => {
                failed_login(guard, peer, entry, "", "not an MQTT 3.1.1 client");
                return refuse(io, code).await;
            }
            Ok(Err(None)) | Err(_) => return,
        };
    let user_hint = connect.login.as_ref().map_or("", |l| l.username.as_str());
    let identity = match authenticate(guard, &connect, cert_user, entry).await {
        Ok(identity) => identity,
        Err((code, reason)) => {
            failed_login(guard, peer, entry, user_hint, reason);
            return refuse(io, code).await;
        }
    };
    let rights = match &identity {
        Identity::Anonymous => Rights::everything(),
        Identity::User { name, .. } => Rights::for_user(&guard.acl, name),
    };
    if let Some(will) = &connect.last_will
        && !rights.may_publish(&will.topic)
    {
        guard.count(&guard.metrics().broker_refused_publishes, 1);
        guard.warn(|| tracing::warn!(%peer, user = identity.name(), topic = %cut(&will.topic), "Embedded broker: refused a login whose will topic is outside the device's rights."));
        return refuse(io, ConnectReturnCode::NotAuthorized).await;
    }
    let Some(client_id) = client_id(&identity, &connect) else {
        failed_login(
            guard,
            peer,
            entry,
            user_hint,
            "empty client id without a clean session",
        );
        return refuse(io, ConnectReturnCode::BadClientId).await;
    };
    let upstream = match connect_upstream(guard, &connect, client_id).await {
        Ok(upstream) => upstream,
        Err(e) => {
            tracing::error!(%peer, error = %e, "Embedded broker: the internal broker did not take a connection.");
            return refuse(io, ConnectReturnCode::ServiceUnavailable).await;
        }
    };
    guard.count(&guard.metrics().broker_logins, 1);
    tracing::debug!(%peer, listener = entry.name, user = identity.name(), "Embedded broker: client logged in.");
    let device = Device {
        peer,
        identity,
        rights,
    };
    pump::run(guard, io, inbuf, upstream, device).await;
}

/// Reads the first packet, which must be an MQTT 3.1.1 CONNECT. `Err(Some)`
/// answers with that CONNACK code; `Err(None)` just closes.
async fn read_connect<S>(
    io: &mut S,
    inbuf: &mut BytesMut,
) -> Result<Connect, Option<ConnectReturnCode>>
where
    S: AsyncRead + Unpin,
{
    // Not a CONNECT from its first byte (say, an HTTP request): close now
    // rather than wait for the rest of a packet that will never come.
    if inbuf.is_empty() && !matches!(io.read_buf(inbuf).await, Ok(n) if n > 0) {
        return Err(None);
    }
    if inbuf.first().is_some_and(|b| b >> 4 != 1) {
        return Err(None);
    }
    match pump::read_packet(io, inbuf, MAX_CONNECT).await {
        Ok(Some(Packet::Connect(c))) if c.protocol == Protocol::V4 => Ok(c),
        Ok(Some(Packet::Connect(_)))
        | Err(pump::ReadError::Codec(
            CodecError::InvalidProtocol | CodecError::InvalidProtocolLevel(_),
        )) => Err(Some(ConnectReturnCode::RefusedProtocolVersion)),
        _ => Err(None),
    }
}

/// Logs the client in: a verified client certificate, else the password
/// file, else anonymous where the listener allows it.
async fn authenticate(
    guard: &Guard,
    connect: &Connect,
    cert_user: Option<String>,
    entry: &Entry,
) -> Result<Identity, (ConnectReturnCode, &'static str)> {
    if let Some(name) = cert_user {
        return Ok(Identity::User {
            name,
            password_entry: None,
        });
    }
    let Some(login) = &connect.login else {
        return if entry.anonymous {
            Ok(Identity::Anonymous)
        } else {
            Err((
                ConnectReturnCode::NotAuthorized,
                "anonymous clients are not allowed on this listener",
            ))
        };
    };
    if guard.password_file.is_none() {
        // Nothing to check a password against (a TLS listener that takes
        // client certificates only).
        return Err((
            ConnectReturnCode::NotAuthorized,
            "no broker.password_file: log in with a client certificate",
        ));
    }
    let passwords = guard.passwords.borrow().clone();
    let Ok(Ok(_permit)) = tokio::time::timeout(HANDSHAKE_TIMEOUT, guard.verifying.acquire()).await
    else {
        return Err((
            ConnectReturnCode::ServiceUnavailable,
            "too many logins at once",
        ));
    };
    let (user, password) = (login.username.clone(), login.password.clone());
    let checked = Arc::clone(&passwords);
    let ok = tokio::task::spawn_blocking(move || checked.verify(&user, password.as_bytes()))
        .await
        .unwrap_or(false);
    if !ok {
        return Err((
            ConnectReturnCode::BadUserNamePassword,
            "wrong user name or password",
        ));
    }
    Ok(Identity::User {
        name: login.username.clone(),
        password_entry: passwords.entry(&login.username).map(str::to_owned),
    })
}

/// The client id rumqttd sees: a logged-in device's own id under its user
/// name, so it cannot take over another device's (or the gateway's)
/// session. `None` for an empty id that asks for a kept session.
fn client_id(identity: &Identity, connect: &Connect) -> Option<String> {
    let id = &connect.client_id;
    if id.is_empty() && !connect.clean_session {
        return None;
    }
    Some(match identity {
        Identity::Anonymous if !id.is_empty() => id.clone(),
        Identity::Anonymous => generated_id("anonymous"),
        Identity::User { name, .. } if id.is_empty() => generated_id(name),
        Identity::User { name, .. } => format!("{name}:{id}"),
    })
}

fn generated_id(prefix: &str) -> String {
    format!("{prefix}:auto-{:016x}", rand::random::<u64>())
}

/// Opens the connection to rumqttd and sends the device's CONNECT with the
/// internal login and `client_id`.
async fn connect_upstream(
    guard: &Guard,
    connect: &Connect,
    client_id: String,
) -> std::io::Result<TcpStream> {
    let mut forwarded = connect.clone();
    forwarded.client_id = client_id;
    forwarded.set_login(&guard.login.0, &guard.login.1);
    let mut out = BytesMut::new();
    forwarded.write(&mut out).map_err(std::io::Error::other)?;
    let mut upstream = tokio::time::timeout(UPSTREAM_TIMEOUT, TcpStream::connect(guard.upstream))
        .await
        .map_err(|_| std::io::Error::from(std::io::ErrorKind::TimedOut))??;
    upstream.set_nodelay(true)?;
    upstream.write_all(&out).await?;
    Ok(upstream)
}

/// Answers with a refusing CONNACK and closes.
async fn refuse<S: AsyncWrite + Unpin>(mut io: S, code: ConnectReturnCode) {
    let mut out = BytesMut::new();
    if ConnAck::new(code, false).write(&mut out).is_ok() {
        let _ = io.write_all(&out).await;
    }
    let _ = io.shutdown().await;
}

fn failed_login(guard: &Guard, peer: SocketAddr, entry: &Entry, user: &str, reason: &str) {
    guard.count(&guard.metrics().broker_login_failures, 1);
    guard.warn(|| {
        tracing::warn!(%peer, listener = entry.name, user = %cut(user), reason, "Embedded broker: login refused.");
    });
}

/// A string from a client, cut for a log line.
pub(super) fn cut(s: &str) -> String {
    s.chars().take(128).collect()
}
