//! The Modbus source's config errors, its read plan and its decoding. The
//! source against a real TCP server and a simulated RTU bus on a
//! pseudo-terminal is in the end-to-end tests (`tests/e2e/modbus.rs`).

use super::config::{Register, Table, ValueType, WordOrder};
use super::registers::{Answer, Read, decode, plan};
use crate::config::{ConfigError, SourceSpec, ValidConfig};

const CONFIG: &str = r#"
[gateway]
id = "gw1"

[[functions]]
name = "f"
component = "f.wasm"
triggers = ["meters/#"]
"#;

const METER: &str = r#"
[[sources]]
kind = "modbus"
name = "meter"
url = "tcp://192.168.1.50"
topic = "meters/power"
[[sources.registers]]
name = "voltage"
table = "input"
address = 0
type = "f32"
"#;

fn parse(extra: &str) -> Result<ValidConfig, Vec<ConfigError>> {
    crate::config::tests::parse_str(&format!("{CONFIG}{extra}")).map_err(|e| e.0)
}

/// Every problem of `extra`, as `key: reason`.
fn problems(extra: &str) -> Vec<String> {
    crate::config::tests::problems(&format!("{CONFIG}{extra}"))
}

fn register(extra: &str) -> String {
    format!("{METER}[[sources.registers]]\nname = \"r\"\n{extra}\n")
}

#[test]
fn a_tcp_meter_is_validated_with_its_defaults() {
    let config = parse(METER).expect("valid");
    let SourceSpec::Modbus(spec) = &config.sources[0] else {
        panic!("a modbus source: {:?}", config.sources[0]);
    };
    assert_eq!(spec.transport.describe(), "tcp://192.168.1.50:502");
    assert_eq!(
        (
            spec.unit,
            spec.interval.as_millis(),
            spec.timeout.as_millis()
        ),
        (1, 1000, 1000)
    );
    assert_eq!(spec.registers[0].value, ValueType::F32);
    assert_eq!(spec.registers[0].word_order, WordOrder::Big);
}

#[test]
fn modbus_config_errors_name_the_key() {
    let cases = [
        (
            register("table = \"eeprom\"\naddress = 5"),
            "sources[0].registers[1].table",
        ),
        (
            register("table = \"input\"\naddress = 1"),
            "sources[0].registers[1].address: overlaps registers[0] (`voltage`, input 0..=1)",
        ),
        (
            register("table = \"coil\"\naddress = 0\ntype = \"u16\""),
            "sources[0].registers[1].type: `coil` holds bits",
        ),
        (
            register("table = \"holding\"\naddress = 0\ntype = \"bool\""),
            "sources[0].registers[1].type: `bool` is for coils",
        ),
        (
            register("table = \"holding\"\naddress = 65535\ntype = \"u32\""),
            "sources[0].registers[1].address: a 2-register value cannot start at 65535",
        ),
        (
            register("table = \"holding\"\naddress = 0\nword_order = \"little\""),
            "sources[0].registers[1].word_order",
        ),
        (
            register("table = \"holding\"\naddress = 0\nscale = 0.0"),
            "sources[0].registers[1].scale",
        ),
        (
            register("table = \"holding\"\naddress = 0\nbits = 3"),
            "sources[0].registers[1]",
        ),
        (
            METER.replace("name = \"voltage\"", "name = \"r\"")
                + "[[sources.registers]]\nname = \"r\"\ntable = \"coil\"\naddress = 0\n",
            "sources[0].registers[1].name: duplicate register name",
        ),
        (
            METER.replace("tcp://192.168.1.50", "http://x"),
            "sources[0].url: `http://x`: must start with `tcp://`",
        ),
        (
            METER.replace("tcp://192.168.1.50", "tcp://host:0"),
            "sources[0].url: `tcp://host:0`: `0` is not a TCP port",
        ),
        (
            METER.replace(
                "url = \"tcp://192.168.1.50\"",
                "url = \"tcp://h\"\npath = \"/dev/ttyUSB0\"",
            ),
            "sources[0].url: give either",
        ),
        (
            METER.replace("url = \"tcp://192.168.1.50\"", ""),
            "sources[0].url: missing",
        ),
        (
            METER.replace(
                "url = \"tcp://192.168.1.50\"",
                "url = \"tcp://h\"\nbaud = 9600",
            ),
            "sources[0].baud: only applies to Modbus RTU",
        ),
        (
            METER.replace(
                "url = \"tcp://192.168.1.50\"",
                "path = \"/dev/ttyUSB0\"\nunit = 0",
            ),
            "sources[0].unit: must be between 1 and 247",
        ),
        (
            METER.replace(
                "url = \"tcp://192.168.1.50\"",
                "path = \"/dev/ttyUSB0\"\nbaud = 7",
            ),
            "sources[0].baud: must be between 50",
        ),
        (
            METER.replace("topic =", "timeout_ms = 0\ntopic ="),
            "sources[0].timeout_ms",
        ),
    ];
    for (toml, want) in cases {
        let got = problems(&toml);
        assert!(
            got.iter().any(|p| p.starts_with(want)),
            "want `{want}` in {got:?}"
        );
    }
    let none = METER
        .split("[[sources.registers]]")
        .next()
        .unwrap_or_default();
    assert!(
        problems(none)
            .iter()
            .any(|p| p.starts_with("sources[0].registers: at least one"))
    );
}

