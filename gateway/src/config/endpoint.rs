//! Validation of the network side of the configuration: MQTT endpoints
//! (the external broker, MQTT sinks), HTTP sinks, and their TLS files, read
//! and checked before anything starts.

use std::path::{Path, PathBuf};

use super::*;

#[allow(
    clippy::too_many_arguments,
    reason = "one call per connection kind; a struct would only rename the arguments"
)]
pub(crate) fn endpoint(
    p: &mut Problems<'_>,
    key: &str,
    resolve: &dyn Fn(&Path) -> PathBuf,
    url: &str,
    client_id: String,
    username: Option<&str>,
    password: Option<&str>,
    tls: Option<&TlsConfig>,
) -> Option<MqttEndpoint> {
    let url_key = format!("{key}.url");
    let (secure, rest) = if let Some(rest) = url.strip_prefix("mqtts://") {
        (true, rest)
    } else if let Some(rest) = url.strip_prefix("mqtt://") {
        (false, rest)
    } else {
        p.add(
            url_key,
            format!("`{url}` must start with `mqtt://` or `mqtts://`"),
        );
        return None;
    };
    let rest = rest.trim_end_matches('/');
    let default_port = if secure { 8883 } else { 1883 };
    let (host, port) = if let Some(v6) = rest.strip_prefix('[') {
        // `[::1]:1883` or `[::1]`
        match v6.split_once(']') {
            Some((host, "")) => (host, Some(default_port)),
            Some((host, port)) => (
                host,
                port.strip_prefix(':').and_then(|p| p.parse::<u16>().ok()),
            ),
            None => ("", None),
        }
    } else {
        match rest.rsplit_once(':') {
            Some((host, port)) => (host, port.parse::<u16>().ok()),
            None => (rest, Some(default_port)),
        }
    };
    let Some(port) = port.filter(|p| *p != 0) else {
        p.add(url_key, format!("`{url}` has an invalid port"));
        return None;
    };
    if host.is_empty() || host.contains(['/', '@', '?']) {
        p.add(
            url_key,
            format!("`{url}` must be `mqtt://host:port` (credentials go in `username`/`password`)"),
        );
        return None;
    }
    if client_id.is_empty() {
        p.add(format!("{key}.client_id"), "must not be empty");
    }
    let credentials = match (username, password) {
        (Some(u), Some(pw)) => Some((u.to_owned(), pw.to_owned())),
        (Some(u), None) => Some((u.to_owned(), String::new())),
        (None, Some(_)) => {
            p.add(format!("{key}.password"), "is set but `username` is not");
            None
        }
        (None, None) => None,
    };
    let tls = match (secure, tls) {
        (true, Some(t)) => tls_material(p, &format!("{key}.tls"), t, resolve),
        (true, None) => {
            p.add(
                format!("{key}.tls"),
                format!("`{url}` uses TLS: add a `tls` table with at least `ca`"),
            );
            None
        }
        (false, Some(_)) => {
            p.add(
                format!("{key}.tls"),
                format!("is set but `{url}` is not `mqtts://`"),
            );
            None
        }
        (false, None) => None,
    };
    Some(MqttEndpoint {
        host: host.to_owned(),
        port,
        client_id,
        credentials,
        tls,
    })
}

/// The TLS material of an MQTT connection: `ca` is required (rumqttc trusts
/// only the CAs it is given).
pub(super) fn tls_material(
    p: &mut Problems<'_>,
    key: &str,
    t: &TlsConfig,
    resolve: &dyn Fn(&Path) -> PathBuf,
) -> Option<TlsMaterial> {
    if t.ca.is_none() {
        p.add(
            format!("{key}.ca"),
            "is required for MQTT over TLS: the PEM CA certificate(s) of the broker",
        );
    }
    let (ca, client_auth) = tls_files(p, key, t, resolve)?;
    Some(TlsMaterial {
        ca: ca?,
        client_auth,
        alpn: t.alpn.iter().map(|a| a.as_bytes().to_vec()).collect(),
    })
}

