//! What one poll reads and how the answers become the event's JSON:
//! registers next to each other in the same table are read in one request
//! (never across a gap, which a device may refuse), and each value is
//! decoded from its words with its type, word order and scale.

use serde_json::{Map, Value};

use super::config::{Register, Table, ValueType, WordOrder};

/// Most registers one request reads (the protocol's limit for function 3/4).
const MAX_WORDS: u16 = 125;
/// Most coils or discrete inputs one request reads (limit of function 1/2).
const MAX_BITS: u16 = 2000;

/// One request of a poll.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Read {
    /// Which table.
    pub table: Table,
    /// First address.
    pub start: u16,
    /// Registers (or bits).
    pub count: u16,
    /// The registers it covers (indices into the spec's list).
    pub covers: Vec<usize>,
}

/// The requests of one poll, in table and address order.
pub fn plan(registers: &[Register]) -> Vec<Read> {
    let mut order: Vec<usize> = (0..registers.len()).collect();
    order.sort_by_key(|&i| (registers[i].table, registers[i].address));
    let mut reads: Vec<Read> = Vec::new();
    for i in order {
        let r = &registers[i];
        let width = r.value.width();
        let limit = if r.table.is_bits() {
            MAX_BITS
        } else {
            MAX_WORDS
        };
        match reads.last_mut() {
            Some(last)
                if last.table == r.table
                    && u32::from(last.start) + u32::from(last.count) == u32::from(r.address)
                    && last.count + width <= limit =>
            {
                last.count += width;
                last.covers.push(i);
            }
            _ => reads.push(Read {
                table: r.table,
                start: r.address,
                count: width,
                covers: vec![i],
            }),
        }
    }
    reads
}

/// What a request returned.
pub enum Answer {
    /// Registers.
    Words(Vec<u16>),
    /// Coils or discrete inputs.
    Bits(Vec<bool>),
}

/// Adds the values `read` covers to `event`; `Err` if the device returned
/// fewer values than asked for.
pub fn decode(
    registers: &[Register],
    read: &Read,
    answer: &Answer,
    event: &mut Map<String, Value>,
) -> Result<(), String> {
    let have = match answer {
        Answer::Words(w) => w.len(),
        Answer::Bits(b) => b.len(),
    };
    if have < usize::from(read.count) {
        return Err(format!(
            "asked for {} {} values at {}, got {have}",
            read.count,
            read.table.name(),
            read.start
        ));
    }
    for &i in &read.covers {
        let r = &registers[i];
        let at = usize::from(r.address - read.start);
        let value = match answer {
            Answer::Bits(bits) => Value::Bool(bits[at]),
            Answer::Words(words) => number(r, &words[at..at + usize::from(r.value.width())]),
        };
        event.insert(r.name.clone(), value);
    }
    Ok(())
}

/// One register value as a JSON number (`null` for a NaN or infinite float,
/// which JSON cannot hold).
fn number(r: &Register, words: &[u16]) -> Value {
    let pair = || -> u32 {
        let (hi, lo) = match r.word_order {
            WordOrder::Big => (words[0], words[1]),
            WordOrder::Little => (words[1], words[0]),
        };
        (u32::from(hi) << 16) | u32::from(lo)
    };
    let raw = match r.value {
        ValueType::U16 => Raw::Int(i64::from(words[0])),
        #[allow(clippy::cast_possible_wrap, reason = "the register's bits as i16")]
        ValueType::I16 => Raw::Int(i64::from(words[0] as i16)),
        ValueType::U32 => Raw::Int(i64::from(pair())),
        #[allow(clippy::cast_possible_wrap, reason = "the registers' bits as i32")]
        ValueType::I32 => Raw::Int(i64::from(pair() as i32)),
        ValueType::F32 => Raw::Float(shortest(f32::from_bits(pair()))),
        ValueType::Bool => Raw::Int(i64::from(words[0] != 0)),
    };
    match (raw, r.scale) {
        (Raw::Int(v), None) => Value::from(v),
        (Raw::Float(v), None) => float(v),
        #[allow(clippy::cast_precision_loss, reason = "at most 32 bits")]
        (Raw::Int(v), Some(s)) => float(round(v as f64 * s)),
        (Raw::Float(v), Some(s)) => float(round(v * s)),
    }
}

enum Raw {
    Int(i64),
    Float(f64),
}

fn float(v: f64) -> Value {
    serde_json::Number::from_f64(v).map_or(Value::Null, Value::Number)
}

/// An `f32` as the `f64` with the same shortest decimal form (229.8, not
/// 229.8000030517578).
fn shortest(v: f32) -> f64 {
    v.to_string().parse().unwrap_or(f64::from(v))
}

/// Drops binary noise from a scaled value (2298 × 0.1 is 229.8, not
/// 229.80000000000001): 12 significant digits.
fn round(v: f64) -> f64 {
    format!("{v:.11e}").parse().unwrap_or(v)
}