#[test]
fn units_share_a_bus_only_with_the_same_line_settings() {
    let unit = |name: &str, unit: u8, extra: &str| {
        format!(
            "[[sources]]\nkind = \"modbus\"\nname = \"{name}\"\npath = \"/dev/ttyUSB0\"\nunit = {unit}\n{extra}\ntopic = \"meters/{name}\"\n[[sources.registers]]\nname = \"v\"\ntable = \"holding\"\naddress = 0\n"
        )
    };
    parse(&(unit("a", 1, "") + &unit("b", 2, ""))).expect("two units on one bus");
    let clash = problems(&(unit("a", 1, "") + &unit("b", 2, "baud = 19200")));
    assert_eq!(
        clash,
        [
            "sources[1].path: `/dev/ttyUSB0` is also opened by source `a`; only Modbus sources with the same serial settings can share a port"
        ]
    );
    let serial = "[[sources]]\nkind = \"serial\"\nname = \"s\"\npath = \"/dev/ttyUSB0\"\nframing = \"lines\"\ntopic = \"meters/s\"\n";
    let clash = problems(&(unit("a", 1, "") + serial));
    assert!(
        clash[0].starts_with("sources[1].path: `/dev/ttyUSB0` is also opened by source `a`"),
        "{clash:?}"
    );
}

fn reg(name: &str, table: Table, address: u16, value: ValueType) -> Register {
    Register {
        name: name.into(),
        table,
        address,
        value,
        word_order: WordOrder::Big,
        scale: None,
    }
}

#[test]
fn adjacent_registers_are_read_in_one_request_and_gaps_are_not_bridged() {
    let regs = [
        reg("c", Table::Input, 3, ValueType::U16),
        reg("a", Table::Input, 0, ValueType::F32),
        reg("b", Table::Input, 2, ValueType::I16),
        reg("gap", Table::Input, 5, ValueType::U16),
        reg("h", Table::Holding, 3, ValueType::U16),
        reg("on", Table::Coil, 0, ValueType::Bool),
        reg("off", Table::Coil, 1, ValueType::Bool),
    ];
    let reads: Vec<(Table, u16, u16, Vec<usize>)> = plan(&regs)
        .into_iter()
        .map(|r| (r.table, r.start, r.count, r.covers))
        .collect();
    assert_eq!(
        reads,
        [
            (Table::Holding, 3, 1, vec![4]),
            (Table::Input, 0, 4, vec![1, 2, 0]),
            (Table::Input, 5, 1, vec![3]),
            (Table::Coil, 0, 2, vec![5, 6]),
        ]
    );
    // The protocol's limit of 125 registers per request.
    let many: Vec<Register> = (0..130)
        .map(|i| reg(&format!("r{i}"), Table::Holding, i, ValueType::U16))
        .collect();
    let counts: Vec<u16> = plan(&many).iter().map(|r| r.count).collect();
    assert_eq!(counts, [125, 5]);
}

