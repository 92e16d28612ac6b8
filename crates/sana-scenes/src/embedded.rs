//! The model's files, compiled into the binary, and their extraction to a cache folder so that
//! the ordinary folder loader (the same code path as every other model) reads them.
//!
//! The folder is `<cache>/sana/sana-tiny-scenes-<first 16 hex digits of the files' SHA-256>`,
//! written once (to a temporary sibling, then renamed into place, so a crash or a concurrent
//! start never leaves a half-written model) and reused by later runs of the same build. `<cache>`
//! is `$SANA_CACHE_DIR`, else `$XDG_CACHE_HOME`, else `~/.cache`, else the system's temporary
//! folder.

use std::io;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

/// The model's id in the API and on the command line.
pub const MODEL_ID: &str = "sana-tiny-scenes";

/// `(path inside the model folder, contents)`, listed by `build.rs`.
pub const FILES: &[(&str, &[u8])] = include!(concat!(env!("OUT_DIR"), "/model_files.rs"));

/// Total size of the embedded files in bytes.
pub fn size_bytes() -> usize {
    FILES.iter().map(|(_, b)| b.len()).sum()
}

fn digest() -> String {
    let mut h = Sha256::new();
    for (name, bytes) in FILES {
        h.update(name.as_bytes());
        h.update((bytes.len() as u64).to_le_bytes());
        h.update(bytes);
    }
    h.finalize()[..8]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn cache_root() -> PathBuf {
    let var = |k: &str| {
        std::env::var_os(k)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
    };
    var("SANA_CACHE_DIR")
        .or_else(|| var("XDG_CACHE_HOME").map(|p| p.join("sana")))
        .or_else(|| var("HOME").map(|p| p.join(".cache").join("sana")))
        .unwrap_or_else(|| std::env::temp_dir().join("sana"))
}

fn is_complete(dir: &Path) -> bool {
    FILES.iter().all(|(name, bytes)| {
        std::fs::metadata(dir.join(name)).is_ok_and(|m| m.len() == bytes.len() as u64)
    })
}

fn write_into(dir: &Path) -> io::Result<PathBuf> {
    let target = dir.join(format!("{MODEL_ID}-{}", digest()));
    if is_complete(&target) {
        return Ok(target);
    }
    std::fs::create_dir_all(dir)?;
    if target.exists() {
        // A damaged or partial copy (rename never leaves one; a user's edit might).
        std::fs::remove_dir_all(&target)?;
    }
    // Unique per process and call: concurrent extractions never share a temporary folder.
    static CALLS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let call = CALLS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let tmp = dir.join(format!(".{MODEL_ID}-{}-{call}.tmp", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    for (name, bytes) in FILES {
        let path = tmp.join(name);
        std::fs::create_dir_all(path.parent().expect("a file inside the folder"))?;
        std::fs::write(&path, bytes)?;
    }
    match std::fs::rename(&tmp, &target) {
        Ok(()) => Ok(target),
        // Another process finished first: use its copy.
        Err(_) if is_complete(&target) => {
            let _ = std::fs::remove_dir_all(&tmp);
            Ok(target)
        }
        Err(e) => {
            let _ = std::fs::remove_dir_all(&tmp);
            Err(e)
        }
    }
}

/// The embedded model as a diffusers folder on disk: extracted on first use, then reused. Falls
/// back to the temporary folder when the cache folder is not writable.
pub fn materialize() -> io::Result<PathBuf> {
    // One extraction at a time in this process (other processes are handled by the rename).
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _guard = LOCK
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    write_into(&cache_root()).or_else(|first| {
        write_into(&std::env::temp_dir().join("sana")).map_err(|e| {
            io::Error::new(
                e.kind(),
                format!(
                    "cannot extract the embedded model to {} ({first}) nor to the temporary folder ({e})",
                    cache_root().display()
                ),
            )
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn extracts_every_file_once_and_reuses_it() {
        let dir = std::env::temp_dir().join(format!("sana-embedded-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let first = write_into(&dir).unwrap();
        assert!(first.join("model_index.json").is_file());
        for (name, bytes) in FILES {
            assert_eq!(&std::fs::read(first.join(name)).unwrap(), bytes, "{name}");
        }
        let modified = std::fs::metadata(first.join("model_index.json"))
            .unwrap()
            .modified()
            .unwrap();
        assert_eq!(write_into(&dir).unwrap(), first);
        let again = std::fs::metadata(first.join("model_index.json"))
            .unwrap()
            .modified()
            .unwrap();
        assert_eq!(modified, again, "a complete copy is not rewritten");
        // A damaged copy (a truncated file) is replaced.
        std::fs::write(first.join("model_index.json"), b"{").unwrap();
        assert_eq!(write_into(&dir).unwrap(), first);
        assert!(is_complete(&first));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn fits_the_size_budget() {
        assert!(size_bytes() <= 8 << 20, "{} bytes", size_bytes());
    }
}
