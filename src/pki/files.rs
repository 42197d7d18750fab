//! Files of the certificate directory: private directories, crash-safe
//! writes with a given mode, and a directory lock.

use std::fs::{self, OpenOptions};
use std::io::Write;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

use super::error::{io_err, PkiError};

pub(super) const KEY_MODE: u32 = 0o600;
pub(super) const PUBLIC_MODE: u32 = 0o644;
const DIR_MODE: u32 = 0o700;

/// An exclusive `flock` on a directory, released when dropped (the file
/// closes). Serialises the read-change-write of a file in it between
/// threads (each takes its own open file) and processes.
pub(super) struct DirLock {
    _file: fs::File,
}

impl DirLock {
    pub(super) fn exclusive(dir: &Path) -> Result<DirLock, PkiError> {
        let file = fs::File::open(dir).map_err(io_err(dir))?;
        #[cfg(unix)]
        {
            use std::os::unix::io::AsRawFd;
            loop {
                // SAFETY: flock on a descriptor this function owns.
                if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) } == 0 {
                    break;
                }
                let e = std::io::Error::last_os_error();
                if e.kind() != std::io::ErrorKind::Interrupted {
                    return Err(io_err(dir)(e));
                }
            }
        }
        Ok(DirLock { _file: file })
    }
}

pub(crate) fn create_private_dir(dir: &Path) -> Result<(), PkiError> {
    let mut builder = fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::DirBuilderExt;
        builder.mode(DIR_MODE);
    }
    #[cfg(not(unix))]
    let _ = DIR_MODE;
    builder.create(dir).map_err(io_err(dir))
}

/// Writes `data` to a new temporary file created with `mode`, then renames
/// it over `path`.
pub(crate) fn write_atomic(path: &Path, data: &[u8], mode: u32) -> Result<(), PkiError> {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let dir = path.parent().unwrap_or_else(|| Path::new("."));
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(
        ".{name}.tmp-{}-{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    ));
    let mut opts = OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(mode);
    }
    #[cfg(not(unix))]
    let _ = mode;
    let result = (|| {
        let mut file = opts.open(&tmp)?;
        file.write_all(data)?;
        file.sync_all()?;
        drop(file);
        fs::rename(&tmp, path)
    })();
    if let Err(source) = result {
        let _ = fs::remove_file(&tmp);
        return Err(PkiError::Io {
            path: path.to_path_buf(),
            source,
        });
    }
    // Make the rename durable; not every platform can open a directory.
    if let Ok(d) = fs::File::open(dir) {
        let _ = d.sync_all();
    }
    Ok(())
}
