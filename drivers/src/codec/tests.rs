use bytes::BytesMut;
use proptest::prelude::*;
use tokio_util::codec::Decoder;

use super::*;

fn decode_all(framing: Framing, input: &[u8]) -> (Vec<Vec<u8>>, CodecStats, usize) {
    let mut d = FrameDecoder::new(framing);
    let mut buf = BytesMut::new();
    let mut out = Vec::new();
    let mut max_buf = 0;
    // Feed in small pieces, as a serial port would.
    for chunk in input.chunks(7) {
        buf.extend_from_slice(chunk);
        while let Ok(Some(f)) = d.decode(&mut buf) {
            out.push(f.to_vec());
        }
        max_buf = max_buf.max(buf.len());
    }
    (out, d.stats(), max_buf)
}

const ALL: [Framing; 7] = [
    Framing::Lines { max: 64 },
    Framing::Cobs { max: 64 },
    Framing::Slip { max: 64 },
    Framing::LengthPrefixed {
        width: Width::U8,
        endian: Endian::Big,
        min: 1,
        max: 64,
    },
    Framing::LengthPrefixed {
        width: Width::U16,
        endian: Endian::Little,
        min: 0,
        max: 64,
    },
    Framing::Nmea { max: 82 },
    Framing::Pms5003,
];

#[test]
fn lines_strip_terminators_and_skip_overlong_lines() {
    let (frames, stats, _) = decode_all(
        Framing::Lines { max: 8 },
        b"one\r\ntwo\n\nthis line is far too long\nok\n",
    );
    assert_eq!(frames, [b"one".to_vec(), b"two".to_vec(), b"ok".to_vec()]);
    assert_eq!(stats.oversize, 1);
    let (frames, _, max_buf) = decode_all(Framing::Lines { max: 8 }, &[b'x'; 1_000_000]);
    assert!(frames.is_empty());
    assert!(max_buf <= 16, "buffer stayed bounded: {max_buf}");
}

#[test]
fn cobs_known_vectors() {
    // From the COBS paper / Wikipedia examples.
    assert_eq!(cobs::encode(&[0x00]), [0x01, 0x01, 0x00]);
    assert_eq!(cobs::encode(&[0x00, 0x00]), [0x01, 0x01, 0x01, 0x00]);
    assert_eq!(
        cobs::encode(&[0x11, 0x22, 0x00, 0x33]),
        [0x03, 0x11, 0x22, 0x02, 0x33, 0x00]
    );
    assert_eq!(
        cobs::encode(&[0x11, 0x00, 0x00, 0x00]),
        [0x02, 0x11, 0x01, 0x01, 0x01, 0x00]
    );
    let long: Vec<u8> = (1..=254).collect();
    let enc = cobs::encode(&long);
    assert_eq!((enc[0], enc[255], enc.len()), (0xff, 0x01, 257));
    assert_eq!(cobs::decode(&[0x05, 0x11]), None, "code past the end");
}

#[test]
fn slip_escapes() {
    assert_eq!(
        slip::encode(&[0xc0, 0xdb, 1]),
        [0xc0, 0xdb, 0xdc, 0xdb, 0xdd, 1, 0xc0]
    );
    let (frames, stats, _) = decode_all(
        Framing::Slip { max: 64 },
        &[0xc0, 0xdb, 0x01, 0xc0, 0xc0, 7, 0xc0],
    );
    assert_eq!(frames, [vec![7]]);
    assert_eq!(stats.invalid, 1);
}

#[test]
fn nmea_checks_the_checksum_and_resynchronises() {
    let gga = "GPGGA,092750.000,5321.6802,N,00630.3372,W,1,8,1.03,61.7,M,55.2,M,,";
    let good = nmea::sentence(gga);
    assert_eq!(
        good,
        format!("${gga}*76\r\n"),
        "checksum of the well-known example"
    );
    let bad = good.replace("*76", "*77");
    let input = format!("garbage{bad}$GPGSA,A,3,10,07,05,02,29,04,08,13,,,,,1.72,1.03,1.3{good}");
    let (frames, stats, _) = decode_all(Framing::Nmea { max: 82 }, input.as_bytes());
    assert_eq!(frames, [good.trim_end().as_bytes().to_vec()]);
    assert_eq!(stats.invalid, 2, "wrong checksum, and a sentence cut short");
    let (frames, stats, max_buf) = decode_all(
        Framing::Nmea { max: 82 },
        format!("${}", "A".repeat(1_000_000)).as_bytes(),
    );
    assert!(frames.is_empty());
    assert!(stats.oversize >= 1);
    assert!(max_buf <= 90, "{max_buf}");
}

#[test]
fn zero_length_prefixed_frames_are_invalid_unless_min_is_0() {
    let input = [0, 2, b'a', b'b', 0, 1, b'c'];
    let strict = Framing::LengthPrefixed {
        width: Width::U8,
        endian: Endian::Big,
        min: 1,
        max: 64,
    };
    let (frames, stats, _) = decode_all(strict, &input);
    assert_eq!(frames, [b"ab".to_vec(), b"c".to_vec()]);
    assert_eq!((stats.invalid, stats.discarded_bytes), (2, 2));
    let lax = Framing::LengthPrefixed {
        width: Width::U8,
        endian: Endian::Big,
        min: 0,
        max: 64,
    };
    let (frames, stats, _) = decode_all(lax, &input);
    assert_eq!(
        frames,
        [vec![], b"ab".to_vec(), vec![], b"c".to_vec()],
        "min 0: empty frames are frames"
    );
    assert_eq!(stats.invalid, 0);
}

