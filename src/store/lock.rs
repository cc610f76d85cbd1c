//! One writer per store: an exclusive OS file lock on `<store>/.lock`. The OS releases it
//! when the holder dies (even by kill -9), so a dead run never blocks the store for good.
use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::Path;
use std::time::{Duration, Instant};

use crate::error::{EngineError, Result};

pub struct StoreLock {
    file: File,
}

impl StoreLock {
    /// Takes the lock, waiting for another run to finish. `on_wait` is told who holds it.
    pub fn acquire(store: &Path, wait: bool, on_wait: impl Fn(&str)) -> Result<StoreLock> {
        let path = store.join(".lock");
        let mut file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .open(&path)
            .map_err(|e| EngineError::io(format!("opening {}", path.display()), e))?;
        match file.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => {
                let mut holder = String::new();
                let _ = file.read_to_string(&mut holder);
                let holder = holder.trim().to_string();
                if !wait {
                    return Err(EngineError::Store {
                        path: path.clone(),
                        message: format!(
                            "locked by another flag run ({}); retry when it ends",
                            if holder.is_empty() {
                                "unknown process"
                            } else {
                                &holder
                            }
                        ),
                    });
                }
                on_wait(&holder);
                let start = Instant::now();
                file.lock()
                    .map_err(|e| EngineError::io(format!("locking {}", path.display()), e))?;
                if start.elapsed() > Duration::from_millis(10) {
                    on_wait("");
                }
            }
            Err(std::fs::TryLockError::Error(e)) => {
                return Err(EngineError::io(format!("locking {}", path.display()), e));
            }
        }
        // Who holds it, for the message a waiting run prints.
        let _ = file.set_len(0);
        let _ = file.seek(SeekFrom::Start(0));
        let _ = write!(
            file,
            "pid {} since {}",
            std::process::id(),
            chrono::Utc::now().format("%Y-%m-%d %H:%M:%S UTC")
        );
        let _ = file.flush();
        Ok(StoreLock { file })
    }
}

impl Drop for StoreLock {
    fn drop(&mut self) {
        let _ = self.file.set_len(0);
        let _ = self.file.unlock();
    }
}
