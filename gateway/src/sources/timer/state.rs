//! `catch_up = "once"` across restarts: the last scheduled time a timer
//! fired, kept in `<data_dir>/timers/<name>.last` (decimal Unix
//! milliseconds). Written to a temporary file, synced and renamed over the
//! old one, so a crash leaves the old value or the new one, never half a
//! file. Written at most once a second (and at shutdown): after a crash the
//! value may be up to a second old, which can add one catch-up tick for a
//! tick that did fire.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::time::Instant;

/// Shortest time between two writes.
const MIN_GAP: Duration = Duration::from_secs(1);

/// Why the state file cannot be used.
#[derive(Debug, thiserror::Error)]
#[error("cannot create {}: {source}", .path.display())]
pub struct StateError {
    /// The directory.
    pub path: PathBuf,
    /// The I/O error.
    #[source]
    pub source: std::io::Error,
}

/// A timer's state file.
#[derive(Debug)]
pub struct StateFile {
    path: PathBuf,
    saved_at: Option<Instant>,
    /// Fired but not yet written.
    pending: Option<i64>,
}

impl StateFile {
    /// Creates `dir` if needed and reads the timer's last scheduled time,
    /// if the file holds one. An unreadable or malformed file is logged and
    /// treated as absent (no catch-up tick), never fatal.
    pub fn open(dir: &Path, name: &str) -> Result<(Self, Option<i64>), StateError> {
        std::fs::create_dir_all(dir).map_err(|source| StateError {
            path: dir.to_owned(),
            source,
        })?;
        let path = dir.join(format!("{name}.last"));
        let last = match read_small(&path) {
            Ok(text) => match text.trim().parse::<i64>() {
                Ok(ms) => Some(ms),
                Err(e) => {
                    tracing::warn!(timer = name, path = %path.display(), error = %e, "Timer state file is malformed; no catch-up tick.");
                    None
                }
            },
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => {
                tracing::warn!(timer = name, path = %path.display(), error = %e, "Timer state file unreadable; no catch-up tick.");
                None
            }
        };
        let file = Self {
            path,
            saved_at: None,
            pending: None,
        };
        Ok((file, last))
    }

    /// Notes that the tick due at `scheduled_ms` fired; writes it unless
    /// the last write was less than a second ago.
    pub async fn fired(&mut self, scheduled_ms: i64) {
        self.pending = Some(scheduled_ms);
        if self.saved_at.is_none_or(|t| t.elapsed() >= MIN_GAP) {
            self.flush().await;
        }
    }

    /// Writes what is not written yet.
    pub async fn flush(&mut self) {
        let Some(value) = self.pending.take() else {
            return;
        };
        self.saved_at = Some(Instant::now());
        let path = self.path.clone();
        let written = tokio::task::spawn_blocking(move || write(&path, value)).await;
        let error = match written {
            Ok(Ok(())) => return,
            Ok(Err(e)) => e.to_string(),
            Err(e) => e.to_string(),
        };
        tracing::warn!(path = %self.path.display(), error = %error, "Timer state not saved; a restart may miss its catch-up tick.");
    }
}

/// Replaces `path` with `value` atomically.
pub fn write(path: &Path, value: i64) -> std::io::Result<()> {
    let tmp = path.with_extension("last.tmp");
    let mut file = std::fs::File::create(&tmp)?;
    writeln!(file, "{value}")?;
    file.sync_all()?;
    drop(file);
    std::fs::rename(&tmp, path)?;
    if let Some(dir) = path.parent() {
        std::fs::File::open(dir)?.sync_all()?;
    }
    Ok(())
}

/// The start of the file at `path`, at most [`MAX_STATE_BYTES`]: a state
/// file holds one number, and a huge or endless file (a FIFO, garbage) must
/// not hold up the start.
fn read_small(path: &Path) -> std::io::Result<String> {
    use std::io::Read;
    let meta = std::fs::metadata(path)?;
    if !meta.is_file() {
        return Err(std::io::Error::other("not a regular file"));
    }
    let mut text = String::new();
    std::fs::File::open(path)?
        .take(MAX_STATE_BYTES)
        .read_to_string(&mut text)?;
    Ok(text)
}

/// A state file's size limit: an `i64` in decimal and a newline fit.
const MAX_STATE_BYTES: u64 = 32;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_huge_or_odd_state_file_is_read_no_further_than_its_limit() {
        let dir = tempfile::tempdir().expect("tempdir");
        // 64 MiB of digits: read only MAX_STATE_BYTES of it, found malformed.
        std::fs::write(dir.path().join("big.last"), "1".repeat(64 << 20)).expect("write");
        let (_, last) = StateFile::open(dir.path(), "big").expect("opened");
        assert_eq!(last, None);
        // A FIFO where the file should be (nothing ever writes to it): not
        // read, so the start does not hang; no catch-up.
        let fifo = dir.path().join("odd.last");
        let made = std::process::Command::new("mkfifo").arg(&fifo).status();
        assert!(made.is_ok_and(|s| s.success()), "mkfifo");
        let (tx, rx) = std::sync::mpsc::channel();
        let path = dir.path().to_owned();
        std::thread::spawn(move || {
            let _ = tx.send(StateFile::open(&path, "odd").map(|(_, last)| last).ok());
        });
        let last = rx
            .recv_timeout(std::time::Duration::from_secs(10))
            .expect("opening the state file must not block on a FIFO");
        assert_eq!(last, Some(None));
        std::fs::write(dir.path().join("ok.last"), "1767268805000\n").expect("write");
        let (_, last) = StateFile::open(dir.path(), "ok").expect("opened");
        assert_eq!(last, Some(1_767_268_805_000));
    }
}