#[test]
fn pms5003_frames_decode_into_named_fields() {
    let r = pms5003::Reading {
        pm1_0: 5,
        pm2_5: 12,
        pm10: 17,
        particles_0_3um: 1200,
        ..Default::default()
    };
    let frame = r.encode();
    assert_eq!(frame[..4], [0x42, 0x4d, 0x00, 0x1c]);
    let mut corrupt = frame;
    corrupt[10] ^= 0x01;
    let mut input = vec![0x42, 0x00, 0x13];
    input.extend_from_slice(&corrupt);
    input.extend_from_slice(&frame[..10]); // truncated
    input.extend_from_slice(&frame);
    let (frames, stats, _) = decode_all(Framing::Pms5003, &input);
    assert_eq!(frames.len(), 1);
    assert_eq!(pms5003::Reading::parse(&frames[0]), Some(r));
    assert!(stats.invalid >= 1);
}

fn encode(framing: Framing, frame: &[u8]) -> Vec<u8> {
    match framing {
        Framing::Lines { .. } => [frame, b"\r\n"].concat(),
        Framing::Cobs { .. } => cobs::encode(frame),
        Framing::Slip { .. } => slip::encode(frame),
        Framing::LengthPrefixed { width, endian, .. } => {
            length_prefixed::encode(width, endian, frame).unwrap_or_default()
        }
        Framing::Nmea { .. } => {
            nmea::sentence(std::str::from_utf8(frame).unwrap_or("")).into_bytes()
        }
        Framing::Pms5003 => frame.to_vec(),
    }
}

/// Frames each codec can carry.
fn frames_for(framing: Framing) -> BoxedStrategy<Vec<u8>> {
    match framing {
        Framing::Lines { .. } => "[a-zA-Z0-9 ,.]{1,64}".prop_map(String::into_bytes).boxed(),
        Framing::Nmea { .. } => "GP[A-Z]{3},[A-Z0-9,.]{0,60}"
            .prop_map(String::into_bytes)
            .boxed(),
        Framing::Pms5003 => any::<[u16; 12]>()
            .prop_map(|w| {
                pms5003::Reading {
                    pm1_0_cf1: w[0],
                    pm2_5_cf1: w[1],
                    pm10_cf1: w[2],
                    pm1_0: w[3],
                    pm2_5: w[4],
                    pm10: w[5],
                    particles_0_3um: w[6],
                    particles_0_5um: w[7],
                    particles_1_0um: w[8],
                    particles_2_5um: w[9],
                    particles_5_0um: w[10],
                    particles_10um: w[11],
                }
                .encode()
                .to_vec()
            })
            .boxed(),
        Framing::LengthPrefixed { min, .. } => {
            proptest::collection::vec(any::<u8>(), min..=64).boxed()
        }
        _ => proptest::collection::vec(any::<u8>(), 1..=64).boxed(),
    }
}

/// A framing and 1–7 frames it can carry, all drawn by proptest (so every
/// case decodes different frames, and failures shrink).
fn framings_with_frames() -> impl Strategy<Value = (Framing, Vec<Vec<u8>>)> {
    (0..ALL.len()).prop_flat_map(|which| {
        let framing = ALL[which];
        (
            Just(framing),
            proptest::collection::vec(frames_for(framing), 1..8),
        )
    })
}

proptest! {
    #[test]
    fn every_codec_round_trips((framing, frames) in framings_with_frames()) {
        let input: Vec<u8> = frames.iter().flat_map(|f| encode(framing, f)).collect();
        let (decoded, stats, _) = decode_all(framing, &input);
        let expected: Vec<Vec<u8>> = match framing {
            Framing::Nmea { .. } => frames.iter().map(|f| encode(framing, f).trim_ascii_end().to_vec()).collect(),
            _ => frames.clone(),
        };
        prop_assert_eq!(decoded, expected);
        prop_assert_eq!(stats.invalid + stats.oversize, 0);
    }

    #[test]
    fn arbitrary_input_never_panics_and_stays_bounded(which in 0..ALL.len(), input in proptest::collection::vec(any::<u8>(), 0..4096)) {
        let framing = ALL[which];
        let (frames, _, max_buf) = decode_all(framing, &input);
        prop_assert!(max_buf <= 2 * 64 + 96, "buffer grew to {}", max_buf);
        for f in frames {
            prop_assert!(f.len() <= 82);
        }
    }

    #[test]
    fn bit_flips_never_yield_corrupt_pms_readings(flip in 0usize..(pms5003::FRAME_BYTES * 8)) {
        let r = pms5003::Reading { pm2_5: 40, particles_0_5um: 300, ..Default::default() };
        let mut frame = r.encode();
        frame[flip / 8] ^= 1 << (flip % 8);
        let mut input = frame.to_vec();
        input.extend_from_slice(&r.encode());
        let (frames, _, _) = decode_all(Framing::Pms5003, &input);
        // The good frame always arrives; the flipped one never parses as a
        // different reading.
        prop_assert!(frames.iter().all(|f| pms5003::Reading::parse(f) == Some(r)));
        prop_assert!(!frames.is_empty());
    }
}
