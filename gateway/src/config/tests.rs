use std::path::Path;

use super::*;

fn mqtt(s: &SinkSpec) -> &MqttSinkSpec {
    match &s.kind {
        SinkKind::Mqtt(m) => m,
        SinkKind::Http(_) => panic!("not an MQTT sink"),
    }
}

fn no_env(_: &str) -> Option<String> {
    None
}

/// Every problem of `text`, which must be rejected, as `key: reason`.
pub(crate) fn problems(text: &str) -> Vec<String> {
    match parse_str(text) {
        Ok(_) => panic!("should be rejected:\n{text}"),
        Err(e) => {
            e.0.iter()
                .map(|e| format!("{}: {}", e.key, e.reason))
                .collect()
        }
    }
}

/// `text` as the config file `/etc/edgefn/test.toml`, with no environment.
pub(crate) fn parse_str(text: &str) -> Result<ValidConfig, ConfigErrors> {
    parse(Path::new("/etc/edgefn/test.toml"), text, &no_env)
}

fn errors(text: &str) -> Vec<ConfigError> {
    match parse_str(text) {
        Ok(_) => panic!("config should be rejected:\n{text}"),
        Err(e) => e.0,
    }
}

const MINIMAL: &str = r#"
[gateway]
id = "gw1"

[[functions]]
name = "f"
component = "f.wasm"
triggers = ["sensors/+/temperature"]
"#;

#[test]
fn minimal_config_gets_defaults() {
    let c = parse_str(MINIMAL).expect("valid");
    assert_eq!(c.gateway_id, "gw1");
    assert_eq!(c.data_dir, Path::new("/etc/edgefn/data"));
    assert!(
        matches!(c.broker, Broker::Embedded { ref access, .. } if access.plain.addr.to_string() == "127.0.0.1:1883")
    );
    let f = &c.functions[0];
    assert_eq!(f.component, Path::new("/etc/edgefn/f.wasm"));
    assert_eq!(f.limits, Limits::default());
    assert_eq!(f.limits.timeout, Duration::from_millis(50));
    assert_eq!(f.limits.memory_bytes, 32 * 1024 * 1024);
    assert!(f.triggers.matches("sensors/a/temperature"));
}

#[test]
fn source_keep_alive_defaults_to_the_longest_on_the_embedded_broker_and_is_checked() {
    // In-process, pings detect nothing, and a short keep-alive makes rumqttd
    // drop the source during an outbox stall (it withholds PINGRESP while
    // the client's window is full).
    let c = parse_str(MINIMAL).expect("valid");
    assert_eq!(c.source_keep_alive, Duration::from_secs(65_535));
    let with = |v: &str| format!("{MINIMAL}\n[broker]\nkind = \"embedded\"\nkeep_alive_s = {v}\n");
    let c = parse_str(&with("5")).expect("valid");
    assert_eq!(c.source_keep_alive, Duration::from_secs(5));
    let e = errors(&with("0"));
    assert_eq!(e[0].key, "broker.keep_alive_s");
}

#[test]
fn demo_config_is_valid() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/demo.toml");
    let c = load_with_env(&path, &no_env).expect("demo config is valid");
    assert_eq!(c.gateway_id, "demo-gw");
    assert!(
        matches!(c.broker, Broker::Embedded { ref access, .. } if access.plain.addr.to_string() == "127.0.0.1:1883")
    );
    let names: Vec<&str> = c.functions.iter().map(|f| f.name.as_str()).collect();
    assert_eq!(
        names,
        ["threshold", "enrich", "moving-average", "cbor-decode"]
    );
    assert_eq!(c.sinks[0].name, "cloud");
    assert_eq!(
        (
            mqtt(&c.sinks[0]).endpoint.host.as_str(),
            mqtt(&c.sinks[0]).endpoint.port
        ),
        ("127.0.0.1", 1883)
    );
    assert_eq!(mqtt(&c.sinks[0]).topic_template, "cloud/{gateway}/{topic}");
    let admin = c.admin.expect("the demo has the admin endpoint");
    assert_eq!(admin.listen.to_string(), "127.0.0.1:9180");
}

#[test]
fn demo_listen_address_follows_the_environment() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/demo.toml");
    let env = |name: &str| (name == "EDGEFN_MQTT_LISTEN").then(|| "127.0.0.1:2883".to_owned());
    let c = load_with_env(&path, &env).expect("valid");
    assert!(
        matches!(c.broker, Broker::Embedded { ref access, .. } if access.plain.addr.port() == 2883)
    );
    assert_eq!(mqtt(&c.sinks[0]).endpoint.port, 2883);
}

