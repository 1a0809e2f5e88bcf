//! TLS to the deployment: one set of trusted roots, loaded once per process
//! on first use, and the rustls client configurations (ring provider) built
//! on it for the REST client ([`rest_config`]) and the tailnet dialer's
//! websocket and DERP upgrades ([`upgrade_config`]).
//!
//! Which roots: the same files as `rustls-native-certs` (and so as OpenSSL):
//! `SSL_CERT_FILE` and the directories of `SSL_CERT_DIR` when either is
//! set, otherwise the bundle and directory that `openssl-probe` finds
//! (`/etc/ssl/certs/ca-certificates.crt` and `/etc/ssl/certs` on Debian).
//!
//! Why not `rustls-native-certs` itself on Linux: it decodes every PEM block
//! of every file with a constant-time base64 decoder, and Debian ships each
//! root twice (the bundle and the directory), so loading the roots was 8.6M
//! of the 10.5M instructions between process start and the TLS ClientHello
//! (callgrind; docs/PERFORMANCE.md). Here each distinct PEM body is decoded
//! once, with the ordinary `base64` decoder: these are public certificates,
//! there is no secret for a timing side channel to leak.

use std::sync::{Arc, OnceLock};

use tokio_rustls::rustls;

/// The system's trusted roots, loaded once; an error when there are none.
fn roots() -> Result<Arc<rustls::RootCertStore>, String> {
    static ROOTS: OnceLock<Result<Arc<rustls::RootCertStore>, String>> = OnceLock::new();
    ROOTS
        .get_or_init(|| {
            let started = std::time::Instant::now();
            let store = system_roots();
            log::debug!(
                "tls: {} trusted roots loaded in {:.1} ms",
                store.len(),
                started.elapsed().as_secs_f64() * 1000.0
            );
            if store.is_empty() {
                return Err(
                    "no trusted root certificates found on this system (install ca-certificates, or point SSL_CERT_FILE at a PEM bundle)"
                        .to_string(),
                );
            }
            Ok(Arc::new(store))
        })
        .clone()
}

fn config(alpn: &[&[u8]]) -> Result<rustls::ClientConfig, String> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots()?)
        .with_no_client_auth();
    cfg.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(cfg)
}

/// For reqwest (which takes the configuration by value): HTTP/2 or 1.1.
pub fn rest_config() -> Result<rustls::ClientConfig, String> {
    config(&[b"h2", b"http/1.1"])
}

/// For websocket and DERP upgrades, which are HTTP/1.1 only.
pub fn upgrade_config() -> Result<Arc<rustls::ClientConfig>, String> {
    static CONFIG: OnceLock<Result<Arc<rustls::ClientConfig>, String>> = OnceLock::new();
    CONFIG
        .get_or_init(|| config(&[b"http/1.1"]).map(Arc::new))
        .clone()
}

#[cfg(all(unix, not(target_os = "macos")))]
fn system_roots() -> rustls::RootCertStore {
    let (file, dirs) = cert_paths();
    let mut loader = Loader {
        store: rustls::RootCertStore::empty(),
        files: Default::default(),
        // Room for a typical system's roots without rehashing.
        bodies: std::collections::HashSet::with_capacity(512),
    };
    if let Some(f) = &file {
        loader.file(f);
    }
    for d in &dirs {
        match &file {
            Some(f) if !loader.store.is_empty() && bundle_covers_dir(f, d) => {
                log::debug!(
                    "tls: {} is older than {}, which holds its certificates; not reading it",
                    d.display(),
                    f.display()
                );
            }
            _ => loader.dir(d),
        }
    }
    loader.store
}

/// Whether every certificate of `dir` is already in `bundle`, judged the
/// way `update-ca-certificates` (Debian) and `update-ca-trust` (Fedora)
/// lay them out: the bundle is an entry of the directory and was written
/// after the directory last gained or lost an entry. A certificate dropped
/// in (and hashed with `c_rehash`) later makes the directory newer, and then
/// it is read like any other. Reading the directory costs ~300 stat/open/
/// read calls for nothing on a stock system: 3.2 ms of a 7 ms https
/// start-up here (docs/PERFORMANCE.md).
#[cfg(all(unix, not(target_os = "macos")))]
fn bundle_covers_dir(bundle: &std::path::Path, dir: &std::path::Path) -> bool {
    let (Ok(b), Ok(d)) = (std::fs::canonicalize(bundle), std::fs::canonicalize(dir)) else {
        return false;
    };
    // The bundle itself (not a symlink to elsewhere) is in the directory.
    let in_dir = bundle
        .parent()
        .and_then(|p| std::fs::canonicalize(p).ok())
        .is_some_and(|p| p == d)
        && b.parent() == Some(d.as_path());
    if !in_dir {
        return false;
    }
    let modified = |p: &std::path::Path| std::fs::metadata(p).and_then(|m| m.modified()).ok();
    match (modified(&b), modified(&d)) {
        (Some(b), Some(d)) => d <= b,
        _ => false,
    }
}

