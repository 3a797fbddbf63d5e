//! Operations: the admin endpoint's health, readiness, Prometheus metrics
//! and function list, scraped while real readings flow; its bearer token.
//! (SIGTERM under load and the systemd notifications are in `durability`.)

use std::collections::BTreeMap;
use std::time::Duration;

use crate::support::*;

/// GETs `path` from the admin endpoint; returns status and body.
pub(crate) async fn get(
    addr: std::net::SocketAddr,
    path: &str,
    token: Option<&str>,
) -> (u16, String) {
    let mut req = reqwest::Client::new().get(format!("http://{addr}{path}"));
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    let resp = tokio::time::timeout(WAIT, req.send())
        .await
        .expect("admin answered in time")
        .unwrap();
    let status = resp.status().as_u16();
    (status, resp.text().await.unwrap())
}

/// Prometheus text → `name{labels}` → value (HELP/TYPE lines checked to
/// precede their samples).
pub(crate) fn parse(text: &str) -> BTreeMap<String, f64> {
    let mut out = BTreeMap::new();
    let mut typed = std::collections::BTreeSet::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            typed.insert(rest.split(' ').next().unwrap().to_owned());
            continue;
        }
        if line.starts_with('#') || line.is_empty() {
            continue;
        }
        let (key, value) = line.rsplit_once(' ').expect("`name value`");
        let name = key.split('{').next().unwrap();
        let family = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|s| name.strip_suffix(s).filter(|f| typed.contains(*f)))
            .unwrap_or(name);
        assert!(typed.contains(family), "sample before its # TYPE: {line}");
        out.insert(key.to_owned(), value.parse().expect("a number"));
    }
    out
}

pub(crate) fn value(m: &BTreeMap<String, f64>, key: &str) -> f64 {
    *m.get(key)
        .unwrap_or_else(|| panic!("no `{key}` in the metrics: {:#?}", m.keys()))
}