#[test]
fn unknown_key_is_named() {
    let e = errors(&MINIMAL.replace("triggers =", "trigers = [\"x\"]\ntriggers ="));
    assert_eq!(e.len(), 1);
    assert_eq!(e[0].key, "functions[0].trigers");
    assert!(
        e[0].reason.contains("unknown field `trigers`"),
        "{}",
        e[0].reason
    );
    assert!(
        e[0].to_string()
            .starts_with("/etc/edgefn/test.toml: functions[0].trigers: ")
    );
}

#[test]
fn wrong_type_names_the_full_key_path() {
    let e = errors(&format!(
        "{MINIMAL}\n[functions.limits]\ntimeout_ms = \"fast\"\n"
    ));
    assert_eq!(e[0].key, "functions[0].limits.timeout_ms");
    assert!(e[0].reason.contains("invalid type"), "{}", e[0].reason);
}

#[test]
fn toml_syntax_error_gives_the_line() {
    let e = errors("[gateway\nid = 1");
    assert_eq!(e[0].key, "");
    assert!(e[0].reason.contains("invalid TOML"), "{}", e[0].reason);
    assert!(e[0].reason.contains('1'), "{}", e[0].reason);
}

#[test]
fn every_problem_is_listed() {
    let text = r#"
[gateway]
id = "gw/1"

[broker]
kind = "embedded"
listen = "localhost"

[[functions]]
name = "f"
component = "f.wasm"
triggers = ["a/#/b", "ok/+"]
publish = ["x+"]
sinks = ["nowhere"]
[functions.limits]
timeout_ms = 0

[[functions]]
name = "f"
component = "g.wasm"
triggers = []
"#;
    let e = errors(text);
    let keys: Vec<&str> = e.iter().map(|e| e.key.as_str()).collect();
    for expected in [
        "gateway.id",
        "broker.listen",
        "functions[0].triggers[0]",
        "functions[0].publish[0]",
        "functions[0].sinks[0]",
        "functions[0].limits.timeout_ms",
        "functions[1].name",
        "functions[1].triggers",
    ] {
        assert!(keys.contains(&expected), "missing {expected} in {keys:?}");
    }
    assert!(!keys.contains(&"functions[0].triggers[1]"));
}

#[test]
fn environment_interpolation_and_missing_variables() {
    let text = MINIMAL.replace("\"gw1\"", "\"${GW_ID}\"");
    let env = |name: &str| (name == "GW_ID").then(|| "from-env".to_owned());
    let c = parse(Path::new("c.toml"), &text, &env).expect("valid");
    assert_eq!(c.gateway_id, "from-env");
    let e = errors(&text);
    assert_eq!(e[0].key, "gateway.id");
    assert!(
        e[0].reason.contains("`GW_ID` is not set"),
        "{}",
        e[0].reason
    );
}

#[test]
fn sink_urls_and_tls_are_checked() {
    let sink =
        |extra: &str| format!("{MINIMAL}\n[[sinks]]\nkind = \"mqtt\"\nname = \"cloud\"\n{extra}\n");
    let c = parse_str(&sink("url = \"mqtt://broker.example:1884\"")).expect("valid");
    let ep = &mqtt(&c.sinks[0]).endpoint;
    assert_eq!((ep.host.as_str(), ep.port), ("broker.example", 1884));
    assert_eq!(ep.client_id, "edgefn-gw1-cloud");
    let c = parse_str(&sink("url = \"mqtt://[::1]:1885\"")).expect("valid");
    assert_eq!(
        (
            mqtt(&c.sinks[0]).endpoint.host.as_str(),
            mqtt(&c.sinks[0]).endpoint.port
        ),
        ("::1", 1885)
    );
    let c = parse_str(&sink("url = \"mqtt://host\"")).expect("valid");
    assert_eq!(mqtt(&c.sinks[0]).endpoint.port, 1883);

    let e = errors(&sink("url = \"http://x\""));
    assert_eq!(e[0].key, "sinks[0].url");
    let e = errors(&sink("url = \"mqtts://x\""));
    assert_eq!(e[0].key, "sinks[0].tls");
    let e = errors(&sink(
        "url = \"mqtts://x\"\ntls = { ca = \"/nonexistent/ca.pem\" }",
    ));
    assert_eq!(e[0].key, "sinks[0].tls.ca");
    assert!(e[0].reason.contains("cannot read"), "{}", e[0].reason);
    let e = errors(&sink("url = \"mqtt://x\"\ntopic = \"cloud/{gw}\""));
    assert_eq!(e[0].key, "sinks[0].topic");
    let e = errors(&sink("url = \"mqtt://x\"\ntopic = \"cloud/#\""));
    assert_eq!(e[0].key, "sinks[0].topic");
}