/// macOS and Windows keep roots in the platform store.
#[cfg(not(all(unix, not(target_os = "macos"))))]
fn system_roots() -> rustls::RootCertStore {
    let mut store = rustls::RootCertStore::empty();
    for cert in rustls_native_certs::load_native_certs().certs {
        let _ = store.add(cert);
    }
    store
}

/// `SSL_CERT_FILE`/`SSL_CERT_DIR` when either is set, else what
/// openssl-probe finds: the rules of `rustls_native_certs::load_native_certs`.
#[cfg(all(unix, not(target_os = "macos")))]
fn cert_paths() -> (Option<std::path::PathBuf>, Vec<std::path::PathBuf>) {
    let file = std::env::var_os("SSL_CERT_FILE")
        .filter(|v| !v.is_empty())
        .map(std::path::PathBuf::from);
    let dirs: Vec<std::path::PathBuf> = std::env::var_os("SSL_CERT_DIR")
        .map(|v| {
            std::env::split_paths(&v)
                .filter(|p| !p.as_os_str().is_empty())
                .collect()
        })
        .unwrap_or_default();
    if file.is_some() || !dirs.is_empty() {
        return (file, dirs);
    }
    let probed = openssl_probe::probe();
    (probed.cert_file, probed.cert_dir)
}

/// Most bytes read from one certificate file (Debian's bundle is ~220 KB).
#[cfg(all(unix, not(target_os = "macos")))]
const MAX_CERT_FILE: u64 = 16 << 20;

#[cfg(all(unix, not(target_os = "macos")))]
struct Loader {
    store: rustls::RootCertStore,
    /// (device, inode) of files already read: the bundle also sits in the
    /// directory, and `c_rehash` links point at files there.
    files: std::collections::HashSet<(u64, u64)>,
    /// PEM bodies already decoded (each root is in the bundle and its file).
    bodies: std::collections::HashSet<Body>,
}

/// A PEM body as a set member: compared whole, hashed on its length and
/// tail (the signature's base64, distinct per certificate) so that hashing
/// doesn't read every byte of every certificate twice.
#[cfg(all(unix, not(target_os = "macos")))]
#[derive(PartialEq, Eq)]
struct Body(Vec<u8>);

#[cfg(all(unix, not(target_os = "macos")))]
impl std::hash::Hash for Body {
    fn hash<H: std::hash::Hasher>(&self, h: &mut H) {
        let tail = &self.0[self.0.len().saturating_sub(32)..];
        h.write_usize(self.0.len());
        h.write(tail);
    }
}

#[cfg(all(unix, not(target_os = "macos")))]
impl Loader {
    fn file(&mut self, path: &std::path::Path) {
        use std::io::Read;
        use std::os::unix::fs::MetadataExt;
        let Ok(meta) = std::fs::metadata(path) else {
            return;
        };
        if !meta.is_file() || !self.files.insert((meta.dev(), meta.ino())) {
            return;
        }
        let mut text = Vec::with_capacity(meta.len().min(MAX_CERT_FILE) as usize + 1);
        let read =
            std::fs::File::open(path).and_then(|f| f.take(MAX_CERT_FILE).read_to_end(&mut text));
        if let Err(e) = read {
            log::debug!("tls: cannot read {}: {e}", path.display());
            return;
        }
        for body in pem_certificates(&text).into_iter().map(Body) {
            if !self.bodies.contains(&body) {
                self.add(&body.0);
                self.bodies.insert(body);
            }
        }
    }

    fn dir(&mut self, dir: &std::path::Path) {
        let Ok(entries) = std::fs::read_dir(dir) else {
            return;
        };
        for entry in entries.flatten() {
            self.file(&entry.path());
        }
    }