/// The TLS material of an HTTP sink: `ca`, a client certificate, or both;
/// without `ca` the system's CAs are trusted. `alpn` is refused: the HTTP
/// client offers its own protocols and would ignore it.
pub(crate) fn http_tls(
    p: &mut Problems<'_>,
    key: &str,
    t: &TlsConfig,
    resolve: &dyn Fn(&Path) -> PathBuf,
) -> Option<HttpTls> {
    if !t.alpn.is_empty() {
        p.add(
            format!("{key}.alpn"),
            "does nothing for an HTTP sink (its client negotiates HTTP/1.1 itself): remove it",
        );
    }
    if t.ca.is_none() && t.cert.is_none() && t.key.is_none() {
        p.add(
            key,
            "needs `ca`, or `cert` and `key` (without a `tls` table the system's CAs are trusted)",
        );
        return None;
    }
    let (ca, client_auth) = tls_files(p, key, t, resolve)?;
    Some(HttpTls { ca, client_auth })
}

/// Reads and checks the files a `tls` table names: the CA bundle (if any)
/// and the client certificate and key (both or neither). `None` if any of
/// them is unreadable or invalid (reported).
#[expect(
    clippy::type_complexity,
    reason = "a private pair of optional PEM blobs"
)]
pub(super) fn tls_files(
    p: &mut Problems<'_>,
    key: &str,
    t: &TlsConfig,
    resolve: &dyn Fn(&Path) -> PathBuf,
) -> Option<(Option<Vec<u8>>, Option<(Vec<u8>, Vec<u8>)>)> {
    let before = p.list.len();
    let mut read = |field: &str, rel: &Path| -> Option<Vec<u8>> {
        let path = resolve(rel);
        match std::fs::read(&path) {
            Ok(bytes) => Some(bytes),
            Err(e) => {
                p.add(
                    format!("{key}.{field}"),
                    format!("cannot read `{}`: {e}", path.display()),
                );
                None
            }
        }
    };
    let ca = t.ca.as_ref().map(|c| read("ca", c));
    let cert = t.cert.as_ref().map(|c| read("cert", c));
    let pkey = t.key.as_ref().map(|k| read("key", k));
    if let Some(Some(ca)) = &ca {
        let certs: Vec<_> = rustls_pemfile::certs(&mut ca.as_slice()).collect();
        if certs.is_empty() || certs.iter().any(Result::is_err) {
            p.add(format!("{key}.ca"), "contains no valid PEM certificate");
        }
    }
    if let Some(Some(cert)) = &cert {
        let certs: Vec<_> = rustls_pemfile::certs(&mut cert.as_slice()).collect();
        if certs.is_empty() || certs.iter().any(Result::is_err) {
            p.add(format!("{key}.cert"), "contains no valid PEM certificate");
        }
    }
    if let Some(Some(k)) = &pkey
        && !matches!(rustls_pemfile::private_key(&mut k.as_slice()), Ok(Some(_)))
    {
        p.add(format!("{key}.key"), "contains no valid PEM private key");
    }
    let client_auth = match (cert, pkey) {
        (Some(Some(c)), Some(Some(k))) => Some((c, k)),
        (Some(_), None) => {
            p.add(format!("{key}.key"), "is required when `cert` is set");
            None
        }
        (None, Some(_)) => {
            p.add(format!("{key}.cert"), "is required when `key` is set");
            None
        }
        _ => None,
    };
    if p.list.len() > before {
        return None;
    }
    Some((ca.flatten(), client_auth))
}

/// An MQTT endpoint from command-line flags (`edgefn deploy`, `edgefn
/// status`), with the same checks and TLS file reading as a sink's; problems
/// are reported against `label` (e.g. `--via`).
pub fn endpoint_from_flags(
    label: &Path,
    url: &str,
    client_id: String,
    username: Option<&str>,
    password: Option<&str>,
    tls: Option<&TlsConfig>,
) -> Result<MqttEndpoint, ConfigErrors> {
    let mut p = Problems {
        file: label,
        list: Vec::new(),
    };
    let resolve = |path: &Path| path.to_owned();
    let e = endpoint(
        &mut p, "cloud", &resolve, url, client_id, username, password, tls,
    );
    match e {
        Some(e) if p.list.is_empty() => Ok(e),
        _ => Err(ConfigErrors(p.list)),
    }
}
