//! `PUT /bundle`: deploy to one board without a cloud. The body is a bundle
//! file (`edgefn bundle`); it goes through the same verification and apply
//! as one from the cloud ([`crate::fleet::Fleet::apply_bundle`]).
//! `?force=true` accepts a bundle older than the running one (a rollback on
//! purpose). Replies `200` with what changed, `422` with the reason for a
//! refused bundle, `413` for a body over `fleet.max_bundle_bytes`, `404`
//! without a `[fleet]` section, `403` without an `admin.token` (changing
//! what runs always takes the token, also on loopback).

use std::sync::Arc;
use std::time::Duration;

use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use hyper::{Request, StatusCode};

use super::{AdminState, Reply, reply};
use crate::fleet::{Applied, ApplyOptions};

/// How long a client may take to send the whole bundle.
const BODY_TIMEOUT: Duration = Duration::from_secs(120);

fn json(status: StatusCode, value: &serde_json::Value) -> Reply {
    let mut body = serde_json::to_vec_pretty(value).unwrap_or_default();
    body.push(b'\n');
    reply(status, "application/json", body)
}

fn refused(status: StatusCode, reason: String) -> Reply {
    json(
        status,
        &serde_json::json!({ "result": "refused", "reason": reason }),
    )
}

/// Whether the query asks for `force`.
fn forced(query: Option<&str>) -> bool {
    query.is_some_and(|q| {
        q.split('&')
            .any(|kv| matches!(kv, "force" | "force=true" | "force=1"))
    })
}

/// Reads, verifies and applies the bundle in `req`'s body.
pub(super) async fn put(state: Arc<AdminState>, req: Request<Incoming>) -> Reply {
    let Some(fleet) = state.fleet.clone() else {
        return refused(
            StatusCode::NOT_FOUND,
            "this gateway has no [fleet] section: it accepts no bundles".to_owned(),
        );
    };
    // Changing what runs takes the token, also on loopback, where reading
    // the metrics does not.
    if state.token.is_none() {
        return refused(
            StatusCode::FORBIDDEN,
            "PUT /bundle needs admin.token to be set: anyone who can reach this port could otherwise deploy".to_owned(),
        );
    }
    let force = forced(req.uri().query());
    let max = usize::try_from(fleet.spec.max_bundle_bytes).unwrap_or(usize::MAX);
    let body = Limited::new(req.into_body(), max);
    let bytes = match tokio::time::timeout(BODY_TIMEOUT, body.collect()).await {
        Err(_) => {
            return refused(
                StatusCode::REQUEST_TIMEOUT,
                format!(
                    "the bundle did not arrive within {} s",
                    BODY_TIMEOUT.as_secs()
                ),
            );
        }
        Ok(Err(e))
            if e.downcast_ref::<http_body_util::LengthLimitError>()
                .is_some() =>
        {
            return refused(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("the bundle exceeds fleet.max_bundle_bytes ({max} bytes)"),
            );
        }
        Ok(Err(e)) => {
            return refused(StatusCode::BAD_REQUEST, format!("reading the body: {e}"));
        }
        Ok(Ok(collected)) => collected.to_bytes(),
    };
    let opts = ApplyOptions {
        force,
        issued_ms: None,
        expect_version: None,
    };
    match fleet.apply_bundle(bytes.to_vec(), opts).await {
        Ok(Applied::AlreadyRunning { version }) => json(
            StatusCode::OK,
            &serde_json::json!({ "result": "already-running", "version": version }),
        ),
        Ok(Applied::Switched {
            version,
            sha256,
            added,
            removed,
            updated,
        }) => json(
            StatusCode::OK,
            &serde_json::json!({
                "result": "applied", "version": version, "sha256": sha256,
                "added": added, "removed": removed, "updated": updated,
            }),
        ),
        Err(r) => refused(StatusCode::UNPROCESSABLE_ENTITY, r.reason),
    }
}