#[test]
fn tls_files_must_hold_pem() {
    let dir = tempfile::tempdir().expect("tempdir");
    let ca = dir.path().join("ca.pem");
    std::fs::write(&ca, "not a certificate").expect("write");
    let text = format!(
        "{MINIMAL}\n[[sinks]]\nkind = \"mqtt\"\nname = \"cloud\"\nurl = \"mqtts://x\"\ntls = {{ ca = \"{}\", cert = \"{}\" }}\n",
        ca.display(),
        ca.display()
    );
    let e = errors(&text);
    let keys: Vec<&str> = e.iter().map(|e| e.key.as_str()).collect();
    assert!(keys.contains(&"sinks[0].tls.ca"), "{keys:?}");
    assert!(keys.contains(&"sinks[0].tls.cert"), "{keys:?}");
    assert!(keys.contains(&"sinks[0].tls.key"), "{keys:?}");
}

/// PEM framing with a body that parses (the config check reads PEM; the
/// TLS handshake judges the certificate itself).
const FAKE_CERT: &str = "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n";
const FAKE_KEY: &str = "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n";

#[test]
fn http_sink_tls_may_trust_the_system_cas_and_refuses_alpn() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cert = dir.path().join("client.pem");
    let key = dir.path().join("client.key");
    std::fs::write(&cert, FAKE_CERT).expect("write");
    std::fs::write(&key, FAKE_KEY).expect("write");
    let http = |tls: &str| {
        format!(
            "{MINIMAL}\n[[sinks]]\nkind = \"http\"\nname = \"web\"\nurl = \"https://x\"\ntls = {{ {tls} }}\n"
        )
    };
    let mtls = format!(
        "cert = {:?}, key = {:?}",
        cert.display().to_string(),
        key.display().to_string()
    );
    // A client certificate without `ca`: the system's CAs verify the server.
    let c = parse_str(&http(&mtls)).expect("valid");
    let SinkKind::Http(h) = &c.sinks[0].kind else {
        panic!("http")
    };
    let tls = h.tls.as_ref().expect("tls");
    assert!(tls.ca.is_none());
    assert!(tls.client_auth.is_some());
    // `alpn` would do nothing: refused.
    let e = errors(&http(&format!("{mtls}, alpn = [\"h2\"]")));
    assert_eq!(e[0].key, "sinks[0].tls.alpn");
    assert!(e[0].reason.contains("does nothing"), "{}", e[0].reason);
    // An empty table is a mistake.
    let e = errors(&http(""));
    assert_eq!(e[0].key, "sinks[0].tls");
    // MQTT still needs `ca`.
    let e = errors(&format!(
        "{MINIMAL}\n[[sinks]]\nkind = \"mqtt\"\nname = \"cloud\"\nurl = \"mqtts://x\"\ntls = {{ {mtls} }}\n"
    ));
    assert_eq!(e[0].key, "sinks[0].tls.ca");
    assert!(e[0].reason.contains("is required"), "{}", e[0].reason);
}

#[test]
fn unknown_broker_kind_is_rejected() {
    let e = errors(&format!("{MINIMAL}\n[broker]\nkind = \"cloud\"\n"));
    assert_eq!(e[0].key, "broker.kind");
    assert!(e[0].reason.contains("unknown variant"), "{}", e[0].reason);
}

