//! Durable per-function key-value state (the WIT `kv` interface), kept in one
//! SQLite file in the data dir.
//!
//! An invocation reads through to SQLite but buffers its writes in a
//! [`KvTxn`]; the caller commits them in one transaction only after the
//! handler returned `Ok`, so a failed call changes nothing. Quotas (key size,
//! value size, total bytes per function) are checked at `set` time against
//! the committed total plus the call's own pending writes.
//!
//! The database runs in WAL mode with `synchronous = NORMAL`: a committed
//! write survives a crash of the gateway (not necessarily a power cut, which
//! may lose the last commits); state is a cache of what functions learned,
//! not the record of readings — that is the outbox's job.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use rusqlite::{Connection, OptionalExtension, params};

use crate::config::StateQuota;

/// Why the state store failed.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// SQLite refused (disk full, corrupt file…).
    #[error("state store `{path}`: {reason}")]
    Sqlite {
        /// The database file.
        path: PathBuf,
        /// What SQLite said.
        reason: String,
    },
}

/// The shared state database.
#[derive(Clone)]
pub struct StateStore {
    inner: Arc<Inner>,
}

struct Inner {
    path: PathBuf,
    conn: Mutex<Connection>,
    /// Committed bytes (keys + values) per function, loaded lazily.
    totals: Mutex<HashMap<String, u64>>,
}

impl std::fmt::Debug for StateStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StateStore")
            .field("path", &self.inner.path)
            .finish()
    }
}

impl StateStore {
    /// Opens (creating if needed) the state database at `path`.
    pub fn open(path: &Path) -> Result<Self, StateError> {
        let err = |e: rusqlite::Error| StateError::Sqlite {
            path: path.to_owned(),
            reason: e.to_string(),
        };
        let conn = Connection::open(path).map_err(err)?;
        conn.execute_batch(
            "PRAGMA journal_mode = WAL;
             PRAGMA synchronous = NORMAL;
             PRAGMA busy_timeout = 5000;
             CREATE TABLE IF NOT EXISTS kv (
                 function TEXT NOT NULL,
                 key TEXT NOT NULL,
                 value BLOB NOT NULL,
                 PRIMARY KEY (function, key)
             ) WITHOUT ROWID;",
        )
        .map_err(err)?;
        Ok(Self {
            inner: Arc::new(Inner {
                path: path.to_owned(),
                conn: Mutex::new(conn),
                totals: Mutex::new(HashMap::new()),
            }),
        })
    }

    fn err(&self, e: &rusqlite::Error) -> StateError {
        StateError::Sqlite {
            path: self.inner.path.clone(),
            reason: e.to_string(),
        }
    }

    fn conn(&self) -> MutexGuard<'_, Connection> {
        // A panic while holding the lock cannot leave SQLite inconsistent
        // (every change is one transaction): keep going.
        self.inner.conn.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The committed value of `key`.
    pub fn get(&self, function: &str, key: &str) -> Result<Option<Vec<u8>>, StateError> {
        self.conn()
            .query_row(
                "SELECT value FROM kv WHERE function = ?1 AND key = ?2",
                params![function, key],
                |r| r.get(0),
            )
            .optional()
            .map_err(|e| self.err(&e))
    }

    /// Committed keys starting with `prefix`, sorted.
    pub fn keys(&self, function: &str, prefix: &str) -> Result<Vec<String>, StateError> {
        let conn = self.conn();
        let mut stmt = conn
            .prepare_cached(
                "SELECT key FROM kv WHERE function = ?1 AND substr(key, 1, length(?2)) = ?2 ORDER BY key",
            )
            .map_err(|e| self.err(&e))?;
        let rows = stmt
            .query_map(params![function, prefix], |r| r.get::<_, String>(0))
            .map_err(|e| self.err(&e))?;
        rows.collect::<Result<Vec<_>, _>>()
            .map_err(|e| self.err(&e))
    }

    /// Committed bytes (keys + values) of `function`.
    pub fn total(&self, function: &str) -> Result<u64, StateError> {
        if let Some(t) = self.totals().get(function) {
            return Ok(*t);
        }
        let total: i64 = self
            .conn()
            .query_row(
                "SELECT COALESCE(SUM(length(CAST(key AS BLOB)) + length(value)), 0) FROM kv WHERE function = ?1",
                params![function],
                |r| r.get(0),
            )
            .map_err(|e| self.err(&e))?;
        let total = u64::try_from(total).unwrap_or(0);
        self.totals().insert(function.to_owned(), total);
        Ok(total)
    }

