//! The password file: parsing, hashing, verification and atomic edits, on
//! real files in a temporary directory.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::time::{Duration, Instant};

use super::*;

fn names(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

fn mode(path: &Path) -> u32 {
    fs::metadata(path).unwrap().permissions().mode() & 0o7777
}

#[test]
fn set_then_verify_round_trips() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("passwd");
    set_password(&file, "alice", b"correct horse").unwrap();
    let passwords = Passwords::load(&file).unwrap();
    assert_eq!(passwords.len(), 1);
    let entry = passwords.entry("alice").unwrap();
    assert!(
        entry.starts_with("$argon2id$v=19$m=7168,t=5,p=1$"),
        "{entry}"
    );
    assert!(passwords.verify("alice", b"correct horse"));
    assert!(!passwords.verify("alice", b"correct horse "));
    assert!(!passwords.verify("alice", b""));
    assert!(!passwords.verify("bob", b"correct horse"));
    assert!(
        !format!("{passwords:?}").contains("argon2"),
        "{passwords:?}"
    );
}

#[test]
fn each_entry_gets_its_own_salt() {
    let a = hash_password(b"same").unwrap();
    let b = hash_password(b"same").unwrap();
    assert_ne!(a, b);
}

#[test]
fn an_unknown_user_costs_a_verification_too() {
    let dir = tempfile::tempdir().unwrap();
    let text = format!("alice:{}\n", hash_password(b"pw").unwrap());
    let passwords = Passwords::parse(&text, dir.path()).unwrap();
    let fastest = |user: &str| {
        (0..3)
            .map(|_| {
                let start = Instant::now();
                assert!(!passwords.verify(user, b"wrong"));
                start.elapsed()
            })
            .min()
            .unwrap_or(Duration::ZERO)
    };
    let known = fastest("alice");
    let unknown = fastest("mallory");
    assert!(
        unknown * 3 > known,
        "unknown user {unknown:?} vs known user {known:?}"
    );
    // The dummy has the parameters real entries get.
    let dummy = PasswordHash::new(DUMMY_HASH).unwrap();
    let params = Params::try_from(&dummy).unwrap();
    let default = super::params();
    assert_eq!(
        (params.m_cost(), params.t_cost(), params.p_cost()),
        (default.m_cost(), default.t_cost(), default.p_cost())
    );
    check_hash("dummy", DUMMY_HASH, Path::new("x")).unwrap();
}

#[test]
fn set_password_keeps_comments_blank_lines_and_order() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("passwd");
    let bob = hash_password(b"bob-old").unwrap();
    let carol = hash_password(b"carol").unwrap();
    let original =
        format!("# devices on floor 2\n\nbob:{bob}\n  # carol is the pump\ncarol:{carol}\n");
    fs::write(&file, &original).unwrap();

    set_password(&file, "bob", b"bob-new").unwrap();
    set_password(&file, "alice", b"alice").unwrap();

    let text = fs::read_to_string(&file).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 6, "{text}");
    assert_eq!(lines[0], "# devices on floor 2");
    assert_eq!(lines[1], "");
    assert!(lines[2].starts_with("bob:$argon2id$"), "{text}");
    assert_ne!(lines[2], format!("bob:{bob}"));
    assert_eq!(lines[3], "  # carol is the pump");
    assert_eq!(lines[4], format!("carol:{carol}"));
    assert!(lines[5].starts_with("alice:$argon2id$"), "{text}");
    let passwords = Passwords::load(&file).unwrap();
    assert!(passwords.verify("bob", b"bob-new"));
    assert!(!passwords.verify("bob", b"bob-old"));
    assert!(passwords.verify("carol", b"carol"));
    assert!(passwords.verify("alice", b"alice"));
}