#[test]
fn http_sinks_and_outbox_limits_are_validated() {
    let http =
        |extra: &str| format!("{MINIMAL}\n[[sinks]]\nkind = \"http\"\nname = \"web\"\n{extra}\n");
    let c = parse_str(&http(
        "url = \"https://ingest.example/v1\"\nbearer_token = \"t0k\"\nheaders = { X-Tenant = \"barn\" }\n[sinks.outbox]\nmax_rows = 10\nfull_policy = \"drop_oldest\"",
    ))
    .expect("valid");
    let s = &c.sinks[0];
    assert_eq!(
        (s.batch_max, s.batch_linger),
        (100, Duration::from_millis(100))
    );
    assert_eq!(s.limits.max_rows, 10);
    assert_eq!(s.limits.policy, crate::outbox::FullPolicy::DropOldest);
    let SinkKind::Http(h) = &s.kind else {
        panic!("http")
    };
    assert!(
        h.headers
            .contains(&("Authorization".into(), "Bearer t0k".into()))
    );
    assert!(h.headers.contains(&("X-Tenant".into(), "barn".into())));
    assert_eq!(c.outbox_commits_per_sec, 20);

    let e = errors(&http("url = \"ftp://x\""));
    assert_eq!(e[0].key, "sinks[0].url");
    let e = errors(&http("url = \"http://x\"\ntls = { ca = \"ca.pem\" }"));
    assert_eq!(e[0].key, "sinks[0].tls");
    let e = errors(&http(
        "url = \"http://x\"\nbatch_max = 0\n[sinks.outbox]\nfull_policy = \"maybe\"",
    ));
    assert_eq!(e[0].key, "sinks[0].outbox.full_policy");
    let e = errors(&http("url = \"http://x\"\nbatch_max = 0"));
    assert_eq!(e[0].key, "sinks[0].batch_max");
    let e = errors(&format!("{MINIMAL}\n[outbox]\nmax_commits_per_sec = 0\n"));
    assert_eq!(e[0].key, "outbox.max_commits_per_sec");
}

#[test]
fn mqtt_sink_protocol_and_batching() {
    let c = parse_str(&format!(
        "{MINIMAL}\n[[sinks]]\nkind = \"mqtt\"\nname = \"c\"\nurl = \"mqtt://x\"\nprotocol = \"5\"\nbatch_max = 10\nbatch_linger_ms = 50\n"
    ))
    .expect("valid");
    assert_eq!(mqtt(&c.sinks[0]).protocol, schema::MqttProtocol::V5);
    assert_eq!(c.sinks[0].batch_max, 10);
    let e = errors(&format!(
        "{MINIMAL}\n[[sinks]]\nkind = \"mqtt\"\nname = \"c\"\nurl = \"mqtt://x\"\nprotocol = \"4\"\n"
    ));
    assert_eq!(e[0].key, "sinks[0].protocol");
}

#[test]
fn serial_and_i2c_sources_are_validated() {
    let base = format!(
        "{MINIMAL}serial_ports = [\"motor\"]\n[[sources]]\nkind = \"serial\"\nname = \"motor\"\npath = \"/dev/ttyUSB0\"\nframing = \"length_prefixed\"\nlength_width = \"u8\"\nmax_frame = 200\ntopic = \"serial/motor\"\n\n[[sources]]\nkind = \"i2c\"\nname = \"climate\"\ndriver = \"bme280\"\ntopic = \"i2c/climate\"\n"
    );
    let c = parse_str(&base).expect("valid");
    let SourceSpec::Serial(s) = &c.sources[0] else {
        panic!("serial")
    };
    assert_eq!((s.baud, s.data_bits, s.stop_bits), (9600, 8, 1));
    assert_eq!(
        s.framing,
        edgefn_drivers::codec::Framing::LengthPrefixed {
            width: edgefn_drivers::codec::Width::U8,
            endian: edgefn_drivers::codec::Endian::Big,
            min: 1,
            max: 200
        }
    );
    let SourceSpec::I2c(i) = &c.sources[1] else {
        panic!("i2c")
    };
    assert_eq!(
        (i.address, i.interval, i.bus.as_path()),
        (0x76, Duration::from_secs(5), Path::new("/dev/i2c-1"))
    );
    assert!(c.functions[0].serial_ports.contains("motor"));

    let e = errors(&base.replace("serial_ports = [\"motor\"]", "serial_ports = [\"pump\"]"));
    assert_eq!(e[0].key, "functions[0].serial_ports[0]");
    let e = errors(&base.replace("max_frame = 200", "max_frame = 300"));
    assert_eq!(e[0].key, "sources[0].max_frame");
    let e = errors(&base.replace("framing = \"length_prefixed\"", "framing = \"lines\""));
    assert_eq!(e[0].key, "sources[0].length_width");
    let e = errors(&base.replace("max_frame = 200", "max_frame = 200\nmin_len = 201"));
    assert_eq!(e[0].key, "sources[0].min_len");
    let lax = parse_str(&base.replace("max_frame = 200", "max_frame = 200\nmin_len = 0")).unwrap();
    let SourceSpec::Serial(s) = &lax.sources[0] else {
        panic!("serial")
    };
    assert!(matches!(
        s.framing,
        edgefn_drivers::codec::Framing::LengthPrefixed { min: 0, .. }
    ));
    let e = errors(
        &base
            .replace("framing = \"length_prefixed\"", "framing = \"lines\"")
            .replace("length_width = \"u8\"", "min_len = 0"),
    );
    assert_eq!(e[0].key, "sources[0].min_len");
    let e = errors(&base.replace("framing = \"length_prefixed\"", "framing = \"morse\""));
    assert_eq!(e[0].key, "sources[0].framing");
    let e = errors(&base.replace(
        "topic = \"serial/motor\"",
        "topic = \"serial/motor\"\nmirror_topic = \"sensors/m/temperature\"",
    ));
    assert_eq!(e[0].key, "sources[0].mirror_topic");
    assert!(e[0].reason.contains("handled twice"), "{}", e[0].reason);
    let e = errors(&base.replace(
        "topic = \"i2c/climate\"",
        "topic = \"i2c/climate\"\nmirror_topic = \"sensors/c/temperature\"",
    ));
    assert_eq!(e[0].key, "sources[1].mirror_topic");
    let e = errors(&base.replace("driver = \"bme280\"", "driver = \"bme280\"\naddress = 200"));
    assert_eq!(e[0].key, "sources[1].address");
    let e = errors(&base.replace("kind = \"i2c\"", "kind = \"spi\""));
    assert_eq!(e[0].key, "sources[1].kind");
}