    fn totals(&self) -> MutexGuard<'_, HashMap<String, u64>> {
        self.inner.totals.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Applies `writes` (`None` = delete) in one transaction.
    pub fn commit(
        &self,
        function: &str,
        writes: &BTreeMap<String, Option<Vec<u8>>>,
        new_total: u64,
    ) -> Result<(), StateError> {
        if writes.is_empty() {
            return Ok(());
        }
        let mut conn = self.conn();
        let tx = conn.transaction().map_err(|e| self.err(&e))?;
        for (key, value) in writes {
            let r = match value {
                Some(v) => tx.execute(
                    "INSERT INTO kv (function, key, value) VALUES (?1, ?2, ?3)
                     ON CONFLICT (function, key) DO UPDATE SET value = excluded.value",
                    params![function, key, v],
                ),
                None => tx.execute(
                    "DELETE FROM kv WHERE function = ?1 AND key = ?2",
                    params![function, key],
                ),
            };
            r.map_err(|e| self.err(&e))?;
        }
        tx.commit().map_err(|e| self.err(&e))?;
        self.totals().insert(function.to_owned(), new_total);
        Ok(())
    }
}

/// Why a `set` or `delete` was refused.
#[derive(Debug, thiserror::Error)]
pub enum KvRefusal {
    /// A quota would be exceeded.
    #[error("{0}")]
    OverLimit(String),
    /// The key is malformed.
    #[error("{0}")]
    Invalid(String),
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StateError),
}

/// One invocation's view of a function's state: reads see its own pending
/// writes; nothing is stored until [`KvTxn::commit`].
#[derive(Debug)]
pub struct KvTxn {
    store: StateStore,
    function: Arc<str>,
    quota: StateQuota,
    pending: BTreeMap<String, Option<Vec<u8>>>,
    /// Bytes the function would hold with the pending writes; read from the
    /// store at this invocation's first write.
    total: Option<u64>,
}

impl KvTxn {
    /// An empty transaction for `function`.
    pub fn new(store: StateStore, function: Arc<str>, quota: StateQuota) -> Self {
        Self {
            store,
            function,
            quota,
            pending: BTreeMap::new(),
            total: None,
        }
    }

    /// Drops pending writes (a failed call, or the start of the next one).
    pub fn reset(&mut self) {
        self.pending.clear();
        self.total = None;
    }

    /// The value of `key` as this invocation sees it.
    pub fn get(&self, key: &str) -> Result<Option<Vec<u8>>, StateError> {
        match self.pending.get(key) {
            Some(v) => Ok(v.clone()),
            None => self.store.get(&self.function, key),
        }
    }

    fn size_of(&self, key: &str) -> Result<u64, StateError> {
        Ok(self.get(key)?.map_or(0, |v| (key.len() + v.len()) as u64))
    }

    fn check_key(&self, key: &str) -> Result<(), KvRefusal> {
        if key.is_empty() {
            return Err(KvRefusal::Invalid("the key is empty".into()));
        }
        if key.len() > self.quota.max_key_bytes {
            return Err(KvRefusal::OverLimit(format!(
                "key of {} bytes is over the limit of {}",
                key.len(),
                self.quota.max_key_bytes
            )));
        }
        Ok(())
    }

    /// The total as it stands with the pending writes.
    fn total(&mut self) -> Result<u64, StateError> {
        match self.total {
            Some(t) => Ok(t),
            None => {
                let t = self.store.total(&self.function)?;
                self.total = Some(t);
                Ok(t)
            }
        }
    }

    /// Stores `value` under `key` (pending), within the quotas.
    pub fn set(&mut self, key: String, value: Vec<u8>) -> Result<(), KvRefusal> {
        self.check_key(&key)?;
        if value.len() > self.quota.max_value_bytes {
            return Err(KvRefusal::OverLimit(format!(
                "value of {} bytes is over the limit of {}",
                value.len(),
                self.quota.max_value_bytes
            )));
        }
        let old = self.size_of(&key)?;
        let new = (key.len() + value.len()) as u64;
        let total = self.total()? - old + new;
        if total > self.quota.max_total_bytes {
            return Err(KvRefusal::OverLimit(format!(
                "state would grow to {total} bytes, over the function's limit of {}",
                self.quota.max_total_bytes
            )));
        }
        self.total = Some(total);
        self.pending.insert(key, Some(value));
        Ok(())
    }