#[test]
fn every_parse_error_names_the_file_and_the_line() {
    let good = hash_password(b"pw").unwrap();
    let argon2i = good.replacen("$argon2id$", "$argon2i$", 1);
    let heavy = good.replacen("m=7168", "m=1048576", 1);
    let cases: Vec<(String, usize, &str)> = vec![
        ("alice".into(), 1, "no `:`"),
        (
            format!("# c\n\nal/ice:{good}"),
            3,
            "user name `al/ice`: contains '/'",
        ),
        (format!(":{good}"), 1, "user name ``: is empty"),
        (format!("a b:{good}"), 1, "contains ' '"),
        (
            format!("alice:{good}\nalice:{good}"),
            2,
            "user `alice` again (first on line 1)",
        ),
        (
            "alice:$argon2id$garbage".into(),
            1,
            "not a valid PHC string",
        ),
        (
            "alice:$2b$12$abcdefghijklmnopqrstuv".into(),
            1,
            "the hash of `alice`",
        ),
        (format!("alice:{argon2i}"), 1, "not an argon2id hash"),
        (format!("alice:{heavy}"), 1, "asks for m=1048576"),
        ("alice:hunter2".into(), 1, "plaintext"),
    ];
    let path = Path::new("/etc/edgefn/passwd");
    for (text, line, want) in cases {
        let e = Passwords::parse(&text, path).unwrap_err().to_string();
        let prefix = format!("/etc/edgefn/passwd:{line}: ");
        assert!(e.starts_with(&prefix), "{text:?}: {e}");
        assert!(e.contains(want), "{text:?}: {e}");
    }
}

#[test]
fn a_plaintext_password_is_refused_without_being_repeated() {
    for text in ["alice:hunter2", "alice:$ecret"] {
        let e = Passwords::parse(text, Path::new("pw"))
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("pw:1: "), "{e}");
        assert!(!e.contains("hunter2") && !e.contains("ecret"), "{e}");
    }
    let e = Passwords::parse("alice:hunter2", Path::new("pw"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("plaintext"), "{e}");
}

#[test]
fn a_file_that_is_not_utf8_is_refused_at_its_line() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("passwd");
    fs::write(&file, b"# ok\n# still ok\n\xff\n").unwrap();
    let e = Passwords::load(&file).unwrap_err().to_string();
    assert_eq!(e, format!("{}:3: not UTF-8 text", file.display()));
}

#[test]
fn user_names_are_checked() {
    for good in ["dev-01.floor_2", "A", &"x".repeat(64)] {
        check_user_name(good).unwrap();
    }
    for bad in [
        "",
        "a/b",
        "a+b",
        "a#",
        "a:b",
        "a b",
        "tab\t",
        "é",
        "a\0",
        &"x".repeat(65),
    ] {
        assert!(check_user_name(bad).is_err(), "{bad:?}");
    }
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("passwd");
    let e = set_password(&file, "sensors/+", b"pw").unwrap_err();
    assert!(matches!(e, PasswdError::BadUser { .. }), "{e}");
    assert!(e.to_string().contains("user name `sensors/+`"), "{e}");
    assert!(!file.exists());
}

#[test]
fn empty_password_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("passwd");
    let e = set_password(&file, "alice", b"").unwrap_err().to_string();
    assert!(e.contains("the password for `alice` is empty"), "{e}");
    assert!(!file.exists());
}

#[test]
fn a_new_file_is_0600_and_an_existing_one_keeps_its_mode() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("passwd");
    set_password(&file, "alice", b"pw").unwrap();
    assert_eq!(mode(&file), 0o600);

    fs::set_permissions(&file, fs::Permissions::from_mode(0o640)).unwrap();
    set_password(&file, "bob", b"pw").unwrap();
    assert_eq!(mode(&file), 0o640);
    assert!(remove_user(&file, "alice").unwrap());
    assert_eq!(mode(&file), 0o640);
}