#[test]
fn runtime_settings_have_defaults_and_are_checked() {
    let c = parse_str(MINIMAL).expect("valid");
    let f = &c.functions[0];
    assert_eq!(f.instance, schema::InstanceMode::Reuse);
    assert_eq!(f.limits.queue_policy, schema::QueuePolicy::Block);
    assert_eq!(f.breaker.failures, 5);
    assert_eq!(f.state.max_key_bytes, 256);
    assert_eq!(f.state.max_value_bytes, 64 * 1024);
    assert_eq!(f.state.max_total_bytes, 1024 * 1024);
    assert!(c.runtime.pooling);
    assert_eq!(
        c.runtime.pool_instances, 64,
        "at least 64 (2 per function + 8)"
    );
    assert_eq!(c.runtime.max_memory_bytes, 64 * 1024 * 1024);
    assert_eq!(c.runtime.watch, Some(Duration::from_millis(1000)));

    let text = format!(
        "{MINIMAL}instance = \"fresh\"\nlimits = {{ memory_mib = 128, queue_policy = \"drop_oldest\" }}\nbreaker = {{ backoff_ms = 0 }}\n[runtime]\nwatch_ms = 10\nrollback_after = 0\n"
    );
    let e = errors(&text);
    let keys: Vec<&str> = e.iter().map(|e| e.key.as_str()).collect();
    assert!(keys.contains(&"functions[0].limits.memory_mib"), "{keys:?}");
    assert!(
        keys.contains(&"functions[0].breaker.backoff_ms"),
        "{keys:?}"
    );
    assert!(keys.contains(&"runtime.watch_ms"), "{keys:?}");
    assert!(keys.contains(&"runtime.rollback_after"), "{keys:?}");
    let memory = e
        .iter()
        .find(|e| e.key == "functions[0].limits.memory_mib")
        .unwrap();
    assert!(memory.reason.contains("runtime.max_memory_mib"), "{memory}");

    let e = errors(&format!("{MINIMAL}instance = \"sometimes\"\n"));
    assert_eq!(e[0].key, "functions[0].instance", "{e:?}");
}

