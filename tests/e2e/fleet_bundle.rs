//! `edgefn keygen` and `edgefn bundle`: the real binary, real components
//! from `functions/`, the bundle read back with the library a gateway uses.

use std::os::unix::fs::PermissionsExt;
use std::process::{Command, Output};

use edgefn::fleet::bundle::{Bundle, BundleLimits, sha256_hex};
use edgefn::fleet::keys::{PublicKey, TrustedKeys};

use crate::support::*;

/// `edgefn keygen --out dir`, which must succeed.
fn keygen(dir: &std::path::Path) {
    assert!(
        edgefn(&["keygen".as_ref(), "--out".as_ref(), dir.as_os_str()])
            .status
            .success()
    );
}

fn edgefn(args: &[&std::ffi::OsStr]) -> Output {
    Command::new(edgefn_bin()).args(args).output().unwrap()
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[test]
fn keygen_then_bundle_packs_signed_real_components() {
    let dir = tempfile::tempdir().unwrap();
    let keys = dir.path().join("keys");
    let out = edgefn(&["keygen".as_ref(), "--out".as_ref(), keys.as_os_str()]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let public = PublicKey::read(&keys.join("edgefn.pub")).unwrap();
    assert!(
        text(&out.stdout).contains(&format!("(id {})", public.id())),
        "{}",
        text(&out.stdout)
    );
    let mode = std::fs::metadata(keys.join("edgefn.key"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);

    // A second keygen into the same directory is refused; the key stays.
    let secret = std::fs::read(keys.join("edgefn.key")).unwrap();
    let again = edgefn(&["keygen".as_ref(), "--out".as_ref(), keys.as_os_str()]);
    assert_eq!(again.status.code(), Some(1));
    assert!(
        text(&again.stderr).contains("edgefn.key` already exists; refusing to overwrite a key"),
        "{}",
        text(&again.stderr)
    );
    assert_eq!(std::fs::read(keys.join("edgefn.key")).unwrap(), secret);

    let functions = dir.path().join("functions.toml");
    std::fs::write(
        &functions,
        format!(
            "[[functions]]\nname = \"threshold\"\ncomponent = {}\ntriggers = [\"sensors/+/temperature\"]\n\
             [[functions]]\nname = \"enrich\"\ncomponent = {}\ntriggers = [\"sensors/+/raw\"]\n",
            lit(&guest("threshold")),
            lit(&guest("enrich"))
        ),
    )
    .unwrap();
    let file = dir.path().join("app.bundle");
    let out = edgefn(&[
        "bundle".as_ref(),
        "--functions".as_ref(),
        functions.as_os_str(),
        "--key".as_ref(),
        keys.join("edgefn.key").as_os_str(),
        "--out".as_ref(),
        file.as_os_str(),
        "--version".as_ref(),
        "7".as_ref(),
    ]);
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "{stdout}{}", text(&out.stderr));
    let bytes = std::fs::read(&file).unwrap();
    let raw = std::fs::metadata(guest("threshold")).unwrap().len()
        + std::fs::metadata(guest("enrich")).unwrap().len();
    let overhead = bytes.len() as u64 - raw;
    for expected in [
        format!("sha256 {}", sha256_hex(&bytes)),
        "version 7".to_owned(),
        format!(
            "size {} bytes: components {raw} bytes, overhead {overhead} bytes (",
            bytes.len()
        ),
        format!("2 functions, signed by key {}", public.id()),
    ] {
        assert!(stdout.contains(&expected), "`{expected}` in {stdout}");
    }
    assert!(overhead < 2048, "{stdout}");

    // A gateway trusting the key opens it and gets the exact components.
    let limits = BundleLimits {
        max_bytes: 32 << 20,
    };
    let b = Bundle::open(&bytes, &TrustedKeys(vec![public]), &limits).unwrap();
    assert_eq!(b.manifest.version, 7);
    let threshold = std::fs::read(guest("threshold")).unwrap();
    assert_eq!(
        b.component("threshold", None),
        Some((&threshold[..], false))
    );
    let list = b.functions(std::path::Path::new("/c"), None).unwrap();
    assert_eq!(
        list[1]["component"].as_str(),
        Some(
            format!(
                "/c/{}.wasm",
                sha256_hex(&std::fs::read(guest("enrich")).unwrap())
            )
            .as_str()
        )
    );
}

#[test]
fn bundle_precompiles_for_a_target_and_refuses_unknown_keys_by_path() {
    let dir = tempfile::tempdir().unwrap();
    let keys = dir.path().join("keys");
    keygen(&keys);
    let functions = dir.path().join("functions.toml");
    let write = |extra: &str| {
        std::fs::write(
            &functions,
            format!(
                "[[functions]]\nname = \"threshold\"\ncomponent = {}\ntriggers = [\"t\"]\n{extra}",
                lit(&guest("threshold"))
            ),
        )
        .unwrap()
    };
    let file = dir.path().join("app.bundle");
    let bundle = |target: &[&str]| {
        let mut args: Vec<&std::ffi::OsStr> = vec![
            "bundle".as_ref(),
            "--functions".as_ref(),
            functions.as_os_str(),
            "--key".as_ref(),
            "keys/edgefn.key".as_ref(),
            "--out".as_ref(),
            file.as_os_str(),
        ];
        for t in target {
            args.push("--target".as_ref());
            args.push(t.as_ref());
        }
        Command::new(edgefn_bin())
            .current_dir(dir.path())
            .args(args)
            .output()
            .unwrap()
    };
    write("colour = \"red\"\n");
    let out = bundle(&[]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains(&format!(
            "{}: functions[0].colour: unknown field `colour`",
            functions.display()
        )),
        "{}",
        text(&out.stderr)
    );
    assert!(!file.exists());

    write("");
    let out = bundle(&["armv7-unknown-linux-gnueabihf"]);
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "{stdout}{}", text(&out.stderr));
    assert!(stdout.contains(" + precompiled "), "{stdout}");
    let bytes = std::fs::read(&file).unwrap();
    let (manifest, ..) = Bundle::inspect(
        &bytes,
        &BundleLimits {
            max_bytes: 32 << 20,
        },
    )
    .unwrap();
    let entry = &manifest.components[0];
    assert_eq!(entry.precompiled.keys().collect::<Vec<_>>(), ["pulley32"]);
    // Without --version: the creation time in ms.
    assert_eq!(manifest.version, manifest.created_ms);
}

#[test]
fn a_component_precompiled_into_a_bundle_runs_on_this_machine_from_the_store() {
    let dir = tempfile::tempdir().unwrap();
    let keys = dir.path().join("keys");
    keygen(&keys);
    let functions = dir.path().join("functions.toml");
    std::fs::write(
        &functions,
        format!(
            "[[functions]]\nname = \"threshold\"\ncomponent = {}\ntriggers = [\"sensors/+/temperature\"]\n\
             publish = [\"alerts/#\"]\nconfig = {{ limit = \"30\" }}\n",
            lit(&guest("threshold"))
        ),
    )
    .unwrap();
    let host = edgefn::fleet::bundle::host_target().unwrap();
    let file = dir.path().join("app.bundle");
    let out = edgefn(&[
        "bundle".as_ref(),
        "--functions".as_ref(),
        functions.as_os_str(),
        "--key".as_ref(),
        keys.join("edgefn.key").as_os_str(),
        "--out".as_ref(),
        file.as_os_str(),
        "--target".as_ref(),
        host.as_ref(),
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));

    // What a gateway does with it: verify, store the components, point
    // the functions at them.
    let trusted = TrustedKeys(vec![PublicKey::read(&keys.join("edgefn.pub")).unwrap()]);
    let bytes = std::fs::read(&file).unwrap();
    let limits = BundleLimits {
        max_bytes: 32 << 20,
    };
    let b = Bundle::open(&bytes, &trusted, &limits).unwrap();
    let store = edgefn::fleet::store::Store::open(&dir.path().join("data")).unwrap();
    store.save_bundle(&b.sha256, &bytes).unwrap();
    store.write_components(&b, Some(&host)).unwrap();
    let list = b.functions(&store.components_dir(), Some(&host)).unwrap();
    let component = list[0]["component"].as_str().unwrap().to_owned();
    assert!(component.ends_with(".cwasm"), "{component}");
    let mut text_config = "[gateway]\nid = \"gw\"\n[[functions]]\n".to_owned();
    for (key, value) in list[0].as_table().unwrap() {
        text_config.push_str(&format!("{key} = {value}\n"));
    }
    let config = dir.path().join("edgefn.toml");
    std::fs::write(&config, text_config).unwrap();
    let out = edgefn(&[
        "invoke".as_ref(),
        "-c".as_ref(),
        config.as_os_str(),
        "threshold".as_ref(),
        "--topic".as_ref(),
        "sensors/s1/temperature".as_ref(),
        "--payload".as_ref(),
        r#"{"value": 31.5}"#.as_ref(),
    ]);
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "{stdout}{}", text(&out.stderr));
    assert!(stdout.contains("ok: 1 published, 0 forwarded"), "{stdout}");
}
