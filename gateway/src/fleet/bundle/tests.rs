//! Bundles: round trip, and every way a bundle is refused (without panic).

use std::path::{Path, PathBuf};

use super::*;
use crate::fleet::keys::{SigningKey, keygen};

const LIMITS: BundleLimits = BundleLimits {
    max_bytes: 1024 * 1024,
};

fn key(dir: &Path) -> SigningKey {
    SigningKey::read(&keygen(dir).unwrap().0).unwrap()
}

/// A functions file with two functions (fake component bytes: `build`
/// does not load them without `--target`).
fn functions_file(dir: &Path, extra: &str) -> PathBuf {
    std::fs::create_dir_all(dir.join("wasm")).unwrap();
    std::fs::write(dir.join("wasm/a.wasm"), b"\0asm component A").unwrap();
    std::fs::write(dir.join("wasm/b.wasm"), b"\0asm component B").unwrap();
    let path = dir.join("functions.toml");
    std::fs::write(
        &path,
        format!(
            "# comment\n[[functions]]\nname = \"a\"\ncomponent = \"wasm/a.wasm\"\ntriggers = [\"s/#\"]\n\
             [functions.config]\nlimit = \"3\"\n\
             [[functions]]\nname = \"b\"\ncomponent = \"wasm/b.wasm\"\ntriggers = [\"t\"]\n{extra}"
        ),
    )
    .unwrap();
    path
}

fn built(dir: &Path) -> (Vec<u8>, SigningKey) {
    let k = key(&dir.join("keys"));
    let file = functions_file(dir, "");
    (build(&file, &k, Some(42), &[]).unwrap(), k)
}

fn decode(bytes: &[u8]) -> BundleFile {
    from_cbor(bytes).unwrap()
}

fn manifest_of(file: &BundleFile) -> Manifest {
    from_cbor(file.manifest.as_ref().unwrap()).unwrap()
}

/// Re-signs `file` with `manifest` by `k`.
fn resign(mut file: BundleFile, manifest: &Manifest, k: &SigningKey) -> Vec<u8> {
    let bytes = to_cbor(manifest);
    file.signature = Some(ByteBuf::from(k.sign(&bytes).to_vec()));
    file.key = Some(ByteBuf::from(k.public().to_bytes().to_vec()));
    file.manifest = Some(ByteBuf::from(bytes));
    to_cbor(&file)
}

#[test]
fn a_built_bundle_opens_with_its_components_and_functions() {
    let dir = tempfile::tempdir().unwrap();
    let (bytes, k) = built(dir.path());
    let trusted = TrustedKeys(vec![k.public()]);
    let b = Bundle::open(&bytes, &trusted, &LIMITS).unwrap();
    assert_eq!(b.sha256, sha256_hex(&bytes));
    assert_eq!(b.signer, k.public());
    assert_eq!(b.manifest.version, 42);
    assert_eq!(b.manifest.components.len(), 2);
    assert_eq!(
        b.component("a", None),
        Some((&b"\0asm component A"[..], false))
    );
    assert_eq!(
        b.component("b", Some("x86_64-unknown-linux-gnu")),
        Some((&b"\0asm component B"[..], false))
    );
    assert_eq!(b.component("c", None), None);
    let sha_a = sha256_hex(b"\0asm component A");
    assert!(
        b.manifest
            .functions
            .contains(&format!("component = \"sha256:{sha_a}\"")),
        "{}",
        b.manifest.functions
    );
    let functions = b
        .functions(Path::new("/data/fleet/components"), None)
        .unwrap();
    assert_eq!(functions.len(), 2);
    assert_eq!(
        functions[0]["component"].as_str(),
        Some(format!("/data/fleet/components/{sha_a}.wasm").as_str())
    );
    assert_eq!(functions[0]["config"]["limit"].as_str(), Some("3"));
    assert_eq!(functions[1]["name"].as_str(), Some("b"));
    let (manifest, sha, signer) = Bundle::inspect(&bytes, &LIMITS).unwrap();
    assert_eq!(
        (manifest, sha, signer),
        (b.manifest.clone(), b.sha256, k.public())
    );
    // Without --version: the creation time.
    let file = functions_file(dir.path(), "");
    let b2 = build(&file, &k, None, &[]).unwrap();
    let m2 = Bundle::inspect(&b2, &LIMITS).unwrap().0;
    assert_eq!(m2.version, m2.created_ms);
    assert!(m2.version > 1_700_000_000_000);
}