    /// Removes `key` (pending).
    pub fn delete(&mut self, key: String) -> Result<(), KvRefusal> {
        self.check_key(&key)?;
        let old = self.size_of(&key)?;
        self.total = Some(self.total()? - old);
        self.pending.insert(key, None);
        Ok(())
    }

    /// Keys starting with `prefix`, including pending writes, sorted.
    pub fn keys(&self, prefix: &str) -> Result<Vec<String>, StateError> {
        let mut keys: std::collections::BTreeSet<String> = self
            .store
            .keys(&self.function, prefix)?
            .into_iter()
            .collect();
        for (k, v) in self.pending.range(prefix.to_owned()..) {
            if !k.starts_with(prefix) {
                break;
            }
            if v.is_some() {
                keys.insert(k.clone());
            } else {
                keys.remove(k);
            }
        }
        Ok(keys.into_iter().collect())
    }

    /// Stores the pending writes in one transaction.
    pub fn commit(&mut self) -> Result<(), StateError> {
        if self.pending.is_empty() {
            return Ok(());
        }
        let total = self.total()?;
        let r = self.store.commit(&self.function, &self.pending, total);
        self.reset();
        r
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn txn(store: &StateStore, quota: StateQuota) -> KvTxn {
        KvTxn::new(store.clone(), Arc::from("f"), quota)
    }

    #[test]
    fn writes_are_pending_until_commit_and_survive_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.sqlite");
        let store = StateStore::open(&path).unwrap();
        let mut t = txn(&store, StateQuota::default());
        t.set("a/1".into(), b"x".to_vec()).unwrap();
        t.set("b".into(), b"y".to_vec()).unwrap();
        assert_eq!(t.get("a/1").unwrap(), Some(b"x".to_vec()));
        assert_eq!(store.get("f", "a/1").unwrap(), None, "not yet committed");
        assert_eq!(t.keys("a/").unwrap(), vec!["a/1".to_owned()]);
        t.commit().unwrap();
        // A failed call's writes are dropped.
        t.set("a/2".into(), b"z".to_vec()).unwrap();
        t.delete("b".into()).unwrap();
        t.reset();
        drop(store);
        let store = StateStore::open(&path).unwrap();
        assert_eq!(store.get("f", "a/1").unwrap(), Some(b"x".to_vec()));
        assert_eq!(store.get("f", "b").unwrap(), Some(b"y".to_vec()));
        assert_eq!(store.get("f", "a/2").unwrap(), None);
        assert_eq!(store.get("other", "a/1").unwrap(), None, "per function");
        assert_eq!(store.total("f").unwrap(), 3 + 1 + 1 + 1);
    }

    #[test]
    fn quotas_are_enforced() {
        let dir = tempfile::tempdir().unwrap();
        let store = StateStore::open(&dir.path().join("s.sqlite")).unwrap();
        let quota = StateQuota {
            max_key_bytes: 4,
            max_value_bytes: 8,
            max_total_bytes: 20,
        };
        let mut t = txn(&store, quota);
        assert!(matches!(
            t.set("toolong".into(), vec![]),
            Err(KvRefusal::OverLimit(_))
        ));
        assert!(matches!(
            t.set(String::new(), vec![]),
            Err(KvRefusal::Invalid(_))
        ));
        assert!(matches!(
            t.set("k".into(), vec![0; 9]),
            Err(KvRefusal::OverLimit(_))
        ));
        t.set("k1".into(), vec![0; 8]).unwrap(); // 10
        t.set("k2".into(), vec![0; 8]).unwrap(); // 20
        assert!(matches!(
            t.set("k3".into(), vec![0; 1]),
            Err(KvRefusal::OverLimit(_))
        ));
        // Overwriting and deleting give the room back.
        t.set("k1".into(), vec![0; 1]).unwrap(); // 13
        t.set("k3".into(), vec![0; 5]).unwrap(); // 20
        t.commit().unwrap();
        let mut t = txn(&store, quota);
        assert!(t.set("k4".into(), vec![0]).is_err());
        t.delete("k2".into()).unwrap();
        t.set("k4".into(), vec![0; 8]).unwrap();
        t.commit().unwrap();
        assert_eq!(store.total("f").unwrap(), 3 + 7 + 10);
    }
}
