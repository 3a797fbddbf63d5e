//! Timer sources, end to end: the real binary ticks a function that
//! publishes on the embedded broker.

use std::process::{Command, Stdio};

use crate::support::*;

/// `interval_ms = 100`: a subscriber sees the function's publishes, one per
/// tick, 100 ms apart on the schedule; under `catch_up = "once"` a clean
/// stop leaves the last scheduled time in `<data_dir>/timers/`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_function_on_a_timer_publishes_every_tick() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("edgefn.toml");
    let port = free_port();
    let toml = format!(
        r#"
[gateway]
id = "gw-timer"
data_dir = "data"

[broker]
kind = "embedded"
listen = "127.0.0.1:{port}"

[[functions]]
name = "echo"
component = {misbehave}
triggers = ["timers/#"]
publish = ["echo/#"]
config = {{ mode = "echo" }}

[[sources]]
kind = "timer"
name = "heartbeat"
topic = "timers/heartbeat"
interval_ms = 100
catch_up = "once"
"#,
        misbehave = lit(&guest("misbehave")),
    );
    std::fs::write(&path, toml).unwrap();
    let mut gw = KillOnDrop(
        Command::new(edgefn_bin())
            .args(["run", "--config"])
            .arg(&path)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let mut echoes = Subscriber::connect("127.0.0.1", port, &["echo/#"]).await;

    let mut ticks = Vec::new();
    for _ in 0..5 {
        let (topic, tick) = echoes.next_json().await;
        assert_eq!(topic, "echo/timers/heartbeat");
        assert_eq!(tick["timer"], "heartbeat");
        let field = |k: &str| tick[k].as_i64().unwrap_or_else(|| panic!("{k} in {tick}"));
        assert!(field("fired_ms") >= field("scheduled_ms"), "{tick}");
        ticks.push((field("count"), field("scheduled_ms")));
    }
    // Consecutive ticks, on a 100 ms grid.
    for pair in ticks.windows(2) {
        assert_eq!(pair[1].0, pair[0].0 + 1, "{ticks:?}");
        assert_eq!(pair[1].1 - pair[0].1, 100, "{ticks:?}");
    }

    signal(&gw.0, "TERM");
    let status = gw.0.wait().unwrap();
    assert!(status.success(), "{status}");
    let saved = std::fs::read_to_string(dir.path().join("data/timers/heartbeat.last")).unwrap();
    let saved: i64 = saved.trim().parse().unwrap();
    let last_seen = ticks.last().unwrap().1;
    assert!(
        saved >= last_seen && (saved - last_seen) % 100 == 0,
        "{saved} vs {last_seen}"
    );
}

/// `catch_up = "once"` across a stop: the state file says the last tick
/// was due ten minutes ago, so a one-minute timer fires one catch-up tick
/// as soon as it starts (not a minute later, and not ten ticks). The local
/// broker is Mosquitto, so the subscriber is there before the gateway.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn catch_up_once_fires_at_the_start_for_ticks_missed_while_stopped() {
    let Some(local) = Mosquitto::start() else {
        return;
    };
    let mut echoes = Subscriber::connect("127.0.0.1", local.port, &["echo/#"]).await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("edgefn.toml");
    let toml = format!(
        r#"
[gateway]
id = "gw-timer-once"
data_dir = "data"

[broker]
kind = "external"
url = "mqtt://127.0.0.1:{port}"

[[functions]]
name = "echo"
component = {misbehave}
triggers = ["timers/#"]
publish = ["echo/#"]
config = {{ mode = "echo" }}

[[sources]]
kind = "timer"
name = "minutely"
topic = "timers/minutely"
interval_ms = 60000
catch_up = "once"
"#,
        port = local.port,
        misbehave = lit(&guest("misbehave")),
    );
    std::fs::write(&path, toml).unwrap();
    let now = i64::try_from(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis(),
    )
    .unwrap();
    let last = now - 10 * 60_000 - 30_000;
    std::fs::create_dir_all(dir.path().join("data/timers")).unwrap();
    std::fs::write(
        dir.path().join("data/timers/minutely.last"),
        last.to_string(),
    )
    .unwrap();

    let _gw = KillOnDrop(
        Command::new(edgefn_bin())
            .args(["run", "--config"])
            .arg(&path)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let (topic, tick) = echoes.next_json().await;
    assert_eq!(topic, "echo/timers/minutely");
    assert_eq!(tick["count"], 1, "{tick}");
    // The latest of the ten missed times.
    assert_eq!(tick["scheduled_ms"], last + 10 * 60_000, "{tick}");
    assert!(tick["fired_ms"].as_i64().unwrap() >= now, "{tick}");
}
