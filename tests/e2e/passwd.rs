//! `edgefn passwd FILE USER [--delete]`: the real binary editing a real
//! password file, the password piped on stdin as a script would (or typed
//! on a real pseudo-terminal), the result read back with the library the
//! broker uses.

use std::fs::File;
use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use edgefn::broker::passwd::Passwords;

use crate::support::*;

/// Runs `edgefn passwd FILE USER [extra]` with `stdin` piped in.
fn passwd(file: &Path, user: &str, extra: &[&str], stdin: &str) -> Output {
    let mut child = Command::new(edgefn_bin())
        .arg("passwd")
        .arg(file)
        .arg(user)
        .args(extra)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut input = child.stdin.take().unwrap();
    // The command may exit without reading (a refused name): ignore EPIPE.
    let _ = input.write_all(stdin.as_bytes());
    drop(input);
    child.wait_with_output().unwrap()
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[track_caller]
fn assert_ok(out: &Output) -> String {
    assert!(
        out.status.success(),
        "{:?}\nstdout: {}\nstderr: {}",
        out.status,
        text(&out.stdout),
        text(&out.stderr)
    );
    text(&out.stdout)
}

#[track_caller]
fn assert_refused(out: &Output) -> String {
    assert_eq!(out.status.code(), Some(1), "stdout: {}", text(&out.stdout));
    text(&out.stderr)
}

#[test]
fn passwd_from_stdin_creates_a_0600_file_whose_entry_verifies() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("passwd");
    let stdout = assert_ok(&passwd(&file, "alice", &[], "s3cret\r\n"));
    assert_eq!(
        stdout.trim_end(),
        format!(
            "passwd: {}: set alice (1 user); send SIGHUP to a running gateway to apply",
            file.display()
        )
    );
    let mode = std::fs::metadata(&file).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    let contents = std::fs::read_to_string(&file).unwrap();
    assert!(contents.starts_with("alice:$argon2id$"), "{contents}");
    assert!(!contents.contains("s3cret"), "{contents}");
    let passwords = Passwords::load(&file).unwrap();
    assert!(passwords.verify("alice", b"s3cret"));
    assert!(!passwords.verify("alice", b"s3cret\r"));
}

#[test]
fn passwd_changes_a_password_and_keeps_the_other_users() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("passwd");
    std::fs::write(&file, "# the ward's monitors\n").unwrap();
    assert_ok(&passwd(&file, "alice", &[], "old\n"));
    assert_ok(&passwd(&file, "bob", &[], "bobs\n"));
    let before = Passwords::load(&file).unwrap();

    let stdout = assert_ok(&passwd(&file, "alice", &[], "new\n"));
    assert!(stdout.contains(": set alice (2 users);"), "{stdout}");
    let after = Passwords::load(&file).unwrap();
    assert_ne!(after.entry("alice"), before.entry("alice"));
    assert_eq!(after.entry("bob"), before.entry("bob"));
    assert!(after.verify("alice", b"new"));
    assert!(!after.verify("alice", b"old"));
    assert!(after.verify("bob", b"bobs"));
    let contents = std::fs::read_to_string(&file).unwrap();
    let lines: Vec<&str> = contents.lines().collect();
    assert_eq!(lines[0], "# the ward's monitors");
    assert!(lines[1].starts_with("alice:") && lines[2].starts_with("bob:"));
    assert_eq!(lines.len(), 3, "{contents}");
}

#[test]
fn passwd_delete_removes_a_user_and_refuses_an_absent_one() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("passwd");
    assert_ok(&passwd(&file, "alice", &[], "a\n"));
    assert_ok(&passwd(&file, "bob", &[], "b\n"));

    let stdout = assert_ok(&passwd(&file, "bob", &["--delete"], ""));
    assert!(stdout.contains(": deleted bob (1 user);"), "{stdout}");
    let passwords = Passwords::load(&file).unwrap();
    assert_eq!(passwords.entry("bob"), None);
    assert!(passwords.verify("alice", b"a"));

    let before = std::fs::read(&file).unwrap();
    let stderr = assert_refused(&passwd(&file, "bob", &["--delete"], ""));
    assert!(
        stderr.contains(&format!("{}: no user `bob`", file.display())),
        "{stderr}"
    );
    assert_eq!(std::fs::read(&file).unwrap(), before);
}

