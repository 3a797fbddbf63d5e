//! Validation of `[[sources]]`: serial ports and I2C sensors, into
//! [`SourceSpec`]s.

use super::*;
use crate::topic::validate_topic_name;

pub(super) fn sources(
    p: &mut Problems<'_>,
    config: &Config,
    resolve: &dyn Fn(&Path) -> PathBuf,
) -> Vec<SourceSpec> {
    use edgefn_drivers::codec::{Endian, Framing, Width};
    use schema::{FramingKind, LengthEndian, LengthWidth, SourceConfig};
    let mut out = Vec::new();
    let mut names = BTreeSet::new();
    for (i, source) in config.sources.iter().enumerate() {
        let key = format!("sources[{i}]");
        check_name(p, &format!("{key}.name"), source.name());
        if !names.insert(source.name().to_owned()) {
            p.add(
                format!("{key}.name"),
                format!("duplicate source name `{}`", source.name()),
            );
        }
        let topic = match source {
            SourceConfig::Serial(c) => &c.topic,
            SourceConfig::I2c(c) => &c.topic,
            SourceConfig::Timer(c) => &c.topic,
        };
        if let Err(e) = validate_topic_name(topic) {
            p.add(format!("{key}.topic"), format!("`{topic}`: {e}"));
        }
        match source {
            SourceConfig::Serial(c) => {
                if !(50..=4_000_000).contains(&c.baud) {
                    p.add(format!("{key}.baud"), "must be between 50 and 4000000");
                }
                if !(5..=8).contains(&c.data_bits) {
                    p.add(format!("{key}.data_bits"), "must be 5, 6, 7 or 8");
                }
                if !(1..=2).contains(&c.stop_bits) {
                    p.add(format!("{key}.stop_bits"), "must be 1 or 2");
                }
                let default_max = if c.framing == FramingKind::Nmea {
                    82
                } else {
                    1024
                };
                let max = c.max_frame.unwrap_or(default_max);
                if !(1..=65_535).contains(&max) {
                    p.add(format!("{key}.max_frame"), "must be between 1 and 65535");
                }
                if c.framing != FramingKind::LengthPrefixed
                    && (c.length_width.is_some() || c.length_endian.is_some())
                {
                    p.add(
                        format!("{key}.length_width"),
                        "only applies to `framing = \"length_prefixed\"`",
                    );
                }
                let width = match c.length_width.unwrap_or(LengthWidth::U16) {
                    LengthWidth::U8 => Width::U8,
                    LengthWidth::U16 => Width::U16,
                };
                if width == Width::U8 && max > 255 && c.framing == FramingKind::LengthPrefixed {
                    p.add(
                        format!("{key}.max_frame"),
                        "can be at most 255 with `length_width = \"u8\"`",
                    );
                }
                let min = c.min_len.unwrap_or(1);
                if c.min_len.is_some() && c.framing != FramingKind::LengthPrefixed {
                    p.add(
                        format!("{key}.min_len"),
                        "only applies to `framing = \"length_prefixed\"`",
                    );
                } else if min > max {
                    p.add(
                        format!("{key}.min_len"),
                        format!("must be at most max_frame ({max})"),
                    );
                }
                let endian = match c.length_endian.unwrap_or(LengthEndian::Big) {
                    LengthEndian::Big => Endian::Big,
                    LengthEndian::Little => Endian::Little,
                };
                let framing = match c.framing {
                    FramingKind::Lines => Framing::Lines { max },
                    FramingKind::Cobs => Framing::Cobs { max },
                    FramingKind::Slip => Framing::Slip { max },
                    FramingKind::LengthPrefixed => Framing::LengthPrefixed {
                        width,
                        endian,
                        min,
                        max,
                    },
                    FramingKind::Nmea => Framing::Nmea { max },
                    FramingKind::Pms5003 => Framing::Pms5003,
                };
                if let Some(m) = &c.mirror_topic
                    && let Err(e) = validate_topic_name(m)
                {
                    p.add(format!("{key}.mirror_topic"), format!("`{m}`: {e}"));
                }
                out.push(SourceSpec::Serial(SerialSpec {
                    name: c.name.clone(),
                    path: resolve(&c.path),
                    baud: c.baud,
                    data_bits: c.data_bits,
                    parity: c.parity,
                    stop_bits: c.stop_bits,
                    flow_control: c.flow_control,
                    framing,
                    topic: c.topic.clone(),
                    mirror_topic: c.mirror_topic.clone(),
                }));
            }
            SourceConfig::I2c(c) => {
                let address = c.address.unwrap_or(match c.driver {
                    schema::I2cDriver::Bme280 => edgefn_drivers::sensors::bme280::ADDRESS_PRIMARY,
                    schema::I2cDriver::Sht3x => edgefn_drivers::sensors::sht3x::ADDRESS_PRIMARY,
                });
                if !(0x03..=0x77).contains(&address) {
                    p.add(
                        format!("{key}.address"),
                        "must be a 7-bit address between 0x03 and 0x77",
                    );
                }
                if !(10..=86_400_000).contains(&c.interval_ms) {
                    p.add(
                        format!("{key}.interval_ms"),
                        "must be between 10 and 86400000",
                    );
                }
                if let Some(m) = &c.mirror_topic
                    && let Err(e) = validate_topic_name(m)
                {
                    p.add(format!("{key}.mirror_topic"), format!("`{m}`: {e}"));
                }
                out.push(SourceSpec::I2c(I2cSpec {
                    name: c.name.clone(),
                    bus: c.bus.clone(),
                    driver: c.driver,
                    address,
                    interval: Duration::from_millis(c.interval_ms),
                    topic: c.topic.clone(),
                    mirror_topic: c.mirror_topic.clone(),
                }));
            }
            SourceConfig::Timer(c) => {
                let now_ms = i64::try_from(crate::event::now_ms()).unwrap_or(i64::MAX);
                if let Some(spec) = crate::sources::timer::config::validate(p, &key, c, now_ms) {
                    out.push(SourceSpec::Timer(spec));
                }
            }
        }
    }
    out
}