#[test]
fn admin_and_shutdown_settings() {
    let c = parse_str(MINIMAL).expect("valid");
    assert_eq!(c.admin, None, "no [admin] table, no endpoint");
    assert_eq!(c.shutdown_timeout, Duration::from_secs(10));

    // The token comes from the environment; off loopback it is required.
    let text = format!(
        "{MINIMAL}\n[admin]\nlisten = \"0.0.0.0:9180\"\ntoken = \"${{EDGEFN_ADMIN_TOKEN}}\"\n"
    )
    .replace("id = \"gw1\"", "id = \"gw1\"\nshutdown_timeout_s = 3");
    let env = |name: &str| (name == "EDGEFN_ADMIN_TOKEN").then(|| "0123456789abcdef".to_owned());
    let c = parse(Path::new("/etc/edgefn/test.toml"), &text, &env).expect("valid");
    let admin = c.admin.expect("admin configured");
    assert_eq!(admin.listen, "0.0.0.0:9180".parse().expect("address"));
    assert_eq!(admin.token.as_deref(), Some("0123456789abcdef"));
    assert_eq!(c.shutdown_timeout, Duration::from_secs(3));

    let e = errors(&MINIMAL.replace("id = \"gw1\"", "id = \"gw1\"\nshutdown_timeout_s = 0"));
    assert_eq!(e[0].key, "gateway.shutdown_timeout_s");
    // One network thread unless the file asks for more.
    assert_eq!(parse_str(MINIMAL).expect("valid").io_threads, 1);
    let two = MINIMAL.replace("id = \"gw1\"", "id = \"gw1\"\nio_threads = 2");
    assert_eq!(parse_str(&two).expect("valid").io_threads, 2);
    let e = errors(&MINIMAL.replace("id = \"gw1\"", "id = \"gw1\"\nio_threads = 0"));
    assert_eq!(e[0].key, "gateway.io_threads");
    let e = errors(&format!("{MINIMAL}\n[admin]\nlisten = \"[::]:9180\"\n"));
    assert_eq!(e[0].key, "admin.token");
    assert!(
        e[0].reason.contains("not a loopback address"),
        "{}",
        e[0].reason
    );
    // IPv6 loopback needs no token.
    let c = parse_str(&format!("{MINIMAL}\n[admin]\nlisten = \"[::1]:9180\"\n")).expect("valid");
    assert!(c.admin.is_some_and(|a| a.token.is_none()));
}

#[test]
fn broker_retention_has_a_default_and_a_range() {
    let c = parse_str(MINIMAL).expect("valid");
    assert!(matches!(
        c.broker,
        Broker::Embedded { retention_bytes_per_filter, .. } if retention_bytes_per_filter == 1024 * 1024
    ));
    let broker = |bytes: u64| {
        format!("{MINIMAL}\n[broker]\nkind = \"embedded\"\nretention_bytes_per_filter = {bytes}\n")
    };
    let c = parse_str(&broker(4 * 1024 * 1024)).expect("valid");
    assert!(matches!(
        c.broker,
        Broker::Embedded { retention_bytes_per_filter, .. } if retention_bytes_per_filter == 4 * 1024 * 1024
    ));
    for bad in [1000, 2 * 1024 * 1024 * 1024] {
        let e = errors(&broker(bad));
        assert_eq!(e.len(), 1, "{e:?}");
        assert!(
            e[0].to_string()
                .starts_with("/etc/edgefn/test.toml: broker.retention_bytes_per_filter: "),
            "{}",
            e[0]
        );
    }
}

#[test]
fn function_priority_defaults_to_normal_and_unknown_values_are_named() {
    let c = parse_str(MINIMAL).expect("valid");
    assert_eq!(c.functions[0].priority, schema::Priority::Normal);
    let c = parse_str(&format!("{MINIMAL}priority = \"high\"\n")).expect("valid");
    assert_eq!(c.functions[0].priority, schema::Priority::High);
    let e = errors(&format!("{MINIMAL}priority = \"urgent\"\n"));
    assert_eq!(e[0].key, "functions[0].priority");
    assert!(
        e[0].reason.contains("unknown variant `urgent`")
            && e[0].reason.contains("`normal`")
            && e[0].reason.contains("`high`"),
        "{}",
        e[0].reason
    );
    let rendered = e[0].to_string();
    assert!(
        rendered.starts_with("/etc/edgefn/test.toml: functions[0].priority: "),
        "{rendered}"
    );
}

#[test]
fn a_sink_may_not_subscribe_to_its_own_forwards_and_its_timers_are_bounded() {
    let e = errors(&format!(
        "{MINIMAL}
[[sinks]]
kind = \"mqtt\"
name = \"cloud\"
url = \"mqtt://broker:1883\"
topic = \"up/{{gateway}}/{{function}}\"
subscribe = [\"up/gw1/#\", \"down/{{gateway}}/#\"]
keep_alive_s = 100000
ack_timeout_s = 9223372036854775807
"
    ));
    let keys: Vec<&str> = e.iter().map(|e| e.key.as_str()).collect();
    assert!(keys.contains(&"sinks[0].subscribe[0]"), "{e:?}");
    assert!(
        e.iter()
            .any(|e| e.key == "sinks[0].subscribe[0]" && e.reason.contains("own `topic`")),
        "{e:?}"
    );
    assert!(keys.contains(&"sinks[0].keep_alive_s"), "{e:?}");
    assert!(keys.contains(&"sinks[0].ack_timeout_s"), "{e:?}");
}