#[test]
fn passwd_refuses_a_bad_user_name_and_an_empty_password() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("passwd");
    for user in ["sensors/+", "a:b", "bad name", "#", ""] {
        let stderr = assert_refused(&passwd(&file, user, &[], "pw\n"));
        assert!(
            stderr.contains(&format!("{}: user name `", file.display())),
            "{user:?}: {stderr}"
        );
    }
    for input in ["\n", ""] {
        let stderr = assert_refused(&passwd(&file, "alice", &[], input));
        assert!(stderr.contains("is empty"), "{input:?}: {stderr}");
    }
    assert!(!file.exists());
}

#[test]
fn passwd_refuses_a_malformed_file_and_leaves_it_untouched() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("passwd");
    let original = "# devices\nalice:$argon2id$v=19$m=19456,t=2,p=1$c2FsdHNhbHQ$aGFzaGhhc2hoYXNoaGFzaGhhc2hoYXNoaGFzaGhhc2g\nbob:hunter2\n";
    std::fs::write(&file, original).unwrap();
    for extra in [&[][..], &["--delete"][..]] {
        let stderr = assert_refused(&passwd(&file, "carol", extra, "pw\n"));
        assert!(
            stderr.contains(&format!("{}:3: ", file.display())),
            "{stderr}"
        );
        assert!(stderr.contains("plaintext"), "{stderr}");
        assert!(!stderr.contains("hunter2"), "{stderr}");
    }
    assert_eq!(std::fs::read_to_string(&file).unwrap(), original);
    let names: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
    assert_eq!(names.len(), 1, "a temporary file was left behind");
}

/// Polls `cond` until it holds, for at most [`WAIT`].
#[track_caller]
fn poll_until(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + WAIT;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn passwd_on_a_terminal_asks_twice_without_echo() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("passwd");
    let pty = nix::pty::openpty(None, None).unwrap();
    // Only the test holds the master: the child sees a hang-up if it dies.
    nix::fcntl::fcntl(
        &pty.master,
        nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC),
    )
    .unwrap();
    // `setsid --ctty`: the pty becomes the child's controlling terminal, its
    // /dev/tty, which is where the password is read from.
    let mut child = KillOnDrop(
        Command::new("setsid")
            .arg("--ctty")
            .arg(edgefn_bin())
            .arg("passwd")
            .arg(&file)
            .arg("carol")
            .stdin(Stdio::from(pty.slave.try_clone().unwrap()))
            .stdout(Stdio::from(pty.slave.try_clone().unwrap()))
            .stderr(Stdio::from(pty.slave))
            .spawn()
            .unwrap(),
    );
    let master = File::from(pty.master);
    let screen = Arc::new(Mutex::new(String::new()));
    let reader = {
        let mut master = master.try_clone().unwrap();
        let screen = screen.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 256];
            // Ends with EIO once the child has exited.
            while let Ok(n @ 1..) = master.read(&mut buf) {
                screen
                    .lock()
                    .unwrap()
                    .push_str(&String::from_utf8_lossy(&buf[..n]));
            }
        })
    };
    let echo_off = || {
        let termios = nix::sys::termios::tcgetattr(&master).unwrap();
        !termios
            .local_flags
            .contains(nix::sys::termios::LocalFlags::ECHO)
    };
    let shows = |text: &str| screen.lock().unwrap().contains(text);
    poll_until("the first prompt", || {
        shows("Password for carol: ") && echo_off()
    });
    (&master).write_all(b"typed-secret\n").unwrap();
    poll_until("the second prompt", || shows("Again: ") && echo_off());
    (&master).write_all(b"typed-secret\n").unwrap();
    let status = child.0.wait().unwrap();
    reader.join().unwrap();
    let screen = screen.lock().unwrap().clone();
    assert!(status.success(), "{status:?}: {screen}");
    assert!(screen.contains(": set carol (1 user);"), "{screen}");
    assert!(!screen.contains("typed-secret"), "echoed: {screen}");
    assert!(
        Passwords::load(&file)
            .unwrap()
            .verify("carol", b"typed-secret")
    );
}
