//! The broker's password file: one `user:hash` line per device, as in
//! mosquitto_passwd's files, where the hash is an argon2id PHC string
//! (`$argon2id$v=19$m=7168,t=5,p=1$salt$hash`) with a random salt per
//! entry and [`params`]: 7 MiB, 5 passes, 1 lane, the OWASP recommendation
//! of equal strength to the crate's default (19 MiB, 2 passes) that needs a
//! third of the memory per login on a small board.
//!
//! `#` comment lines and blank lines are allowed and kept by the editing
//! functions; anything else is an error naming `FILE:LINE`. A plaintext
//! password is refused, never used, and no error message ever repeats what
//! is on the right of a `:`.
//!
//! [`Passwords`] is what the broker checks a CONNECT against (re-read on
//! SIGHUP); [`set_password`] and [`remove_user`] are what `edgefn passwd`
//! edits the file with: atomically, keeping its owner and mode.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use argon2::password_hash::phc::PasswordHash;
use argon2::password_hash::{PasswordHasher, PasswordVerifier};
use argon2::{Argon2, Params};

/// Largest password file read: it is read on every SIGHUP, and 1 MiB holds
/// about 10,000 entries.
pub const MAX_FILE_BYTES: u64 = 1024 * 1024;

/// Longest user name, in characters.
pub const MAX_USER_LEN: usize = 64;

/// Longest password: MQTT's limit for the CONNECT password field.
pub const MAX_PASSWORD_BYTES: usize = 65_535;

/// Heaviest argon2 parameters accepted in an entry (memory in KiB, passes,
/// lanes): every CONNECT with a password runs one verification with them.
const MAX_PARAMS: (u32, u32, u32) = (256 * 1024, 16, 16);

/// Mode of a password file created here: owner read/write only.
const NEW_FILE_MODE: u32 = 0o600;

/// The hash of a random password nobody knows, with [`params`]:
/// an unknown user is verified against it, so a login attempt takes as long
/// whether or not the user exists.
const DUMMY_HASH: &str = "$argon2id$v=19$m=7168,t=5,p=1$ans9BIllups4vcXLjl9G8w$/KKJvI2C7GVFtcjZ9wtJGFnU4Y4Qx6I5w4VDKz2FpRY";

/// Why a password file could not be read, parsed or written.
#[derive(Debug, thiserror::Error)]
pub enum PasswdError {
    /// A file operation failed.
    #[error("{}: cannot {action}: {source}", path.display())]
    Io {
        /// The file (the password file, or the temporary file next to it).
        path: PathBuf,
        /// What was being done ("read", "create", "rename over …").
        action: String,
        /// What the OS said.
        #[source]
        source: io::Error,
    },
    /// The file is over [`MAX_FILE_BYTES`].
    #[error("{}: {size} bytes; a password file may hold at most {MAX_FILE_BYTES} bytes (1 MiB)", path.display())]
    TooLarge {
        /// The password file.
        path: PathBuf,
        /// Its size (or the size it would have had).
        size: u64,
    },
    /// A line is not a comment, a blank or a valid `user:hash` entry.
    #[error("{}:{line}: {reason}", path.display())]
    Parse {
        /// The password file.
        path: PathBuf,
        /// 1-based line number.
        line: usize,
        /// What is wrong with the line.
        reason: String,
    },
    /// The user name given to [`set_password`] is not allowed.
    #[error("{}: user name `{user}`: {reason}", path.display())]
    BadUser {
        /// The password file.
        path: PathBuf,
        /// The refused name (control characters escaped).
        user: String,
        /// See [`check_user_name`].
        reason: String,
    },
    /// The password given to [`set_password`] is empty or too long.
    #[error("{}: the password for `{user}` is {reason}", path.display())]
    BadPassword {
        /// The password file.
        path: PathBuf,
        /// The user.
        user: String,
        /// "empty", or too long.
        reason: &'static str,
    },
    /// argon2 failed (the OS random source, or memory).
    #[error("hashing the password: {0}")]
    Hash(#[source] argon2::password_hash::Error),
}

/// A parsed password file: user name -> argon2id PHC string.
#[derive(Clone, Default)]
pub struct Passwords {
    entries: BTreeMap<String, String>,
}

/// Names only: the hashes stay out of logs.
impl fmt::Debug for Passwords {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Passwords")
            .field("users", &self.entries.keys().collect::<Vec<_>>())
            .finish()
    }
}