#[test]
fn the_precompiled_component_for_the_target_is_chosen() {
    let dir = tempfile::tempdir().unwrap();
    let (bytes, k) = built(dir.path());
    let mut file = decode(&bytes);
    let mut manifest = manifest_of(&file);
    let cwasm = b"\x7fELF precompiled A".to_vec();
    let sha = sha256_hex(&cwasm);
    manifest.components[0]
        .precompiled
        .insert("pulley32".to_owned(), sha.clone());
    file.blobs.insert(sha.clone(), ByteBuf::from(cwasm.clone()));
    let bytes = resign(file, &manifest, &k);
    let b = Bundle::open(&bytes, &TrustedKeys(vec![k.public()]), &LIMITS).unwrap();
    assert_eq!(
        b.component("a", Some("pulley32")),
        Some((cwasm.as_slice(), true))
    );
    assert!(!b.component("a", None).unwrap().1);
    let functions = b.functions(Path::new("c"), Some("pulley32")).unwrap();
    assert_eq!(
        functions[0]["component"].as_str(),
        Some(format!("c/{sha}.cwasm").as_str())
    );
    let files = b.component_files(Some("pulley32"));
    assert!(files.iter().any(|(n, _)| *n == format!("{sha}.cwasm")));
    assert_eq!(files.len(), 2);
}

#[test]
fn a_changed_component_is_tampered_and_a_changed_manifest_a_bad_signature() {
    let dir = tempfile::tempdir().unwrap();
    let (bytes, k) = built(dir.path());
    let trusted = TrustedKeys(vec![k.public()]);
    let mut changed = bytes.clone();
    let at = changed
        .windows(11)
        .position(|w| w == b"component B")
        .unwrap();
    changed[at + 10] = b'C';
    assert_eq!(
        Bundle::open(&changed, &trusted, &LIMITS).unwrap_err(),
        BundleError::Tampered {
            blob: sha256_hex(b"\0asm component B")
        }
    );
    // The manifest's version raised without re-signing.
    let mut file = decode(&bytes);
    let mut manifest = manifest_of(&file);
    manifest.version = 43;
    file.manifest = Some(ByteBuf::from(to_cbor(&manifest)));
    let e = Bundle::open(&to_cbor(&file), &trusted, &LIMITS).unwrap_err();
    assert_eq!(e, BundleError::BadSignature);
    assert!(e.to_string().contains("changed after signing"), "{e}");
}

#[test]
fn a_bundle_signed_by_an_unknown_key_is_refused_with_its_id() {
    let dir = tempfile::tempdir().unwrap();
    let (bytes, k) = built(dir.path());
    let trusted = TrustedKeys(vec![key(&dir.path().join("other")).public()]);
    let e = Bundle::open(&bytes, &trusted, &LIMITS).unwrap_err();
    assert_eq!(
        e,
        BundleError::UnknownKey {
            id: k.public().id()
        }
    );
    assert!(
        e.to_string()
            .contains(&format!("signed by unknown key {}", k.public().id())),
        "{e}"
    );
    // `inspect` makes no trust decision.
    assert!(Bundle::inspect(&bytes, &LIMITS).is_ok());
}

#[test]
fn unsigned_missing_extra_and_unsupported_bundles_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (bytes, k) = built(dir.path());
    let trusted = TrustedKeys(vec![k.public()]);
    let open = |file: BundleFile| Bundle::open(&to_cbor(&file), &trusted, &LIMITS).unwrap_err();

    let mut file = decode(&bytes);
    file.signature = None;
    assert_eq!(open(file), BundleError::Unsigned);
    let mut file = decode(&bytes);
    file.key = Some(ByteBuf::new());
    assert_eq!(open(file), BundleError::Unsigned);

    let mut file = decode(&bytes);
    let sha_b = sha256_hex(b"\0asm component B");
    file.blobs.remove(&sha_b);
    assert_eq!(open(file), BundleError::Missing { blob: sha_b });

    let mut file = decode(&bytes);
    let extra = b"smuggled".to_vec();
    file.blobs.insert(sha256_hex(&extra), ByteBuf::from(extra));
    assert!(
        matches!(open(file), BundleError::Malformed(m) if m.contains("not named in the manifest"))
    );

    let mut file = decode(&bytes);
    file.format = Some(2);
    assert_eq!(open(file), BundleError::UnsupportedFormat(2));

    // A manifest whose functions and entries disagree, properly signed.
    let file = decode(&bytes);
    let mut manifest = manifest_of(&file);
    manifest.components.pop();
    let file2 = decode(&bytes);
    let mut blobs = file2.blobs;
    blobs.remove(&sha256_hex(b"\0asm component B"));
    let mut file = file;
    file.blobs = blobs;
    let e = Bundle::open(&resign(file, &manifest, &k), &trusted, &LIMITS).unwrap_err();
    assert!(
        e.to_string()
            .contains("manifest: functions[1]: no component entry for `b`"),
        "{e}"
    );
}

