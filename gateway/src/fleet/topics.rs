//! The fleet's MQTT topics (a contract between gateways and `edgefn deploy`):
//!
//! - `edgefn/fleet/<gateway>/desired`: retained, the signed desired document;
//! - `edgefn/fleet/bundles/<sha256>/<chunk_size>/<index>`: retained, chunk
//!   `index` of a bundle file cut into chunks of `chunk_size` bytes (the
//!   size in the topic keeps deploys of one bundle with different chunk
//!   sizes apart);
//! - `edgefn/fleet/<gateway>/reported`: retained, the gateway's JSON state.
//!
//! Gateway ids are validated names (letters, digits, `-`, `_`, `.`), so they
//! never contain `/`, `+` or `#`.

/// Every gateway's reported state.
pub const REPORTED_ALL: &str = "edgefn/fleet/+/reported";

/// The prefix of every chunk topic.
const BUNDLES: &str = "edgefn/fleet/bundles/";

/// The desired-state topic of `gateway`.
pub fn desired(gateway: &str) -> String {
    format!("edgefn/fleet/{gateway}/desired")
}

/// The reported-state topic of `gateway`.
pub fn reported(gateway: &str) -> String {
    format!("edgefn/fleet/{gateway}/reported")
}

/// The topic of chunk `index` of the bundle with hash `sha256` cut into
/// chunks of `chunk_size` bytes.
pub fn chunk(sha256: &str, chunk_size: u32, index: u32) -> String {
    format!("{BUNDLES}{sha256}/{chunk_size}/{index}")
}

/// The filter that matches every chunk of the bundle with hash `sha256`
/// cut into chunks of `chunk_size` bytes.
pub fn chunks_filter(sha256: &str, chunk_size: u32) -> String {
    format!("{BUNDLES}{sha256}/{chunk_size}/+")
}

/// The gateway of a reported-state topic, if `topic` is one.
pub fn reported_gateway(topic: &str) -> Option<&str> {
    let gw = topic
        .strip_prefix("edgefn/fleet/")?
        .strip_suffix("/reported")?;
    (!gw.is_empty() && !gw.contains('/')).then_some(gw)
}

/// The bundle hash, chunk size and chunk index of a chunk topic; `None` if
/// `topic` is not one (or its size or index is not a decimal `u32`).
pub fn parse_chunk(topic: &str) -> Option<(&str, u32, u32)> {
    let (sha, rest) = topic.strip_prefix(BUNDLES)?.split_once('/')?;
    let (size, index) = rest.split_once('/')?;
    let number = |s: &str| {
        (!s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()))
            .then(|| s.parse::<u32>().ok())
            .flatten()
    };
    if sha.is_empty() {
        return None;
    }
    Some((sha, number(size)?, number(index)?))
}

/// Whether `gateway` is a valid gateway id (as `gateway.id` in the
/// configuration): 1 to 64 letters, digits, `-`, `_` or `.`.
pub fn is_gateway_id(gateway: &str) -> bool {
    !gateway.is_empty()
        && gateway.len() <= 64
        && gateway
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fleet::bundle::is_sha256_hex;

    #[test]
    fn topics_round_trip() {
        assert_eq!(desired("gw1"), "edgefn/fleet/gw1/desired");
        assert_eq!(reported("gw1"), "edgefn/fleet/gw1/reported");
        assert_eq!(reported_gateway(&reported("gw-1.a")), Some("gw-1.a"));
        assert_eq!(reported_gateway("edgefn/fleet/a/b/reported"), None);
        let sha = "ab".repeat(32);
        assert_eq!(
            chunk(&sha, 1024, 7),
            format!("edgefn/fleet/bundles/{sha}/1024/7")
        );
        assert_eq!(
            parse_chunk(&chunk(&sha, 1024, 7)),
            Some((sha.as_str(), 1024, 7))
        );
        assert_eq!(
            chunks_filter(&sha, 1024),
            format!("edgefn/fleet/bundles/{sha}/1024/+")
        );
        for bad in [
            "1024/-1",
            "1024/99999999999",
            "-1/0",
            "1024/1/2",
            "7",
            "/7",
            "1024/",
        ] {
            assert_eq!(
                parse_chunk(&format!("edgefn/fleet/bundles/{sha}/{bad}")),
                None,
                "{bad}"
            );
        }
        assert!(is_sha256_hex(&sha));
        assert!(!is_sha256_hex(&"AB".repeat(32)));
        assert!(!is_gateway_id("a/b") && !is_gateway_id("+") && !is_gateway_id(""));
    }
}