#[test]
fn an_existing_file_keeps_its_owner() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("passwd");
    set_password(&file, "alice", b"pw").unwrap();
    // Giving a file away needs root: elsewhere there is nothing to check.
    if std::os::unix::fs::chown(&file, Some(65534), Some(65534)).is_err() {
        return;
    }
    set_password(&file, "bob", b"pw").unwrap();
    let meta = fs::metadata(&file).unwrap();
    assert_eq!((meta.uid(), meta.gid()), (65534, 65534));
}

#[test]
fn edits_replace_the_file_atomically_and_leave_no_temporary_file() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("passwd");
    set_password(&file, "alice", b"pw").unwrap();
    let inode = fs::metadata(&file).unwrap().ino();
    set_password(&file, "bob", b"pw").unwrap();
    assert_ne!(
        fs::metadata(&file).unwrap().ino(),
        inode,
        "not renamed over"
    );
    assert!(remove_user(&file, "alice").unwrap());
    assert_eq!(names(dir.path()), ["passwd"]);
}

#[test]
fn a_symbolic_link_stays_a_link() {
    let dir = tempfile::tempdir().unwrap();
    let real = dir.path().join("real");
    let link = dir.path().join("link");
    set_password(&real, "alice", b"pw").unwrap();
    std::os::unix::fs::symlink(&real, &link).unwrap();
    set_password(&link, "bob", b"pw").unwrap();
    assert!(fs::symlink_metadata(&link).unwrap().is_symlink());
    assert_eq!(Passwords::load(&real).unwrap().len(), 2);
    assert_eq!(names(dir.path()), ["link", "real"]);
}

#[test]
fn remove_user_removes_only_that_user() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("passwd");
    fs::write(&file, "# keep me\n").unwrap();
    set_password(&file, "alice", b"a").unwrap();
    set_password(&file, "bob", b"b").unwrap();
    assert!(remove_user(&file, "alice").unwrap());
    let text = fs::read_to_string(&file).unwrap();
    assert!(text.starts_with("# keep me\nbob:$argon2id$"), "{text}");
    assert_eq!(text.lines().count(), 2, "{text}");

    assert!(!remove_user(&file, "alice").unwrap());
    assert_eq!(fs::read_to_string(&file).unwrap(), text);
    assert!(Passwords::load(&file).unwrap().verify("bob", b"b"));
}

#[test]
fn a_malformed_file_is_refused_and_left_untouched() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("passwd");
    let original = "# ok\nalice:hunter2\n";
    fs::write(&file, original).unwrap();
    let e = set_password(&file, "bob", b"pw").unwrap_err().to_string();
    assert!(e.starts_with(&format!("{}:2: ", file.display())), "{e}");
    let e = remove_user(&file, "alice").unwrap_err().to_string();
    assert!(e.starts_with(&format!("{}:2: ", file.display())), "{e}");
    assert_eq!(fs::read_to_string(&file).unwrap(), original);
    assert_eq!(names(dir.path()), ["passwd"]);
}

#[test]
fn a_file_over_1_mib_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("passwd");
    let comment = format!("#{}\n", "x".repeat(1022));
    fs::write(&file, comment.repeat(1024)).unwrap();
    assert_eq!(Passwords::load(&file).unwrap().len(), 0);
    fs::write(&file, comment.repeat(1024) + "\n").unwrap();
    let e = Passwords::load(&file).unwrap_err();
    assert!(matches!(e, PasswdError::TooLarge { .. }), "{e}");
    assert!(e.to_string().contains("at most 1048576 bytes"), "{e}");
    let e = set_password(&file, "alice", b"pw").unwrap_err();
    assert!(matches!(e, PasswdError::TooLarge { .. }), "{e}");
}

#[test]
fn a_missing_file_is_an_io_error_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("nope");
    let e = Passwords::load(&file).unwrap_err();
    assert!(
        matches!(&e, PasswdError::Io { source, .. } if source.kind() == io::ErrorKind::NotFound)
    );
    assert!(
        e.to_string()
            .starts_with(&format!("{}: cannot read: ", file.display())),
        "{e}"
    );
    assert!(remove_user(&file, "alice").is_err());
}