#[test]
fn garbage_truncated_deep_and_huge_inputs_are_refused_without_panic() {
    let dir = tempfile::tempdir().unwrap();
    let (bytes, k) = built(dir.path());
    let trusted = TrustedKeys(vec![k.public()]);
    // Every prefix, and every single-byte change of the header region.
    for n in 0..bytes.len() {
        assert!(
            Bundle::open(&bytes[..n], &trusted, &LIMITS).is_err(),
            "prefix {n}"
        );
    }
    for i in 0..bytes.len().min(400) {
        let mut b = bytes.clone();
        b[i] ^= 0xff;
        assert!(Bundle::open(&b, &trusted, &LIMITS).is_err(), "byte {i}");
    }
    let e = Bundle::open(b"garbage", &trusted, &LIMITS).unwrap_err();
    assert!(matches!(e, BundleError::Malformed(_)), "{e}");
    // A map whose manifest claims 2^63 bytes: no allocation from it.
    let mut claim = vec![0xa1, 0x68];
    claim.extend_from_slice(b"manifest");
    claim.extend_from_slice(&[0x5b, 0x7f, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff]);
    let e = Bundle::open(&claim, &trusted, &LIMITS).unwrap_err();
    assert!(
        matches!(e, BundleError::Malformed(ref m) if m == "truncated"),
        "{e}"
    );
    // A map claiming 2^63 entries, and 10 000 nested arrays.
    let e = Bundle::open(
        &[0xbb, 0x7f, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff],
        &trusted,
        &LIMITS,
    );
    assert!(matches!(e, Err(BundleError::Malformed(_))), "{e:?}");
    let deep = vec![0x81; 10_000];
    let e = Bundle::open(&deep, &trusted, &LIMITS).unwrap_err();
    assert!(matches!(e, BundleError::Malformed(_)), "{e}");
    // Trailing bytes.
    let mut long = bytes.clone();
    long.push(0);
    assert!(matches!(
        Bundle::open(&long, &trusted, &LIMITS),
        Err(BundleError::Malformed(m)) if m.contains("after the end")
    ));
    // Too large: refused before parsing.
    let small = BundleLimits { max_bytes: 100 };
    assert_eq!(
        Bundle::open(&bytes, &trusted, &small).unwrap_err(),
        BundleError::TooLarge {
            size: bytes.len() as u64,
            max: 100
        }
    );
}

#[test]
fn a_functions_file_with_an_unknown_key_names_its_path() {
    let dir = tempfile::tempdir().unwrap();
    let k = key(&dir.path().join("keys"));
    let file = functions_file(dir.path(), "colour = \"red\"\n");
    let e = build(&file, &k, None, &[]).unwrap_err();
    let text = e.to_string();
    assert!(matches!(e, BundleError::Functions(_)), "{e:?}");
    assert!(
        text.starts_with(&format!(
            "{}: functions[1].colour: unknown field `colour`",
            file.display()
        )),
        "{text}"
    );
    let file = functions_file(dir.path(), "[functions.limits]\ntimeout = 5\n");
    let text = build(&file, &k, None, &[]).unwrap_err().to_string();
    assert!(
        text.contains("functions[1].limits.timeout: unknown field"),
        "{text}"
    );

    let path = dir.path().join("other.toml");
    std::fs::write(&path, "[gateway]\nid = \"x\"\n").unwrap();
    let text = build(&path, &k, None, &[]).unwrap_err().to_string();
    assert!(
        text.contains("gateway: only `[[functions]]` tables belong in a bundle"),
        "{text}"
    );
    std::fs::write(
        &path,
        "[[functions]]\nname = \"a\"\ncomponent = \"wasm/a.wasm\"\ntriggers = [\"s\"]\n\
         [[functions]]\nname = \"a\"\ncomponent = \"wasm/b.wasm\"\ntriggers = [\"t\"]\n",
    )
    .unwrap();
    let text = build(&path, &k, None, &[]).unwrap_err().to_string();
    assert!(
        text.contains("functions[1].name: `a` is used twice"),
        "{text}"
    );
    std::fs::write(
        &path,
        "[[functions]]\nname = \"a\"\ncomponent = \"gone.wasm\"\ntriggers = [\"s\"]\n",
    )
    .unwrap();
    let text = build(&path, &k, None, &[]).unwrap_err().to_string();
    assert!(
        text.contains("functions[0].component: cannot read") && text.contains("gone.wasm"),
        "{text}"
    );
}

#[test]
fn host_target_names_this_machine_as_compile_target_does() {
    let t = host_target().unwrap();
    if cfg!(all(
        target_arch = "x86_64",
        target_os = "linux",
        target_env = "gnu"
    )) {
        assert_eq!(t, "x86_64-unknown-linux-gnu");
    }
    assert_eq!(wasm_target("armv7-unknown-linux-gnueabihf"), "pulley32");
    assert_eq!(wasm_target(&t), t);
}