    fn add(&mut self, body: &[u8]) {
        use base64::Engine;
        match base64::engine::general_purpose::STANDARD.decode(body) {
            Ok(der) => {
                let _ = self.store.add(rustls::pki_types::CertificateDer::from(der));
            }
            Err(e) => log::debug!("tls: skipping a malformed PEM certificate: {e}"),
        }
    }
}

/// The base64 bodies (line breaks and blanks removed) of every
/// `CERTIFICATE` block. Searched with memchr's SIMD routines: a byte-wise
/// scan of a 220 KB bundle cost as much as decoding it.
#[cfg(any(test, all(unix, not(target_os = "macos"))))]
fn pem_certificates(text: &[u8]) -> Vec<Vec<u8>> {
    use memchr::memmem;
    const BEGIN: &[u8] = b"-----BEGIN CERTIFICATE-----";
    const END: &[u8] = b"-----END CERTIFICATE-----";
    let (begin, end) = (memmem::Finder::new(BEGIN), memmem::Finder::new(END));
    let mut out = Vec::new();
    let mut rest = text;
    while let Some(at) = begin.find(rest) {
        let after = &rest[at + BEGIN.len()..];
        let Some(stop) = end.find(after) else {
            break;
        };
        let raw = &after[..stop];
        let mut body = Vec::with_capacity(raw.len());
        let mut from = 0;
        for nl in memchr::memchr_iter(b'\n', raw).chain([raw.len()]) {
            body.extend_from_slice(raw[from..nl].trim_ascii());
            from = nl + 1;
        }
        out.push(body);
        rest = &after[stop + END.len()..];
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pem_blocks_are_found_and_others_skipped() {
        let text = b"junk\n-----BEGIN CERTIFICATE-----\nQUJD\r\nREVG\n-----END CERTIFICATE-----\n\
            -----BEGIN PRIVATE KEY-----\nWFla\n-----END PRIVATE KEY-----\n\
            -----BEGIN CERTIFICATE-----\nR0hJ\n-----END CERTIFICATE-----\n\
            -----BEGIN CERTIFICATE-----\nunterminated";
        assert_eq!(
            pem_certificates(text),
            vec![b"QUJDREVG".to_vec(), b"R0hJ".to_vec()]
        );
    }

    #[cfg(all(unix, not(target_os = "macos")))]
    #[test]
    fn a_bundle_covers_its_own_directory_until_the_directory_changes() {
        use std::time::{Duration, SystemTime};
        let t = tempfile::tempdir().unwrap();
        let dir = t.path().join("certs");
        std::fs::create_dir(&dir).unwrap();
        std::fs::write(dir.join("abcd1234.0"), "old cert").unwrap();
        let bundle = dir.join("bundle.crt");
        std::fs::write(&bundle, "all certs").unwrap();
        let set = |p: &std::path::Path, at: SystemTime| {
            std::fs::File::open(p).unwrap().set_modified(at).unwrap();
        };
        let base = SystemTime::now() - Duration::from_secs(3600);
        set(&dir, base);
        set(&bundle, base + Duration::from_secs(10));
        assert!(bundle_covers_dir(&bundle, &dir));
        // A bundle elsewhere says nothing about this directory.
        let other = t.path().join("other.crt");
        std::fs::write(&other, "x").unwrap();
        assert!(!bundle_covers_dir(&other, &dir));
        // A certificate added after the bundle was written.
        std::fs::write(dir.join("feed5678.0"), "new cert").unwrap();
        assert!(!bundle_covers_dir(&bundle, &dir));
    }

    /// Whatever the system has, the fast loader finds the same set of roots
    /// as rustls-native-certs.
    #[cfg(all(unix, not(target_os = "macos")))]
    #[test]
    fn same_roots_as_rustls_native_certs() {
        let key = |a: &rustls::pki_types::TrustAnchor<'_>| {
            (
                a.subject.as_ref().to_vec(),
                a.subject_public_key_info.as_ref().to_vec(),
            )
        };
        let ours: std::collections::BTreeSet<_> = system_roots().roots.iter().map(key).collect();
        let mut theirs_store = rustls::RootCertStore::empty();
        for c in rustls_native_certs::load_native_certs().certs {
            let _ = theirs_store.add(c);
        }
        let theirs: std::collections::BTreeSet<_> = theirs_store.roots.iter().map(key).collect();
        assert_eq!(ours, theirs);
    }
}
