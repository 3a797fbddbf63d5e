//! `edgefn passwd`: a device's entry in the embedded broker's password file.

use std::io::{BufRead, IsTerminal, Read, Write};
use std::path::Path;
use std::process::ExitCode;

use anyhow::Context;

use crate::broker::passwd::{self, PasswdError, Passwords};

/// Longest password line read from a non-terminal stdin (MQTT's limit).
const MAX_PASSWORD_LINE: u64 = passwd::MAX_PASSWORD_BYTES as u64 + 2;

/// `edgefn passwd FILE USER [--delete]`.
pub(super) fn passwd(
    path: &Path,
    user: &str,
    delete: bool,
    out: &mut dyn Write,
) -> anyhow::Result<ExitCode> {
    // A PasswdError's message already ends with its cause: shown once.
    let fail = |e: PasswdError| anyhow::anyhow!("{e}");
    let file = path.display();
    if delete {
        if !passwd::remove_user(path, user).map_err(fail)? {
            anyhow::bail!(
                "{file}: no user `{}`; nothing was changed",
                user.escape_debug()
            );
        }
    } else {
        passwd::check_user_name(user).map_err(|reason| {
            anyhow::anyhow!("{file}: user name `{}`: {reason}", user.escape_debug())
        })?;
        // A broken file is refused before the password is asked for.
        match Passwords::load(path) {
            Err(PasswdError::Io { source, .. })
                if source.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(fail(e)),
            Ok(_) => {}
        }
        let password = read_new_password(path, user)?;
        passwd::set_password(path, user, password.as_bytes()).map_err(fail)?;
    }
    let users = Passwords::load(path).map_err(fail)?.len();
    if std::fs::metadata(path).is_ok_and(|m| {
        use std::os::unix::fs::PermissionsExt;
        m.permissions().mode() & 0o004 != 0
    }) {
        eprintln!(
            "warning: {file} is readable by every user; `chmod 600` (or 640, group edgefn) it"
        );
    }
    writeln!(
        out,
        "passwd: {file}: {} {user} ({users} user{}); send SIGHUP to a running gateway to apply",
        if delete { "deleted" } else { "set" },
        if users == 1 { "" } else { "s" },
    )?;
    Ok(ExitCode::SUCCESS)
}

/// The new password: asked twice on the terminal (no echo), or one line
/// from stdin for scripts (`echo secret | edgefn passwd FILE USER`).
fn read_new_password(path: &Path, user: &str) -> anyhow::Result<String> {
    let file = path.display();
    let password = if std::io::stdin().is_terminal() {
        let first = rpassword::prompt_password(format!("Password for {user}: "))
            .with_context(|| format!("{file}: reading the password from the terminal"))?;
        if !first.is_empty() {
            let again = rpassword::prompt_password("Again: ")
                .with_context(|| format!("{file}: reading the password from the terminal"))?;
            if again != first {
                anyhow::bail!("{file}: the two passwords differ; nothing was changed");
            }
        }
        first
    } else {
        let mut line = String::new();
        std::io::stdin()
            .lock()
            .take(MAX_PASSWORD_LINE)
            .read_line(&mut line)
            .with_context(|| format!("{file}: reading the password from stdin"))?;
        let password = line.strip_suffix('\n').unwrap_or(&line);
        password.strip_suffix('\r').unwrap_or(password).to_owned()
    };
    if password.is_empty() {
        anyhow::bail!("{file}: the password for `{user}` is empty; nothing was changed");
    }
    Ok(password)
}
