//! The fleet store: atomic writes, leftovers of a power cut, corrupt state.

use super::*;
use crate::fleet::bundle::{build, sha256_hex};
use crate::fleet::keys::{SigningKey, TrustedKeys, keygen};

/// A bundle with one function whose component is `body`.
fn bundle(dir: &Path, name: &str, body: &[u8]) -> (Vec<u8>, Bundle) {
    let k = SigningKey::read(&keygen(&dir.join(name)).unwrap().0).unwrap();
    let wasm = dir.join(format!("{name}.wasm"));
    std::fs::write(&wasm, body).unwrap();
    let file = dir.join(format!("{name}.toml"));
    std::fs::write(
        &file,
        format!(
            "[[functions]]\nname = \"{name}\"\ncomponent = \"{name}.wasm\"\ntriggers = [\"t\"]\n"
        ),
    )
    .unwrap();
    let bytes = build(&file, &k, Some(1), &[]).unwrap();
    let limits = BundleLimits { max_bytes: 1 << 20 };
    let b = Bundle::open(&bytes, &TrustedKeys(vec![k.public()]), &limits).unwrap();
    (bytes, b)
}

fn current(version: u64) -> Current {
    Current {
        sha256: Some("ab".repeat(32)),
        version,
        applied_ms: 1,
        issued_ms: 2,
    }
}

#[test]
fn bundles_and_components_are_stored_under_their_sha256() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&dir.path().join("data")).unwrap();
    let (bytes, b) = bundle(dir.path(), "f", b"\0asm f");
    let path = store.save_bundle(&b.sha256, &bytes).unwrap();
    assert_eq!(
        path,
        dir.path()
            .join(format!("data/fleet/bundles/{}.bundle", b.sha256))
    );
    assert_eq!(store.read_bundle(&b.sha256).unwrap(), Some(bytes));
    assert_eq!(store.read_bundle(&"00".repeat(32)).unwrap(), None);
    assert!(matches!(
        store.save_bundle("../../etc/passwd", b"x"),
        Err(StoreError::BadName(_))
    ));
    store.write_components(&b, None).unwrap();
    let file = store
        .components_dir()
        .join(format!("{}.wasm", sha256_hex(b"\0asm f")));
    assert_eq!(std::fs::read(&file).unwrap(), b"\0asm f");
    // Content-addressed: an existing file is kept, not rewritten.
    let before = std::fs::metadata(&file).unwrap().modified().unwrap();
    store.write_components(&b, None).unwrap();
    assert_eq!(
        std::fs::metadata(&file).unwrap().modified().unwrap(),
        before
    );
    assert!(no_tmp(&store.components_dir()) && no_tmp(&store.bundles_dir()));
}

fn no_tmp(dir: &Path) -> bool {
    std::fs::read_dir(dir)
        .unwrap()
        .all(|e| !e.unwrap().file_name().to_string_lossy().ends_with(".tmp"))
}

#[test]
fn leftovers_of_a_power_cut_are_ignored_and_pruned() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    assert_eq!(store.current().unwrap(), None);
    store.set_current(&current(1)).unwrap();
    let fleet = dir.path().join("fleet");
    assert!(no_tmp(&fleet));
    // A power cut while writing version 2 and a new bundle: half-written
    // temporary files, never renamed.
    std::fs::write(fleet.join("current.json.tmp"), b"{\"sha256\": \"cd").unwrap();
    let sha = "cd".repeat(32);
    let partial = fleet.join(format!("bundles/{sha}.bundle.tmp"));
    std::fs::write(&partial, b"\xbf half").unwrap();
    assert_eq!(store.current().unwrap(), Some(current(1)));
    assert_eq!(store.read_bundle(&sha).unwrap(), None);
    // The next write replaces the leftover.
    store.set_current(&current(2)).unwrap();
    assert_eq!(store.current().unwrap(), Some(current(2)));
    store.prune(&[]).unwrap();
    assert!(!partial.exists());
}

#[test]
fn a_corrupt_current_json_is_an_error_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let path = dir.path().join("fleet/current.json");
    std::fs::write(&path, b"{\"sha256\": nul").unwrap();
    let e = store.current().unwrap_err();
    assert!(matches!(e, StoreError::Corrupt { .. }), "{e:?}");
    let text = e.to_string();
    assert!(
        text.contains(&path.display().to_string()) && text.contains("is corrupt"),
        "{text}"
    );
    std::fs::write(
        &path,
        b"{\"sha256\": \"../x\", \"version\": 1, \"applied_ms\": 1, \"issued_ms\": 1}",
    )
    .unwrap();
    assert!(
        store
            .current()
            .unwrap_err()
            .to_string()
            .contains("not a sha256")
    );
}

#[test]
fn prune_keeps_the_named_bundles_and_their_components_only() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let (old_bytes, old) = bundle(dir.path(), "old", b"\0asm old");
    let (new_bytes, new) = bundle(dir.path(), "new", b"\0asm new");
    for (bytes, b) in [(&old_bytes, &old), (&new_bytes, &new)] {
        store.save_bundle(&b.sha256, bytes).unwrap();
        store.write_components(b, None).unwrap();
    }
    store.prune(&[&new.sha256]).unwrap();
    assert_eq!(store.read_bundle(&old.sha256).unwrap(), None);
    assert!(store.read_bundle(&new.sha256).unwrap().is_some());
    let names: Vec<String> = std::fs::read_dir(store.components_dir())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names, vec![format!("{}.wasm", sha256_hex(b"\0asm new"))]);
}