impl Passwords {
    /// Reads and parses `path` (at most [`MAX_FILE_BYTES`]). Errors name
    /// the file, and the line for a parse error.
    pub fn load(path: &Path) -> Result<Self, PasswdError> {
        let (text, _) = read_bounded(path, path)?;
        Self::parse(&text, path)
    }

    /// Parses the text of a password file; `path` is for error messages.
    pub fn parse(text: &str, path: &Path) -> Result<Self, PasswdError> {
        parse_lines(text, path).map(|(passwords, _)| passwords)
    }

    /// The stored PHC string of `user` (to notice a changed or removed
    /// entry on reload).
    pub fn entry(&self, user: &str) -> Option<&str> {
        self.entries.get(user).map(String::as_str)
    }

    /// Whether `password` is `user`'s. Slow on purpose (one argon2
    /// verification, tens of milliseconds): call it off the async runtime.
    /// An unknown user is verified against a dummy hash, so the time taken
    /// does not tell which users exist.
    pub fn verify(&self, user: &str, password: &[u8]) -> bool {
        let (hash, known) = match self.entries.get(user) {
            Some(hash) => (hash.as_str(), true),
            None => (DUMMY_HASH, false),
        };
        let matches = PasswordHash::new(hash)
            .is_ok_and(|hash| Argon2::default().verify_password(password, &hash).is_ok());
        matches && known
    }

    /// Number of users.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether the file has no users.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

/// Checks a user name: 1 to 64 ASCII letters, digits, `_`, `.` or `-`.
/// Names are substituted into topic patterns, so MQTT's `/`, `+` and `#`,
/// the file's `:` and white space are never allowed. The error is the
/// reason, without the name.
pub fn check_user_name(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("is empty".to_owned());
    }
    if let Some(c) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-')))
    {
        return Err(format!(
            "contains {c:?}; only ASCII letters, digits, `_`, `.` and `-` are allowed"
        ));
    }
    if name.len() > MAX_USER_LEN {
        return Err(format!("is longer than {MAX_USER_LEN} characters"));
    }
    Ok(())
}

/// The argon2id cost of new entries: 7 MiB of memory, 5 passes, 1 lane
/// (OWASP's alternative to 19 MiB / 2 passes, equally strong; a login holds
/// that memory while it is checked).
pub fn params() -> Params {
    Params::new(7 * 1024, 5, 1, None).unwrap_or_default()
}

/// Hashes `password` with argon2id, [`params`] and a fresh random salt,
/// into a PHC string.
pub fn hash_password(password: &[u8]) -> Result<String, PasswdError> {
    let hasher = Argon2::new(
        argon2::Algorithm::Argon2id,
        argon2::Version::V0x13,
        params(),
    );
    let hash: PasswordHash = hasher.hash_password(password).map_err(PasswdError::Hash)?;
    Ok(hash.to_string())
}

/// Adds or replaces `user`'s entry; creates the file (mode 0600) if
/// missing; keeps comments and other entries and their order; writes
/// atomically (temp file in the same dir + fsync + rename), keeping the
/// existing file's permissions and owner. A malformed file is refused and
/// left as it is.
pub fn set_password(path: &Path, user: &str, password: &[u8]) -> Result<(), PasswdError> {
    check_user_name(user).map_err(|reason| PasswdError::BadUser {
        path: path.to_owned(),
        user: user.escape_debug().to_string(),
        reason,
    })?;
    let bad_password = |reason| PasswdError::BadPassword {
        path: path.to_owned(),
        user: user.to_owned(),
        reason,
    };
    if password.is_empty() {
        return Err(bad_password("empty"));
    }
    if password.len() > MAX_PASSWORD_BYTES {
        return Err(bad_password(
            "longer than 65535 bytes, the most an MQTT client can send",
        ));
    }
    let target = resolve(path)?;
    let existing = match read_bounded(&target, path) {
        Ok(found) => Some(found),
        Err(PasswdError::Io { source, .. }) if source.kind() == io::ErrorKind::NotFound => None,
        Err(e) => return Err(e),
    };
    let lines = match &existing {
        Some((text, _)) => parse_lines(text, path)?.1,
        None => Vec::new(),
    };
    let entry = format!("{user}:{}", hash_password(password)?);
    let mut out = String::new();
    let mut replaced = false;
    for line in &lines {
        if line.user == Some(user) {
            out.push_str(&entry);
            replaced = true;
        } else {
            out.push_str(line.text);
        }
        out.push('\n');
    }
    if !replaced {
        out.push_str(&entry);
        out.push('\n');
    }
    write_atomically(&target, path, &out, existing.as_ref().map(|(_, meta)| meta))
}

