//! [`sha256`]: a model file's identity. The coordinator names the file it planned by it, and
//! a node loads a slice only from a file with the same digest.

use std::path::Path;

use sha2::Digest;

use crate::error::{Error, Result};

/// The sha256 of the file at `path`, as lowercase hex.
pub fn sha256(path: &Path) -> Result<String> {
    let io = |source| Error::Io {
        path: path.to_path_buf(),
        source,
    };
    let mut f = std::fs::File::open(path).map_err(io)?;
    let mut h = sha2::Sha256::new();
    std::io::copy(&mut f, &mut h).map_err(io)?;
    Ok(hex::encode(h.finalize()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_digest_and_a_missing_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("abc");
        std::fs::write(&p, b"abc").expect("write");
        assert_eq!(
            sha256(&p).expect("digest"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert!(matches!(
            sha256(&dir.path().join("missing")),
            Err(Error::Io { .. })
        ));
    }
}
