//! Modes of what the gateway creates in its data directory, set explicitly
//! rather than left to the umask: directories 0700, the database, the
//! config it writes, keys and password hashes 0600 (certificates and
//! `revoked.json`, which are public, 0644 inside the 0700 `certs/`).

use std::fs;
use std::io;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::Path;

pub const PRIVATE_DIR: u32 = 0o700;
pub const PRIVATE_FILE: u32 = 0o600;

/// Creates `dir` and any missing parents with mode 0700 (exactly: a umask
/// that takes owner bits away does not apply).
pub fn create_private_dir_all(dir: &Path) -> io::Result<()> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(PRIVATE_DIR)
        .create(dir)?;
    fs::set_permissions(dir, fs::Permissions::from_mode(PRIVATE_DIR))
}

/// Writes `data` to `path`, which must not exist, as a 0600 file.
pub fn write_new_private(path: &Path, data: &[u8]) -> io::Result<()> {
    use std::io::Write;
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(PRIVATE_FILE)
        .open(path)?;
    f.set_permissions(fs::Permissions::from_mode(PRIVATE_FILE))?;
    f.write_all(data)?;
    f.sync_all()
}

/// Makes `path` a 0600 file before something else opens it: creates it
/// empty if absent (redb initialises an empty file as a new database), and
/// takes group and other access away from an existing one. Returns true
/// when an existing file's mode was narrowed.
pub fn private_file(path: &Path) -> io::Result<bool> {
    match fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(PRIVATE_FILE)
        .open(path)
    {
        Ok(f) => {
            f.set_permissions(fs::Permissions::from_mode(PRIVATE_FILE))?;
            Ok(false)
        }
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
            let mode = fs::metadata(path)?.permissions().mode() & 0o777;
            if mode & 0o077 == 0 {
                return Ok(false);
            }
            fs::set_permissions(path, fs::Permissions::from_mode(mode & 0o700))?;
            Ok(true)
        }
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mode(p: &Path) -> u32 {
        fs::metadata(p).unwrap().permissions().mode() & 0o777
    }

    #[test]
    fn created_private_and_existing_files_narrowed() {
        let t = tempfile::tempdir().unwrap();
        let d = t.path().join("a/b");
        create_private_dir_all(&d).unwrap();
        assert_eq!(mode(&d), 0o700);
        let f = d.join("x");
        write_new_private(&f, b"secret").unwrap();
        assert_eq!(mode(&f), 0o600);
        assert!(write_new_private(&f, b"again").is_err(), "never replaced");
        let db = d.join("db");
        assert!(!private_file(&db).unwrap());
        assert_eq!((mode(&db), fs::metadata(&db).unwrap().len()), (0o600, 0));
        fs::set_permissions(&db, fs::Permissions::from_mode(0o644)).unwrap();
        assert!(private_file(&db).unwrap());
        assert_eq!(mode(&db), 0o600);
    }
}