/// Removes `user`'s entry, keeping everything else as it is (and writing
/// as [`set_password`] does). `Ok(false)` if there was no such user (the
/// file is then not rewritten).
pub fn remove_user(path: &Path, user: &str) -> Result<bool, PasswdError> {
    let target = resolve(path)?;
    let (text, meta) = read_bounded(&target, path)?;
    let (_, lines) = parse_lines(&text, path)?;
    if !lines.iter().any(|line| line.user == Some(user)) {
        return Ok(false);
    }
    let mut out = String::new();
    for line in lines.iter().filter(|line| line.user != Some(user)) {
        out.push_str(line.text);
        out.push('\n');
    }
    write_atomically(&target, path, &out, Some(&meta))?;
    Ok(true)
}

/// One line of the file as it was written, and the user it defines.
struct Line<'a> {
    text: &'a str,
    user: Option<&'a str>,
}

fn parse_lines<'a>(text: &'a str, path: &Path) -> Result<(Passwords, Vec<Line<'a>>), PasswdError> {
    let mut entries = BTreeMap::new();
    let mut first_line: HashMap<&str, usize> = HashMap::new();
    let mut lines = Vec::new();
    for (index, text) in text.lines().enumerate() {
        let number = index + 1;
        let error = |reason: String| PasswdError::Parse {
            path: path.to_owned(),
            line: number,
            reason,
        };
        let line = text.trim_end();
        if line.trim_start().is_empty() || line.trim_start().starts_with('#') {
            lines.push(Line { text, user: None });
            continue;
        }
        let Some((user, hash)) = line.split_once(':') else {
            return Err(error(
                "expected `user:hash` (no `:` on this line); add entries with `edgefn passwd FILE USER`"
                    .to_owned(),
            ));
        };
        check_user_name(user)
            .map_err(|reason| error(format!("user name `{}`: {reason}", user.escape_debug())))?;
        if let Some(first) = first_line.insert(user, number) {
            return Err(error(format!(
                "user `{user}` again (first on line {first}); each user may appear once"
            )));
        }
        check_hash(user, hash, path).map_err(error)?;
        entries.insert(user.to_owned(), hash.to_owned());
        lines.push(Line {
            text,
            user: Some(user),
        });
    }
    Ok((Passwords { entries }, lines))
}

/// Checks that `hash` is an argon2id PHC string with parameters this
/// process can afford to verify. The message never shows `hash`: it may be
/// a plaintext password.
fn check_hash(user: &str, hash: &str, path: &Path) -> Result<(), String> {
    if !hash.starts_with('$') {
        return Err(format!(
            "the entry of `{user}` is not a hash (a plaintext password?); passwords are stored only as argon2id hashes: set it with `edgefn passwd {} {user}`",
            path.display()
        ));
    }
    let parsed = PasswordHash::new(hash)
        .map_err(|e| format!("the hash of `{user}` is not a valid PHC string ({e})"))?;
    if parsed.algorithm.as_str() != "argon2id" {
        // Not named: a plaintext password may start with `$`.
        return Err(format!(
            "the hash of `{user}` is not an argon2id hash; only argon2id is accepted"
        ));
    }
    if parsed.salt.is_none() || parsed.hash.is_none() {
        return Err(format!("the hash of `{user}` has no salt or no hash part"));
    }
    if let Some(version) = parsed.version
        && argon2::Version::try_from(version).is_err()
    {
        return Err(format!(
            "the hash of `{user}` has an unknown argon2 version {version}"
        ));
    }
    let params = Params::try_from(&parsed)
        .map_err(|e| format!("the hash of `{user}` has bad argon2 parameters ({e})"))?;
    let (m, t, p) = MAX_PARAMS;
    if params.m_cost() > m || params.t_cost() > t || params.p_cost() > p {
        return Err(format!(
            "the hash of `{user}` asks for m={},t={},p={}; at most m={m} (KiB),t={t},p={p} are accepted, as each login runs it",
            params.m_cost(),
            params.t_cost(),
            params.p_cost()
        ));
    }
    Ok(())
}

