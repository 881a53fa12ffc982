//! `gatehouse sri-manifest DIR`: the SRI manifest page-guard reads (`sri.manifest`): each script
//! and stylesheet under DIR by its URL path, with the `sha384-…` of its bytes.

use crate::Error;
use base64::Engine;
use sha2::{Digest, Sha384};
use std::collections::BTreeMap;
use std::fs;
use std::path::Path;

/// File names that get an entry: what `<script src>` and `<link rel=stylesheet>` load.
const EXTENSIONS: &[&str] = &["js", "mjs", "css"];

/// `sha384-<base64>` of `data`, as an `integrity` attribute takes it.
pub fn sri_hash(data: &[u8]) -> String {
    format!(
        "sha384-{}",
        base64::engine::general_purpose::STANDARD.encode(Sha384::digest(data))
    )
}

/// URL → hash for every `.js`, `.mjs` and `.css` file under `dir` (recursively, sorted).
/// URLs are `prefix` + `/` + the path relative to `dir` (prefix `""`: `/phone.js`; prefix
/// `https://cdn.example/lib`: `https://cdn.example/lib/phone.js`).
pub fn manifest(dir: &Path, prefix: &str) -> Result<BTreeMap<String, String>, Error> {
    let mut out = BTreeMap::new();
    walk(dir, dir, prefix.trim_end_matches('/'), &mut out)?;
    Ok(out)
}

fn walk(
    root: &Path,
    dir: &Path,
    prefix: &str,
    out: &mut BTreeMap<String, String>,
) -> Result<(), Error> {
    let entries = fs::read_dir(dir).map_err(|e| Error::new(format!("{}: {e}", dir.display())))?;
    for entry in entries {
        let entry = entry.map_err(|e| Error::new(format!("{}: {e}", dir.display())))?;
        let path = entry.path();
        let kind = entry
            .file_type()
            .map_err(|e| Error::new(format!("{}: {e}", path.display())))?;
        if kind.is_dir() {
            walk(root, &path, prefix, out)?;
            continue;
        }
        let wanted = path
            .extension()
            .and_then(|e| e.to_str())
            .is_some_and(|e| EXTENSIONS.contains(&e.to_ascii_lowercase().as_str()));
        if !kind.is_file() || !wanted {
            continue;
        }
        let rel = path
            .strip_prefix(root)
            .map_err(|e| Error::new(format!("{}: {e}", path.display())))?;
        let url_path: Vec<String> = rel
            .components()
            .map(|c| c.as_os_str().to_string_lossy().into_owned())
            .collect();
        let data = fs::read(&path).map_err(|e| Error::new(format!("{}: {e}", path.display())))?;
        out.insert(format!("{prefix}/{}", url_path.join("/")), sri_hash(&data));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn manifest_of_a_directory() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join("a.js"), b"alert(1)").unwrap();
        fs::create_dir(dir.path().join("css")).unwrap();
        fs::write(dir.path().join("css/site.css"), b"p{}").unwrap();
        fs::write(dir.path().join("index.html"), b"<p>").unwrap();
        let m = manifest(dir.path(), "").unwrap();
        assert_eq!(m.keys().collect::<Vec<_>>(), vec!["/a.js", "/css/site.css"]);
        // The SRI of "alert(1)" as browsers compute it.
        assert_eq!(
            m["/a.js"],
            "sha384-HT2E9NfWiuQ/w1PRai+hTyqW16NIoCGA/m8VQDUopfAtcz6YQjtsMmQd5uRbVDpW"
        );
        let m = manifest(dir.path(), "https://cdn.example/lib/").unwrap();
        assert!(m.contains_key("https://cdn.example/lib/a.js"));
        // What page-guard accepts.
        let cfg = serde_json::json!({"sri": {"manifest": m}});
        gatehouse_core::page_guard::PageGuardConfig::compile(cfg.to_string().as_bytes(), &|_| None)
            .unwrap();
    }
}