#[test]
fn values_decode_with_their_type_word_order_and_scale() {
    let mut little = reg("little", Table::Holding, 6, ValueType::U32);
    little.word_order = WordOrder::Little;
    let mut scaled = reg("volts", Table::Holding, 8, ValueType::U16);
    scaled.scale = Some(0.1);
    let regs = [
        reg("f", Table::Holding, 0, ValueType::F32),
        reg("i16", Table::Holding, 2, ValueType::I16),
        reg("i32", Table::Holding, 3, ValueType::I32),
        reg("pad", Table::Holding, 5, ValueType::U16),
        little,
        scaled,
    ];
    let bits = 229.8f32.to_bits();
    #[allow(
        clippy::cast_sign_loss,
        reason = "test data: the bits of a negative number"
    )]
    let words = vec![
        (bits >> 16) as u16,
        bits as u16,
        (-2i16) as u16,
        0xffff,
        0xfffe,
        7,
        0x0002,
        0x0001,
        2298,
    ];
    let read = Read {
        table: Table::Holding,
        start: 0,
        count: 9,
        covers: (0..6).collect(),
    };
    let mut event = serde_json::Map::new();
    decode(&regs, &read, &Answer::Words(words), &mut event).expect("decoded");
    assert_eq!(
        serde_json::Value::Object(event).to_string(),
        r#"{"f":229.8,"i16":-2,"i32":-2,"little":65538,"pad":7,"volts":229.8}"#
    );
    // A short answer is an error, not a panic.
    let mut event = serde_json::Map::new();
    let err = decode(&regs, &read, &Answer::Words(vec![1, 2]), &mut event).expect_err("short");
    assert_eq!(err, "asked for 9 holding values at 0, got 2");
    // NaN cannot be JSON: null.
    let nan = f32::NAN.to_bits();
    let one = Read {
        table: Table::Holding,
        start: 0,
        count: 2,
        covers: vec![0],
    };
    let mut event = serde_json::Map::new();
    decode(
        &regs,
        &one,
        &Answer::Words(vec![(nan >> 16) as u16, nan as u16]),
        &mut event,
    )
    .expect("decoded");
    assert_eq!(event["f"], serde_json::Value::Null);
}

#[test]
fn functions_may_write_to_modbus_sources_they_list_with_a_range() {
    let with = |grants: &str| format!("modbus = [{grants}]\n{METER}");
    let config = parse(&with("\"meter:100-109\"")).expect("valid");
    assert_eq!(config.functions[0].modbus["meter"], 100..=109);
    let config = parse(&with("\"meter\"")).expect("valid");
    assert_eq!(config.functions[0].modbus["meter"], 0..=u16::MAX);
    let cases = [
        (
            "\"pump\"",
            "functions[0].modbus[0]: no Modbus source named `pump`",
        ),
        (
            "\"meter:9-1\"",
            "functions[0].modbus[0]: `meter:9-1`: give `DEVICE` or `DEVICE:FIRST-LAST`",
        ),
        ("\"meter:x\"", "functions[0].modbus[0]: `meter:x`: give"),
        (
            "\"meter\", \"meter:1-2\"",
            "functions[0].modbus[1]: `meter` is listed twice",
        ),
    ];
    for (grants, want) in cases {
        let got = problems(&with(grants));
        assert!(
            got.iter().any(|p| p.starts_with(want)),
            "want `{want}` in {got:?}"
        );
    }
}