/// The file to rewrite: a symbolic link's target, so the link stays.
fn resolve(path: &Path) -> Result<PathBuf, PasswdError> {
    match fs::canonicalize(path) {
        Ok(target) => Ok(target),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(path.to_owned()),
        Err(source) => Err(io_error(path, "resolve the path", source)),
    }
}

fn io_error(path: &Path, action: &str, source: io::Error) -> PasswdError {
    PasswdError::Io {
        path: path.to_owned(),
        action: action.to_owned(),
        source,
    }
}

/// Reads `target` as UTF-8, at most [`MAX_FILE_BYTES`]; errors name `shown`.
fn read_bounded(target: &Path, shown: &Path) -> Result<(String, fs::Metadata), PasswdError> {
    let read_error = |source| io_error(shown, "read", source);
    let file = File::open(target).map_err(read_error)?;
    let meta = file.metadata().map_err(read_error)?;
    let too_large = |size| PasswdError::TooLarge {
        path: shown.to_owned(),
        size,
    };
    if meta.len() > MAX_FILE_BYTES {
        return Err(too_large(meta.len()));
    }
    let mut bytes = Vec::new();
    file.take(MAX_FILE_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(read_error)?;
    if bytes.len() as u64 > MAX_FILE_BYTES {
        return Err(too_large(bytes.len() as u64));
    }
    match String::from_utf8(bytes) {
        Ok(text) => Ok((text, meta)),
        Err(e) => {
            let valid = &e.as_bytes()[..e.utf8_error().valid_up_to()];
            Err(PasswdError::Parse {
                path: shown.to_owned(),
                line: valid.iter().filter(|&&b| b == b'\n').count() + 1,
                reason: "not UTF-8 text".to_owned(),
            })
        }
    }
}

/// Replaces `target` with `text`: a temporary file in the same directory
/// (given `existing`'s owner and mode, or mode 0600), fsynced, renamed over
/// `target`, then the directory fsynced. A failure leaves `target` as it
/// was and no temporary file behind.
fn write_atomically(
    target: &Path,
    shown: &Path,
    text: &str,
    existing: Option<&fs::Metadata>,
) -> Result<(), PasswdError> {
    if text.len() as u64 > MAX_FILE_BYTES {
        return Err(PasswdError::TooLarge {
            path: shown.to_owned(),
            size: text.len() as u64,
        });
    }
    let Some(name) = target.file_name() else {
        let source = io::Error::new(io::ErrorKind::InvalidInput, "not a file name");
        return Err(io_error(shown, "write", source));
    };
    let dir = match target.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => Path::new("."),
    };
    let tmp = dir.join(format!(
        ".{}.tmp{}",
        name.to_string_lossy(),
        std::process::id()
    ));
    let written = write_temporary(&tmp, text, existing).and_then(|()| {
        fs::rename(&tmp, target)
            .map_err(|e| io_error(&tmp, &format!("rename it over `{}`", shown.display()), e))
    });
    if written.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    written?;
    File::open(dir)
        .and_then(|dir| dir.sync_all())
        .map_err(|e| io_error(dir, "sync the directory", e))
}

fn write_temporary(
    tmp: &Path,
    text: &str,
    existing: Option<&fs::Metadata>,
) -> Result<(), PasswdError> {
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(NEW_FILE_MODE)
        .open(tmp)
        .map_err(|e| io_error(tmp, "create", e))?;
    let mode = match existing {
        Some(old) => {
            let new = file.metadata().map_err(|e| io_error(tmp, "stat", e))?;
            if (new.uid(), new.gid()) != (old.uid(), old.gid()) {
                std::os::unix::fs::fchown(&file, Some(old.uid()), Some(old.gid()))
                    .map_err(|e| io_error(tmp, "give it the password file's owner", e))?;
            }
            old.mode() & 0o7777
        }
        None => NEW_FILE_MODE,
    };
    // Explicitly: the mode given to open() was narrowed by the umask.
    file.set_permissions(fs::Permissions::from_mode(mode))
        .map_err(|e| io_error(tmp, "set the mode of", e))?;
    file.write_all(text.as_bytes())
        .and_then(|()| file.sync_all())
        .map_err(|e| io_error(tmp, "write", e))
}

#[cfg(test)]
mod tests;