fn admin_config(cloud_port: u16, dead_port: u16, admin: &str) -> String {
    format!(
        r#"
{header}
{admin}

[[functions]]
name = "threshold"
component = {threshold}
triggers = ["sensors/+/temperature"]
publish = ["alerts/#"]
config = {{ limit = "30" }}

[[functions]]
name = "enrich"
component = {enrich}
triggers = ["sensors/+/temperature"]
sinks = ["cloud"]

[[functions]]
name = "enrich-offline"
component = {enrich}
triggers = ["sensors/+/temperature"]
sinks = ["offline"]
config = {{ sink = "offline" }}

[[sinks]]
kind = "mqtt"
name = "cloud"
url = "mqtt://127.0.0.1:{cloud_port}"
topic = "cloud/{{gateway}}/{{topic}}"

# Nothing listens here: its records wait in the outbox.
[[sinks]]
kind = "mqtt"
name = "offline"
url = "mqtt://127.0.0.1:{dead_port}"
topic = "cloud/{{topic}}"
"#,
        header = gateway_header("gw-admin"),
        threshold = lit(&guest("threshold")),
        enrich = lit(&guest("enrich")),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_endpoint_reports_health_and_counters_that_move() {
    let (cloud_port, _cloud) = cloud_broker();
    let (gw, _dir) = gateway(&admin_config(
        cloud_port,
        free_port(),
        "[admin]\nlisten = \"127.0.0.1:0\"",
    ))
    .await;
    let addr = gw.admin_addr().expect("admin configured");
    assert!(addr.ip().is_loopback() && addr.port() != 0);

    assert_eq!(get(addr, "/healthz", None).await, (200, "ok\n".into()));
    assert_eq!(get(addr, "/readyz", None).await.0, 200);
    let before = parse(&get(addr, "/metrics", None).await.1);
    let threshold = r#"{function="threshold"}"#;
    assert_eq!(
        value(
            &before,
            &format!("edgefn_function_invocations_total{threshold}")
        ),
        0.0
    );
    assert_eq!(
        value(
            &before,
            r#"edgefn_info{gateway="gw-admin",version="0.1.0"}"#
        ),
        1.0
    );

    let (host, port) = gw.local_broker();
    let mut alerts = Subscriber::connect(host, port, &["alerts/#"]).await;
    let mut cloud = Subscriber::connect("127.0.0.1", cloud_port, &["cloud/#"]).await;
    let mut sensor = Publisher::connect(host, port).await;
    for v in [20, 35, 21, 40, 22] {
        sensor
            .publish("sensors/s1/temperature", format!("{{\"value\": {v}}}"))
            .await;
    }
    for _ in 0..2 {
        alerts.next().await;
    }
    for _ in 0..5 {
        cloud.next().await;
    }
    let offline = gw.outbox().sink_stats("offline").unwrap();
    eventually("the offline sink's records are in the outbox", || {
        offline.rows.load(std::sync::atomic::Ordering::Relaxed) == 5
    })
    .await;
    let cloud_stats = gw.sink_stats("cloud").unwrap().clone();
    let cloud_stored = gw.outbox().sink_stats("cloud").unwrap();
    eventually("the cloud sink's records are delivered and deleted", || {
        cloud_stats
            .delivered
            .load(std::sync::atomic::Ordering::Relaxed)
            == 5
            && cloud_stored.rows.load(std::sync::atomic::Ordering::Relaxed) == 0
    })
    .await;

    let after = parse(&get(addr, "/metrics", None).await.1);
    let v = |k: &str| value(&after, k);
    assert_eq!(v("edgefn_ready"), 1.0);
    assert_eq!(
        v(r#"edgefn_source_events_total{source="mqtt",kind="mqtt"}"#),
        5.0
    );
    // The source's back-pressure counters are exposed (nothing held back).
    for name in ["paused", "deferred", "resyncs"] {
        assert_eq!(
            v(&format!(r#"edgefn_source_{name}_total{{source="mqtt"}}"#)),
            0.0
        );
    }
    assert_eq!(
        v(&format!("edgefn_function_invocations_total{threshold}")),
        5.0
    );
    assert_eq!(
        v(r#"edgefn_function_results_total{function="threshold",result="ok"}"#),
        5.0
    );
    assert_eq!(
        v(r#"edgefn_function_results_total{function="threshold",result="trap"}"#),
        0.0
    );
    assert_eq!(
        v(r#"edgefn_function_published_total{function="threshold"}"#),
        2.0
    );
    assert_eq!(
        v(r#"edgefn_function_forwarded_total{function="enrich"}"#),
        5.0
    );
    // The histogram: every invocation counted, buckets cumulative.
    assert_eq!(
        v(&format!(
            "edgefn_function_duration_seconds_count{threshold}"
        )),
        5.0
    );
    assert_eq!(
        v(r#"edgefn_function_duration_seconds_bucket{function="threshold",le="+Inf"}"#),
        5.0
    );
    assert!(
        v(r#"edgefn_function_duration_seconds_bucket{function="threshold",le="0.25"}"#) == 5.0,
        "an invocation of threshold took more than 250 ms"
    );
    assert!(v(&format!("edgefn_function_duration_seconds_sum{threshold}")) > 0.0);
    assert_eq!(v(&format!("edgefn_function_breaker_state{threshold}")), 0.0);
    assert_eq!(v(r#"edgefn_sink_delivered_total{sink="cloud"}"#), 5.0);
    assert_eq!(v(r#"edgefn_outbox_records{sink="cloud"}"#), 0.0);
    assert_eq!(
        v(r#"edgefn_outbox_oldest_record_age_seconds{sink="cloud"}"#),
        0.0
    );
    assert_eq!(v(r#"edgefn_outbox_records{sink="offline"}"#), 5.0);
    assert!(v(r#"edgefn_outbox_bytes{sink="offline"}"#) > 0.0);
    assert!(v("edgefn_outbox_commits_total") >= 1.0);
    assert_eq!(
        v(r#"edgefn_connection_reconnects_total{connection="mqtt-source"}"#),
        0.0
    );
    // The offline sink keeps retrying: its connection and its waiting
    // records show it.
    eventually("the offline sink's failures are counted", || {
        gw.sink_stats("offline")
            .unwrap()
            .failures
            .load(std::sync::atomic::Ordering::Relaxed)
            >= 1
    })
    .await;
    let mut aged = false;
    for _ in 0..50 {
        let m = parse(&get(addr, "/metrics", None).await.1);
        let age = value(
            &m,
            r#"edgefn_outbox_oldest_record_age_seconds{sink="offline"}"#,
        );
        let failures = value(&m, r#"edgefn_sink_failures_total{sink="offline"}"#);
        let reconnects = value(
            &m,
            r#"edgefn_connection_reconnects_total{connection="sink/offline"}"#,
        );
        if age > 0.0 && failures >= 1.0 && reconnects >= 1.0 {
            aged = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(aged, "the offline sink's oldest record never aged");

    let (status, body) = get(addr, "/functions", None).await;
    assert_eq!(status, 200);
    let list: serde_json::Value = serde_json::from_str(&body).unwrap();
    let t = &list[0];
    assert_eq!(t["name"], "threshold");
    assert_eq!(
        t["version"].as_str().unwrap(),
        gw.function_metrics("threshold").unwrap().version()
    );
    assert_eq!(t["version"].as_str().unwrap().len(), 12);
    assert_eq!(t["state"], "closed");
    assert_eq!(t["counters"]["invocations"], 5);
    assert_eq!(t["counters"]["published"], 2);
    assert_eq!(list.as_array().unwrap().len(), 3);

    assert_eq!(get(addr, "/nope", None).await.0, 404);
    let post = reqwest::Client::new()
        .post(format!("http://{addr}/metrics"))
        .send()
        .await
        .unwrap();
    assert_eq!(post.status().as_u16(), 405);
    assert!(gw.shutdown(WAIT).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_endpoint_requires_its_bearer_token() {
    let token = "s3cret-token-0123456789";
    let (gw, _dir) = gateway(&format!(
        "{}\n[admin]\nlisten = \"127.0.0.1:0\"\ntoken = \"{token}\"\n",
        gateway_header("gw-token")
    ))
    .await;
    let addr = gw.admin_addr().unwrap();
    for path in ["/healthz", "/metrics", "/functions"] {
        assert_eq!(get(addr, path, None).await.0, 401, "{path} without a token");
        assert_eq!(
            get(addr, path, Some("s3cret-token-0123456788")).await.0,
            401,
            "{path} with a wrong token"
        );
        assert_eq!(get(addr, path, Some(token)).await.0, 200, "{path}");
    }
    assert!(gw.shutdown(WAIT).await);
}

#[test]
fn admin_off_loopback_needs_a_token_and_says_so() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("edgefn.toml");
    let load = |admin: &str| {
        std::fs::write(
            &path,
            format!("[gateway]\nid = \"gw\"\n\n[admin]\n{admin}\n"),
        )
        .unwrap();
        edgefn::config::load(&path).map(|c| c.admin)
    };
    let err = load("listen = \"0.0.0.0:9180\"").unwrap_err().to_string();
    assert!(
        err.contains("edgefn.toml: admin.token: required when `admin.listen` (`0.0.0.0:9180`) is not a loopback address"),
        "{err}"
    );
    let err = load("listen = \"0.0.0.0:9180\"\ntoken = \"short\"")
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("admin.token: must be at least 16 characters"),
        "{err}"
    );
    let err = load("listen = \"localhost\"").unwrap_err().to_string();
    assert!(
        err.contains("admin.listen: `localhost` is not an IP address"),
        "{err}"
    );
    let err = load("port = 1").unwrap_err().to_string();
    assert!(err.contains("admin") && err.contains("port"), "{err}");
    // Loopback needs none; the default address is loopback.
    let ok = load("").unwrap().unwrap();
    assert_eq!(ok.listen, "127.0.0.1:9180".parse().unwrap());
    assert!(ok.token.is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_waits_for_the_broker_while_health_answers() {
    // An external broker that is not there: the gateway starts (and keeps
    // retrying) but is not ready.
    let (gw, _dir) = gateway(&format!(
        "[gateway]\nid = \"gw-unready\"\ndata_dir = \"data\"\n\n[broker]\nkind = \"external\"\nurl = \"mqtt://127.0.0.1:{}\"\n\n[admin]\nlisten = \"127.0.0.1:0\"\n",
        free_port()
    ))
    .await;
    let addr = gw.admin_addr().unwrap();
    assert_eq!(get(addr, "/healthz", None).await.0, 200);
    let (status, body) = get(addr, "/readyz", None).await;
    assert_eq!(
        (status, body.as_str()),
        (503, "not subscribed to the local broker\n")
    );
    let metrics = parse(&get(addr, "/metrics", None).await.1);
    assert_eq!(value(&metrics, "edgefn_ready"), 0.0);
    assert!(
        value(
            &metrics,
            r#"edgefn_connection_reconnects_total{connection="mqtt-source"}"#
        ) >= 1.0,
        "the source's failed connection attempts are counted"
    );
    assert!(gw.shutdown(WAIT).await);
}
