//! GPIO outputs through WIT 0.1.4: a real gateway runs the real `misbehave`
//! guest, whose `gpio.set` of a line it does not list in `gpio` is denied
//! and reported (no GPIO chip needed: this proves the import is linked and
//! the allowlist enforced).

use crate::support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn setting_an_unlisted_gpio_line_is_denied() {
    let toml = format!(
        "{}[[functions]]\nname = \"switcher\"\ncomponent = {}\ntriggers = [\"switch/#\"]\npublish = [\"allowed/#\"]\ngpio = []\nconfig = {{ mode = \"gpio-set\", line = \"relay\" }}\n",
        gateway_header("gw-gpio-out"),
        lit(&guest("misbehave"))
    );
    let (gw, _dir) = gateway(&toml).await;
    let (host, port) = gw.local_broker();
    let mut reports = Subscriber::connect(host, port, &["allowed/gpio"]).await;
    let mut switch = Publisher::connect(host, port).await;
    switch.publish("switch/1", "on").await;
    let (topic, report) = reports.next().await;
    assert_eq!(topic, "allowed/gpio");
    let report = String::from_utf8(report).unwrap();
    assert_eq!(
        report,
        "denied: setting GPIO line `relay` is not allowed (allowed: none)"
    );
    assert!(gw.shutdown(WAIT).await);
}
